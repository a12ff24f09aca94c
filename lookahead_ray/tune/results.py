"""The search's outputs: trials.csv and trials.md (every trial), pareto.png (safety vs utility) and best.yaml
(a ready-to-run training config for the best trial)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import yaml

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig, apply_overrides
from lookahead_ray.tune import objective

COLUMNS = ["rank", "trial_id", "label", "status", "objective", "feasible", "safety", "utility", "violation",
           "training_reports", "checkpoint_path", "error"]


def write_results(search_dir: str | Path, cfg: LookaheadConfig, trials: list[dict[str, Any]],
                  seed_metrics: dict[str, Any]) -> str | None:
    """Write every output; returns the path of best.yaml (None when no trial finished)."""
    ranked = objective.rank(trials)
    for position, trial in enumerate(ranked, 1):
        trial["rank"] = position if trial.get("objective") is not None else None
    seed = {"safety": objective.safety(seed_metrics, cfg.tune.objective.safety),
            "utility": objective.utility(seed_metrics)}
    search_dir = storage.absolute(search_dir)
    _write_csv(storage.join(search_dir, "trials.csv"), ranked)
    with storage.atomic_file(storage.join(search_dir, "trials.md")) as f:
        f.write(trials_markdown(ranked, seed))
    _plot(storage.join(search_dir, "pareto.png"), ranked, seed)
    best = next((t for t in ranked if t.get("objective") is not None), None)
    if best is None:
        return None
    return _write_best(storage.join(search_dir, "best.yaml"), cfg, best)


def _write_csv(path: str, trials: list[dict[str, Any]]) -> None:
    keys = sorted({k for t in trials for k in t.get("overrides", {})})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS + keys + ["metrics"])
    for t in trials:
        writer.writerow([t.get(c) for c in COLUMNS] + [t.get("overrides", {}).get(k) for k in keys]
                        + [yaml.safe_dump(t.get("metrics"), default_flow_style=True, width=10**6).strip()
                           if t.get("metrics") else ""])
    with storage.atomic_file(path) as f:
        f.write(buffer.getvalue())


def trials_markdown(trials: list[dict[str, Any]], seed: dict[str, float]) -> str:
    """Every trial, best first; safety and utility in %."""
    def pct(value: Any) -> str:
        return f"{100 * value:.1f}" if isinstance(value, float) else "-"

    lines = ["| rank | trial | overrides | safety % | utility % | objective | feasible | status |",
             "|---|---|---|---|---|---|---|---|",
             f"| - | seed model | - | {pct(seed['safety'])} | {pct(seed['utility'])} | - | - | - |"]
    for t in trials:
        value = f"{t['objective']:.4f}" if t.get("objective") is not None else "-"
        status = t["status"] if not t.get("error") else f"error: {t['error'][:80]}"
        if t["status"] == "stopped early":
            status = f"stopped early by ASHA after {t.get('training_reports')} training reports"
        lines.append(f"| {t.get('rank') or '-'} | {t['trial_id']} | {t['label']} | {pct(t.get('safety'))} | "
                     f"{pct(t.get('utility'))} | {value} | {t.get('feasible', '-')} | {status} |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (safety, utility) points no other point beats on both, sorted by safety."""
    return sorted(p for p in points if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points))


def _plot(path: str, trials: list[dict[str, Any]], seed: dict[str, float]) -> None:
    from lookahead_ray.eval.report import pyplot, save_figure

    plt = pyplot()
    done = [t for t in trials if t.get("objective") is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [(100 * t["safety"], 100 * t["utility"]) for t in done]
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=40, label="trials")
    leader = {"arrowstyle": "-", "color": "gray", "lw": 0.5, "shrinkA": 0, "shrinkB": 4}
    labels = [ax.annotate(t["label"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points", arrowprops=leader)
              for t, (x, y) in zip(done, points, strict=True)]
    front = pareto_front(points)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", label="Pareto front")
    ax.scatter([100 * seed["safety"]], [100 * seed["utility"]], marker="s", s=70, color="black", label="seed model")
    if done:
        ax.scatter([points[0][0]], [points[0][1]], marker="*", s=200, color="tab:red", label="best trial")
    ax.set_xlabel("safety (objective's safe-rate mix, %)")
    ax.set_ylabel("utility (%)")
    save_figure(fig, ax, str(path), "Search: safety vs utility per trial", arrange=lambda f: spread_labels(f, labels))


def spread_labels(fig: Any, labels: list[Any]) -> list[Any]:
    """Move trial labels up until none overprints another (close trials, equal scores); a thin line joins each
    to its point. Returns their final boxes in display pixels."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()

    def text_box(label: Any) -> Any:  # the text alone: an annotation's own box includes its (growing) line
        label.update_positions(renderer)
        return Text.get_window_extent(label, renderer)

    placed: list[Any] = []
    for label in sorted(labels, key=lambda a: (a.xy[1], a.xy[0])):
        axes = label.axes.get_window_extent(renderer)
        point_x, point_y = label.axes.transData.transform(label.xy)
        if point_x > axes.x0 + 0.6 * axes.width:  # near the right edge: the label goes left of its point
            label.set_horizontalalignment("right")
            label.xyann = (-label.xyann[0], label.xyann[1])
        step = 1 if point_y < axes.y0 + 0.5 * axes.height else -1  # stacked towards the middle of the plot
        box = text_box(label)
        while any(box.overlaps(other) for other in placed):
            x, y = label.xyann
            label.xyann = (x, y + step * (box.height + 1) * 72 / fig.dpi)  # offsets are in points
            box = text_box(label)
        placed.append(box)
    return placed


def _write_best(path: str, cfg: LookaheadConfig, best: dict[str, Any]) -> str:
    trained = apply_overrides(cfg, best["overrides"]).to_dict()
    trained.pop("tune")
    trained["output_dir"] = None
    trained["data"]["output_dir"] = trained["train"]["output_dir"] = trained["eval"]["output_dir"] = None
    trained["train"]["run_name"] = "best"
    header = (f"# The best trial of the search in {storage.parent(path)} ({best['trial_id']}: {best['label']}; objective "
              f"{best['objective']:.4f}, safety {best.get('safety', 0):.3f}, utility {best.get('utility', 0):.3f}).\n"
              "# Train the final model on the full data with it (check first with --dry-run):\n"
              f"#   lookahead-ray train --config {path} --output-dir OUT/best\n")
    with storage.atomic_file(path) as f:
        f.write(header + yaml.safe_dump(trained, sort_keys=False))
    return str(path)
