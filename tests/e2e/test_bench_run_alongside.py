"""A testpmd stream with a ping-pong riding alongside (`pingpong_alongside`), for real: vhostx
baseline, vhostx shared (one worker) and DPDK's vhost PMD, two stream devices plus the ping-pong
device, one repetition of short windows. Checks that the flow ran in the stream's window on every
backend, that its figures and ratios come from this run, that the stream's figures exclude the
ping-pong device, and that every process is gone. About 20 s."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.cli import main
from bench.harness.system import alive as _alive
from bench.testpmd import find_testpmd

pytestmark = [pytest.mark.dpdk, pytest.mark.timeout(180)]

SCENARIO = """
name = "alongside"
[run]
duration = 1.0
warmup = 0.5
repeats = 1
reference = "vhostx-baseline"
max_extra_repeats = 0
[modes]
probe = "none"   # one run per backend: the pairing by mode is the smoke test's business
[[backends]]
name = "vhostx-baseline"
kind = "vhostx"
mode = "baseline"
[[backends]]
name = "vhostx-shared"
kind = "vhostx"
mode = "shared"
params = { workers = 1 }
[[backends]]
name = "dpdk"
kind = "dpdk"
memory_mb = 512
[clients.testpmd]
memory_mb = 512
[[tests]]
name = "tx2"
kind = "stream"
devices = 2
pingpong_alongside = true
pingpong_rate = 2000
"""


def test_stream_with_pingpong_alongside(tmp_path: Path) -> None:
    if find_testpmd() is None:
        pytest.skip("dpdk-testpmd not found (Debian package dpdk-dev)")
    src = tmp_path / "alongside.toml"
    src.write_text(SCENARIO)
    out = tmp_path / "out"
    rc = main(["bench", "run", str(src), "--out", str(out), "--no-progress", "--no-plots"])
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True and len(doc["runs"]) == doc["planned_runs"] == 3
    place = doc["dimensions"]["placement"]
    assert place["pingpong_alongside_core"] == place["client_core"]

    for r in doc["runs"]:
        assert r["error"] is None, (r["backend"], r["error"])
        m = r["metrics"]
        assert len(m["per_device"]) == 2 and m["devices_with_traffic"] == 2
        assert m["pps"] == pytest.approx(sum(d["pps"] for d in m["per_device"]))
        assert m["pps"] > 0 and m["backend_pps"] > 0
        a = m["alongside"]
        lat = a["latency"]
        assert a["core"] == place["client_core"] and a["bad"] == 0
        assert lat["count"] == a["round_trips"] > 10
        assert 0 < lat["min_us"] <= lat["p50_us"] <= lat["p99_us"] <= lat["p99_9_us"] <= lat["max_us"]
        assert a["round_trips_per_s"] <= 2000 * 1.1  # paced
        raw = json.loads((out / r["file"]).read_text())
        assert len(raw["alongside_rtt_ns"]) == lat["count"]
        assert raw["rtt_ns"] == []
        assert not [p for p in r["backend_pids"] + r["client_pids"] if _alive(p)]
    by = {r["backend"]: r for r in doc["runs"]}
    assert by["dpdk"]["backend_setup"]["forward_mode"] == "io"
    assert by["vhostx-shared"]["backend_setup"]["alongside"] == {"device": "pp0", "port": "echo"}
    # sanity: the daemon's stream count agrees with testpmd's (the exclusion of the echo device
    # itself is pinned by tests/unit/test_bench_alongside.py: its frames are too few to show here)
    for name in ("vhostx-baseline", "vhostx-shared"):
        m = by[name]["metrics"]
        assert m["backend_pps"] == pytest.approx(m["pps"], rel=0.02)

    (entry,) = doc["summary"]
    for name in ("vhostx-shared", "dpdk"):
        ratio = entry["ratios"][name]["alongside_p99_us"]
        expected = (by[name]["metrics"]["alongside"]["latency"]["p99_us"]
                    / by["vhostx-baseline"]["metrics"]["alongside"]["latency"]["p99_us"])
        assert ratio["values"] == pytest.approx([expected])
        assert ratio["higher_is_better"] is False
    report = (out / "report.md").read_text()
    assert "## Ping-pong alongside the streams" in report
    assert not list(Path("/var/run/dpdk").glob(f"vhx{os.getpid()}_*"))
    assert rc == 0
