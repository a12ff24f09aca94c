"""Training metrics: the step meter (micro-batches -> optimizer-step metrics) and the rank-0 metric writers."""

from __future__ import annotations

import logging
import time
from typing import Any

from lookahead_ray.config import TrainConfig

logger = logging.getLogger(__name__)
SYNC_SECONDS = 60.0
WRITTEN_METRICS = ("loss", "learning_rate", "tokens_per_second", "pad_fraction", "step_seconds", "epoch")


class StepMeter:
    """Accumulates micro-batch losses and token counts into one optimizer step and reports its metrics.

    Loss and tokens are all-reduced across workers, so every rank reports the same numbers. Time spent
    checkpointing or reporting between steps is not step time (call :meth:`restart_clock` after it).
    """

    def __init__(self, accumulation: int, world_size: int, device: Any, setup_seconds: float,
                 resumed_from_step: int | None):
        self.accumulation, self.world_size, self.device = accumulation, world_size, device
        self.setup_seconds, self.resumed_from_step = setup_seconds, resumed_from_step
        self.micro_batches, self.loss_sum, self.tokens, self.positions = 0, 0.0, 0.0, 0.0
        self.run_tokens, self.run_positions = 0.0, 0.0  # all steps since this process started: mean_pad_fraction
        self.started = self.step_started = time.perf_counter()
        self.first_step_seconds: float | None = None
        self.first_step_done, self.first_step = 0.0, 0
        self.steady_tokens = 0.0  # tokens of the steps after the first: mean_tokens_per_second
        self.initial_loss: float | None = None
        self.last: dict[str, Any] = {}

    @property
    def in_step(self) -> bool:
        """Micro-batches of an unfinished optimizer step are pending."""
        return self.micro_batches > 0

    def add(self, loss: Any, tokens: Any, positions: Any = None) -> bool:
        """Count one micro-batch (its loss, its tokens, and the positions computed for them, padding included);
        True when it completes an optimizer step."""
        self.loss_sum += float(loss.detach())
        self.tokens += float(tokens)
        self.positions += float(tokens if positions is None else positions)
        self.micro_batches += 1
        return self.micro_batches >= self.accumulation

    def step_metrics(self, step: int, epoch: int, learning_rate: float) -> dict[str, Any]:
        """Close the step: all-reduce loss and tokens, reset the accumulators, return the metrics."""
        import torch
        import torch.distributed as dist

        totals = torch.tensor([self.loss_sum / self.accumulation, self.tokens, self.positions], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(totals)
        now = time.perf_counter()
        if self.first_step_seconds is None:
            self.first_step_seconds, self.first_step_done, self.first_step = now - self.started, now, step
        else:
            self.steady_tokens += float(totals[1])
        loss = float(totals[0]) / self.world_size
        self.initial_loss = loss if self.initial_loss is None else self.initial_loss
        seconds = now - self.step_started
        self.last = {"step": step, "epoch": epoch, "loss": loss, "initial_loss": self.initial_loss,
                     "learning_rate": float(learning_rate), "step_seconds": seconds,
                     "tokens_per_second": float(totals[1]) / max(seconds, 1e-9),  # pad excluded
                     "pad_fraction": 1.0 - float(totals[1]) / max(float(totals[2]), 1.0),
                     "mean_pad_fraction": 1.0 - (self.run_tokens + float(totals[1]))
                     / max(self.run_positions + float(totals[2]), 1.0),
                     "setup_seconds": self.setup_seconds, "first_step_seconds": self.first_step_seconds,
                     "mean_step_seconds": (now - self.first_step_done) / max(step - self.first_step, 1),
                     "mean_tokens_per_second": self.steady_tokens / max(now - self.first_step_done, 1e-9),
                     "resumed_from_step": -1 if self.resumed_from_step is None else self.resumed_from_step}
        self.run_tokens, self.run_positions = self.run_tokens + float(totals[1]), self.run_positions + float(totals[2])
        self.micro_batches, self.loss_sum, self.tokens, self.positions = 0, 0.0, 0.0, 0.0
        return self.last

    def restart_clock(self) -> None:
        self.step_started = time.perf_counter()

    def train_seconds(self) -> float:
        return time.perf_counter() - self.started


class MetricWriters:
    """TensorBoard (always), MLflow (when ``train.mlflow_tracking_uri`` is set) and the driver's progress board
    (when named), on rank 0, every step.

    TensorBoard writes its event files locally; for a URI ``log_dir`` they are uploaded every
    ``SYNC_SECONDS`` and at the end (TensorBoard reads ``s3://`` itself), so no node needs the driver's disk."""

    def __init__(self, log_dir: str, train: TrainConfig, progress: str | None = None):
        import tempfile

        from torch.utils.tensorboard import SummaryWriter

        from lookahead_ray import console, storage

        self.remote = log_dir if storage.is_uri(log_dir) else None
        self.local = tempfile.mkdtemp(prefix="lookahead-tensorboard-") if self.remote else log_dir
        self.tensorboard = SummaryWriter(self.local)
        self.synced = time.monotonic()
        self.board = console.progress_board(progress) if progress else None
        self.mlflow = None
        if train.mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(train.mlflow_tracking_uri)
            mlflow.start_run(run_name=train.run_name)
            self.mlflow = mlflow

    def write(self, metrics: dict[str, Any]) -> None:
        for key in WRITTEN_METRICS:
            self.tensorboard.add_scalar(f"train/{key}", metrics[key], metrics["step"])
        if self.mlflow is not None:
            self.mlflow.log_metrics({key: metrics[key] for key in WRITTEN_METRICS}, step=metrics["step"])
        if self.board is not None:
            self.board.put.remote({key: metrics[key] for key in ("step", "loss", "tokens_per_second")})
        if self.remote is not None and time.monotonic() - self.synced > SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """Upload the event files to a URI ``log_dir`` (whole files: each upload replaces the last)."""
        if self.remote is None:
            return
        from lookahead_ray import storage

        self.tensorboard.flush()
        self.synced = time.monotonic()
        try:
            storage.upload_dir(self.local, self.remote)
        except Exception as exc:  # noqa: BLE001 - a convenience upload never fails a training run
            logger.warning("could not upload TensorBoard events to %s (%s); next try in %.0f s", self.remote, exc,
                           SYNC_SECONDS)

    def close(self) -> None:
        self.tensorboard.close()
        self.sync()
        if self.remote is not None:
            import shutil

            shutil.rmtree(self.local, ignore_errors=True)
        if self.mlflow is not None:
            self.mlflow.end_run()
