"""Constrained SFT (train.constrained; Qi et al. 2024): the loss against a slow per-token transcription of the
authors' formula and against Hugging Face's cross-entropy at beta = 0, answer positions of padded and packed
batches, the frozen reference (the seed: its own engine under ZeRO-2 and ZeRO-3, the adapters disabled under LoRA),
2-worker Ray Train runs, the config's validation and the refusal of Liger, and the cost of the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import _cfg, _check_export

from lookahead_ray.config import ConfigError, ConstrainedSFTConfig, load_config
from lookahead_ray.data.tokenization import IGNORE_INDEX
from lookahead_ray.train.loop import collate, collate_packed
from lookahead_ray.train.objectives import (
    answer_positions,
    constrained_loss,
    position_betas,
    token_logps,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 61
X = IGNORE_INDEX


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0, tie_word_embeddings=False)).float()


def _rows(lengths: list[int], seed: int = 0) -> dict[str, list]:
    """Prompt labels -100, then the answer (the last half, at least 7 tokens where the row allows: past bias_length)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, VOCAB, n).tolist() for n in lengths]
    answer = [min(n - 1, max(7, n // 2)) for n in lengths]
    labels = [[X] * (n - a) + x[n - a:] for x, n, a in zip(ids, lengths, answer, strict=True)]
    return {"input_ids": ids, "labels": labels}


def _gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _slow_loss(policy_logits, ref_logits, labels, cfg: ConstrainedSFTConfig):
    """The authors' soft_sft_loss, token by token: each row is one example, its answer tokens counted from 0."""
    terms = []
    for row in range(labels.shape[0]):
        t = 0
        for col in range(1, labels.shape[1]):
            label = int(labels[row, col])
            if label == X:
                continue
            logp = torch.log_softmax(policy_logits[row, col - 1].float(), -1)[label]
            ref = torch.log_softmax(ref_logits[row, col - 1].float(), -1)[label]
            beta = cfg.beta * (cfg.first_token_bias_factor if t == 0 and cfg.bias_length > 0
                               else cfg.bias_factor if t < cfg.bias_length else 1.0)
            weight = max(2 * (1 - 1 / (1 + math.exp(-beta * float(logp.detach() - ref)))), cfg.min_weight)
            terms.append(-weight * logp)
            t += 1
    return torch.stack(terms).mean()


def test_position_betas_follow_the_authors_schedule():
    assert position_betas(torch.arange(8), ConstrainedSFTConfig()).tolist() == pytest.approx(
        [0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1])
    assert position_betas(torch.arange(4), ConstrainedSFTConfig(beta=1.0, bias_length=0)).tolist() == [1.0] * 4
    assert position_betas([0, 1, 2], ConstrainedSFTConfig(beta=0.0)).tolist() == [0.0] * 3


def test_answer_positions_restart_per_row_of_a_padded_batch_and_per_example_of_a_packed_row():
    padded = torch.tensor([[X, X, 5, 6, 7, X],
                           [X, 8, 9, X, X, X],
                           [X, 4, X, 5, 6, X]])  # an answer in two pieces (two assistant turns) counts on
    assert answer_positions(padded).tolist() == [[-1, -1, 0, 1, 2, -1], [-1, 0, 1, -1, -1, -1], [-1, 0, -1, 1, 2, -1]]
    # Two examples in one row (the second's first label is -100, as collate_packed writes it), then padding.
    packed = torch.tensor([[X, X, 5, 6, X, X, 7, 8, 9, X, X]])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]])
    assert answer_positions(packed, position_ids).tolist() == [[-1, -1, 0, 1, -1, -1, 0, 1, 2, -1, -1]]
    assert answer_positions(packed).tolist() == [[-1, -1, 0, 1, -1, -1, 2, 3, 4, -1, -1]]  # as one example


