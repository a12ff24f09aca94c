"""Executing a training plan: ``execute(plan, backend)`` holds a run's sequence once (finished? identity, data,
the loop on the backend's workers, export, result); ``RayBackend`` runs the loop on Ray Train workers driving
DeepSpeed ZeRO (``run_training``), ``LocalBackend`` in this process without Ray (``run_training_local``). Either
leaves a reloadable Hugging Face export in ``<train dir>/final``.

``build_trainer`` returns the ``TorchTrainer`` without running it, so a Ray Tune trial supplies only its run
name, storage path and ``TuneReportCallback``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookahead_ray import console, storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import ConfigError, ExportMismatchError, LookaheadError, RunInterrupted, fixable_os_error
from lookahead_ray.train import layout
from lookahead_ray.train.checkpoints import newest_complete, remove_incomplete
from lookahead_ray.train.layout import train_dir
from lookahead_ray.train.plan import TrainPlan, plan_training
from lookahead_ray.train.run_guard import check_run, finished_run, mark_finished
from lookahead_ray.train.worker_io import LoopSettings

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    final_dir: str
    """The Hugging Face export (weights, config, tokenizer, lookahead_config.yaml)."""
    checkpoint_dir: str
    """The last checkpoint (DeepSpeed state in ds/, export in hf/): resumable with train.resume_from."""
    metrics: dict[str, Any]
    already_finished: bool = False
    """The run had finished with the same settings before: nothing was trained or exported this time."""


def total_steps(cfg: LookaheadConfig, rows: int, world_size: int) -> int:
    """``train.max_steps``, else ``epochs x`` the optimizer steps one epoch of ``rows`` gives each worker
    (whole micro-batches per worker, ``gradient_accumulation_steps`` of them per step)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    train = cfg.train
    micro_batches = (rows // world_size) // train.micro_batch_size
    steps = train.epochs * micro_batches // train.gradient_accumulation_steps
    if steps < 1:
        raise ConfigError(f"train.max_steps: {rows} training rows make no full global batch of {train.global_batch}; "
                          "set train.max_steps or use more data")
    return steps


def packed_micro_batches(cfg: LookaheadConfig, tokens: str, world_size: int) -> int:
    """Micro-batches each worker trains in ``train.epochs`` packed epochs (they differ per epoch: each packs its
    own permutation)."""
    from lookahead_ray.train.data_order import TokenStore, micro_batches_per_epoch

    store, train = TokenStore(tokens), cfg.train
    return sum(micro_batches_per_epoch(store.lengths(), len(store), train.epochs, train.seed, world_size,
                                       train.micro_batch_size, cfg.tokenization.max_seq_len))


def _run_steps(cfg: LookaheadConfig, tokens: str, world_size: int, on_ray: bool) -> int:
    """:func:`total_steps`; with packing and no ``train.max_steps``, from the packed sequence count, which needs the
    examples' lengths: read on a Ray node (its token cache), not by the driver, on Ray."""
    rows = _rows(tokens)
    if not cfg.train.packing or cfg.train.max_steps is not None:
        return total_steps(cfg, rows, world_size)
    if on_ray:
        import ray

        micro_batches = ray.get(ray.remote(num_cpus=0)(packed_micro_batches).remote(cfg, tokens, world_size))
    else:
        micro_batches = packed_micro_batches(cfg, tokens, world_size)
    steps = micro_batches // cfg.train.gradient_accumulation_steps
    if steps < 1:
        raise ConfigError(f"train.max_steps: {rows} training rows pack into no full global batch of "
                          f"{cfg.train.global_batch} sequences of {cfg.tokenization.max_seq_len} tokens; set "
                          "train.max_steps or use more data")
    return steps


def loop_settings(cfg: LookaheadConfig, steps: int, tokens: str, progress: str | None = None,
                  run_location: str | None = None) -> LoopSettings:
    """What every worker of the run is given (see :class:`~lookahead_ray.train.worker_io.LoopSettings`)."""
    return LoopSettings(cfg.to_dict(), steps, tokens, layout.tensorboard_dir(cfg), progress, run_location)


def build_trainer(cfg: LookaheadConfig, total_steps: int, tokens: str, *, run_name: str, storage_path: str,
                  callbacks: Sequence[Any] = (), progress: str | None = None) -> Any:
    """The Ray Train V2 ``TorchTrainer`` for ``cfg``, not yet run.

    Args:
        total_steps: optimizer steps of the run (see :func:`total_steps`).
        tokens: the run's ``prepare`` output (``train.prepared_dir``, a path or a URI): every node copies its token
            columns into its local cache once (``data_order.node_token_cache``) and memory-maps them.
        run_name / storage_path: where Ray Train keeps checkpoints; the same pair resumes the run.
        callbacks: Ray Train run callbacks (e.g. Ray Tune's ``TuneReportCallback``).
        progress: the name of the progress-board actor (``console.training_progress``) rank 0 sends each step to.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lookahead_ray.train.loop import train_fn_per_worker

    train = cfg.train
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if train.use_gpu else {})
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=dataclasses.asdict(loop_settings(cfg, total_steps, tokens, progress,
                                                           storage.join(storage_path, run_name))),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=train.max_failures,
                                                          controller_failure_limit=train.controller_failure_limit),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints)),
    )


def _prepare_for_training(cfg: LookaheadConfig, output_dir: str) -> LookaheadConfig:
    """Training straight from inputs runs ``prepare`` into the run directory first, so every row is
    accounted for (prepare_report.json: read = trained + rejected by reason, truncation counted) and the
    epochs read fixed shards."""
    from lookahead_ray.config import apply_overrides
    from lookahead_ray.data.pipeline import run_prepare

    prepared = layout.prepared_dir(output_dir, cfg.train.run_name)
    # run_training checked what every node must see (the train directory, the inputs): not again here.
    # The run directory above it is held already (by this run, or by the search for a trial).
    report = run_prepare(apply_overrides(cfg, {"data.output_dir": prepared}), locations_checked=True,
                         hold_output=False)
    logger.info("%s", report.summary())
    return apply_overrides(cfg, {"train.prepared_dir": prepared})


def run_training(cfg: LookaheadConfig, callbacks: Sequence[Any] = (), hold_output: bool = True) -> TrainResult:
    """Fine-tune with Ray Train (Train V2) driving DeepSpeed ZeRO on ``train.num_workers`` workers: the plan of
    ``cfg`` (``train.plan``) is made and must pass before Ray starts; this executes it, holding the run directory
    (``storage.held_output``: a second run into it fails at once, naming this one).

    ``hold_output``: False for a Tune trial, whose directory is its own and whose search holds the search's
    directory (a trial rerun after its search was killed must not wait on the dead trial's lock)."""
    with storage.held_output(train_dir(cfg), "train.output_dir") if hold_output else contextlib.nullcontext():
        return execute(_checked_plan(cfg), RayBackend(callbacks))


def run_training_local(cfg: LookaheadConfig) -> TrainResult:
    """The same loop in this process, without Ray (single GPU or CPU); ``train.num_workers`` is ignored."""
    with storage.held_output(train_dir(cfg), "train.output_dir"):
        return execute(_checked_plan(cfg), LocalBackend())


def _checked_plan(cfg: LookaheadConfig) -> TrainPlan:
    return plan_training(cfg).check()


def execute(plan: TrainPlan, backend: RayBackend | LocalBackend) -> TrainResult:
    """A run's one sequence, on either backend: a finished run is reported, not trained again; the run's record is
    checked (``run_guard``); the data is tokenized (or read prepared), the loop runs on the backend's workers, and
    the last checkpoint's export is published to ``final/`` with the final metrics beside it."""
    cfg, output_dir = plan.cfg, plan.output_dir
    backend.announce(plan)
    finished = finished_run(cfg, output_dir)  # read only: a finished run starts nothing, not even Ray
    if finished:
        return _finished(cfg, output_dir, finished["metrics"])
    backend.start(plan)
    finished = check_run(cfg, output_dir, run_dir=backend.run_dir(plan))
    if finished:
        return _finished(cfg, output_dir, finished["metrics"])
    backend.check_resources(plan)
    cfg, tokens = backend.data(cfg, output_dir)  # the config now names the prepared data it trains on
    steps = _run_steps(cfg, tokens, backend.world_size(cfg), on_ray=backend.on_ray)
    with backend.run(cfg, plan, tokens, steps) as (metrics, checkpoint, checkpoint_dir):
        final = _publish_export(checkpoint_dir, output_dir, metrics, checkpoint, cfg.train.verify_export)
    metrics["checkpoint_dir"] = checkpoint
    _write_result(output_dir, metrics)
    mark_finished(cfg, output_dir, metrics)
    return TrainResult(final, checkpoint, metrics)


class RayBackend:
    """Ray Train workers (a ``TorchTrainer``), on a local Ray or the cluster in ``RAY_ADDRESS``."""

    on_ray = True

    def __init__(self, callbacks: Sequence[Any] = ()) -> None:
        self.callbacks = callbacks

    def announce(self, plan: TrainPlan) -> None:
        for warning in plan.warnings:
            logger.warning("%s", warning)

    def start(self, plan: TrainPlan) -> None:
        from lookahead_ray.runtime import WORKER_START_TIMEOUT_ENV, check_visible_on_every_node, init_ray

        console.use_output_dir(plan.output_dir)
        if plan.cost is not None:
            logger.info("cost: %s", plan.cost_line())
        init_ray(env_vars={WORKER_START_TIMEOUT_ENV: str(plan.cfg.train.worker_start_timeout_s)})
        check_visible_on_every_node(plan.outputs, plan.inputs)  # before anything is written there

    def run_dir(self, plan: TrainPlan) -> str:
        return plan.run_dir

    def check_resources(self, plan: TrainPlan) -> None:
        from lookahead_ray.runtime import check_resources

        check_resources(plan.resources, "train.num_workers / train.cpus_per_worker / train.use_gpu",
                        plan.resource_line(), bundles=plan.worker_bundles, wait_s=plan.cfg.cluster.resource_wait_s)

    def data(self, cfg: LookaheadConfig, output_dir: str) -> tuple[LookaheadConfig, str]:
        """``prepare`` on Ray Data into the run directory, unless ``train.prepared_dir`` names a finished one."""
        if not cfg.train.prepared_dir:
            cfg = _prepare_for_training(cfg, output_dir)
        return cfg, storage.absolute(cfg.train.prepared_dir)

    def world_size(self, cfg: LookaheadConfig) -> int:
        return cfg.train.num_workers

    @contextlib.contextmanager
    def run(self, cfg: LookaheadConfig, plan: TrainPlan, tokens: str, steps: int) -> Iterator[tuple[dict, str, str]]:
        """Fit the worker group; yields the final metrics, the last checkpoint's location (with its scheme) and a
        local directory of it. Ctrl-C stops the workers and raises :class:`RunInterrupted` with the step to resume."""
        train = cfg.train
        remove_incomplete(plan.run_dir)  # never resumed from; nothing writes into the run yet
        with console.training_progress(steps, f"train {train.run_name}") as seen:
            trainer = build_trainer(cfg, steps, tokens, run_name=train.run_name, storage_path=plan.storage_path,
                                    callbacks=self.callbacks, progress=seen.name)
            logger.info("training %d steps on %d workers (ZeRO-%d, %s)", steps, train.num_workers, train.zero_stage,
                        train.precision)
            with _stopped_by_ctrl_c(trainer) as interrupted:
                try:
                    result = trainer.fit()
                except Exception as exc:  # Ray Train raises the workers' failure itself (or, after Ctrl-C, the abort)
                    if not interrupted.is_set():
                        user = _user_error(exc, plan.run_dir)
                        if user is None:
                            raise
                        raise user from exc
        if interrupted.is_set():  # after the progress board's last records are in
            raise RunInterrupted(_interrupted_line(seen.step, plan.run_dir)) from None
        if result.error is not None:
            raise result.error
        # Where Ray Train put it, with the scheme (its Checkpoint.path has the filesystem's prefix stripped).
        checkpoint = layout.checkpoint(plan.run_dir, posixpath.basename(result.checkpoint.path.rstrip("/")))
        with result.checkpoint.as_directory() as checkpoint_dir:
            yield dict(result.metrics or {}), checkpoint, checkpoint_dir


class LocalBackend:
    """This process, without Ray: the same loop with :class:`~lookahead_ray.train.worker_io.LocalWorkerIO`."""

    on_ray = False

    def announce(self, plan: TrainPlan) -> None:
        """Nothing: the local path has always run quietly on a plan's warnings (a dry run shows them)."""

    def start(self, plan: TrainPlan) -> None:
        if storage.is_uri(plan.output_dir):
            raise ConfigError(f"train.output_dir: {plan.output_dir}: train --local writes to a local directory; "
                              "use a path, or train on Ray (without --local) to write to a URI")

    def run_dir(self, plan: TrainPlan) -> str:
        return layout.local_run_dir(plan.output_dir, plan.cfg.train.run_name)

    def check_resources(self, plan: TrainPlan) -> None:
        """Nothing to ask of a cluster: this process is the worker."""

    def data(self, cfg: LookaheadConfig, output_dir: str) -> tuple[LookaheadConfig, str]:
        """The transform in this process into one token file, unless ``train.prepared_dir`` names a ``prepare``."""
        if cfg.train.prepared_dir:
            return cfg, storage.absolute(cfg.train.prepared_dir)
        return cfg, _tokens_locally(cfg, output_dir)

    def world_size(self, cfg: LookaheadConfig) -> int:
        return 1

    @contextlib.contextmanager
    def run(self, cfg: LookaheadConfig, plan: TrainPlan, tokens: str, steps: int) -> Iterator[tuple[dict, str, str]]:
        from lookahead_ray.train.loop import run_loop
        from lookahead_ray.train.worker_io import LocalWorkerIO

        io = LocalWorkerIO(self.run_dir(plan), cfg.train.keep_checkpoints, resume_from=cfg.train.resume_from)
        metrics = run_loop(loop_settings(cfg, steps, tokens), io)
        checkpoint = str(io.checkpoints[-1])
        yield metrics, checkpoint, checkpoint


@contextlib.contextmanager
def _stopped_by_ctrl_c(trainer: Any) -> Iterator[threading.Event]:
    """Ctrl-C during ``trainer.fit()``: the first aborts the run through Ray Train's controller (the workers stop;
    every checkpoint they completed stays, and a checkpoint cut short is never resumed from), the second exits at
    once. Yields the event that says it happened.

    Ray Train V2 installs its own handler in ``fit`` (``_register_sigint_handler``; the first Ctrl-C waits on the
    abort inside the handler and the process ends with 1 and no message): this trainer's replaces it."""
    interrupted = threading.Event()

    def exit_now(signum: int, frame: Any) -> None:
        print("\nlookahead-ray: interrupted again: exiting now", file=sys.stderr, flush=True)
        os._exit(130)

    def register(controller: Any) -> None:
        def stop(signum: int, frame: Any) -> None:
            interrupted.set()
            signal.signal(signal.SIGINT, exit_now)
            print("\nlookahead-ray: interrupted: stopping the workers (Ctrl-C again to exit at once)",
                  file=sys.stderr, flush=True)
            controller.abort.remote()

        signal.signal(signal.SIGINT, stop)

    previous = signal.getsignal(signal.SIGINT)
    trainer._register_sigint_handler = register
    try:
        yield interrupted
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _interrupted_line(step: int | None, run_dir: str) -> str:
    newest = newest_complete(run_dir) if storage.exists(run_dir) else None
    at = f"interrupted at step {step}" if step is not None else "interrupted"
    if newest is None:
        return f"{at}; no checkpoint was complete yet: rerun the same command to start again"
    return f"{at}; rerun the same command to resume from step {newest.step} ({newest.location})"


def _user_error(error: BaseException, run_dir: str) -> BaseException | None:
    """An error the user can fix that a worker raised (bad config, missing GPU; a full or read-only disk): shown as
    the one line it is, not as Ray Train's worker-group failure. A worker's OS error that names no file (a failed
    write of a checkpoint) is about the run's directory."""
    for failure in getattr(error, "worker_failures", {}).values():
        for candidate in (failure, failure.__cause__, getattr(failure, "cause", None)):
            if isinstance(candidate, LookaheadError):
                return candidate.with_traceback(None)
    fixable = fixable_os_error(error)
    if fixable is not None and not fixable.filename:
        return type(fixable)(fixable.errno, fixable.strerror, run_dir)
    return fixable


def _finished(cfg: LookaheadConfig, output_dir: str, metrics: dict[str, Any]) -> TrainResult:
    logger.info("run %r in %s already finished with these settings (step %s): nothing to train",
                cfg.train.run_name, output_dir, metrics.get("step"))
    return TrainResult(layout.final_dir(output_dir), metrics.get("checkpoint_dir", ""), metrics,
                       already_finished=True)


def _publish_export(checkpoint_dir: str, output_dir: str, metrics: dict[str, Any], checkpoint_path: str,
                    verify: bool) -> str:
    """Copy the checkpoint's export to ``final/``; an export that failed its check goes to ``export_failed/``
    with the numbers, and the run fails (the checkpoint stays, for ``lookahead-ray export --checkpoint``).

    Raises:
        ExportMismatchError: the export check failed.
    """
    passed = metrics.get("export_check_passed", not verify)  # asked for and missing: not passed
    target = layout.export_dir(output_dir, passed)
    storage.check_output_dir(target, layout.CONFIG_FILE, "train.output_dir")
    with tempfile.TemporaryDirectory(prefix="lookahead-export-") as scratch:
        # Local: staged beside the target (one rename away); a URI: staged here, uploaded by publish_dir.
        staging = Path(scratch, layout.HF_SUBDIR) if storage.is_uri(target) else storage.staging_path(target)
        shutil.copytree(Path(checkpoint_dir) / layout.HF_SUBDIR, staging)
        if not passed:
            check = {k: v for k, v in metrics.items() if k.startswith("export_")}
            (staging / layout.EXPORT_CHECK_FAILED_FILE).write_text(json.dumps(check, indent=2) + "\n")
        storage.publish_dir(staging, target, marker=layout.CONFIG_FILE)
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
    with storage.atomic_file(layout.result_file(output_dir)) as f:
        f.write(json.dumps(metrics, indent=2, default=str) + "\n")


def _rows(tokens: str) -> int:
    """Training rows: from the ``prepare`` report (the driver never loads the token data), or the local file."""
    from lookahead_ray.data.report import prepared_rows
    from lookahead_ray.train.data_order import TokenStore

    rows = len(TokenStore(tokens)) if tokens.endswith(".arrow") else prepared_rows(tokens)
    if not rows:
        raise ConfigError(f"train.prepared_dir: {tokens} holds no training rows (was every row rejected?)")
    return rows


def _tokens_locally(cfg: LookaheadConfig, output_dir: str) -> str:
    """The token file of a run straight from inputs without Ray: the transform runs in this process, every row
    counted as ``prepare`` counts it (``data.pipeline.count_rows``), and the row report (as ``prepare`` writes it)
    goes to ``<train dir>/rows_<run_name>.json``."""
    import time
    from dataclasses import asdict

    import pyarrow as pa

    from lookahead_ray.data.accounting import add_safety_counts, check_accounting, count_rows, empty_counts, prepare_report
    from lookahead_ray.data.readers import RowReader, expand_inputs, file_format, open_data
    from lookahead_ray.data.transform import TOKEN_COLUMNS, PrepareRecords
    from lookahead_ray.train.data_order import write_token_file

    start = time.perf_counter()
    transform, reader, counts = PrepareRecords(cfg.to_dict()), RowReader(cfg.data.max_row_bytes), empty_counts()
    files = expand_inputs(cfg.data)  # sorted, rows in file order: the canonical order of data_order
    kept = []
    for file in files:
        with open_data(file) as f:
            kept += [count_rows(transform(table), counts)
                     for table in reader.tables(f, file, file_format(file, cfg.data.input_format))]
    check_accounting(counts, files, sum(counts["reasons"].values()))
    mix = None
    if cfg.data.safety_mix:
        from lookahead_ray.data.safety_mix import mix_safety_rows

        table, mix = mix_safety_rows(cfg, counts["written"])
        part = empty_counts()
        kept.append(count_rows(table, part))
        add_safety_counts(counts, part)
    report = prepare_report(cfg, counts, files, None, time.perf_counter() - start, mix)
    logger.info("%s", report.summary())
    with storage.atomic_file(layout.local_rows_report(output_dir, cfg.train.run_name)) as f:
        f.write(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    rows = pa.concat_tables(kept, promote_options="default").sort_by([("source_file", "ascending"),
                                                                       ("source_row", "ascending")])
    return write_token_file(rows.select(TOKEN_COLUMNS), layout.local_tokens(output_dir, cfg.train.run_name))
