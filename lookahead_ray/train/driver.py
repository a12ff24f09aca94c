"""Training drivers: ``run_training`` (Ray Train + DeepSpeed across workers) and ``run_training_local`` (one
process, no Ray). Both validate the config before any heavy work, run the one loop of ``train.loop`` and
leave a reloadable Hugging Face export in ``<train dir>/final``.

``build_trainer`` returns the ``TorchTrainer`` without running it, so a Ray Tune trial supplies only its run
name, storage path and ``TuneReportCallback``.
"""

from __future__ import annotations

import contextlib
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
from lookahead_ray.train.checkpoints import newest_complete, remove_incomplete
from lookahead_ray.train.run_guard import check_run, finished_run, mark_finished

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
    return storage.absolute(directory)


def check_prepared_tokenizer(cfg: LookaheadConfig) -> None:
    """Refuse shards whose token ids come from another tokenizer than the one this run trains with.

    Raises:
        ConfigError: the prepare report records a different tokenizer (both named) or none at all.
    """
    from lookahead_ray.data.report import REPORT_NAME, read_report
    from lookahead_ray.modeling import tokenizer_for, tokenizer_identity, tokenizer_mismatch

    prepared_dir = cfg.train.prepared_dir
    if not storage.is_complete(prepared_dir, REPORT_NAME):
        raise ConfigError(f"train.prepared_dir: {prepared_dir} has no {REPORT_NAME}; was it written by `prepare`?")
    prepared = read_report(prepared_dir).get("tokenizer")
    if prepared is None:
        raise ConfigError(f"train.prepared_dir: {prepared_dir}/{REPORT_NAME} records no tokenizer (prepared without "
                          "tokenization, or by an older lookahead-ray); run `prepare` again")
    report_config = read_report(prepared_dir).get("config", {})
    defaults = LookaheadConfig().to_dict()  # a key the report lacks (an older prepare) had its default
    changed = [f"{section}.{key}" for section in ("preview", "records", "tokenization")
               for key, value in cfg.to_dict()[section].items()
               if section in report_config and report_config[section].get(key, defaults[section][key]) != value]
    if "data" in report_config and report_config["data"].get("safety_mix") != cfg.to_dict()["data"]["safety_mix"]:
        changed.append("data.safety_mix")
    if changed:
        raise ConfigError(f"train.prepared_dir: {prepared_dir} was prepared with other settings ({', '.join(changed)}); "
                          "prepare again with this config, or train from data.inputs")
    source = cfg.model.tokenizer_source()
    differences = tokenizer_mismatch(prepared, tokenizer_identity(tokenizer_for(cfg.model), source))
    if differences:
        raise ConfigError(f"train.prepared_dir: {prepared_dir} was tokenized with {prepared['source']!r}, but this run "
                          f"trains with {source!r} ({', '.join(differences)} differ); prepare again with the "
                          "model's tokenizer")


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


def loop_config(cfg: LookaheadConfig, steps: int, tokens: str, progress: str | None = None,
                run_location: str | None = None) -> dict[str, Any]:
    """Everything a worker needs, as plain data: the typed config serialised, the step count, where the examples
    are, the TensorBoard location, the name of the driver's progress board (an actor), if any, and the run's
    checkpoint directory on storage (a path or a URI), resumed from its newest complete checkpoint."""
    return {"config": cfg.to_dict(), "total_steps": steps, "tokens": tokens,
            "log_dir": storage.join(train_dir(cfg), "tensorboard", cfg.train.run_name), "progress": progress,
            "run_location": run_location}


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
        train_loop_config=loop_config(cfg, total_steps, tokens, progress, storage.join(storage_path, run_name)),
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

    prepared = storage.join(output_dir, f"prepared_{cfg.train.run_name}")
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
        return _train_on_ray(cfg, callbacks)


