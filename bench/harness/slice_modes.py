"""Rates by machine mode from window slices: every part of every run, not whole runs, per mode.

The machine's mode flips on a time scale of about a second, inside one process (a kept-running
DPDK pair measured four times for 1 s gave 5.6, 13.7, 11.6, 13.9 Mpps), so pairing whole runs
of one mode (bench/harness/modes.py) leaves most runs out, and a probe before and after a run
(another workload) says little about the run's own window. Each run's window is also recorded in
equal parts (``run["mode_probe"]["slices"]``: packets/s of each part). This module pools those
parts per stream case, over every successful run of every backend, and splits the pool into two
modes with `modes.boundary` (each side at least MIN_SIDE slices, goodness of variance fit at
least SLICE_FIT). Per backend it gives the slices in each mode, the share in the slow mode, the
median rate of its fast and of its slow slices, and each median over the reference backend's
median in the same mode. A pool of one mode gives one median per backend and its ratio.

Why SLICE_FIT (0.7) is below the probe's 0.8 (`modes.PROBE_FIT`): a slice lasts 0.5 s or more,
so many straddle a flip and lie between the modes; the pooled slices of the stream cases of
seven scenarios measured 2026-12-02 split with a fit of 0.77-0.91 where their centres were 1.8x
or more apart. An even spread
of values reaches a fit of 0.75, so a spread without clusters passes the fit; what rejects it is
the gap between the centres (an even spread passes only when it spans gap squared, 3.2x at the
default 1.8, while one mode's slices vary by less than 1.5x). The fit rejects a pool whose
split only cuts off a tail (a few stalled parts).

Pooling assumes every backend sees both modes. When one backend's slices fall nearly all on one
side and another's on the other, the split may follow the backends' own speeds rather than the
machine's mode: the case gets a warning.

Only stream cases (``kind = "stream"``): a ping-pong's slices are round trips per second, an
idle run has none. Pure; any thread.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .modes import FAST, ONE, SLOW, label_of, positive_rates, two_clusters

__all__ = ["APART", "MIN_SIDE", "SLICE_FIT", "markdown_section", "slice_modes", "summary_lines"]

SLICE_FIT = 0.7  # share of the log variance a split of the pooled slices must explain
MIN_SIDE = 2  # slices each mode needs: one disturbed part is not a mode
APART = 0.7  # slow shares of two backends this far apart: the split may follow the backends


def _ok_stream(run: Mapping[str, Any]) -> bool:
    return run.get("kind") == "stream" and not run.get("error") and not run.get("skipped")


def _slices(run: Mapping[str, Any]) -> list[float]:
    return positive_rates((run.get("mode_probe") or {}).get("slices") or [])


def slice_modes(runs: Sequence[Mapping[str, Any]], reference: str, gap: float,
                min_fit: float = SLICE_FIT) -> dict[str, Any]:
    """The slice-level estimate of every stream case with slices: {"gap", "min_fit",
    "min_side", "reference", "cases": [per case: "case", "slices", "modes" (1 or 2), "cut"
    (None with one mode), "fit", "centres" {slow, fast} of the best split, "backends": {name:
    {"runs", "slices" {mode: n}, "slow_share", "median" {mode: pps}, "ratio" {mode: median
    over the reference's median in that mode, None without one}}}, "warnings"]}."""
    by_case: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for r in runs:
        if _ok_stream(r) and _slices(r):
            by_case.setdefault(str(r.get("case")), {}).setdefault(str(r.get("backend")),
                                                                   []).append(r)
    cases = [_case(label, backends, reference, gap, min_fit)
             for label, backends in by_case.items()]
    return {"gap": gap, "min_fit": min_fit, "min_side": MIN_SIDE, "reference": reference,
            "cases": cases}


def _case(label: str, backends: Mapping[str, Sequence[Mapping[str, Any]]], reference: str,
          gap: float, min_fit: float) -> dict[str, Any]:
    pools = {name: [v for r in rs for v in _slices(r)] for name, rs in backends.items()}
    pooled = [v for vs in pools.values() for v in vs]
    split = two_clusters(pooled, MIN_SIDE)
    two = split is not None and split.ratio >= gap and split.fit >= min_fit
    cut = split.cut if two and split is not None else None
    modes = (FAST, SLOW) if two else (ONE,)
    out: dict[str, Any] = {
        "case": label, "slices": len(pooled), "modes": len(modes), "cut": cut,
        "fit": split.fit if split is not None else None,
        "centres": ({"slow": split.low, "fast": split.high} if split is not None else None),
        "backends": {}, "warnings": []}
    medians: dict[str, dict[str, float | None]] = {}
    for name, vs in pools.items():
        labelled: dict[str, list[float]] = {m: [] for m in modes}
        for v in vs:
            labelled[label_of(v, cut)].append(v)
        medians[name] = {m: statistics.median(x) if x else None for m, x in labelled.items()}
        out["backends"][name] = {
            "runs": len(backends[name]), "slices": {m: len(x) for m, x in labelled.items()},
            "slow_share": len(labelled[SLOW]) / len(vs) if two else None,
            "median": medians[name]}
    ref = medians.get(reference)
    for name, b in out["backends"].items():
        b["ratio"] = {}
        if name == reference:
            continue
        for m, med in medians[name].items():
            base = (ref or {}).get(m)
            b["ratio"][m] = med / base if med is not None and base else None
    if ref is None:
        out["warnings"].append(f"the reference {reference!r} has no slices in this case: "
                               "no ratios")
    shares = {n: b["slow_share"] for n, b in out["backends"].items()
              if b["slow_share"] is not None}
    if len(shares) > 1 and max(shares.values()) - min(shares.values()) >= APART:
        hi, lo = max(shares, key=shares.__getitem__), min(shares, key=shares.__getitem__)
        out["warnings"].append(
            f"{hi} has {shares[hi]:.0%} of its slices slow, {lo} {shares[lo]:.0%}: the cut may "
            "separate the backends' own speeds, not the machine's modes")
    return out


# ----------------------------------------------------------------------------------------------
# rendering


def _mpps(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown_section(doc: Mapping[str, Any] | None) -> list[str]:
    """## Rates by machine mode (window slices): one table for the cases whose slices form two
    modes, one for those with one, the rule of the cut, and the warnings."""
    if not doc or not doc.get("cases"):
        return []
    cases = doc["cases"]
    ref = doc.get("reference", "")
    lines = ["## Rates by machine mode (window slices)", "",
             (f"- the cut: a case's window slices (packets/s of equal parts of each successful "
              f"run's window, every backend pooled) split in two where the sum of squares of "
              f"their logarithms within the two clusters is least, each side at least "
              f"{doc.get('min_side')} slices; two modes when the clusters' geometric means are "
              f"at least {doc.get('gap')}x apart and the split explains at least "
              f"{doc.get('min_fit')} of the variance (fit); the cut is the geometric midpoint of "
              f"the two means"),
             (f"- per backend: slices in each mode, the share in the slow mode, the median of "
              f"its slices in each mode, and that median over **{ref}**'s median in the same "
              "mode (ratio)"), ""]
    two = [c for c in cases if c["modes"] == 2]
    one = [c for c in cases if c["modes"] != 2]
    if two:
        lines += [("| case | cut Mpps (fit) | backend | slices fast / slow | slow share | "
                   "fast Mpps | fast ratio | slow Mpps | slow ratio |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in two:
            for name, b in c["backends"].items():
                n, med, rt = b["slices"], b["median"], b["ratio"]
                is_ref = name == ref
                lines.append(
                    f"| {c['case']} | {_mpps(c['cut'])} ({c['fit']:.2f}) | {name} | "
                    f"{n[FAST]} / {n[SLOW]} | {b['slow_share']:.0%} | {_mpps(med[FAST])} | "
                    f"{'ref' if is_ref else _ratio(rt.get(FAST))} | {_mpps(med[SLOW])} | "
                    f"{'ref' if is_ref else _ratio(rt.get(SLOW))} |")
        lines.append("")
    if one:
        lines += ["| case (one mode) | best split: centres Mpps (fit) | backend | slices | Mpps | ratio |",
                  "|---|---|---|---|---|---|"]
        for c in one:
            cen = c.get("centres")
            where = (f"{_mpps(cen['slow'])} / {_mpps(cen['fast'])} ({c['fit']:.2f})" if cen
                     else "-")
            for name, b in c["backends"].items():
                lines.append(f"| {c['case']} | {where} | {name} | {b['slices'][ONE]} | "
                             f"{_mpps(b['median'][ONE])} | "
                             f"{'ref' if name == ref else _ratio(b['ratio'].get(ONE))} |")
        lines.append("")
    warns = [f"- warning: {c['case']}: {w}" for c in cases for w in c.get("warnings") or []]
    if warns:
        lines += warns + [""]
    return lines


def summary_lines(doc: Mapping[str, Any] | None) -> list[str]:
    """One short line per case for the end of a run: the cut and every compared backend's
    ratios per mode with its slow share."""
    out = []
    ref = (doc or {}).get("reference", "")
    for c in (doc or {}).get("cases") or []:
        parts = []
        for name, b in c["backends"].items():
            if name == ref:
                continue
            if c["modes"] == 2:
                parts.append(f"{name} fast {_ratio(b['ratio'].get(FAST))} slow "
                             f"{_ratio(b['ratio'].get(SLOW))} ({b['slow_share']:.0%} slow)")
            else:
                parts.append(f"{name} {_ratio(b['ratio'].get(ONE))}")
        head = (f"cut {_mpps(c['cut'])} Mpps" if c["modes"] == 2 else "one mode")
        out.append(f"{c['case']:<28} slices vs {ref}: {head}; " + "; ".join(parts)
                   + (" (see warnings)" if c.get("warnings") else ""))
    return out
