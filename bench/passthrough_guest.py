"""The passthrough comparison's guest: a TCG q35 guest with an emulated VT-d IOMMU whose
virtio-net-pci NIC is served over vhost-user by a backend on the host.

Role: the host side of bench/passthrough_job.py (which runs in this guest). It reuses the VFIO
test guest (bench/vfio_guest.py: image with the vfio and 9p modules, intel-iommu, the host root
over 9p, ``chroot_job``) and adds:
- the NIC: ``-device virtio-net-pci,...,vectors=0`` on a vhost-user netdev (QEMU 7.2 under TCG
  segfaults with MSI-X when vhost starts, so the device has INTx only). With
  ``iommu_platform=True`` (the scenario's default for every backend) it sits behind the vIOMMU
  as in tests/e2e/test_qemu_viommu.py: ``iommu_platform=on,ats=on`` on a PCIe root port of its
  own, the intel-iommu with ``device-iotlb=on``; the backend then translates every address
  through its device IOTLB (vhostx: a device with ``iommu=true``; DPDK's vhost:
  ``iommu-support=1``). With ``iommu_platform=False`` the device reads guest physical addresses
  and bypasses the vIOMMU;
- ``hugepages=4`` on the kernel command line: the user-space driver's DMA area is one
  physically contiguous hugepage when the device bypasses the IOMMU (IOVA = physical address).
Threads: any (one thread owns each Guest).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.guest import GuestImage
from bench.qemu import Guest, VhostUserNic
from bench.vfio_guest import VFIO_APPEND, build_vfio_image, chroot_job, iommu_machine_args

__all__ = [
    "GUEST_MAC",
    "PEER_MAC",
    "PT_APPEND",
    "build_passthrough_image",
    "job_command",
    "passthrough_guest",
]

GUEST_MAC = "52:54:00:0f:20:01"
PEER_MAC = "52:54:00:0f:20:02"
PT_APPEND = f"{VFIO_APPEND} hugepages=4 no_timer_check"
REPO = Path(__file__).resolve().parent.parent


def build_passthrough_image(cache: Path | None = None) -> GuestImage:
    return build_vfio_image(cache)


def job_command(*args: str, repo: Path = REPO, python: str = sys.executable) -> str:
    """The shell command that runs bench/passthrough_job.py in the guest's chroot."""
    quoted = " ".join(args)
    return (f"cd {repo} && PYTHONPATH={repo} {python} -m bench.passthrough_job "
            f"--mac {GUEST_MAC} --peer-mac {PEER_MAC} {quoted}")


def passthrough_guest(socket: str | os.PathLike[str], job_args: list[str], *,
                      iommu_platform: bool = False, name: str = "passthrough",
                      workdir: str | os.PathLike[str] | None = None,
                      image: GuestImage | None = None,
                      affinity: set[int] | None = None) -> Guest:
    """A Guest (not started) whose NIC is the vhost-user device at ``socket`` and whose job runs
    bench/passthrough_job.py with ``job_args``."""
    nic = VhostUserNic(socket, mac=GUEST_MAC, device_args="disable-legacy=on",
                       iommu=iommu_platform)
    return Guest(image or build_passthrough_image(), [nic], job=chroot_job(job_command(*job_args)),
                 name=name, memory_mb=1024, append=PT_APPEND,
                 extra_args=iommu_machine_args(device_iotlb=iommu_platform), workdir=workdir,
                 affinity=affinity)
