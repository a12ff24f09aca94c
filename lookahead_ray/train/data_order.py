"""Which examples each worker trains on, in which order: seeded, reshuffled every epoch, exactly resumable.

``prepare``'s shards (in a local directory or an object store) are copied once per node into the node-local
cache as Arrow IPC files, with the canonical order of their rows (input file, then row), so the order does not
depend on how Ray scheduled the writes and no node reads another's disk. Every worker memory-maps them (the
pages are shared by the workers of a node) and derives its micro-batches from a
permutation seeded by ``(train.seed, epoch)``: the same on every worker, in every restart. A checkpoint
records the micro-batches consumed in the current epoch, so a resumed run continues with the very next
batch instead of replaying or skipping any.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

SORT_KEYS = [("source_file", "ascending"), ("source_row", "ascending")]
ORDER_FILE = "order.npy"


def node_token_cache(prepared_dir: str) -> str:
    """``prepared_dir``'s shards (a local path or a URI) as memory-mappable Arrow files in this node's cache.

    Built once per node and prepare run (keyed by the location and its ``prepare_report.json``, which lists the
    shards), shard by shard, so memory stays bounded by one row group; two workers of a node build it once.
    Resumes and later runs on the node reuse it.
    """
    from lookahead_ray import storage
    from lookahead_ray.data.report import REPORT_NAME

    report = storage.read_bytes(storage.join(prepared_dir, REPORT_NAME))
    key = hashlib.sha256(storage.absolute(prepared_dir).encode() + b"\0" + report).hexdigest()[:20]
    return str(storage.node_cached("tokens", f"{storage.name(prepared_dir)}-{key}",
                                   lambda staging: _convert_shards(prepared_dir, json.loads(report)["shards"], staging)))


def _convert_shards(prepared_dir: str, shards: list[str], staging: Path) -> None:
    """One Arrow IPC file per shard (token columns) and the canonical order of all rows (``ORDER_FILE``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from lookahead_ray import storage
    from lookahead_ray.data.transform import TOKEN_COLUMNS
    from lookahead_ray.errors import ConfigError

    if not shards:
        raise ConfigError(f"train.prepared_dir: {prepared_dir} holds no shards (was every row rejected?)")
    files: dict[str, int] = {}  # source file -> code: the keys cost 12 bytes a row, not a path string each
    codes, rows = [], []
    for index, shard in enumerate(sorted(shards)):
        with storage.open_input(storage.join(prepared_dir, shard), native=True) as f:
            parquet = pq.ParquetFile(f)
            schema = pa.schema([parquet.schema_arrow.field(c) for c in TOKEN_COLUMNS])
            with pa.OSFile(str(staging / f"{index:08d}.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in parquet.iter_batches(columns=["source_file", "source_row", *TOKEN_COLUMNS]):
                    writer.write_batch(batch.select(TOKEN_COLUMNS))
                    encoded = pc.dictionary_encode(batch.column("source_file"))
                    local = np.array([files.setdefault(f, len(files)) for f in encoded.dictionary.to_pylist()],
                                     dtype=np.int32)
                    codes.append(local[encoded.indices.to_numpy(zero_copy_only=False)])
                    rows.append(batch.column("source_row").to_numpy(zero_copy_only=False))
    rank = np.empty(len(files), dtype=np.int32)  # codes -> the files' sorted order
    rank[[files[f] for f in sorted(files)]] = np.arange(len(files), dtype=np.int32)
    file_rank, source_row = rank[np.concatenate(codes)], np.concatenate(rows)
    np.save(staging / ORDER_FILE, np.lexsort((source_row, file_rank)).astype(np.int64))  # stable, as sort_by


def write_token_file(table: Any, target: str) -> str:
    """``table`` (the token columns, in training order) as an Arrow IPC file, staged then renamed."""
    import pyarrow as pa

    from lookahead_ray.storage import atomic_file

    with atomic_file(target, binary=True) as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return target


class TokenStore:
    """The run's examples, memory-mapped, in canonical order: rows are taken by index without loading them.

    ``source`` is a ``prepare`` output (local path or URI: see :func:`node_token_cache`) or one Arrow file
    already in training order (the single-process path). Rows are taken from each memory-mapped record batch
    separately: Arrow's ``take`` on a table of many chunks first concatenates them, which here would copy the
    whole token data into memory for every micro-batch."""

    def __init__(self, source: str):
        import pyarrow as pa

        self.order: np.ndarray | None = None
        if source.endswith(".arrow"):
            files = [source]
        else:
            directory = Path(node_token_cache(source))
            files = sorted(directory.glob("*.arrow"), key=lambda f: int(f.stem))  # the order ORDER_FILE indexes
            self.order = np.load(directory / ORDER_FILE, mmap_mode="r")
        self.batches = []
        for file in files:
            reader = pa.ipc.open_file(pa.memory_map(str(file), "r"))
            self.batches += [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batch(self, indices: np.ndarray) -> dict[str, list]:
        physical = np.asarray(indices, dtype=np.int64)
        if self.order is not None:
            physical = np.asarray(self.order[physical])
        which = np.searchsorted(self.starts, physical, side="right") - 1
        columns = self.batches[0].schema.names
        out: dict[str, list] = {name: [None] * len(physical) for name in columns}
        for part in np.unique(which):
            positions = np.nonzero(which == part)[0]
            taken = self.batches[part].take(physical[positions] - self.starts[part]).to_pydict()
            for name in columns:
                for position, value in zip(positions, taken[name], strict=True):
                    out[name][position] = value
        return out


def epoch_batches(num_rows: int, epoch: int, seed: int, rank: int, world_size: int,
                  micro_batch_size: int) -> list[np.ndarray]:
    """This rank's micro-batches (row indices) of ``epoch``: a permutation seeded by (seed, epoch), dealt
    round-robin to the ranks; every rank gets the same number of whole micro-batches (the tail is dropped)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    per_rank = (num_rows // world_size) // micro_batch_size * micro_batch_size
    mine = order[rank::world_size][:per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def chain(digest: str, indices: Any) -> str:
    """The running hash of every batch trained so far: equal for two runs exactly when they saw the same
    batches in the same order (a resumed run restores it from the checkpoint)."""
    return hashlib.sha256(digest.encode() + np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
