"""The passthrough scenario's file, its loader, report and plots, and the host-side peer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.harness import passthrough as pt
from bench.harness.passthrough_report import render_report, write_plots
from bench.harness.scenario import ScenarioError, find_scenario

SHIPPED = find_scenario("passthrough")


def test_shipped_scenario_loads_with_both_backends():
    assert pt.is_passthrough(SHIPPED)
    sc = pt.load(SHIPPED)
    assert [(b.kind, b.iommu_platform) for b in sc.backends] == [("vhostx", False), ("dpdk", True)]
    assert pt.load(SHIPPED, duration=0.5, backends=["dpdk"]).backends[0].name == "dpdk"


def test_other_scenarios_are_not_passthrough():
    assert not pt.is_passthrough(find_scenario("qemu"))


def test_bad_keys_and_backends_are_refused(tmp_path: Path):
    f = tmp_path / "p.toml"
    f.write_text('kind = "passthrough"\nduraton = 2\n')
    with pytest.raises(ScenarioError, match="unknown keys"):
        pt.load(f)
    f.write_text('kind = "passthrough"\n[[backends]]\nkind = "ovs"\n')
    with pytest.raises(ScenarioError, match="backends\\[0\\]"):
        pt.load(f)


def _doc() -> dict:
    sc = pt.load(SHIPPED)
    phases = {f"{p}.{ph}": {"pps": 1000.0 * (2 if p == "passthrough" else 1), "packets": 2000,
                            "cpu_us_per_pkt": 10.0, "rtt_p50_us": 50.0, "rtt_p99_us": 90.0,
                            "map_ops": 1}
              for p in pt.PATHS for ph in pt.PHASES}
    from dataclasses import asdict
    return {"scenario": asdict(sc), "commit": "abc", "host": "h", "started": "now",
            "label": "dev run", "backends": [
                {"backend": asdict(sc.backends[0]), "phases": phases, "guest": {"irq": "intx"}},
                {"backend": asdict(sc.backends[1]), "error": "GuestFailure: boom"}]}


def test_report_labels_tcg_and_says_vhostx_runs_without_iommu_platform():
    text = render_report(_doc())
    assert "TCG figures" in text and "dev run" in text
    assert "without iommu_platform" in text and "**failed**: `GuestFailure: boom`" in text
    assert "| tx | 2.00 | 1.00 | 1.00 |" in text  # passthrough / paravirt of the same boot


def test_plots_are_written(tmp_path: Path):
    names = write_plots(_doc(), tmp_path)
    assert names == ["rates.png", "rtt.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


class FakeNet:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.inbox: list[bytes] = []

    def send(self, frames, timeout: float = 0.0) -> int:
        self.sent += frames
        return len(frames)

    def recv(self, timeout: float = 0.0) -> list[bytes]:
        got, self.inbox = self.inbox, []
        if not got:
            time.sleep(0.001)
        return got


def test_peer_echoes_with_the_macs_swapped_and_sources_at_its_pace():
    net = FakeNet()
    me, guest = b"\x02" * 6, b"\x04" * 6
    peer = pt.PeerThread(net, me, guest, 64, source_pps=20_000).start()
    try:
        peer.set_mode("pingpong")
        net.inbox = [me + guest + b"\x88\xb5payload"]
        deadline = time.monotonic() + 2
        while not net.sent and time.monotonic() < deadline:
            time.sleep(0.005)
        assert net.sent == [guest + me + b"\x88\xb5payload"]
        net.sent.clear()
        peer.set_mode("rx")
        time.sleep(0.2)
        peer.set_mode("idle")
        assert 0 < len(net.sent) < 20_000 * 0.2 * 2 + 64
        assert all(f[:6] == guest and f[6:12] == me for f in net.sent)
    finally:
        peer.stop()
