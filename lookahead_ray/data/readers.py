"""Input files as numbered rows: path expansion and per-format row readers (pyarrow only, no Ray).

Every row comes out as ``(source_row, record, read_error)``: ``record`` is the row as JSON text (records of
different shapes cannot share one Arrow schema), ``source_row`` is the 1-based line (JSONL) or row (JSON list,
Parquet, Arrow) number, and a row that cannot be decoded carries ``read_error`` instead of being dropped, so
the transform can fail on it or count it. The Ray Data datasource (``sources.py``) and the single-process
training path both read through here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from typing import IO

import pyarrow as pa

from lookahead_ray import storage
from lookahead_ray.config import DataConfig
from lookahead_ray.errors import ConfigError, RowError

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSION_BY_SUFFIX = {".gz": "gzip", ".zst": "zstd"}
"""JSONL and JSON files may be compressed (``rows.jsonl.gz``, ``rows.json.zst``): read as one stream each."""
UTF8_BOM = b"\xef\xbb\xbf"
READ_SCHEMA = pa.schema([("source_file", pa.string()), ("source_row", pa.int64()),
                         ("record", pa.large_string()), ("read_error", pa.string())])
BLOCK_ROWS = 8192
END_OF_FILE = "end_of_file"
"""``read_error`` of the row each file ends with: not a record, its ``source_row`` is the number of rows read
from the file. It travels with the data to the sink, which checks every file's rows arrived exactly once."""
_READ_BYTES = 4 << 20


def _hf_arrow_files(directory: str, split: str | None) -> list[str]:
    """Arrow files of a `datasets` save_to_disk directory (a Dataset, or one split of a DatasetDict)."""
    if storage.is_file(storage.join(directory, "dataset_dict.json")):
        splits = json.loads(storage.read_text(storage.join(directory, "dataset_dict.json")))["splits"]
        if split is None:
            if len(splits) != 1:
                raise ConfigError(f"data.hf_split: {directory} is a DatasetDict with splits {splits}; pick one")
            split = splits[0]
        if split not in splits:
            raise ConfigError(f"data.hf_split: {directory} has no split {split!r} (splits: {splits})")
        directory = storage.join(directory, split)
    state = json.loads(storage.read_text(storage.join(directory, "state.json")))
    return [storage.join(directory, f["filename"]) for f in state["_data_files"]]


def expand_inputs(cfg: DataConfig) -> list[str]:
    """Resolve files, globs and directories (local paths or URIs) to a sorted, de-duplicated list of data files.

    Raises:
        FileNotFoundError: an input matches nothing.
        ConfigError: no inputs, or a file of an unknown format.
    """
    if not cfg.inputs:
        raise ConfigError("data.inputs is empty: give at least one file, glob or directory")
    files: list[str] = []
    for spec in cfg.inputs:
        spec = storage.absolute(spec)
        if storage.is_dir(spec) and (cfg.input_format == "hf" or storage.is_file(storage.join(spec, "state.json"))
                                     or storage.is_file(storage.join(spec, "dataset_dict.json"))):
            files += _hf_arrow_files(spec, cfg.hf_split)
        elif storage.is_dir(spec):
            # Hidden files and folders are skipped: .ipynb_checkpoints/*-checkpoint.jsonl would duplicate rows.
            visible = [f for f in storage.list_files(spec)
                       if not any(part.startswith(".") for part in PurePosixPath(f[len(spec):]).parts)]
            found = [f for f in visible if data_suffix(f) in FORMAT_BY_SUFFIX]
            _not_read([f for f in visible if f not in found], f"data.inputs: directory {spec}: files of no known "
                      "type are not read", cfg.on_error)
            if not found:
                raise FileNotFoundError(f"data.inputs: directory {spec} holds no .jsonl/.json/.parquet files "
                                        "(nor .jsonl.gz / .json.gz / .jsonl.zst)")
            files += found
        elif storage.is_file(spec):
            files.append(spec)
        else:
            matches = storage.glob(spec)
            if not matches:
                raise FileNotFoundError(f"data.inputs: {spec} does not exist and matches no file")
            files += matches
    for f in files:
        if cfg.input_format == "auto" and data_suffix(f) not in FORMAT_BY_SUFFIX:
            raise ConfigError(f"data.input_format: {f} has an unknown file type (known: .jsonl, .json, .parquet, "
                              ".arrow, and .jsonl / .json compressed as .gz or .zst); set data.input_format")
        if compression(f) and file_format(f, cfg.input_format) not in ("jsonl", "json"):
            raise ConfigError(f"data.inputs: {f}: only JSONL and JSON files are read compressed")
    files = list(dict.fromkeys(files))
    _not_read([f for f in files if not storage.is_uri(f) and storage.size(f) == 0], "data.inputs: empty file(s), no "
              "rows", cfg.on_error)
    return files


