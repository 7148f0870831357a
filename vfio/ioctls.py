"""Every VFIO ioctl number, flag and struct, defined once (Linux include/uapi/linux/vfio.h).

Role: the ABI. Structs are ``ctypes.Structure`` subclasses whose docstrings give the C layout;
``tests/unit/test_vfio_structs.py`` compiles a C program against the kernel's header and checks
every size and offset here. ``ioctl()`` runs one request on a mutable buffer and turns an OSError
into an IoctlError that names the ioctl and what it was asked.
Threads: any (no state besides the process-wide ioctl counter, which is advisory).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
from collections import Counter

from .errors import IoctlError

__all__ = [
    "DMA_AVAIL_CAP",
    "IOCTL_COUNTS",
    "IOVA_RANGE_CAP",
    "VFIO_API_VERSION",
    "VFIO_BASE",
    "VFIO_TYPE",
    "CapHeader",
    "DeviceInfo",
    "DmaAvailCap",
    "DmaMap",
    "DmaUnmap",
    "GroupStatus",
    "IommuType1Info",
    "IovaRange",
    "IovaRangeCapHeader",
    "IrqInfo",
    "IrqSet",
    "RegionInfo",
    "SpaprTceInfo",
    "io",
    "ioctl",
    "ioctl_int",
]

VFIO_TYPE = ord(";")
VFIO_BASE = 100
VFIO_API_VERSION = 0


def io(n: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + n)``: VFIO encodes no size or direction in its numbers."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + n)


# container
GET_API_VERSION = io(0)
CHECK_EXTENSION = io(1)
SET_IOMMU = io(2)
IOMMU_GET_INFO = io(12)  # also VFIO_IOMMU_SPAPR_TCE_GET_INFO
IOMMU_MAP_DMA = io(13)
IOMMU_UNMAP_DMA = io(14)
# group
GROUP_GET_STATUS = io(3)
GROUP_SET_CONTAINER = io(4)
GROUP_UNSET_CONTAINER = io(5)
GROUP_GET_DEVICE_FD = io(6)
# device
DEVICE_GET_INFO = io(7)
DEVICE_GET_REGION_INFO = io(8)
DEVICE_GET_IRQ_INFO = io(9)
DEVICE_SET_IRQS = io(10)
DEVICE_RESET = io(11)

# extensions / IOMMU types
TYPE1_IOMMU = 1
SPAPR_TCE_IOMMU = 2
TYPE1v2_IOMMU = 3
DMA_CC_IOMMU = 4
EEH = 5
TYPE1_NESTING_IOMMU = 6
SPAPR_TCE_v2_IOMMU = 7
NOIOMMU_IOMMU = 8
UNMAP_ALL = 9
UPDATE_VADDR = 10

# group status flags
GROUP_FLAGS_VIABLE = 1 << 0
GROUP_FLAGS_CONTAINER_SET = 1 << 1

# device info flags
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1
DEVICE_FLAGS_PLATFORM = 1 << 2
DEVICE_FLAGS_CAPS = 1 << 7

# region info flags
REGION_INFO_FLAG_READ = 1 << 0
REGION_INFO_FLAG_WRITE = 1 << 1
REGION_INFO_FLAG_MMAP = 1 << 2
REGION_INFO_FLAG_CAPS = 1 << 3
REGION_INFO_CAP_SPARSE_MMAP = 1
REGION_INFO_CAP_TYPE = 2

# irq info / set flags
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5

# IOMMU info flags and capabilities
IOMMU_INFO_PGSIZES = 1 << 0
IOMMU_INFO_CAPS = 1 << 1
IOVA_RANGE_CAP = 1
MIGRATION_CAP = 2
DMA_AVAIL_CAP = 3

# DMA map / unmap flags
DMA_MAP_FLAG_READ = 1 << 0
DMA_MAP_FLAG_WRITE = 1 << 1
DMA_UNMAP_FLAG_ALL = 1 << 1

# vfio-pci region and IRQ indexes
PCI_BAR0_REGION_INDEX = 0
PCI_ROM_REGION_INDEX = 6
PCI_CONFIG_REGION_INDEX = 7
PCI_VGA_REGION_INDEX = 8
PCI_NUM_REGIONS = 9
PCI_INTX_IRQ_INDEX = 0
PCI_MSI_IRQ_INDEX = 1
PCI_MSIX_IRQ_INDEX = 2
PCI_ERR_IRQ_INDEX = 3
PCI_REQ_IRQ_INDEX = 4
PCI_NUM_IRQS = 5

_u16, _u32, _u64, _s32 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


class CapHeader(ctypes.Structure):
    """``struct vfio_info_cap_header { u16 id; u16 version; u32 next; }`` (8 bytes); ``next`` is
    the offset of the next capability from the start of the info struct, 0 ends the chain."""

    _fields_ = [("id", _u16), ("version", _u16), ("next", _u32)]


class GroupStatus(ctypes.Structure):
    """``struct vfio_group_status { u32 argsz; u32 flags; }`` (8 bytes)."""

    _fields_ = [("argsz", _u32), ("flags", _u32)]


class DeviceInfo(ctypes.Structure):
    """``struct vfio_device_info { u32 argsz; u32 flags; u32 num_regions; u32 num_irqs;
    u32 cap_offset; }`` (20 bytes; newer headers add ``u32 pad`` for 24: argsz tells the kernel
    which we pass)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("num_regions", _u32),
        ("num_irqs", _u32),
        ("cap_offset", _u32),
    ]


