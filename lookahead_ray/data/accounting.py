"""The one row accounting of every path that prepares data (``prepare``'s Ray Data writers, ``train --local``):
each transformed table's rows counted by outcome, the reader's per-file counts checked against what arrived, and
the ``prepare_report.json`` built from the counts. No Ray imports: the single-process path runs it too."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.data.readers import END_OF_FILE
from lookahead_ray.data.report import PrepareReport
from lookahead_ray.data.tokenization import IGNORE_INDEX

MAX_EXAMPLES = 20


def empty_counts() -> dict[str, Any]:
    """Per-write-task (and, summed, per-run) row counts by outcome."""
    return {"read": 0, "written": 0, "truncated": 0, "tokens": 0, "answer_tokens": 0,
            "reasons": Counter(), "examples": [], "shards": [], "declared": Counter(), "arrived": Counter(),
            "preview_tokens": Counter()}


def count_rows(table: pa.Table, counts: dict[str, Any]) -> pa.Table:
    """The one row accounting (``prepare``'s writers, ``train --local``): count a transformed table's rows into
    ``counts`` (each file's rows arriving, rejections by reason with examples, rows written, truncated, tokens,
    answer tokens, preview lengths) and return the rows to write, without the rejection and preview columns."""
    is_end = pa.compute.fill_null(pa.compute.equal(table.column("reject_reason"), END_OF_FILE), False)
    for row in table.filter(is_end).select(["source_file", "source_row"]).to_pylist():
        counts["declared"][row["source_file"]] += row["source_row"]  # the reader's count of the file's rows
    table = table.filter(pa.compute.invert(is_end))
    counts["arrived"].update(table.column("source_file").to_pylist())
    counts["read"] += table.num_rows
    rejected = table.column("reject_reason").is_valid()
    for row in table.filter(rejected).select(["source_file", "source_row", "reject_reason", "reject_field",
                                              "reject_detail"]).to_pylist():
        counts["reasons"][row["reject_reason"]] += 1
        if len(counts["examples"]) < MAX_EXAMPLES:
            counts["examples"].append({"file": row["source_file"], "row": row["source_row"],
                                       "field": row["reject_field"], "reason": row["reject_reason"],
                                       "detail": row["reject_detail"][:300]})
    kept = table.filter(pa.compute.invert(rejected)).drop_columns(["reject_reason", "reject_field", "reject_detail"])
    counts["preview_tokens"].update(str(n) for n in kept.column("preview_tokens").to_pylist())
    kept = kept.drop_columns(["preview_tokens"])
    counts["written"] += kept.num_rows
    counts["truncated"] += pa.compute.sum(kept.column("truncated")).as_py() or 0
    if "labels" in kept.column_names and kept.num_rows:
        counts["tokens"] += pa.compute.sum(pa.compute.list_value_length(kept.column("input_ids"))).as_py() or 0
        answer = pa.compute.not_equal(pa.compute.list_flatten(kept.column("labels")), IGNORE_INDEX).cast(pa.int64())
        counts["answer_tokens"] += pa.compute.sum(answer).as_py() or 0
    return kept


def add_safety_counts(counts: dict[str, Any], part: dict[str, Any]) -> None:
    """The safety demonstrations' counts added to the task rows' (their preview lengths are not: never previewed)."""
    for key in ("read", "written", "truncated", "tokens", "answer_tokens"):
        counts[key] += part[key]
    counts["reasons"].update(part["reasons"])
    counts["shards"] += part["shards"]
    counts["examples"] += part["examples"][: MAX_EXAMPLES - len(counts["examples"])]


def prepare_report(cfg: LookaheadConfig, counts: dict[str, Any], files: list[str], output: str | None,
                   seconds: float, mix: dict[str, Any] | None) -> PrepareReport:
    return PrepareReport(
        output_dir=output, input_files=files, rows_read=counts["read"], rows_written=counts["written"],
        rows_truncated=counts["truncated"], rows_rejected=sum(counts["reasons"].values()),
        rejected_by_reason=dict(sorted(counts["reasons"].items())), rejected_examples=counts["examples"],
        tokens_written=counts["tokens"], answer_tokens_written=counts["answer_tokens"],
        shards=sorted(counts["shards"]), seconds=round(seconds, 3),
        rows_plain=counts["preview_tokens"].get("-1", 0),
        preview_tokens={k: v for k, v in sorted(counts["preview_tokens"].items(), key=lambda kv: int(kv[0]))
                        if k != "-1"},
        safety_mix=mix, tokenizer=_tokenizer_identity(cfg), config=cfg.to_dict())


def _tokenizer_identity(cfg: LookaheadConfig) -> dict[str, Any] | None:
    if not cfg.data.tokenize and cfg.preview.mode != "real":
        return None
    from lookahead_ray.modeling import tokenizer_for, tokenizer_identity

    return tokenizer_identity(tokenizer_for(cfg.model), cfg.model.tokenizer_source())


def check_accounting(counts: dict[str, Any], files: list[str], rejected: int) -> None:
    """Rows read from each file (counted by the reader) must each arrive at the sink exactly once, and each be
    written or rejected: a dropped or duplicated block fails the run instead of changing the data."""
    for path in files:
        if counts["declared"].get(path, 0) != counts["arrived"].get(path, 0) or path not in counts["declared"]:
            raise RuntimeError(f"row accounting broken for {path}: the reader read {counts['declared'].get(path)} "
                               f"rows, {counts['arrived'].get(path, 0)} arrived at the writer")
    if counts["read"] != counts["written"] + rejected:  # the transform must keep one row per input row
        raise RuntimeError(f"row accounting broken: read {counts['read']} != written {counts['written']} "
                           f"+ rejected {rejected}")
