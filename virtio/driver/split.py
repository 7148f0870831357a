"""Driver side of one split virtqueue: the guest's side for tests, benchmarks and the drivers.

A DriverQueue writes descriptors and the avail ring into driver memory and reads the used ring,
exactly as a guest virtio driver would (VIRTIO 1.2, 2.7). Its bookkeeping (free descriptors,
chains in flight, shadow indexes) lives in a ``struct vx_drvq`` of the C core (vx_drvq.c): the
single-chain API (add, publish, get_used) is Python over it, and the batch API used by the net
client (tx_frames, reap, rx_post, rx_frames, publish_batch) is one C call per batch with no
Python per packet. Both work on the same state and may be mixed. It runs once per call from
whichever thread owns it (one thread per queue at a time).

Memory layout (see `layout`): the view `mem` passed to the constructor starts at guest physical
address `base_gpa` and holds, in order, the descriptor table, the avail ring, the used ring
(4-aligned) and a private area of indirect tables (INDIRECT_MAX entries per descriptor slot).

Memory ordering: Python's loads and stores of guest memory are plain accesses that neither the
compiler nor the CPU orders, so every order the protocol needs comes from a C11 fence of the C
core (vx_fence.c), correct on aarch64 as on x86: a release fence before avail->idx is published
(descriptors and avail entries first), an acquire fence after used->idx is read (used entries no
older than it), and a full fence where a lost notification hinges on a store before a load:
after publishing avail->idx and before reading the device's avail_event / NO_NOTIFY (kick or
not), and after rewriting used_event / NO_INTERRUPT and before used->idx is read again.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections.abc import Sequence
from typing import Any

from virtio._vx_core import ffi, lib
from virtio.errors import VhostError

__all__ = [
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_USED_F_NO_NOTIFY",
    "DriverQueue",
    "vring_need_event",
]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

# C11 fences (vx_fence.c); module-level names: one attribute lookup fewer per call
_fence_release = lib.vx_fence_release
_fence_acquire = lib.vx_fence_acquire
_fence_full = lib.vx_fence_full


_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_LITTLE = sys.byteorder == "little"
_USED_ELEM = struct.Struct("<II")


def _address_of(view: memoryview) -> int:
    """The address of a writable buffer's first byte (the ctypes export is dropped at once)."""
    c = ctypes.c_char.from_buffer(view)
    addr = ctypes.addressof(c)
    del c
    return addr