def _not_read(paths: list[str], what: str, on_error: str) -> None:
    """Inputs that give no rows are named: a warning, or with ``data.on_error: fail`` an error."""
    if not paths:
        return
    line = f"{what}: {', '.join(paths[:5])}{f' and {len(paths) - 5} more' if len(paths) > 5 else ''}"
    if on_error == "fail":
        raise ConfigError(f"{line} (data.on_error is fail; remove them, or set data.on_error=skip to go on)")
    logging.getLogger(__name__).warning("%s", line)


def compression(path: str) -> str | None:
    """The codec of a compressed JSONL / JSON file (by its last suffix), else None."""
    return COMPRESSION_BY_SUFFIX.get(PurePosixPath(path).suffix)


def data_suffix(path: str) -> str:
    """The suffix that names the format: ``.jsonl`` for ``rows.jsonl.gz``."""
    pure = PurePosixPath(path)
    return pure.with_suffix("").suffix if pure.suffix in COMPRESSION_BY_SUFFIX else pure.suffix


def file_format(path: str, input_format: str) -> str:
    if input_format == "hf":
        return "arrow"
    return input_format if input_format != "auto" else FORMAT_BY_SUFFIX[data_suffix(path)]


def open_data(path: str) -> IO[bytes]:
    """A data file's bytes, decompressed when its name says it is compressed (streaming: never whole in memory)."""
    import io

    f = storage.open_input(path)
    codec = compression(path)
    return f if codec is None else io.BufferedReader(pa.input_stream(f, compression=codec))


def line_ranges(path: str, target_bytes: int) -> list[tuple[int, int, int]]:
    """Split a JSONL file into byte ranges of about ``target_bytes`` that each end just after a newline (the
    last at the end of the file), with the number of lines before each, so each range can be read by its own
    task and its rows keep their line numbers. One pass over the file, counting newlines."""
    size = storage.size(path)
    cuts: list[tuple[int, int]] = []  # (offset just after a newline, lines before that offset)
    lines = position = 0
    want = target_bytes
    with storage.open_input(path) as f:
        while chunk := f.read(_READ_BYTES):
            done = 0
            while want < position + len(chunk):
                newline = chunk.find(b"\n", max(want - position, done))
                if newline < 0:
                    break  # the cut moves to the first newline of a later chunk
                lines += chunk.count(b"\n", done, newline + 1)
                done = newline + 1
                cuts.append((position + done, lines))
                want = position + done + target_bytes
            lines += chunk.count(b"\n", done)
            position += len(chunk)
    cuts = [cut for cut in cuts if cut[0] < size]
    starts = [(0, 0), *cuts]
    ends = [offset for offset, _ in cuts] + [size]
    return [(start, end, before) for (start, before), end in zip(starts, ends, strict=True)]


class ByteWindow:
    """A read-only view of ``length`` bytes of an open file from its current position."""

    def __init__(self, f: IO[bytes], length: int):
        self.f, self.left = f, length

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size) if size > 0 else b""
        self.left -= len(data)
        return data


