"""What sysfs says about PCI devices, IOMMU groups and drivers; binding to vfio-pci.

Role: read-only questions (which group a device is in, which devices share it, which driver
each is bound to, whether the group is viable) and the three writes that move a device between
drivers (driver_override, unbind, drivers_probe). The sysfs root is a parameter so that tests run
against a fake tree in a temporary directory.
Threads: any (sysfs itself serialises the writes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SysfsError

__all__ = ["VIABLE_DRIVERS", "PciDevice", "Sysfs"]

#: Drivers a device may be bound to without making its group non-viable.
VIABLE_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pcieport"})


@dataclass(frozen=True)
class PciDevice:
    """One PCI function as sysfs shows it."""

    bdf: str  # "0000:00:03.0"
    vendor: int
    device: int
    pci_class: int
    driver: str | None  # None: bound to no driver
    group: int | None  # None: the device has no IOMMU group

    @property
    def blocks_viability(self) -> bool:
        return self.driver is not None and self.driver not in VIABLE_DRIVERS


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise SysfsError(f"cannot read {path}: {err.strerror}") from err


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        raise SysfsError(f"writing {value!r} to {path} failed: {err.strerror}") from err


class Sysfs:
    """sysfs below ``root`` (``/sys`` on a real host)."""

    def __init__(self, root: str | os.PathLike[str] = "/sys") -> None:
        self.root = Path(root)

    # ---------------------------------------------------------------- paths
    @property
    def pci_devices(self) -> Path:
        return self.root / "bus" / "pci" / "devices"

    @property
    def iommu_groups_dir(self) -> Path:
        return self.root / "kernel" / "iommu_groups"

    def device_dir(self, bdf: str) -> Path:
        path = self.pci_devices / bdf
        if not path.exists():
            raise SysfsError(
                f"expected a PCI device {bdf} (domain:bus:slot.function, e.g. 0000:00:03.0), "
                f"{self.pci_devices} has none"
            )
        return path

    # ---------------------------------------------------------------- questions
    def has_iommu(self) -> bool:
        """True when the kernel made IOMMU groups (an IOMMU is on, or noiommu mode)."""
        return self.iommu_groups_dir.is_dir() and any(self.iommu_groups_dir.iterdir())

    def has_vfio_pci(self) -> bool:
        return (self.root / "bus" / "pci" / "drivers" / "vfio-pci").is_dir()

    def driver(self, bdf: str) -> str | None:
        link = self.device_dir(bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def group_of(self, bdf: str) -> int | None:
        link = self.device_dir(bdf) / "iommu_group"
        if not link.is_symlink():
            return None
        return int(os.path.basename(os.readlink(link)))

    def device(self, bdf: str) -> PciDevice:
        d = self.device_dir(bdf)

        def num(name: str) -> int:
            try:
                return int(_read(d / name), 16)
            except (SysfsError, ValueError):
                return 0

        return PciDevice(
            bdf=bdf,
            vendor=num("vendor"),
            device=num("device"),
            pci_class=num("class"),
            driver=self.driver(bdf),
            group=self.group_of(bdf),
        )

    def groups(self) -> dict[int, list[PciDevice]]:
        """Every IOMMU group with its devices (by group number)."""
        out: dict[int, list[PciDevice]] = {}
        if not self.iommu_groups_dir.is_dir():
            return out
        for g in sorted(self.iommu_groups_dir.iterdir(), key=lambda p: int(p.name)):
            devs = sorted(p.name for p in (g / "devices").iterdir()) if (g / "devices").is_dir() else []
            out[int(g.name)] = [self.device(b) for b in devs if (self.pci_devices / b).exists()]
        return out

    def group_devices(self, group: int) -> list[PciDevice]:
        gdir = self.iommu_groups_dir / str(group) / "devices"
        if not gdir.is_dir():
            raise SysfsError(f"expected IOMMU group {group} at {gdir}, there is none")
        return [self.device(p.name) for p in sorted(gdir.iterdir())
                if (self.pci_devices / p.name).exists()]

    def blockers(self, group: int) -> list[tuple[str, str]]:
        """(device, driver) of each device keeping ``group`` from being viable."""
        return [(d.bdf, d.driver or "") for d in self.group_devices(group) if d.blocks_viability]

    def config_space(self, bdf: str) -> bytes:
        """The device's config space as sysfs gives it (64 bytes unless root: 256 or 4096)."""
        try:
            return (self.device_dir(bdf) / "config").read_bytes()
        except OSError as err:
            raise SysfsError(f"cannot read the config space of {bdf}: {err.strerror}") from err

    def resources(self, bdf: str) -> list[tuple[int, int, int]]:
        """(start, end, flags) of each line of the device's ``resource`` file (BARs 0-5, ROM)."""
        out = []
        for line in _read(self.device_dir(bdf) / "resource").splitlines():
            start, end, flags = (int(x, 16) for x in line.split())
            out.append((start, end, flags))
        return out

    def module_param(self, module: str, param: str) -> str | None:
        path = self.root / "module" / module / "parameters" / param
        return _read(path) if path.exists() else None

    def interrupt_remapping(self, proc_root: str | os.PathLike[str] = "/proc") -> bool | None:
        """True if interrupts are remapped (IR-PCI-MSI in /proc/interrupts, or an Intel IOMMU
        whose extended capabilities have the IR bit); None when neither source says."""
        try:
            if "IR-" in Path(proc_root, "interrupts").read_text():
                return True
        except OSError:
            pass
        seen = False
        for ecap in (self.root / "class" / "iommu").glob("*/intel-iommu/ecap"):
            seen = True
            try:
                if int(_read(ecap), 16) & (1 << 3):
                    return True
            except ValueError:
                continue
        return False if seen else None

    # ---------------------------------------------------------------- binding
    def write(self, path: Path, value: str) -> None:
        """One sysfs write (the kernel acts on it before the write returns)."""
        _write(path, value)

    def bind_vfio(self, bdf: str) -> str | None:
        """Hand ``bdf`` to vfio-pci; returns the driver it had (None: none). Idempotent."""
        if not self.has_vfio_pci():
            raise SysfsError(
                "expected the vfio-pci driver in "
                f"{self.root / 'bus/pci/drivers'}, it is not there (modprobe vfio-pci)"
            )
        previous = self.driver(bdf)
        if previous == "vfio-pci":
            return previous
        d = self.device_dir(bdf)
        self.write(d / "driver_override", "vfio-pci")
        if previous is not None:
            self.write(d / "driver" / "unbind", bdf)
        self.write(self.root / "bus" / "pci" / "drivers_probe", bdf)
        now = self.driver(bdf)
        if now != "vfio-pci":
            raise SysfsError(f"binding {bdf}: expected driver vfio-pci after probing, got {now}")
        return previous

    def unbind_vfio(self, bdf: str) -> str | None:
        """Clear the override, unbind from vfio-pci and let the kernel probe the device's own
        driver again; returns the driver it has afterwards."""
        d = self.device_dir(bdf)
        self.write(d / "driver_override", "\n")
        if self.driver(bdf) is not None:
            self.write(d / "driver" / "unbind", bdf)
        self.write(self.root / "bus" / "pci" / "drivers_probe", bdf)
        return self.driver(bdf)
