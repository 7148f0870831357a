"""Driver side of one split virtqueue, in pure Python: the mock guest for tests and benchmarks.

A DriverQueue writes descriptors and the avail ring into guest memory and reads the used ring,
exactly as a guest virtio driver would (VIRTIO 1.2, 2.7). It is not a data-path component: it
runs once per call from whichever thread owns it (one thread per queue at a time).

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

import struct
import sys
from collections import deque
from collections.abc import Sequence

from virtio._vx_core import lib
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
        self._avail_idx = start_idx & 0xFFFF  # next avail slot (not yet published)
        self._published = start_idx & 0xFFFF  # last published avail->idx
        self._last_used = start_idx & 0xFFFF
        self._irq_enabled = True
        # free descriptor ids: a stack, or under in_order a FIFO taken from the left
        self._free: deque[int] = deque(range(size) if in_order else range(size - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}  # head -> descriptor ids it holds
        self._order: deque[int] = deque()  # heads in avail order (in_order only)
        # zero the rings, then write the starting indexes
        self._mem[desc_off:total] = bytes(total - desc_off)
        self._store16(avail_off + 2, self._avail_idx)
        self._store16(used_off + 2, self._last_used)
        if event_idx:
            self._write_used_event(self._last_used)

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
        return len(self._free)

    @property
    def avail_idx(self) -> int:
        """Next avail index the driver will publish (its shadow of avail->idx)."""
        return self._avail_idx

    @property
    def last_used(self) -> int:
        return self._last_used

    @property
    def in_flight(self) -> int:
        return len(self._chains)

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
        if indirect:
            limit = min(self.INDIRECT_MAX, self.size)  # spec: a chain is at most queue size long
            if len(bufs) > limit:
                raise ValueError(f"indirect chain of {len(bufs)} > {limit} buffers")
            if not self._free:
                raise ValueError("ring full")
            head = self._take()
            table_off = self._ind_off + head * self.INDIRECT_MAX * 16
            for i, (addr, length, flags) in enumerate(bufs):
                nxt = i + 1 if i + 1 < len(bufs) else 0
                fl = flags | (VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                _DESC.pack_into(self._mem, table_off + 16 * i, addr, length, fl, nxt)
            self.write_desc(
                head, self.base_gpa + table_off, 16 * len(bufs), VRING_DESC_F_INDIRECT, 0
            )
            self._chains[head] = [head]
        else:
            if len(bufs) > len(self._free):
                raise ValueError(f"ring full: chain of {len(bufs)} with {len(self._free)} free")
            ids = [self._take() for _ in bufs]
            for i, (addr, length, flags) in enumerate(bufs):
                last = i + 1 == len(bufs)
                fl = flags | (0 if last else VRING_DESC_F_NEXT)
                self.write_desc(ids[i], addr, length, fl, 0 if last else ids[i + 1])
            head = ids[0]
            self._chains[head] = ids
        self.push_avail(head)
        if self.in_order:
            self._order.append(head)
        return head

    def _take(self) -> int:
        return self._free.popleft() if self.in_order else self._free.pop()

    def publish(self) -> bool:
        """Publish added entries (bump avail->idx); True if the device wants a kick."""
        old, new = self._published, self._avail_idx
        if old == new:
            return False
        _fence_release()  # descriptors and avail entries before the index that offers them
        self._store16(self._avail_off + 2, new)
        self._published = new
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
        n = (used_idx - self._last_used) & 0xFFFF
        if n > len(self._chains):
            raise VhostError(
                f"device published {n} used entries but only {len(self._chains)} are in flight"
            )
        res: list[tuple[int, int]] = []
        for k in range(n):
            slot = (self._last_used + k) % self.size
            hid, length = _USED_ELEM.unpack_from(self._mem, self._used_off + 4 + 8 * slot)
            if self.in_order:
                expect = self._order[0] if self._order else None
                if hid != expect:
                    raise VhostError(
                        f"IN_ORDER: used entry {(self._last_used + k) & 0xFFFF} names head {hid}, "
                        f"but the oldest chain in flight is {expect}"
                    )
                self._order.popleft()
            ids = self._chains.pop(hid, None)
            if ids is None:
                raise VhostError(f"device returned head {hid} which is not in flight")
            self._free.extend(ids if self.in_order else reversed(ids))
            res.append((hid, length))
        self._last_used = used_idx
        if self.event_idx and self._irq_enabled:
            self._write_used_event(self._last_used)
            if n:  # used_event moved: it goes before a later re-read of used->idx
                _fence_full()
        return res

    def set_interrupts(self, enable: bool) -> None:
        """Ask the device for interrupts (or not): avail flags, or used_event under EVENT_IDX."""
        self._irq_enabled = enable
        if self.event_idx:
            # disabled: an event index just behind us never matches until 64 Ki entries pass
            self._write_used_event(self._last_used if enable else (self._last_used - 1) & 0xFFFF)
        else:
            self._store16(self._avail_off, 0 if enable else VRING_AVAIL_F_NO_INTERRUPT)
        if enable:
            _fence_full()  # before the caller re-checks used entries: no lost interrupt

    def more_used(self) -> bool:
        """True if the device published used entries not yet collected by get_used()."""
        return _U16.unpack_from(self._mem, self._used_off + 2)[0] != self._last_used

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
        slot = self._avail_idx % self.size
        _U16.pack_into(self._mem, self._avail_off + 4 + 2 * slot, head & 0xFFFF)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF

    def write_avail_idx(self, idx: int) -> None:
        """Write avail->idx raw (hostile tests: jumps, rewinds)."""
        _fence_release()
        self._store16(self._avail_off + 2, idx & 0xFFFF)
        self._published = self._avail_idx = idx & 0xFFFF

    def read_used_idx(self) -> int:
        return _U16.unpack_from(self._mem, self._used_off + 2)[0]

    def read_used_flags(self) -> int:
        return _U16.unpack_from(self._mem, self._used_off)[0]

    def read_avail_event(self) -> int:
        return _U16.unpack_from(self._mem, self._used_off + 4 + 8 * self.size)[0]

    def read_used_event(self) -> int:
        return _U16.unpack_from(self._mem, self._avail_off + 4 + 2 * self.size)[0]

    def _write_used_event(self, value: int) -> None:
        self._store16(self._avail_off + 4 + 2 * self.size, value & 0xFFFF)

    def _store16(self, off: int, value: int) -> None:
        """One 2-byte store of a little-endian u16 at even offset `off` (never a torn value)."""
        self._m16[off >> 1] = value if _LITTLE else ((value & 0xFF) << 8) | (value >> 8)
