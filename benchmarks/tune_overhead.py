"""Per-trial overhead of `lookahead-ray tune`: N trials through Ray Tune vs the same N configurations run one
after another with `train` + `eval` directly (same seed model, data, eval sets, one Ray, this machine).

    python benchmarks/tune_overhead.py [--trials 3] [--out /tmp/tune_overhead] [--smoke]

Prints both wall times and the overhead per trial. The search's own seed evaluation is timed separately
and left out of the comparison (the direct runs reuse the seed the search built).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", default="/tmp/tune_overhead")
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds): a check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.trials = 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    import ray
    from ray.data import DataContext

    from lookahead_ray.config import apply_overrides, load_config
    from lookahead_ray.eval.runner import run_eval
    from lookahead_ray.runtime import init_ray
    from lookahead_ray.train.execute import run_training
    from lookahead_ray.tune.search import run_search
    from lookahead_ray.tune.space import trials

    init_ray(num_cpus=2, log_to_driver=False)  # or joins RAY_ADDRESS
    DataContext.get_current().enable_progress_bars = False
    modes = ["vanilla", "real", "virtual"][: args.trials] if args.trials <= 3 else ["real"]
    overrides = [f"tune.output_dir={out / 'search'}", f"tune.modes=[{', '.join(modes)}]", "tune.m=[2]"]
    if args.trials > 3:
        overrides.append(f"tune.m=[{', '.join(str(m) for m in range(1, args.trials + 1))}]")
    overrides += ["train.max_steps=2"] if args.smoke else []
    cfg = load_config(REPO / "configs" / "tune_tiny_cpu.yaml", overrides)
    planned = trials(cfg.tune)

    started = time.perf_counter()
    result = run_search(cfg)
    search_seconds = time.perf_counter() - started
    seed_dirs = sorted((out / "search").glob("seed_model-*"))
    seed_eval = sorted((out / "search").glob("seed_eval-*/results.json"))
    print(f"search: {len(result.trials)} trials in {search_seconds:.1f} s (includes building and evaluating "
          f"the seed once)")

    started = time.perf_counter()
    for index, trial in enumerate(planned):
        run_cfg = apply_overrides(cfg, {**trial, "model.tiny": None, "model.name_or_path": str(seed_dirs[0]),
                                        "model.tokenizer": None, "output_dir": str(out / "direct" / str(index))})
        trained = run_training(run_cfg)
        run_eval(run_cfg, [("trial", trained.final_dir)])
    direct_seconds = time.perf_counter() - started

    # The seed's build and eval happen once per search; estimate them from the seed eval's own timing files.
    seed_seconds = seed_eval[0].stat().st_mtime - seed_dirs[0].stat().st_mtime if seed_eval and seed_dirs else 0.0
    n = len(planned)
    overhead = (search_seconds - seed_seconds - direct_seconds) / n
    print(f"direct: {n} x (train + eval) in {direct_seconds:.1f} s")
    print(f"seed build + eval inside the search: about {seed_seconds:.1f} s")
    print(f"overhead per trial through Ray Tune: {overhead:.1f} s "
          f"({(search_seconds - seed_seconds) / max(direct_seconds, 1e-9):.2f}x the direct runs)")
    ray.shutdown()


if __name__ == "__main__":
    main()
