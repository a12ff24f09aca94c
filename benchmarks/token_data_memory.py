"""Driver memory for a run's token data: the old single token file built on the driver vs the node cache.

Run by hand (not a test):

    python benchmarks/token_data_memory.py                     # 1.5M rows (GSM8K train x200), mean 228 tokens
    python benchmarks/token_data_memory.py --rows 200000

Data: a synthetic ``prepare`` output of the same layout (Parquet shards of ``rows_per_shard`` rows with
source_file / source_row / input_ids / attention_mask / labels, rows of the two input files spread across the
shards as Ray's write tasks spread them, and prepare_report.json). Lengths are drawn around the GSM8K recipe's
measured mean (228 tokens with the Llama-2 chat template and real preview). Each variant runs in its own process;
peak RSS is that process's ``ru_maxrss``.

Variants:
  imports            the modules the other variants import, nothing read: the floor of every peak below
  before             what the driver did at every start, resumes included: every shard's token columns
                     concatenated, sorted into canonical order and written to one Arrow file
  after-driver       what the driver does now: read the row count from prepare_report.json
  after-node-cache   what one worker per node now does once: the shards converted into memory-mappable Arrow
                     files in the node cache, shard by shard, plus the canonical order; then a micro-batch read
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "imports": """
import pyarrow as pa, pyarrow.parquet as pq
from lookahead_ray.data.report import prepared_rows
from lookahead_ray.data.transform import TOKEN_COLUMNS
from lookahead_ray.train.data_order import TokenStore
rows = 0
""",
    "before": """
import pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
from lookahead_ray.data.transform import TOKEN_COLUMNS
shards = sorted(Path(PREPARED).glob("*.parquet"))
table = pa.concat_tables([pq.read_table(s, columns=["source_file", "source_row", *TOKEN_COLUMNS]) for s in shards])
table = table.sort_by([("source_file", "ascending"), ("source_row", "ascending")]).select(TOKEN_COLUMNS)
with pa.OSFile(OUT + "/tokens.arrow", "wb") as f, pa.ipc.new_file(f, table.schema) as w:
    w.write_table(table)
rows = table.num_rows
""",
    "after-driver": """
from lookahead_ray.data.report import prepared_rows
rows = prepared_rows(PREPARED)
""",
    "after-node-cache": """
import os
os.environ["LOOKAHEAD_RAY_CACHE"] = OUT + "/cache"
from lookahead_ray.train.data_order import TokenStore, epoch_batches
store = TokenStore(PREPARED)
rows = len(store)
store.batch(epoch_batches(rows, 0, 0, 0, 1, 16)[0])
""",
}


def make_prepared(directory: Path, rows: int, rows_per_shard: int, mean_length: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    order = rng.permutation(rows)  # which input row lands in which shard: as scattered as Ray's writes
    shards = []
    for start in range(0, rows, rows_per_shard):
        ids = order[start:start + rows_per_shard]
        lengths = np.clip(rng.normal(mean_length, mean_length / 4, len(ids)).astype(np.int32), 16, 4 * mean_length)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        tokens = rng.integers(0, 32000, offsets[-1], dtype=np.int32)
        labels = np.where(rng.random(offsets[-1]) < 0.5, -100, tokens).astype(np.int32)
        table = pa.table({
            "source_file": np.where(ids < rows // 2, "/data/train-a.jsonl", "/data/train-b.jsonl"),
            "source_row": (ids % (rows // 2) + 1).astype(np.int64),
            "input_ids": pa.ListArray.from_arrays(offsets, tokens),
            "attention_mask": pa.ListArray.from_arrays(offsets, np.ones(offsets[-1], dtype=np.int8)),
            "labels": pa.ListArray.from_arrays(offsets, labels)})
        name = f"part-{len(shards):05d}.parquet"
        pq.write_table(table, directory / name)
        shards.append(name)
    (directory / "prepare_report.json").write_text(json.dumps({"shards": shards, "rows_written": rows}))


def run_variant(name: str, prepared: Path, out: Path) -> dict:
    out.mkdir()
    code = (f"PREPARED, OUT = {str(prepared)!r}, {str(out)!r}\nimport time, resource, json\nstart = time.perf_counter()\n"
            + VARIANTS[name] + "\nprint(json.dumps({'rows': rows, 'seconds': time.perf_counter() - start, "
            "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_500_000)
    parser.add_argument("--rows-per-shard", type=int, default=100_000)
    parser.add_argument("--mean-length", type=int, default=228)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds): a check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.rows_per_shard, args.mean_length = 2_000, 500, 32
    with tempfile.TemporaryDirectory(prefix="token-data-bench-") as scratch:
        prepared = Path(scratch, "prepared")
        started = time.perf_counter()
        make_prepared(prepared, args.rows, args.rows_per_shard, args.mean_length)
        size = sum(p.stat().st_size for p in prepared.iterdir()) / 2**20
        print(f"prepared: {args.rows:,} rows, mean {args.mean_length} tokens, {len(list(prepared.glob('*.parquet')))} "
              f"shards, {size:,.0f} MiB of Parquet ({time.perf_counter() - started:.0f} s to generate)")
        results = {}
        for name in args.variants.split(","):
            results[name] = run_variant(name, prepared, Path(scratch, name))
            r = results[name]
            base = results.get("imports", {}).get("peak_rss_mb", 0.0)
            ratio = (f"; above the imports {r['peak_rss_mb'] - base:,.0f} MiB = "
                     f"{(r['peak_rss_mb'] - base) / max(results['before']['peak_rss_mb'] - base, 1):.4f}x before's"
                     if "before" in results and name != "before" else "")
            print(f"{name:<17} peak RSS {r['peak_rss_mb']:9,.0f} MiB  {r['seconds']:7.1f} s  rows {r['rows']:,}{ratio}")


if __name__ == "__main__":
    main()
