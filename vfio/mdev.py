"""Mediated devices (mdev): a parent's types, creating and removing instances by UUID.

Role: sysfs only. A parent device (``/sys/bus/pci/devices/BDF`` or any device directory with
``mdev_supported_types``) lists types with ``name``, ``description``, ``device_api`` and
``available_instances``; writing a UUID to a type's ``create`` makes an mdev that appears in
``/sys/bus/mdev/devices/UUID`` with its own IOMMU group, opened through vfio.group.Group like any
device (its name for VFIO_GROUP_GET_DEVICE_FD is the UUID). The sysfs root is a parameter:
tests run against a fake tree, since no mdev driver exists on the machines this was built on.
Threads: any.
"""

from __future__ import annotations

import os
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path

from .errors import MdevError, SysfsError
from .sysfs import Sysfs

__all__ = ["Mdev", "MdevType", "create_mdev", "list_mdevs", "mdev_types", "remove_mdev"]


@dataclass(frozen=True)
class MdevType:
    parent: str
    type_id: str  # directory name, e.g. "mtty-2"
    name: str
    description: str
    device_api: str  # e.g. "vfio-pci"
    available_instances: int
    path: Path


@dataclass(frozen=True)
class Mdev:
    uuid: str
    type_id: str | None
    parent: str | None
    group: int | None


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _parent_dir(sysfs: Sysfs, parent: str) -> Path:
    for base in (sysfs.pci_devices, sysfs.root / "class" / "mdev_bus"):
        d = base / parent
        if (d / "mdev_supported_types").is_dir():
            return d
    raise MdevError(f"expected {parent} to be an mdev parent (a device with "
                    f"mdev_supported_types under {sysfs.pci_devices} or "
                    f"{sysfs.root / 'class/mdev_bus'}), it is not")


def mdev_types(parent: str, sysfs: Sysfs | None = None) -> list[MdevType]:
    """The mdev types ``parent`` offers, with how many more instances each can make."""
    sysfs = sysfs or Sysfs()
    base = _parent_dir(sysfs, parent) / "mdev_supported_types"
    out = []
    for t in sorted(base.iterdir()):
        avail = _text(t / "available_instances")
        out.append(MdevType(
            parent=parent, type_id=t.name, name=_text(t / "name") or t.name,
            description=_text(t / "description"), device_api=_text(t / "device_api"),
            available_instances=int(avail) if avail.isdigit() else 0, path=t,
        ))
    return out


def create_mdev(parent: str, type_id: str, uuid: str | None = None,
                sysfs: Sysfs | None = None) -> str:
    """Create an mdev of ``type_id`` on ``parent``; returns its UUID."""
    sysfs = sysfs or Sysfs()
    types = {t.type_id: t for t in mdev_types(parent, sysfs)}
    t = types.get(type_id)
    if t is None:
        raise MdevError(f"{parent}: expected one of the mdev types {sorted(types)}, "
                        f"got {type_id!r}")
    if t.available_instances < 1:
        raise MdevError(f"{parent} type {type_id}: no instance left (available_instances 0)")
    uid = str(uuid_mod.UUID(uuid)) if uuid else str(uuid_mod.uuid4())
    try:
        sysfs.write(t.path / "create", uid)
    except SysfsError as err:
        raise MdevError(f"{parent} type {type_id}: creating {uid} failed: {err}") from err
    return uid


def _mdev_dir(sysfs: Sysfs, uid: str) -> Path:
    return sysfs.root / "bus" / "mdev" / "devices" / uid


def list_mdevs(sysfs: Sysfs | None = None) -> list[Mdev]:
    sysfs = sysfs or Sysfs()
    base = sysfs.root / "bus" / "mdev" / "devices"
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        group = d / "iommu_group"
        mtype = d / "mdev_type"
        out.append(Mdev(
            uuid=d.name,
            type_id=os.path.basename(os.readlink(mtype)) if mtype.is_symlink() else None,
            parent=os.path.basename(os.path.dirname(os.path.realpath(d))) if d.is_symlink() else None,
            group=int(os.path.basename(os.readlink(group))) if group.is_symlink() else None,
        ))
    return out


def mdev_group(uid: str, sysfs: Sysfs | None = None) -> int:
    """The IOMMU group of mdev ``uid`` (open it with vfio.group.Group(n))."""
    sysfs = sysfs or Sysfs()
    link = _mdev_dir(sysfs, uid) / "iommu_group"
    if not link.is_symlink():
        raise MdevError(f"expected mdev {uid} with an iommu_group link in "
                        f"{_mdev_dir(sysfs, uid)}, there is none")
    return int(os.path.basename(os.readlink(link)))


def remove_mdev(uid: str, sysfs: Sysfs | None = None) -> None:
    sysfs = sysfs or Sysfs()
    path = _mdev_dir(sysfs, uid) / "remove"
    if not path.exists():
        raise MdevError(f"expected an mdev {uid} at {_mdev_dir(sysfs, uid)}, there is none")
    try:
        sysfs.write(path, "1")
    except SysfsError as err:
        raise MdevError(f"removing mdev {uid} failed: {err}") from err
