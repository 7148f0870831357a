"""The device IOTLB of VIRTIO_F_ACCESS_PLATFORM: the frontend's IOVA mappings, checked and kept
in the C table (vx_iotlb.c) that the chain walk of every queue of the device consults.

``DeviceIotlb`` validates each IOTLB message (size, wrap-around, type, permission), translates
the mapping's frontend uaddr through the memory table (a mapping that is not guest memory is
refused), splits it at region boundaries, and inserts it. Removals (``invalidate``, ``rehost``,
``clear``) are only correct while no batch runs on the device's queues: the caller detaches its
works first (docs/internal-api.md, "device IOTLB"). Walks that find no mapping record misses in C
and write ``miss_fd`` (an eventfd); ``take_misses`` hands each one out once.

Threads: the daemon's asyncio thread (the control thread) for everything here; the C table is
read by workers concurrently.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

from virtio._vx_core import ffi, lib
from virtio.errors import GuestError, RemoteProtocolError
from virtio.memory import GuestMemory

__all__ = [
    "DEFAULT_CAPACITY",
    "STATS_FIELDS",
    "DeviceIotlb",
    "IotlbFull",
    "IotlbPerm",
    "IotlbType",
    "Translation",
]

#: entries a device's table holds (32 bytes each, preallocated): 64 MiB of 4 KiB pages mapped
DEFAULT_CAPACITY = 16384
STATS_FIELDS: tuple[str, ...] = tuple(name for name, _ in ffi.typeof("struct vx_iotlb_stats").fields)
_U64 = 1 << 64


class IotlbType(enum.IntEnum):
    """``vhost_iotlb_msg.type`` (Linux include/uapi/linux/vhost_types.h)."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPerm(enum.IntEnum):
    """``vhost_iotlb_msg.perm``: what the device may do through a mapping."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class IotlbFull(GuestError):
    """An UPDATE found the table at its capacity (the frontend must invalidate first)."""


@dataclass(frozen=True)
class Translation:
    """One lookup: where iova lands, and how many bytes from there are contiguous."""

    host: int
    uaddr: int
    length: int


class DeviceIotlb:
    """The IOTLB of one device (owned by the control thread; the C table is shared)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if not 0 < capacity <= 1 << 24:
            raise ValueError(f"IOTLB capacity must be 1..{1 << 24}, got {capacity}")
        self.capacity = capacity
        self.miss_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        t = lib.vx_iotlb_new(capacity, self.miss_fd)
        if t == ffi.NULL:
            os.close(self.miss_fd)
            raise MemoryError(f"cannot allocate an IOTLB of {capacity} entries")
        self._t: Any = ffi.gc(t, lib.vx_iotlb_free)
        self._stats = lib.vx_iotlb_stats(self._t)
        self._out = ffi.new("uint64_t[3]")

    @property
    def c_table(self) -> Any:
        """The cffi ``struct vx_iotlb *`` (for DeviceQueue)."""
        return self._t

    def __len__(self) -> int:
        return int(lib.vx_iotlb_count(self._t))

    def close(self) -> None:
        """Close the miss eventfd (the C table lives while a queue references this object)."""
        if self.miss_fd >= 0:
            lib.vx_iotlb_set_miss_fd(self._t, -1)  # a late walk must not write a reused fd
            os.close(self.miss_fd)
            self.miss_fd = -1

    # ---- messages ----------------------------------------------------------------------------
    @staticmethod
    def check(iova: int, size: int, perm: int, what: str) -> None:
        """RemoteProtocolError unless [iova, iova+size) is a non-empty range of the 64-bit space
        and perm one of RO/WO/RW."""
        if size == 0:
            raise RemoteProtocolError(f"IOTLB {what} of iova {iova:#x}: expected a size > 0, got 0")
        if iova + size > _U64:
            raise RemoteProtocolError(
                f"IOTLB {what}: iova {iova:#x} + size {size:#x} wraps past 2^64"
            )
        if what == "update" and perm not in (IotlbPerm.RO, IotlbPerm.WO, IotlbPerm.RW):
            raise RemoteProtocolError(
                f"IOTLB update of iova {iova:#x}: expected perm 1 (RO), 2 (WO) or 3 (RW), "
                f"got {perm}"
            )

    def update(self, mem: GuestMemory | None, iova: int, size: int, uaddr: int, perm: int) -> bool:
        """Insert a mapping. True if new, False if it repeats one exactly.

        RemoteProtocolError: malformed. GuestError: the uaddr range is not guest memory, or it
        overlaps another mapping (``overlaps`` tells; invalidate first). IotlbFull: no room.
        """
        self.check(iova, size, perm, "update")
        if uaddr + size > _U64:
            raise RemoteProtocolError(f"IOTLB update: uaddr {uaddr:#x} + size {size:#x} wraps")
        if mem is None:
            raise GuestError(f"IOTLB update of iova {iova:#x} before any memory table")
        pieces = self._pieces(mem, iova, size, uaddr)
        new = False
        for p_iova, p_size, p_uaddr, host in pieces:
            r = lib.vx_iotlb_update(self._t, p_iova, p_size, p_uaddr, host, perm)
            if r == lib.VX_IOTLB_OK:
                new = True
            elif r == lib.VX_IOTLB_FULL:
                raise IotlbFull(
                    f"IOTLB full: {len(self)} mappings (the capacity); update of iova "
                    f"{p_iova:#x}+{p_size:#x} refused until the frontend invalidates some"
                )
            elif r == lib.VX_IOTLB_OVERLAP:
                raise GuestError(
                    f"IOTLB update of iova {p_iova:#x}+{p_size:#x} overlaps another mapping"
                )
            elif r != lib.VX_IOTLB_REPEAT:  # pragma: no cover - check() ruled it out
                raise RemoteProtocolError(f"IOTLB update of iova {iova:#x} refused ({r})")
        return new

    def overlaps(self, iova: int, size: int) -> bool:
        """True if some mapping meets [iova, iova+size) (the range is assumed checked)."""
        return bool(lib.vx_iotlb_meets(self._t, iova, size))

    def invalidate(self, iova: int, size: int) -> int:
        """Remove [iova, iova+size) from every mapping (trimming the ones it cuts). Only while the
        device's works are detached. Returns how many mappings were touched."""
        self.check(iova, size, IotlbPerm.RW, "invalidate")
        return int(lib.vx_iotlb_invalidate(self._t, iova, size))

    def rehost(self, mem: GuestMemory | None) -> int:
        """After a memory table change (works detached): host pointers from ``mem``; mappings
        whose uaddr is no longer guest memory are dropped (counted in the return)."""
        return int(lib.vx_iotlb_rehost(self._t, mem.c_table if mem is not None else ffi.NULL))

    def clear(self) -> None:
        """Forget every mapping and pending miss (works detached)."""
        lib.vx_iotlb_clear(self._t)

    # ---- lookups -----------------------------------------------------------------------------
    def translate(self, iova: int, length: int, perm: int) -> Translation | None:
        """The mapping at iova with ``perm`` (None: no mapping). GuestError if mapped without it."""
        out = self._out
        r = lib.vx_iotlb_translate(self._t, iova, length, perm, 0, out, out + 1, out + 2)
        if r == lib.VX_IOTLB_MISS:
            return None
        if r == lib.VX_IOTLB_DENIED:
            raise GuestError(
                f"IOVA {iova:#x}: the mapping does not allow {IotlbPerm(perm).name} access"
            )
        return Translation(int(out[0]), int(out[1]), int(out[2]))

    def ring_uaddr(self, iova: int, length: int, perm: int) -> int | None:
        """The uaddr of a ring at iova if [iova, iova+length) is mapped contiguously with
        ``perm``; None if some part is not mapped (a miss to send for ``missing``)."""
        tr = self.translate(iova, length, perm)
        if tr is None or tr.length < length:
            return None
        return tr.uaddr

    def first_unmapped(self, iova: int, length: int, perm: int) -> int | None:
        """The first IOVA of [iova, iova+length) without a mapping, or None if all are mapped."""
        at, end = iova, iova + length
        while at < end:
            tr = self.translate(at, end - at, perm)
            if tr is None:
                return at
            at += tr.length
        return None

    def take_misses(self, limit: int = 64) -> list[tuple[int, int]]:
        """Misses the walks recorded and nobody was told of yet: (page iova, perm) each once."""
        iovas = ffi.new("uint64_t[]", limit)
        perms = ffi.new("uint32_t[]", limit)
        n = lib.vx_iotlb_take_misses(self._t, iovas, perms, limit)
        return [(int(iovas[i]), int(perms[i])) for i in range(n)]

    def drain_miss_fd(self) -> None:
        try:
            os.eventfd_read(self.miss_fd)
        except (BlockingIOError, OSError):
            pass

    def stats(self) -> dict[str, int]:
        s = self._stats
        out = {name: int(getattr(s, name)) for name in STATS_FIELDS}
        out["entries"] = len(self)
        return out

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _pieces(
        mem: GuestMemory, iova: int, size: int, uaddr: int
    ) -> list[tuple[int, int, int, int]]:
        """(iova, size, uaddr, host) per memory region the uaddr range crosses; GuestError if a
        part of it is in none."""
        out: list[tuple[int, int, int, int]] = []
        at, left = uaddr, size
        regions = sorted(mem.host_regions(), key=lambda r: r[2])
        while left:
            for _gpa, rsize, ruva, host in regions:
                off = at - ruva
                if 0 <= off < rsize:
                    n = min(left, rsize - off)
                    out.append((iova + (at - uaddr), n, at, host + off))
                    at += n
                    left -= n
                    break
            else:
                raise GuestError(
                    f"IOTLB update of iova {iova:#x}+{size:#x}: uaddr {at:#x} (of {uaddr:#x}) is "
                    f"not in the memory table"
                )
        return out
