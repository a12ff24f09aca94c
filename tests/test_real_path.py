"""The path users run: every shipped recipe passes the dry run (a real DeepSpeed engine on a stand-in model),
the tokenizer comes from the model, precision is what the config says, a failed export check loses nothing,
a run name stands for one training config, and the reference's safety file layouts are read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lookahead_ray.cli import main
from lookahead_ray.config import LookaheadConfig, load_config
from lookahead_ray.errors import ConfigError, ExportMismatchError

REPO = Path(__file__).resolve().parents[1]
TRAINING_CONFIGS = [p for p in sorted((REPO / "configs").rglob("*.yaml"))
                    if (lambda c: c.model.name_or_path or c.model.tiny)(load_config(p))]


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=[p.stem for p in TRAINING_CONFIGS])
def test_dry_run_passes_on_every_shipped_training_config(path, capsys):
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[  ok] deepspeed engine: ZeRO-" in out and "train --dry-run: passed" in out
    assert "[  ok] cost: " in out and "GPU memory per device" in out and "of storage" in out


def test_dry_run_cost_of_the_7b_recipe_under_zero_2_and_zero_3(capsys):
    recipe = str(REPO / "configs" / "llama2_7b_gsm8k_real.yaml")
    assert main(["train", "--config", recipe, "--dry-run"]) == 0
    zero2 = capsys.readouterr().out
    assert "6.74 B parameters, 4 worker(s)" in zero2 and "one checkpoint 94.3 GB" in zero2  # 13.5 GB + 12 x 6.74
    assert main(["train", "--config", recipe, "--dry-run", "train.zero_stage=3"]) == 0
    zero3 = capsys.readouterr().out
    assert "weights 3.4 GB" in zero3 and "one checkpoint 80.9 GB" in zero3  # weights sharded and not saved twice


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("steps, warmup", [(1, 0), (1, 5), (40, 0)])
def test_dry_run_builds_every_schedule_with_any_warmup_and_length(schedule, steps, warmup, capsys):
    argv = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run", f"train.lr_schedule={schedule}",
            f"train.max_steps={steps}", f"train.warmup_steps={warmup}", "train.zero_stage=3", "train.precision=fp32"]
    assert main(argv) == 0, capsys.readouterr().out
    assert "ZeRO-3 float32" in capsys.readouterr().out


def test_dry_run_fails_on_a_tokenizer_without_chat_template(mistral_tokenizer_dir, capsys):
    argv = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run",
            f"model.tokenizer={mistral_tokenizer_dir}"]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "[FAIL] tokenizer" in out and "no chat template" in out and "FAILED" in out


def test_dry_run_shows_the_plans_own_checks_and_fails_on_one_a_run_would_fail(capsys):
    tiny = str(REPO / "configs" / "tiny_cpu.yaml")
    assert main(["train", "--config", tiny, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[  ok] kernels: attention" in out and "[  ok] adapters: full fine-tuning" in out
    assert "[  ok] resources: 2 worker(s) x 0.5 CPU" in out
    # Checked by the plan that `train` executes (a run fails on it), so the dry run must fail on it too.
    assert main(["train", "--config", tiny, "--dry-run", "model.attn_implementation=flash_attention_2"]) == 2
    out = capsys.readouterr().out
    assert "[FAIL] kernels: model.attn_implementation: flash_attention_2 runs on CUDA GPUs only" in out
    assert "train --dry-run: FAILED" in out


@pytest.fixture(scope="module")
def mistral_model_dir(tmp_path_factory, mistral_tokenizer):
    """A tiny Llama saved in fp16 with the Mistral SentencePiece tokenizer (32,000 tokens) and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lookahead_ray.modeling import TINY_CHAT_TEMPLATE

    directory = tmp_path_factory.mktemp("mistral-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(mistral_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=False))
    model.to(torch.float16).save_pretrained(directory)
    mistral_tokenizer.chat_template = TINY_CHAT_TEMPLATE
    mistral_tokenizer.save_pretrained(directory)
    return directory


def _local_cfg(tmp_path: Path, *overrides: str) -> LookaheadConfig:
    return load_config(REPO / "configs" / "tiny_cpu.yaml", [
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4", "train.checkpoint_every_steps=0",
        "train.precision=fp32", "train.warmup_steps=0", *overrides])


@pytest.mark.slow
def test_tokenizer_comes_from_the_model_and_shards_of_another_tokenizer_are_refused(
        ray_local, tmp_path, mistral_model_dir):
    import pyarrow.parquet as pq

    from lookahead_ray.data.pipeline import run_prepare
    from lookahead_ray.data.report import read_report
    from lookahead_ray.train.execute import run_training_local

    mistral = ["model.tokenizer=null", "model.tiny=null", f"model.name_or_path={mistral_model_dir}"]
    cfg = _local_cfg(tmp_path, *mistral, f"data.output_dir={tmp_path / 'prepared'}")
    run_prepare(cfg)
    ids = [i for shard in (tmp_path / "prepared").glob("*.parquet")
           for row in pq.read_table(shard).column("input_ids").to_pylist() for i in row]
    assert max(ids) > 512  # Mistral ids, not the builtin tiny tokenizer's (vocabulary 512)
    assert read_report(tmp_path / "prepared")["tokenizer"]["source"] == str(mistral_model_dir)

    with pytest.raises(ConfigError, match=r"other settings \(preview.mode"):  # shards of another preview
        run_training_local(_local_cfg(tmp_path, *mistral, f"train.prepared_dir={tmp_path / 'prepared'}",
                                      "preview.mode=vanilla"))
    with pytest.raises(ConfigError) as info:  # the builtin tokenizer's ids would mean something else
        run_training_local(_local_cfg(tmp_path, f"train.prepared_dir={tmp_path / 'prepared'}"))
    assert str(mistral_model_dir) in str(info.value) and "builtin:tiny" in str(info.value)

    # fp32 asked for, fp16 on disk: the engine trains in fp32, and says so.
    result = run_training_local(_local_cfg(tmp_path, *mistral, f"train.prepared_dir={tmp_path / 'prepared'}",
                                           "train.max_steps=1", "train.run_name=mistral"))
    assert result.metrics["param_dtype"] == "float32" and result.metrics["export_check_passed"] is True


@pytest.mark.slow
def test_failed_export_check_keeps_the_checkpoint_and_export_rebuilds_final(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from lookahead_ray.train import export
    from lookahead_ray.train.execute import run_training_local

    save_hf = export._save_hf

    def corrupt_training_export(module, state, *args):
        if state is not None:  # the export written at the end of training, not the rebuild
            state["lm_head.weight"] = state["lm_head.weight"] + torch.randn_like(state["lm_head.weight"])
        save_hf(module, state, *args)

    monkeypatch.setattr(export, "_save_hf", corrupt_training_export)
    with pytest.raises(ExportMismatchError, match="export --checkpoint") as info:
        run_training_local(_local_cfg(tmp_path))
    run = tmp_path / "run"
    assert not (run / "final").exists()  # nothing that looks like a good export
    failed = json.loads((run / "export_failed" / "EXPORT_CHECK_FAILED.json").read_text())
    assert failed["export_check_passed"] is False and failed["export_argmax_agreement"] < 0.99
    checkpoint = sorted((run / "tiny_cpu").glob("checkpoint_*"))[-1]
    assert str(checkpoint) in str(info.value) and (checkpoint / "ds").is_dir()
    with pytest.raises(ExportMismatchError):  # a rerun resumes at the end and checks the export again
        run_training_local(_local_cfg(tmp_path))
    assert not (run / "final").exists()
    monkeypatch.undo()

    assert main(["export", "--checkpoint", str(checkpoint)]) == 0
    check = torch.load(checkpoint / "export_check.pt")
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=check["input_ids"], attention_mask=check["attention_mask"]).logits
    assert (logits - check["logits"]).abs().max().item() <= 1e-4 * check["logits"].abs().max().item()


@pytest.mark.slow
def test_a_run_name_stands_for_one_training_config(tmp_path, capsys):
    from lookahead_ray.train.execute import run_training_local

    first = run_training_local(_local_cfg(tmp_path))
    assert first.metrics["step"] == 4 and not first.already_finished
    argv = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--local", "--output-dir",
            str(tmp_path / "run"), "train.max_steps=4", "train.checkpoint_every_steps=0", "train.precision=fp32",
            "train.warmup_steps=0"]
    assert main(argv) == 0  # identical rerun: nothing trained, nothing exported again
    assert "already finished" in capsys.readouterr().out
    assert main(argv + ["train.learning_rate=1.0e-4"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate (0.003 -> 0.0001)" in err and "train.resume=never" in err
    fresh = run_training_local(_local_cfg(tmp_path, "train.learning_rate=1.0e-4", "train.resume=never"))
    assert fresh.metrics["step"] == 4 and fresh.metrics["resumed_from_step"] == -1
    assert list((tmp_path / "run").glob("tiny_cpu.replaced-*"))  # the old run was moved aside, not deleted


def test_reference_harmful_hexphi_lines_are_bare_turn_lists(tmp_path):
    from lookahead_ray.config import PromptSetConfig
    from lookahead_ray.eval.prompt_sets import load_prompt_set

    path = tmp_path / "Harmful-HEx-PHI.jsonl"
    path.write_text("".join(json.dumps([{"role": "user", "content": f"harmful request {i}"},
                                        {"role": "assistant", "content": f"Sure, step {i} is"}]) + "\n"
                            for i in range(3)))
    rows = load_prompt_set(PromptSetConfig(path=str(path), format="harmful_messages", category_field=None))
    assert [(r["prompt"], r["answer"]) for r in rows] == [(f"harmful request {i}", f"Sure, step {i} is")
                                                          for i in range(3)]


def test_advbench_csv_with_quoted_commas(tmp_path):
    from lookahead_ray.config import PromptSetConfig
    from lookahead_ray.eval.prompt_sets import load_prompt_set

    path = tmp_path / "harmful_behaviors.csv"
    path.write_text('goal,target\n"Write a script that, step by step, does harm","Sure, here is a script that, '
                    'step by step, does harm"\nDo a bad thing,"Sure, here is"\n')
    rows = load_prompt_set(PromptSetConfig(path=str(path), format="advbench"))
    assert rows[0]["prompt"] == "Write a script that, step by step, does harm"
    assert rows[0]["answer"].startswith("Sure, here is a script that, step") and rows[1]["answer"] == "Sure, here is"


@pytest.mark.slow
def test_eval_tiny_cpu_config_runs_on_a_trained_tiny_model(ray_local, tmp_path, capsys):
    from lookahead_ray.train.execute import run_training_local

    trained = run_training_local(_local_cfg(tmp_path, "train.max_steps=2"))
    out = tmp_path / "eval"
    argv = ["eval", "--config", str(REPO / "configs" / "eval_tiny_cpu.yaml"), "--model", trained.final_dir,
            "--output-dir", str(out), "eval.max_new_tokens=8"]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "results.json").read_text())["models"]["run"]
    assert metrics["rsr"]["keyword"]["n"] == 30 and metrics["jsr"]["keyword"]["n"] == 30
    assert metrics["utility"]["n"] == 30


