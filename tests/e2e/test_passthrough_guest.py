"""The virtio-pci transport over VFIO inside a TCG guest with an emulated VT-d IOMMU: the guest's
virtio-net-pci is served over vhost-user by a vhostx daemon on the host, bound to vfio-pci in the
guest and driven by the project's driver (VirtioPciTransport + NetDriver, bench/passthrough_job.py
--check). The daemon switches between the guest's device and a second device that this test
drives (VhostUserFrontend + NetDriver): frames the guest sends arrive here and are compared byte
for byte, frames sent from here come back echoed by the guest's driver and are compared too.
One guest boot for the module (about 30-90 s here: boot, Python start under TCG, INTx round
trips at TCG speed)."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from bench.passthrough_guest import GUEST_MAC, PEER_MAC, passthrough_guest
from bench.passthrough_job import check_frame, mac_bytes
from bench.process import DaemonProcess
from virtio.driver.net import NetDriver
from virtio.frontend import VhostUserFrontend

pytestmark = pytest.mark.qemu

N = 48
ME, GUEST = mac_bytes(PEER_MAC), mac_bytes(GUEST_MAC)


@dataclass
class Run:
    results: dict[str, str]
    console: str
    from_guest: list[bytes] = field(default_factory=list)
    echoed: list[bytes] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    stats: dict[str, object] = field(default_factory=dict)


def _collect(net: NetDriver, want: int, timeout: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += [f for f in net.recv(timeout=0.2) if f[12:14] == b"\x88\xb5"]
    return got


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not found (install the Debian package qemu-system-x86)")
    workdir = tmp_path_factory.mktemp("pt-guest")
    daemon = DaemonProcess()
    guest_sock = daemon.add_device("guest", port="switch")
    host_sock = daemon.add_device("host", port="switch")
    daemon.start()
    try:
        with VhostUserFrontend(host_sock, mem_size=16 << 20) as fe:
            net = NetDriver(fe)
            with passthrough_guest(guest_sock, ["--check", str(N)], workdir=workdir) as g:
                g.result("pt.check.rx_ready", timeout=150)
                r = Run(g.results, "")
                r.from_guest = _collect(net, N, 30)
                r.sent = [check_frame(1000 + k, GUEST, ME) for k in range(N)]
                for k in range(0, N, 8):
                    assert net.send(r.sent[k : k + 8], timeout=5) == 8
                r.echoed = _collect(net, N, 60)
                g.wait_done(timeout=90, check=False)
                r.results, r.console = g.results, g.console
            r.stats = daemon.stats()
            yield r
    finally:
        daemon.stop()
        daemon.cleanup()


def _tail(r: Run) -> str:
    return "\n".join(r.console.splitlines()[-50:])


def test_guest_driver_took_the_device_over_vfio(run: Run) -> None:
    res = run.results
    assert res.get("pt.check.tx_sent") == str(N), _tail(run)
    assert res.get("pt.passthrough.irq") == "intx"  # vectors=0: QEMU 7.2 TCG with vhost
    assert res.get("pt.passthrough.iova_mode") == "pa"  # the NIC here runs without iommu_platform
    assert res.get("pt.passthrough.given_back_to") == "virtio-pci"


def test_tx_frames_reach_the_host_byte_for_byte(run: Run) -> None:
    want = [check_frame(k, ME, GUEST) for k in range(N)]
    assert run.from_guest == want, _tail(run)


def test_rx_frames_reach_the_guest_driver_byte_for_byte(run: Run) -> None:
    assert run.results.get("pt.check.rx_echoed") == str(N), _tail(run)
    # the guest echoed each frame with the MACs swapped: everything else is what was sent
    assert run.results.get("pt.check.rx_sha256") == hashlib.sha256(b"".join(run.sent)).hexdigest()
    assert [f[6:12] + f[0:6] + f[12:] for f in run.echoed] == run.sent, run.stats


def test_switch_floods_no_copies_of_the_guests_tx_frames_back_to_it(run: Run) -> None:
    """The host's MAC is unknown to the switch until it sends, so the guest's TX frames are
    flooded: to the host's port only. Before the re-plan fix the guest's device held three
    leaked switch ports on its own RX ring and got three copies of each of its TX frames."""
    assert run.results.get("pt.check.rx_stray") == "0", run.results.get("pt.check.rx_stray_samples")


def test_guest_job_finished(run: Run) -> None:
    assert run.results.get("chroot_status") == "0", _tail(run)