class RowReader:
    """Reads one file of any supported format as numbered rows; rows over ``max_row_bytes`` become errors."""

    def __init__(self, max_row_bytes: int):
        self.max_row_bytes = max_row_bytes

    def rows(self, f: IO[bytes], path: str, fmt: str, lines_before: int = 0) -> Iterator[tuple]:
        """Numbered rows; ``lines_before``: for a JSONL byte range, the lines of the file before it."""
        if fmt == "jsonl":
            return self._jsonl_rows(f, path, lines_before)
        return {"json": self._json_rows, "parquet": self._parquet_rows, "arrow": self._arrow_rows}[fmt](f, path)

    def tables(self, f: IO[bytes], path: str, fmt: str, lines_before: int = 0) -> Iterator[pa.Table]:
        """The rows in blocks of READ_SCHEMA tables, then an end-of-file row counting them (see END_OF_FILE;
        the rows of a file read in several ranges are the sum of its ranges' counts)."""
        block: list[tuple] = []
        count = 0
        for row in self.rows(f, path, fmt, lines_before):
            block.append(row)
            count += 1
            if len(block) == BLOCK_ROWS:
                yield rows_to_table(path, block)
                block = []
        block.append((count, None, END_OF_FILE))
        yield rows_to_table(path, block)

    def _too_large(self, size: int) -> str:
        return f"row_too_large: {size} bytes > data.max_row_bytes {self.max_row_bytes}"

    def _jsonl_rows(self, f: IO[bytes], path: str, lines_before: int = 0) -> Iterator[tuple]:
        """Lines as rows. A line is held only up to ``max_row_bytes``; past that its bytes are just counted to
        its newline, so a huge file without newlines costs bounded memory and is one row_too_large row."""
        carry, carry_size, number = bytearray(), 0, lines_before
        first = lines_before == 0
        while chunk := f.read(_READ_BYTES):
            if first:  # a UTF-8 byte order mark (Windows editors write one) is not part of the first record
                chunk, first = chunk.removeprefix(UTF8_BOM), False
            pieces = chunk.split(b"\n")  # pieces[0] continues the carried line; pieces[-1] goes on in the next chunk
            for i, piece in enumerate(pieces[:-1]):
                size = carry_size + len(piece) if i == 0 else len(piece)
                line = (bytes(carry) + piece if size <= self.max_row_bytes else b"") if i == 0 else piece
                number += 1
                yield from self._jsonl_line(number, line, size)
            if len(pieces) > 1:
                carry.clear()
                carry_size = 0
            carry_size += len(pieces[-1])
            if carry_size <= self.max_row_bytes:
                carry += pieces[-1]
            else:
                carry.clear()
        if carry_size:
            yield from self._jsonl_line(number + 1, bytes(carry), carry_size)

    def _jsonl_line(self, number: int, line: bytes, size: int) -> Iterator[tuple]:
        if size > self.max_row_bytes:
            yield number, None, self._too_large(size)
        elif not line.strip():
            return  # blank lines are not rows (as in the reference)
        else:
            try:
                yield number, line.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                yield number, None, f"invalid_utf8: {exc}"

    def _json_rows(self, f: IO[bytes], path: str) -> Iterator[tuple]:
        try:
            data = json.loads(f.read().decode("utf-8-sig"))  # a byte order mark is accepted
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            # A JSON file is one value: a syntax error makes the whole file unreadable, not one row.
            raise RowError("invalid_json", None, f"not valid UTF-8 JSON: {exc}", path, None) from exc
        if not isinstance(data, list):
            raise RowError("not_a_list", None, f"a JSON input must hold a list of records, got {type(data).__name__}",
                           path, None)
        for number, item in enumerate(data, 1):
            yield self._sized_row(number, json.dumps(item, ensure_ascii=False))

    def _parquet_rows(self, f: IO[bytes], path: str) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as exc:  # truncated or not Parquet: the whole file is unreadable
            raise RowError("unreadable_file", None, f"not a readable Parquet file ({exc})", path, None) from None
        yield from self._table_rows(parquet.iter_batches(batch_size=BLOCK_ROWS))

    def _arrow_rows(self, f: IO[bytes], path: str) -> Iterator[tuple]:
        yield from self._table_rows(pa.ipc.open_stream(f))  # `datasets` writes Arrow IPC streams

    def _table_rows(self, batches: Iterable[pa.RecordBatch]) -> Iterator[tuple]:
        number = 0
        for batch in batches:
            for item in batch.to_pylist():
                number += 1
                yield self._sized_row(number, json.dumps(item, ensure_ascii=False, default=str))

    def _sized_row(self, number: int, text: str) -> tuple:
        """A decoded row, or row_too_large when its UTF-8 size (bytes, as for JSONL) exceeds the limit."""
        if len(text) > self.max_row_bytes:  # characters are a lower bound of bytes
            return number, None, self._too_large(len(text.encode("utf-8")))
        if 4 * len(text) > self.max_row_bytes:  # only then can multi-byte characters push it over
            size = len(text.encode("utf-8"))
            if size > self.max_row_bytes:
                return number, None, self._too_large(size)
        return number, text, None


def rows_to_table(path: str, rows: list[tuple]) -> pa.Table:
    numbers, records, errors = zip(*rows, strict=True)
    return pa.Table.from_arrays([pa.array([path] * len(rows), pa.string()), pa.array(numbers, pa.int64()),
                                 pa.array(records, pa.large_string()), pa.array(errors, pa.string())],
                                schema=READ_SCHEMA)
