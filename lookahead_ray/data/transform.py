"""The per-batch preparation transform: validate -> preview -> tokenize, one output row per input row.

A callable class over READ_SCHEMA Arrow tables (see ``record_files``). Ray Data runs it in an actor pool
(``data.py``: the tokenizer is loaded once per actor); the single-process training path calls it directly.
No Ray imports here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.data.preview import AnswerPreviewer, keeps_plain, preview_records
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
        self.scorer = None
        if self.cfg.preview.adaptive_nll_threshold is not None:
            from lookahead_ray.data.adaptive import SeedOpeningScorer

            self.opening_encoder = self.encoder or ExampleTokenizer(tokenizer, self.cfg.tokenization, self.schema)
            self.scorer = SeedOpeningScorer.for_config(self.cfg, tokenizer)

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
        plain, lengths = self._preview_plan([files[i] for i in good], [rows[i] for i in good], parsed)
        previewed = preview_records(parsed, self.cfg.preview, self.schema, self.previewer, plain, lengths)
        columns: dict[str, list] = {"source_file": files, "source_row": rows,
                                    "preview_tokens": self._preview_tokens(good, len(rows), plain, lengths)}
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

    def _preview_plan(self, files: list[str], rows: list[int], records: list[dict]) -> tuple[list[bool], list[int] | None]:
        """Which records keep their plain prompt (mixed preview: keyed by file name and row, not by batch), and
        with adaptive m how many answer tokens each previews."""
        preview = self.cfg.preview
        plain = [keeps_plain(f"{os.path.basename(f)}:{r}", preview.mix_plain_share, preview.mix_seed)
                 for f, r in zip(files, rows, strict=True)]
        if self.scorer is None or preview.mode != "real" or not records:
            return plain, None
        from lookahead_ray.data.adaptive import adaptive_preview_length

        answers = [self.schema.extract(r).answer for r in records]
        examples = self.opening_encoder.encode_many(records, answers)
        scorable = [i for i, e in enumerate(examples) if not isinstance(e, RowError)]
        nll = dict(zip(scorable, self.scorer.opening_nll([examples[i] for i in scorable], preview.num_answer_tokens),
                       strict=True))
        # A row the tokenizer rejects is rejected again (and counted) below; its preview length does not matter.
        lengths = [adaptive_preview_length(nll[i], preview.num_answer_tokens, preview.adaptive_nll_threshold)
                   if i in nll else preview.num_answer_tokens for i in range(len(records))]
        return plain, lengths

    def _preview_tokens(self, good: list[int], rows: int, plain: list[bool], lengths: list[int] | None) -> list[int]:
        """Per row: answer tokens previewed in its prompt (real mode), 0 for a virtual preview, -1 for a plain prompt
        (vanilla mode, the plain share of a mixed preview, adaptive m = 0, rejected rows)."""
        mode, m = self.cfg.preview.mode, self.cfg.preview.num_answer_tokens
        out = [-1] * rows
        for j, i in enumerate(good):
            n = m if lengths is None else lengths[j]
            if mode != "vanilla" and not plain[j] and not (lengths is not None and n == 0):
                out[i] = n if mode == "real" else 0
        return out

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
             "labels": pa.list_(pa.int32()), "source_row": pa.int64(), "truncated": pa.bool_(),
             "preview_tokens": pa.int32()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in columns.items()})
