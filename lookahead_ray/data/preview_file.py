"""The drop-in ``lookahead-ray preview`` command: the preview over one file, byte-compatible with the reference.

Output matches zjunlp/LookAheadTuning ``main.py`` byte for byte on the same input and tokenizer: JSONL is
``json.dumps(item)`` per line, JSON is ``json.dump(items, ensure_ascii=False, indent=4)``, and key order is
kept. Unlike the reference it streams (memory does not grow with the file for JSONL and Parquet), can spread
chunks over worker processes, writes atomically and names file, line and field in every error.
"""

from __future__ import annotations

import io
import json
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.data.preview import AnswerPreviewer, preview_records
from lookahead_ray.data.readers import UTF8_BOM, open_data
from lookahead_ray.data.records import RecordSchema
from lookahead_ray.errors import ConfigError, RowError
from lookahead_ray.storage import atomic_file

CHUNK_ROWS = 4096


@dataclass
class PreviewFileStats:
    rows: int
    input_file: str
    output_file: str


def _read_jsonl_chunks(path: str) -> Iterator[tuple[int, list[bytes]]]:
    """(first line number, raw lines) chunks; blank lines are skipped as the reference does."""
    chunk: list[bytes] = []
    lines: list[int] = []
    with open_data(path) as f:
        for number, line in enumerate(f, 1):
            if number == 1:
                line = line.removeprefix(UTF8_BOM)  # a byte order mark is not part of the first record
            if not line.strip():
                continue
            chunk.append(line)
            lines.append(number)
            if len(chunk) == CHUNK_ROWS:
                yield lines, chunk
                chunk, lines = [], []
    if chunk:
        yield lines, chunk


def _parse_jsonl(path: str, lines: list[int], raw: list[bytes]) -> list[Any]:
    records = []
    for number, line in zip(lines, raw, strict=True):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError("invalid_utf8", None, str(exc), path, number) from None
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise RowError("invalid_json", None, str(exc), path, number) from None
    return records


def _read_json_chunks(path: str) -> Iterator[tuple[list[int], list[Any]]]:
    try:
        with io.TextIOWrapper(open_data(path), encoding="utf-8-sig") as f:  # a byte order mark is accepted
            data = json.load(f)
    except UnicodeDecodeError as exc:
        raise RowError("invalid_utf8", None, str(exc), path, None) from None
    except json.JSONDecodeError as exc:
        raise RowError("invalid_json", None, str(exc), path, exc.lineno) from None
    if not isinstance(data, list):
        raise RowError("not_a_list", None, f"a JSON input must hold a list of records, got {type(data).__name__}",
                       path, None)
    for start in range(0, len(data), CHUNK_ROWS):
        yield list(range(start + 1, start + 1 + len(data[start:start + CHUNK_ROWS]))), data[start:start + CHUNK_ROWS]


