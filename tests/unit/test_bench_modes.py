"""Machine modes on synthetic results: bimodal runs pair only within a mode, one mode pairs all,
a run that changed mode midway is flagged and left out, too few same-mode pairs is reported as
such, and the runner adds repetitions (bounded) until it has enough."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.harness import runner as runner_mod
from bench.harness.modes import (
    FAST,
    MIXED,
    ONE,
    PROBE_FIT,
    SLOW,
    assign_modes,
    boundary,
    rtt_slices,
    slice_count,
    slices_step,
    two_clusters,
)
from bench.harness.report import markdown, summarize
from bench.harness.scenario import ScenarioError, parse_scenario
from bench.harness.scenario_model import ModeSettings

FAST_PROBE, SLOW_PROBE = 17e6, 5.2e6


def scenario(**run: Any) -> Any:
    return parse_scenario({
        "name": "modes",
        "run": {"repeats": 4, "reference": "dpdk", **run},
        "backends": [{"name": "vx", "kind": "vhostx"}, {"name": "dpdk", "kind": "dpdk"}],
        "tests": [{"name": "tx", "kind": "stream"}],
    })


def make_run(backend: str, rep: int, pps: float, probe: tuple[float | None, float | None],
        slices: list[float] | None = None, index: int = 0) -> dict[str, Any]:
    return {"index": index, "case": "tx", "test": "tx", "kind": "stream", "backend": backend,
            "rep": rep, "params": {"devices": 1}, "error": None, "skipped": None,
            "metrics": {"pps": pps, "bps": pps * 512, "backend_cpu": {"total": 1.0}},
            "mode_probe": {"before": probe[0], "after": probe[1],
                           "slices": slices if slices is not None else [pps] * 4}}


def bimodal() -> list[dict[str, Any]]:
    """vhostx is 0.9x DPDK in either mode; the slow mode is a third of the fast one. Reps 0 and
    2 both fast, rep 1 both slow, rep 3 vhostx slow but DPDK fast (a cross-mode pair: 0.3x)."""
    fast, slow = (FAST_PROBE, FAST_PROBE), (SLOW_PROBE, SLOW_PROBE)
    plan = [(fast, fast), (slow, slow), (fast, fast), (slow, fast)]
    runs = []
    for rep, (pv, pd) in enumerate(plan):
        vx = 0.9 * (15e6 if pv == fast else 5e6)
        dp = 15e6 if pd == fast else 5e6
        runs.append(make_run("vx", rep, vx, pv, index=2 * rep))
        runs.append(make_run("dpdk", rep, dp, pd, index=2 * rep + 1))
    return runs


def test_boundary_splits_two_clusters_and_only_by_the_gap() -> None:
    # the cut is the geometric midpoint of the two clusters' geometric means
    assert boundary([5e6, 5.3e6, 16.8e6, 17.4e6], 1.8) == pytest.approx(
        (5e6 * 5.3e6 * 16.8e6 * 17.4e6) ** 0.25)
    assert boundary([15e6, 16e6, 17e6, 12e6], 1.8) is None  # noise, not a second mode
    assert boundary([5e6], 1.8) is None and boundary([], 1.8) is None
    assert boundary([0, None, float("nan"), 4e6, 12e6], 1.8) is not None
    # one lone low value (a disturbed probe) is not a second mode when two are required
    assert boundary([1500, 16e6, 16.5e6, 17e6, 17.2e6], 1.8, min_side=2) is None
    assert boundary([5e6, 5.1e6, 16e6, 17e6], 1.8, min_side=2) is not None


def test_boundary_sees_two_modes_bridged_by_values_measured_while_the_mode_changed() -> None:
    """Probes taken while the mode flipped (8-12 Mpps) fill the gap between a cluster at 5 and
    one at 15 Mpps: no neighbour pair is 1.8x apart, yet the values are plainly bimodal."""
    slow = [4.7e6, 4.8e6, 4.9e6, 5.0e6, 5.0e6, 5.1e6, 5.2e6, 5.3e6, 5.7e6, 6.0e6]
    fast = [14.0e6, 14.4e6, 14.6e6, 15.0e6, 15.2e6, 15.4e6, 15.8e6, 16.2e6, 16.5e6, 16.9e6]
    bridge = [7.9e6, 9.6e6, 10.0e6, 12.8e6]
    values = slow + bridge + fast
    assert max(b / a for a, b in zip(sorted(values), sorted(values)[1:])) < 1.8
    s = two_clusters(values, min_side=2)
    assert s is not None and s.ratio >= 1.8 and s.fit >= PROBE_FIT
    cut = boundary(values, 1.8, min_side=2)
    assert cut is not None and 6.0e6 < cut < 14.0e6
    assert cut == pytest.approx((s.low * s.high) ** 0.5)
    # a fit threshold the split does not reach: one mode
    assert boundary(values, 1.8, min_side=2, min_fit=0.999) is None
    # one cluster spread evenly over the same range is not two modes
    spread = [4.7e6 * 1.1 ** k for k in range(13)]
    assert boundary(spread, 1.8, min_side=2) is None


def test_bimodal_runs_pair_only_within_a_mode() -> None:
    sc = scenario(min_pairs=2)
    runs = bimodal()
    entry = summarize(sc, runs)[0]
    labels = [r["machine_mode"]["label"] for r in runs]
    assert labels == [FAST, FAST, SLOW, SLOW, FAST, FAST, SLOW, FAST]
    r = entry["ratios"]["vx"]["pps"]
    assert r["mode"] == FAST and r["pairs"] == 2 and r["median"] == pytest.approx(0.9)
    assert r["by_mode"][SLOW]["values"] == pytest.approx([0.9])
    assert r["cross_mode_pairs"] == 1  # rep 3's 0.3x is never used
    assert r["enough"] is True
    assert entry["mixed_modes"] is True
    assert entry["backends"]["vx"]["runs_per_mode"] == {FAST: 2, SLOW: 2}
    assert entry["backends"]["dpdk"]["runs_per_mode"] == {FAST: 3, SLOW: 1}
    # medians are of the case's main mode only
    assert entry["backends"]["dpdk"]["pps"] == pytest.approx(15e6)
    assert entry["backends"]["vx"]["by_mode"][SLOW]["pps"] == pytest.approx(4.5e6)


def test_bimodal_report_says_the_modes_were_mixed() -> None:
    sc = scenario(min_pairs=2)
    runs = bimodal()
    doc = {"scenario": {"name": "modes", "reference": "dpdk"}, "runs": runs,
           "summary": summarize(sc, runs), "planned_runs": 8, "complete": True,
           "modes": {**assign_modes(runs, sc.modes), "probe": "on", "min_pairs": 2,
                     "max_extra_repeats": 4}}
    md = markdown(doc)
    assert "## Machine modes" in md and "modes were MIXED" in md
    assert "`vx`: 2 fast, 2 slow" in md and "`dpdk`: 3 fast, 1 slow" in md
    assert "**0.90** (0.90-0.90, n=2, fast) [slow 0.90 n=1]" in md


def test_all_one_mode_pairs_every_repetition() -> None:
    sc = scenario()
    runs = []
    for rep, (a, b) in enumerate([(14e6, 16e6), (15e6, 15e6), (13e6, 16.5e6), (15.5e6, 15e6)]):
        runs.append(make_run("vx", rep, a, (16.9e6, 17.2e6)))
        runs.append(make_run("dpdk", rep, b, (17.1e6, 16.8e6)))
    entry = summarize(sc, runs)[0]
    assert {r["machine_mode"]["label"] for r in runs} == {ONE}
    r = entry["ratios"]["vx"]["pps"]
    assert r["pairs"] == 4 and r["cross_mode_pairs"] == 0 and r["mode"] == ONE
    assert entry["mixed_modes"] is False
    assert assign_modes(runs, sc.modes)["boundary"] is None


def test_mode_switch_midway_is_flagged_and_never_paired() -> None:
    sc = scenario(min_pairs=2)
    runs = bimodal()
    # rep 0 of vx: the probes agree, but its window stepped from 15 to 5 Mpps halfway
    runs[0]["mode_probe"]["slices"] = [15e6, 15e6, 5.1e6, 5e6]
    # rep 2 of dpdk: probe before fast, after slow
    runs[5]["mode_probe"]["after"] = SLOW_PROBE
    modes = assign_modes(runs, sc.modes)
    assert runs[0]["machine_mode"]["label"] == MIXED
    assert runs[5]["machine_mode"]["label"] == MIXED and "after slow" in runs[5][
        "machine_mode"]["why"]
    assert modes["changed_midway"] == [0, 5]
    entry = summarize(sc, runs)[0]
    r = entry["ratios"]["vx"]["pps"]
    assert r["pairs"] == 1 and r["cross_mode_pairs"] == 3
    assert entry["backends"]["vx"]["mode_changed_runs"] == [0]
    assert slices_step([15e6, 15e6, 5e6, 5.2e6], 1.8)
    assert slices_step([5e6, 5e6, 16e6, 15e6, 17e6], 1.8)
    assert not slices_step([15e6, 12e6, 14e6, 13e6], 1.8)


def test_a_disturbed_part_of_the_window_is_not_a_mode_change() -> None:
    """A busy machine stalls one part of a window now and then: a dip, or a slow last part, is
    noise, not a step (a change that stays is the probes' to see)."""
    assert not slices_step([15e6, 4e6, 15e6, 15e6], 1.8)  # a dip
    assert not slices_step([15e6, 15e6, 15e6, 4e6], 1.8)  # one slow last part
    assert not slices_step([15e6, 4e6, 15e6, 4e6], 1.8)  # back and forth
    assert not slices_step([15e6, 5e6], 1.8)  # too few parts for two blocks
    assert not slices_step([15e6, 15e6, 0.0, 5e6], 1.8)  # a part that moved nothing
    assert slice_count(1.0, 4) == 2 and slice_count(5.0, 4) == 4 and slice_count(0.3, 4) == 1


def test_not_enough_same_mode_pairs_is_reported_as_such() -> None:
    sc = scenario(min_pairs=3)
    runs = bimodal()
    summary = summarize(sc, runs)
    r = summary[0]["ratios"]["vx"]["pps"]
    assert r["pairs"] == 2 and r["enough"] is False and r["min_pairs"] == 3
    doc = {"scenario": {"name": "modes", "reference": "dpdk"}, "runs": runs, "summary": summary,
           "modes": {**assign_modes(runs, sc.modes), "probe": "on", "min_pairs": 3,
                     "max_extra_repeats": 0}}
    md = markdown(doc)
    assert "NOT ENOUGH PAIRS (< 3)" in md
    assert "tx / vx pps: not enough same-mode pairs (2 < 3; 1 across modes left out)" in md


def test_without_a_probe_each_backend_is_clustered_on_its_own_runs() -> None:
    sc = scenario(min_pairs=1)
    runs = bimodal()
    for r in runs:
        r["mode_probe"]["before"] = r["mode_probe"]["after"] = None
    modes = assign_modes(runs, sc.modes)
    assert modes["detector"] == "cluster"
    assert [r["machine_mode"]["label"] for r in runs] == [FAST, FAST, SLOW, SLOW, FAST, FAST,
                                                           SLOW, FAST]
    # a backend whose runs form one cluster cannot be matched to the other's modes
    for r in runs:
        if r["backend"] == "dpdk":
            r["metrics"]["pps"] = 15e6
    summary = summarize(sc, runs)
    assert {r["machine_mode"]["label"] for r in runs if r["backend"] == "dpdk"} == {ONE}
    assert summary[0]["ratios"]["vx"]["pps"]["pairs"] == 0


def test_probe_that_misses_a_split_gives_a_warning() -> None:
    sc = scenario()
    runs = [make_run("vx", rep, pps, (FAST_PROBE, FAST_PROBE))
            for rep, pps in enumerate([15e6, 5e6, 15e6, 5e6])]
    runs += [make_run("dpdk", rep, 15e6, (SLOW_PROBE, SLOW_PROBE)) for rep in range(4)]
    modes = assign_modes(runs, sc.modes)
    assert len(modes["warnings"]) == 1 and "tx / vx" in modes["warnings"][0]


def test_rtt_slices_show_a_latency_step() -> None:
    rtts = [10_000] * 100 + [30_000] * 100
    assert rtt_slices(rtts, 4) == pytest.approx([1e5, 1e5, 1e9 / 30_000, 1e9 / 30_000])
    assert slices_step(rtt_slices(rtts, 4), 1.8)
    assert rtt_slices(rtts[:5], 4) == [] and rtt_slices(rtts, 1) == []


def test_modes_table_is_checked() -> None:
    raw = {"backends": [{"kind": "dpdk"}], "tests": [{"kind": "stream"}]}
    assert parse_scenario(raw).modes == ModeSettings()
    sc = parse_scenario({**raw, "modes": {"probe": "none", "gap": 2.5, "slices": 1}})
    assert sc.modes == ModeSettings(probe="none", gap=2.5, slices=1)
    with pytest.raises(ScenarioError, match="probe"):
        parse_scenario({**raw, "modes": {"probe": "memcpy"}})
    with pytest.raises(ScenarioError, match="did you mean 'gap'"):
        parse_scenario({**raw, "modes": {"gapp": 2}})
    with pytest.raises(ScenarioError, match=r"min_pairs = 200: out of range"):
        parse_scenario({**raw, "run": {"min_pairs": 200}})
    run = parse_scenario({**raw, "run": {"repeats": 5}}).run
    assert run.pairs_wanted == 3 and run.extra_limit == 5


# ---- the runner's extra repetitions, with synthetic runs (no processes) ----------------------


def _fake_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe_for: Any,
                 **run: Any) -> dict[str, Any]:
    sc = parse_scenario({
        "name": "extra", "run": {"repeats": 2, "reference": "dpdk", **run},
        "modes": {"probe": "none"},
        "backends": [{"name": "vx", "kind": "vhostx"}, {"name": "dpdk", "kind": "dpdk"}],
        "tests": [{"name": "tx", "kind": "stream"}],
    })

    def fake_run_one(self: Any, index: int, case: Any, rep: int, backend: Any) -> dict[str, Any]:
        before, after, pps = probe_for(backend.name, rep)
        rec = make_run(backend.name, rep, pps, (before, after), index=index)
        return {**rec, "params": {"devices": 1, "pingpong_alongside": False}}

    monkeypatch.setattr(runner_mod.Runner, "_run_one", fake_run_one)
    monkeypatch.setattr(runner_mod.system, "dimensions", lambda: {"commit": "x"})
    return runner_mod.Runner(sc, tmp_path, progress=False, plots=False).run()


