"""LoRA (train.lora): adapters on a frozen base under ZeRO-2 and ZeRO-3 on 2 Ray Train workers, checkpoints that
hold only the adapters and resume exactly, the merged and adapter-only exports, eval on an adapter directory,
the cost of a LoRA recipe, and QLoRA's one-line refusal on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_training import _cfg

from lookahead_ray.cli import main
from lookahead_ray.config import LoraConfig, load_config
from lookahead_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _tiny_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def test_merged_state_dict_equals_peft_merge_and_unload_and_the_adapter_count_equals_the_cost_model():
    import torch
    from peft import get_peft_model_state_dict

    from lookahead_ray.train.cost import ModelShape
    from lookahead_ray.train.lora import add_adapters, merged_state_dict, parameter_counts

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
    model = add_adapters(_tiny_llama(), lora, base_name_or_path="/models/base")
    with torch.no_grad():  # fresh adapters are the identity (B = 0): give them something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.peft_config["default"].base_model_name_or_path == "/models/base"
    trainable, total = parameter_counts(model)
    adapters = sum(v.numel() for k, v in get_peft_model_state_dict(model).items() if "lora_" in k)
    shape = ModelShape.from_config(model.get_base_model().config.to_dict())
    assert adapters == shape.lora_parameters(lora.r)  # the dry run's count is peft's, exactly
    assert trainable == adapters + 64 * 32  # + the lm_head trained in full (modules_to_save)

    merged = merged_state_dict(state, lora)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6)


def test_merging_into_transposed_conv1d_weights_equals_peft():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lookahead_ray.train.lora import add_adapters, merged_state_dict

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    model = add_adapters(base, lora, base_name_or_path=None)  # gpt2's default targets are Conv1D (fan_in_fan_out)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    merged = merged_state_dict(dict(model.state_dict()), lora, model.peft_config["default"].fan_in_fan_out)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6)


def test_lora_settings_are_typed_and_qlora_and_an_unnamed_base_fail_in_one_line(tmp_path, capsys):
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["train.lora={}", "train.lora.r=8"])
    assert cfg.train.lora == LoraConfig(r=8)
    from lookahead_ray.train.run_guard import training_settings

    settings = training_settings(cfg)  # the run's identity: a resume with another rank is refused, naming it
    assert settings["train.lora"]["r"] == 8 and settings["train.lora"]["alpha"] == 32
    with pytest.raises(ConfigError, match="train.lora: r must be >= 1"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["train.lora.r=0"])
    with pytest.raises(ConfigError, match="train.lora.quantize: 4bit runs under train.zero_stage 2"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["train.lora.quantize=4bit", "train.lora.merge=false",
                                                         "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="4bit exports the adapter alone .* set train.lora.merge=false"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["train.lora.quantize=4bit"])

    from lookahead_ray.train.plan import plan_training

    with pytest.raises(ConfigError, match="merge: false exports the adapter alone, which must name its base"):
        plan_training(_cfg(tmp_path, "train.lora.merge=false")).check()
    # QLoRA on CPU: one line and exit 2, from the dry run and from train itself, before anything is trained.
    for argv in (["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run"],
                 ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--local",
                  "--output-dir", str(tmp_path / "q")]):
        assert main(argv + ["train.lora.quantize=4bit", "train.lora.merge=false"]) == 2
        captured = capsys.readouterr()
        assert "train.lora.quantize: 4bit (QLoRA) runs on CUDA GPUs only" in captured.out + captured.err
        assert "Traceback" not in captured.err
    assert not (tmp_path / "q" / "final").exists()


def test_the_lora_recipes_cost_a_fraction_of_full_fine_tuning(capsys):
    assert main(["train", "--config", str(REPO / "configs" / "llama2_7b_gsm8k_real_lora.yaml"), "--dry-run"]) == 0
    lora = capsys.readouterr().out
    assert "6.74 B parameters (40 M trained: LoRA), 1 worker(s)" in lora
    assert main(["train", "--config", str(REPO / "configs" / "llama2_7b_gsm8k_real_lora.yaml"), "--dry-run",
                 "train.lora=null", "train.learning_rate=2.0e-5", "train.gpu_memory_gb=null"]) == 0
    full = capsys.readouterr().out

    def gpu_gb(out: str) -> float:
        return float(out.split("GPU memory per device ")[1].split(" GB")[0])

    assert gpu_gb(lora) < 0.3 * gpu_gb(full), (gpu_gb(lora), gpu_gb(full))  # 1 GPU: no Adam state for the base


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_on_two_workers_trains_only_the_adapters_resumes_exactly_and_exports_both_ways(ray_local, tmp_path, stage):
    """From a tiny checkpoint saved with save_pretrained, loaded through model.name_or_path: the base stays bit for
    bit, the adapters change; a run stopped at step 8 and continued ends with the uninterrupted run's data and
    adapter; the merged export and the adapter reproduce the engine's logits."""
    import torch
    from safetensors.torch import load_file

    from lookahead_ray.modeling import build_model, load_pretrained_model, tokenizer_for
    from lookahead_ray.train.checkpoints import survey
    from lookahead_ray.train.execute import run_training
    from lookahead_ray.train.lora import merged_state_dict

    tiny = _cfg(tmp_path)
    tokenizer = tokenizer_for(tiny.model)
    build_model(tiny.model, tokenizer, seed=0).save_pretrained(tmp_path / "seed")
    tokenizer.save_pretrained(tmp_path / "seed")

    def run(name: str, steps: int, *more: str):
        (tmp_path / name).mkdir(exist_ok=True)
        return run_training(_cfg(tmp_path / name, "model.tiny=null", f"model.name_or_path={tmp_path / 'seed'}",
                                 "model.tokenizer=null", f"train.zero_stage={stage}", "train.precision=fp32",
                                 "train.lora={r: 8, alpha: 16, dropout: 0.0}", "train.learning_rate=1.0e-2",
                                 "train.lr_schedule=constant", "train.warmup_steps=0", f"train.max_steps={steps}",
                                 "train.checkpoint_every_steps=8", *more))

    straight = run("straight", 16)
    m = straight.metrics
    assert m["step"] == 16 and m["loss"] < 0.95 * m["initial_loss"] and m["export_check_passed"] is True
    assert 0 < m["trainable_share"] < 0.5 and m["trainable_parameters"] == m["exported_adapter_parameters"]
    # A checkpoint holds the adapters and their optimizer state, not the frozen base.
    model_states = sum(f.stat().st_size for f in (Path(straight.checkpoint_dir) / "ds").rglob("*model_states.pt"))
    base_bytes = sum(f.stat().st_size for f in (tmp_path / "seed").glob("*.safetensors"))
    assert model_states < 0.5 * base_bytes, (model_states, base_bytes)

    final, adapter_dir = Path(straight.final_dir), Path(straight.final_dir) / "adapter"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "seed") and adapter_config["r"] == 8
    seed, merged = load_file(str(tmp_path / "seed" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: the adapters trained
    # The frozen base, bit for bit: weights without adapters are the seed's, and every merged weight is the seed's
    # weight plus the trained adapter (merged from the seed, not from whatever the engine ended with).
    full = {f"base_model.model.{k}": v for k, v in seed.items()}
    for key, value in adapter.items():
        full[key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
] = value
    for key in [k for k in list(full) if any(f".{t}.weight" in k for t in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"))]:
        full[key.replace(".weight", ".base_layer.weight")] = full.pop(key)
    expected = merged_state_dict(full, LoraConfig(r=8, alpha=16))
    assert set(expected) == set(merged)
    assert all(torch.equal(merged[k], expected[k]) for k in merged)

    # The adapter directory loads onto its base (the one it names) and gives the merged export's logits.
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        a = load_pretrained_model(str(adapter_dir), precision="fp32")(input_ids=ids).logits
        b = load_pretrained_model(str(final), precision="fp32")(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # The run continued from its step-8 checkpoint (adapters + optimizer, as a run stopped there leaves them) in a
    # run of its own: it ends with the uninterrupted run's data and adapter. (A finished run continued in place with
    # a longer max_steps, train.resume=force: test_training.)
    (at_step_8,) = [c.location for c in survey(str(Path(straight.checkpoint_dir).parent))[0] if c.step == 8]
    resumed = run("resumed", 16, f"train.resume_from={at_step_8}")
    assert resumed.metrics["resumed_from_step"] == 8 and resumed.metrics["step"] == 16
    assert resumed.metrics["data_sha"] == m["data_sha"]
    again = load_file(str(Path(resumed.final_dir) / "adapter" / "adapter_model.safetensors"))
    assert max((again[k] - adapter[k]).abs().max().item() for k in adapter) < 1e-5


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_of_an_adapter_directory_equals_eval_of_its_merged_export_and_export_rebuilds_both(ray_local, tmp_path, capsys):
    from lookahead_ray.modeling import build_model, tokenizer_for
    from lookahead_ray.train.execute import run_training_local

    tiny = _cfg(tmp_path)
    tokenizer = tokenizer_for(tiny.model)
    build_model(tiny.model, tokenizer, seed=0).save_pretrained(tmp_path / "seed")
    tokenizer.save_pretrained(tmp_path / "seed")
    trained = run_training_local(_cfg(tmp_path, "model.tiny=null", f"model.name_or_path={tmp_path / 'seed'}",
                                      "model.tokenizer=null", "train.precision=fp32", "train.lora={dropout: 0.0}",
                                      "train.learning_rate=1.0e-2", "train.max_steps=12"))
    # `export --checkpoint` rebuilds both exports from the adapter-only checkpoint, bit for bit.
    from safetensors.torch import load_file

    assert main(["export", "--checkpoint", trained.checkpoint_dir, "--output-dir", str(tmp_path / "rebuilt")]) == 0
    for file in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(Path(trained.final_dir) / file)), load_file(str(tmp_path / "rebuilt" / "final" / file))
        assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a), file

    out = tmp_path / "eval"
    argv = ["eval", "--config", str(REPO / "configs" / "eval_tiny_cpu.yaml"), "--output-dir", str(out),
            "--model", f"seed={tmp_path / 'seed'}", "--model", f"adapter={trained.final_dir}/adapter",
            "--model", f"merged={trained.final_dir}", "eval.max_new_tokens=8"]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    responses = {name: [(s["kind"], s["id"], s["response"]) for s in samples if s["model"] == name]
                 for name in ("adapter", "merged", "seed")}
    assert responses["adapter"] == responses["merged"] and len(responses["adapter"]) == 90
    assert results["models"]["adapter"]["rsr"] == results["models"]["merged"]["rsr"]
    drift = {name: results["models"][name]["drift"] for name in ("adapter", "merged")}
    assert json.dumps(drift["adapter"], sort_keys=True) == json.dumps(drift["merged"], sort_keys=True) or \
        drift["adapter"] == pytest.approx(drift["merged"], rel=1e-4, abs=1e-6)
    assert responses["adapter"] != responses["seed"]  # it was trained

    # An adapter naming no base needs --base; with it, it is evaluated.
    unnamed = tmp_path / "unnamed"
    import shutil

    shutil.copytree(Path(trained.final_dir) / "adapter", unnamed)
    config = json.loads((unnamed / "adapter_config.json").read_text())
    (unnamed / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    argv = ["eval", "--config", str(REPO / "configs" / "eval_tiny_cpu.yaml"), "--output-dir", str(tmp_path / "e2"),
            "--model", str(unnamed), "eval.max_new_tokens=2"]
    assert main(argv) == 2
    assert "is a LoRA adapter that names no base model; name it with --base DIR" in capsys.readouterr().err
    assert main(argv + ["--base", str(tmp_path / "seed")]) == 0
