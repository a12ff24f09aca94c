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

``--layouts --one-engine`` (what a GPU run uses): every layout on one DeepSpeed engine in one process, so a large
model is built once: the loop's own ``setup_engine`` and ``_fit`` (plan, collate, meter) per layout, then the
packed layout again with ``--flex`` (torch's flex_attention) and ``--liger`` (Liger kernels, last: they patch the
model for good). ``--shape llama2-7b`` gives the model Llama-2-7B's layer shape (hidden 4096, MLP 11,008, 32
heads) with ``--layers`` of them; ``--lora`` adds a second process training LoRA adapters (r=16, every
projection) on the same model: its peak memory and tokens/s beside full fine-tuning's. On GPU: bf16, gradient
checkpointing (the recipe's), MFU of full fine-tuning = 6 x parameters x non-pad tokens/s / 989 TFLOP/s.

    python benchmarks/train_throughput.py --layouts --one-engine --gpu --shape llama2-7b --layers 24 --lora --flex \
        --liger --steps 12

Same model (a Llama built from config), same data (GSM8K-style rows from examples/, tokenized by the
project's pipeline), same micro-batch, fp32, one run. Every variant runs in its own process with
OMP_NUM_THREADS=1, so "per worker" step times compare like with like (a Ray Train worker on a 2-core
machine gets one core). Printed: steady-state step time (mean over the steps after the first), tokens/s,
start-up (process start to first step done), the machine's busy CPU seconds while the variant ran (Linux; a
Ray variant's workers and controller included) and ratios against the plain loop. On a GPU it also prints
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
    from lookahead_ray.train.execute import _tokens_locally
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


SHAPES = {"llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                        "num_key_value_heads": 32, "max_position_embeddings": 4096}}


def _layouts_config(args: argparse.Namespace, out: Path, overrides: list[str]):
    """The GSM8K recipe on ``args.rows`` rows of GSM8K train, with Mistral-7B's tokenizer and the chosen model."""
    import shutil

    from lookahead_ray.config import apply_overrides, load_config
    from lookahead_ray.prompts import LLAMA2_CHAT_TEMPLATE

    if args.tokenizer:
        tokenizer = Path(args.tokenizer).resolve()
    else:
        import mistral_common

        tokenizer = out / "mistral-tokenizer"
        tokenizer.mkdir(exist_ok=True)
        shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tokenizer / "tokenizer.model")
    data = out / "gsm8k.jsonl"
    data.write_bytes(b"".join(Path(args.data).read_bytes().splitlines(keepends=True)[: args.rows]))
    shape = SHAPES[args.shape] if args.shape else {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                                                   "num_attention_heads": 4, "num_key_value_heads": 4,
                                                   "max_position_embeddings": 1024}
    tiny = "{" + ", ".join(f"{k}: {v}" for k, v in (shape | {"num_hidden_layers": args.layers}).items()) + "}"
    gpu = args.gpu
    cfg = load_config(REPO / "configs" / "llama2_7b_gsm8k_real.yaml", [
        f"data.inputs=[{data}]", f"train.output_dir={out / 'run'}", f"model.tokenizer={tokenizer}",
        "model.name_or_path=null", f"model.tiny={tiny}", f"train.micro_batch_size={args.micro_batch}",
        "train.global_batch_size=null", f"train.max_steps={args.steps}",
        f"train.precision={'bf16' if gpu else 'fp32'}", f"train.gradient_checkpointing={'true' if gpu else 'false'}",
        f"train.use_gpu={'true' if gpu else 'false'}", "train.checkpoint_every_steps=0",
        f"train.report_every_steps={args.steps}", "train.verify_export=false", *overrides])
    return apply_overrides(cfg, {"model.chat_template": LLAMA2_CHAT_TEMPLATE})


def one_engine(args: argparse.Namespace, out: Path, lora: bool) -> dict:
    """Every layout on one engine (the model is built once); ``lora``: adapters on the same model."""
    import torch

    from lookahead_ray.config import apply_overrides, parse_overrides
    from lookahead_ray.train.data_order import TokenStore
    from lookahead_ray.train.execute import _tokens_locally
    from lookahead_ray.train.loop import Position, _fit, setup_engine
    from lookahead_ray.train.lora import parameter_counts
    from lookahead_ray.train.metrics import StepMeter
    from lookahead_ray.train.worker_io import LocalWorkerIO

    if lora and args.lora_layers:
        args.layers = args.lora_layers
    cfg = _layouts_config(args, out, ["train.lora={}"] if lora else [])
    store = TokenStore(_tokens_locally(cfg, str(out)))
    started = time.perf_counter()
    with torch.device("cuda" if args.gpu else "cpu"):  # a 7B-shaped model initialised on the GPU: seconds, not minutes
        engine, tokenizer, device, _ = setup_engine(cfg, 1, 10**6)
    trainable, total = parameter_counts(engine.module)
    result: dict = {"setup_seconds": time.perf_counter() - started, "parameters": total,
                    "trainable_parameters": trainable, "layouts": {}}
    variants = [("padded", []), ("grouped", ["train.group_by_length=true"]), ("packed", ["train.packing=true"])]
    if lora:
        variants = [v for v in variants if v[0] != "grouped"]
    elif args.flex:
        variants.append(("packed+flex", ["train.packing=true", "model.attn_implementation=flex_attention"]))
    if args.again and not lora:  # the first layout measured again last: does the order change its number?
        variants.append(("padded again", []))
    if args.liger and not lora:
        variants.append(("packed+liger", ["train.packing=true", "model.liger_kernel=true"]))
    for name, overrides in variants:
        layout = apply_overrides(cfg, parse_overrides(overrides))
        if args.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            if args.flex or args.liger:
                from lookahead_ray.train.loop import use_attention, use_liger

                module = engine.module.get_base_model() if lora else engine.module
                if layout.model.liger_kernel:
                    use_liger(module)
                use_attention(module, layout.model.attn_implementation or "sdpa")
            meter = StepMeter(1, 1, device, 0.0, None)
            _fit(engine, store, tokenizer.pad_token_id, device, layout, LocalWorkerIO(out / name, 1), args.steps,
                 Position(), meter, None)
        except Exception as exc:  # noqa: BLE001 - one variant failing (a kernel missing) must not lose the others
            result["layouts"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(f"  {name}: failed: {result['layouts'][name]['error']}", file=sys.stderr, flush=True)
            continue
        m = meter.last
        row = {"tokens_per_second": m["mean_tokens_per_second"], "pad_fraction": m["mean_pad_fraction"],
               "mean_step_seconds": m["mean_step_seconds"]}
        if args.gpu:
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["layouts"][name] = row
        print(f"  {'lora' if lora else 'full'} {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    import resource

    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process: one worker
    return result


def layout_run(variant: str, args: argparse.Namespace, out: Path) -> dict:
    """``train --local`` on GSM8K train with one batch layout (padded, grouped by length, packed)."""
    from lookahead_ray.train.execute import run_training_local

    metrics = run_training_local(_layouts_config(args, out, LAYOUTS[variant])).metrics
    # Means over the run's steps after the first (time includes the loop's reports, as in a real run).
    return {"mean_step_seconds": metrics["mean_step_seconds"], "tokens_per_second": metrics["mean_tokens_per_second"],
            "pad_fraction": metrics["mean_pad_fraction"], "steps": metrics["step"]}


def child(variant: str, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix=f"train-bench-{variant}-"))
    if variant in ("engine-full", "engine-lora"):
        result = one_engine(args, out, lora=variant == "engine-lora")
    elif variant in LAYOUTS:
        result = layout_run(variant, args, out)
    elif variant == "plain":
        result = plain_loop(args, out)
    elif variant == "deepspeed-local":
        from lookahead_ray.train.execute import run_training_local

        metrics = run_training_local(_config(args, out, 1, True)).metrics
        result = {k: metrics[k] for k in ("mean_step_seconds", "exported_parameters")}
        result["tokens_per_second"] = metrics["tokens_per_second"]
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from lookahead_ray.runtime import init_ray
        from lookahead_ray.train.execute import run_training

        init_ray(num_cpus=None if args.gpu else 2, log_to_driver=False)
        workers = int(variant[-1])
        metrics = run_training(_config(args, out, workers, False)).metrics
        result = {"mean_step_seconds": metrics["mean_step_seconds"], "tokens_per_second": metrics["tokens_per_second"]}
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _print_one_engine(results: dict, args: argparse.Namespace) -> None:
    full = results["engine-full"]
    base = full["layouts"].get("padded", {}).get("tokens_per_second")
    print(f"\nfull fine-tuning: {full['parameters']:,} parameters ({args.layers} layers"
          f"{', ' + args.shape + ' shape' if args.shape else ''}), micro-batch {args.micro_batch}, {args.steps} steps "
          "per layout; ratios of non-pad tokens/s against padded")
    for name, row in full["layouts"].items():
        if "error" in row:
            print(f"  {name:<14} failed: {row['error']}")
            continue
        mfu = f"  MFU {100 * 6 * full['parameters'] * row['tokens_per_second'] / PEAK_FLOPS:5.1f}%" if args.gpu else ""
        memory = f"  peak {row['peak_memory_gb']:6.1f} GB" if "peak_memory_gb" in row else ""
        print(f"  {name:<14} {row['tokens_per_second']:11,.0f} tokens/s  {row['tokens_per_second'] / base:5.2f}x  "
              f"pad {100 * row['pad_fraction']:4.1f}%{memory}{mfu}")
    lora = results.get("engine-lora")
    if lora is None:
        return
    print(f"\nLoRA (r=16, every projection): {lora['trainable_parameters']:,} of {lora['parameters']:,} parameters "
          f"({args.lora_layers or args.layers} layers) "
          f"trained ({100 * lora['trainable_parameters'] / lora['parameters']:.2f}%); ratios against full fine-tuning "
          "of the same layout")
    same_model = not args.lora_layers or args.lora_layers == args.layers
    if not args.gpu and same_model:
        print(f"  peak RSS of the worker process: LoRA {lora['peak_rss_mb']:,.0f} MB, full fine-tuning "
              f"{full['peak_rss_mb']:,.0f} MB ({lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x)")
    for name, row in lora["layouts"].items():
        ref = full["layouts"].get(name, {}) if same_model else {}
        if "error" in row:
            print(f"  {name:<14} failed: {row['error']}")
            continue
        memory = f"  peak {row['peak_memory_gb']:6.1f} GB" if "peak_memory_gb" in row else ""
        line = f"  {name:<14} {row['tokens_per_second']:11,.0f} tokens/s{memory}"
        if ref and "error" not in ref:
            line += (f"  (full: tokens/s {row['tokens_per_second'] / ref['tokens_per_second']:4.2f}x, step "
                     f"{row['mean_step_seconds'] / ref['mean_step_seconds']:4.2f}x"
                     + (f", memory {row['peak_memory_gb'] / ref['peak_memory_gb']:4.2f}x" if memory else "") + ")")
        print(line)


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
    parser.add_argument("--one-engine", action="store_true", help="--layouts: all layouts on one engine (see above)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="--one-engine: the model's layer shape")
    parser.add_argument("--lora", action="store_true", help="--one-engine: also LoRA on the same model")
    parser.add_argument("--flex", action="store_true", help="--one-engine: also packed with flex_attention")
    parser.add_argument("--liger", action="store_true", help="--one-engine: also packed with Liger kernels (GPU)")
    parser.add_argument("--lora-layers", type=int, help="--lora: layers of the LoRA model (default: --layers)")
    parser.add_argument("--again", action="store_true", help="--one-engine: padded measured again after the others")
    parser.add_argument("--data", default=str(GSM8K), help="--layouts: GSM8K train (JSONL)")
    parser.add_argument("--tokenizer", help="--layouts: a tokenizer directory (default: mistral_common's Mistral-7B)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.hidden, args.layers, args.micro_batch = 3, 32, 1, 2
        args.rows = args.rows or 64
    elif args.layouts:  # the recipe's micro-batch; a small model keeps CPU runs short (unless asked otherwise)
        if args.micro_batch == parser.get_default("micro_batch"):
            args.micro_batch = 16
        if args.hidden == parser.get_default("hidden"):
            args.hidden = 64
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    if args.layouts and not Path(args.data).exists():
        sys.exit(f"skipped: {args.data} is absent (the benchmark reads ../shared/data)")
    if args.one_engine:
        variants = ["engine-full"] + (["engine-lora"] if args.lora else [])
    elif args.layouts:
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
                ["--gpu"] if args.gpu else []) + (["--rows", str(args.rows)] if args.rows else []) + [
                f"--{flag}" for flag in ("flex", "liger", "again") if getattr(args, flag)] + (
                ["--lora-layers", str(args.lora_layers)] if args.lora_layers else []) + [
                "--data", args.data] + (["--shape", args.shape] if args.shape else []) + (
                ["--tokenizer", args.tokenizer] if args.tokenizer else [])
        start, busy = time.perf_counter(), _machine_busy_seconds()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=None if args.one_engine else subprocess.PIPE,
                              text=True, env=env, cwd=REPO)  # --one-engine: its per-layout lines as they come
        if proc.returncode != 0 and args.one_engine and variant != variants[0]:
            print(f"{variant} failed (exit {proc.returncode}); its lines are above", flush=True)
            continue
        if proc.returncode != 0:
            sys.exit(f"{variant} failed (exit {proc.returncode}):\n{(proc.stderr or '')[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if args.one_engine:
            results[variant] = result
            continue
        result["process_seconds"] = time.perf_counter() - start
        if busy is not None:  # every process on the machine (a Ray variant's workers and controller included)
            result["machine_cpu_seconds"] = _machine_busy_seconds() - busy
        # Start-up: everything in the process that is not a steady-state step.
        result["startup_seconds"] = result["process_seconds"] - args.steps * result["mean_step_seconds"]
        results[variant] = result
        pad = f"  pad {100 * result['pad_fraction']:4.1f}%" if "pad_fraction" in result else ""
        print(f"{variant:<16} step {result['mean_step_seconds'] * 1000:8.1f} ms  {result['tokens_per_second']:9,.0f} "
              f"non-pad tokens/s{pad}  start-up {result['startup_seconds']:5.1f} s  "
              f"(process {result['process_seconds']:5.1f} s"
              + (f", machine CPU {result['machine_cpu_seconds']:5.1f} s" if "machine_cpu_seconds" in result else "")
              + ")", flush=True)
    if args.one_engine:
        _print_one_engine(results, args)
        return
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


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (Linux /proc/stat: all but idle and iowait); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
