"""The one training loop: DeepSpeed ZeRO-2/3 over prepared batches, metrics, checkpoints, HF export.

``train_fn_per_worker(loop_config)`` is what Ray Train runs on every worker; everything it needs travels in
``loop_config`` (the serialised typed config, the step count and the log directory), nothing comes from
module globals. ``run_loop`` is the same loop against any :class:`~lookahead_ray.train_session.TrainSession`,
which is how the single-process path reuses it.

Checkpoint layout (one directory, merged across ranks by Ray Train):
    ds/                 DeepSpeed checkpoint (tag "state"): weights, optimizer, scheduler, step and epoch
    hf/                 final only: save_pretrained weights (safetensors), tokenizer, lookahead_config.yaml
    export_check.pt     final only: a probe batch and the engine's logits on it, for reload checks
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import yaml

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.deepspeed_config import build_deepspeed_config
from lookahead_ray.modeling import build_model, load_tokenizer
from lookahead_ray.tokenization import IGNORE_INDEX
from lookahead_ray.train_session import Batch, TrainSession

logger = logging.getLogger(__name__)
CHECKPOINT_TAG = "state"


class ExportMismatchError(RuntimeError):
    """The reloaded Hugging Face export does not reproduce the trained engine's logits."""


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (runs on every worker)."""
    from lookahead_ray.train_session import RaySession

    run_loop(loop_config, RaySession(loop_config["config"]["train"]["resume_from"]))


def collate(batch: Batch, pad_token_id: int, device: Any) -> dict[str, Any]:
    """Pad one micro-batch to its longest sequence (right padding; labels padded with -100)."""
    import torch

    ids = [np.asarray(x) for x in batch["input_ids"]]
    labels = [np.asarray(x) for x in batch["labels"]]
    width = max(len(x) for x in ids)
    out = {
        "input_ids": np.full((len(ids), width), pad_token_id, dtype=np.int64),
        "attention_mask": np.zeros((len(ids), width), dtype=np.int64),
        "labels": np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64),
    }
    for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
        out["input_ids"][row, : len(x)] = x
        out["attention_mask"][row, : len(x)] = 1
        out["labels"][row, : len(y)] = y
    return {k: torch.from_numpy(v).to(device) for k, v in out.items()}


def _skip_cpu_jit_builds() -> None:
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (about a minute) that only
    # inference_all_reduce uses; training never needs it. importlib, because `import deepspeed.comm.torch as m`
    # binds the top-level torch module and the patch would silently do nothing.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _init_single_process_distributed(on_gpu: bool) -> None:
    """A world of one for DeepSpeed outside Ray, on a free local port. The port goes in init_method, not in
    MASTER_PORT, so child processes do not inherit a port that is already taken."""
    import socket

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for name in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads these even when given rank and world size
        os.environ.setdefault(name, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                               init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def run_loop(loop_config: dict[str, Any], session: TrainSession) -> dict[str, Any]:
    """Train ``loop_config["total_steps"]`` optimizer steps, resuming from the session's latest checkpoint.

    Returns the final metrics (also reported with the final checkpoint).
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    entered = time.perf_counter()
    cfg = LookaheadConfig.from_dict(loop_config["config"])
    train, total_steps = cfg.train, int(loop_config["total_steps"])
    on_gpu = train.use_gpu and torch.cuda.is_available()
    if not on_gpu:
        _skip_cpu_jit_builds()
    if session.world_size == 1:
        _init_single_process_distributed(on_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model)
    ds_config = build_deepspeed_config(train, session.world_size, total_steps, on_gpu)
    zero3_context = None
    if train.zero_stage == 3 and cfg.model.name_or_path is not None:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_context = HfDeepSpeedConfig(ds_config)  # from_pretrained then partitions weights while loading
    model = build_model(cfg.model, tokenizer, train.seed)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    optimizer = None if on_gpu else torch.optim.AdamW(model.parameters(), lr=train.learning_rate,
                                                      betas=tuple(train.adam_betas), weight_decay=train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=model.parameters() if on_gpu else None)
    del zero3_context

    step = epoch = 0
    resumed_from = None
    with session.latest_checkpoint() as checkpoint:
        if checkpoint is not None:
            _, client_state = engine.load_checkpoint(os.path.join(checkpoint, "ds"), tag=CHECKPOINT_TAG)
            step, epoch = int(client_state["step"]), int(client_state["epoch"])
            resumed_from = step
            logger.info("rank %d resumed from step %d (epoch %d)", session.world_rank, step, epoch)

    writer = _metric_writers(loop_config, cfg) if session.world_rank == 0 else None
    try:
        accumulation, micro_in_step = train.gradient_accumulation_steps, 0
        step_loss = step_tokens = 0.0
        probe: dict[str, Any] | None = None
        started = step_started = time.perf_counter()
        first_step_seconds = initial_loss = None
        last_metrics: dict[str, Any] = {}
        engine.train()
        while step < total_steps:
            steps_before_epoch = step
            for raw in session.batches(train.micro_batch_size):
                batch = collate(raw, tokenizer.pad_token_id, device)
                if probe is None:
                    probe = {k: v[:2].clone() for k, v in batch.items()}
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                step_loss += float(loss.detach())
                step_tokens += float(batch["attention_mask"].sum())
                micro_in_step += 1
                if micro_in_step < accumulation:
                    continue
                step += 1
                totals = torch.tensor([step_loss / accumulation, step_tokens], dtype=torch.float64, device=device)
                dist.all_reduce(totals)
                now = time.perf_counter()
                seconds = now - step_started
                if first_step_seconds is None:
                    first_step_seconds, first_step_done, steps_at_first = now - started, now, step
                loss_value = float(totals[0]) / session.world_size
                initial_loss = loss_value if initial_loss is None else initial_loss
                last_metrics = {"step": step, "epoch": epoch, "loss": loss_value, "initial_loss": initial_loss,
                                "learning_rate": float(engine.get_lr()[0]), "step_seconds": seconds,
                                "tokens_per_second": float(totals[1]) / max(seconds, 1e-9),
                                "setup_seconds": started - entered, "first_step_seconds": first_step_seconds,
                                "mean_step_seconds": (now - first_step_done) / max(step - steps_at_first, 1),
                                "resumed_from_step": -1 if resumed_from is None else resumed_from}
                micro_in_step, step_loss, step_tokens = 0, 0.0, 0.0
                if writer is not None:
                    writer(last_metrics)
                if step >= total_steps:
                    break
                if train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0:
                    with tempfile.TemporaryDirectory() as directory:
                        _save_state(engine, directory, step, epoch)
                        session.report(last_metrics, directory)
                elif step % train.report_every_steps == 0:
                    session.report(last_metrics)
                step_started = time.perf_counter()  # checkpoint and report time is not step time
            else:
                epoch += 1
                if step == steps_before_epoch and micro_in_step == 0:
                    raise ValueError(f"the training data yields no micro-batch of {train.micro_batch_size} rows "
                                     f"on worker {session.world_rank}: too few rows for this batch size")
        with tempfile.TemporaryDirectory() as directory:
            _save_state(engine, directory, step, epoch)
            final = {**last_metrics, "final": True, "train_seconds": time.perf_counter() - started}
            _export(engine, tokenizer, cfg, directory, probe, session.world_rank, final)
            session.report(final, directory)
    finally:  # close TensorBoard / MLflow even when training or the export fails
        if writer is not None:
            writer(None)
    return final


