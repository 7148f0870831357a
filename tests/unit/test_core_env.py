"""Shared helpers for the C-core tests: one memfd-backed guest memory holding rings and buffers,
the DriverQueue (guest) and the DeviceQueue (device) both in this process. No tests here."""

from __future__ import annotations

import os

from virtio.driver.split import DriverQueue
from virtio.memory import GuestMemory, MemoryRegion
from virtio.ring import DeviceQueue

__all__ = ["Env"]


class Env:
    """A guest memory region (gpa -> uva offset fixed) with a bump allocator."""

    def __init__(self, size: int = 4 << 20, gpa: int = 0x100000, uva: int = 0x7F00_0000_0000,
                 *, in_order: bool = False):
        self.in_order = in_order  # every DriverQueue of pair() checks VIRTIO_F_IN_ORDER
        self.fd = os.memfd_create("vx-test")
        os.ftruncate(self.fd, size)
        self.region = MemoryRegion(gpa, size, uva, 0)
        self.mem = GuestMemory.map([self.region], [self.fd])
        self.gpa = gpa
        self.size = size
        self._next = gpa
        self.queues: list[DeviceQueue] = []

    def alloc(self, n: int, align: int = 64) -> int:
        g = (self._next + align - 1) & ~(align - 1)
        if g + n > self.gpa + self.size:
            raise MemoryError("test guest memory exhausted")
        self._next = g + n
        return g

    def uva(self, gpa: int) -> int:
        return gpa - self.region.gpa + self.region.uva

    def view(self, gpa: int, n: int) -> memoryview:
        return self.mem.view(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.view(gpa, n))

    def pair(
        self,
        size: int = 256,
        *,
        event_idx: bool = False,
        start_idx: int = 0,
        hdr_len: int = 12,
        mrg_rxbuf: bool = False,
        call_fd: int = -1,
        index: int = 0,
    ) -> tuple[DriverQueue, DeviceQueue]:
        total = DriverQueue.layout(size)[3]
        base = self.alloc(total, 4096)
        drv = DriverQueue(
            self.view(base, total), base, size, event_idx=event_idx, start_idx=start_idx,
            in_order=self.in_order,
        )
        dev = DeviceQueue(
            self.mem,
            index=index,
            size=size,
            desc_uva=self.uva(drv.desc_gpa),
            avail_uva=self.uva(drv.avail_gpa),
            used_uva=self.uva(drv.used_gpa),
            last_avail_idx=start_idx,
            event_idx=event_idx,
            hdr_len=hdr_len,
            mrg_rxbuf=mrg_rxbuf,
            call_fd=call_fd,
        )
        self.queues.append(dev)
        return drv, dev

    def close(self) -> None:
        self.queues.clear()
        self.mem.close()
        os.close(self.fd)
