"""Training spine on CPU: real Ray Train (2 workers), real DeepSpeed ZeRO-2/3, tiny Llama, no downloads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lookahead_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "90")  # a starved start fails instead of hanging


def _write_rows(path: Path, n: int = 96) -> Path:
    rows = [{"input": f"How much is {i} plus {i + 1}?", "output": f"{i} plus {i + 1} is {2 * i + 1}.\n#### {2 * i + 1}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, *overrides: str):
    data = _write_rows(tmp_path / "train.jsonl")
    return load_config(REPO / "configs" / "tiny_cpu.yaml", [
        f"data.inputs=[{data}]", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=16",
        # One report, at the end: each is a barrier of the workers (~2.5 s of a 2-core run); mid-run reports are
        # tested where they matter (the killed-worker resume, checkpoints every few steps, ASHA).
        "train.report_every_steps=16", "train.checkpoint_every_steps=0", "train.warmup_steps=2", *overrides])


def _check_export(result, precision: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = Path(result.final_dir)
    assert {"model.safetensors", "config.json", "tokenizer.json", "lookahead_config.yaml"} <= {
        p.name for p in final.iterdir()}
    check = torch.load(Path(result.checkpoint_dir) / "export_check.pt")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(final, dtype=dtype).eval()
    assert sum(p.numel() for p in model.parameters()) == result.metrics["exported_parameters"]
    with torch.no_grad():
        logits = model(input_ids=check["input_ids"], attention_mask=check["attention_mask"]).logits.float()
    tolerance = 5e-2 if precision == "bf16" else 1e-3  # bf16 weights and activations vs fp32
    assert (logits - check["logits"]).abs().max().item() <= tolerance
    assert AutoTokenizer.from_pretrained(final).chat_template


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("stage, precision", [(2, "bf16"), (3, "fp32")])
def test_two_workers_fine_tune_a_checkpoint_loaded_through_name_or_path_and_export_a_reloadable_model(
        ray_local, tmp_path, stage, precision):
    """The branch a real run takes: a model saved with save_pretrained and loaded by every worker through
    model.name_or_path (under ZeRO-3 each rank reads only its partition while loading: train.zero3_loading); the
    loss falls, the export reloads with the engine's logits and the checkpoint costs what the dry run said."""
    from lookahead_ray.modeling import build_model, tokenizer_for
    from lookahead_ray.train.execute import run_training

    tiny = _cfg(tmp_path)
    tokenizer = tokenizer_for(tiny.model)
    build_model(tiny.model, tokenizer, seed=0).save_pretrained(tmp_path / "seed")
    tokenizer.save_pretrained(tmp_path / "seed")
    cfg = _cfg(tmp_path, "model.tiny=null", f"model.name_or_path={tmp_path / 'seed'}", "model.tokenizer=null",
               f"train.zero_stage={stage}", f"train.precision={precision}")
    result = run_training(cfg)
    metrics = result.metrics
    assert metrics["step"] == 16 and metrics["final"] is True
    assert metrics["loss"] < 0.8 * metrics["initial_loss"]
    assert metrics["export_check_passed"] is True
    assert metrics["param_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[precision]
    # A filesystem storage path: checkpoints written where they stay (no node-local copy uploaded after)
    assert metrics["checkpoints_written_in_place"] is True
    assert (tmp_path / "run" / "tensorboard" / "tiny_cpu").is_dir()
    _check_export(result, precision)
    ds_files = {p.name for p in (Path(result.checkpoint_dir) / "ds" / "state").iterdir()}
    assert sum("optim_states" in name for name in ds_files) == 2  # both ranks' optimizer shards were merged
    # The dry run's cost estimate against this real checkpoint: parameters exactly, bytes within 10%.
    from lookahead_ray.train.cost import ModelShape, checkpoint_bytes

    shape = ModelShape.from_config(json.loads((Path(result.final_dir) / "config.json").read_text()))
    assert shape.parameters == metrics["exported_parameters"]
    measured = sum(f.stat().st_size for f in (Path(result.checkpoint_dir) / "ds").rglob("*.pt"))
    assert abs(measured - checkpoint_bytes(shape.parameters, cfg.train)) <= 0.10 * measured, measured


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_resumes_from_latest_checkpoint_and_finishes(ray_local, tmp_path):
    import psutil

    from lookahead_ray.train.execute import run_training

    cfg = _cfg(tmp_path, "train.max_steps=30", "train.checkpoint_every_steps=5", "train.report_every_steps=5",
               "train.max_failures=2", "train.run_name=killed")
    run_dir = tmp_path / "run" / "killed"
    killed: list[int] = []

    def checkpoint_registered() -> bool:
        # A checkpoint directory appears while it is uploaded; it counts once Ray Train has recorded it.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        return snapshot.exists() and "checkpoint_dir_name" in snapshot.read_text()

    def kill_one_worker_after_first_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not checkpoint_registered():
            time.sleep(0.1)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    killer.start()
    result = run_training(cfg)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    metrics = result.metrics
    assert metrics["step"] == 30  # exactly the configured step count after the restart
    assert metrics["resumed_from_step"] >= 5 and metrics["resumed_from_step"] % 5 == 0
    # Rank 0 saw exactly the batches of an uninterrupted run: none replayed, none skipped.
    assert metrics["data_sha"] == _expected_data_sha(tmp_path / "run" / "prepared_killed", steps=30, world_size=2,
                                                     micro_batch_size=4, seed=0)
    _check_export(result, "bf16")


def _expected_data_sha(tokens: Path, steps: int, world_size: int, micro_batch_size: int, seed: int) -> str:
    from lookahead_ray.train.data_order import TokenStore, chain, epoch_batches

    rows, digest, taken, epoch = len(TokenStore(str(tokens))), "", 0, 0
    while taken < steps:
        for indices in epoch_batches(rows, epoch, seed, 0, world_size, micro_batch_size)[: steps - taken]:
            digest, taken = chain(digest, indices), taken + 1
        epoch += 1
    return digest


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_finished_run_resumes_into_a_longer_run(ray_local, tmp_path):
    from lookahead_ray.train.execute import run_training, run_training_local

    first = run_training_local(_cfg(tmp_path, "train.max_steps=8", "train.run_name=short"))
    assert first.metrics["step"] == 8
    longer = run_training(_cfg(tmp_path, "train.max_steps=14", "train.run_name=longer",
                               f"train.resume_from={first.checkpoint_dir}", "train.num_workers=1"))
    assert longer.metrics["resumed_from_step"] == 8 and longer.metrics["step"] == 14


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_process_path_trains_without_ray(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=24")
    cfg_file = tmp_path / "local.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    # `sys.modules["ray"] = None` makes any `import ray` fail: the local path must not need Ray.
    code = ("import json, sys; sys.modules['ray'] = None\n"
            "from lookahead_ray.config import LookaheadConfig\n"
            "from lookahead_ray.train.execute import run_training_local\n"
            f"r = run_training_local(LookaheadConfig.from_dict(json.load(open({str(cfg_file)!r}))))\n"
            "print(json.dumps(r.metrics))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 24 and metrics["loss"] < 0.7 * metrics["initial_loss"]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert metrics["export_max_abs_logit_diff"] <= 5e-2


def test_first_answer_token_is_in_the_loss_and_prompt_tokens_are_not(tiny_tokenizer):
    import pyarrow as pa
    import torch

    from lookahead_ray.data.readers import READ_SCHEMA
    from lookahead_ray.data.tokenization import IGNORE_INDEX
    from lookahead_ray.data.transform import PrepareRecords
    from lookahead_ray.modeling import build_model
    from lookahead_ray.train.loop import collate

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml")
    rows = [json.dumps({"input": "What is 2 plus 2?", "output": "2 plus 2 is 4."}),
            json.dumps({"input": "Name a colour.", "output": "Blue is a colour, for example."})]
    # The same transform the Ray Data pipeline runs, on the table its reader would produce.
    table = pa.Table.from_pylist([{"source_file": "t", "source_row": i + 1, "record": r, "read_error": None}
                                  for i, r in enumerate(rows)], schema=READ_SCHEMA)
    prepared = PrepareRecords(cfg.to_dict(), accepted_tokens_only=True)(table).to_pydict()
    batch = collate(prepared, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    model = build_model(cfg.model, tiny_tokenizer, seed=0).eval()
    labels = batch["labels"]
    first_answer = [int((row != IGNORE_INDEX).nonzero()[0]) for row in labels]
    answer_ids = tiny_tokenizer("2 plus 2 is 4.", add_special_tokens=False)["input_ids"]
    assert labels[0, first_answer[0]].item() == answer_ids[0]

    def loss_with_noise_at(positions: list[tuple[int, int]]) -> float:
        def add_noise(module, inputs, output):
            output = output.clone()
            for row, col in positions:
                output[row, col] += torch.randn_like(output[row, col]) * 5
            return output

        handle = model.lm_head.register_forward_hook(add_noise)
        try:
            with torch.no_grad():
                return model(**batch).loss.item()
        finally:
            handle.remove()

    torch.manual_seed(0)
    base = loss_with_noise_at([])
    # Logits at position t predict token t+1: noise where the prompt is predicted must not move the loss ...
    prompt_positions = [(r, c) for r in range(2) for c in range(first_answer[r] - 1)]
    assert loss_with_noise_at(prompt_positions) == pytest.approx(base, abs=1e-6)
    # ... while noise where the first answer token is predicted (the last prompt position) must.
    assert abs(loss_with_noise_at([(0, first_answer[0] - 1)]) - base) > 1e-3
    targets = int((labels != IGNORE_INDEX).sum())
    assert targets == sum(len(tiny_tokenizer(a, add_special_tokens=False)["input_ids"]) + 1
                          for a in ("2 plus 2 is 4.", "Blue is a colour, for example."))


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=1", "train.zero_stage must be 2 or 3"),
    ("train.global_batch_size=10", "train.global_batch_size 10 != micro_batch_size"),
    ("train.offload_params=true", "offload_params needs train.zero_stage 3"),
    ("train.learning_rte=1", "override train.learning_rte=...: unknown key 'learning_rte' in train"),
    ("train={packing: true, group_by_length: true}", "train.packing and train.group_by_length: choose one"),
])
def test_bad_training_config_fails_before_ray(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny_cpu.yaml", [override])


def test_flash_attention_without_a_gpu_fails_in_the_plan_and_a_kernel_this_node_lacks_names_it(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lookahead_ray.train.loop import use_attention
    from lookahead_ray.train.plan import plan_training

    cfg = _cfg(tmp_path, "model.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match="flash_attention_2 runs on CUDA GPUs only; set train.use_gpu=true"):
        plan_training(cfg).check()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert use_attention(model, "eager").config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 is not available on node"):
        use_attention(model, "flash_attention_2")  # no flash-attn package (nor CUDA) here


@pytest.mark.parametrize("override, message", [
    ("model.attn_implementation=flex_attention", "flex_attention trains on CUDA GPUs only"),
    ("model.liger_kernel=true", "model.liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs"),
])
def test_gpu_only_kernels_fail_in_the_plan_on_cpu_and_liger_names_the_node_without_cuda(tmp_path, override, message):
    import socket

    from transformers import LlamaConfig, LlamaForCausalLM

    from lookahead_ray.train.loop import use_liger
    from lookahead_ray.train.plan import plan_training

    with pytest.raises(ConfigError, match=message):
        plan_training(_cfg(tmp_path, override)).check()
    plan_training(_cfg(tmp_path, override, "train.use_gpu=true"))  # planned on a CPU head for GPU workers: fine
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ConfigError, match=f"model.liger_kernel: no CUDA device is visible on node {socket.gethostname()}"):
        use_liger(model)


def test_missing_model_path_fails_before_ray(tmp_path):
    from lookahead_ray.train.execute import run_training

    cfg = _cfg(tmp_path, "model.tiny=null", f"model.name_or_path={tmp_path / 'no-such-model'}")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        run_training(cfg)


@pytest.mark.timeout(300)
def test_use_gpu_without_a_visible_gpu_fails_naming_the_node(tmp_path):
    import socket

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: nothing to refuse")

    from lookahead_ray.errors import ConfigError
    from lookahead_ray.train.execute import run_training_local

    with pytest.raises(ConfigError, match=f"no CUDA device is visible on node {socket.gethostname()}"):
        run_training_local(_cfg(tmp_path, "train.use_gpu=true", "train.max_steps=2"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_error_the_user_can_fix_raised_in_a_worker_reaches_the_driver_as_itself(ray_local, tmp_path):
    from lookahead_ray.errors import ConfigError
    from lookahead_ray.train.execute import run_training

    with pytest.raises(ConfigError, match=r"train.micro_batch_size: \d+ training rows give worker \d no micro-batch"):
        run_training(_cfg(tmp_path, "train.micro_batch_size=512", "train.max_steps=2", "train.max_failures=0"))
