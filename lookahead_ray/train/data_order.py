"""Which examples each worker trains on, in which order: seeded, reshuffled every epoch, exactly resumable.

``prepare``'s shards (in a local directory or an object store) are copied once per node into the node-local
cache as Arrow IPC files, with the canonical order of their rows (input file, then row), so the order does not
depend on how Ray scheduled the writes and no node reads another's disk. Every worker memory-maps them (the
pages are shared by the workers of a node) and derives its micro-batches from a
permutation seeded by ``(train.seed, epoch)``: the same on every worker, in every restart. A checkpoint
records the micro-batches consumed in the current epoch, so a resumed run continues with the very next
batch instead of replaying or skipping any.

With ``train.packing`` the examples of the epoch's permutation are packed into sequences of whole examples of at
most ``tokenization.max_seq_len`` tokens (:func:`pack`, deterministic in the permutation): a micro-batch is
``micro_batch_size`` such sequences, and the checkpoint's position counts micro-batches of them, so packing is as
seeded and as resumable as padding. With ``train.group_by_length`` the permutation is reordered so that a
micro-batch holds examples of similar length (:func:`group_by_length`). :func:`epoch_plan` gives a rank's
micro-batches in every case, each a list of sequences (arrays of row indices; one row each without packing).
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

    def lengths(self) -> np.ndarray:
        """Every example's token count, by logical row index (read from the list offsets: no token is loaded)."""
        physical = np.concatenate([np.diff(np.asarray(b.column("input_ids").offsets)) for b in self.batches])
        return physical if self.order is None else physical[np.asarray(self.order)]

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


GROUP_BY_LENGTH_MEGA_BATCH = 64
"""Micro-batches per sorted group: long enough to pair similar lengths, short enough to keep the order random."""


PACKING_CHUNK = 1024
"""Examples sorted together (longest first) before they are packed: long ones then find short ones to fill up."""
PACKING_OPEN_SEQUENCES = 256
"""Sequences that stay open for more examples; with more open, the fullest is closed."""


def pack(order: np.ndarray, lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """``order`` packed into sequences of whole examples of at most ``capacity`` tokens (an example is never split:
    prepare truncated every example to ``capacity`` already). Deterministic in ``order``.

    Best fit, decreasing, in chunks of the permutation: each chunk of ``PACKING_CHUNK`` examples is sorted longest
    first, and each example goes into the open sequence it fills best, else opens one: a long example then
    finds short ones to fill its sequence, which first fit in permutation order leaves empty more often
    (``benchmarks/train_throughput.py --layouts`` measures the padding that remains)."""
    sizes_all = np.minimum(lengths, capacity)
    room = np.empty(0, dtype=np.int64)  # free tokens of each open sequence
    members: list[list[int]] = []
    sequences: list[np.ndarray] = []
    for start in range(0, len(order), PACKING_CHUNK):
        chunk = order[start:start + PACKING_CHUNK]
        chunk = chunk[np.argsort(-sizes_all[chunk], kind="stable")]
        for example, size in zip(chunk.tolist(), sizes_all[chunk].tolist(), strict=True):
            fits = np.flatnonzero(room >= size)
            if len(fits):
                best = fits[np.argmin(room[fits])]
                room[best] -= size
                members[best].append(example)
                continue
            if len(members) == PACKING_OPEN_SEQUENCES:
                fullest = int(np.argmin(room))
                sequences.append(np.asarray(members.pop(fullest), dtype=np.int64))
                room = np.delete(room, fullest)
            room = np.append(room, capacity - size)
            members.append([example])
    return sequences + [np.asarray(m, dtype=np.int64) for m in members]


def group_by_length(order: np.ndarray, lengths: np.ndarray, micro_batch_size: int, seed: int,
                    epoch: int) -> np.ndarray:
    """``order`` reordered so that each run of ``micro_batch_size`` rows has similar lengths: sorted (longest first)
    within groups of ``GROUP_BY_LENGTH_MEGA_BATCH`` micro-batches, then the micro-batches shuffled (seeded)."""
    group = GROUP_BY_LENGTH_MEGA_BATCH * micro_batch_size
    chunks = []
    for start in range(0, len(order), group):
        part = order[start:start + group]
        part = part[np.argsort(-lengths[part], kind="stable")]
        chunks += [part[i:i + micro_batch_size] for i in range(0, len(part), micro_batch_size)]
    shuffled = np.random.default_rng([seed, epoch, 1]).permutation(len(chunks))
    return np.concatenate([chunks[i] for i in shuffled]) if chunks else order


def epoch_plan(lengths: np.ndarray | None, num_rows: int, epoch: int, seed: int, rank: int, world_size: int,
               micro_batch_size: int, packing_capacity: int | None = None,
               by_length: bool = False) -> list[list[np.ndarray]]:
    """This rank's micro-batches of ``epoch``, each a list of sequences of row indices.

    Unpacked: :func:`epoch_batches` (each row its own sequence; ``by_length`` reorders the permutation first).
    Packed (``packing_capacity`` tokens a sequence): the permutation packed into sequences, dealt round-robin to
    the ranks, ``micro_batch_size`` sequences a micro-batch; every rank gets the same number (the tail is
    dropped)."""
    if packing_capacity is None and not by_length:
        return [_one_row_each(batch) for batch in epoch_batches(num_rows, epoch, seed, rank, world_size,
                                                                micro_batch_size)]
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    if packing_capacity is None:
        order = group_by_length(order, lengths, micro_batch_size * world_size, seed, epoch)
        per_rank = (num_rows // world_size) // micro_batch_size * micro_batch_size
        mine = order[rank::world_size][:per_rank]
        return [_one_row_each(mine[i:i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
    sequences = pack(order, lengths, packing_capacity)
    sequences = [sequences[i] for i in np.random.default_rng([seed, epoch, 2]).permutation(len(sequences))]
    per_rank = (len(sequences) // world_size) // micro_batch_size * micro_batch_size
    mine = sequences[rank::world_size][:per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def _one_row_each(indices: np.ndarray) -> list[np.ndarray]:
    return [indices[i:i + 1] for i in range(len(indices))]


def micro_batches_per_epoch(lengths: np.ndarray, num_rows: int, epochs: int, seed: int, world_size: int,
                            micro_batch_size: int, packing_capacity: int) -> list[int]:
    """How many micro-batches each rank gets in each of ``epochs`` packed epochs (the step count follows them)."""
    return [len(epoch_plan(lengths, num_rows, epoch, seed, 0, world_size, micro_batch_size, packing_capacity))
            for epoch in range(epochs)]


def chain(digest: str, indices: Any) -> str:
    """The running hash of every batch trained so far: equal for two runs exactly when they saw the same
    batches in the same order (a resumed run restores it from the checkpoint)."""
    return hashlib.sha256(digest.encode() + np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
