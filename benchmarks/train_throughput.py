"""Training throughput: a plain torch loop vs the DeepSpeed loop in one process vs Ray Train + DeepSpeed, and
padded vs length-grouped vs packed batches on GSM8K.

Run by hand (not a test; ``--smoke`` is what CI runs: the smallest sizes, seconds):

    python benchmarks/train_throughput.py                  # CPU, the tiny model below
    python benchmarks/train_throughput.py --steps 60 --hidden 512 --layers 8
    python benchmarks/train_throughput.py --layouts        # padded / group_by_length / packing on GSM8K train

``--layouts``: GSM8K train from ../shared/data, the GSM8K recipe's prompt (system prompt, real preview m=6, max
length 512) with Mistral-7B's tokenizer (shipped in ``mistral_common``) and the Llama-2 chat template, a tiny
model on CPU in one process (``train --local``), micro-batch 16: pad fraction (padded positions / computed
positions) and non-pad tokens/s of each layout, as ratios against the padded loop.

Same model (a Llama built from config), same data (GSM8K-style rows from examples/, tokenized by the
project's pipeline), same micro-batch, fp32, one run. Every variant runs in its own process with
OMP_NUM_THREADS=1, so "per worker" step times compare like with like (a Ray Train worker on a 2-core
machine gets one core). Printed: steady-state step time (mean over the steps after the first), tokens/s,
start-up (process start to first step done) and ratios against the plain loop. On a GPU it also prints
model FLOPs utilisation, MFU = 6 x parameters x tokens/s / peak (H100/H200 bf16 dense peak 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989e12


def _config(args: argparse.Namespace, out: Path, workers: int, local: bool):
    from lookahead_ray.config import load_config

    return load_config(REPO / "configs" / "tiny_cpu.yaml", [
        f"train.output_dir={out}", f"train.max_steps={args.steps}", f"train.num_workers={workers}",
        f"model.tiny.hidden_size={args.hidden}", f"model.tiny.intermediate_size={4 * args.hidden}",
        f"model.tiny.num_hidden_layers={args.layers}", f"train.micro_batch_size={args.micro_batch}",
        "train.precision=fp32", "train.checkpoint_every_steps=0", f"train.report_every_steps={args.steps}",
        "train.verify_export=false", f"train.use_gpu={'true' if args.gpu else 'false'}",
        "train.cpus_per_worker=" + ("1" if local else "0.5")])


def plain_loop(args: argparse.Namespace, out: Path) -> dict:
    """The baseline: torch AdamW on the same model and batches, no DeepSpeed, no Ray."""
    import torch

    from lookahead_ray.modeling import build_model, tokenizer_for
    from lookahead_ray.train.data_order import TokenStore
    from lookahead_ray.train.driver import _tokens_locally
    from lookahead_ray.train.loop import collate

    cfg = _config(args, out, 1, True)
    device = torch.device("cuda" if args.gpu else "cpu")
    tokenizer = tokenizer_for(cfg.model)
    model = build_model(cfg.model, tokenizer, seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate)
    store = TokenStore(_tokens_locally(cfg, str(out)))  # the same token file `train --local` trains on
    n, micro = len(store), cfg.train.micro_batch_size
    batches = [store.batch(list(range(i, i + micro))) for i in range(0, n - micro + 1, micro)]
    times, tokens = [], 0
    for step in range(args.steps):
        start = time.perf_counter()
        batch = collate(batches[step % len(batches)], tokenizer.pad_token_id, device)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens += int(batch["attention_mask"].sum()) if step else 0
    mean = sum(times[1:]) / (len(times) - 1)
    return {"mean_step_seconds": mean, "tokens_per_second": tokens / sum(times[1:]),
            "parameters": sum(p.numel() for p in model.parameters())}


LAYOUTS = {"layout-padded": [], "layout-grouped": ["train.group_by_length=true"], "layout-packed": ["train.packing=true"]}
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def layout_run(variant: str, args: argparse.Namespace, out: Path) -> dict:
    """``train --local`` on GSM8K train with one batch layout (padded, grouped by length, packed)."""
    import shutil

    import mistral_common

    from lookahead_ray.config import apply_overrides, load_config
    from lookahead_ray.prompts import LLAMA2_CHAT_TEMPLATE
    from lookahead_ray.train.driver import run_training_local

    tokenizer = out / "mistral-tokenizer"
    tokenizer.mkdir()
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tokenizer / "tokenizer.model")
    data = out / "gsm8k.jsonl"
    data.write_bytes(b"".join(GSM8K.read_bytes().splitlines(keepends=True)[: args.rows]))
    cfg = load_config(REPO / "configs" / "llama2_7b_gsm8k_real.yaml", [
        f"data.inputs=[{data}]", f"train.output_dir={out / 'run'}", f"model.tokenizer={tokenizer}",
        "model.name_or_path=null", f"model.tiny={{hidden_size: {args.hidden}, intermediate_size: {4 * args.hidden}, "
        f"num_hidden_layers: {args.layers}, num_attention_heads: 4, num_key_value_heads: 4, "
        "max_position_embeddings: 1024}", f"train.micro_batch_size={args.micro_batch}", "train.global_batch_size=null",
        f"train.max_steps={args.steps}", "train.precision=fp32", "train.gradient_checkpointing=false",
        f"train.use_gpu={'true' if args.gpu else 'false'}", "train.checkpoint_every_steps=0",
        f"train.report_every_steps={args.steps}", "train.verify_export=false", *LAYOUTS[variant]])
    metrics = run_training_local(apply_overrides(cfg, {"model.chat_template": LLAMA2_CHAT_TEMPLATE})).metrics
    # Means over the run's steps after the first (time includes the loop's reports, as in a real run).
    return {"mean_step_seconds": metrics["mean_step_seconds"], "tokens_per_second": metrics["mean_tokens_per_second"],
            "pad_fraction": metrics["mean_pad_fraction"], "steps": metrics["step"]}


def child(variant: str, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix=f"train-bench-{variant}-"))
    if variant in LAYOUTS:
        result = layout_run(variant, args, out)
    elif variant == "plain":
        result = plain_loop(args, out)
    elif variant == "deepspeed-local":
        from lookahead_ray.train.driver import run_training_local

        metrics = run_training_local(_config(args, out, 1, True)).metrics
        result = {k: metrics[k] for k in ("mean_step_seconds", "exported_parameters")}
        result["tokens_per_second"] = metrics["tokens_per_second"]
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from lookahead_ray.runtime import init_ray
        from lookahead_ray.train.driver import run_training

        init_ray(num_cpus=None if args.gpu else 2, log_to_driver=False)
        workers = int(variant[-1])
        metrics = run_training(_config(args, out, workers, False)).metrics
        result = {"mean_step_seconds": metrics["mean_step_seconds"], "tokens_per_second": metrics["tokens_per_second"]}
    result["wall_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--layouts", action="store_true", help="padded vs group_by_length vs packing on GSM8K")
    parser.add_argument("--rows", type=int, default=None, help="--layouts: the first N rows of GSM8K train")
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds): a check that it runs")
    parser.add_argument("--gpu", action="store_true", help="train on one GPU (Ray variants: one GPU worker)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.hidden, args.layers, args.micro_batch = 3, 32, 1, 2
        args.rows = args.rows or 64
    elif args.layouts and args.micro_batch == parser.get_default("micro_batch"):
        args.micro_batch, args.hidden = 16, 64  # the recipe's micro-batch; a small model keeps CPU runs short
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    if args.layouts and not GSM8K.exists():
        sys.exit(f"skipped: {GSM8K} is absent (the benchmark reads ../shared/data)")
    if args.layouts:
        variants = list(LAYOUTS)
    else:
        variants = ["plain", "deepspeed-local", "ray-deepspeed-1"] + ([] if args.gpu else ["ray-deepspeed-2"])
    # glibc returns every large buffer (a micro-batch's logits: 16 x 512 x 32,768 floats) to the OS and faults it
    # in again the next step; above ~5,000 positions that page-fault time grew faster than the positions and
    # doubled the cost of a 512-wide micro-batch on CPU. Keeping them mapped is the same for every variant.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(4 << 30), MALLOC_TRIM_THRESHOLD_=str(4 << 30))
    results = {}
    for variant in variants:
        argv = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--hidden", str(args.hidden),
                "--layers", str(args.layers), "--micro-batch", str(args.micro_batch)] + (
                ["--gpu"] if args.gpu else []) + (["--rows", str(args.rows)] if args.rows else [])
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["process_seconds"] = time.perf_counter() - start
        # Start-up: everything in the process that is not a steady-state step.
        result["startup_seconds"] = result["process_seconds"] - args.steps * result["mean_step_seconds"]
        results[variant] = result
        pad = f"  pad {100 * result['pad_fraction']:4.1f}%" if "pad_fraction" in result else ""
        print(f"{variant:<16} step {result['mean_step_seconds'] * 1000:8.1f} ms  {result['tokens_per_second']:9,.0f} "
              f"non-pad tokens/s{pad}  start-up {result['startup_seconds']:5.1f} s  "
              f"(process {result['process_seconds']:5.1f} s)", flush=True)
    if args.layouts:
        base = results["layout-padded"]
        print("\nratios against the padded loop (non-pad tokens/s; >1 is faster):")
        for variant, r in results.items():
            print(f"{variant:<16} {r['tokens_per_second'] / base['tokens_per_second']:5.2f}x  "
                  f"pad {100 * r['pad_fraction']:4.1f}% vs {100 * base['pad_fraction']:4.1f}%")
        return
    base = results["plain"]
    print("\nratios against the plain torch loop (per worker; >1 is slower):")
    for variant, r in results.items():
        print(f"{variant:<16} step time {r['mean_step_seconds'] / base['mean_step_seconds']:5.2f}x")
    if args.gpu:
        mfu = 6 * base["parameters"] * results["ray-deepspeed-1"]["tokens_per_second"] / PEAK_FLOPS
        print(f"MFU (Ray Train + DeepSpeed, 1 GPU): {100 * mfu:.1f}% of {PEAK_FLOPS / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
