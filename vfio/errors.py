"""The errors of the vfio package: one hierarchy, rooted at VfioError.

Role: every failure the library reports is a VfioError subclass whose message says what was
expected and what came. The package is the lowest layer: it imports nothing of virtio or vhostx.
Threads: any.
"""

from __future__ import annotations

__all__ = [
    "DeviceError",
    "DmaError",
    "GroupNotViable",
    "IoctlError",
    "IommuError",
    "MdevError",
    "MemlockError",
    "SysfsError",
    "VfioError",
    "VfioUnavailable",
]


class VfioError(Exception):
    """Base of every error raised by the vfio package."""


class VfioUnavailable(VfioError):
    """This host has no VFIO (no /dev/vfio/vfio, no IOMMU groups, or no vfio-pci driver)."""


class IoctlError(VfioError):
    """An ioctl failed; ``name`` is the ioctl, ``errno`` the kernel's answer."""

    def __init__(self, name: str, errno: int, what: str) -> None:
        super().__init__(what)
        self.name = name
        self.errno = errno


class IommuError(VfioError):
    """The container's IOMMU cannot be set up as asked (type, info, capability chain)."""


class GroupNotViable(VfioError):
    """A group has a device bound to a host driver; ``blockers`` lists (device, driver)."""

    def __init__(self, what: str, blockers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(what)
        self.blockers = list(blockers or [])


class DeviceError(VfioError):
    """A device, region or IRQ request that the device does not support."""


class DmaError(VfioError):
    """A DMA map or unmap request the IOMMU or the IOVA allocator refused."""


class MemlockError(DmaError):
    """Mapping would pin more memory than RLIMIT_MEMLOCK allows."""


class SysfsError(VfioError):
    """sysfs does not hold what was expected (a device, a group, a driver)."""


class MdevError(VfioError):
    """A mediated-device request failed (no such parent or type, no instance left)."""
