"""The QEMU client for real: a 1-repetition, very short scenario with a TCG guest running vxperf
(ping-pong, guest TX 64 B, guest RX 64 B) against the vhostx daemon and, when dpdk-testpmd is
there, DPDK's vhost PMD in the same run. Checks structure and sanity: round trips and rates
measured in the guest, the backend's own counts agreeing with them, ratios from this run's
samples, dimensions, console logs kept, every QEMU / testpmd / daemon process gone.
About 20 s with vhostx alone, 45 s with DPDK."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench.cli import main
from bench.harness.system import alive, qemu_version
from bench.testpmd import find_testpmd

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

SCENARIO = """
name = "qemu-e2e"
[run]
duration = 1.0
warmup = 0.5
repeats = 1
max_extra_repeats = 0
[modes]
probe = "none"   # one run per backend: the pairing by mode is the smoke test's business
[[backends]]
name = "vhostx-baseline"
kind = "vhostx"
mode = "baseline"
{dpdk}
[clients.qemu]
memory_mb = 256
boot_timeout = 120
[[tests]]
name = "pingpong"
kind = "pingpong"
client = "qemu"
[[tests]]
name = "tx64"
kind = "stream"
client = "qemu"
[[tests]]
name = "rx64"
kind = "stream"
direction = "guest_rx"
client = "qemu"
"""
DPDK = """[[backends]]
name = "dpdk"
kind = "dpdk"
memory_mb = 512
"""


def test_qemu_client_scenario(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not found (Debian package qemu-system-x86)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found (vxperf is compiled at image-build time)")
    with_dpdk = find_testpmd() is not None  # without it: vhostx alone, DPDK skipped cleanly
    src = tmp_path / "qemu.toml"
    src.write_text(SCENARIO.format(dpdk=DPDK if with_dpdk else ""))
    out = tmp_path / "out"
    rc = main(["bench", "run", str(src), "--out", str(out), "--no-progress", "--no-plots"])
    doc = json.loads((out / "results.json").read_text())
    backends = ["vhostx-baseline", "dpdk"] if with_dpdk else ["vhostx-baseline"]
    assert doc["complete"] is True and len(doc["runs"]) == doc["planned_runs"] == 3 * len(backends)
    q = doc["dimensions"]["clients"]["qemu"]
    assert q["accel"] == "tcg" and q["qemu_version"] == qemu_version() == doc["dimensions"]["qemu"]
    assert q["kernel_release"] and q["vxperf"].startswith("vxperf-") and "unavailable" not in q

    by = {(r["test"], r["backend"]): r for r in doc["runs"]}
    for r in doc["runs"]:
        assert r["error"] is None, (r["case"], r["backend"], r["error"])
        m = r["metrics"]
        assert m["client"] == "qemu" and m["tcg_guest"] is True and m["boot_s"] > 0
        assert 0.8 < m["guest_window_s"] < 1.5
        assert m["backend_cpu"]["total"] > 0 and m["client_cpu"]["total"] > 0
        assert r["client_pids"] and r["backend_pids"]
        assert not [p for p in r["backend_pids"] + r["client_pids"] if alive(p)]
        console = out / "logs" / f"{r['index']:03d}-{r['backend']}" / "guest.console.log"
        assert "VX-WINDOW end" in console.read_text()
    for b in backends:
        pp = by[("pingpong", b)]["metrics"]
        lat = pp["latency"]
        assert pp["round_trips"] == lat["count"] > 50 and pp["bad"] == 0
        assert 0 < lat["min_us"] <= lat["p50_us"] <= lat["p99_us"] <= lat["max_us"]
        raw = json.loads((out / by[("pingpong", b)]["file"]).read_text())
        assert len(raw["rtt_ns"]) == lat["count"]
        for test in ("tx64", "rx64"):
            m = by[(test, b)]["metrics"]
            # pps and bps: eth0's packet and byte counters, read by vxperf one sysfs file after
            # the other at each end of the window; in a TCG guest on a loaded machine the reads
            # are milliseconds apart while frames keep coming (62.98 and 64.8 B a frame seen
            # with 64 B frames, against DPDK and vhostx alike)
            assert m["pps"] > 1000 and m["bps"] == pytest.approx(m["pps"] * 64 * 8, rel=0.03), (
                test, b, m["bps"] / m["pps"] / 8)
            # the backend's own count over the host's window agrees with the guest's driver
            assert 0.6 < m["backend_pps"] / m["pps"] < 1.4, (test, b, m["backend_pps"], m["pps"])
    if with_dpdk:

        def figure(test: str, backend: str) -> float:
            m = by[(test, backend)]["metrics"]
            return float(m["latency"]["p50_us"] if test == "pingpong" else m["pps"])

        for e in doc["summary"]:
            ratio = e["ratios"]["vhostx-baseline"]["p50_us" if e["kind"] == "pingpong" else "pps"]
            expected = figure(e["test"], "vhostx-baseline") / figure(e["test"], "dpdk")
            assert ratio["values"] == pytest.approx([expected])
        assert not list(Path("/var/run/dpdk").glob(f"vhx{os.getpid()}_*"))
    report = (out / "report.md").read_text()
    assert "(qemu TCG guest)" in report and "**TCG** guest" in report
    assert rc == 0