def _train_on_ray(cfg: LookaheadConfig, callbacks: Sequence[Any]) -> TrainResult:
    from lookahead_ray.runtime import WORKER_START_TIMEOUT_ENV, check_resources, check_visible_on_every_node, init_ray
    from lookahead_ray.train.plan import plan_training

    plan = plan_training(cfg).check()
    for warning in plan.warnings:
        logger.warning("%s", warning)
    train, output_dir, storage_path = cfg.train, plan.output_dir, plan.storage_path
    finished = finished_run(cfg, output_dir)  # read only: a finished run starts nothing, not even Ray
    if finished:
        return _finished(cfg, output_dir, finished["metrics"])
    console.use_output_dir(output_dir)
    if plan.cost is not None:
        logger.info("cost: %s", plan.cost_line())
    init_ray(env_vars={WORKER_START_TIMEOUT_ENV: str(train.worker_start_timeout_s)})
    check_visible_on_every_node(plan.outputs, plan.inputs)  # before anything is written there
    finished = check_run(cfg, output_dir, run_dir=plan.run_dir)
    if finished:
        return _finished(cfg, output_dir, finished["metrics"])
    check_resources(plan.resources, "train.num_workers / train.cpus_per_worker / train.use_gpu", plan.resource_line(),
                    bundles=plan.worker_bundles, wait_s=cfg.cluster.resource_wait_s)
    if not train.prepared_dir:
        cfg = _prepare_for_training(cfg, output_dir)
    tokens = storage.absolute(cfg.train.prepared_dir)
    steps = _run_steps(cfg, tokens, train.num_workers, on_ray=True)
    remove_incomplete(plan.run_dir)  # never resumed from; nothing writes into the run yet
    with console.training_progress(steps, f"train {train.run_name}") as seen:
        trainer = build_trainer(cfg, steps, tokens, run_name=train.run_name, storage_path=storage_path,
                                callbacks=callbacks, progress=seen.name)
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
    metrics = dict(result.metrics or {})
    # Where Ray Train put it, with the scheme (its Checkpoint.path has the filesystem's prefix stripped).
    checkpoint = storage.join(storage_path, train.run_name, posixpath.basename(result.checkpoint.path.rstrip("/")))
    with result.checkpoint.as_directory() as checkpoint_dir:
        final = _publish_export(checkpoint_dir, output_dir, metrics, checkpoint, train.verify_export)
    metrics["checkpoint_dir"] = checkpoint
    _write_result(output_dir, metrics)
    mark_finished(cfg, output_dir, metrics)
    return TrainResult(final, checkpoint, metrics)


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


def run_training_local(cfg: LookaheadConfig) -> TrainResult:
    """The same loop in this process, without Ray (single GPU or CPU); ``train.num_workers`` is ignored."""
    with storage.held_output(train_dir(cfg), "train.output_dir"):
        return _train_here(cfg)


def _train_here(cfg: LookaheadConfig) -> TrainResult:
    from lookahead_ray.train.loop import run_loop
    from lookahead_ray.train.plan import plan_training
    from lookahead_ray.train.worker_io import LocalWorkerIO

    plan = plan_training(cfg).check()
    output_dir = plan.output_dir
    if storage.is_uri(output_dir):
        raise ConfigError(f"train.output_dir: {output_dir}: train --local writes to a local directory; "
                          "use a path, or train on Ray (without --local) to write to a URI")
    finished = check_run(cfg, output_dir, run_dir=os.path.join(output_dir, cfg.train.run_name))
    if finished:
        return _finished(cfg, output_dir, finished["metrics"])
    tokens = storage.absolute(cfg.train.prepared_dir) if cfg.train.prepared_dir else _tokens_locally(cfg, output_dir)
    steps = _run_steps(cfg, tokens, world_size=1, on_ray=False)
    io = LocalWorkerIO(Path(output_dir) / cfg.train.run_name, cfg.train.keep_checkpoints,
                       resume_from=cfg.train.resume_from)
    metrics = run_loop(loop_config(cfg, steps, tokens), io)
    checkpoint = str(io.checkpoints[-1])
    final = _publish_export(checkpoint, output_dir, metrics, checkpoint, cfg.train.verify_export)
    metrics["checkpoint_dir"] = checkpoint
    _write_result(output_dir, metrics)
    mark_finished(cfg, output_dir, metrics)
    return TrainResult(final, checkpoint, metrics)


def _finished(cfg: LookaheadConfig, output_dir: str, metrics: dict[str, Any]) -> TrainResult:
    logger.info("run %r in %s already finished with these settings (step %s): nothing to train",
                cfg.train.run_name, output_dir, metrics.get("step"))
    return TrainResult(storage.join(output_dir, FINAL_DIR), metrics.get("checkpoint_dir", ""), metrics,
                       already_finished=True)


