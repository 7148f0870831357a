"""A VFIO device fd: info, regions (config space, BARs), capabilities, IRQs, reset.

Role: ``Device`` is what Group.open_device returns. Regions are read and written with
pread/pwrite at the region's offset in the device fd, or through an mmap when the region allows
it (``Region.map()``); 32- and 64-bit register accessors do single accesses of that width (an
emulated device may ignore other widths). ``enable_irq`` wires eventfds to an IRQ index with
VFIO_DEVICE_SET_IRQS. ``enable_dma()`` sets bus mastering and memory space in the PCI command
register: vfio-pci leaves them clear and until they are set DMA and MSI do nothing.
Threads: one thread at a time per device; IrqEventfds may be waited on from any thread.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from . import ioctls as V
from .errors import DeviceError, IoctlError
from .irq import IrqEventfd
from .pcicaps import PciCapability, walk_capabilities

__all__ = ["Device", "IrqInfo", "Region"]

PCI_COMMAND = 0x04
PCI_COMMAND_IO = 1 << 0
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_COMMAND_INTX_DISABLE = 1 << 10

REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM",
                7: "CONFIG", 8: "VGA"}
IRQ_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}


@dataclass(frozen=True)
class IrqInfo:
    index: int
    count: int
    flags: int

    @property
    def name(self) -> str:
        return IRQ_NAMES.get(self.index, str(self.index))

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & V.IRQ_INFO_EVENTFD)

    @property
    def maskable(self) -> bool:
        return bool(self.flags & V.IRQ_INFO_MASKABLE)

    @property
    def automasked(self) -> bool:
        return bool(self.flags & V.IRQ_INFO_AUTOMASKED)


class Region:
    """One region of a device (a BAR, the ROM, config space)."""

    def __init__(self, device: Device, info: V.RegionInfo) -> None:
        self.device = device
        self.index = info.index
        self.flags = info.flags
        self.size = info.size
        self.offset = info.offset
        self._map: mmap.mmap | None = None

    @property
    def name(self) -> str:
        return REGION_NAMES.get(self.index, str(self.index))

    readable = property(lambda self: bool(self.flags & V.REGION_INFO_FLAG_READ))
    writable = property(lambda self: bool(self.flags & V.REGION_INFO_FLAG_WRITE))
    mappable = property(lambda self: bool(self.flags & V.REGION_INFO_FLAG_MMAP))

    def _check(self, off: int, n: int) -> None:
        if off < 0 or off + n > self.size:
            raise DeviceError(
                f"{self.device.name} {self.name}: expected an access inside 0-{self.size:#x}, "
                f"got {n} bytes at {off:#x}"
            )

    def read(self, off: int, n: int) -> bytes:
        self._check(off, n)
        data = os.pread(self.device.fd, n, self.offset + off)
        if len(data) != n:
            raise DeviceError(f"{self.device.name} {self.name}: read of {n} bytes at {off:#x} "
                              f"returned {len(data)}")
        return data

    def write(self, off: int, data: bytes) -> None:
        self._check(off, len(data))
        done = os.pwrite(self.device.fd, data, self.offset + off)
        if done != len(data):
            raise DeviceError(f"{self.device.name} {self.name}: write of {len(data)} bytes at "
                              f"{off:#x} wrote {done}")

    def map(self) -> mmap.mmap:
        """mmap the whole region (cached); DeviceError if the region does not allow it."""
        if self._map is None:
            if not self.mappable:
                raise DeviceError(f"{self.device.name} {self.name}: expected a region with the "
                                  f"MMAP flag, flags are {self.flags:#x}")
            prot = (mmap.PROT_READ if self.readable else 0) | (mmap.PROT_WRITE if self.writable else 0)
            self._map = mmap.mmap(self.device.fd, self.size, mmap.MAP_SHARED, prot,
                                  offset=self.offset)
        return self._map

    def _reg(self, off: int, width: int, fmt: Literal["I", "Q"]) -> memoryview | None:
        self._check(off, width)
        if off % width:
            raise DeviceError(f"{self.device.name} {self.name}: expected a {width}-byte aligned "
                              f"register offset, got {off:#x}")
        if self._map is None and not self.mappable:
            return None
        return memoryview(self.map()).cast(fmt)

    def read32(self, off: int) -> int:
        mv = self._reg(off, 4, "I")
        return mv[off // 4] if mv is not None else struct.unpack("<I", self.read(off, 4))[0]

    def write32(self, off: int, value: int) -> None:
        mv = self._reg(off, 4, "I")
        if mv is not None:
            mv[off // 4] = value & 0xFFFFFFFF
        else:
            self.write(off, struct.pack("<I", value & 0xFFFFFFFF))

    def read64(self, off: int) -> int:
        mv = self._reg(off, 8, "Q")
        return mv[off // 8] if mv is not None else struct.unpack("<Q", self.read(off, 8))[0]

    def write64(self, off: int, value: int) -> None:
        mv = self._reg(off, 8, "Q")
        if mv is not None:
            mv[off // 8] = value
        else:
            self.write(off, struct.pack("<Q", value))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class Device:
    """An open VFIO device fd (from Group.open_device)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        info = V.DeviceInfo(argsz=ctypes.sizeof(V.DeviceInfo))
        V.ioctl(fd, V.DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO", name)
        self.flags = info.flags
        self.num_regions = info.num_regions
        self.num_irqs = info.num_irqs
        self._regions: dict[int, Region] = {}
        self.irqs: dict[int, list[IrqEventfd]] = {}

    is_pci = property(lambda self: bool(self.flags & V.DEVICE_FLAGS_PCI))
    can_reset = property(lambda self: bool(self.flags & V.DEVICE_FLAGS_RESET))

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        for index in list(self.irqs):
            self.disable_irq(index)
        for r in self._regions.values():
            r.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- regions
    def region(self, index: int) -> Region:
        if index not in self._regions:
            if not 0 <= index < self.num_regions:
                raise DeviceError(f"{self.name}: expected a region index below "
                                  f"{self.num_regions}, got {index}")
            info = V.RegionInfo(argsz=ctypes.sizeof(V.RegionInfo), index=index)
            V.ioctl(self.fd, V.DEVICE_GET_REGION_INFO, info, "VFIO_DEVICE_GET_REGION_INFO",
                    f"{self.name} region {index}")
            self._regions[index] = Region(self, info)
        return self._regions[index]

    def regions(self) -> list[Region]:
        """Every region the device has; indexes it refuses with EINVAL (vfio-pci does for the
        VGA region of a device that is not a VGA device) are left out."""
        out = []
        for i in range(self.num_regions):
            try:
                out.append(self.region(i))
            except IoctlError as err:
                if err.errno != errno.EINVAL:
                    raise
        return out

    def bar(self, n: int) -> Region:
        r = self.region(V.PCI_BAR0_REGION_INDEX + n)
        if r.size == 0:
            raise DeviceError(f"{self.name}: BAR{n} is not implemented (size 0)")
        return r

    @property
    def config(self) -> Region:
        return self.region(V.PCI_CONFIG_REGION_INDEX)

    def config_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.config.read(off, size), "little")

    def config_write(self, off: int, size: int, value: int) -> None:
        self.config.write(off, value.to_bytes(size, "little"))

    def capabilities(self) -> list[PciCapability]:
        """Standard and extended capabilities walked from config space."""
        cfg = self.config
        return walk_capabilities(cfg.read, cfg.size)

    def enable_dma(self) -> int:
        """Set memory space and bus mastering in the command register; returns the new value."""
        cmd = self.config_read(PCI_COMMAND, 2) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        self.config_write(PCI_COMMAND, 2, cmd)
        return self.config_read(PCI_COMMAND, 2)

    def reset(self) -> None:
        if not self.can_reset:
            raise DeviceError(f"{self.name}: expected a device that supports reset, its info "
                              f"flags ({self.flags:#x}) lack VFIO_DEVICE_FLAGS_RESET")
        V.ioctl_int(self.fd, V.DEVICE_RESET, 0, "VFIO_DEVICE_RESET", self.name)

    # ---------------------------------------------------------------- interrupts
    def irq_info(self, index: int) -> IrqInfo:
        info = V.IrqInfo(argsz=ctypes.sizeof(V.IrqInfo), index=index)
        V.ioctl(self.fd, V.DEVICE_GET_IRQ_INFO, info, "VFIO_DEVICE_GET_IRQ_INFO",
                f"{self.name} irq index {index}")
        return IrqInfo(index, info.count, info.flags)

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 data: bytes = b"") -> None:
        """The raw VFIO_DEVICE_SET_IRQS."""
        hdr = ctypes.sizeof(V.IrqSet)
        buf = bytearray(hdr + len(data))
        req = V.IrqSet.from_buffer(buf)
        req.argsz, req.flags, req.index, req.start, req.count = len(buf), flags, index, start, count
        buf[hdr:] = data
        del req
        V.ioctl(self.fd, V.DEVICE_SET_IRQS, buf, "VFIO_DEVICE_SET_IRQS",
                f"{self.name} {IRQ_NAMES.get(index, index)} start {start} count {count} "
                f"flags {flags:#x}")

    def enable_irq(self, index: int, count: int = 1) -> list[IrqEventfd]:
        """Wire ``count`` eventfds to IRQ ``index`` (INTx 0, MSI 1, MSI-X 2); returns them."""
        info = self.irq_info(index)
        if count < 1 or count > info.count:
            raise DeviceError(f"{self.name}: expected 1-{info.count} vectors for "
                              f"{info.name}, asked for {count}")
        if not info.eventfd:
            raise DeviceError(f"{self.name}: {info.name} does not signal eventfds "
                              f"(irq info flags {info.flags:#x})")
        self.disable_irq(index)
        fds = [IrqEventfd(index, v) for v in range(count)]
        try:
            self.set_irqs(index, V.IRQ_SET_DATA_EVENTFD | V.IRQ_SET_ACTION_TRIGGER, 0, count,
                          struct.pack(f"<{count}i", *(e.fd for e in fds)))
        except Exception:
            for e in fds:
                e.close()
            raise
        self.irqs[index] = fds
        return fds

    def disable_irq(self, index: int) -> None:
        fds = self.irqs.pop(index, None)
        if fds is None:
            return
        try:
            self.set_irqs(index, V.IRQ_SET_DATA_NONE | V.IRQ_SET_ACTION_TRIGGER, 0, 0)
        finally:
            for e in fds:
                e.close()

    def unmask_intx(self) -> None:
        """INTx is masked by the kernel on delivery: unmask after handling each interrupt."""
        self.set_irqs(V.PCI_INTX_IRQ_INDEX, V.IRQ_SET_DATA_NONE | V.IRQ_SET_ACTION_UNMASK, 0, 1)

    def trigger(self, index: int, vector: int = 0) -> None:
        """Fire vector ``vector`` of ``index`` from the kernel (loopback self-test)."""
        self.set_irqs(index, V.IRQ_SET_DATA_NONE | V.IRQ_SET_ACTION_TRIGGER, vector, 1)
