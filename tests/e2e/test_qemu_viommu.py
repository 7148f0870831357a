"""A QEMU guest whose virtio-net-pci sits behind an emulated VT-d vIOMMU (iommu_platform=on,
ats=on, intel_iommu=on in the guest) on a vhostx device with ``iommu=true``: the guest kernel's
virtio_net driver maps every buffer through the vIOMMU, the device translates every ring and
descriptor address through its IOTLB (UPDATEs from QEMU, MISSes on the backend channel,
INVALIDATEs when the guest unmaps).

The guest and a network namespace holding the TAP port ping each other and move a file both
ways with matching checksums; the daemon's stats then show IOTLB updates, misses and
invalidations. QEMU 7.2 TCG, ``vectors=0`` (INTx, as every vhost-user guest here): the MSI-X
trap holds on this machine too (checked 2026-12-01: the same guest without ``vectors=0`` ends
with QEMU killed by SIGSEGV as vhost starts, before the guest is up).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netns_peer import NetnsReceiver, poke

from bench.qemu import Guest, VhostUserNic
from bench.vfio_guest import viommu_machine_args

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

BOOT_TIMEOUT = 240.0
JOB_TIMEOUT = 300.0
FILE_MIB = 2


def _device_stats(daemon: Any) -> Any:
    try:
        return next(d for d in daemon.stats()["devices"] if d["name"] == "net0")
    except (OSError, ValueError, KeyError, StopIteration) as err:  # the daemon may be gone
        return f"no stats: {err}"


def test_viommu_guest_pings_and_moves_a_file_both_ways(
    guest_image: Any, e2e_dir: Path, netns: Any, vhostx_daemon: Callable[..., Any], subnet: str
) -> None:
    sock = e2e_dir / "net0.sock"
    daemon = vhostx_daemon(
        [(f"name=net0,type=net,socket={sock},port=tap,tap_netns={netns.name},"
         f"tap_address={subnet}.1/24,iommu=true")]
    )
    receiver = NetnsReceiver(netns, f"{subnet}.1", 5001, JOB_TIMEOUT + BOOT_TIMEOUT)
    job = (
        "vx_result iommu_groups $(ls /sys/kernel/iommu_groups | wc -l)\n"
        f"vx_wait_peer {subnet}.1 90 || exit 10\n"
        f"vx_ping {subnet}.1 5 || exit 11\n"
        f"vx_gen_file /tmp/out {FILE_MIB}\n"
        "vx_result sent_md5 $(vx_md5 /tmp/out)\n"
        f"vx_send /tmp/out {subnet}.1 5001 || exit 12\n"
        "vx_recv /tmp/in 5002 || exit 13\n"
        "vx_result recv_size $(stat -c %s /tmp/in)\n"
        "vx_result recv_md5 $(vx_md5 /tmp/in)\n"
    )
    nic = VhostUserNic(sock, mac="52:54:00:c8:00:12", ip=f"{subnet}.2/24", iommu=True)
    to_guest = os.urandom(FILE_MIB << 20)
    with receiver, Guest(guest_image, [nic], job, name="viommu", workdir=e2e_dir, memory_mb=512,
                       append="intel_iommu=on", machine_args=viommu_machine_args()) as g:
        try:
            g.wait_ready(BOOT_TIMEOUT)
            assert int(g.result("iommu_groups", JOB_TIMEOUT)) > 0, g.tail(40)
            assert g.result("ping_received", JOB_TIMEOUT) == "5", g.tail(40)
            sent_md5 = g.result("sent_md5", JOB_TIMEOUT)
            data = receiver.join(JOB_TIMEOUT)
            assert data is not None, f"nothing from the guest ({receiver.error})\n{g.tail(40)}"
            assert len(data) == FILE_MIB << 20
            assert hashlib.md5(data).hexdigest() == sent_md5
            poke(netns, f"{subnet}.2", 5002, to_guest, timeout=90, connect_timeout=30)
            g.wait_done(JOB_TIMEOUT)
            assert g.results["recv_size"] == str(len(to_guest))
            assert g.results["recv_md5"] == hashlib.md5(to_guest).hexdigest()
            stats = daemon.stats()
        finally:
            print(f"\n--- guest console ---\n{g.tail(40)}\n--- daemon ---\n{daemon.log_tail(30)}")
            print(f"--- device stats ---\n{_device_stats(daemon)}")
    dev = next(d for d in stats["devices"] if d["name"] == "net0")
    assert int(dev["features"], 16) >> 33 & 1, dev["features"]  # ACCESS_PLATFORM negotiated
    iotlb = dev["iotlb"]
    print(f"IOTLB: {iotlb}")
    assert iotlb["updates"] > 0 and iotlb["miss_sent"] > 0, iotlb
    assert iotlb["invalidations"] > 0, iotlb
    assert dev["broken"] is None
