"""The preparation pipeline on Ray Data: read -> validate -> preview -> tokenize -> Parquet shards + report.

``run_prepare(cfg)`` writes shards and ``prepare_report.json``; ``train`` runs it into its run directory when it
trains straight from ``data.inputs`` and reads the shards' token columns (``train.data_order``).

Row accounting: the transform emits exactly one row per row read, either a result or a rejection with a
reason, and the sink counts both, so rows read = rows written + rows rejected by construction (checked).
With ``data.on_error: fail`` (the default) the first bad row stops the run with file, row and field named.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import Block
from ray.data.datasource import Datasink

from lookahead_ray import console, storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.data.accounting import (
    MAX_EXAMPLES,
    add_safety_counts,
    check_accounting,
    count_rows,
    empty_counts,
    prepare_report,
)
from lookahead_ray.data.datasource import RecordFileDatasource
from lookahead_ray.data.readers import expand_inputs
from lookahead_ray.data.report import REPORT_NAME, PrepareReport
from lookahead_ray.data.transform import PrepareRecords
from lookahead_ray.errors import ConfigError, RowError, find_in_causes
from lookahead_ray.runtime import check_resources, check_visible_on_every_node, init_ray

READ_CPUS = 0.5


class PreparedShardsDatasink(Datasink):
    """Writes accepted rows as Parquet shards into a staging location (a local directory or an object-store
    prefix, written by the write tasks wherever they run) and counts every row by outcome."""

    def __init__(self, staging_dir: str, rows_per_shard: int):
        self.staging_dir, self.rows_per_shard = staging_dir, rows_per_shard
        self.counts: dict[str, Any] | None = None

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        counts = empty_counts()
        opened: list[Any] = []  # the shard's ParquetWriter and its output stream, once open
        try:
            self._write_blocks(blocks, ctx, counts, opened)
        except BaseException:
            # No partial shard may reach the published output: close what is open first (an object-store stream
            # left to the garbage collector would complete its upload later), then delete it.
            for handle in opened:
                with contextlib.suppress(Exception):
                    handle.close()
            for name in counts["shards"]:
                with contextlib.suppress(OSError):
                    fs, path = storage.resolve(storage.join(self.staging_dir, name))
                    fs.delete_file(path)
            raise
        return counts

    def _write_blocks(self, blocks: Iterable[Block], ctx: Any, counts: dict[str, Any], opened: list[Any]) -> None:
        writer, sink = None, None
        fs, staging = storage.resolve(self.staging_dir)
        for block in blocks:
            kept = count_rows(block if isinstance(block, pa.Table) else pa.Table.from_pandas(block), counts)
            if kept.num_rows == 0:
                continue
            if writer is None:
                name = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
                counts["shards"].append(name)
                sink = fs.open_output_stream(f"{staging}/{name}")
                writer = pq.ParquetWriter(sink, kept.schema)
                opened += [writer, sink]
            writer.write_table(kept)
        if writer is not None:
            writer.close()
            sink.close()

    def on_write_complete(self, write_result: Any) -> None:
        total = empty_counts()
        for part in write_result.write_returns:
            for key in ("read", "written", "truncated", "tokens", "answer_tokens"):
                total[key] += part[key]
            for key in ("reasons", "declared", "arrived", "preview_tokens"):
                total[key].update(part[key])
            total["examples"] += part["examples"][: MAX_EXAMPLES - len(total["examples"])]
            total["shards"] += part["shards"]
        self.counts = total


def transformed_dataset(cfg: LookaheadConfig) -> tuple[Dataset, list[str]]:
    """Read + transform as a lazy Ray Dataset: one output row per input row, rejections included."""
    files = expand_inputs(cfg.data)
    source = RecordFileDatasource(files, cfg.data.input_format, cfg.data.max_row_bytes, cfg.data.read_split_bytes)
    # Fractional CPUs for reads and actors: on a 2-CPU node an actor pool holding every CPU starves the reads.
    check_resources({"CPU": cfg.data.num_actors * cfg.data.cpus_per_actor + READ_CPUS},
                    "data.num_actors x data.cpus_per_actor",
                    f"{cfg.data.num_actors} transform actor(s) x {cfg.data.cpus_per_actor:g} CPU plus {READ_CPUS} "
                    "for reading", bundles=[{"CPU": cfg.data.cpus_per_actor}] * cfg.data.num_actors,
                    wait_s=cfg.cluster.resource_wait_s)
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS)
    ds = ds.map_batches(PrepareRecords, fn_constructor_args=(cfg.to_dict(),), batch_format="pyarrow",
                        batch_size=cfg.data.batch_size, num_cpus=cfg.data.cpus_per_actor,
                        compute=ActorPoolStrategy(size=cfg.data.num_actors))
    # Surface a bad row's RowError itself (not a generic "UDF failed") so the driver can name file/row/field.
    ds.context.raise_original_map_exception = True
    return ds, files


def find_row_error(exc: BaseException) -> RowError | None:
    """The RowError inside an exception Ray raised for a failed task, if any."""
    return find_in_causes(exc, lambda e: isinstance(e, RowError))


def run_prepare(cfg: LookaheadConfig, locations_checked: bool = False, hold_output: bool = True) -> PrepareReport:
    """Run the pipeline and write ``cfg.data.output_dir`` (shards + report) atomically, holding the output for
    this run (``storage.held_output``: a second run into it fails at once, naming this one; ``hold_output`` False
    when the caller already holds a directory above it: ``train``); see :func:`_prepare`."""
    if not cfg.stage_dir("prepare"):
        raise ConfigError("data.output_dir is not set: where should the prepared shards go?")
    with storage.held_output(storage.absolute(cfg.stage_dir("prepare")), "data.output_dir") if hold_output else \
            contextlib.nullcontext():
        return _prepare(cfg, locations_checked)


def _prepare(cfg: LookaheadConfig, locations_checked: bool = False) -> PrepareReport:
    """Run the pipeline and write ``cfg.data.output_dir`` (shards + report) atomically.

    ``locations_checked``: the caller (``train``) already checked that every node sees the output's parent and the
    inputs, so the storage preflight is not run a second time.

    Raises:
        RowError: a bad row with ``on_error: fail``; names file, row and field.
        ConfigError / FileNotFoundError: bad config or inputs, before any Ray work.
    """
    if not cfg.stage_dir("prepare"):
        raise ConfigError("data.output_dir is not set: where should the prepared shards go?")
    start = time.perf_counter()
    output = storage.absolute(cfg.stage_dir("prepare"))
    input_dirs = [storage.absolute(spec) for spec in cfg.data.inputs if storage.is_dir(spec)]
    files = expand_inputs(cfg.data)
    storage.check_output_dir(output, REPORT_NAME, "data.output_dir", inputs=files + input_dirs)
    init_ray()  # a no-op when connected (train, tune, the demo)
    # Ray Data's write tasks write here and its read tasks read the inputs, on whichever node they run.
    if not locations_checked:
        check_visible_on_every_node({"data.output_dir": storage.parent(output)},
                                    {f"data.inputs ({storage.name(f)})": f for f in files[:20]})
    console.use_output_dir(storage.parent(output))  # beside the shards: the output is replaced as a whole
    console.quiet_libraries()
    ds, files = transformed_dataset(cfg)
    staging = storage.staging_location(output)  # the write tasks write here, wherever they run
    storage.make_dirs(staging)
    try:
        report = _write_and_count(cfg, ds, files, staging, output, start)
    except BaseException as exc:
        storage.remove_tree(staging)  # a failed run leaves nothing that looks like output
        row_error = find_row_error(exc) if isinstance(exc, Exception) else None
        if row_error is None:
            raise
        failure = row_error.with_traceback(None)
        failure.__context__ = failure.__cause__ = None
    else:
        storage.publish_dir(staging, output, marker=REPORT_NAME)
        return report
    # A failed execution keeps its actor pool (and the CPUs it holds) alive in a reference cycle through the
    # exception until the next garbage collection: in a long-lived process (a Tune trial, the demo) collect it now.
    del ds
    gc.collect()
    raise failure from None


def _write_and_count(cfg: LookaheadConfig, ds: Dataset, files: list[str], staging: str, output: str,
                     start: float) -> PrepareReport:
    sink = PreparedShardsDatasink(staging, cfg.data.rows_per_shard)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    counts = sink.counts or empty_counts()
    check_accounting(counts, files, sum(counts["reasons"].values()))
    fs, _ = storage.resolve(staging)
    for stray in set(storage.list_files(staging)) - {storage.join(staging, s) for s in counts["shards"]}:
        fs.delete_file(storage.resolve(stray)[1])  # e.g. from a retried write task
    mix = _write_safety_mix(cfg, staging, counts) if cfg.data.safety_mix else None
    report = prepare_report(cfg, counts, files, str(output), time.perf_counter() - start, mix)
    storage.write_text(storage.join(staging, REPORT_NAME), json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    return report


def _write_safety_mix(cfg: LookaheadConfig, staging: str, counts: dict[str, Any]) -> dict[str, Any]:
    """Draw, prepare and write the safety demonstrations (one more shard), adding them to ``counts``; returns their
    part of the report."""
    from lookahead_ray.data.safety_mix import mix_safety_rows

    table, report = mix_safety_rows(cfg, counts["written"])
    add_safety_counts(counts, PreparedShardsDatasink(staging, cfg.data.rows_per_shard).write([table], _MixTask()))
    return report


class _MixTask:
    """The write context of the safety shard (the sink names shards by task index)."""

    task_idx = 99999


