"""Ray Data datasource over the row readers of ``readers``: streaming, numbered rows of JSON text.

One read task per file (a local path or a URI, opened where the task runs), except that a JSONL file larger
than ``split_bytes`` is read as several line-aligned byte ranges, one task each (a single big file would
otherwise be read by one task while the rest of the cluster waits). Every range ends with its own end-of-file
row, and the pipeline's accounting adds a file's ranges up, so rows in = rows out still holds per file.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from lookahead_ray import storage
from lookahead_ray.data.readers import ByteWindow, RowReader, compression, file_format, line_ranges, open_data


class RecordFileDatasource(Datasource):
    """JSONL / JSON / Parquet / Arrow files as READ_SCHEMA blocks."""

    def __init__(self, paths: list[str], input_format: str = "auto", max_row_bytes: int = 1 << 20,
                 split_bytes: int = 64 << 20):
        self.paths, self.input_format, self.split_bytes = list(paths), input_format, split_bytes
        self.reader = RowReader(max_row_bytes)

    def estimate_inmemory_data_size(self) -> int:
        return sum(storage.size(p) for p in self.paths)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object | None = None) -> list[ReadTask]:
        tasks = []
        for path in self.paths:
            fmt = file_format(path, self.input_format)
            size = storage.size(path)
            splittable = fmt == "jsonl" and compression(path) is None and size > self.split_bytes
            ranges = line_ranges(path, self.split_bytes) if splittable else [(0, size, 0)]
            for start, end, lines_before in ranges:
                metadata = BlockMetadata(num_rows=None, size_bytes=end - start, exec_stats=None, input_files=(path,))
                tasks.append(ReadTask(partial(self._read, path, fmt, start, end, lines_before), metadata))
        return tasks

    def _read(self, path: str, fmt: str, start: int, end: int, lines_before: int) -> Iterator[pa.Table]:
        with open_data(path) as f:
            if fmt != "jsonl" or compression(path):  # whole files: Parquet footers, JSON lists, compressed streams
                yield from self.reader.tables(f, path, fmt)
                return
            f.seek(start)
            yield from self.reader.tables(ByteWindow(f, end - start), path, fmt, lines_before)
