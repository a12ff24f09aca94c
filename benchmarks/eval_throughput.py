"""Evaluation generation throughput of the eval engines (eval.engine) against hf, on the same prompts, in one run.

Run by hand (not a test; ``--smoke`` is what CI runs: the smallest sizes, seconds):

    python benchmarks/eval_throughput.py                                   # 256 prompts, hidden 256, on CPU
    python benchmarks/eval_throughput.py --openai                          # also a `transformers serve` (openai)

Same model (a random Llama built from config, fp32), same prompts (HEx-PHI-shaped, JSR-prefilled and
GSM8K-shaped, from examples/eval/, each made distinct by its request number), greedy, the same max_new_tokens.
A random model never emits EOS, so EOS takes over the output row of the token that ends its answers at the most
varied lengths: answers end at mixed lengths, as a real model's do. Every engine runs through
``generate_responses`` (Ray Data, one actor with all the machine's CPUs; the actor's model load is timed, Ray's
start-up is not). Prints prompts/s and generated tokens/s, each as a ratio to hf, and how many outputs are
identical to hf's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rows(n: int) -> list[dict]:
    from lookahead_ray.config import load_config
    from lookahead_ray.eval.prompt_sets import load_prompt_set
    from lookahead_ray.eval.runner import _generation_rows

    cfg = load_config(REPO / "configs" / "eval_tiny_cpu.yaml")
    for s in (cfg.eval.harmful, cfg.eval.harmful_answers, cfg.eval.utility):
        s.path = str(REPO / s.path)
    sets = {"rsr": load_prompt_set(cfg.eval.harmful), "jsr": load_prompt_set(cfg.eval.harmful_answers),
            "utility": load_prompt_set(cfg.eval.utility)}
    base = _generation_rows(cfg, sets)
    rows = []
    for i in range(n):
        row = base[i % len(base)]
        messages = [dict(m) for m in row["messages"]]
        messages[-1]["content"] += f" (request {i})"  # distinct prompts: no engine gains from repeated ones
        rows.append({"id": f"{i}", "messages": messages, "prefill_source": row["prefill_source"]})
    return rows


def _model(directory: Path, hidden: int, layers: int, rows: list[dict], max_new: int) -> None:
    import torch

    from lookahead_ray.config import ModelConfig, TinyModelConfig
    from lookahead_ray.eval.generate import build_prompts, greedy_generate
    from lookahead_ray.modeling import build_model, tokenizer_for

    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                           num_hidden_layers=layers))
    tokenizer = tokenizer_for(cfg)
    model = build_model(cfg, tokenizer, seed=0).eval()
    probe = rows[:64]
    batch = {"messages": [json.dumps(r["messages"]) for r in probe],
             "prefill_source": [r["prefill_source"] or "" for r in probe]}
    _, prompts = build_prompts(tokenizer, batch, {"jsr_prefill_tokens": 3, "jsr_prefill_count": "answer_tokens"})
    answers = greedy_generate(model, tokenizer, prompts, max_new, "cpu")

    def spread(token: int) -> int:  # answers it ends x the distinct lengths they end at
        ends = [a.index(token) for a in answers if token in a]
        return len(ends) * len(set(ends))

    end = max({t for a in answers for t in a} - {tokenizer.pad_token_id}, key=spread)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[end] * 1.05
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _serve(model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir),
                                    "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype",
                                    "float32"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}/v1"
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise SystemExit(f"transformers serve did not start (see {log})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="hf's static batch size")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cb-max-requests", type=int, default=64, help="continuous_batching.max_requests_per_batch")
    parser.add_argument("--openai", action="store_true", help="also the openai engine against `transformers serve`")
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds): a check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.batch_size, args.max_new_tokens, args.hidden, args.layers = 4, 2, 4, 32, 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from lookahead_ray.config.schema import ContinuousBatchingConfig, ServerConfig
    from lookahead_ray.eval.generate import generate_responses
    from lookahead_ray.runtime import init_ray

    rows = _rows(args.prompts)
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    model_dir = work / "model"
    _model(model_dir, args.hidden, args.layers, rows, args.max_new_tokens)
    base = {"max_new_tokens": args.max_new_tokens, "jsr_prefill_tokens": 3, "jsr_prefill_count": "answer_tokens",
            "seed": 0}
    cb = dataclasses.asdict(ContinuousBatchingConfig(max_requests_per_batch=args.cb_max_requests))
    engines = {"hf": base, "hf_continuous": base | {"engine": "hf_continuous", "continuous_batching": cb}}
    server = None
    if args.openai:
        server, url = _serve(model_dir, work / "serve.log")
        engines["openai"] = base | {"engine": "openai", "server": dataclasses.asdict(ServerConfig(
            url=url, prompt_format="text", max_concurrency=8, cache_dir=str(work / "cache")))}

    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    results = {}
    try:
        for name, settings in engines.items():
            start = time.perf_counter()
            out = generate_responses(str(model_dir), rows, settings, batch_size=args.batch_size,
                                     cpus_per_actor=os.cpu_count() or 1)
            results[name] = (time.perf_counter() - start, out)
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)

    n, (hf_s, hf_out) = len(rows), results["hf"]
    hf_tokens = sum(int(o["new_tokens"]) for o in hf_out)
    lengths = sorted(int(o["new_tokens"]) for o in hf_out)
    print(f"{n} prompts, max_new_tokens {args.max_new_tokens}, hidden {args.hidden} x {args.layers} layers, "
          f"answers {lengths[0]}-{lengths[-1]} tokens (median {lengths[n // 2]}), {os.cpu_count()} CPUs")
    print(f"{'engine':<14} {'seconds':>8} {'prompts/s':>10} {'tokens/s':>9} {'prompts/s ratio':>16} "
          f"{'identical to hf':>16}")
    for name, (seconds, out) in results.items():
        tokens = sum(int(o["new_tokens"]) for o in out)
        same = sum(o["response"] == h["response"] for o, h in zip(out, hf_out, strict=True))
        print(f"{name:<14} {seconds:8.1f} {n / seconds:10.2f} {tokens / seconds:9.1f} "
              f"{hf_s / seconds:15.2f}x {same:>10}/{n}")
    cb_s = results["hf_continuous"][0]
    print(f"ratio hf_continuous / hf: {hf_s / cb_s:.2f}x prompts/s, "
          f"{(sum(int(o['new_tokens']) for o in results['hf_continuous'][1]) / cb_s) / (hf_tokens / hf_s):.2f}x "
          "tokens/s")


if __name__ == "__main__":
    main()
