"""The virtio-pci transport (modern, VIRTIO 1.2 section 4.1) over VFIO: a user-space driver that
owns a virtio PCI function, the way DPDK and SPDK own devices.

Role: ``VirtioPciTransport`` implements virtio.transport.Transport on a ``vfio.Device``:
- the virtio vendor capabilities (common cfg, notify, ISR, device cfg) are found by
  ``parse_virtio_caps`` from config space; registers are read and written with accesses of their
  own width (``Region.read``/``write`` of 1, 2 or 4 bytes: vfio-pci keeps the width);
- reset, ACKNOWLEDGE | DRIVER, feature negotiation (VERSION_1 required; ACCESS_PLATFORM taken
  when offered), FEATURES_OK read back, queues, DRIVER_OK;
- queues (virtio.driver.split.DriverQueue) and buffers live in one DMA area mapped through the
  IOMMU. ``iova_mode``: "va" maps it at an IOVA the vfio DmaMapper allocates (the device must
  honour the IOMMU: ACCESS_PLATFORM); "pa" maps it at IOVA = guest physical address, on one
  physically contiguous hugepage (read from /proc/self/pagemap), so that a device that bypasses
  the IOMMU (no ACCESS_PLATFORM: it reads guest physical addresses) still finds the right bytes;
  "auto" picks "va" when ACCESS_PLATFORM is offered, "pa" otherwise;
- interrupts: MSI-X vectors bound to eventfds (config vector 0, queue i vector i + 1 when there
  are enough, else shared), or INTx (the ISR is read to acknowledge, then INTx unmasked);
- kicks: a 16-bit write of the queue index at notify_off * notify_off_multiplier in the notify
  BAR (through the BAR's mmap when vfio allows it).
virtio imports vfio, never the reverse. Threads: one thread owns a transport and its drivers.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from vfio import Container, Device, DmaBuffer, DmaMapper, Group, IrqEventfd
from vfio import ioctls as V
from vfio.errors import DeviceError
from virtio import features as vf
from virtio.driver.split import DriverQueue
from virtio.errors import VhostError

__all__ = [
    "DEFAULT_PCI_FEATURES",
    "VirtioCap",
    "VirtioPciTransport",
    "parse_virtio_caps",
    "physical_address",
]

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
_PCI_CAP_VNDR = 0x09
NO_VECTOR = 0xFFFF
HUGEPAGE = 2 << 20
IOVA_RESERVED_LOW = 1 << 20  # IOVAs below are never handed out ("va" mode)
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)

# common configuration structure (VIRTIO 1.2, 4.1.4.3)
DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0, 4, 8, 12
CONFIG_MSIX_VECTOR, NUM_QUEUES, DEVICE_STATUS, CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = (
    0x16, 0x18, 0x1A, 0x1C, 0x1E)
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30

#: what this driver implements (split rings); ACCESS_PLATFORM is taken only when offered
DEFAULT_PCI_FEATURES = vf.mask([
    vf.VIRTIO_F_VERSION_1, vf.VIRTIO_F_ACCESS_PLATFORM, vf.VIRTIO_RING_F_EVENT_IDX,
    vf.VIRTIO_NET_F_MRG_RXBUF, vf.VIRTIO_NET_F_MAC, vf.VIRTIO_NET_F_STATUS,
])


@dataclass(frozen=True)
class VirtioCap:
    """One virtio PCI capability: structure ``cfg_type`` at ``offset`` of BAR ``bar``."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int  # where the capability sits in config space
    notify_off_multiplier: int = 0  # notify capability only


