"""Training drivers: ``run_training`` (Ray Train + DeepSpeed across workers) and ``run_training_local`` (one
process, no Ray). Both validate the config before any heavy work, run the one loop of ``train_loop`` and
leave a reloadable Hugging Face export in ``<train.output_dir>/final``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookahead_ray.config import LookaheadConfig

logger = logging.getLogger(__name__)
FINAL_DIR = "final"


@dataclass
class TrainResult:
    final_dir: str
    """The Hugging Face export (weights, config, tokenizer, lookahead_config.yaml)."""
    checkpoint_dir: str
    """The last checkpoint (DeepSpeed state in ds/, export in hf/): resumable with train.resume_from."""
    metrics: dict[str, Any]


def check_training_config(cfg: LookaheadConfig) -> None:
    """Everything that can be checked before Ray starts.

    Raises:
        ValueError / FileNotFoundError: no output directory, no model, missing paths, no inputs.
    """
    from lookahead_ray.modeling import check_model_source
    from lookahead_ray.record_files import expand_inputs

    if not cfg.train.output_dir:
        raise ValueError("train.output_dir is not set (use --output-dir DIR)")
    if not cfg.data.tokenize and not cfg.train.prepared_dir:
        raise ValueError("training needs token ids: data.tokenize must be true")
    check_model_source(cfg.model)
    if cfg.train.prepared_dir:
        if not list(Path(cfg.train.prepared_dir).glob("*.parquet")):
            raise FileNotFoundError(f"train.prepared_dir: no .parquet shards in {cfg.train.prepared_dir}")
    else:
        expand_inputs(cfg.data)
    if cfg.train.resume_from and "://" not in cfg.train.resume_from and not Path(cfg.train.resume_from).is_dir():
        raise FileNotFoundError(f"train.resume_from: {cfg.train.resume_from} is not a checkpoint directory")


def total_steps(cfg: LookaheadConfig, rows: int | None, world_size: int) -> int:
    """``train.max_steps``, else ``epochs x (rows // global batch)``."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size
    steps = cfg.train.epochs * ((rows or 0) // per_step)
    if steps < 1:
        raise ValueError(f"{rows} training rows make no full global batch of {per_step}; set train.max_steps")
    return steps


def _prepared_rows(prepared_dir: str) -> int | None:
    report = Path(prepared_dir) / "prepare_report.json"
    return json.loads(report.read_text())["rows_written"] if report.exists() else None


def _copy_export(checkpoint_dir: str, output_dir: str) -> str:
    final = Path(output_dir) / FINAL_DIR
    staging = Path(output_dir) / f".{FINAL_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(Path(checkpoint_dir) / "hf", staging)
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    return str(final)


def run_training(cfg: LookaheadConfig) -> TrainResult:
    """Fine-tune with Ray Train (Train V2) driving DeepSpeed ZeRO on ``train.num_workers`` workers."""
    check_training_config(cfg)
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lookahead_ray.data import build_training_dataset
    from lookahead_ray.runtime import init_ray
    from lookahead_ray.train_loop import train_fn_per_worker
    from lookahead_ray.transform import TOKEN_COLUMNS

    train = cfg.train
    init_ray()
    if train.prepared_dir:
        dataset = ray.data.read_parquet(train.prepared_dir, file_extensions=["parquet"]).select_columns(TOKEN_COLUMNS)
        rows = _prepared_rows(train.prepared_dir) if train.max_steps is None else None
    else:
        dataset = build_training_dataset(cfg)
        rows = None
    dataset.context.enable_progress_bars = False  # inside training they only interleave with the metrics
    if train.cache_dataset:
        dataset = dataset.materialize()  # runs before the workers start, so it has every CPU to itself
    if train.max_steps is None and rows is None:
        rows = dataset.count()  # free when cached; otherwise runs the pipeline once
    steps = total_steps(cfg, rows, train.num_workers)
    output_dir = os.path.abspath(train.output_dir)
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if train.use_gpu else {})
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": cfg.to_dict(), "total_steps": steps,
                           "log_dir": os.path.join(output_dir, "tensorboard", train.run_name)},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=train.run_name, storage_path=train.storage_path or output_dir,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints)),
        datasets={"train": dataset},
    )
    logger.info("training %d steps on %d workers (ZeRO-%d, %s)", steps, train.num_workers, train.zero_stage,
                train.precision)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as checkpoint_dir:
        final = _copy_export(checkpoint_dir, output_dir)
    metrics = dict(result.metrics or {})
    Path(output_dir, "train_result.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return TrainResult(final, result.checkpoint.path, metrics)


def run_training_local(cfg: LookaheadConfig) -> TrainResult:
    """The same loop in this process, without Ray (single GPU or CPU); ``train.num_workers`` is ignored."""
    check_training_config(cfg)
    from lookahead_ray.train_loop import run_loop
    from lookahead_ray.train_session import LocalSession

    rows = _load_rows_locally(cfg)
    steps = total_steps(cfg, len(rows["input_ids"]), world_size=1)
    output_dir = os.path.abspath(cfg.train.output_dir)

    def make_batches(micro_batch_size: int):
        for start in range(0, len(rows["input_ids"]) - micro_batch_size + 1, micro_batch_size):
            yield {k: v[start:start + micro_batch_size] for k, v in rows.items()}

    session = LocalSession(make_batches, Path(output_dir) / cfg.train.run_name, cfg.train.keep_checkpoints,
                           resume_from=cfg.train.resume_from)
    loop_config = {"config": cfg.to_dict(), "total_steps": steps,
                   "log_dir": os.path.join(output_dir, "tensorboard", cfg.train.run_name)}
    metrics = run_loop(loop_config, session)
    checkpoint = str(session.checkpoints[-1])
    final = _copy_export(checkpoint, output_dir)
    Path(output_dir, "train_result.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return TrainResult(final, checkpoint, metrics)


def _load_rows_locally(cfg: LookaheadConfig) -> dict[str, list]:
    """Token columns of every accepted row, from prepared shards or by running the transform in-process."""
    import pyarrow.parquet as pq

    from lookahead_ray.record_files import RowReader, expand_inputs, file_format
    from lookahead_ray.transform import TOKEN_COLUMNS, PrepareRecords

    tables = []
    if cfg.train.prepared_dir:
        for shard in sorted(Path(cfg.train.prepared_dir).glob("*.parquet")):
            tables.append(pq.read_table(shard, columns=TOKEN_COLUMNS))
    else:
        transform = PrepareRecords(cfg.to_dict(), accepted_tokens_only=True)
        reader = RowReader(cfg.data.max_row_bytes)
        for path in expand_inputs(cfg.data):
            with open(path, "rb") as f:
                tables += [transform(t) for t in reader.tables(f, path, file_format(path, cfg.data.input_format))]
    return {name: [x for t in tables for x in t.column(name).to_pylist()] for name in TOKEN_COLUMNS}
