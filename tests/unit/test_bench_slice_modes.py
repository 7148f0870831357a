"""Rates by machine mode from window slices, on synthetic runs: ratios per mode against the
reference, a pool of one mode, failed runs and non-stream cases left out, the warning when the
cut follows the backends, and the report section."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from bench.cli import main
from bench.harness.modes import FAST, ONE, SLOW
from bench.harness.report import markdown
from bench.harness.slice_modes import markdown_section, slice_modes, summary_lines


def run(backend: str, slices: list[float], case: str = "tx", kind: str = "stream",
        **extra: Any) -> dict[str, Any]:
    return {"case": case, "test": case, "kind": kind, "backend": backend, "rep": 0,
            "params": {"devices": 1}, "error": None, "skipped": None, "metrics": {"pps": max(slices, default=0.0)},
            "mode_probe": {"before": None, "after": None, "slices": slices}, **extra}


def jitter(level: float, n: int) -> list[float]:
    """`n` values within +-4% of `level`, whose median is `level` when `n` is a multiple of 3."""
    return [level * f for f, _ in zip(itertools.cycle([1.0, 0.96, 1.04]), range(n),
                                       strict=False)]


def two_mode_runs() -> list[dict[str, Any]]:
    """The machine flips within runs. DPDK (the reference) 15 Mpps fast, 5 slow; vx 12 fast
    (0.8x), 5 slow (1.0x): the reference is faster in the fast mode only. Two parts caught a
    flip and lie in between (7 Mpps: slow, 9.5: fast)."""
    dp_fast, dp_slow = jitter(15e6, 9), jitter(5e6, 9)
    vx_fast, vx_slow = jitter(12e6, 6), jitter(5e6, 12)
    return [
        run("vx", vx_fast[:3] + vx_slow[:4] + [7e6]),
        run("dpdk", dp_fast[:4] + dp_slow[:4]),
        run("vx", vx_slow[4:] + vx_fast[3:]),
        run("dpdk", dp_slow[4:] + [9.5e6] + dp_fast[4:]),
    ]


def test_ratios_per_mode_against_the_reference() -> None:
    doc = slice_modes(two_mode_runs(), "dpdk", 1.8)
    assert doc["min_fit"] == 0.7 and doc["min_side"] == 2
    (case,) = doc["cases"]
    assert case["case"] == "tx" and case["modes"] == 2 and case["slices"] == 38
    assert 6e6 < case["cut"] < 11e6 and not case["warnings"]
    vx, dp = case["backends"]["vx"], case["backends"]["dpdk"]
    assert vx["slices"] == {FAST: 6, SLOW: 13} and dp["slices"] == {FAST: 10, SLOW: 9}
    assert vx["median"] == {FAST: pytest.approx(12e6), SLOW: pytest.approx(5e6)}
    assert dp["median"] == {FAST: pytest.approx(15e6), SLOW: pytest.approx(5e6)}
    assert vx["ratio"] == {FAST: pytest.approx(0.8), SLOW: pytest.approx(1.0)}
    assert vx["slow_share"] == pytest.approx(13 / 19)
    assert dp["ratio"] == {}  # the reference has no ratio with itself


def test_a_pool_of_one_mode_gives_one_median_and_ratio() -> None:
    runs = [run("vx", jitter(13.5e6, 8)), run("dpdk", jitter(15e6, 8)),
            run("vx", [14e6, 12e6, 13e6, 13.5e6]), run("dpdk", [16e6, 14e6, 15e6, 15.5e6])]
    (case,) = slice_modes(runs, "dpdk", 1.8)["cases"]
    assert case["modes"] == 1 and case["cut"] is None
    vx = case["backends"]["vx"]
    assert vx["slices"] == {ONE: 12} and vx["slow_share"] is None
    assert vx["ratio"][ONE] == pytest.approx(13.5 / 15, rel=0.02)
    section = "\n".join(markdown_section({"reference": "dpdk", "gap": 1.8, "min_fit": 0.7,
                                          "min_side": 2, "cases": [case]}))
    assert "| case (one mode) |" in section and "| tx |" in section
    assert summary_lines({"reference": "dpdk", "cases": [case]})[0].endswith("one mode; vx 0.90")


def test_failed_runs_and_other_kinds_are_left_out() -> None:
    runs = two_mode_runs()
    # a failed run's parts would drag vx's slow median down; a skipped one has garbage; a
    # ping-pong's slices are round trips per second
    runs.append(run("vx", [1e6] * 8, error="RuntimeError: testpmd died"))
    runs.append(run("vx", [2e7] * 8, skipped="vhostx (vx) did not start"))
    runs.append(run("vx", [4e4] * 8, case="pp", kind="pingpong"))
    runs.append(run("dpdk", [], case="tx"))  # no slices recorded
    doc = slice_modes(runs, "dpdk", 1.8)
    assert [c["case"] for c in doc["cases"]] == ["tx"]
    assert doc["cases"][0] == slice_modes(two_mode_runs(), "dpdk", 1.8)["cases"][0]


def test_a_cut_between_the_backends_gives_a_warning() -> None:
    """vx twice as fast as DPDK all along: the pool splits, but by backend, not by mode."""
    runs = [run("vx", jitter(28e6, 8)), run("dpdk", jitter(14e6, 8))] * 2
    (case,) = slice_modes(runs, "dpdk", 1.8)["cases"]
    assert case["modes"] == 2 and case["backends"]["dpdk"]["slow_share"] == 1.0
    assert len(case["warnings"]) == 1 and "separate the backends" in case["warnings"][0]


def test_report_has_the_section_also_for_older_documents() -> None:
    runs = two_mode_runs()
    doc: dict[str, Any] = {"scenario": {"name": "syn", "reference": "dpdk"}, "runs": runs,
                           "summary": [], "modes": {"gap": 1.8}}
    old = markdown(doc)  # written before slice_modes existed: computed from the runs
    doc["slice_modes"] = slice_modes(runs, "dpdk", 1.8)
    new = markdown(doc)
    assert "## Rates by machine mode (window slices)" in old and old == new
    assert "| case | cut Mpps (fit) | backend | slices fast / slow |" in new
    row = next(line for line in new.splitlines() if line.startswith("| tx |")
               and "| vx |" in line)
    assert "| 0.80 |" in row and "| 1.00 |" in row
    assert "geometric midpoint" in new
    line = summary_lines(doc["slice_modes"])[0]
    assert line.startswith("tx") and "vx fast 0.80 slow 1.00" in line


def test_bench_report_renders_again_by_the_current_rules(tmp_path: Path) -> None:
    """A results.json written when the probe rule saw one mode (probes taken during flips
    bridged the gap) and before slice_modes existed: `bench report` labels its runs again and
    adds the slice section; results.json stays as it was."""
    runs = two_mode_runs()
    probes = [(5.0e6, 5.2e6), (7.9e6, 9.6e6), (15.0e6, 16.0e6), (10.0e6, 12.8e6)]
    for rep, (r, (before, after)) in enumerate(zip(runs, probes, strict=True)):
        r.update(rep=rep // 2, index=rep)
        r["mode_probe"].update(before=before, after=after)
    runs += [{**run(name, jitter(level, 3)), "rep": 2, "index": 4 + i,
              "mode_probe": {"before": level, "after": level * 1.02, "slices": []}}
             for i, (name, level) in enumerate([("vx", 4.8e6), ("dpdk", 16.5e6)])]
    raw = {"name": "syn", "run": {"repeats": 3, "reference": "dpdk"},
           "backends": [{"name": "vx", "kind": "vhostx"}, {"name": "dpdk", "kind": "dpdk"}],
           "tests": [{"name": "tx", "kind": "stream"}]}
    stale = {"scenario": {"name": "syn", "raw": raw, "reference": "dpdk"}, "runs": runs,
             "summary": [], "complete": True, "planned_runs": 6,
             "modes": {"detector": "probe", "boundary": None, "gap": 1.8, "probe": "on",
                       "min_pairs": 1, "max_extra_repeats": 0}}
    (tmp_path / "results.json").write_text(json.dumps(stale))
    assert main(["bench", "report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Rates by machine mode (window slices)" in text
    cut = float(text.split("; boundary ")[1].split(" Mpps")[0])
    assert 6.0 < cut < 14.0  # two probe modes now, bridged or not
    assert json.loads((tmp_path / "results.json").read_text()) == stale
    assert main(["bench", "report", str(tmp_path / "missing")]) == 2
