"""Safety-data mixing (``data.safety_mix``): refusal demonstrations mixed into the fine-tuning data.

The Safety-Tuned LLaMAs recipe (Bianchi et al., 2024) and SafeInstr add a small share of (harmful request, refusal)
examples to the benign fine-tuning data. Here the prepare step draws them once the task rows are counted:
round(share / (1 - share) x task rows written) rows, seeded, without repeats, from the user's files, and prepares
them like the task rows except that they are never previewed (the model should learn to refuse without a hint).
The draw is small (a file of refusals), so it is read and transformed in the driver; its rows keep their file and
row, so the training order stays canonical. Every drawn row is written or counted as rejected.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lookahead_ray.config import DataConfig, LookaheadConfig, PreviewConfig
from lookahead_ray.data.readers import END_OF_FILE, RowReader, expand_inputs, file_format, open_data


def safety_config(cfg: LookaheadConfig) -> LookaheadConfig:
    """The config the safety rows are prepared with: no preview, the mix's record fields, no mix of their own."""
    mix = cfg.data.safety_mix
    return dataclasses.replace(cfg, preview=PreviewConfig(mode="vanilla"), records=mix.records or cfg.records,
                               data=dataclasses.replace(cfg.data, safety_mix=None))


def read_safety_rows(cfg: LookaheadConfig) -> pa.Table:
    """Every row of the safety files (READ_SCHEMA: source_file, source_row, record, read_error), in file order."""
    mix = cfg.data.safety_mix
    files = expand_inputs(DataConfig(inputs=mix.inputs, input_format=cfg.data.input_format, hf_split=cfg.data.hf_split,
                                     on_error=cfg.data.on_error))
    reader, tables = RowReader(cfg.data.max_row_bytes), []
    for file in files:
        with open_data(file) as f:
            tables += list(reader.tables(f, file, file_format(file, cfg.data.input_format)))
    table = pa.concat_tables(tables)
    return table.filter(pc.invert(pc.fill_null(pc.equal(table.column("read_error"), END_OF_FILE), False)))


def mix_safety_rows(cfg: LookaheadConfig, task_rows: int) -> tuple[pa.Table, dict[str, Any]]:
    """The drawn safety rows, prepared (one row per drawn row, rejections included, as ``PrepareRecords`` emits),
    and their accounting for the prepare report.

    Raises:
        RowError: a bad safety row with ``data.on_error: fail`` (file, row and field named).
    """
    from lookahead_ray.data.transform import PrepareRecords

    mix = cfg.data.safety_mix
    available = read_safety_rows(cfg)
    wanted = round(mix.share / (1 - mix.share) * task_rows)
    drawn = sorted(random.Random(mix.seed).sample(range(available.num_rows), min(wanted, available.num_rows)))
    prepared = PrepareRecords(safety_config(cfg).to_dict())(available.take(drawn))
    rejected = prepared.column("reject_reason").is_valid()
    written = prepared.num_rows - (pc.sum(rejected.cast(pa.int64())).as_py() or 0)
    reasons: dict[str, int] = {}
    for reason in prepared.filter(rejected).column("reject_reason").to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    report = {"inputs": list(mix.inputs), "available": available.num_rows, "wanted": wanted, "drawn": len(drawn),
              "written": written, "rejected": len(drawn) - written, "rejected_by_reason": reasons,
              "share_requested": mix.share,
              "share_written": round(written / (written + task_rows), 4) if written + task_rows else 0.0}
    return prepared, report
