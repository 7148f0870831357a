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
    assert [(b.kind, b.iommu_platform) for b in sc.backends] == [("vhostx", True), ("dpdk", True)]
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


def test_report_labels_tcg_and_says_whether_each_device_is_behind_the_viommu():
    doc = _doc()
    text = render_report(doc)
    assert "TCG figures" in text and "dev run" in text
    assert "iommu_platform=on,ats=on behind the vIOMMU" in text
    assert "without iommu_platform" not in text and "**failed**: `GuestFailure: boom`" in text
    doc["backends"][0]["backend"]["iommu_platform"] = False
    assert "without iommu_platform" in render_report(doc)
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


def _guest_command(tmp_path: Path, iommu_platform: bool) -> list[str]:
    from bench.guest import GuestImage
    from bench.passthrough_guest import passthrough_guest

    image = GuestImage(kernel=tmp_path / "vmlinuz", initramfs=tmp_path / "initrd",
                       kernel_release="6.1.0-1-amd64", package="linux-image-6.1.0-1-amd64",
                       package_version="6.1-1", modules=())
    g = passthrough_guest(tmp_path / "guest.sock", ["--duration", "1"], image=image,
                          iommu_platform=iommu_platform, workdir=tmp_path)
    return g.command(tmp_path / "job.initrd")


def test_guest_nic_behind_the_viommu_as_the_viommu_e2e_guest_has_it(tmp_path: Path):
    cmd = _guest_command(tmp_path, iommu_platform=True)
    nic = next(a for a in cmd if a.startswith("virtio-net-pci,"))
    assert "iommu_platform=on,ats=on" in nic and ",bus=vxrp0" in nic and "vectors=0" in nic
    assert any(a.startswith("pcie-root-port,id=vxrp0") for a in cmd)
    iommu = [a for a in cmd if a.startswith("intel-iommu,")]
    assert iommu == ["intel-iommu,intremap=on,caching-mode=on,device-iotlb=on"]


def test_guest_nic_without_iommu_platform_bypasses_the_viommu(tmp_path: Path):
    cmd = _guest_command(tmp_path, iommu_platform=False)
    nic = next(a for a in cmd if a.startswith("virtio-net-pci,"))
    assert "iommu_platform" not in nic and "ats" not in nic and "bus=" not in nic
    assert [a for a in cmd if a.startswith("intel-iommu,")] == [
        "intel-iommu,intremap=on,caching-mode=on"]
