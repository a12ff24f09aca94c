"""Which examples each worker trains on, in which order: seeded, reshuffled every epoch, exactly resumable.

``prepare``'s shards are gathered once per run into one Arrow IPC file in the run directory, rows in a
canonical order (input file, then row), so the order does not depend on how Ray scheduled the writes. Every
worker memory-maps it (the pages are shared by the workers of a node) and derives its micro-batches from a
permutation seeded by ``(train.seed, epoch)``: the same on every worker, in every restart. A checkpoint
records the micro-batches consumed in the current epoch, so a resumed run continues with the very next
batch instead of replaying or skipping any.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

TOKEN_FILE = "tokens.arrow"
SORT_KEYS = [("source_file", "ascending"), ("source_row", "ascending")]


def build_token_file(prepared_dir: str, target: str) -> str:
    """Gather the token columns of ``prepared_dir``'s shards into ``target`` (staged, then renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lookahead_ray.data.transform import TOKEN_COLUMNS
    from lookahead_ray.errors import ConfigError

    shards = sorted(Path(prepared_dir).glob("*.parquet"))
    if not shards:
        raise ConfigError(f"train.prepared_dir: {prepared_dir} holds no shards (was every row rejected?)")
    table = pa.concat_tables([pq.read_table(s, columns=["source_file", "source_row", *TOKEN_COLUMNS]) for s in shards])
    return write_token_file(table.sort_by(SORT_KEYS).select(TOKEN_COLUMNS), target)


def write_token_file(table: Any, target: str) -> str:
    """``table`` (the token columns, in training order) as an Arrow IPC file, staged then renamed."""
    import pyarrow as pa

    from lookahead_ray.fsio import atomic_file

    with atomic_file(target, binary=True) as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return target


class TokenStore:
    """The run's examples, memory-mapped: rows are taken by index without loading the file."""

    def __init__(self, path: str):
        import pyarrow as pa

        self.table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()

    def __len__(self) -> int:
        return self.table.num_rows

    def batch(self, indices: np.ndarray) -> dict[str, list]:
        return self.table.take(indices).to_pydict()


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