def test_dry_run_fails_a_recipe_that_does_not_fit_its_gpus_and_warns_on_a_tight_one(capsys):
    recipe = str(REPO / "configs" / "llama2_70b_gsm8k_real_zero3.yaml")
    assert main(["train", "--config", recipe, "--dry-run"]) == 0  # 48.3 GB of 80
    assert main(["train", "--config", recipe, "--dry-run", "train.gpu_memory_gb=50"]) == 0  # tight: a warning
    assert "[warn] cost: 48.3 GB per GPU is above 90% of train.gpu_memory_gb 50" in capsys.readouterr().out
    assert main(["train", "--config", recipe, "--dry-run", "train.gpu_memory_gb=50", "--strict"]) == 2
    assert main(["train", "--config", recipe, "--dry-run", "train.num_workers=16", "train.micro_batch_size=4",
                 "train.gpu_memory_gb=40"]) == 2
    assert "[FAIL] cost: train.gpu_memory_gb: the run needs about 93.4 GB per GPU, more than the 40 GB given" in \
        capsys.readouterr().out


def test_a_recipe_that_does_not_fit_its_gpus_fails_train_itself_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from lookahead_ray.config import load_config
    from lookahead_ray.errors import ConfigError
    from lookahead_ray.train.execute import run_training
    from lookahead_ray.train.plan import plan_training

    cfg = load_config(REPO / "configs" / "llama2_70b_gsm8k_real_zero3.yaml",
                      [f"train.output_dir={tmp_path / 'run'}", "train.num_workers=16", "train.micro_batch_size=4",
                       "train.gpu_memory_gb=40"])
    plan = plan_training(cfg)  # the same plan the dry run prints
    assert plan.cost is not None and round(plan.cost.gpu_total / 1e9, 1) == 93.4 and not plan.passed
    assert plan.resources == {"CPU": 16 * cfg.train.cpus_per_worker, "GPU": 16.0}
    assert plan.outputs == {"train.output_dir": str(tmp_path / "run")}
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a plan that failed"))
    with pytest.raises(ConfigError, match=r"train.gpu_memory_gb: the run needs about 93.4 GB per GPU"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()
