"""The resume guard: a run name stands for one training config.

Each run records a hash of the settings that change what is trained (model, data, preview, records,
tokenization, and the optimization part of ``train``) in ``<train dir>/run_<run_name>.json``. Rerunning the
same name with the same settings resumes it (a finished run is reported and not trained again); with other
settings it stops and names the keys that differ, unless ``train.resume`` says ``never`` (the old run is
moved aside) or ``force``. Pure module.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import ConfigError
from lookahead_ray.train.layout import run_record

# train.* keys that do not change the trained weights: where things go, how often to report, how to recover.
OPERATIONAL_TRAIN_KEYS = {"output_dir", "storage_path", "run_name", "use_gpu", "cpus_per_worker",
                          "checkpoint_every_steps", "keep_checkpoints", "max_failures", "resume_from", "resume",
                          "report_every_steps", "mlflow_tracking_uri", "verify_export",
                          "worker_start_timeout_s", "controller_failure_limit", "workers_per_node", "gpu_memory_gb"}
TRAINING_SECTIONS = ("model", "data", "preview", "records", "tokenization")
OPERATIONAL_DATA_KEYS = {"output_dir", "batch_size", "num_actors", "cpus_per_actor", "rows_per_shard"}


def training_settings(cfg: LookaheadConfig) -> dict[str, Any]:
    """The part of the config that decides what is trained, flattened to dotted keys."""
    full = cfg.to_dict()
    flat: dict[str, Any] = {}
    for section in TRAINING_SECTIONS + ("train",):
        skip = OPERATIONAL_TRAIN_KEYS if section == "train" else OPERATIONAL_DATA_KEYS if section == "data" else set()
        for key, value in full[section].items():
            if key not in skip:
                flat[f"{section}.{key}"] = value
    return flat


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_run(cfg: LookaheadConfig, train_dir: str, run_dir: str) -> dict[str, Any] | None:
    """Apply ``train.resume`` to an existing run of the same name; returns its record when it finished with
    the same settings (nothing to train), else None after writing this run's record.

    Raises:
        ConfigError: the run exists with other settings (the differing keys are named) and resume is auto.
    """
    settings = training_settings(cfg)
    path = run_record(train_dir, cfg.train.run_name)
    previous = json.loads(storage.read_text(path)) if storage.is_file(path) else None
    if cfg.train.resume == "never":
        _move_aside(run_dir)
        previous = None
    if previous is not None and previous["settings_hash"] != settings_hash(settings):
        changed = [f"{k} ({previous['settings'].get(k)!r} -> {settings.get(k)!r})"
                   for k in sorted(set(settings) | set(previous["settings"]))
                   if previous["settings"].get(k) != settings.get(k)]
        if cfg.train.resume == "auto":
            raise ConfigError(f"train.run_name: run {cfg.train.run_name!r} in {train_dir} was trained with other "
                              f"settings: {'; '.join(changed)}. Use another train.run_name, train.resume=never "
                              "(start fresh, old run moved aside) or train.resume=force (resume it anyway)")
        previous = None
    if previous is not None and previous.get("finished"):
        return previous
    _write(path, {"run_name": cfg.train.run_name, "settings_hash": settings_hash(settings), "settings": settings,
                  "finished": False})
    return None


def finished_run(cfg: LookaheadConfig, train_dir: str) -> dict[str, Any] | None:
    """The record of a run of this name that finished with these settings (nothing to train), else None.
    Reads only: :func:`check_run` decides everything else."""
    path = run_record(train_dir, cfg.train.run_name)
    if cfg.train.resume == "never" or not storage.is_file(path):
        return None
    record = json.loads(storage.read_text(path))
    finished = record.get("finished") and record["settings_hash"] == settings_hash(training_settings(cfg))
    return record if finished else None


def mark_finished(cfg: LookaheadConfig, train_dir: str, metrics: dict[str, Any]) -> None:
    path = run_record(train_dir, cfg.train.run_name)
    record = json.loads(storage.read_text(path))
    _write(path, {**record, "finished": True, "metrics": metrics})


def _move_aside(run_dir: str) -> None:
    if storage.is_uri(run_dir):
        raise ConfigError(f"train.resume: never cannot move the remote run {run_dir} aside; use a new train.run_name")
    if os.path.exists(run_dir):
        os.rename(run_dir, f"{run_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")


def _write(path: str, record: dict[str, Any]) -> None:
    with storage.atomic_file(path) as f:
        f.write(json.dumps(record, indent=2, default=str) + "\n")
