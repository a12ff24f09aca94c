"""The preparation pipeline on Ray Data: read -> validate -> preview -> tokenize -> Parquet shards + report.

``run_prepare(cfg)`` writes shards and ``prepare_report.json``; ``build_training_dataset(cfg)`` returns the
same stream for Ray Train to consume without writing anything.

Row accounting: the transform emits exactly one row per row read, either a result or a rejection with a
reason, and the sink counts both, so rows read = rows written + rows rejected by construction (checked).
With ``data.on_error: fail`` (the default) the first bad row stops the run with file, row and field named.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import Block
from ray.data.datasource import Datasink

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.preview import AnswerPreviewer, preview_records
from lookahead_ray.records import RecordSchema, RowError
from lookahead_ray.sources import RecordFileDatasource, expand_inputs

logger = logging.getLogger(__name__)

REPORT_NAME = "prepare_report.json"
TOKEN_COLUMNS = ["input_ids", "attention_mask", "labels"]
_MAX_EXAMPLES = 20


class PrepareRecords:
    """Ray Data callable class: the tokenizer is loaded once per actor, then batches stream through."""

    def __init__(self, cfg_dict: dict[str, Any]):
        from lookahead_ray.modeling import load_tokenizer
        from lookahead_ray.tokenization import ExampleTokenizer

        self.cfg = LookaheadConfig.from_dict(cfg_dict)
        self.schema = RecordSchema(self.cfg.records)
        needs_tokenizer = self.cfg.data.tokenize or self.cfg.preview.mode == "real"
        tokenizer = load_tokenizer(self.cfg.model) if needs_tokenizer else None
        self.previewer = (AnswerPreviewer(tokenizer, self.cfg.preview.num_answer_tokens, self.cfg.preview.exact_span)
                          if self.cfg.preview.mode == "real" else None)
        self.encoder = ExampleTokenizer(tokenizer, self.cfg.tokenization, self.schema) if self.cfg.data.tokenize else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        files = batch.column("source_file").to_pylist()
        rows = batch.column("source_row").to_pylist()
        errors: list[RowError | None] = [None] * len(rows)
        good: list[int] = []
        parsed: list[dict] = []
        for i, (text, read_error) in enumerate(zip(batch.column("record").to_pylist(),
                                                   batch.column("read_error").to_pylist(), strict=True)):
            try:
                parsed.append(self._validate(text, read_error))
                good.append(i)
            except RowError as exc:
                errors[i] = self._fail_or_keep(exc.at(files[i], rows[i]))
        previewed = preview_records(parsed, self.cfg.preview, self.schema, self.previewer)
        columns: dict[str, list] = {"source_file": files, "source_row": rows}
        if self.encoder is None:
            records: list[str | None] = [None] * len(rows)
            for i, record in zip(good, previewed, strict=True):
                records[i] = json.dumps(record, ensure_ascii=False)
            columns.update(record=records, truncated=[False] * len(rows))
        else:
            answers = [self.schema.extract(r).answer for r in previewed]
            ids: list[list[int]] = [[] for _ in rows]
            labels: list[list[int]] = [[] for _ in rows]
            truncated = [False] * len(rows)
            for i, example in zip(good, self.encoder.encode_many(previewed, answers), strict=True):
                if isinstance(example, RowError):
                    errors[i] = self._fail_or_keep(example.at(files[i], rows[i]))
                else:
                    ids[i], labels[i], truncated[i] = example.input_ids, example.labels, example.truncated
            columns.update(input_ids=ids, attention_mask=[[1] * len(x) for x in ids], labels=labels,
                           truncated=truncated)
        columns.update(reject_reason=[e.reason if e else None for e in errors],
                       reject_field=[e.field if e else None for e in errors],
                       reject_detail=[e.detail if e else None for e in errors])
        return _columns_to_table(columns)

    def _validate(self, text: str | None, read_error: str | None) -> dict:
        if read_error is not None:
            reason, _, detail = read_error.partition(": ")
            raise RowError(reason, None, detail)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RowError("invalid_json", None, str(exc)) from None
        answer = self.schema.extract(record).answer
        if not answer.strip():
            field_name = {"flat": self.cfg.records.answer_field, "alpaca": "output"}.get(
                self.cfg.records.format, self.cfg.records.messages_field)
            raise RowError("empty_answer", field_name, "the answer is empty; there is nothing to train on")
        return record

    def _fail_or_keep(self, error: RowError) -> RowError:
        if self.cfg.data.on_error == "fail":
            raise error
        return error


def _columns_to_table(columns: dict[str, list]) -> pa.Table:
    types = {"input_ids": pa.list_(pa.int32()), "attention_mask": pa.list_(pa.int8()),
             "labels": pa.list_(pa.int32()), "source_row": pa.int64(), "truncated": pa.bool_()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in columns.items()})


@dataclass
class PrepareReport:
    """Row accounting for one ``prepare`` run (written next to the shards as prepare_report.json)."""

    output_dir: str | None
    input_files: list[str]
    rows_read: int = 0
    rows_written: int = 0
    rows_truncated: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_examples: list[dict[str, Any]] = field(default_factory=list)
    tokens_written: int = 0
    answer_tokens_written: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected_by_reason.items())) or "none"
        return (f"prepare: read {self.rows_read} rows from {len(self.input_files)} file(s), wrote {self.rows_written} "
                f"in {len(self.shards)} shard(s), truncated {self.rows_truncated}, rejected {self.rows_rejected} "
                f"({reasons}) in {self.seconds:.1f}s -> {self.output_dir}")


class PreparedShardsDatasink(Datasink):
    """Writes accepted rows as Parquet shards into a staging directory and counts every row by outcome."""

    def __init__(self, staging_dir: str, rows_per_shard: int):
        self.staging_dir, self.rows_per_shard = staging_dir, rows_per_shard
        self.counts: dict[str, Any] | None = None

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        counts: dict[str, Any] = {"read": 0, "written": 0, "truncated": 0, "tokens": 0, "answer_tokens": 0,
                                  "reasons": Counter(), "examples": [], "shards": []}
        writer, path = None, None
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            counts["read"] += table.num_rows
            rejected = table.column("reject_reason").is_valid()
            for row in table.filter(rejected).select(["source_file", "source_row", "reject_reason", "reject_field",
                                                      "reject_detail"]).to_pylist():
                counts["reasons"][row["reject_reason"]] += 1
                if len(counts["examples"]) < _MAX_EXAMPLES:
                    counts["examples"].append({"file": row["source_file"], "row": row["source_row"],
                                               "field": row["reject_field"], "reason": row["reject_reason"],
                                               "detail": row["reject_detail"][:300]})
            kept = table.filter(pa.compute.invert(rejected)).drop_columns(
                ["reject_reason", "reject_field", "reject_detail"])
            if kept.num_rows == 0:
                continue
            counts["written"] += kept.num_rows
            counts["truncated"] += pa.compute.sum(kept.column("truncated")).as_py() or 0
            if "labels" in kept.column_names:
                lengths = pa.compute.list_value_length(kept.column("input_ids"))
                counts["tokens"] += pa.compute.sum(lengths).as_py() or 0
                flat = pa.compute.list_flatten(kept.column("labels"))
                counts["answer_tokens"] += pa.compute.sum(pa.compute.not_equal(flat, -100).cast(pa.int64())).as_py() or 0
            if writer is None:
                path = os.path.join(self.staging_dir, f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet")
                writer = pq.ParquetWriter(path, kept.schema)
            writer.write_table(kept)
        if writer is not None:
            writer.close()
            counts["shards"].append(os.path.basename(path))
        return counts

    def on_write_complete(self, write_result: Any) -> None:
        total: dict[str, Any] = {"read": 0, "written": 0, "truncated": 0, "tokens": 0, "answer_tokens": 0,
                                 "reasons": Counter(), "examples": [], "shards": []}
        for part in write_result.write_returns:
            for key in ("read", "written", "truncated", "tokens", "answer_tokens"):
                total[key] += part[key]
            total["reasons"].update(part["reasons"])
            total["examples"] += part["examples"]
            total["shards"] += part["shards"]
        self.counts = total


def transformed_dataset(cfg: LookaheadConfig) -> tuple[Dataset, list[str]]:
    """Read + transform as a lazy Ray Dataset (one output row per input row, rejections included)."""
    files = expand_inputs(cfg.data)
    source = RecordFileDatasource(files, cfg.data.input_format, cfg.data.max_row_bytes)
    # Fractional CPUs for reads and actors: on a 2-CPU node an actor pool holding every CPU starves the reads.
    ds = ray.data.read_datasource(source, num_cpus=0.5)
    ds = ds.map_batches(PrepareRecords, fn_constructor_args=(cfg.to_dict(),), batch_format="pyarrow",
                        batch_size=cfg.data.batch_size, num_cpus=cfg.data.cpus_per_actor,
                        compute=ActorPoolStrategy(size=cfg.data.num_actors))
    # Surface a bad row's RowError itself (not a generic "UDF failed") so the driver can name file/row/field.
    ds.context.raise_original_map_exception = True
    return ds, files


def build_training_dataset(cfg: LookaheadConfig) -> Dataset:
    """The prepared examples as a stream for Ray Train (rejected rows removed, token columns only)."""
    ds, _ = transformed_dataset(cfg)
    return ds.map_batches(_accepted_token_columns, batch_format="pyarrow", num_cpus=0.25)


def _accepted_token_columns(batch: pa.Table) -> pa.Table:
    return batch.filter(batch.column("reject_reason").is_null()).select(TOKEN_COLUMNS)


def find_row_error(exc: BaseException) -> RowError | None:
    """The RowError inside an exception Ray raised for a failed task, if any."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, RowError):
            return current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None


