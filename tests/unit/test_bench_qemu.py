"""The QEMU client (`client = "qemu"`): schema rules, the guest job, parsing vxperf's console
output, building vxperf with gcc, and how the report labels TCG-guest rows. The guest itself
runs in tests/e2e/test_bench_run_qemu.py."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.harness.qemu_client import (
    QemuClientError,
    build_vxperf,
    job_script,
    parse_console,
    vxperf_mode,
)
from bench.harness.report import markdown, summarize
from bench.harness.scenario import ScenarioError, load_scenario, parse_scenario

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bench"

BASE: dict[str, Any] = {
    "name": "q",
    "run": {"repeats": 2, "reference": "dpdk"},
    "backends": [{"name": "vx", "kind": "vhostx"}, {"name": "dpdk", "kind": "dpdk"}],
    "clients": {"qemu": {"memory_mb": 256}},
    "tests": [{"name": "pp", "kind": "pingpong", "client": "qemu"},
              {"name": "tx", "kind": "stream", "client": "qemu"},
              {"name": "rx", "kind": "stream", "direction": "guest_rx", "client": "qemu",
               "size": 1500}],
}


def raw(test: dict[str, Any] | None = None, qemu: dict[str, Any] | None = None) -> dict[str, Any]:
    r = copy.deepcopy(BASE)
    r["tests"][0].update(test or {})
    if qemu is not None:
        r["clients"]["qemu"] = qemu
    return r


def test_parse_and_modes() -> None:
    sc = parse_scenario(raw())
    assert sc.qemu.memory_mb == 256 and sc.qemu.boot_timeout == 180.0
    modes = [(c.client, vxperf_mode(c)) for c in sc.cases()]
    assert modes == [("qemu", "pingpong"), ("qemu", "tx"), ("qemu", "rx")]
    assert parse_scenario(raw(qemu={"boot_timeout": 30})).qemu.boot_timeout == 30.0


def test_shipped_qemu_scenario() -> None:
    sc = load_scenario(CONFIGS / "qemu.toml")
    cases = sc.cases()
    assert {c.client for c in cases} == {"qemu"}
    assert {b.kind for b in sc.backends} == {"vhostx", "dpdk"} and sc.reference == "dpdk"
    # its default run stays short: a few minutes at ~8 s of boot and tear-down per run
    runs = len(cases) * len(sc.backends) * sc.run.repeats
    assert runs * (sc.run.warmup + sc.run.duration + 8) < 240


@pytest.mark.parametrize(("test", "qemu", "message"), [
    ({"kind": "idle"}, None, "client = 'qemu' runs kind = 'stream' or 'pingpong'"),
    ({"devices": 2}, None, "one guest with one NIC and one queue pair, unpaced: devices = 2"),
    ({"kind": "stream", "queues": 2}, None, "queues = 2"),
    ({"kind": "stream", "rate": 1000}, None, "rate = 1000"),
    ({"kind": "stream", "devices": 2, "busy": 1}, None, "devices = 2"),
    ({"kind": "stream", "pingpong_alongside": True}, None, "pingpong_alongside applies to"),
    ({"client": "vm"}, None, "allowed  | testpmd | guest_model | qemu"),
    ({}, {"memory_mb": 64}, "clients.qemu.memory_mb = 64: out of range, allowed [128, 8192]"),
    ({}, {"boot_timeout": 5}, "clients.qemu.boot_timeout = 5: out of range"),
    ({}, {"smp": 2}, "[clients.qemu]: unknown key 'smp'"),
])
def test_errors(test: dict[str, Any], qemu: dict[str, Any] | None, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw(test, qemu))
    assert message in str(err.value)


def test_job_script() -> None:
    sc = parse_scenario(raw())
    pp, tx, rx = sc.cases()
    assert job_script(pp, 1.0, 3.0).splitlines()[-1] == "/usr/bin/vxperf pingpong eth0 64 1 3"
    assert job_script(tx, 0.5, 2.5).splitlines()[-1] == "/usr/bin/vxperf tx eth0 64 0.5 2.5"
    assert job_script(rx, 1.0, 3.0).splitlines()[-1] == "/usr/bin/vxperf rx eth0 1 3"
    assert "disable_ipv6" in job_script(rx, 1, 1)  # the guest sends nothing of its own
    pinged = dataclasses.replace(rx, rx_ping_us=2000)  # pings alongside the stream
    assert job_script(pinged, 1.0, 3.0).splitlines()[-1] == "/usr/bin/vxperf rx eth0 1 3 2000"


def test_parse_console_rx_with_pings_checks_the_sample_count() -> None:
    rx = ("VX-RESULT elapsed_ns 1\nVX-RESULT received 9\nVX-RESULT if_packets 9\n"
          "VX-RESULT if_bytes 540\n")
    assert parse_console(rx, "rx").rtt_ns == []
    res = parse_console(rx + "VX-RTT 5000 7000\nVX-RESULT rtt_samples 2\n", "rx")
    assert res.rtt_ns == [5000, 7000]
    with pytest.raises(QemuClientError, match="1 RTT samples on the console, 2 announced"):
        parse_console(rx + "VX-RTT 5000\nVX-RESULT rtt_samples 2\n", "rx")


CONSOLE = """VX-READY uptime 2.1
VX-WINDOW begin
VX-WINDOW end
VX-RESULT elapsed_ns 2000000000
VX-RESULT sent 4
VX-RESULT received 3
VX-RESULT lost 1
VX-RESULT bad 0
VX-RESULT send_errors 0
VX-RTT 100000 120000
VX-RTT 90000
VX-RESULT rtt_samples 3
VX-EXIT 0
VX-DONE"""


def test_parse_console() -> None:
    res = parse_console(CONSOLE, "pingpong")
    assert res.rtt_ns == [100000, 120000, 90000]
    assert res.values["received"] == 3 and res.values["lost"] == 1
    with pytest.raises(QemuClientError, match="2 RTT samples on the console, 3 announced"):
        parse_console(CONSOLE.replace("VX-RTT 90000\n", ""), "pingpong")
    with pytest.raises(QemuClientError, match="no if_packets, if_bytes"):
        parse_console(CONSOLE, "tx")


def test_build_vxperf_static_and_cached(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    path = build_vxperf(tmp_path)
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and path.stat().st_mode & 0o111
    from bench.guest_formats import elf_is_static

    assert elf_is_static(data)
    mtime = path.stat().st_mtime_ns
    assert build_vxperf(tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached
    with pytest.raises(QemuClientError, match="not usable"):
        build_vxperf(tmp_path / "other", gcc="/nonexistent/gcc")


def test_report_marks_tcg_guest_rows() -> None:
    sc = parse_scenario(raw())
    runs = []
    for rep in range(2):
        for backend, p50 in (("vx", 150.0 + rep), ("dpdk", 100.0)):
            runs.append({"case": "pp", "test": "pp", "kind": "pingpong", "backend": backend,
                         "rep": rep, "error": None, "skipped": None,
                         "params": {"client": "qemu", "devices": 1},
                         "metrics": {"pps": 5000.0, "latency": {"p50_us": p50, "p99_us": 400.0,
                                                                 "p99_9_us": 900.0}}})
    doc = {"scenario": {"name": "q", "reference": "dpdk"}, "complete": True,
           "dimensions": {"clients": {"qemu": {"qemu_version": "7.2.22", "smp": 1,
                                               "memory_mb": 256, "core": 0}}},
           "runs": runs, "summary": summarize(sc, runs)}
    (entry,) = doc["summary"]
    assert entry["ratios"]["vx"]["p50_us"]["values"] == pytest.approx([1.5, 1.51])
    text = markdown(doc)
    assert "| pp (qemu TCG guest) | vx | 150.5 |" in text
    assert "QEMU 7.2.22 **TCG** guest" in text
