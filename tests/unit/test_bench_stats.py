"""Harness statistics on known inputs: percentiles, paired median ratios and their spread."""

from __future__ import annotations

import math

import pytest

from bench.harness.modes import same_mode_pairs
from bench.harness.stats import Ratio, cdf_points, latency_summary, percentile


def test_percentile_linear_interpolation() -> None:
    xs = [4, 1, 3, 2]  # unsorted on purpose
    assert percentile(xs, 0) == 1
    assert percentile(xs, 100) == 4
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 25) == pytest.approx(1.75)
    assert percentile(list(range(1001)), 99.9) == pytest.approx(999.0)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_pairs_by_repetition_within_one_mode() -> None:
    a = {0: ("one", 10.0), 1: ("one", 12.0), 2: ("one", 9.0), 3: ("one", 5.0)}
    b = {0: ("one", 5.0), 1: ("one", 4.0), 2: ("one", 9.0)}  # rep 3 of B missing: left out
    r = Ratio.of(same_mode_pairs(a, b)["by_mode"]["one"])
    assert r.values == (2.0, 3.0, 1.0)
    assert r.median == 2.0 and r.min == 1.0 and r.max == 3.0 and r.pairs == 3
    assert r.spread_pct == pytest.approx(100.0)


def test_pairs_skip_failed_zero_and_cross_mode() -> None:
    p = same_mode_pairs({0: ("fast", 1.0), 1: ("fast", None), 2: ("fast", 3.0),
                         3: ("fast", float("nan")), 4: ("fast", 2.0), 5: ("mixed", 1.0)},
                        {0: ("fast", 2.0), 1: ("fast", 1.0), 2: ("fast", 0.0), 3: ("fast", 1.0),
                         4: ("slow", 1.0), 5: ("mixed", 1.0)})
    assert p["by_mode"] == {"fast": [0.5]} and p["cross_mode"] == 2
    empty = Ratio.of(same_mode_pairs({}, {0: ("one", 1.0)})["by_mode"].get("one", []))
    assert empty.pairs == 0 and math.isnan(empty.median)


def test_ratio_even_count_median() -> None:
    assert Ratio.of([1.0, 2.0, 3.0, 10.0]).median == 2.5


def test_latency_summary_ordered_and_in_microseconds() -> None:
    ns = [1000 * i for i in range(1, 10001)]  # 1..10000 us
    s = latency_summary(ns)
    assert s["count"] == 10000
    assert s["min_us"] == 1 and s["max_us"] == 10000
    assert s["min_us"] <= s["p50_us"] <= s["p90_us"] <= s["p99_us"] <= s["p99_9_us"] <= s["max_us"]
    assert s["p50_us"] == pytest.approx(5000.5)
    assert s["p99_us"] == pytest.approx(9900.01)
    assert latency_summary([]) == {"count": 0}


def test_cdf_points() -> None:
    xs, ys = cdf_points([3, 1, 2])
    assert xs == [1, 2, 3] and ys == pytest.approx([1 / 3, 2 / 3, 1.0])
    xs, ys = cdf_points(list(range(10000)), max_points=100)
    assert len(xs) <= 102 and xs[0] == 0 and xs[-1] == 9999 and ys[-1] == 1.0
    assert cdf_points([]) == ([], [])
