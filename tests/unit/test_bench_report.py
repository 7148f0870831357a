"""Summary, markdown, plots and run order of the harness, on synthetic runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench.harness.plots import make_plots
from bench.harness.report import markdown, summarize
from bench.harness.runner import plan
from bench.harness.scenario import parse_scenario

RAW: dict[str, Any] = {
    "name": "syn",
    "run": {"repeats": 3, "reference": "dpdk"},
    "backends": [{"name": "vx", "kind": "vhostx"}, {"name": "sh", "kind": "vhostx",
                                                     "mode": "shared"},
                 {"name": "dpdk", "kind": "dpdk"}],
    "tests": [{"name": "tx", "kind": "stream", "sweep": {"devices": [1, 4]}},
              {"name": "pp", "kind": "pingpong"}],
}


def test_plan_interleaves_backends_within_each_repetition() -> None:
    sc = parse_scenario(RAW)
    order = [(c.label, rep, b.name) for c, rep, b in plan(sc)]
    assert order[:6] == [("tx[devices=1]", 0, "vx"), ("tx[devices=1]", 0, "sh"),
                         ("tx[devices=1]", 0, "dpdk"), ("tx[devices=1]", 1, "vx"),
                         ("tx[devices=1]", 1, "sh"), ("tx[devices=1]", 1, "dpdk")]
    assert len(order) == 3 * 3 * 3
    assert [o[0] for o in order[9:10]] == ["tx[devices=4]"]


def _run(case: str, test: str, kind: str, backend: str, rep: int, pps: float,
         devices: int = 1, **extra: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {"pps": pps, "bps": pps * 512, "backend_cpu": {
        "total": 0.5, "cores": {"1": 0.5}}, "client_cpu": {"total": 1.0}, "clean": True,
        "notifications": {"per_packet": {"kicks": 0.01, "interrupts": 0.02,
                                          "poll_switches": 0.0}},
        "memory": {"rss_without_guest_mb": 30.0}}
    metrics.update(extra)
    return {"case": case, "test": test, "kind": kind, "backend": backend, "rep": rep,
            "params": {"devices": devices}, "metrics": metrics, "error": None, "skipped": None}


def synthetic() -> tuple[Any, list[dict[str, Any]]]:
    sc = parse_scenario(RAW)
    runs = []
    for devices in (1, 4):
        case = f"tx[devices={devices}]"
        for rep, (a, b) in enumerate([(8e6, 10e6), (9e6, 10e6), (6e6, 12e6)]):
            runs.append(_run(case, "tx", "stream", "vx", rep, a * devices, devices))
            runs.append(_run(case, "tx", "stream", "dpdk", rep, b * devices, devices))
        runs.append({**_run(case, "tx", "stream", "sh", 0, 0.0, devices), "metrics": {},
                     "skipped": "vhostx (sh) did not start: mode refused"})
    for rep in range(3):
        lat = {"p50_us": 20.0 + rep, "p99_us": 50.0, "p99_9_us": 90.0}
        r = _run("pp", "pp", "pingpong", "vx", rep, 1e4, latency=lat)
        r["_rtt_ns"] = [20000 + 10 * i for i in range(500)]
        runs.append(r)
        d = _run("pp", "pp", "pingpong", "dpdk", rep, 2e4,
                 latency={"p50_us": 10.0, "p99_us": 25.0, "p99_9_us": 30.0})
        d["_rtt_ns"] = [10000 + 10 * i for i in range(500)]
        runs.append(d)
    return sc, runs


def test_summary_ratios_come_from_same_repetition_pairs() -> None:
    sc, runs = synthetic()
    summary = summarize(sc, runs)
    tx1 = next(e for e in summary if e["case"] == "tx[devices=1]")
    r = tx1["ratios"]["vx"]["pps"]
    assert r["values"] == pytest.approx([0.8, 0.9, 0.5])
    assert r["median"] == pytest.approx(0.8) and r["min"] == pytest.approx(0.5)
    assert r["max"] == pytest.approx(0.9) and r["pairs"] == 3
    assert tx1["backends"]["vx"]["pps"] == pytest.approx(8e6)
    assert tx1["backends"]["sh"]["ok"] == 0 and "mode refused" in tx1["backends"]["sh"]["errors"][0]
    assert tx1["ratios"]["sh"]["pps"]["pairs"] == 0
    pp = next(e for e in summary if e["case"] == "pp")
    assert pp["ratios"]["vx"]["p50_us"]["median"] == pytest.approx(2.1)
    assert pp["ratios"]["vx"]["p50_us"]["higher_is_better"] is False
    assert "dpdk" not in pp["ratios"]  # the reference has no ratio with itself


def _doc(sc: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"scenario": {"name": sc.name, "description": "synthetic", "reference": sc.reference},
            "dimensions": {"commit": "abc", "dirty": True, "machine": {"cpu": "x", "nproc": 2,
                                                                     "memory_kb": 1 << 20},
                           "backends": {"vx": {"kind": "vhostx", "mode": "baseline"}}},
            "complete": True, "interrupted": False, "planned_runs": 27,
            "runs": [{k: v for k, v in r.items() if k != "_rtt_ns"} for r in runs],
            "summary": summarize(sc, runs)}


def test_markdown_tables() -> None:
    sc, runs = synthetic()
    text = markdown(_doc(sc, runs), plots=["plots/latency_cdf.png"])
    assert "## Throughput" in text and "## Latency" in text
    assert "| tx[devices=1] | vx | 8.000 |" in text
    assert "**0.80** (0.50-0.90, n=3)" in text
    assert "(dirty tree)" in text
    assert "## Failed or skipped runs" in text and "mode refused" in text
    assert "![plots/latency_cdf.png](plots/latency_cdf.png)" in text
    json.dumps(_doc(sc, runs))  # the document is JSON-serialisable


def test_plots_are_nonempty_pngs(tmp_path: Path) -> None:
    sc, runs = synthetic()
    made = make_plots(_doc(sc, runs), runs, tmp_path / "plots")
    assert set(made) == {"plots/throughput_vs_devices.png", "plots/latency_cdf.png",
                         "plots/cpu_vs_load.png", "plots/notifications.png"}
    for rel in made:
        data = (tmp_path / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_skip_what_does_not_apply(tmp_path: Path) -> None:
    sc, runs = synthetic()
    only_tx1 = [copy.deepcopy(r) for r in runs if r["case"] == "tx[devices=1]"]
    for r in only_tx1:
        r["metrics"].pop("notifications", None)
    made = make_plots(_doc(sc, only_tx1), only_tx1, tmp_path / "p")
    assert "p/throughput_vs_devices.png" not in made  # one device count: no curve
    assert "p/latency_cdf.png" not in made
