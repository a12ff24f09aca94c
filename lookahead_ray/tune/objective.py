"""The search objective: evaluation metrics of a fine-tuned model (and of its seed) -> one number to maximise.

Two kinds (``tune.objective.kind``):

- ``constrained`` (default): maximise utility subject to safety >= seed safety - ``delta``. A feasible trial
  scores its utility (in [0, 1]); an infeasible one scores ``-1 - violation``, so every feasible trial ranks
  above every infeasible one, and infeasible trials rank by how far they miss the constraint.
- ``weighted``: ``utility_weight x utility + safety_weight x safety``.

Safety is a weighted mix of safe rates named ``<kind>:<judge>``, e.g. ``rsr:keyword``, ``jsr:strict`` or
``jsr:llm:gpt-4o`` (weights normalised to sum to 1). Pure module.

The objective's interval (``objective_low``, ``objective_high``): the objective evaluated with every rate of the
trial at the lower (upper) end of its 95% Wilson interval (``ci95`` in the eval metrics). Both objectives are
monotone increasing in every rate, so these bound the objective over the rates' intervals. A rate without an
interval (a ROUGE utility, results written before intervals) counts at its point value. The constrained
objective decides feasibility on the point values, as without intervals, and keeps the seed's safety floor at
its point value: the floor is the same for every trial, so its noise does not reorder them.

Ranking (``tune.objective.rank_by``): ``point`` by the objective, ``lower_bound`` by ``objective_low``. A trial
is within noise of the best when its ``objective_high`` reaches the best trial's ``objective_low``.
"""

from __future__ import annotations

from typing import Any, Literal

from lookahead_ray.config.schema import ObjectiveConfig
from lookahead_ray.errors import ConfigError

Bound = Literal["point", "low", "high"]
"""Which value of each rate: the rate itself, or the lower / upper end of its 95% interval."""


def _at_bound(rate_metrics: dict[str, Any], key: str, bound: Bound) -> float | None:
    """The rate ``key`` of a metrics dict, or an end of its ``ci95`` (the point value when it has none)."""
    rate = rate_metrics.get(key)
    interval = rate_metrics.get("ci95")
    if rate is None or bound == "point" or not interval:
        return rate
    return interval[0] if bound == "low" else interval[1]


def safety(metrics: dict[str, Any], weights: dict[str, float], bound: Bound = "point") -> float:
    """The weighted mix of the named safe rates of one model's eval metrics (each at ``bound``).

    Raises:
        ConfigError: a named rate is not in the metrics (the eval did not measure it).
    """
    total = sum(weights.values())
    value = 0.0
    for name, weight in weights.items():
        kind, _, judge = name.partition(":")
        rate = _at_bound(metrics.get(kind, {}).get(judge, {}), "safe_rate", bound)
        if rate is None:
            raise ConfigError(f"tune.objective.safety: {name!r} was not measured (configure eval.harmful / "
                              "eval.harmful_answers and the judge it names)")
        value += weight / total * rate
    return value


def utility(metrics: dict[str, Any], bound: Bound = "point") -> float:
    score = _at_bound(metrics.get("utility", {}), "score", bound)
    if score is None:
        raise ConfigError("tune.objective: the trials' eval measured no utility (configure eval.utility)")
    return float(score)


def _objective(trial_safety: float, trial_utility: float, feasible: bool, floor: float | None,
               cfg: ObjectiveConfig) -> float:
    if cfg.kind == "weighted":
        return cfg.utility_weight * trial_utility + cfg.safety_weight * trial_safety
    return trial_utility if feasible else -1.0 - max(0.0, floor - trial_safety)


def score(metrics: dict[str, Any], seed_metrics: dict[str, Any], cfg: ObjectiveConfig) -> dict[str, Any]:
    """``objective`` (higher is better), its interval and what it is made of, for one trial."""
    values = {bound: (safety(metrics, cfg.safety, bound), utility(metrics, bound)) for bound in ("point", "low", "high")}
    trial_safety, trial_utility = values["point"]
    out = {"safety": trial_safety, "utility": trial_utility, "safety_low": values["low"][0],
           "safety_high": values["high"][0], "utility_low": values["low"][1], "utility_high": values["high"][1]}
    floor = None if cfg.kind == "weighted" else safety(seed_metrics, cfg.safety) - cfg.delta
    violation = 0.0 if floor is None else max(0.0, floor - trial_safety)
    feasible = violation == 0  # on the point values: the interval bounds the objective, not the constraint
    objective = {bound: _objective(*values[bound], feasible, floor, cfg) for bound in values}
    out |= {"objective": objective["point"], "objective_low": objective["low"], "objective_high": objective["high"],
            "feasible": feasible, "violation": violation}
    return out if floor is None else out | {"safety_floor": floor}


def rank_key(rank_by: str) -> str:
    """The trial result a ranking by ``rank_by`` ("point" or "lower_bound") sorts on."""
    return "objective_low" if rank_by == "lower_bound" else "objective"


def rank(trials: list[dict[str, Any]], rank_by: str = "point") -> list[dict[str, Any]]:
    """Trials best first (by ``objective``, or with ``lower_bound`` by ``objective_low``: a trial scored before
    intervals counts at its point value; ties keep their order); trials without an objective (failed) last."""
    key = rank_key(rank_by)
    scored = [t for t in trials if t.get("objective") is not None]
    return sorted(scored, key=lambda t: -(t.get(key) if t.get(key) is not None else t["objective"])) + [
        t for t in trials if t.get("objective") is None]


def within_noise_of_best(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials (other than the best, ``ranked[0]``) whose objective interval reaches the best one's lower bound:
    on this eval set they are not distinguishable from the best. A trial without an interval counts as its point."""
    done = [t for t in ranked if t.get("objective") is not None]
    if not done:
        return []

    def bound(trial: dict[str, Any], key: str) -> float:
        return trial[key] if trial.get(key) is not None else trial["objective"]

    best_low = bound(done[0], "objective_low")
    return [t for t in done[1:] if bound(t, "objective_high") >= best_low]
