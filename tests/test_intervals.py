"""95% Wilson intervals of rates and their table cells, against published values and the formula itself."""

from __future__ import annotations

import math

import pytest

from lookahead_ray.eval.intervals import count_ci95, format_rate, rate_cell, wilson_interval


def _wilson_by_hand(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The textbook formula, written out independently: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = successes / n
    centre = p + z ** 2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    return (centre - spread) / (1 + z ** 2 / n), (centre + spread) / (1 + z ** 2 / n)


@pytest.mark.parametrize("successes, n, expected", [
    (0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0)),
])
def test_wilson_interval_matches_known_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=1e-4) and high == pytest.approx(expected[1], abs=1e-4)


@pytest.mark.parametrize("successes, n", [(17, 20), (1, 30), (2, 7), (29, 30)])
def test_wilson_interval_matches_the_formula(successes, n):
    assert wilson_interval(successes, n) == pytest.approx(_wilson_by_hand(successes, n), abs=1e-12)
    low, high = wilson_interval(successes, n)
    assert 0 <= low < successes / n < high <= 1


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) is None and count_ci95([]) is None
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0  # exactly, not 1e-17 off
    assert wilson_interval(17, 20) == pytest.approx((0.6396, 0.9476), abs=1e-4)
    assert wilson_interval(1, 30) == pytest.approx((0.0059, 0.1667), abs=1e-4)
    wide, narrow = wilson_interval(3, 4), wilson_interval(75, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more prompts, tighter interval
    assert count_ci95([True, False, 1, 0, None]) == list(wilson_interval(2, 5))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_rate_cells():
    assert format_rate(0.85, wilson_interval(17, 20)) == "85.0 [64.0-94.8]"
    assert format_rate(0.85) == "85.0" and format_rate(None) == "-" and format_rate(float("nan"), [0, 1]) == "-"
    assert rate_cell({"n": 20, "safe_rate": 0.85, "ci95": [0.6396, 0.9476]}) == "85.0 [64.0-94.8]"
    assert rate_cell({"task": "gsm8k", "score": 0.5, "ci95": [0.2366, 0.7634]}) == "50.0 [23.7-76.3]"
    assert rate_cell({"task": "samsum", "score": 0.3125}) == "31.2"  # ROUGE: no interval
    assert rate_cell(None) == "-" and rate_cell({"safe_rate": None, "ci95": None}) == "-"