def parse_virtio_caps(read: object, cap_offsets: list[int]) -> dict[int, VirtioCap]:
    """The first capability of each cfg_type among the vendor capabilities at ``cap_offsets``;
    ``read(offset, size) -> bytes`` reads config space. Refuses a device without common,
    notify and ISR structures."""
    reader = read
    caps: dict[int, VirtioCap] = {}
    for off in cap_offsets:
        raw = reader(off, 16)  # type: ignore[operator]
        vndr, _nxt, cap_len, cfg_type, bar = raw[0], raw[1], raw[2], raw[3], raw[4]
        if vndr != _PCI_CAP_VNDR or cap_len < 16 or bar > 5:
            continue
        offset, length = struct.unpack_from("<II", raw, 8)
        mult = 0
        if cfg_type == CAP_NOTIFY:
            if cap_len < 20:
                raise DeviceError(f"virtio notify capability at {off:#x}: expected 20 bytes or "
                                  f"more, cap_len is {cap_len}")
            mult = struct.unpack("<I", reader(off + 16, 4))[0]  # type: ignore[operator]
        caps.setdefault(cfg_type, VirtioCap(cfg_type, bar, offset, length, off, mult))
    missing = [n for t, n in ((CAP_COMMON, "common"), (CAP_NOTIFY, "notify"), (CAP_ISR, "isr"))
               if t not in caps]
    if missing:
        raise DeviceError(f"expected a modern virtio-pci device with common, notify and ISR "
                          f"capabilities, missing {', '.join(missing)}")
    return caps