def test_with_beta_zero_the_loss_is_hugging_faces_cross_entropy_in_value_and_every_gradient():
    policy, reference = _model(0), _model(1)
    batch = collate(_rows([9, 23, 14, 30]), 0, "cpu")
    expected = policy(**batch).loss
    expected_gradients = _gradients(policy, expected)
    with torch.no_grad():
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = constrained_loss(logits, ref_logits, batch["labels"], ConstrainedSFTConfig(beta=0.0))
    assert abs(loss.item() - expected.item()) <= 1e-6
    for name, gradient in _gradients(policy, loss).items():
        assert (gradient - expected_gradients[name]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("cfg", [ConstrainedSFTConfig(), ConstrainedSFTConfig(beta=3.0, bias_length=3),
                                 ConstrainedSFTConfig(beta=5.0, bias_length=0, min_weight=0.5)],
                         ids=["defaults", "strong", "no-bias-floor"])
def test_the_loss_and_its_gradients_match_a_slow_per_token_computation(cfg):
    policy, reference = _model(0), _model(1)  # another model: the weights are far from 1 (and reach the floor)
    batch = collate(_rows([9, 23, 14, 30], seed=1), 0, "cpu")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
    slow = _slow_loss(policy(**inputs).logits, ref_logits, batch["labels"], cfg)
    slow_gradients = _gradients(policy, slow)
    loss = constrained_loss(policy(**inputs).logits, ref_logits, batch["labels"], cfg)
    assert loss.item() == pytest.approx(slow.item(), rel=1e-6)
    for name, gradient in _gradients(policy, loss).items():
        torch.testing.assert_close(gradient, slow_gradients[name], rtol=1e-5, atol=1e-7, msg=name)
    assert abs(loss.item() - policy(**batch).loss.item()) > 1e-3  # not the cross-entropy: the weights moved it


def test_a_packed_batch_has_the_constrained_loss_and_gradients_of_its_examples_padded():
    policy, reference = _model(0), _model(1)
    rows = _rows([11, 19, 8, 25])
    packed = collate_packed(rows, [2, 2], 0, "cpu")
    padded = collate(rows, 0, "cpu")
    cfg = ConstrainedSFTConfig(beta=1.0)

    def loss_of(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            ref_logits = reference(**inputs).logits
        return constrained_loss(policy(**inputs).logits, ref_logits, batch["labels"], cfg, batch.get("position_ids"))

    padded_loss = loss_of(padded)
    padded_gradients = _gradients(policy, padded_loss)
    packed_loss = loss_of(packed)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    for name, gradient in _gradients(policy, packed_loss).items():
        torch.testing.assert_close(gradient, padded_gradients[name], rtol=1e-4, atol=1e-6, msg=name)


def test_token_logps_are_aligned_with_the_labels_they_predict():
    logits = torch.randn(1, 4, VOCAB)
    labels = torch.tensor([[X, 3, X, 7]])
    logps = token_logps(logits, labels)
    expected = [0.0, torch.log_softmax(logits[0, 0], -1)[3].item(), 0.0, torch.log_softmax(logits[0, 2], -1)[7].item()]
    assert logps[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_constrained_settings_are_typed_validated_in_one_line_part_of_the_identity_and_refuse_liger(tmp_path):
    from lookahead_ray.train.plan import plan_training
    from lookahead_ray.train.run_guard import training_settings

    tiny = REPO / "configs" / "tiny_cpu.yaml"
    cfg = load_config(tiny, ["train.constrained={}", "train.constrained.beta=0.2"])
    assert cfg.train.constrained == ConstrainedSFTConfig(beta=0.2)
    assert load_config(tiny).train.constrained is None
    settings = training_settings(cfg)  # the run's identity: a resume with another beta (or plain SFT) is refused
    assert settings["train.constrained"]["beta"] == 0.2 and settings["train.constrained"]["bias_length"] == 5
    assert training_settings(load_config(tiny))["train.constrained"] is None
    with pytest.raises(ConfigError, match=r"train.constrained: beta, bias_factor, .* must be >= 0 \(got beta=-1") as info:
        load_config(tiny, ["train.constrained.beta=-1"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="model.liger_kernel and train.constrained") as info:
        plan_training(_cfg(tmp_path, "train.constrained={}", "model.liger_kernel=true", "train.use_gpu=true")).check()
    assert "\n" not in str(info.value)


def test_the_cost_counts_the_reference_weights_and_nothing_under_lora():
    from lookahead_ray.train.cost import ModelShape, estimate
    from lookahead_ray.train.plan import KNOWN_SHAPES

    shape = ModelShape.from_config(KNOWN_SHAPES["meta-llama/Llama-2-7b-chat-hf"])
    recipe = load_config(REPO / "configs" / "llama2_7b_gsm8k_real.yaml")
    plain = estimate(shape, recipe.train, 512)
    constrained = load_config(REPO / "configs" / "llama2_7b_gsm8k_real.yaml", ["train.constrained={}"])
    zero2 = estimate(shape, constrained.train, 512)
    assert zero2.gpu_bytes["reference weights"] == 2 * shape.parameters  # bf16, whole on every GPU under ZeRO-2
    assert zero2.gpu_total == pytest.approx(plain.gpu_total + 2 * shape.parameters)
    assert "reference weights 13.5 GB" in zero2.lines()[0]
    zero3 = estimate(shape, load_config(REPO / "configs" / "llama2_7b_gsm8k_real.yaml",
                                        ["train.constrained={}", "train.zero_stage=3"]).train, 512)
    assert zero3.gpu_bytes["reference weights"] == 2 * shape.parameters / 4  # partitioned like the policy
    lora = estimate(shape, load_config(REPO / "configs" / "llama2_7b_gsm8k_real.yaml",
                                       ["train.constrained={}", "train.lora={}"]).train, 512)
    assert "reference weights" not in lora.gpu_bytes  # the policy with its adapters disabled
    assert "reference weights" not in plain.gpu_bytes


def _engine_cfg(tmp_path: Path, stage: int, *more: str):
    """A tiny checkpoint loaded through model.name_or_path, as a real run loads it, for one in-process worker."""
    from lookahead_ray.modeling import build_model, tokenizer_for

    tiny = _cfg(tmp_path)
    tokenizer = tokenizer_for(tiny.model)
    build_model(tiny.model, tokenizer, seed=0).save_pretrained(tmp_path / "seed")
    tokenizer.save_pretrained(tmp_path / "seed")
    return _cfg(tmp_path, "model.tiny=null", f"model.name_or_path={tmp_path / 'seed'}", "model.tokenizer=null",
                f"train.zero_stage={stage}", "train.precision=fp32", "train.num_workers=1", "train.micro_batch_size=2",
                "train.constrained={beta: 1.0}", "train.learning_rate=3.0e-2", "train.lr_schedule=constant",
                "train.warmup_steps=0", *more)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage, lora", [(2, False), (3, False), (3, True)], ids=["zero2", "zero3", "zero3-lora"])
def test_the_reference_is_the_frozen_seed_under_each_zero_stage_and_lora(tmp_path, stage, lora):
    """In one process (a world of one): the reference's log-probabilities are the seed checkpoint's before and after
    the policy trained (its own engine, or the policy with its adapters disabled), so the first loss is the
    cross-entropy (every weight 1) and the policy moves away from it."""
    from transformers import AutoModelForCausalLM

    from lookahead_ray.train.loop import setup_engine

    cfg = _engine_cfg(tmp_path, stage, *(["train.lora={r: 8, alpha: 16, dropout: 0.0}"] if lora else []))
    engine, tokenizer, device, objective = setup_engine(cfg, 1, 10)
    engine.train()  # as the loop does
    assert objective.name == "constrained_sft" and (objective.reference is None) == lora
    if not lora:
        assert objective.reference.zero_optimization_stage() == (3 if stage == 3 else 0)
        assert not any(p.requires_grad for p in objective.reference.module.parameters())
    batch = collate(_rows([12, 20], seed=3), tokenizer.pad_token_id, device)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    seed = AutoModelForCausalLM.from_pretrained(tmp_path / "seed", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = token_logps(seed(**inputs).logits, batch["labels"])
    first = objective(engine, batch)
    assert first.item() == pytest.approx(seed(**batch).loss.item(), rel=1e-5)  # policy == reference: cross-entropy
    for _ in range(3):
        loss = objective(engine, batch)
        engine.backward(loss)
        engine.step()
    if stage == 3:  # the reference's forward keeps the policy's ZeRO-3 prefetch trace (recorded once) valid
        assert engine.optimizer.parameter_offload.get_param_coordinator().is_complete_trace()
    reference = objective.reference_logps(engine, inputs, batch["labels"])
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        policy = token_logps(engine(**inputs).logits, batch["labels"])
    assert (policy - expected).abs().max().item() > 1e-2  # the policy trained; the reference did not
    assert engine.module.training  # the reference's forward (eval mode) left the policy training


def test_the_dry_run_builds_the_reference_engine_and_counts_its_weights(capsys):
    from lookahead_ray.cli import main

    recipe = str(REPO / "configs" / "llama2_7b_gsm8k_constrained_sft.yaml")
    assert main(["train", "--config", recipe, "--dry-run", "train.zero_stage=3"]) == 0
    out = capsys.readouterr().out
    assert "constrained SFT against a frozen reference engine (ZeRO-3)" in out
    assert "reference weights 3.4 GB" in out and "GPU memory per device 46.2 GB" in out  # 13.5 GB over 4 workers


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("stage, packing", [(2, False), (3, True)], ids=["zero2", "zero3-packed"])
def test_constrained_sft_on_two_workers_trains_and_exports(ray_local, tmp_path, stage, packing):
    """The branch a real run takes: a checkpoint saved with save_pretrained, loaded by every worker through
    model.name_or_path as the policy and again as the frozen reference (under ZeRO-3 both partitioned)."""
    from lookahead_ray.modeling import build_model, tokenizer_for
    from lookahead_ray.train.execute import run_training

    tiny = _cfg(tmp_path)
    tokenizer = tokenizer_for(tiny.model)
    build_model(tiny.model, tokenizer, seed=0).save_pretrained(tmp_path / "seed")
    tokenizer.save_pretrained(tmp_path / "seed")
    result = run_training(_cfg(tmp_path, "model.tiny=null", f"model.name_or_path={tmp_path / 'seed'}",
                               "model.tokenizer=null", f"train.zero_stage={stage}", "train.precision=fp32",
                               "train.constrained={}", f"train.packing={'true' if packing else 'false'}",
                               "train.max_steps=8", "train.report_every_steps=8"))
    metrics = result.metrics
    assert metrics["loss_objective"] == "constrained_sft" and metrics["step"] == 8
    assert math.isfinite(metrics["loss"]) and metrics["loss"] < 0.9 * metrics["initial_loss"]
    assert metrics["export_check_passed"] is True
    _check_export(result, "fp32")
    assert json.loads((tmp_path / "run" / "run_tiny_cpu.json").read_text())["settings"]["train.constrained"]["beta"] == 0.1


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_constrained_sft_trains_lora_adapters_against_the_base_on_two_workers(ray_local, tmp_path):
    from lookahead_ray.train.execute import run_training

    result = run_training(_cfg(tmp_path, "train.precision=fp32", "train.constrained={}",
                               "train.lora={r: 8, alpha: 16, dropout: 0.0}", "train.learning_rate=1.0e-2",
                               "train.lr_schedule=constant", "train.warmup_steps=0", "train.max_steps=8",
                               "train.report_every_steps=8"))
    metrics = result.metrics
    assert metrics["loss_objective"] == "constrained_sft" and metrics["trainable_share"] < 0.5
    assert math.isfinite(metrics["loss"]) and metrics["loss"] < 0.9 * metrics["initial_loss"]
    assert metrics["export_check_passed"] is True