def run_prepare(cfg: LookaheadConfig) -> PrepareReport:
    """Run the pipeline and write ``cfg.data.output_dir`` (shards + report) atomically.

    Raises:
        RowError: a bad row with ``on_error: fail``; names file, row and field.
        ValueError / FileNotFoundError: bad config or inputs, before any Ray work.
    """
    if not cfg.data.output_dir:
        raise ValueError("data.output_dir is not set: where should the prepared shards go?")
    start = time.perf_counter()
    ds, files = transformed_dataset(cfg)
    output = Path(cfg.data.output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(f"{output}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    sink = PreparedShardsDatasink(str(staging), cfg.data.rows_per_shard)
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        row_error = find_row_error(exc)
        if row_error is not None:
            raise row_error.with_traceback(None) from None
        raise
    counts = sink.counts or {"read": 0, "written": 0, "truncated": 0, "tokens": 0, "answer_tokens": 0,
                             "reasons": Counter(), "examples": [], "shards": []}
    rejected = sum(counts["reasons"].values())
    if counts["read"] != counts["written"] + rejected:  # the transform must keep one row per input row
        raise RuntimeError(f"row accounting broken: read {counts['read']} != written {counts['written']} "
                           f"+ rejected {rejected}")
    report = PrepareReport(
        output_dir=str(output), input_files=files, rows_read=counts["read"], rows_written=counts["written"],
        rows_truncated=counts["truncated"], rows_rejected=rejected,
        rejected_by_reason=dict(sorted(counts["reasons"].items())), rejected_examples=counts["examples"],
        tokens_written=counts["tokens"], answer_tokens_written=counts["answer_tokens"],
        shards=sorted(counts["shards"]), seconds=round(time.perf_counter() - start, 3), config=cfg.to_dict())
    (staging / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    if output.exists():
        shutil.rmtree(output)
    os.rename(staging, output)
    return report


def read_report(output_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(output_dir) / REPORT_NAME).read_text())