def _publish_export(checkpoint_dir: str, output_dir: str, metrics: dict[str, Any], checkpoint_path: str,
                    verify: bool) -> str:
    """Copy the checkpoint's export to ``final/``; an export that failed its check goes to ``export_failed/``
    with the numbers, and the run fails (the checkpoint stays, for ``lookahead-ray export --checkpoint``).

    Raises:
        ExportMismatchError: the export check failed.
    """
    from lookahead_ray.train.export import CONFIG_FILE, HF_SUBDIR

    passed = metrics.get("export_check_passed", not verify)  # asked for and missing: not passed
    target = storage.join(output_dir, FINAL_DIR if passed else FAILED_EXPORT_DIR)
    storage.check_output_dir(target, CONFIG_FILE, "train.output_dir")
    with tempfile.TemporaryDirectory(prefix="lookahead-export-") as scratch:
        # Local: staged beside the target (one rename away); a URI: staged here, uploaded by publish_dir.
        staging = Path(scratch, "hf") if storage.is_uri(target) else storage.staging_path(target)
        shutil.copytree(Path(checkpoint_dir) / HF_SUBDIR, staging)
        if not passed:
            check = {k: v for k, v in metrics.items() if k.startswith("export_")}
            (staging / "EXPORT_CHECK_FAILED.json").write_text(json.dumps(check, indent=2) + "\n")
        storage.publish_dir(staging, target, marker=CONFIG_FILE)
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
    with storage.atomic_file(storage.join(output_dir, RESULT_FILE)) as f:
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
    """The token file of a run straight from inputs without Ray: the transform runs in this process, and the
    row report (as ``prepare`` writes it) goes to ``<train dir>/rows_<run_name>.json``."""
    import pyarrow as pa

    from lookahead_ray.data.readers import RowReader, expand_inputs, file_format, open_data
    from lookahead_ray.data.transform import TOKEN_COLUMNS, PrepareRecords
    from lookahead_ray.train.data_order import write_token_file

    path = os.path.join(output_dir, f"tokens_{cfg.train.run_name}.arrow")
    transform = PrepareRecords(cfg.to_dict())
    reader = RowReader(cfg.data.max_row_bytes)
    files = expand_inputs(cfg.data)  # sorted, rows in file order: the canonical order of data_order
    rows: list[dict[str, Any]] = []
    for file in files:
        with open_data(file) as f:
            for table in reader.tables(f, file, file_format(file, cfg.data.input_format)):
                rows += transform(table).to_pylist()
    mix = None
    if cfg.data.safety_mix:
        from lookahead_ray.data.safety_mix import mix_safety_rows

        table, mix = mix_safety_rows(cfg, sum(r["reject_reason"] is None for r in rows))
        rows = sorted(rows + table.to_pylist(), key=lambda r: (r["source_file"], r["source_row"]))  # canonical order
    _write_row_report(cfg, output_dir, files, rows, mix)
    kept = [r for r in rows if r["reject_reason"] is None]
    return write_token_file(pa.table({name: [r[name] for r in kept] for name in TOKEN_COLUMNS}), path)


def _write_row_report(cfg: LookaheadConfig, output_dir: str, files: list[str], rows: list[dict[str, Any]],
                      mix: dict[str, Any] | None = None) -> None:
    from dataclasses import asdict

    from lookahead_ray.data.readers import END_OF_FILE
    from lookahead_ray.data.report import PrepareReport

    records = [r for r in rows if r["reject_reason"] != END_OF_FILE]
    rejected = [r for r in records if r["reject_reason"] is not None]
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reject_reason"]] = reasons.get(r["reject_reason"], 0) + 1
    report = PrepareReport(
        output_dir=None, input_files=files, rows_read=len(records), rows_written=len(records) - len(rejected),
        rows_truncated=sum(bool(r["truncated"]) for r in records if r["reject_reason"] is None),
        rows_rejected=len(rejected), rejected_by_reason=dict(sorted(reasons.items())),
        rejected_examples=[{"file": r["source_file"], "row": r["source_row"], "field": r["reject_field"],
                            "reason": r["reject_reason"], "detail": (r["reject_detail"] or "")[:300]}
                           for r in rejected[:20]], config=cfg.to_dict(), safety_mix=mix,
        rows_plain=sum(r["preview_tokens"] == -1 for r in records if r["reject_reason"] is None) - (mix or {}).get(
            "written", 0),
        preview_tokens=_histogram(r["preview_tokens"] for r in records if r["reject_reason"] is None
                                  and r["preview_tokens"] >= 0))
    logger.info("%s", report.summary())
    with storage.atomic_file(Path(output_dir) / f"rows_{cfg.train.run_name}.json") as f:
        f.write(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")


def _histogram(values: Any) -> dict[str, int]:
    """{value: count} with string keys in ascending order (as prepare_report.json's ``preview_tokens``)."""
    from collections import Counter

    return {str(k): n for k, n in sorted(Counter(values).items())}
