"""Statistics of a benchmark: percentiles, median ratios with their spread, CDF points.

Pure functions over lists of numbers; any thread.

- `percentile(values, q)`: numpy's percentile (its default "linear" method: interpolation between
  closest ranks), q in [0, 100]; NaN for an empty list.
- `Ratio.of(ratios)`: median, min, max, spread in percent of the median and the number of pairs
  of per-pair ratios (the pairs themselves: `modes.same_mode_pairs`, by repetition and within one
  machine mode).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy

__all__ = ["Ratio", "cdf_points", "latency_summary", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    if not values:
        return math.nan
    return float(numpy.percentile(values, q))  # method "linear": between closest ranks


@dataclass(frozen=True)
class Ratio:
    median: float
    min: float
    max: float
    spread_pct: float  # (max - min) / median * 100
    pairs: int
    values: tuple[float, ...]

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Ratio:
        if not ratios:
            return cls(math.nan, math.nan, math.nan, math.nan, 0, ())
        med = statistics.median(ratios)
        lo, hi = min(ratios), max(ratios)
        spread = (hi - lo) / med * 100 if med else math.nan
        return cls(med, lo, hi, spread, len(ratios), tuple(ratios))


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    """count, min, p50, p90, p99, p99.9, max and mean of round-trip times, in microseconds."""
    if not samples_ns:
        return {"count": 0}
    us = [s / 1000.0 for s in samples_ns]
    return {
        "count": len(us),
        "min_us": min(us),
        "p50_us": percentile(us, 50),
        "p90_us": percentile(us, 90),
        "p99_us": percentile(us, 99),
        "p99_9_us": percentile(us, 99.9),
        "max_us": max(us),
        "mean_us": statistics.fmean(us),
    }


def cdf_points(values: Sequence[float], max_points: int = 2000) -> tuple[list[float], list[float]]:
    """(x, F(x)) of the empirical CDF, thinned to at most `max_points` (keeps both ends)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return [], []
    step = max(1, n // max_points)
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return [xs[i] for i in idx], [(i + 1) / n for i in idx]
