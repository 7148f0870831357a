"""vfio: user-space device access through Linux VFIO (container, group, device, DMA, IRQs).

The lowest layer of the project, beside virtio: it imports nothing of virtio, iosched or vhostx.
Typical use (as root, the device bound to vfio-pci)::

    with Container() as c, Group.of_device("0000:00:03.0") as g:
        g.set_container(c)
        c.set_iommu()
        dev = g.open_device("0000:00:03.0")
        dev.enable_dma()
        mapper = DmaMapper(c)

Threads: see each module; nothing here starts threads.
"""

from .container import IOMMU_TYPE_NAMES, Container, IommuInfo
from .device import Device, IrqInfo, Region
from .dma import DmaBuffer, DmaMapper, IovaAllocator, MapOp, check_memlock, plan_mappings
from .errors import (
    DeviceError,
    DmaError,
    GroupNotViable,
    IoctlError,
    IommuError,
    MdevError,
    MemlockError,
    SysfsError,
    VfioError,
    VfioUnavailable,
)
from .group import Group, GroupState
from .irq import IrqEventfd
from .mdev import Mdev, MdevType, create_mdev, list_mdevs, mdev_group, mdev_types, remove_mdev
from .pcicaps import PciCapability, walk_capabilities
from .sysfs import PciDevice, Sysfs

__all__ = [
    "IOMMU_TYPE_NAMES",
    "Container",
    "Device",
    "DeviceError",
    "DmaBuffer",
    "DmaError",
    "DmaMapper",
    "Group",
    "GroupNotViable",
    "GroupState",
    "IoctlError",
    "IommuError",
    "IommuInfo",
    "IovaAllocator",
    "IrqEventfd",
    "IrqInfo",
    "MapOp",
    "Mdev",
    "MdevError",
    "MdevType",
    "MemlockError",
    "PciCapability",
    "PciDevice",
    "Region",
    "Sysfs",
    "SysfsError",
    "VfioError",
    "VfioUnavailable",
    "check_memlock",
    "create_mdev",
    "list_mdevs",
    "mdev_group",
    "mdev_types",
    "plan_mappings",
    "remove_mdev",
    "walk_capabilities",
]
