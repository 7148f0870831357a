"""PCI capability lists walked from config space (standard and extended).

Role: pure decoding; ``walk_capabilities(read)`` takes a reader ``read(offset, size) -> bytes``
(a device's config region, or the bytes of a sysfs config file) and returns every capability with
its offset. Loops and out-of-range pointers end the walk with an error saying where.
Threads: any.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import DeviceError

__all__ = ["CAP_NAMES", "EXT_CAP_NAMES", "PciCapability", "walk_capabilities"]

PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_EXT_CAP_START = 0x100

CAP_NAMES = {
    0x01: "power-management", 0x02: "agp", 0x03: "vpd", 0x04: "slot-id", 0x05: "msi",
    0x06: "hotswap", 0x07: "pci-x", 0x08: "hypertransport", 0x09: "vendor-specific",
    0x0A: "debug-port", 0x0B: "compactpci", 0x0C: "hotplug", 0x0D: "subsystem-vendor",
    0x0E: "agp3", 0x0F: "secure", 0x10: "pci-express", 0x11: "msi-x", 0x12: "sata",
    0x13: "advanced-features", 0x14: "enhanced-allocation",
}
EXT_CAP_NAMES = {
    0x01: "aer", 0x02: "vc", 0x03: "serial-number", 0x04: "power-budget", 0x0B: "vendor",
    0x0D: "acs", 0x0E: "ari", 0x0F: "ats", 0x10: "sr-iov", 0x13: "pri", 0x15: "resizable-bar",
    0x18: "ltr", 0x19: "secondary-pcie", 0x1B: "pasid", 0x1E: "l1-pm-substates",
    0x23: "dvsec", 0x25: "data-link", 0x26: "phy-16gt",
}

Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class PciCapability:
    """One capability: its id, where it sits, and (for virtio vendor capabilities) its
    ``cfg_type`` byte at offset 3, so callers can tell virtio's structures apart."""

    cap_id: int
    offset: int
    extended: bool = False
    version: int = 0  # extended capabilities only
    vendor_byte3: int | None = None  # byte 3 of a standard vendor-specific capability

    @property
    def name(self) -> str:
        names = EXT_CAP_NAMES if self.extended else CAP_NAMES
        return names.get(self.cap_id, f"{'ext-' if self.extended else ''}{self.cap_id:#04x}")


def walk_capabilities(read: Reader, config_size: int = 256) -> list[PciCapability]:
    """Every standard capability (from the pointer at 0x34) and, when the config space is
    4 KiB, every extended capability (from 0x100)."""
    caps: list[PciCapability] = []
    (status,) = struct.unpack("<H", read(PCI_STATUS, 2))
    if status & PCI_STATUS_CAP_LIST:
        ptr = read(PCI_CAPABILITY_LIST, 1)[0] & ~3
        seen: set[int] = set()
        while ptr:
            if ptr < 0x40 or ptr > 0xFC or ptr in seen:
                raise DeviceError(
                    f"config space capability list: expected a pointer in 0x40-0xfc not seen "
                    f"before, got {ptr:#x} after {[hex(c.offset) for c in caps]}"
                )
            seen.add(ptr)
            cap_id, nxt, _b2, b3 = read(ptr, 4)
            caps.append(PciCapability(cap_id, ptr, vendor_byte3=b3 if cap_id == 0x09 else None))
            ptr = nxt & ~3
    if config_size > PCI_EXT_CAP_START:
        off = PCI_EXT_CAP_START
        seen = set()
        while off:
            if off < PCI_EXT_CAP_START or off > config_size - 4 or off in seen:
                raise DeviceError(
                    f"extended capability list: expected an offset in 0x100-{config_size - 4:#x} "
                    f"not seen before, got {off:#x}"
                )
            seen.add(off)
            (hdr,) = struct.unpack("<I", read(off, 4))
            if hdr in (0, 0xFFFFFFFF):
                break
            caps.append(PciCapability(hdr & 0xFFFF, off, True, (hdr >> 16) & 0xF))
            off = (hdr >> 20) & 0xFFC
    return caps
