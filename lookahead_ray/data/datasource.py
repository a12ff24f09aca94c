"""Ray Data datasource over the row readers of ``record_files``: streaming, numbered rows of JSON text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from lookahead_ray.data.readers import RowReader, file_format


class RecordFileDatasource(FileBasedDatasource):
    """Streams JSONL / JSON / Parquet / Arrow files as READ_SCHEMA blocks, one read task per file."""

    def __init__(self, paths: list[str], input_format: str = "auto", max_row_bytes: int = 1 << 20):
        super().__init__(paths)
        self.input_format, self.reader = input_format, RowReader(max_row_bytes)

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        if file_format(path, self.input_format) == "parquet":  # Parquet footers need random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from self.reader.tables(f, path, file_format(path, self.input_format))
