"""Evaluation generation throughput: batched generation through Ray Data vs a per-sample generate loop.

Run by hand (not a test; ``--smoke`` is what CI runs: the smallest sizes, seconds):

    python benchmarks/eval_throughput.py                 # 64 prompts, a tiny Llama on CPU
    python benchmarks/eval_throughput.py --prompts 256 --batch-size 32 --hidden 256

Same model (random init, built from config), same prompts (GSM8K test questions when ../shared/data is
present, else generated ones), greedy, the same max_new_tokens, one run. Prints samples/s and the ratio.
Ray's start-up (ray.init) is not timed; the actor's model load is.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K_TEST = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds): a check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.batch_size, args.max_new_tokens, args.hidden, args.layers = 4, 2, 4, 32, 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from lookahead_ray.config import ModelConfig, TinyModelConfig
    from lookahead_ray.eval.generate import generate_responses, greedy_generate, prompt_ids
    from lookahead_ray.modeling import build_model, load_model_for_inference, tokenizer_for
    from lookahead_ray.runtime import init_ray

    if GSM8K_TEST.exists():
        questions = [json.loads(x)["question"] for x in GSM8K_TEST.read_text().splitlines()[: args.prompts]]
    else:
        questions = [f"What is {i} plus {2 * i}? Explain the steps." for i in range(args.prompts)]
    model_dir = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                           num_hidden_layers=args.layers))
    tokenizer = tokenizer_for(cfg)
    build_model(cfg, tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"id": str(i), "messages": [{"role": "user", "content": q}], "prefill_source": None}
            for i, q in enumerate(questions)]
    settings = {"max_new_tokens": args.max_new_tokens, "jsr_prefill_tokens": 3,
                "jsr_prefill_count": "answer_tokens", "seed": 0}

    model, tok, device = load_model_for_inference(str(model_dir))
    start = time.perf_counter()
    loop = [greedy_generate(model, tok, [prompt_ids(tok, r["messages"])], args.max_new_tokens, device)[0]
            for r in rows]
    loop_seconds = time.perf_counter() - start

    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    start = time.perf_counter()
    batched = generate_responses(str(model_dir), rows, settings, batch_size=args.batch_size,
                                 cpus_per_actor=os.cpu_count() or 1)  # as many threads as the loop gets
    ray_seconds = time.perf_counter() - start
    same = sum(b["response"] == tok.decode(s, skip_special_tokens=True) for b, s in zip(batched, loop, strict=True))

    n = len(rows)
    print(f"per-sample generate loop : {n / loop_seconds:7.2f} samples/s ({loop_seconds:.1f} s)")
    print(f"Ray Data batched (bs {args.batch_size:>3}): {n / ray_seconds:7.2f} samples/s ({ray_seconds:.1f} s, "
          f"includes the actor's model load)")
    print(f"ratio: {loop_seconds / ray_seconds:.1f}x; identical outputs: {same}/{n}")


if __name__ == "__main__":
    main()