def vring_need_event(event: int, new: int, old: int) -> bool:
    """The spec's vring_need_event: (u16)(new - event - 1) < (u16)(new - old)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class DriverQueue:
    """Driver side of one split virtqueue laid out in `mem` (first byte = guest address base_gpa)."""

    INDIRECT_MAX = 16  # entries per indirect table this driver writes

    def __init__(
        self,
        mem: memoryview,
        base_gpa: int,
        size: int,
        *,
        event_idx: bool = False,
        start_idx: int = 0,
        in_order: bool = False,
    ) -> None:
        if size <= 0 or size > 32768 or size & (size - 1):
            raise ValueError(f"queue size must be a power of two in 1..32768, got {size}")
        desc_off, avail_off, used_off, total = self.layout(size)
        if len(mem) < total:
            raise ValueError(f"ring memory needs {total} bytes, got {len(mem)}")
        if mem.readonly:
            raise ValueError("ring memory must be writable")
        self._mem = mem.cast("B") if mem.format != "B" else mem
        # Index and flag words the device reads while we write them go through one aligned
        # 2-byte store: struct.pack_into zeroes its target before writing, so a device polling
        # the ring could read avail->idx == 0 in between (DPDK then dequeued 64 Ki stale entries).
        self._m16 = self._mem[: total & ~1].cast("H")
        self.base_gpa = base_gpa
        self.size = size
        self.event_idx = event_idx
        # VIRTIO_F_IN_ORDER: descriptors are taken in ring order (a FIFO of free ids), and every
        # used entry must name the oldest chain in flight, or get_used raises.
        self.in_order = in_order
        self.desc_gpa = base_gpa + desc_off
        self.avail_gpa = base_gpa + avail_off
        self.used_gpa = base_gpa + used_off
        self._desc_off = desc_off
        self._avail_off = avail_off
        self._used_off = used_off
        self._ind_off = used_off + 6 + 8 * size
        self._ind_off = (self._ind_off + 15) & ~15
        # the C state: ring pointers into `mem` and the bookkeeping arrays
        # a raw pointer, not ffi.from_buffer: a buffer export kept by the cdata would be
        # released after the view when both die in one garbage-collected cycle (a crash)
        self._buf = ffi.cast("uint8_t *", _address_of(self._mem))
        q = self._q = ffi.new("struct vx_drvq *")
        self._arrays = [ffi.new("uint16_t[]", size) for _ in range(5)]
        q.free_ids, q.chain_next, q.chain_len, q.order, q.scratch = self._arrays
        q.desc, q.avail, q.used = self._buf + desc_off, self._buf + avail_off, self._buf + used_off
        q.ind, q.ind_addr = self._buf + self._ind_off, base_gpa + self._ind_off
        q.size = size
        q.flags = (lib.VX_DRVQ_EVENT_IDX if event_idx else 0) | (
            lib.VX_DRVQ_IN_ORDER if in_order else 0)
        lib.vx_drvq_reset(q, start_idx & 0xFFFF)
        self._ids = ffi.new("uint32_t[]", size)
        self._lens = ffi.new("uint32_t[]", size)
        self._bufs = ffi.new("struct vx_drvbuf[]", max(self.INDIRECT_MAX, 64))
        self._fixed: tuple[Any, int, int] | None = None  # (pointer, device address, size)
        # zero the rings, then write the starting indexes
        self._mem[desc_off:total] = bytes(total - desc_off)
        self._store16(avail_off + 2, q.avail_idx)
        self._store16(used_off + 2, q.last_used)
        if event_idx:
            self._write_used_event(q.last_used)

    @staticmethod
    def layout(size: int) -> tuple[int, int, int, int]:
        """(desc_off, avail_off, used_off, total_bytes) of a ring of `size` entries."""
        desc_off = 0
        avail_off = 16 * size
        used_off = (avail_off + 6 + 2 * size + 3) & ~3
        ind_off = (used_off + 6 + 8 * size + 15) & ~15
        total = ind_off + size * DriverQueue.INDIRECT_MAX * 16
        return desc_off, avail_off, used_off, total

    # ---- state -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return int(self._q.num_free)

    @property
    def avail_idx(self) -> int:
        """Next avail index the driver will publish (its shadow of avail->idx)."""
        return int(self._q.avail_idx)

    @property
    def last_used(self) -> int:
        return int(self._q.last_used)

    @property
    def in_flight(self) -> int:
        return int(self._q.in_flight)

    @property
    def kicks(self) -> int:
        """publish_batch calls that asked for a kick."""
        return int(self._q.kicks)

    # ---- normal operation --------------------------------------------------------------------
    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]] = (),
        *,
        indirect: bool = False,
    ) -> int:
        """Add a chain of (gpa, len) buffers: `out` device-readable, then `in_` device-writable.

        Writes the avail entry but does not publish it (see publish). Returns the head id.
        Raises ValueError if the ring has no room.
        """
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VRING_DESC_F_WRITE) for a, n in in_]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        free = self._q.num_free
        if indirect:
            limit = min(self.INDIRECT_MAX, self.size)  # spec: a chain is at most queue size long
            if len(bufs) > limit:
                raise ValueError(f"indirect chain of {len(bufs)} > {limit} buffers")
            if not free:
                raise ValueError("ring full")
        elif len(bufs) > free:
            raise ValueError(f"ring full: chain of {len(bufs)} with {free} free")
        arr = self._bufs if len(bufs) <= len(self._bufs) else ffi.new("struct vx_drvbuf[]",
                                                                        len(bufs))
        for i, (addr, length, flags) in enumerate(bufs):
            b = arr[i]
            b.addr, b.len, b.flags = addr & (2**64 - 1), length & 0xFFFFFFFF, flags
        head = lib.vx_drvq_add(self._q, arr, len(bufs), 1 if indirect else 0)
        if head < 0:
            raise ValueError(f"ring full: chain of {len(bufs)} with {self._q.num_free} free")
        return int(head)

    def publish(self) -> bool:
        """Publish added entries (bump avail->idx); True if the device wants a kick."""
        q = self._q
        old, new = q.published, q.avail_idx
        if old == new:
            return False
        _fence_release()  # descriptors and avail entries before the index that offers them
        self._store16(self._avail_off + 2, new)
        q.published = new
        _fence_full()  # the index before we read avail_event / flags: no lost kick
        if self.event_idx:
            event = _U16.unpack_from(self._mem, self._used_off + 4 + 8 * self.size)[0]
            return vring_need_event(event, new, old)
        flags = _U16.unpack_from(self._mem, self._used_off)[0]
        return not flags & VRING_USED_F_NO_NOTIFY

    def get_used(self) -> list[tuple[int, int]]:
        """(head id, len) of each newly used entry; frees their descriptors."""
        used_idx = _U16.unpack_from(self._mem, self._used_off + 2)[0]
        _fence_acquire()  # the used entries below are at least as new as used_idx
        n = lib.vx_drvq_take_used(self._q, used_idx, self._ids, self._lens)
        if n < 0:
            raise self._device_error(n)
        res = list(zip(ffi.unpack(self._ids, n), ffi.unpack(self._lens, n), strict=True))
        if self.event_idx and self._q.irq_enabled:
            self._write_used_event(self._q.last_used)
            if n:  # used_event moved: it goes before a later re-read of used->idx
                _fence_full()
        return res

    def _device_error(self, rc: int) -> VhostError:
        q = self._q
        if rc == -1:
            return VhostError(f"device published {q.err_a} used entries but only {q.err_b} are "
                              f"in flight")
        if rc == -2:
            expect = None if q.err_b == 0xFFFFFFFF else q.err_b
            return VhostError(f"IN_ORDER: used entry {q.err_c} names head {q.err_a}, but the "
                              f"oldest chain in flight is {expect}")
        if rc == -3:
            return VhostError(f"device returned head {q.err_a} which is not in flight")
        if rc == -4:
            return VhostError(f"device wrote {q.err_a} bytes into a {self._fixed_size}-byte "
                              f"buffer (head {q.err_b})")
        if rc == -5:
            return VhostError(f"RX buffer of {q.err_a} bytes is shorter than the net header")
        if rc == -6:
            return VhostError(f"RX header has num_buffers {q.err_a} (expected 1-{self.size}) "
                              f"under MRG_RXBUF")
        return VhostError(f"driver queue error {rc}")

    # ---- batches (one C call each; fixed buffers: buffer i belongs to descriptor i) ----------
    def attach_buffers(self, view: memoryview, addr: int, buf_size: int) -> None:
        """Give the batch API its buffers: ``size`` of them, ``buf_size`` bytes each, back to
        back in ``view`` whose first byte the device reaches at address ``addr``."""
        if len(view) < buf_size * self.size or view.readonly:
            raise ValueError(f"fixed buffers need {buf_size * self.size} writable bytes, "
                             f"got {len(view)}")
        self._fixed = (ffi.cast("uint8_t *", _address_of(view)), addr, buf_size)
        self._fixed_view = view  # keeps the memory referenced while the pointer is in use

    @property
    def _fixed_size(self) -> int:
        return self._fixed[2] if self._fixed is not None else 0

    def _need_fixed(self) -> tuple[Any, int, int]:
        if self._fixed is None:
            raise ValueError("attach_buffers() first: the batch API uses fixed buffers")
        return self._fixed

    def tx_frames(self, data: bytes | memoryview, lens: Any, hdr_len: int) -> int:
        """Post frames (``data`` = the frames back to back, ``lens`` a uint32 array of their
        lengths) with a zeroed ``hdr_len``-byte header each, chained over as many fixed
        buffers as each needs; stops when the ring is full. Returns frames posted (not yet
        published)."""
        ptr, addr, bsize = self._need_fixed()
        n = len(lens)
        rc = lib.vx_drvq_tx_frames(self._q, ptr, addr, bsize, hdr_len, ffi.from_buffer(data),
                                   ffi.from_buffer("uint32_t[]", lens), n)
        if rc < 0:
            raise ValueError(f"frame of {self._q.err_a} bytes needs {self._q.err_b} buffers > "
                             f"ring size")
        return int(rc)

    def reap(self) -> int:
        """Free every chain the device used (TX completions); returns how many."""
        n = lib.vx_drvq_reap(self._q)
        if n < 0:
            raise self._device_error(n)
        return int(n)

    def rx_post(self) -> int:
        """Offer every free descriptor as one device-writable fixed buffer (not published)."""
        _ptr, addr, bsize = self._need_fixed()
        return int(lib.vx_drvq_rx_post(self._q, addr, bsize))

    def rx_frames(self, hdr_len: int, mrg_rxbuf: bool, out: Any, lens: Any) -> int:
        """Reap whole received frames: each frame's bytes after the net header are copied into
        ``out`` (a writable buffer) back to back, their lengths into ``lens`` (a writable
        uint32 buffer, at most len(lens) frames). Returns frames; a frame whose buffers the
        device has not all published yet, or that does not fit in ``out``, waits."""
        ptr, _addr, bsize = self._need_fixed()
        obuf = ffi.from_buffer(out, require_writable=True)
        lbuf = ffi.from_buffer("uint32_t[]", lens, require_writable=True)
        n = lib.vx_drvq_rx_frames(self._q, ptr, bsize, hdr_len, 1 if mrg_rxbuf else 0, obuf,
                                  len(obuf), lbuf, len(lbuf))
        if n < 0:
            raise self._device_error(n)
        return int(n)

    def publish_batch(self) -> bool:
        """publish() in one C call (fences inside): True if the device wants a kick."""
        return bool(lib.vx_drvq_publish(self._q))

    def set_interrupts(self, enable: bool) -> None:
        """Ask the device for interrupts (or not): avail flags, or used_event under EVENT_IDX."""
        self._q.irq_enabled = 1 if enable else 0
        last = self._q.last_used
        if self.event_idx:
            # disabled: an event index just behind us never matches until 64 Ki entries pass
            self._write_used_event(last if enable else (last - 1) & 0xFFFF)
        else:
            self._store16(self._avail_off, 0 if enable else VRING_AVAIL_F_NO_INTERRUPT)
        if enable:
            _fence_full()  # before the caller re-checks used entries: no lost interrupt

    def more_used(self) -> bool:
        """True if the device published used entries not yet collected by get_used()."""
        return bool(_U16.unpack_from(self._mem, self._used_off + 2)[0] != self._q.last_used)

    def device_wants_interrupt_check(self, old: int, new: int) -> bool:
        """What the spec says the device must decide when moving used->idx from old to new."""
        if self.event_idx:
            return vring_need_event(self.read_used_event(), new, old)
        flags = _U16.unpack_from(self._mem, self._avail_off)[0]
        return not flags & VRING_AVAIL_F_NO_INTERRUPT

    # ---- raw access (hostile tests) ----------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor i raw (no bookkeeping, no checks beyond i < size)."""
        if not 0 <= i < self.size:
            raise IndexError(f"descriptor {i} outside a ring of {self.size}")
        _DESC.pack_into(
            self._mem,
            self._desc_off + 16 * i,
            addr & (2**64 - 1),
            length & 0xFFFFFFFF,
            flags & 0xFFFF,
            next_ & 0xFFFF,
        )

    def push_avail(self, head: int) -> None:
        """Write `head` into the next avail slot (not published until publish())."""
        q = self._q
        slot = q.avail_idx % self.size
        _U16.pack_into(self._mem, self._avail_off + 4 + 2 * slot, head & 0xFFFF)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF

    def write_avail_idx(self, idx: int) -> None:
        """Write avail->idx raw (hostile tests: jumps, rewinds)."""
        _fence_release()
        self._store16(self._avail_off + 2, idx & 0xFFFF)
        self._q.published = self._q.avail_idx = idx & 0xFFFF

    def read_used_idx(self) -> int:
        return int(_U16.unpack_from(self._mem, self._used_off + 2)[0])

    def read_used_flags(self) -> int:
        return int(_U16.unpack_from(self._mem, self._used_off)[0])

    def read_avail_event(self) -> int:
        return int(_U16.unpack_from(self._mem, self._used_off + 4 + 8 * self.size)[0])

    def read_used_event(self) -> int:
        return int(_U16.unpack_from(self._mem, self._avail_off + 4 + 2 * self.size)[0])

    def _write_used_event(self, value: int) -> None:
        self._store16(self._avail_off + 4 + 2 * self.size, value & 0xFFFF)

    def _store16(self, off: int, value: int) -> None:
        """One 2-byte store of a little-endian u16 at even offset `off` (never a torn value)."""
        self._m16[off >> 1] = value if _LITTLE else ((value & 0xFF) << 8) | (value >> 8)
