"""95% Wilson score intervals for rates that are proportions over prompts, and their table cells. Pure module.

On a 30-prompt set one answer moves a rate by 3.3 points, so a rate alone overstates what a comparison shows;
every proportion in the results carries its interval as ``ci95: [lo, hi]``. Wilson rather than the normal
approximation: it stays inside [0, 1] and keeps a useful width at 0/n and n/n, which small eval sets often hit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

Z95 = 1.959964
"""The standard normal quantile of 0.975: a two-sided 95% interval."""

RATE_KEYS = ("safe_rate", "score", "rate")
"""The keys a metrics dict names its rate by (judge summaries, utility, anything else), in that order."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes`` out of ``n``, clamped to [0, 1]; None when ``n`` is 0.

    Raises:
        ValueError: ``successes`` outside 0..n.
    """
    if n == 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: {successes} successes out of {n}")
    share = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (share + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n)) / denominator
    # At 0/n and n/n the bound is exactly 0 or 1; rounding in centre -/+ half_width would leave ~1e-17.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


def ci95(successes: int, n: int) -> list[float] | None:
    """:func:`wilson_interval` as results.json stores it (a list, which JSON round-trips unchanged)."""
    interval = wilson_interval(successes, n)
    return list(interval) if interval is not None else None


def count_ci95(outcomes: Iterable[Any]) -> list[float] | None:
    """The interval of a sequence of per-sample outcomes (truthy = success): exact counts, never a rounded rate."""
    values = [bool(outcome) for outcome in outcomes]
    return ci95(sum(values), len(values))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_rate(rate: float | None, interval: Iterable[float] | None = None) -> str:
    """A rate in percent with one decimal and its interval in brackets, e.g. ``"85.0 [64.0-94.8]"``; just the
    rate when it has no interval (ROUGE, or results written before intervals), "-" when it was not measured."""
    if _is_missing(rate):
        return "-"
    cell = f"{100 * rate:.1f}"
    if interval is None:
        return cell
    low, high = interval
    return f"{cell} [{100 * low:.1f}-{100 * high:.1f}]"


def rate_cell(metrics: dict[str, Any] | None, key: str | None = None) -> str:
    """:func:`format_rate` of a metrics dict holding a rate and its ``ci95`` (a judge's summary, a category,
    ``utility``); ``key`` names the rate, by default the first of :data:`RATE_KEYS` it has."""
    metrics = metrics or {}
    if key is None:
        key = next((k for k in RATE_KEYS if k in metrics), RATE_KEYS[0])
    return format_rate(metrics.get(key), metrics.get("ci95"))
