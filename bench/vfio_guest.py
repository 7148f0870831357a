"""A QEMU TCG guest with an emulated VT-d IOMMU for testing vfio/ from the inside.

Role: the image kind and command line of the VFIO test guest, beside bench/guest.py (same
initramfs builder, same cache directory, nothing committed) and bench/qemu.py (same ``Guest``):
- ``build_vfio_image()``: the guest image with the vfio modules (irqbypass, vfio, vfio_virqfd,
  vfio_iommu_type1, vfio-pci-core, vfio-pci in dependency order) and the 9p client modules
  (netfs, fscache, 9pnet, 9pnet_virtio, 9p) added to the virtio-net set;
- ``vfio_guest_args()``: ``-machine q35,kernel-irqchip=split``, ``-device
  intel-iommu,intremap=on,caching-mode=on``, the devices under test and the host's root shared
  read-only over 9p (``mount_tag=hostroot``);
- ``chroot_job(cmd)``: the /job.sh that mounts the host root, enters it with chroot and runs
  ``cmd`` there (the project's own Python, read-only: no bytecode is written).

Devices (guest PCI addresses; each a group of its own unless said otherwise):
- 00:03.0 QEMU ``edu`` (1234:11e8), no guest driver: the DMA / MSI / isolation target;
- 00:05.0 a conventional PCI-PCI bridge; behind it 01:01.0 a second edu and 01:02.0 a second
  virtio-net-pci bound to virtio-pci. Devices behind a conventional bridge share the bridge's
  requester ID, so the three form one IOMMU group that is not viable while 01:02.0 keeps its
  driver: the target of the viability error;
- 00:06.0 a PCIe root port and behind it 02:00.0 a virtio-net-pci with iommu_platform=on,ats=on
  on a ``hubport`` netdev (no backend needed; PCIe, so it has the PCIe and ATS capabilities),
  bound to virtio-pci at boot: the bind/give-back and capability target; its hub also holds a
  restricted user-mode netdev, so frames the NIC sends are consumed (the transport check).
Threads: any (building takes bench.guest's file lock).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.guest import DEFAULT_MODULES, GuestImage, build_image

__all__ = [
    "BRIDGE_EDU_BDF",
    "BRIDGE_NET_BDF",
    "EDU_BDF",
    "NET_BDF",
    "VFIO_APPEND",
    "VFIO_MODULES",
    "build_vfio_image",
    "chroot_job",
    "iommu_machine_args",
    "vfio_guest_args",
    "viommu_machine_args",
]

VFIO_MODULES: tuple[str, ...] = (
    *DEFAULT_MODULES,
    "irqbypass",
    "vfio",
    "vfio_virqfd",
    "vfio_iommu_type1",
    "vfio_pci_core",
    "vfio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
)

EDU_BDF = "0000:00:03.0"
NET_BDF = "0000:02:00.0"
BRIDGE_EDU_BDF = "0000:01:01.0"
BRIDGE_NET_BDF = "0000:01:02.0"

#: Guest kernel arguments: the IOMMU on, host-owned devices identity mapped.
VFIO_APPEND = "intel_iommu=on iommu=pt"


def build_vfio_image(cache: Path | None = None) -> GuestImage:
    """The VFIO guest image (built into the cache on first use, like bench.guest's)."""
    return build_image(cache, VFIO_MODULES)


def iommu_machine_args(*, share: str = "/", device_iotlb: bool = False) -> list[str]:
    """QEMU arguments for the machine, the emulated VT-d IOMMU and the host root over 9p;
    ``device_iotlb``: the IOMMU serves device IOTLBs (ATS), as a vhost-user NIC with
    ``iommu_platform=on,ats=on`` wants (see ``viommu_machine_args``)."""
    iommu = "intel-iommu,intremap=on,caching-mode=on" + (",device-iotlb=on" if device_iotlb else "")
    return [
        "-machine", "q35,kernel-irqchip=split",
        "-device", iommu,
        "-virtfs",
        f"local,path={share},mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]


def vfio_guest_args(*, share: str = "/") -> list[str]:
    """QEMU arguments for the machine, the IOMMU, the devices under test and the 9p share."""
    net = "virtio-net-pci,disable-legacy=on,iommu_platform=on,ats=on,romfile="
    return [
        *iommu_machine_args(share=share),
        "-device", "edu,addr=03.0",
        "-netdev", "hubport,id=vfnet0,hubid=0",
        # a second member of hub 0 that always accepts: a hub with one port never drains the
        # NIC's TX queue (it cannot receive, so QEMU queues the frames and never completes them)
        "-netdev", "user,id=vfsink,restrict=on",
        "-netdev", "hubport,id=vfsinkport,hubid=0,netdev=vfsink",
        "-device", "pci-bridge,id=vfbr,chassis_nr=1,addr=05.0",
        "-device", "pcie-root-port,id=vfrp,chassis=2,addr=06.0",
        "-device", f"{net},netdev=vfnet0,bus=vfrp,mac=52:54:00:0f:10:04",
        "-device", "edu,bus=vfbr,addr=01.0",
        "-netdev", "hubport,id=vfnet1,hubid=1",
        "-device", f"{net},netdev=vfnet1,bus=vfbr,addr=02.0,mac=52:54:00:0f:11:02",
    ]


def viommu_machine_args() -> list[str]:
    """QEMU arguments of a q35 machine with a VT-d vIOMMU that serves device IOTLBs (ATS), for
    vhost-user NICs with ``VhostUserNic(iommu=True)``: caching-mode so that every map reaches
    QEMU (and so the vhost-user backend), device-iotlb so that invalidations do too."""
    return [
        "-machine", "q35,kernel-irqchip=split",
        "-device", "intel-iommu,intremap=on,caching-mode=on,device-iotlb=on",
    ]


def _keep_under_tmp() -> list[str]:
    """Host directories the job needs (the checkout, the Python environment) that the guest's
    own /tmp would hide: a checkout under /tmp (CI clones anywhere) must stay visible."""
    dirs = {str(Path(__file__).resolve().parents[1]), os.path.realpath(sys.prefix)}
    return sorted(d for d in dirs if d.startswith("/tmp/"))


def chroot_job(command: str) -> str:
    """/job.sh: mount the host root at /host, give it /proc, /sys, /dev and a /tmp, and run
    ``command`` (a shell command line) chrooted there; prints ``VX-RESULT chroot_status N``.
    Host directories under /tmp that the job needs are bound back over the guest's /tmp."""
    keep = _keep_under_tmp()
    save = "".join(f"mkdir -p /keep{i}; mount -o bind /host{d} /keep{i}\n"
                   for i, d in enumerate(keep))
    restore = "".join(f"mkdir -p /host{d}; mount -o bind /keep{i} /host{d}\n"
                      for i, d in enumerate(keep))
    return f"""
mkdir -p /host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host; then
    echo "VX-ERROR mount 9p hostroot"; exit 1
fi
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
{save}mount -t tmpfs tmpfs /host/tmp
{restore}ulimit -l unlimited
chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp \\
    PYTHONDONTWRITEBYTECODE=1 sh -c {_sh_quote(command)}
rc=$?
vx_result chroot_status $rc
exit $rc
"""


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
