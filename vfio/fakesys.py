"""A fake sysfs tree in a directory, for tests and for trying the tooling on a host without VFIO.

Role: ``FakeSysfs(root)`` builds the parts of /sys that vfio.sysfs and vfio.mdev read (PCI
devices with config space and resources, drivers, IOMMU groups, module parameters, mdev parents)
and, as a vfio.sysfs.Sysfs subclass, acts on writes the way the kernel would: driver_override +
unbind + drivers_probe move a device between drivers, an mdev type's ``create`` makes an mdev
with its own IOMMU group, ``remove`` deletes it.
Threads: one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

from .sysfs import Sysfs

__all__ = ["FakeSysfs", "make_config"]


def make_config(vendor: int, device: int, pci_class: int,
                caps: Sequence[tuple[int, bytes]] = (),
                ext_caps: Sequence[tuple[int, int, bytes]] = ()) -> bytes:
    """A config space (4 KiB when ``ext_caps`` are given, else 256 bytes) with standard
    capabilities ``(id, body after the 2-byte header)`` from 0x40 and extended capabilities
    ``(id, version, body)`` from 0x100."""
    cfg = bytearray(4096 if ext_caps else 256)
    struct.pack_into("<HH", cfg, 0, vendor, device)
    cfg[0x09:0x0C] = pci_class.to_bytes(3, "little")
    off = 0x40
    if caps:
        struct.pack_into("<H", cfg, 0x06, 0x10)
        cfg[0x34] = off
    for i, (cap_id, body) in enumerate(caps):
        size = (2 + len(body) + 3) & ~3
        nxt = off + size if i + 1 < len(caps) else 0
        cfg[off] = cap_id
        cfg[off + 1] = nxt
        cfg[off + 2 : off + 2 + len(body)] = body
        off = nxt
    off = 0x100
    for i, (cap_id, version, body) in enumerate(ext_caps):
        size = (4 + len(body) + 3) & ~3
        nxt = off + size if i + 1 < len(ext_caps) else 0
        struct.pack_into("<I", cfg, off, cap_id | version << 16 | nxt << 20)
        cfg[off + 4 : off + 4 + len(body)] = body
        off = nxt
    return bytes(cfg)


class FakeSysfs(Sysfs):
    """A writable imitation of /sys below ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        for d in ("bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups",
                  "bus/mdev/devices", "devices/pci0000:00", "class/iommu"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "bus/pci/drivers_probe").touch()

    def add_driver(self, name: str) -> Path:
        d = self.root / "bus/pci/drivers" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind", "new_id"):
            (d / f).touch()
        return d

    def add_device(self, bdf: str, *, vendor: int, device: int, pci_class: int = 0,
                   driver: str | None = None, group: int | None = None,
                   config: bytes | None = None,
                   resources: Sequence[tuple[int, int, int]] = ()) -> Path:
        real = self.root / "devices/pci0000:00" / bdf
        real.mkdir(parents=True)
        (real / "vendor").write_text(f"{vendor:#06x}\n")
        (real / "device").write_text(f"{device:#06x}\n")
        (real / "class").write_text(f"{pci_class:#08x}\n")
        (real / "driver_override").write_text("(null)\n")
        (real / "config").write_bytes(config or make_config(vendor, device, pci_class))
        lines = [f"{s:#018x} {e:#018x} {f:#018x}" for s, e, f in resources]
        lines += ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * (7 - len(lines))
        (real / "resource").write_text("\n".join(lines) + "\n")
        os.symlink(os.path.relpath(real, self.pci_devices), self.pci_devices / bdf)
        if group is not None:
            self._join_group(real, bdf, group)
        (real / ".native_driver").write_text(driver or "")  # what drivers_probe picks
        if driver is not None:
            self._bind(bdf, driver)
        return real

    def _join_group(self, real: Path, name: str, group: int) -> None:
        gdir = self.iommu_groups_dir / str(group) / "devices"
        gdir.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(real, gdir), gdir / name)
        os.symlink(os.path.relpath(gdir.parent, real), real / "iommu_group")

    def _bind(self, bdf: str, driver: str) -> None:
        ddir = self.add_driver(driver)
        real = (self.pci_devices / bdf).resolve()
        os.symlink(os.path.relpath(ddir, real), real / "driver")
        os.symlink(os.path.relpath(real, ddir), ddir / bdf)

    def _unbind(self, bdf: str) -> None:
        real = (self.pci_devices / bdf).resolve()
        link = real / "driver"
        if link.is_symlink():
            ddir = link.resolve()
            (ddir / bdf).unlink(missing_ok=True)
            link.unlink()

    def add_mdev_parent(self, bdf: str, types: dict[str, tuple[str, int]]) -> None:
        """Give ``bdf`` mdev types: type id -> (name, available instances)."""
        base = (self.pci_devices / bdf).resolve() / "mdev_supported_types"
        for type_id, (name, avail) in types.items():
            t = base / type_id
            (t / "devices").mkdir(parents=True)
            (t / "name").write_text(name + "\n")
            (t / "description").write_text(f"fake {name}\n")
            (t / "device_api").write_text("vfio-pci\n")
            (t / "available_instances").write_text(f"{avail}\n")
            (t / "create").touch()

    def write(self, path: Path, value: str) -> None:
        super().write(path, value)
        value = value.strip()
        if path.name == "driver_override":
            return
        if path.name == "unbind":
            self._unbind(value)
        elif path.name == "drivers_probe":
            override = (self.pci_devices / value / "driver_override").read_text().strip()
            if (self.pci_devices / value / "driver").is_symlink():
                return
            native = (self.pci_devices / value / ".native_driver").read_text() or None
            want = override if override not in ("", "(null)") else native
            if want is not None and (self.root / "bus/pci/drivers" / want).is_dir():
                self._bind(value, want)
        elif path.name == "create":
            self._create_mdev(path.parent, value)
        elif path.name == "remove" and path.parent.parent.name == "devices":
            self._remove_mdev(path.parent.name)

    def _create_mdev(self, tdir: Path, uid: str) -> None:
        tdir = tdir.resolve()
        avail = int((tdir / "available_instances").read_text())
        parent = tdir.parent.parent
        real = parent / uid
        real.mkdir()
        (real / "remove").touch()
        os.symlink(os.path.relpath(tdir, real), real / "mdev_type")
        os.symlink(os.path.relpath(real, tdir / "devices"), tdir / "devices" / uid)
        mdevs = self.root / "bus/mdev/devices"
        os.symlink(os.path.relpath(real, mdevs), mdevs / uid)
        groups = [int(g.name) for g in self.iommu_groups_dir.iterdir()] or [0]
        self._join_group(real, uid, max(groups) + 1)
        (tdir / "available_instances").write_text(f"{avail - 1}\n")

    def _remove_mdev(self, uid: str) -> None:
        link = self.root / "bus/mdev/devices" / uid
        real = link.resolve()
        tdir = (real / "mdev_type").resolve()
        group = (real / "iommu_group").resolve()
        for p in (group / "devices" / uid, tdir / "devices" / uid, link):
            p.unlink()
        (group / "devices").rmdir()
        group.rmdir()
        for f in real.iterdir():
            f.unlink()
        real.rmdir()
        avail = int((tdir / "available_instances").read_text())
        (tdir / "available_instances").write_text(f"{avail + 1}\n")
