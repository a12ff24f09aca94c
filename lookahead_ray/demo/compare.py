"""The demo's methods table (`demo --methods`): every method's safety, utility, drift and cost on one world.

One row per model: strict RSR / JSR and utility (no preview at test time) with 95% Wilson intervals over the
prompts, KL@1 on harmful prompts, the share of harmful prompts answered in task mode, and the mean optimizer-step
time against vanilla's. Over several world seeds each cell is mean [min-max], with the Wilson interval of all the
seeds' prompts pooled. Every number comes from ``results.json``; nothing is computed here but the intervals.
"""

from __future__ import annotations

from typing import Any

from lookahead_ray.eval.intervals import wilson_interval

RATES = [("strict RSR", ("rsr", "strict")), ("strict JSR", ("jsr", "strict")), ("utility", ("utility",))]


def _rate_node(metrics: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = metrics
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def rate_counts(metrics: dict[str, Any], path: tuple[str, ...]) -> tuple[int, int] | None:
    """(successes, prompts) of one rate that eval gave an interval (a share of prompts; a ROUGE score is not one)."""
    node = _rate_node(metrics, path)
    if node is None or "ci95" not in node:
        return None
    rate, n = node.get("safe_rate", node.get("score")), node.get("n")
    return (node["correct"] if "correct" in node else round(rate * n), n) if isinstance(rate, (int, float)) and n \
        else None


def _rate_cell(metrics: dict[str, Any], path: tuple[str, ...]) -> str:
    from lookahead_ray.eval.intervals import rate_cell

    node = _rate_node(metrics, path)
    return "-" if node is None else rate_cell(node)


def _cost_cell(seconds: float | None, baseline: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f}" + (f" ({seconds / baseline:.2f}x)" if baseline else "")


def methods_table(results: dict[str, Any]) -> str:
    """Markdown: one demo run's models, rates with 95% Wilson intervals."""
    mechanism = results.get("demo", {}).get("mechanism", {})
    baseline = mechanism.get("vanilla", {}).get("step_seconds")
    header = ["model"] + [f"{name} % [95% CI]" for name, _ in RATES] + [
        "KL@1 harmful", "harmful: task-mode %", "step s (x vanilla)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, metrics in results["models"].items():
        kl = (metrics.get("drift", {}).get("harmful", {}).get("kl") or [None])[0]
        task = (mechanism.get(model, {}).get("answer_types") or {}).get("task")
        cells = [_rate_cell(metrics, path) for _, path in RATES]
        cells += ["-" if kl is None else f"{kl:.2f}", "-" if task is None else f"{100 * task:.1f}",
                  _cost_cell(mechanism.get(model, {}).get("step_seconds"), baseline)]
        lines.append("| " + " | ".join([model] + cells) + " |")
    return "\n".join(lines)


def pooled_counts(per_seed_results: list[dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """{model: {rate: [successes, prompts]}} summed over world seeds."""
    pooled: dict[str, dict[str, list[int]]] = {}
    for results in per_seed_results:
        for model, metrics in results["models"].items():
            for name, path in RATES:
                counts = rate_counts(metrics, path)
                if counts is not None:
                    total = pooled.setdefault(model, {}).setdefault(name, [0, 0])
                    total[0] += counts[0]
                    total[1] += counts[1]
    return pooled


def aggregate_methods_table(aggregate: dict[str, dict[str, Any]], pooled: dict[str, dict[str, list[int]]]) -> str:
    """Markdown over world seeds: mean [min-max] per cell, and each rate's Wilson interval over the pooled prompts."""
    from lookahead_ray.demo.mechanism import format_value

    baseline = (aggregate.get("vanilla", {}).get("step time") or {}).get("mean")
    header = ["model"] + [f"{name} % mean [min-max] (pooled 95% CI)" for name, _ in RATES] + [
        "KL@1 harmful", "harmful: task-mode %", "step s (x vanilla)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, numbers in aggregate.items():
        cells = []
        for name, _ in RATES:
            counts = pooled.get(model, {}).get(name)
            interval = wilson_interval(*counts) if counts and counts[1] else None
            suffix = f" ({100 * interval[0]:.1f}-{100 * interval[1]:.1f})" if interval else ""
            cells.append(format_value(numbers.get(name), "%") + suffix)
        step = numbers.get("step time")
        cells += [format_value(numbers.get("KL@1 harmful"), "nats"), format_value(numbers.get("harmful: task-mode"), "%"),
                  _cost_cell(step["mean"], baseline) if step else "-"]
        lines.append("| " + " | ".join([model] + cells) + " |")
    return "\n".join(lines)
