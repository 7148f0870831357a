"""TEST SUPPORT, not part of the product: helpers for tests and benchmarks only.

Nothing under vhostx/ or iosched/ imports this module. RecyclingDriver is the Python face of
the driver-side C helpers vx_drv_* (virtio/_core/vx_drv.c): a trivial guest that keeps a ring
full without Python per packet, for bench/micro_core.py. Those helpers are compiled into the one
cffi module of the C core (virtio._vx_core) but live in their own C file, and only this module
calls them.

Threads: one RecyclingDriver per thread at a time (like DriverQueue).
"""

from __future__ import annotations

from virtio._vx_core import ffi, lib
from virtio.memory import GuestMemory

__all__ = ["RecyclingDriver"]


class RecyclingDriver:
    """A C guest that recycles fixed buffers (benchmarks: keeps a ring full at C speed).

    Descriptor i describes buffer i (one buffer per chain, `flags` e.g. VRING_DESC_F_WRITE for
    RX); post_all() offers every descriptor once, recycle() re-offers whatever the device used
    and publishes avail->idx once. Lays its ring out like DriverQueue (desc, avail, used).
    """

    def __init__(
        self,
        mem: GuestMemory,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        size: int,
        start_idx: int = 0,
    ) -> None:
        self._d = ffi.new("struct vx_drv *")
        self._d.desc = ffi.cast("void *", mem.gpa_to_host(desc_gpa, 16 * size))
        self._d.avail = ffi.cast("void *", mem.gpa_to_host(avail_gpa, 6 + 2 * size))
        self._d.used = ffi.cast("void *", mem.gpa_to_host(used_gpa, 6 + 8 * size))
        self._d.size = size
        self._d.avail_idx = start_idx & 0xFFFF
        self._d.last_used = start_idx & 0xFFFF
        self.mem = mem

    def fill_descs(self, buf_gpa: int, stride: int, length: int, flags: int) -> None:
        """Descriptor i: `length` bytes at buf_gpa + i * stride (GuestError unless all mapped)."""
        self.mem.gpa_to_host(buf_gpa, stride * (self._d.size - 1) + length)
        lib.vx_drv_fill_descs(self._d, buf_gpa, stride, length, flags)

    def post_all(self) -> int:
        """Offer every descriptor once (one chain each); returns how many."""
        return int(lib.vx_drv_post_all(self._d))

    def recycle(self) -> int:
        """Offer again every chain the device used since the last call; returns how many."""
        return int(lib.vx_drv_recycle(self._d))