def _save_state(engine: Any, directory: str, step: int, epoch: int) -> None:
    engine.save_checkpoint(os.path.join(directory, "ds"), tag=CHECKPOINT_TAG,
                           client_state={"step": step, "epoch": epoch})


def _export(engine: Any, tokenizer: Any, cfg: LookaheadConfig, directory: str, probe: dict[str, Any] | None,
            rank: int, metrics: dict[str, Any]) -> None:
    """save_pretrained the trained weights on rank 0 (ZeRO-3: gathered from all ranks first) and check them."""
    import torch

    if cfg.train.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank must call it
    else:
        state = engine.module.state_dict()
    logits = None
    if probe is not None:
        engine.eval()
        with torch.no_grad():  # under ZeRO-3 every rank takes part in the forward pass
            logits = engine(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float().cpu()
        engine.train()
    if rank != 0:
        return
    hf_dir = os.path.join(directory, "hf")
    if not state:
        raise ExportMismatchError("the gathered state dict is empty: nothing to export")
    parameters = sum(v.numel() for v in state.values())
    engine.module.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)  # empties `state` (HF 5)
    tokenizer.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "lookahead_config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    metrics["exported_parameters"] = parameters
    if probe is None or logits is None:
        return
    torch.save({k: v.cpu() for k, v in probe.items()} | {"logits": logits}, os.path.join(directory, "export_check.pt"))
    if cfg.train.verify_export:
        metrics["export_max_abs_logit_diff"] = verify_export(hf_dir, probe, logits, cfg.train.precision)


def verify_export(hf_dir: str, probe: dict[str, Any], logits: Any, precision: str) -> float:
    """Reload ``hf_dir`` and compare its logits on the probe batch with ``logits``; returns the max difference.

    Raises:
        ExportMismatchError: the difference exceeds the tolerance of the precision (bf16 0.05, fp32 1e-3).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.no_grad():
        reloaded = model(input_ids=probe["input_ids"].cpu(), attention_mask=probe["attention_mask"].cpu()).logits
    diff = float((reloaded.float() - logits).abs().max())
    tolerance = 5e-2 if precision == "bf16" else 1e-3
    if not diff <= tolerance:
        raise ExportMismatchError(f"export in {hf_dir} gives logits {diff:.3g} away from the trained engine "
                                  f"(tolerance {tolerance}): the export is incomplete or wrong")
    return diff


def _metric_writers(loop_config: dict[str, Any], cfg: LookaheadConfig) -> Any:
    """TensorBoard (always) and MLflow (when configured) writers on rank 0; call with None to close."""
    from torch.utils.tensorboard import SummaryWriter

    tensorboard = SummaryWriter(loop_config["log_dir"])
    mlflow = None
    if cfg.train.mlflow_tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(cfg.train.mlflow_tracking_uri)
        mlflow.start_run(run_name=cfg.train.run_name)
    numeric = ("loss", "learning_rate", "tokens_per_second", "step_seconds", "epoch")

    def write(metrics: dict[str, Any] | None) -> None:
        if metrics is None:
            tensorboard.close()
            if mlflow is not None:
                mlflow.end_run()
            return
        for key in numeric:
            tensorboard.add_scalar(f"train/{key}", metrics[key], metrics["step"])
        if mlflow is not None:
            mlflow.log_metrics({key: metrics[key] for key in numeric}, step=metrics["step"])

    return write
