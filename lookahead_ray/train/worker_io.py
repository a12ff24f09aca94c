"""What a worker is given (:class:`LoopSettings`) and where the training loop gets its data and sends its metrics
and checkpoints: a worker's I/O.

The loop (``train.loop.run_loop``) is written once against this small surface; it reads its examples itself
(``train.data_order``: the node's memory-mapped token cache), not through Ray. ``RayWorkerIO`` maps the surface
onto Ray Train (world rank and size, ``ray.train.report``, the newest complete checkpoint); ``LocalWorkerIO`` runs
the same loop in one process without Ray (``train --local``: single-GPU debugging, machines without Ray). Only
``RayWorkerIO`` imports ray, and only when it is constructed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lookahead_ray import storage
from lookahead_ray.storage import publish_dir, staging_path
from lookahead_ray.train.layout import CHECKPOINT_PREFIX

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class LoopSettings:
    """Everything a worker needs, as plain data (Ray Train sends ``train_loop_config`` as a dict of it)."""

    config: dict[str, Any]
    """The run's typed config, serialised (``LookaheadConfig.to_dict``)."""
    total_steps: int
    tokens: str
    """The run's ``prepare`` output (a path or a URI), or ``train --local``'s token file."""
    log_dir: str
    """TensorBoard's directory (``layout.tensorboard_dir``)."""
    progress: str | None = None
    """The name of the driver's progress board (an actor) rank 0 sends each step to, if any."""
    run_location: str | None = None
    """The run's checkpoint directory on storage, resumed from its newest complete checkpoint (Ray only)."""


class WorkerIO(Protocol):
    world_rank: int
    world_size: int

    def latest_checkpoint(self) -> Any:
        """Context manager yielding a local directory of the checkpoint to resume from, or None."""

    def new_checkpoint(self) -> Any:
        """Context manager yielding the directory this rank writes its next checkpoint into (every rank calls it
        at the same step); pass it to :meth:`report`."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Metrics (every rank calls it the same number of times) and, optionally, this rank's checkpoint files."""


class RayWorkerIO:
    """Ray Train V2: world rank and size, ``ray.train.report`` and ``ray.train.get_checkpoint``.

    A run resumes from the newest complete checkpoint under ``run_location`` (``train.checkpoints``), which can be
    newer than the one Ray Train's snapshot recorded (the driver was killed right after the workers reported).
    Without a checkpoint of this run, ``resume_from`` (a local path or a URI Ray Train can read) is used:
    Train V2 deprecates ``TorchTrainer(resume_from_checkpoint=...)`` in favour of this pattern.
    """

    def __init__(self, resume_from: str | None = None, run_location: str | None = None) -> None:
        import pyarrow.fs
        import ray.train

        self._train, self.resume_from, self.run_location = ray.train, resume_from, run_location
        context = ray.train.get_context()
        self.world_rank, self.world_size = context.get_world_rank(), context.get_world_size()
        run_storage = context.get_storage()
        # On a filesystem path (shared by every node: the preflight checked it) checkpoints are written where
        # they stay, not staged on node-local disk and copied (a second full copy of the ZeRO state, ~95 GB per
        # 7B checkpoint, while every rank waits). On an object store they are staged locally and uploaded.
        self.writes_in_place = isinstance(run_storage.storage_filesystem, pyarrow.fs.LocalFileSystem)
        self._experiment_dir = run_storage.experiment_fs_path

    @contextmanager
    def new_checkpoint(self) -> Iterator[str]:
        if not self.writes_in_place:
            with tempfile.TemporaryDirectory() as directory:
                yield directory
            return
        import datetime

        import torch.distributed as dist

        name = [f"{CHECKPOINT_PREFIX}{datetime.datetime.now():%Y-%m-%d_%H-%M-%S.%f}"]  # Ray Train's own naming
        if dist.is_initialized():
            dist.broadcast_object_list(name, src=0)  # every rank writes into the same directory
        directory = os.path.join(self._experiment_dir, name[0])
        os.makedirs(directory, exist_ok=True)
        yield directory

    @contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        from lookahead_ray.train.checkpoints import newest_complete

        newest = newest_complete(self.run_location) if self.run_location else None
        # Ray Train's own record is used only for checkpoints written before completeness markers existed.
        checkpoint = self._train.Checkpoint(newest.location) if newest else self._train.get_checkpoint()
        if checkpoint is None and self.resume_from:
            checkpoint = self._train.Checkpoint(self.resume_from)
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        from ray.train import Checkpoint, CheckpointUploadMode

        if checkpoint_dir is None:
            self._train.report(metrics)
        elif self.writes_in_place:
            self._train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir),
                               checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        else:
            self._train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir))


class LocalWorkerIO:
    """One process, no Ray: checkpoints copied under ``run_dir``."""

    world_rank = 0
    world_size = 1
    writes_in_place = False

    def __init__(self, run_dir: str | Path, keep: int, resume_from: str | None = None):
        self.run_dir, self.keep, self.resume_from = Path(run_dir), keep, resume_from
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics: list[dict[str, Any]] = []
        # Only this class's own numbered checkpoints (a Ray Train run in the same folder names its by date).
        self.checkpoints: list[Path] = sorted(p for p in self.run_dir.glob(f"{CHECKPOINT_PREFIX}*")
                                              if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit())

    @contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        if self.checkpoints:
            yield str(self.checkpoints[-1])
        else:  # a URI is read from this machine's cached copy
            yield storage.local_copy(self.resume_from, "checkpoints") if self.resume_from else None

    @contextmanager
    def new_checkpoint(self) -> Iterator[str]:
        with tempfile.TemporaryDirectory() as directory:
            yield directory

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.metrics.append(metrics)
        logger.info("step %s %s", metrics.get("step"), json.dumps(metrics, default=str))
        if checkpoint_dir is None:
            return
        index = int(self.checkpoints[-1].name.split("_")[-1]) + 1 if self.checkpoints else 0
        target = self.run_dir / f"{CHECKPOINT_PREFIX}{index:06d}"
        staging = staging_path(target)  # a crash mid-copy must not leave a checkpoint_* that resume would pick
        shutil.copytree(checkpoint_dir, staging)
        (staging / "metrics.json").write_text(json.dumps(metrics, default=str))
        publish_dir(staging, target)
        self.checkpoints.append(target)
        while len(self.checkpoints) > self.keep:
            shutil.rmtree(self.checkpoints.pop(0), ignore_errors=True)
