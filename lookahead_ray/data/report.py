"""The row report of a ``prepare`` run (``prepare_report.json``): how many rows were read, written, truncated
and rejected by reason, and with which tokenizer. No Ray imports: the single-process path writes it too."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_NAME = "prepare_report.json"


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
    rows_plain: int = 0
    """Written rows whose prompt is plain: vanilla mode, a mixed preview's plain share, adaptive m = 0."""
    preview_tokens: dict[str, int] = field(default_factory=dict)
    """Written previewed rows by answer tokens previewed (real mode; "0" for virtual)."""
    safety_mix: dict[str, Any] | None = None
    """data.safety_mix: the safety demonstrations mixed in (files, available, drawn, written, rejected, share)."""
    tokenizer: dict[str, Any] | None = None
    """The tokenizer's identity (``modeling.tokenizer_identity``) when rows were tokenized or previewed by tokens."""
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected_by_reason.items())) or "none"
        return (f"prepare: read {self.rows_read} rows from {len(self.input_files)} file(s), wrote {self.rows_written} "
                f"in {len(self.shards)} shard(s), truncated {self.rows_truncated}, rejected {self.rows_rejected} "
                f"({reasons}) in {self.seconds:.1f}s -> {self.output_dir}" + self._mix_summary())

    def _mix_summary(self) -> str:
        parts = []
        if self.safety_mix:
            parts.append(f"safety demonstrations: {self.safety_mix['written']} of the rows written "
                         f"({100 * self.safety_mix['share_written']:.1f}%, {self.safety_mix['available']} available)")
        if self.rows_plain and self.preview_tokens or len(self.preview_tokens) > 1:
            lengths = ", ".join(f"{n} tokens: {count}" for n, count in self.preview_tokens.items())
            parts.append(f"plain prompts: {self.rows_plain}, previewed: {sum(self.preview_tokens.values())} ({lengths})")
        return "; " + "; ".join(parts) if parts else ""


def read_report(output_dir: str | Path) -> dict[str, Any]:
    """The report of the ``prepare`` output ``output_dir`` (a local path or a URI)."""
    from lookahead_ray import storage

    return json.loads(storage.read_text(storage.join(str(output_dir), REPORT_NAME)))


def prepared_rows(output_dir: str | Path) -> int | None:
    """Rows written by the ``prepare`` run in ``output_dir`` (None when it has no report)."""
    from lookahead_ray import storage

    return read_report(output_dir)["rows_written"] if storage.is_file(storage.join(str(output_dir), REPORT_NAME)) \
        else None
