"""The runner against a real vhostx daemon and the guest model (no DPDK needed): results written
incrementally, Ctrl-C mid-run keeps them and leaves no process behind, a refused backend is
reported and skipped while the others go on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.harness.runner import Runner
from bench.harness.scenario import parse_scenario
from bench.harness.scenario_model import Backend
from bench.harness.system import alive as _alive


def scenario(**run: Any) -> Any:
    return parse_scenario({
        "name": "unit",
        "run": {"duration": 0.3, "warmup": 0.1, "repeats": 3, **run},
        "backends": [{"name": "vx", "kind": "vhostx", "mode": "baseline"}],
        "tests": [{"name": "pp", "kind": "pingpong", "devices": 2}],
    })


def test_ctrl_c_mid_run_keeps_results_and_stops_every_process(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def hook(point: str, rec: dict[str, Any]) -> None:
        if point == "window":
            seen.append(rec)
            if rec["index"] == 1:
                raise KeyboardInterrupt

    doc = Runner(scenario(), tmp_path, progress=False, hook=hook, plots=True).run()
    assert doc["interrupted"] is True and doc["complete"] is False
    assert [r["index"] for r in doc["runs"]] == [0, 1]
    first, second = doc["runs"]
    assert first["error"] is None and first["metrics"]["latency"]["count"] > 0
    assert second["error"] == "interrupted"
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["interrupted"] is True and len(on_disk["runs"]) == 2
    assert (tmp_path / "report.md").read_text().count("INTERRUPTED") == 1
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    pids = [p for r in doc["runs"] for p in r["backend_pids"]]
    assert len(pids) == 2
    assert not [p for p in pids if _alive(p)]


def test_runs_written_incrementally_with_raw_samples(tmp_path: Path) -> None:
    counts: list[int] = []

    def hook(point: str, rec: dict[str, Any]) -> None:
        if point == "started" and rec["index"] > 0:
            counts.append(len(json.loads((tmp_path / "results.json").read_text())["runs"]))

    doc = Runner(scenario(repeats=2), tmp_path, progress=False, hook=hook, plots=False).run()
    assert counts == [1]  # the first run was on disk before the second started
    assert doc["complete"] is True
    run = json.loads(next((tmp_path / "runs").glob("000-*.json")).read_text())
    lat = run["metrics"]["latency"]
    assert len(run["rtt_ns"]) == lat["count"] > 0
    assert lat["p50_us"] <= lat["p99_us"] <= lat["p99_9_us"] <= lat["max_us"]
    assert run["dimensions"]["commit"] and run["metrics"]["backend_cpu"]["threads"]
    assert sum(run["metrics"]["per_flow"]) == lat["count"]
    assert run["metrics"]["memory"]["rss_without_guest_mb"] > 0


def test_refused_backend_is_skipped_and_others_go_on(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sc = parse_scenario({
        "name": "unit2", "run": {"duration": 0.2, "warmup": 0.1, "repeats": 2,
                                  "max_extra_repeats": 0},
        "modes": {"probe": "none"},
        "backends": [{"name": "bad", "kind": "vhostx", "mode": "baseline"},
                     {"name": "good", "kind": "vhostx", "mode": "baseline"}],
        "tests": [{"name": "pp", "kind": "pingpong"}],
    })
    bad = sc.backends[0]
    # a parameter value the daemon itself refuses at start-up (the file check is bypassed)
    broken = Backend(**{**bad.__dict__, "params": (("workers", 0),)})
    sc = replace(sc, backends=(broken, sc.backends[1]))
    doc = Runner(sc, tmp_path, progress=False, plots=False).run()
    by = {(r["backend"], r["rep"]): r for r in doc["runs"]}
    assert by[("bad", 0)]["error"] and "did not start" in by[("bad", 0)]["error"]
    assert by[("bad", 1)]["skipped"]
    assert by[("good", 0)]["error"] is None and by[("good", 1)]["error"] is None
    assert "bad" in doc["unavailable"]


def test_client_mbuf_pool_fills_every_ring_and_no_more() -> None:
    """The pool holds every RX and TX ring's worth plus cache and burst slack (the reference
    command's 16384 at least); not a fixed 1024 per port, whose cold surplus halved a 32-port
    client's rate (docs/bench-results/README.md)."""
    from bench.harness.backends import auto_mbufs

    assert auto_mbufs(1, 1) == 16384
    assert auto_mbufs(8, 1) == 16384  # 8 x (256 + 256) = 4096 fits under the floor
    assert auto_mbufs(32, 1) == 32 * 2 * 256 + 2048
    assert auto_mbufs(8, 4, 1024) == 8 * 4 * 2 * 1024 + 2048
    for ports, queues, qs in ((32, 1, 0), (16, 2, 512), (3, 3, 4096)):
        need = ports * queues * 2 * (qs or 256)
        assert need < auto_mbufs(ports, queues, qs) <= max(16384, need + 2048)
