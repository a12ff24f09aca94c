"""The search's outputs: trials.csv and trials.md (every trial, its objective's interval and whether it is within
noise of the best), pareto.png (safety vs utility) and best.yaml (a ready-to-run training config for the best
trial, its header naming the trials the eval set cannot tell apart from it)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import yaml

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.eval.intervals import format_rate
from lookahead_ray.methods import trial_config
from lookahead_ray.tune import objective

COLUMNS = ["rank", "trial_id", "label", "status", "objective", "objective_low", "objective_high",
           "within_noise_of_best", "feasible", "safety", "utility", "violation", "training_reports", "checkpoint_path",
           "error"]
RANK_BY_WORDS = {"point": "the objective", "lower_bound": "the objective's lower bound"}


def mark_ranks(trials: list[dict[str, Any]], rank_by: str) -> list[dict[str, Any]]:
    """The trials best first, each marked with its ``rank`` and ``within_noise_of_best``: "best" for the best,
    True / False for the other finished trials (see :func:`objective.within_noise_of_best`), None for the rest."""
    ranked = objective.rank(trials, rank_by)
    near = {id(t) for t in objective.within_noise_of_best(ranked)}
    for position, trial in enumerate(ranked, 1):
        done = trial.get("objective") is not None
        trial["rank"] = position if done else None
        trial["within_noise_of_best"] = ("best" if position == 1 else id(trial) in near) if done else None
    return ranked


def write_results(search_dir: str | Path, cfg: LookaheadConfig, trials: list[dict[str, Any]],
                  seed_metrics: dict[str, Any]) -> str | None:
    """Write every output; returns the path of best.yaml (None when no trial finished)."""
    rank_by = cfg.tune.objective.rank_by
    ranked = mark_ranks(trials, rank_by)
    seed = _seed_row(seed_metrics, cfg.tune.objective.safety)
    search_dir = storage.absolute(search_dir)
    _write_csv(storage.join(search_dir, "trials.csv"), ranked)
    with storage.atomic_file(storage.join(search_dir, "trials.md")) as f:
        f.write(trials_markdown(ranked, seed, rank_by))
    _plot(storage.join(search_dir, "pareto.png"), ranked, seed)
    best = next((t for t in ranked if t.get("objective") is not None), None)
    if best is None:
        return None
    return _write_best(storage.join(search_dir, "best.yaml"), cfg, best, ranked)


def _seed_row(seed_metrics: dict[str, Any], weights: dict[str, float]) -> dict[str, float]:
    """The seed model's safety and utility, and both at the ends of their rates' intervals (as a trial's)."""
    row = {"safety": objective.safety(seed_metrics, weights), "utility": objective.utility(seed_metrics)}
    for bound in ("low", "high"):
        row[f"safety_{bound}"] = objective.safety(seed_metrics, weights, bound)
        row[f"utility_{bound}"] = objective.utility(seed_metrics, bound)
    return row


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


def objective_interval(trial: dict[str, Any]) -> str:
    """"[low, high]" of a trial's objective ("-" for a trial without one, e.g. scored before intervals)."""
    low, high = trial.get("objective_low"), trial.get("objective_high")
    return f"[{low:.4f}, {high:.4f}]" if low is not None and high is not None else "-"


def noise_summary(trials: list[dict[str, Any]], rank_by: str) -> str:
    """Whether the eval set tells the best trial (by ``rank_by``) apart from the other finished ones: the sentence
    trials.md and the console give."""
    done = [t for t in objective.rank(trials, rank_by) if t.get("objective") is not None]
    if len(done) < 2:
        return "One trial finished: nothing to compare the best with." if done else "No trial finished."
    best, near = done[0], objective.within_noise_of_best(done)
    if not near:
        return (f"No other trial is within noise of the best ({best['trial_id']}: {best['label']}): every other "
                "trial's objective interval ends below its lower bound.")
    others = len(done) - 1
    count = ("The other finished trial is" if others == 1 else
             f"{len(near)} of the {others} other finished trials {'is' if len(near) == 1 else 'are'}")
    names = ", ".join(t["label"] for t in near)
    return (f"{count} within noise of the best ({best['trial_id']}: {best['label']}): {names}. "
            "An objective interval that reaches the best's lower bound means this eval set does not tell that trial "
            "apart from the best.")


def best_lines(trials: list[dict[str, Any]], rank_by: str) -> list[str]:
    """The console's word on the best trial (by ``rank_by``): its objective with the interval, and whether the eval
    set tells it apart from the others."""
    done = [t for t in objective.rank(trials, rank_by) if t.get("objective") is not None]
    if not done:
        return []
    best = done[0]
    return [f"best trial {best['trial_id']} ({best['label']}), objective {best['objective']:.4f} "
            f"{objective_interval(best)} (ranked by {RANK_BY_WORDS[rank_by]})", noise_summary(trials, rank_by)]


def trials_markdown(trials: list[dict[str, Any]], seed: dict[str, float], rank_by: str = "point") -> str:
    """Every trial, best first; safety and utility in % with the ends of their rates' 95% intervals."""
    def pct(row: dict[str, Any], name: str) -> str:  # no brackets where no rate had an interval (ROUGE, old results)
        low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
        return format_rate(row.get(name), [low, high] if low is not None and high is not None and low < high else None)

    noise = {"best": "best", True: "yes", False: "no"}
    lines = ["| rank | trial | overrides | safety % | utility % | objective | objective interval | within noise of best "
             "| feasible | status |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| - | seed model | - | {pct(seed, 'safety')} | {pct(seed, 'utility')} | - | - | - | - | - |"]
    for t in trials:
        value = f"{t['objective']:.4f}" if t.get("objective") is not None else "-"
        status = t["status"] if not t.get("error") else f"error: {t['error'][:80]}"
        if t["status"] == "stopped early":
            status = f"stopped early by ASHA after {t.get('training_reports')} training reports"
        lines.append(f"| {t.get('rank') or '-'} | {t['trial_id']} | {t['label']} | {pct(t, 'safety')} | "
                     f"{pct(t, 'utility')} | {value} | {objective_interval(t)} | "
                     f"{noise.get(t.get('within_noise_of_best'), '-')} | {t.get('feasible', '-')} | {status} |")
    ranked_by = f"Ranked by {RANK_BY_WORDS[rank_by]} (tune.objective.rank_by: {rank_by})."
    return "\n".join(lines + ["", f"{ranked_by} {noise_summary(trials, rank_by)}", "",
                              "Brackets: safety and utility with every rate at the ends of its 95% Wilson interval; "
                              "objective interval: the objective computed from those ends (feasibility uses the point "
                              "values). A trial is within noise of the best when its interval reaches the best's "
                              "lower bound."]) + "\n"


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
    _error_bars(ax, [t for t in done if t.get("utility_low") is not None])
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


def _error_bars(ax: Any, trials: list[dict[str, Any]]) -> None:
    """Each trial's safety and utility at the ends of its rates' 95% intervals: points whose bars overlap are not
    told apart by the eval set, whatever the Pareto front says."""
    if not trials:
        return

    def spans(name: str) -> list[list[float]]:
        return [[100 * (t[name] - t[f"{name}_low"]) for t in trials], [100 * (t[f"{name}_high"] - t[name]) for t in trials]]

    ax.errorbar([100 * t["safety"] for t in trials], [100 * t["utility"] for t in trials], xerr=spans("safety"),
                yerr=spans("utility"), fmt="none", ecolor="lightgray", elinewidth=1, zorder=0, label="95% intervals")


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


def _write_best(path: str, cfg: LookaheadConfig, best: dict[str, Any], ranked: list[dict[str, Any]]) -> str:
    trained = trial_config(cfg, best["overrides"], "the best trial").to_dict()
    trained.pop("tune")
    trained["output_dir"] = None
    trained["data"]["output_dir"] = trained["train"]["output_dir"] = trained["eval"]["output_dir"] = None
    trained["train"]["run_name"] = "best"
    near = [t for t in ranked if t.get("within_noise_of_best") is True]
    rank_by = cfg.tune.objective.rank_by
    # Comments, not keys: best.yaml is a training config, and its schema has no place for the search's verdict.
    header = (f"# The best trial of the search in {storage.parent(path)} ({best['trial_id']}: {best['label']}; objective "
              f"{best['objective']:.4f}, safety {best.get('safety', 0):.3f}, utility {best.get('utility', 0):.3f}).\n"
              "# Train the final model on the full data with it (check first with --dry-run):\n"
              f"#   lookahead-ray train --config {path} --output-dir OUT/best\n"
              # Each line after "# " reads as YAML, its note a YAML comment.
              f"# objective_interval: {objective_interval(best)}  # every rate at the ends of its 95% Wilson interval\n"
              f"# rank_by: {rank_by}  # ranked by {RANK_BY_WORDS[rank_by]}\n"
              f"# within_noise_of_best: {yaml.safe_dump([t['trial_id'] for t in near], default_flow_style=True).strip()}"
              + (f"  # {'; '.join(t['label'] for t in near)}" if near else "") + "\n"
              "#   (trials whose objective interval reaches this trial's lower bound: the eval set does not tell them "
              "apart from it)\n")
    with storage.atomic_file(path) as f:
        f.write(header + yaml.safe_dump(trained, sort_keys=False))
    return str(path)