class RegionInfo(ctypes.Structure):
    """``struct vfio_region_info { u32 argsz; u32 flags; u32 index; u32 cap_offset; u64 size;
    u64 offset; }`` (32 bytes; size at 16, offset at 24; offset is where the region sits in the
    device fd for pread/pwrite/mmap)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("cap_offset", _u32),
        ("size", _u64),
        ("offset", _u64),
    ]


class IrqInfo(ctypes.Structure):
    """``struct vfio_irq_info { u32 argsz; u32 flags; u32 index; u32 count; }`` (16 bytes)."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("count", _u32)]


class IrqSet(ctypes.Structure):
    """``struct vfio_irq_set { u32 argsz; u32 flags; u32 index; u32 start; u32 count;
    u8 data[]; }`` (20 bytes + data: ``count`` s32 eventfds for DATA_EVENTFD, ``count`` u8 for
    DATA_BOOL, nothing for DATA_NONE)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("start", _u32),
        ("count", _u32),
    ]


class IommuType1Info(ctypes.Structure):
    """``struct vfio_iommu_type1_info { u32 argsz; u32 flags; u64 iova_pgsizes;
    u32 cap_offset; }`` (24 bytes with tail padding; iova_pgsizes at 8, cap_offset at 16)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("iova_pgsizes", _u64),
        ("cap_offset", _u32),
    ]


class IovaRangeCapHeader(ctypes.Structure):
    """``struct vfio_iommu_type1_info_cap_iova_range { struct vfio_info_cap_header header;
    u32 nr_iovas; u32 reserved; struct vfio_iova_range iova_ranges[]; }`` (16 bytes + ranges)."""

    _fields_ = [("header", CapHeader), ("nr_iovas", _u32), ("reserved", _u32)]


class IovaRange(ctypes.Structure):
    """``struct vfio_iova_range { u64 start; u64 end; }`` (16 bytes; ``end`` is inclusive)."""

    _fields_ = [("start", _u64), ("end", _u64)]


class DmaAvailCap(ctypes.Structure):
    """``struct vfio_iommu_type1_info_dma_avail { struct vfio_info_cap_header header;
    u32 avail; }`` (12 bytes): how many more MAP_DMA entries dma_entry_limit allows."""

    _fields_ = [("header", CapHeader), ("avail", _u32)]


class DmaMap(ctypes.Structure):
    """``struct vfio_iommu_type1_dma_map { u32 argsz; u32 flags; u64 vaddr; u64 iova;
    u64 size; }`` (32 bytes; vaddr 8, iova 16, size 24; flags READ 1, WRITE 2)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("vaddr", _u64),
        ("iova", _u64),
        ("size", _u64),
    ]


class DmaUnmap(ctypes.Structure):
    """``struct vfio_iommu_type1_dma_unmap { u32 argsz; u32 flags; u64 iova; u64 size;
    u8 data[]; }`` (24 bytes); the kernel writes back in ``size`` how much it unmapped."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("iova", _u64), ("size", _u64)]


class SpaprTceInfo(ctypes.Structure):
    """``struct vfio_iommu_spapr_tce_info { u32 argsz; u32 flags; u32 dma32_window_start;
    u32 dma32_window_size; struct vfio_iommu_spapr_tce_ddw_info { u64 pgsizes;
    u32 max_dynamic_windows_supported; u32 levels; } ddw; }`` (32 bytes; POWER only)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("dma32_window_start", _u32),
        ("dma32_window_size", _u32),
        ("ddw_pgsizes", _u64),
        ("ddw_max_dynamic_windows_supported", _u32),
        ("ddw_levels", _u32),
    ]


#: ioctls issued by this process, by name (for the per-GiB figures and tests).
IOCTL_COUNTS: Counter[str] = Counter()


def _fail(name: str, err: OSError, what: str) -> IoctlError:
    code = err.errno or 0
    sym = errno_mod.errorcode.get(code, str(code))
    return IoctlError(name, code, f"{name} ({what}) failed: {sym} {os.strerror(code)}")


def ioctl(fd: int, request: int, buf: ctypes.Structure | ctypes.c_int32 | bytearray, name: str, what: str) -> int:
    """Run ``request`` on ``fd`` with ``buf`` as a mutable argument the kernel may write back
    into; returns the ioctl's int result (e.g. the device fd of GROUP_GET_DEVICE_FD)."""
    IOCTL_COUNTS[name] += 1
    try:
        return fcntl.ioctl(fd, request, buf, True)  # type: ignore[no-any-return]
    except OSError as err:
        raise _fail(name, err, what) from err


def ioctl_int(fd: int, request: int, arg: int, name: str, what: str) -> int:
    """Run ``request`` with an integer argument (GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU)."""
    IOCTL_COUNTS[name] += 1
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as err:
        raise _fail(name, err, what) from err
