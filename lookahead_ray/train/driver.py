"""Training drivers: ``run_training`` (Ray Train + DeepSpeed across workers) and ``run_training_local`` (one
process, no Ray). Both validate the config before any heavy work, run the one loop of ``train.loop`` and
leave a reloadable Hugging Face export in ``<train dir>/final``.

``build_trainer`` returns the ``TorchTrainer`` without running it, so a Ray Tune trial supplies only its run
name, storage path and ``TuneReportCallback``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import ConfigError, ExportMismatchError
from lookahead_ray.fsio import atomic_file, publish_dir, staging_path
from lookahead_ray.train.run_guard import check_run, mark_finished

logger = logging.getLogger(__name__)
FINAL_DIR = "final"
FAILED_EXPORT_DIR = "export_failed"
RESULT_FILE = "train_result.json"


@dataclass
class TrainResult:
    final_dir: str
    """The Hugging Face export (weights, config, tokenizer, lookahead_config.yaml)."""
    checkpoint_dir: str
    """The last checkpoint (DeepSpeed state in ds/, export in hf/): resumable with train.resume_from."""
    metrics: dict[str, Any]
    already_finished: bool = False
    """The run had finished with the same settings before: nothing was trained or exported this time."""


def train_dir(cfg: LookaheadConfig) -> str:
    """The absolute run directory of ``train`` (``train.output_dir``, or ``<output_dir>/train``).

    Raises:
        ConfigError: neither is set.
    """
    directory = cfg.stage_dir("train")
    if not directory:
        raise ConfigError("train.output_dir is not set (use --output-dir DIR, or set output_dir for the whole run)")
    return os.path.abspath(directory)


def check_training_config(cfg: LookaheadConfig) -> None:
    """Everything that can be checked before Ray starts.

    Raises:
        ConfigError / FileNotFoundError: no output directory, no model, missing paths, no inputs.
    """
    from lookahead_ray.data.readers import expand_inputs
    from lookahead_ray.modeling import check_model_source

    train_dir(cfg)
    if not cfg.data.tokenize and not cfg.train.prepared_dir:
        raise ConfigError("data.tokenize: training needs token ids, so it must be true")
    check_model_source(cfg.model)
    if cfg.train.prepared_dir:
        if not list(Path(cfg.train.prepared_dir).glob("*.parquet")):
            raise FileNotFoundError(f"train.prepared_dir: no .parquet shards in {cfg.train.prepared_dir}")
        check_prepared_tokenizer(cfg)
    else:
        expand_inputs(cfg.data)
    if cfg.train.resume_from and "://" not in cfg.train.resume_from and not Path(cfg.train.resume_from).is_dir():
        raise FileNotFoundError(f"train.resume_from: {cfg.train.resume_from} is not a checkpoint directory")


def check_prepared_tokenizer(cfg: LookaheadConfig) -> None:
    """Refuse shards whose token ids come from another tokenizer than the one this run trains with.

    Raises:
        ConfigError: the prepare report records a different tokenizer (both named) or none at all.
    """
    from lookahead_ray.data.pipeline import REPORT_NAME, read_report
    from lookahead_ray.modeling import tokenizer_for, tokenizer_identity, tokenizer_mismatch

    prepared_dir = cfg.train.prepared_dir
    if not (Path(prepared_dir) / REPORT_NAME).exists():
        raise ConfigError(f"train.prepared_dir: {prepared_dir} has no {REPORT_NAME}; was it written by `prepare`?")
    prepared = read_report(prepared_dir).get("tokenizer")
    if prepared is None:
        raise ConfigError(f"train.prepared_dir: {prepared_dir}/{REPORT_NAME} records no tokenizer (prepared without "
                          "tokenization, or by an older lookahead-ray); run `prepare` again")
    source = cfg.model.tokenizer_source()
    differences = tokenizer_mismatch(prepared, tokenizer_identity(tokenizer_for(cfg.model), source))
    if differences:
        raise ConfigError(f"train.prepared_dir: {prepared_dir} was tokenized with {prepared['source']!r}, but this run "
                          f"trains with {source!r} ({', '.join(differences)} differ); prepare again with the "
                          "model's tokenizer")


def total_steps(cfg: LookaheadConfig, rows: int | None, world_size: int) -> int:
    """``train.max_steps``, else ``epochs x (rows // global batch)``."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size
    steps = cfg.train.epochs * ((rows or 0) // per_step)
    if steps < 1:
        raise ConfigError(f"train.max_steps: {rows} training rows make no full global batch of {per_step}; "
                          "set train.max_steps or use more data")
    return steps


def loop_config(cfg: LookaheadConfig, steps: int) -> dict[str, Any]:
    """Everything a worker needs, as plain data: the typed config serialised, the step count, the log dir."""
    return {"config": cfg.to_dict(), "total_steps": steps,
            "log_dir": os.path.join(train_dir(cfg), "tensorboard", cfg.train.run_name)}


def build_trainer(cfg: LookaheadConfig, datasets: dict[str, Any], total_steps: int, *, run_name: str,
                  storage_path: str, callbacks: Sequence[Any] = ()) -> Any:
    """The Ray Train V2 ``TorchTrainer`` for ``cfg``, not yet run.

    Args:
        datasets: Ray Datasets by name; the loop reads the "train" shard.
        run_name / storage_path: where Ray Train keeps checkpoints; the same pair resumes the run.
        callbacks: Ray Train run callbacks (e.g. Ray Tune's ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lookahead_ray.train.loop import train_fn_per_worker

    train = cfg.train
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if train.use_gpu else {})
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config(cfg, total_steps),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints)),
        datasets=datasets,
    )


def training_dataset(cfg: LookaheadConfig) -> tuple[Any, int | None]:
    """The token columns as a Ray Dataset (prepared shards or the live ``prepare`` pipeline), and the row
    count when it is known without running the pipeline."""
    import ray.data

    from lookahead_ray.data.pipeline import build_training_dataset, prepared_rows
    from lookahead_ray.data.transform import TOKEN_COLUMNS

    train = cfg.train
    if train.prepared_dir:
        dataset = ray.data.read_parquet(train.prepared_dir, file_extensions=["parquet"]).select_columns(TOKEN_COLUMNS)
        rows = prepared_rows(train.prepared_dir)
    else:
        dataset, rows = build_training_dataset(cfg), None
    dataset.context.enable_progress_bars = False  # inside training they only interleave with the metrics
    if train.cache_dataset:
        dataset = dataset.materialize()  # runs before the workers start, so it has every CPU to itself
    return dataset, rows


def run_training(cfg: LookaheadConfig, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune with Ray Train (Train V2) driving DeepSpeed ZeRO on ``train.num_workers`` workers."""
    check_training_config(cfg)
    from lookahead_ray.runtime import init_ray

    train, output_dir = cfg.train, train_dir(cfg)
    storage = train.storage_path or output_dir
    finished = check_run(cfg, output_dir, run_dir=os.path.join(storage, train.run_name))
    if finished:
        return _finished(cfg, output_dir, finished["metrics"])
    init_ray()
    dataset, rows = training_dataset(cfg)
    if train.max_steps is None and rows is None:
        rows = dataset.count()  # free when cached; otherwise runs the pipeline once
    steps = total_steps(cfg, rows, train.num_workers)
    trainer = build_trainer(cfg, {"train": dataset}, steps, run_name=train.run_name,
                            storage_path=train.storage_path or output_dir, callbacks=callbacks)
    logger.info("training %d steps on %d workers (ZeRO-%d, %s)", steps, train.num_workers, train.zero_stage,
                train.precision)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    with result.checkpoint.as_directory() as checkpoint_dir:
        final = _publish_export(checkpoint_dir, output_dir, metrics, result.checkpoint.path)
    metrics["checkpoint_dir"] = result.checkpoint.path
    _write_result(output_dir, metrics)
    mark_finished(cfg, output_dir, metrics)
    return TrainResult(final, result.checkpoint.path, metrics)


def run_training_local(cfg: LookaheadConfig) -> TrainResult:
    """The same loop in this process, without Ray (single GPU or CPU); ``train.num_workers`` is ignored."""
    check_training_config(cfg)
    from lookahead_ray.train.loop import run_loop
    from lookahead_ray.train.worker_io import LocalWorkerIO

    output_dir = train_dir(cfg)
    finished = check_run(cfg, output_dir, run_dir=os.path.join(output_dir, cfg.train.run_name))
    if finished:
        return _finished(cfg, output_dir, finished["metrics"])
    rows = _load_rows_locally(cfg)
    steps = total_steps(cfg, len(rows["input_ids"]), world_size=1)

    def make_batches(micro_batch_size: int):
        for start in range(0, len(rows["input_ids"]) - micro_batch_size + 1, micro_batch_size):
            yield {k: v[start:start + micro_batch_size] for k, v in rows.items()}

    io = LocalWorkerIO(make_batches, Path(output_dir) / cfg.train.run_name, cfg.train.keep_checkpoints,
                       resume_from=cfg.train.resume_from)
    metrics = run_loop(loop_config(cfg, steps), io)
    checkpoint = str(io.checkpoints[-1])
    final = _publish_export(checkpoint, output_dir, metrics, checkpoint)
    metrics["checkpoint_dir"] = checkpoint
    _write_result(output_dir, metrics)
    mark_finished(cfg, output_dir, metrics)
    return TrainResult(final, checkpoint, metrics)


def _finished(cfg: LookaheadConfig, output_dir: str, metrics: dict[str, Any]) -> TrainResult:
    logger.info("run %r in %s already finished with these settings (step %s): nothing to train",
                cfg.train.run_name, output_dir, metrics.get("step"))
    return TrainResult(str(Path(output_dir) / FINAL_DIR), metrics.get("checkpoint_dir", ""), metrics,
                       already_finished=True)


def _publish_export(checkpoint_dir: str, output_dir: str, metrics: dict[str, Any], checkpoint_path: str) -> str:
    """Copy the checkpoint's export to ``final/``; an export that failed its check goes to ``export_failed/``
    with the numbers, and the run fails (the checkpoint stays, for ``lookahead-ray export --checkpoint``).

    Raises:
        ExportMismatchError: the export check failed.
    """
    from lookahead_ray.train.export import HF_SUBDIR

    passed = metrics.get("export_check_passed", True)
    target = Path(output_dir) / (FINAL_DIR if passed else FAILED_EXPORT_DIR)
    staging = staging_path(target)
    shutil.copytree(Path(checkpoint_dir) / HF_SUBDIR, staging)
    if not passed:
        check = {k: v for k, v in metrics.items() if k.startswith("export_")}
        (staging / "EXPORT_CHECK_FAILED.json").write_text(json.dumps(check, indent=2) + "\n")
    publish_dir(staging, target)
    if not passed:
        _write_result(output_dir, metrics)
        numbers = ", ".join(f"{k.removeprefix('export_')}={v:.3g}" if isinstance(v, float) else
                            f"{k.removeprefix('export_')}={v}" for k, v in check.items())
        raise ExportMismatchError(
            f"the export does not reproduce the trained engine's logits ({numbers}); it is kept in {target} for "
            f"inspection and the trained state in {checkpoint_path}: rebuild with "
            f"`lookahead-ray export --checkpoint {checkpoint_path}`")
    return str(target)


def _write_result(output_dir: str, metrics: dict[str, Any]) -> None:
    with atomic_file(Path(output_dir) / RESULT_FILE) as f:
        f.write(json.dumps(metrics, indent=2, default=str) + "\n")


def _load_rows_locally(cfg: LookaheadConfig) -> dict[str, list]:
    """Token columns of every accepted row, from prepared shards or by running the transform in-process."""
    import pyarrow.parquet as pq

    from lookahead_ray.data.readers import RowReader, expand_inputs, file_format
    from lookahead_ray.data.transform import TOKEN_COLUMNS, PrepareRecords

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
