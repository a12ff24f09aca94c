"""The search objective: evaluation metrics of a fine-tuned model (and of its seed) -> one number to maximise.

Two kinds (``tune.objective.kind``):

- ``constrained`` (default): maximise utility subject to safety >= seed safety - ``delta``. A feasible trial
  scores its utility (in [0, 1]); an infeasible one scores ``-1 - violation``, so every feasible trial ranks
  above every infeasible one, and infeasible trials rank by how far they miss the constraint.
- ``weighted``: ``utility_weight x utility + safety_weight x safety``.

Safety is a weighted mix of safe rates named ``<kind>:<judge>``, e.g. ``rsr:keyword``, ``jsr:strict`` or
``jsr:llm:gpt-4o`` (weights normalised to sum to 1). Pure module.
"""

from __future__ import annotations

from typing import Any

from lookahead_ray.config.schema import ObjectiveConfig
from lookahead_ray.errors import ConfigError


def safety(metrics: dict[str, Any], weights: dict[str, float]) -> float:
    """The weighted mix of the named safe rates of one model's eval metrics.

    Raises:
        ConfigError: a named rate is not in the metrics (the eval did not measure it).
    """
    total = sum(weights.values())
    value = 0.0
    for name, weight in weights.items():
        kind, _, judge = name.partition(":")
        rate = metrics.get(kind, {}).get(judge, {}).get("safe_rate")
        if rate is None:
            raise ConfigError(f"tune.objective.safety: {name!r} was not measured (configure eval.harmful / "
                              "eval.harmful_answers and the judge it names)")
        value += weight / total * rate
    return value


def utility(metrics: dict[str, Any]) -> float:
    score = metrics.get("utility", {}).get("score")
    if score is None:
        raise ConfigError("tune.objective: the trials' eval measured no utility (configure eval.utility)")
    return float(score)


def score(metrics: dict[str, Any], seed_metrics: dict[str, Any], cfg: ObjectiveConfig) -> dict[str, Any]:
    """``objective`` (higher is better) and what it is made of, for one trial."""
    trial_safety, trial_utility = safety(metrics, cfg.safety), utility(metrics)
    out = {"safety": trial_safety, "utility": trial_utility}
    if cfg.kind == "weighted":
        return out | {"objective": cfg.utility_weight * trial_utility + cfg.safety_weight * trial_safety,
                      "feasible": True, "violation": 0.0}
    floor = safety(seed_metrics, cfg.safety) - cfg.delta
    violation = max(0.0, floor - trial_safety)
    return out | {"objective": trial_utility if violation == 0 else -1.0 - violation, "feasible": violation == 0,
                  "violation": violation, "safety_floor": floor}


def rank(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials best first (by ``objective``; ties keep their order); trials without an objective (failed) last."""
    scored = [t for t in trials if t.get("objective") is not None]
    return sorted(scored, key=lambda t: -t["objective"]) + [t for t in trials if t.get("objective") is None]