def physical_address(vaddr: int, pagemap: str = "/proc/self/pagemap") -> int:
    """The physical address of this process's byte at ``vaddr`` (resident; root needed)."""
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(pagemap, os.O_RDONLY)
    try:
        entry = struct.unpack("<Q", os.pread(fd, 8, vaddr // page * 8))[0]
    finally:
        os.close(fd)
    pfn = entry & ((1 << 55) - 1)
    if not entry >> 63 or pfn == 0:
        raise DeviceError(f"physical address of {vaddr:#x}: expected a present page with a PFN "
                          f"(run as root), pagemap entry is {entry:#x}")
    return int(pfn * page + vaddr % page)


class _DmaArea:
    """The transport's DMA memory: one mapping, a bump allocator, its IOVA."""

    def __init__(self, container: Container, size: int, mode: str) -> None:
        self.container = container
        self.mode = mode
        self.map_ops = 0
        self._mapper: DmaMapper | None = None
        if mode == "pa":
            self.size = (size + HUGEPAGE - 1) // HUGEPAGE * HUGEPAGE
            if self.size != HUGEPAGE:
                raise DeviceError(f"iova_mode 'pa' uses one 2 MiB hugepage, {size} bytes asked")
            try:
                self.mm = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS |
                                    MAP_HUGETLB)
            except OSError as err:
                raise DeviceError(f"iova_mode 'pa' needs a free 2 MiB hugepage (kernel argument "
                                  f"hugepages=N or /proc/sys/vm/nr_hugepages): {err}") from err
            self.mm[0:1] = b"\0"  # fault the hugepage in
            self.vaddr = _address(self.mm)
            self.iova = physical_address(self.vaddr)
            container.map_dma(self.vaddr, self.iova, self.size)
            self.map_ops = 1
            self._buf: DmaBuffer | None = None
        else:
            # never IOVA 0: QEMU does not start a vhost ring whose descriptor address is 0
            self._mapper = DmaMapper(container, reserve_low=IOVA_RESERVED_LOW)
            self._buf = DmaBuffer(size)
            self.size = self._buf.size
            self.mm = self._buf.mem
            self.vaddr = self._buf.vaddr
            self.iova = self._mapper.map_buffer(self._buf)
            self.map_ops = self._mapper.map_ioctls
        self.mem = memoryview(self.mm)
        self._brk = 0

    def alloc(self, size: int, align: int) -> int:
        off = (self._brk + align - 1) & ~(align - 1)
        if off + size > self.size:
            raise VhostError(f"DMA area exhausted: need {size} bytes at {off:#x}, have "
                             f"{self.size:#x}")
        self._brk = off + size
        return self.iova + off

    def close(self) -> None:
        if self._mapper is not None:
            self._mapper.unmap(self.iova)
        else:
            self.container.unmap_dma(self.iova, self.size)
        self.mem.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a driver still holds a view; the mapping goes when it is collected


def _address(mm: mmap.mmap) -> int:
    c = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(c)
    del c
    return addr


class VirtioPciTransport:
    """A modern virtio-pci device driven from user space through VFIO (see the module doc)."""

    def __init__(self, device: Device, container: Container, *, queues: int = 2,
                 queue_size: int = 256, features: int | None = None, mem_size: int = 2 << 20,
                 iova_mode: str = "auto", irq: str = "auto") -> None:
        if iova_mode not in ("auto", "va", "pa"):
            raise ValueError(f"iova_mode must be 'auto', 'va' or 'pa', got {iova_mode!r}")
        if irq not in ("auto", "msix", "intx"):
            raise ValueError(f"irq must be 'auto', 'msix' or 'intx', got {irq!r}")
        self.device = device
        self.container = container
        self.num_queues = queues
        self.queue_size = queue_size
        self.wanted_features = DEFAULT_PCI_FEATURES if features is None else features
        self.mem_size = mem_size
        self.iova_mode = iova_mode
        self.irq_mode = irq
        self.offered_features = 0
        self.features = 0
        self.queues: list[DriverQueue] = []
        self.mem: memoryview = memoryview(b"")
        self.dma_base = 0
        self.mac: bytes | None = None
        self.kicks = 0
        self.interrupts = 0
        self._owned: list[Group | Container] = []
        self._dma: _DmaArea | None = None
        self._irqs: list[IrqEventfd] = []
        self._vector_of: list[int] = []  # queue -> index into _irqs
        self.irq_kind = ""  # "msix" or "intx" once started
        self._notify: list[tuple[memoryview | None, int]] = []  # per queue: (16-bit view, offset)
        caps = device.capabilities()
        offsets = [c.offset for c in caps if c.cap_id == _PCI_CAP_VNDR and not c.extended]
        self.caps = parse_virtio_caps(device.config.read, offsets)
        self.has_msix = any(c.name == "msi-x" for c in caps)
        self._common = self._region(CAP_COMMON)
        self._isr = self._region(CAP_ISR)
        self._devcfg = self._region(CAP_DEVICE) if CAP_DEVICE in self.caps else None

    @classmethod
    def open(cls, bdf: str, **kw: object) -> VirtioPciTransport:
        """Open ``bdf`` (bound to vfio-pci) in a container of its own and start it."""
        container = Container()
        group = Group.of_device(bdf)
        try:
            group.set_container(container)
            container.set_iommu()
            dev = group.open_device(bdf)
        except BaseException:
            group.close()
            container.close()
            raise
        t = cls(dev, container, **kw)  # type: ignore[arg-type]
        t._owned = [group, container]
        try:
            t.start()
        except BaseException:
            t.close()
            raise
        return t

    def __enter__(self) -> Self:
        if not self.connected:
            self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---------------------------------------------------------------- registers
    def _region(self, cfg_type: int) -> tuple[object, int]:
        cap = self.caps[cfg_type]
        return self.device.bar(cap.bar), cap.offset

    def _rd(self, where: tuple[object, int], off: int, size: int) -> int:
        region, base = where
        return int.from_bytes(region.read(base + off, size), "little")  # type: ignore[attr-defined]

    def _wr(self, where: tuple[object, int], off: int, size: int, value: int) -> None:
        region, base = where
        region.write(base + off, value.to_bytes(size, "little"))  # type: ignore[attr-defined]

    def _common_rd(self, off: int, size: int) -> int:
        return self._rd(self._common, off, size)

    def _common_wr(self, off: int, size: int, value: int) -> None:
        self._wr(self._common, off, size, value)

    @property
    def status(self) -> int:
        return self._common_rd(DEVICE_STATUS, 1)

    def _set_status(self, value: int) -> None:
        self._common_wr(DEVICE_STATUS, 1, value)

    def reset(self) -> None:
        """Write status 0 and wait for the device to read back 0 (VIRTIO 1.2 4.1.4.3.2)."""
        self._set_status(0)
        for _ in range(1000):
            if self.status == 0:
                return
        raise DeviceError(f"{self.device.name}: device status did not return to 0 after reset")

    # ---------------------------------------------------------------- bring-up
    def start(self) -> None:
        """Reset, negotiate, set up DMA memory, interrupts and queues, DRIVER_OK."""
        dev = self.device
        dev.enable_dma()
        self.reset()
        self._set_status(vf.STATUS_ACKNOWLEDGE)
        self._set_status(vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER)
        offered = 0
        for sel in (0, 1):
            self._common_wr(DEVICE_FEATURE_SELECT, 4, sel)
            offered |= self._common_rd(DEVICE_FEATURE, 4) << (32 * sel)
        self.offered_features = offered
        if not vf.has(offered, vf.VIRTIO_F_VERSION_1):
            raise DeviceError(f"{dev.name}: expected a modern device offering VERSION_1, "
                              f"features {offered:#x}")
        self.features = self.wanted_features & offered
        for sel in (0, 1):
            self._common_wr(DRIVER_FEATURE_SELECT, 4, sel)
            self._common_wr(DRIVER_FEATURE, 4, (self.features >> (32 * sel)) & 0xFFFFFFFF)
        ok = vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER | vf.STATUS_FEATURES_OK
        self._set_status(ok)
        if not self.status & vf.STATUS_FEATURES_OK:
            raise DeviceError(f"{dev.name}: the device refused features {self.features:#x} "
                              f"(FEATURES_OK not set on read back)")
        nq = self._common_rd(NUM_QUEUES, 2)
        if nq < self.num_queues:
            raise DeviceError(f"{dev.name}: expected at least {self.num_queues} queues, the "
                              f"device has {nq}")
        mode = self.iova_mode
        if mode == "auto":
            mode = "va" if self.has_feature(vf.VIRTIO_F_ACCESS_PLATFORM) else "pa"
        self._dma = _DmaArea(self.container, self.mem_size, mode)
        self.iova_mode = mode
        self.mem = self._dma.mem
        self.dma_base = self._dma.iova
        self._setup_irqs()
        for i in range(self.num_queues):
            self._setup_queue(i)
        if self._devcfg is not None and self.has_feature(vf.VIRTIO_NET_F_MAC):
            self.mac = bytes(self._rd(self._devcfg, k, 1) for k in range(6))
        self._set_status(ok | vf.STATUS_DRIVER_OK)

    def _setup_irqs(self) -> None:
        dev = self.device
        use_msix = self.irq_mode == "msix" or (self.irq_mode == "auto" and self.has_msix)
        if use_msix:
            count = dev.irq_info(V.PCI_MSIX_IRQ_INDEX).count
            nvec = min(count, self.num_queues + 1)
            if nvec < 1:
                raise DeviceError(f"{dev.name}: MSI-X asked for, the device has no vectors")
            self._irqs = dev.enable_irq(V.PCI_MSIX_IRQ_INDEX, nvec)
            if nvec > self.num_queues:
                cfg_vec, self._vector_of = 0, [i + 1 for i in range(self.num_queues)]
            else:
                cfg_vec, self._vector_of = NO_VECTOR, [i % nvec for i in range(self.num_queues)]
            self._common_wr(CONFIG_MSIX_VECTOR, 2, cfg_vec)
            self.irq_kind = "msix"
        else:
            self._irqs = dev.enable_irq(V.PCI_INTX_IRQ_INDEX, 1)
            self._vector_of = [0] * self.num_queues
            self.irq_kind = "intx"

    def _setup_queue(self, i: int) -> None:
        assert self._dma is not None
        self._common_wr(QUEUE_SELECT, 2, i)
        most = self._common_rd(QUEUE_SIZE, 2)
        if most == 0:
            raise DeviceError(f"{self.device.name}: queue {i} is not available (size 0)")
        size = min(self.queue_size, most)
        if size & (size - 1):
            raise DeviceError(f"{self.device.name}: queue {i} size {size} is not a power of two")
        self.queue_size = size
        self._common_wr(QUEUE_SIZE, 2, size)
        total = DriverQueue.layout(size)[3]
        addr = self._dma.alloc(total, 4096)
        off = addr - self.dma_base
        q = DriverQueue(self.mem[off : off + total], addr, size,
                        event_idx=self.has_feature(vf.VIRTIO_RING_F_EVENT_IDX),
                        in_order=self.has_feature(vf.VIRTIO_F_IN_ORDER))
        for reg, value in ((QUEUE_DESC, q.desc_gpa), (QUEUE_DRIVER, q.avail_gpa),
                           (QUEUE_DEVICE, q.used_gpa)):
            self._common_wr(reg, 4, value & 0xFFFFFFFF)
            self._common_wr(reg + 4, 4, value >> 32)
        if self.irq_kind == "msix":
            vec = self._vector_of[i]
            self._common_wr(QUEUE_MSIX_VECTOR, 2, vec)
            if self._common_rd(QUEUE_MSIX_VECTOR, 2) != vec:
                raise DeviceError(f"{self.device.name}: queue {i} refused MSI-X vector {vec}")
        notify_off = self._common_rd(QUEUE_NOTIFY_OFF, 2)
        ncap = self.caps[CAP_NOTIFY]
        where = ncap.offset + notify_off * ncap.notify_off_multiplier
        bar = self.device.bar(ncap.bar)
        view = None
        if bar.mappable and where % 2 == 0:
            view = memoryview(bar.map()).cast("H")
        self._notify.append((view, where))
        self._common_wr(QUEUE_ENABLE, 2, 1)
        self.queues.append(q)

    def queue_registers(self) -> list[dict[str, int]]:
        """What the device holds for each queue (read back from the common cfg)."""
        out = []
        for i in range(self.num_queues):
            self._common_wr(QUEUE_SELECT, 2, i)
            row = {"size": self._common_rd(QUEUE_SIZE, 2),
                   "enable": self._common_rd(QUEUE_ENABLE, 2),
                   "notify_off": self._common_rd(QUEUE_NOTIFY_OFF, 2)}
            for name, reg in (("desc", QUEUE_DESC), ("driver", QUEUE_DRIVER),
                              ("device", QUEUE_DEVICE)):
                row[name] = self._common_rd(reg, 4) | self._common_rd(reg + 4, 4) << 32
            out.append(row)
        return out

    # ---------------------------------------------------------------- Transport
    @property
    def connected(self) -> bool:
        return bool(self.queues) and self._dma is not None

    def has_feature(self, bit: int) -> bool:
        return vf.has(self.features, bit)

    def alloc(self, size: int, align: int = 64) -> int:
        if self._dma is None:
            raise VhostError("the transport is not started")
        return self._dma.alloc(size, align)

    @property
    def map_ops(self) -> int:
        """MAP_DMA ioctls issued for this transport's memory (one area: one, batched)."""
        return self._dma.map_ops if self._dma is not None else 0

    def kick(self, index: int) -> None:
        view, where = self._notify[index]
        if view is not None:
            view[where >> 1] = index  # one 16-bit MMIO store
        else:
            ncap = self.caps[CAP_NOTIFY]
            self.device.bar(ncap.bar).write(where, index.to_bytes(2, "little"))
        self.kicks += 1

    def wait_call(self, index: int, timeout: float) -> bool:
        efd = self._irqs[self._vector_of[index]]
        got = efd.consume() or efd.wait(max(0.0, timeout))
        if not got:
            return False
        if self.irq_kind == "intx":
            self._rd(self._isr, 0, 1)  # reading the ISR acknowledges and deasserts the line
            self.device.unmask_intx()
        self.interrupts += 1
        return True

    def close(self) -> None:
        """Reset the device, free interrupts, queues and DMA memory; close what open() made."""
        if self.device.fd >= 0:
            try:
                self.reset()
            except (DeviceError, OSError):
                pass
            for index in list(self.device.irqs):
                self.device.disable_irq(index)
        self._irqs = []
        self.queues = []
        self._notify = []
        self.mem = memoryview(b"")
        if self._dma is not None:
            self._dma.close()
            self._dma = None
        if self._owned:
            self.device.close()
            group, container = self._owned
            group.close()
            container.close()
            self._owned = []