def test_runner_repeats_until_enough_same_mode_pairs(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # reps 0 and 1 cross modes (vx slow, dpdk fast); from rep 2 on both are fast
    def probe_for(name: str, rep: int) -> tuple[float, float, float]:
        slow = name == "vx" and rep < 2
        p = SLOW_PROBE if slow else FAST_PROBE
        return p, p, (5e6 if slow else 15e6)

    doc = _fake_runner(tmp_path, monkeypatch, probe_for, min_pairs=2, max_extra_repeats=5)
    assert doc["extra_runs"] == 4  # two more repetitions of both backends
    assert [r["rep"] for r in doc["runs"]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(r.get("extra") for r in doc["runs"][4:])
    r = doc["summary"][0]["ratios"]["vx"]["pps"]
    assert r["pairs"] == 2 and r["enough"] and r["cross_mode_pairs"] == 2
    assert doc["modes"]["runs_per_mode"]["vx"] == {FAST: 2, SLOW: 2}
    sm = doc["slice_modes"]["cases"][0]  # window slices pooled: vx 8 slow, 8 fast
    assert sm["modes"] == 2 and sm["backends"]["vx"]["slices"] == {FAST: 8, SLOW: 8}
    assert "## Rates by machine mode (window slices)" in (tmp_path / "report.md").read_text()


def test_runner_extra_repetitions_are_bounded(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def probe_for(name: str, rep: int) -> tuple[float, float, float]:
        p = SLOW_PROBE if name == "vx" else FAST_PROBE  # never the same mode
        return p, p, 5e6 if name == "vx" else 15e6

    doc = _fake_runner(tmp_path, monkeypatch, probe_for, min_pairs=1, max_extra_repeats=1)
    assert doc["extra_runs"] == 2 and len(doc["runs"]) == 6
    r = doc["summary"][0]["ratios"]["vx"]["pps"]
    assert r["pairs"] == 0 and r["enough"] is False and r["cross_mode_pairs"] == 3
    assert "not enough same-mode pairs (0 < 1; 3 across modes left out)" in (
        tmp_path / "report.md").read_text()


def test_command_line_overrides_of_the_mode_settings() -> None:
    sc = scenario().with_overrides(min_pairs=2, max_extra_repeats=0, probe="none")
    assert sc.run.pairs_wanted == 2 and sc.run.extra_limit == 0 and sc.modes.probe == "none"
    with pytest.raises(ScenarioError, match="--max-extra-repeats -2: out of range"):
        scenario().with_overrides(max_extra_repeats=-2)
    with pytest.raises(ScenarioError, match="--probe 'memcpy'"):
        scenario().with_overrides(probe="memcpy")


def test_runner_adds_no_repetitions_when_a_backend_always_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def probe_for(name: str, rep: int) -> tuple[float, float, float]:
        return FAST_PROBE, FAST_PROBE, 0.0 if name == "vx" else 15e6  # vx: 0 pps = no rate

    original = runner_mod.Runner._write_run

    def failing(self: Any, rec: dict[str, Any]) -> None:
        if rec["backend"] == "vx":
            rec["error"] = "RuntimeError: backend did not start"
        original(self, rec)

    monkeypatch.setattr(runner_mod.Runner, "_write_run", failing)
    doc = _fake_runner(tmp_path, monkeypatch, probe_for, min_pairs=2, max_extra_repeats=5)
    assert doc["extra_runs"] == 0 and len(doc["runs"]) == 4