def _read_parquet_chunks(path: str) -> Iterator[tuple[list[int], list[Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:  # truncated or not Parquet: the whole file is unreadable
        raise RowError("unreadable_file", None, f"not a readable Parquet file ({exc})", path, None) from None
    row = 1
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
        records = batch.to_pylist()
        yield list(range(row, row + len(records))), records
        row += len(records)


class _ChunkWorker:
    """Previews and serialises one chunk; one per process, holding the tokenizer."""

    def __init__(self, cfg: LookaheadConfig, input_format: str, output_format: str, path: str, tokenizer: Any):
        self.cfg, self.input_format, self.output_format, self.path = cfg, input_format, output_format, path
        self.schema = RecordSchema(cfg.records)
        self.previewer = None
        if cfg.preview.mode == "real":
            self.previewer = AnswerPreviewer(tokenizer, cfg.preview.num_answer_tokens, cfg.preview.exact_span)

    def __call__(self, chunk: tuple[list[int], list[Any]]) -> tuple[int, str | list[dict]]:
        lines, items = chunk
        records = _parse_jsonl(self.path, lines, items) if self.input_format == "jsonl" else items
        try:
            out = preview_records(records, self.cfg.preview, self.schema, self.previewer)
        except RowError as exc:
            raise exc.at(self.path, lines[exc.row]) from None
        if self.output_format == "jsonl":
            return len(out), "".join(json.dumps(item) + "\n" for item in out)
        if self.output_format == "json":
            # Items of json.dump(list, indent=4) sit one level deep: indent every line of each item by 4 more.
            return len(out), ",\n".join("    " + json.dumps(item, ensure_ascii=False, indent=4).replace("\n", "\n    ")
                                         for item in out)
        return len(out), (self.path, lines, out)


_worker: _ChunkWorker | None = None


def _init_worker(*args: Any) -> None:
    global _worker
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one Rust thread per process: the processes are the parallelism
    _worker = _ChunkWorker(*args)


def _run_chunk(chunk: tuple[list[int], list[Any]]) -> tuple[int, str | list[dict]]:
    assert _worker is not None
    return _worker(chunk)


AUTO_WORKERS_MIN_BYTES = 16 * 2**20


def default_workers(input_file: str) -> int:
    if storage.size(input_file) < AUTO_WORKERS_MIN_BYTES:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_preview_file(cfg: LookaheadConfig, input_file: str, output_file: str, input_format: str,
                     output_format: str, workers: int | None = None, tokenizer: Any = None) -> PreviewFileStats:
    """Preview every record of ``input_file`` into ``output_file``.

    Args:
        cfg: preview, records and model (tokenizer) settings.
        input_format / output_format: "jsonl", "json" or "parquet".
        workers: processes to spread chunks over (order is kept); 1 runs in this process; None: one per
            available core for inputs over AUTO_WORKERS_MIN_BYTES, else 1 (a pool's start-up costs more than
            it saves on a small file).
        tokenizer: an already loaded tokenizer (real mode); by default ``cfg.model.tokenizer`` is loaded.

    Raises:
        RowError: a bad row, naming file, line (JSONL) or 1-based row (JSON/Parquet) and field.
        OSError: unreadable input or unwritable output.
    """
    if not storage.is_file(input_file):
        raise FileNotFoundError(f"input file not found: {input_file}")
    if cfg.preview.mix_plain_share or cfg.preview.adaptive_nll_threshold is not None:
        raise ConfigError("preview.mix_plain_share and preview.adaptive_nll_threshold apply in `prepare` and `train` "
                          "(they need row keys and the seed model), not in `preview`; unset them here")
    if storage.absolute(output_file) == storage.absolute(input_file):
        raise ConfigError(f"--output_file: {output_file} is the input file; write the preview somewhere else")
    if storage.is_dir(output_file):
        raise ConfigError(f"--output_file: {output_file} is a directory; name the file to write")
    readers = {"jsonl": _read_jsonl_chunks, "json": _read_json_chunks, "parquet": _read_parquet_chunks}
    chunks = readers[input_format](input_file)
    if cfg.preview.mode == "real" and tokenizer is None:
        from lookahead_ray.modeling import tokenizer_for

        # Loaded once here and pickled to any worker processes: loading a SentencePiece model converts it
        # to a fast tokenizer, which takes seconds and would otherwise be repeated in every process.
        tokenizer = tokenizer_for(cfg.model)
    args = (cfg, input_format, output_format, input_file, tokenizer)
    if workers is None:
        workers = default_workers(input_file)
    with atomic_file(output_file, binary=output_format == "parquet") as out:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=args)
            results = _ordered_bounded_map(pool, chunks, window=2 * workers)
        else:
            pool, results = None, map(_ChunkWorker(*args), chunks)
        try:
            rows = _write(out, output_format, results)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return PreviewFileStats(rows, input_file, output_file)


def _ordered_bounded_map(pool: ProcessPoolExecutor, chunks: Iterator[Any], window: int) -> Iterator[Any]:
    """Results in input order with at most ``window`` chunks in flight (Executor.map would read the whole
    input ahead and hold it in memory)."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.submit(_run_chunk, chunk))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write(f: IO, output_format: str, results: Iterator[Any]) -> int:
    rows = 0
    if output_format == "jsonl":
        for count, text in results:
            f.write(text)
            rows += count
    elif output_format == "json":
        for count, text in results:
            if count:
                f.write(",\n" + text if rows else "[\n" + text)
                rows += count
        f.write("\n]" if rows else "[]")
    else:
        rows = _write_parquet(f, results)
    return rows


def _write_parquet(f: IO, results: Iterator[Any]) -> int:
    """One Parquet file from chunks of records: every key of every row is a column (missing values null); a
    key first seen after the schema is fixed, or a value of another type, is an error naming its row."""
    import pyarrow.parquet as pq

    writer, rows = None, 0
    try:
        for count, (path, lines, records) in results:
            rows += count
            table = _records_table(path, lines, records)
            if writer is None:
                writer = pq.ParquetWriter(f, table.schema)
            _check_keys(table, writer.schema, path, lines, records)
            try:
                writer.write_table(_conform(table, writer.schema))
            except (ValueError, TypeError) as exc:  # pyarrow's ArrowInvalid / ArrowTypeError
                raise RowError("schema_mismatch", None, f"values do not fit the schema of earlier rows: {exc}",
                               path, lines[0]) from None
        if writer is None:
            raise RowError("empty_dataset", None, "parquet output needs at least one record (no schema to write)")
    finally:
        if writer is not None:
            writer.close()
    return rows


def _check_keys(table: Any, schema: Any, path: str, lines: list[int], records: list[dict]) -> None:
    extra = [name for name in table.schema.names if name not in schema.names]
    if extra:
        row = next(i for i, r in enumerate(records) if extra[0] in r)
        raise RowError("schema_mismatch", extra[0], "key absent from every earlier row: a Parquet output has one "
                       "schema (write jsonl, or give the first row every key)", path, lines[row])


def _records_table(path: str, lines: list[int], records: list[dict]) -> Any:
    import pyarrow as pa

    names = list(dict.fromkeys(key for record in records for key in record))  # every key, first-seen order
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            first = next(type(v) for v in values if v is not None)
            row = next(i for i, v in enumerate(values) if v is not None and type(v) is not first)
            raise RowError("schema_mismatch", name, f"{type(values[row]).__name__} where earlier rows hold "
                           f"{first.__name__}: {exc}", path, lines[row]) from None
    return pa.table(columns)


def _conform(table: Any, schema: Any) -> Any:
    """``table`` with the columns of ``schema``, in its order; columns it lacks are null."""
    import pyarrow as pa

    columns = {}
    for f in schema:
        column = table.column(f.name) if f.name in table.schema.names else pa.nulls(table.num_rows, f.type)
        columns[f.name] = column.cast(f.type) if column.type != f.type else column
    return pa.table(columns, schema=schema)
