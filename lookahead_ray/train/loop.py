"""The one training procedure, run on every worker: DeepSpeed ZeRO-2/3 over prepared batches.

``train_fn_per_worker(loop_config)`` is what Ray Train runs on every worker; everything it needs travels in
``loop_config`` (the serialised typed config, the step count and the log directory), nothing comes from
module globals. ``run_loop`` is the same procedure against any :class:`~lookahead_ray.train.worker_io.WorkerIO`,
which is how the single-process path reuses it. Checkpoint layout: see ``train.export``.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.data.tokenization import IGNORE_INDEX
from lookahead_ray.errors import ConfigError
from lookahead_ray.modeling import build_model, tokenizer_for
from lookahead_ray.train.deepspeed_config import build_deepspeed_config
from lookahead_ray.train.export import export_model, load_state, save_state
from lookahead_ray.train.metrics import MetricWriters, StepMeter
from lookahead_ray.train.worker_io import Batch, WorkerIO

logger = logging.getLogger(__name__)


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (runs on every worker)."""
    from lookahead_ray.train.worker_io import RayWorkerIO

    run_loop(loop_config, RayWorkerIO(loop_config["config"]["train"]["resume_from"]))


def run_loop(loop_config: dict[str, Any], io: WorkerIO) -> dict[str, Any]:
    """Train ``loop_config["total_steps"]`` optimizer steps, resuming from the worker's latest checkpoint, then
    save the final state and the Hugging Face export. Returns the final metrics (also reported with it)."""
    entered = time.perf_counter()
    cfg = LookaheadConfig.from_dict(loop_config["config"])
    total_steps = int(loop_config["total_steps"])
    engine, tokenizer, device = setup_engine(cfg, io.world_size, total_steps)
    step, epoch, resumed_from = _resume(engine, io)
    meter = StepMeter(cfg.train.gradient_accumulation_steps, io.world_size, device,
                      setup_seconds=time.perf_counter() - entered, resumed_from_step=resumed_from)
    writers = MetricWriters(loop_config["log_dir"], cfg.train) if io.world_rank == 0 else None
    try:  # close TensorBoard / MLflow even when training or the export fails
        probe, step, epoch = _fit(engine, tokenizer.pad_token_id, device, cfg, io, total_steps, step, epoch, meter,
                                  writers)
        with tempfile.TemporaryDirectory() as directory:
            save_state(engine, directory, step, epoch)
            final = {**meter.last, "final": True, "train_seconds": meter.train_seconds()}
            export_model(engine, tokenizer, cfg, directory, probe, io.world_rank, final)
            io.report(final, directory)
    finally:
        if writers is not None:
            writers.close()
    return final


def setup_engine(cfg: LookaheadConfig, world_size: int, total_steps: int) -> tuple[Any, Any, Any]:
    """The tokenizer, the model (loaded or built) and its DeepSpeed engine on this worker's device."""
    import deepspeed
    import torch

    train = cfg.train
    on_gpu = train.use_gpu and torch.cuda.is_available()
    if not on_gpu:
        _skip_cpu_jit_builds()
    if world_size == 1:
        _init_single_process_distributed(on_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tokenizer = tokenizer_for(cfg.model)
    ds_config = build_deepspeed_config(train, world_size, total_steps, on_gpu)
    zero3_context = None
    if train.zero_stage == 3 and cfg.model.name_or_path is not None:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_context = HfDeepSpeedConfig(ds_config)  # from_pretrained then partitions weights while loading
    model = build_model(cfg.model, tokenizer, train.seed)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    # On CPU a client torch AdamW: DeepSpeed's own CPU optimizers JIT-compile for minutes.
    optimizer = None if on_gpu else torch.optim.AdamW(model.parameters(), lr=train.learning_rate,
                                                      betas=tuple(train.adam_betas), weight_decay=train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=model.parameters() if on_gpu else None)
    del zero3_context
    return engine, tokenizer, device


def _resume(engine: Any, io: WorkerIO) -> tuple[int, int, int | None]:
    """(step, epoch, resumed-from step or None) after loading the worker's latest checkpoint, if any."""
    with io.latest_checkpoint() as checkpoint:
        if checkpoint is None:
            return 0, 0, None
        step, epoch = load_state(engine, checkpoint)
    logger.info("rank %d resumed from step %d (epoch %d)", io.world_rank, step, epoch)
    return step, epoch, step


def _fit(engine: Any, pad_token_id: int, device: Any, cfg: LookaheadConfig, io: WorkerIO, total_steps: int,
         step: int, epoch: int, meter: StepMeter, writers: MetricWriters | None) -> tuple[dict | None, int, int]:
    """Epochs of forward / backward / step until ``total_steps``; returns the probe batch, step and epoch.

    The probe (two rows of the first batch) is what the export check compares logits on.
    """
    train = cfg.train
    probe: dict[str, Any] | None = None
    engine.train()
    while step < total_steps:
        steps_before_epoch = step
        for raw in io.batches(train.micro_batch_size):
            batch = collate(raw, pad_token_id, device)
            if probe is None:
                probe = {k: v[:2].clone() for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at accumulation boundaries
            if not meter.add(loss, batch["attention_mask"].sum()):
                continue
            step += 1
            metrics = meter.step_metrics(step, epoch, engine.get_lr()[0])
            if writers is not None:
                writers.write(metrics)
            if step >= total_steps:
                break
            _report(engine, io, train.checkpoint_every_steps, train.report_every_steps, metrics, epoch)
            meter.restart_clock()
        else:
            epoch += 1
            if step == steps_before_epoch and not meter.in_step:
                raise ConfigError(f"the training data yields no micro-batch of {train.micro_batch_size} rows on "
                                  f"worker {io.world_rank}: too few rows for train.micro_batch_size")
    return probe, step, epoch


def _report(engine: Any, io: WorkerIO, checkpoint_every: int, report_every: int, metrics: dict[str, Any],
            epoch: int) -> None:
    """A checkpoint every ``checkpoint_every`` steps, else metrics every ``report_every`` steps (each a barrier)."""
    step = metrics["step"]
    if checkpoint_every and step % checkpoint_every == 0:
        with tempfile.TemporaryDirectory() as directory:
            save_state(engine, directory, step, epoch)
            io.report(metrics, directory)
    elif step % report_every == 0:
        io.report(metrics)


def collate(batch: Batch, pad_token_id: int, device: Any) -> dict[str, Any]:
    """Pad one micro-batch to its longest sequence (right padding; labels padded with IGNORE_INDEX)."""
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
