"""A VFIO group (/dev/vfio/N or /dev/vfio/noiommu-N): viability, container, device fds.

Role: the unit of ownership. ``Group.open()`` opens the group node; ``check_viable()`` raises
GroupNotViable naming each device (and its driver, from sysfs) that keeps the group from being
viable; ``set_container()`` attaches it; ``open_device()`` returns a vfio.device.Device.
Threads: one thread at a time per group.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

from . import ioctls as V
from .container import NO_VFIO_MESSAGE, Container
from .errors import GroupNotViable, VfioError, VfioUnavailable
from .sysfs import Sysfs

if TYPE_CHECKING:
    from .device import Device

__all__ = ["Group", "GroupState"]


@dataclass(frozen=True)
class GroupState:
    viable: bool
    container_set: bool


class Group:
    """An open VFIO group; ``number`` is the IOMMU group number."""

    def __init__(self, number: int, *, noiommu: bool = False, dev_root: str = "/dev/vfio",
                 sysfs: Sysfs | None = None) -> None:
        self.number = number
        self.sysfs = sysfs or Sysfs()
        self.path = os.path.join(dev_root, f"noiommu-{number}" if noiommu else str(number))
        self.container: Container | None = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as err:
            if not os.path.exists(os.path.join(dev_root, "vfio")):
                raise VfioUnavailable(NO_VFIO_MESSAGE.format(path=os.path.join(dev_root, "vfio"))) from err
            raise VfioError(
                f"expected a VFIO group node {self.path}, there is none: bind the group's "
                f"devices to vfio-pci first (vhostx vfio bind BDF)"
            ) from err
        except OSError as err:
            if err.errno == 16:  # EBUSY
                raise VfioError(f"{self.path} is already open (by this or another process)") from err
            raise VfioError(f"cannot open {self.path}: {err.strerror}") from err

    @classmethod
    def of_device(cls, bdf: str, *, sysfs: Sysfs | None = None, dev_root: str = "/dev/vfio") -> Group:
        sysfs = sysfs or Sysfs()
        number = sysfs.group_of(bdf)
        if number is None:
            raise VfioUnavailable(f"{bdf} has no IOMMU group: this host runs without an IOMMU")
        return cls(number, sysfs=sysfs, dev_root=dev_root)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def status(self) -> GroupState:
        st = V.GroupStatus(argsz=ctypes.sizeof(V.GroupStatus))
        V.ioctl(self.fd, V.GROUP_GET_STATUS, st, "VFIO_GROUP_GET_STATUS", self.path)
        return GroupState(
            viable=bool(st.flags & V.GROUP_FLAGS_VIABLE),
            container_set=bool(st.flags & V.GROUP_FLAGS_CONTAINER_SET),
        )

    def check_viable(self) -> None:
        """Raise GroupNotViable naming the devices (and drivers) that hold the group."""
        if self.status().viable:
            return
        try:
            blockers = self.sysfs.blockers(self.number)
        except VfioError:
            blockers = []
        named = ", ".join(f"{b} (bound to {d})" for b, d in blockers) or "no device sysfs names"
        raise GroupNotViable(
            f"IOMMU group {self.number} is not viable: every device in it must be bound to "
            f"vfio-pci (or pci-stub, or be a bridge port), but {named}; "
            f"bind them with `vhostx vfio bind BDF`",
            blockers,
        )

    def set_container(self, container: Container) -> None:
        """Attach to ``container`` (the group must be viable)."""
        self.check_viable()
        fd = ctypes.c_int32(container.fd)
        V.ioctl(self.fd, V.GROUP_SET_CONTAINER, fd, "VFIO_GROUP_SET_CONTAINER", self.path)
        self.container = container
        container.groups.append(self)

    def unset_container(self) -> None:
        V.ioctl(self.fd, V.GROUP_UNSET_CONTAINER, bytearray(4), "VFIO_GROUP_UNSET_CONTAINER",
                self.path)
        if self.container is not None and self in self.container.groups:
            self.container.groups.remove(self)
        self.container = None

    def device_fd(self, name: str) -> int:
        """VFIO_GROUP_GET_DEVICE_FD for ``name`` (a PCI address or an mdev UUID)."""
        if self.container is None:
            raise VfioError(f"{self.path}: expected the group in a container before opening "
                            f"{name}, it is in none (set_container first)")
        buf = bytearray(name.encode() + b"\0")
        return V.ioctl(self.fd, V.GROUP_GET_DEVICE_FD, buf, "VFIO_GROUP_GET_DEVICE_FD",
                       f"{self.path} device {name}")

    def open_device(self, name: str) -> Device:
        from .device import Device

        return Device(self.device_fd(name), name)
