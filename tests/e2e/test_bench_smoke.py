"""The shipped `smoke` scenario, for real: vhostx baseline vs DPDK's vhost PMD (testpmd), one
device 64 B guest TX, plus a short ping-pong. Checks the structure and the sanity of the output:
non-zero rates, ratios computed from the same run's samples, ordered latency percentiles,
dimensions present, every process gone. Under a minute."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from bench.cli import main
from bench.harness.system import alive as _alive
from bench.testpmd import find_testpmd

pytestmark = [pytest.mark.dpdk, pytest.mark.timeout(180)]


def test_smoke_scenario(tmp_path: Path) -> None:
    if find_testpmd() is None:
        pytest.skip("dpdk-testpmd not found (Debian package dpdk-dev)")
    out = tmp_path / "smoke"
    rc = main(["bench", "run", "smoke", "--out", str(out), "--no-progress"])
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and doc["interrupted"] is False
    assert doc["planned_runs"] == 8 and len(doc["runs"]) == 8 + doc["extra_runs"]
    modes = doc["modes"]
    assert modes["probe"] == "on" and modes["detector"] == "probe"
    for r in doc["runs"]:  # the reference probe measured the machine around every run (a busy
        # machine may give a probe that moved nothing: 0 is a measurement, None a failed probe)
        assert r["mode_probe"]["before"] is not None, r["index"]
        assert r["mode_probe"]["after"] is not None, r["index"]
        assert len(r["mode_probe"]["slices"]) == 2, r["index"]  # 1 s windows: 2 parts of 0.5 s
        assert r["machine_mode"]["label"] in ("fast", "slow", "one", "mixed")
    assert sum(modes["runs_per_mode"]["dpdk"].values()) == len(doc["runs"]) // 2

    dims = doc["dimensions"]
    for key in ("commit", "dirty", "kernel", "python", "dpdk", "qemu", "time"):
        assert key in dims, key
    assert dims["machine"]["nproc"] and dims["machine"]["cpu"] and dims["machine"]["memory_kb"]
    assert dims["backends"]["vhostx-baseline"]["params"]["mode"] == "baseline"
    assert "turn_max_packets" in dims["backends"]["vhostx-baseline"]["params"]
    assert dims["backends"]["dpdk"]["kind"] == "dpdk"

    # interleaved: A B A B within each case
    order = [(r["case"], r["rep"], r["backend"]) for r in doc["runs"]]
    assert order[:4] == [("tx64", 0, "vhostx-baseline"), ("tx64", 0, "dpdk"),
                         ("tx64", 1, "vhostx-baseline"), ("tx64", 1, "dpdk")]

    streams = [r for r in doc["runs"] if r["kind"] == "stream"]
    for r in streams:
        assert r["error"] is None, (r["backend"], r["error"])
        m = r["metrics"]
        assert m["pps"] > 0 and m["bps"] > 0 and m["devices_with_traffic"] == 1, r["backend"]
        assert m["per_device"][0]["pps"] == pytest.approx(m["pps"])
        assert m["bps"] == pytest.approx(m["pps"] * 64 * 8, rel=0.01)
        assert m["backend_cpu"]["total"] > 0 and m["client_cpu"]["total"] > 0
        assert m["memory"]["vm_rss_kb"] > 0
        assert r["backend_pids"] and r["client_pids"]
        assert not [p for p in r["backend_pids"] + r["client_pids"] if _alive(p)]
    vx = [r for r in streams if r["backend"] == "vhostx-baseline"]
    for r in vx:
        n = r["metrics"]["notifications"]
        assert n["counts"]["packets"] > 0 and n["per_packet"]["kicks"] is not None

    # the ratio comes from this run's own samples, paired by repetition within one mode
    entry = next(e for e in doc["summary"] if e["case"] == "tx64")
    pps = {(r["backend"], r["rep"]): (r["machine_mode"]["label"], r["metrics"]["pps"])
           for r in streams}
    ratio = entry["ratios"]["vhostx-baseline"]["pps"]
    reps = sorted({rep for _, rep in pps})
    expected = [pps[("vhostx-baseline", i)][1] / pps[("dpdk", i)][1] for i in reps
                if pps[("vhostx-baseline", i)][0] == pps[("dpdk", i)][0] == ratio["mode"]]
    assert ratio["values"] == pytest.approx(expected)
    if expected:
        assert ratio["median"] == pytest.approx(statistics.median(expected))
        assert ratio["min"] <= ratio["median"] <= ratio["max"]

    pings = [r for r in doc["runs"] if r["kind"] == "pingpong"]
    for r in pings:
        assert r["error"] is None, (r["backend"], r["error"])
        lat = r["metrics"]["latency"]
        assert lat["count"] > 10 and r["metrics"]["bad"] == 0
        assert 0 < lat["min_us"] <= lat["p50_us"] <= lat["p99_us"] <= lat["p99_9_us"] <= lat["max_us"]
        raw = json.loads((out / r["file"]).read_text())
        assert len(raw["rtt_ns"]) == lat["count"]
        assert not [p for p in r["backend_pids"] if _alive(p)]

    report = (out / "report.md").read_text()
    assert "## Throughput" in report and "## Latency" in report and "## Machine modes" in report
    for png in out.glob("plots/*.png"):
        assert png.stat().st_size > 5000
    assert (out / "plots" / "latency_cdf.png").exists()
    assert not list(Path("/var/run/dpdk").glob(f"vhx{os.getpid()}_*"))
    assert rc == 0
