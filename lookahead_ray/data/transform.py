"""The per-batch preparation transform: validate -> preview -> tokenize, one output row per input row.

A callable class over READ_SCHEMA Arrow tables (see ``record_files``). Ray Data runs it in an actor pool
(``data.py``: the tokenizer is loaded once per actor); the single-process training path calls it directly.
No Ray imports here.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.data.preview import AnswerPreviewer, preview_records
from lookahead_ray.data.readers import END_OF_FILE
from lookahead_ray.data.records import RecordSchema
from lookahead_ray.errors import RowError

TOKEN_COLUMNS = ["input_ids", "attention_mask", "labels"]


class PrepareRecords:
    """Ray Data callable class: the tokenizer is loaded once per actor, then batches stream through."""

    def __init__(self, cfg_dict: dict[str, Any], accepted_tokens_only: bool = False):
        from lookahead_ray.data.tokenization import ExampleTokenizer
        from lookahead_ray.modeling import tokenizer_for

        self.cfg = LookaheadConfig.from_dict(cfg_dict)
        # For training: drop rejected rows and keep only the token columns, in this same pass.
        self.accepted_tokens_only = accepted_tokens_only
        self.schema = RecordSchema(self.cfg.records)
        needs_tokenizer = self.cfg.data.tokenize or self.cfg.preview.mode == "real"
        tokenizer = tokenizer_for(self.cfg.model) if needs_tokenizer else None
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
            if read_error == END_OF_FILE:  # passed on to the sink's accounting, never a training example
                errors[i] = RowError(END_OF_FILE, None, "end of file")
                continue
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
        if self.accepted_tokens_only:
            keep = [i for i, e in enumerate(errors) if e is None]
            return _columns_to_table({name: [columns[name][i] for i in keep] for name in TOKEN_COLUMNS})
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
        self.schema.extract(record)  # the row rules preview applies too (records.RecordSchema)
        return record

    def _fail_or_keep(self, error: RowError) -> RowError:
        if self.cfg.data.on_error == "fail":
            raise error
        return error


def _columns_to_table(columns: dict[str, list]) -> pa.Table:
    types = {"input_ids": pa.list_(pa.int32()), "attention_mask": pa.list_(pa.int8()),
             "labels": pa.list_(pa.int32()), "source_row": pa.int64(), "truncated": pa.bool_()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in columns.items()})
