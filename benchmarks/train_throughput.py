"""Training throughput: a plain torch loop vs the DeepSpeed loop in one process vs Ray Train + DeepSpeed.

Run by hand (not a test):

    python benchmarks/train_throughput.py                  # CPU, the tiny model below
    python benchmarks/train_throughput.py --steps 60 --hidden 512 --layers 8

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
    from lookahead_ray.train.driver import _load_rows_locally
    from lookahead_ray.train.loop import collate

    cfg = _config(args, out, 1, True)
    device = torch.device("cuda" if args.gpu else "cpu")
    tokenizer = tokenizer_for(cfg.model)
    model = build_model(cfg.model, tokenizer, seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate)
    rows = _load_rows_locally(cfg, str(out))
    n, micro = len(rows["input_ids"]), cfg.train.micro_batch_size
    batches = [{k: v[i:i + micro] for k, v in rows.items()} for i in range(0, n - micro + 1, micro)]
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


def child(variant: str, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix=f"train-bench-{variant}-"))
    if variant == "plain":
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
    parser.add_argument("--gpu", action="store_true", help="train on one GPU (Ray variants: one GPU worker)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    variants = ["plain", "deepspeed-local", "ray-deepspeed-1"] + ([] if args.gpu else ["ray-deepspeed-2"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results = {}
    for variant in variants:
        argv = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--hidden", str(args.hidden),
                "--layers", str(args.layers), "--micro-batch", str(args.micro_batch)] + (["--gpu"] if args.gpu else [])
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["process_seconds"] = time.perf_counter() - start
        # Start-up: everything in the process that is not a steady-state step.
        result["startup_seconds"] = result["process_seconds"] - args.steps * result["mean_step_seconds"]
        results[variant] = result
        print(f"{variant:<16} step {result['mean_step_seconds'] * 1000:8.1f} ms  {result['tokens_per_second']:9,.0f} "
              f"tokens/s  start-up {result['startup_seconds']:5.1f} s  (process {result['process_seconds']:5.1f} s)",
              flush=True)
    base = results["plain"]
    print("\nratios against the plain torch loop (per worker; >1 is slower):")
    for variant, r in results.items():
        print(f"{variant:<16} step time {r['mean_step_seconds'] / base['mean_step_seconds']:5.2f}x")
    if args.gpu:
        mfu = 6 * base["parameters"] * results["ray-deepspeed-1"]["tokens_per_second"] / PEAK_FLOPS
        print(f"MFU (Ray Train + DeepSpeed, 1 GPU): {100 * mfu:.1f}% of {PEAK_FLOPS / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
