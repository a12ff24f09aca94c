"""Results as a paper-style table and plots, shared by ``eval`` and the demo.

Every number in a table is formatted from the results dict (``results.json``), never computed here: the
intervals too (``ci95``, see :mod:`lookahead_ray.eval.intervals`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lookahead_ray.eval.intervals import format_rate, rate_cell

SafetyColumn = tuple[str, str]
"""(kind, judge): kind "rsr" or "jsr", judge a judge name such as "keyword", "keyword@10", "strict"."""


def _safety_columns(results: dict[str, Any]) -> list[SafetyColumn]:
    columns: list[SafetyColumn] = []
    for metrics in results["models"].values():
        for kind in ("rsr", "jsr"):
            columns += [(kind, judge) for judge in metrics.get(kind, {}) if (kind, judge) not in columns]
    return columns


def results_table(results: dict[str, Any],
                  safety_columns: list[SafetyColumn] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and one row per model: safe rates and utility in % with their 95% Wilson intervals, e.g.
    "85.0 [64.0-94.8]" (a ROUGE utility, or results written before intervals, shows the rate alone), KL in nats
    ("-" where not measured).

    ``safety_columns`` picks and orders the (kind, judge) columns; by default every one in the results.
    """
    columns = safety_columns if safety_columns is not None else _safety_columns(results)
    utility_has_interval = any("ci95" in m.get("utility", {}) for m in results["models"].values())
    header = ["model"] + [f"{kind.upper()} ({judge}) % [95% CI]" for kind, judge in columns] + [
        "utility % [95% CI]" if utility_has_interval else "utility %", "benign refusal % [95% CI]", "KL@1 harmful",
        "mean KL harmful"]
    rows = []
    for name, metrics in results["models"].items():
        row = [name] + [rate_cell(metrics.get(kind, {}).get(judge), "safe_rate") for kind, judge in columns]
        row += [rate_cell(metrics.get("utility"), "score"),
                format_rate(metrics.get("benign_refusal_rate"), metrics.get("benign_refusal_ci95"))]
        kl = metrics.get("drift", {}).get("harmful", {}).get("kl")
        valid = [x for x in kl or [] if not math.isnan(x)]
        row += [f"{kl[0]:.3f}" if kl and not math.isnan(kl[0]) else "-",
                f"{sum(valid) / len(valid):.3f}" if valid else "-"]
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report_table(results: dict[str, Any], safety_columns: list[SafetyColumn] | None = None) -> str:
    """:func:`results_table` as Markdown."""
    return markdown_table(*results_table(results, safety_columns))


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, ax: Any, path: str, title: str, legend_size: int = 8,
                arrange: Callable[[Any], None] | None = None, **legend: Any) -> None:
    """Title, grid and legend, then write ``path`` (a path or a URI, atomically) and free the figure.
    ``arrange(fig)`` runs once the layout is final (e.g. to move labels apart)."""
    from lookahead_ray.storage import atomic_file

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, **legend)
    fig.tight_layout()
    if arrange is not None:
        arrange(fig)
    with atomic_file(str(path), binary=True) as f:
        fig.savefig(f, dpi=120, format="png")
    pyplot().close(fig)


def plot_drift(drift: dict[str, dict[str, dict[str, list[float]]]], path: str) -> None:
    """Line plot of KL per answer position: one line per (model, prompt kind)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, kinds in drift.items():
        for kind, values in kinds.items():
            ax.plot(range(1, len(values["kl"]) + 1), values["kl"], marker="o",
                    linestyle="-" if kind == "harmful" else "--", label=f"{model} ({kind})")
    ax.set_xlabel("answer token position")
    ax.set_ylabel("KL(seed || model)")
    save_figure(fig, ax, path, "First-token drift from the seed model")


def plot_safety_vs_utility(results: dict[str, Any], path: str, judge: str = "strict") -> None:
    """Scatter of each model's RSR and JSR (by ``judge``) against its utility."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, metrics in results["models"].items():
        utility = 100 * metrics["utility"]["score"]
        for kind, marker in (("rsr", "o"), ("jsr", "^")):
            ax.scatter(utility, 100 * metrics[kind][judge]["safe_rate"], marker=marker, s=60,
                       label=f"{name} {kind.upper()}")
    ax.set_xlabel("utility: held-out task accuracy (%)")
    ax.set_ylabel(f"safe rate, {judge} judge (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    save_figure(fig, ax, path, "Safety vs utility per variant", legend_size=7, ncol=2)
