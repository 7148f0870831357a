"""Guest memory: the frontend's memory table mmapped into this process.

A GuestMemory is an immutable snapshot: SET_MEM_TABLE builds a new one, ADD_MEM_REG / REM_MEM_REG
derive a new one that shares the mmaps of the regions it keeps. Each mapping is reference
counted; it is unmapped when the last snapshot using it is closed.

Repeats: QEMU keeps one vhost device per queue pair on one connection and each of them adds the
whole memory table. An ADD_MEM_REG that repeats a mapped region exactly (same gpa, size, uva,
offset, and an fd of the same file) is accepted: the snapshot counts the copies of that region
(`copies`) and REM_MEM_REG removes one copy, unmapping the region with its last copy. A partial
overlap, or an exact repeat of the layout from another file, is still refused.

Thread use: snapshots are built and closed by the main (control) thread; translation methods and
`c_table` are read-only and may be called from any thread. A snapshot must not be closed while a
queue still uses it (the device swaps queues to the new snapshot first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import mmap
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from virtio.errors import GuestError

__all__ = ["GuestMemory", "MemoryRegion", "check_backing"]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = mmap.PAGESIZE
_U64 = 2**64


@dataclass(frozen=True)
class MemoryRegion:
    """One entry of the frontend's memory table."""

    gpa: int  # guest physical address
    size: int
    uva: int  # frontend (QEMU / DPDK process) virtual address
    mmap_offset: int  # offset into the fd


class _Mapping:
    """One mmap of one region, shared by snapshots; unmapped when its count drops to zero."""

    __slots__ = ("base", "file", "host", "length", "refs")

    def __init__(self, fd: int, region: MemoryRegion) -> None:
        self.file = _file_identity(fd, region)
        start = region.mmap_offset & ~(_PAGE - 1)
        delta = region.mmap_offset - start
        length = region.size + delta
        addr = _libc.mmap(
            None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, start
        )
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise GuestError(
                f"mmap of region gpa={region.gpa:#x} size={region.size:#x} "
                f"offset={region.mmap_offset:#x} from fd {fd} failed: {os.strerror(err)}"
            )
        self.base: int = addr
        self.length = length
        self.host: int = addr + delta
        self.refs = 0


_lock = threading.Lock()


def _file_identity(fd: int, region: MemoryRegion) -> tuple[int, int]:
    """(st_dev, st_ino) of the file behind fd: tells an exact repeat from a look-alike."""
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise GuestError(
            f"fd {fd} of memory region gpa={region.gpa:#x} size={region.size:#x} is not an "
            f"open file: {err.strerror}"
        ) from err
    return (st.st_dev, st.st_ino)


def check_backing(regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
    """Each region must lie inside the file behind its fd (a memfd, a hugetlbfs or /dev/shm
    file): a mapping that reaches past the end of the file maps, and its first touch is a SIGBUS
    that kills the process. GuestError naming the region and the file's size otherwise."""
    for r, fd in zip(regions, fds, strict=False):
        try:
            st = os.fstat(fd)
        except OSError as err:
            raise GuestError(f"the fd of region gpa={r.gpa:#x}: {err.strerror}") from err
        if stat.S_ISREG(st.st_mode) and r.mmap_offset + r.size > st.st_size:
            raise GuestError(
                f"region gpa={r.gpa:#x} needs bytes {r.mmap_offset:#x}.."
                f"{r.mmap_offset + r.size:#x} of its file, which holds {st.st_size:#x}"
            )


def _check_region(r: MemoryRegion) -> None:
    for name in ("gpa", "size", "uva", "mmap_offset"):
        v = getattr(r, name)
        if not isinstance(v, int) or not 0 <= v < _U64:
            raise GuestError(f"memory region {name} must be a u64, got {v!r}")
    if r.size == 0:
        raise GuestError(f"memory region at gpa={r.gpa:#x} has size 0")
    if r.gpa + r.size > _U64 or r.uva + r.size > _U64 or r.mmap_offset + r.size > _U64:
        raise GuestError(
            f"memory region gpa={r.gpa:#x} uva={r.uva:#x} size={r.size:#x} overflows 64 bits"
        )


def _check_overlaps(regions: Sequence[MemoryRegion]) -> None:
    for key in ("gpa", "uva"):
        spans = sorted((getattr(r, key), getattr(r, key) + r.size) for r in regions)
        for (a0, a1), (b0, b1) in itertools.pairwise(spans):
            if b0 < a1:
                raise GuestError(
                    f"memory regions overlap in {key}: [{a0:#x},{a1:#x}) and [{b0:#x},{b1:#x})"
                )


class GuestMemory:
    """Immutable snapshot of the frontend's memory table; replaced, never mutated."""

    def __init__(
        self,
        regions: Sequence[MemoryRegion],
        maps: Sequence[_Mapping],
        copies: Sequence[int] | None = None,
    ) -> None:
        # private: use map(), empty(), with_region(), without_region()
        self.regions: tuple[MemoryRegion, ...] = tuple(regions)
        self._maps: tuple[_Mapping, ...] = tuple(maps)
        #: how many times the frontend added each region (ADD_MEM_REG repeats); 1 after map()
        self.copies: tuple[int, ...] = tuple(copies) if copies is not None else (1,) * len(regions)
        self._closed = False
        self._c_table: Any = None
        with _lock:
            for m in self._maps:
                m.refs += 1

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def map(cls, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> GuestMemory:
        """mmap region i from fds[i] (MAP_SHARED, RW) at its mmap_offset. Closes no fd."""
        if len(regions) != len(fds):
            raise GuestError(f"{len(regions)} memory regions but {len(fds)} fds")
        for r in regions:
            _check_region(r)
        _check_overlaps(regions)
        maps: list[_Mapping] = []
        try:
            for r, fd in zip(regions, fds):
                maps.append(_Mapping(fd, r))
        except BaseException:
            for m in maps:
                _libc.munmap(m.base, m.length)
            raise
        return cls(regions, maps)

    @classmethod
    def empty(cls) -> GuestMemory:
        return cls((), ())

    def with_region(self, region: MemoryRegion, fd: int) -> GuestMemory:
        """A new snapshot with `region` added (ADD_MEM_REG); this one is left unchanged.

        An exact repeat of a mapped region (same layout, fd of the same file) adds a copy and
        maps nothing; a partial overlap, or the same layout from another file, is refused."""
        self._check_open()
        _check_region(region)
        i = self.index_of(region)
        if i is not None:
            file = _file_identity(fd, region)
            if file != self._maps[i].file:
                raise GuestError(
                    f"memory region gpa=[{region.gpa:#x},{region.gpa + region.size:#x}) repeats "
                    f"a mapped region's layout from another file (dev:ino "
                    f"{file[0]}:{file[1]}, mapped {self._maps[i].file[0]}:{self._maps[i].file[1]})"
                )
            copies = list(self.copies)
            copies[i] += 1
            return GuestMemory(self.regions, self._maps, copies)
        _check_overlaps(self.regions + (region,))
        m = _Mapping(fd, region)
        return GuestMemory(self.regions + (region,), self._maps + (m,), self.copies + (1,))

    def index_of(self, region: MemoryRegion) -> int | None:
        """Index of the region with exactly this gpa, size, uva and mmap_offset, or None."""
        for i, r in enumerate(self.regions):
            if r == region:
                return i
        return None

    def same_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> bool:
        """True if this snapshot maps exactly `regions` (in any order, each once) from the files
        behind `fds`: a SET_MEM_TABLE that repeats it changes nothing."""
        if self._closed or len(regions) != len(self.regions) or len(fds) != len(regions):
            return False
        if set(regions) != set(self.regions) or len(set(regions)) != len(regions):
            return False
        for r, fd in zip(regions, fds):
            i = self.index_of(r)
            try:
                if i is None or _file_identity(fd, r) != self._maps[i].file:
                    return False
            except GuestError:
                return False
        return True

    def without_region(self, region: MemoryRegion) -> GuestMemory:
        """A new snapshot without one copy of the region matching gpa, size and uva (REM_MEM_REG);
        the region stays mapped while other copies of it remain."""
        self._check_open()
        for i, r in enumerate(self.regions):
            if (r.gpa, r.size, r.uva) == (region.gpa, region.size, region.uva):
                if self.copies[i] > 1:
                    copies = list(self.copies)
                    copies[i] -= 1
                    return GuestMemory(self.regions, self._maps, copies)
                return GuestMemory(
                    self.regions[:i] + self.regions[i + 1 :],
                    self._maps[:i] + self._maps[i + 1 :],
                    self.copies[:i] + self.copies[i + 1 :],
                )
        raise GuestError(
            f"no memory region gpa={region.gpa:#x} size={region.size:#x} uva={region.uva:#x} "
            f"to remove"
        )

    def close(self) -> None:
        """Drop this snapshot's references; unmap regions nobody uses any more. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._c_table = None
        with _lock:
            for m in self._maps:
                m.refs -= 1
                if m.refs == 0:
                    _libc.munmap(m.base, m.length)
                    m.host = m.base = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise GuestError("guest memory snapshot already closed")

    # ---- translation -------------------------------------------------------------------------
    def _translate(self, key: str, addr: int, length: int) -> int:
        self._check_open()
        if length < 0 or addr < 0:
            raise GuestError(f"bad range {addr:#x}+{length:#x}")
        for r, m in zip(self.regions, self._maps):
            off = addr - getattr(r, key)
            if 0 <= off < r.size and length <= r.size - off:
                return int(m.host + off)
        raise GuestError(
            f"{key} range {addr:#x}+{length:#x} is not inside one memory region "
            f"({len(self.regions)} regions)"
        )

    def uva_to_host(self, uva: int, length: int) -> int:
        """Host pointer (as int) of [uva, uva+length); GuestError unless inside one region."""
        return self._translate("uva", uva, length)

    def gpa_to_host(self, gpa: int, length: int) -> int:
        """Host pointer (as int) of [gpa, gpa+length); GuestError unless inside one region."""
        return self._translate("gpa", gpa, length)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of guest memory (tests, driver side). Invalid after close()."""
        host = self.gpa_to_host(gpa, length)
        return memoryview((ctypes.c_char * length).from_address(host)).cast("B")

    def host_regions(self) -> list[tuple[int, int, int, int]]:
        """(gpa, size, uva, host) per region, for the C table."""
        self._check_open()
        return [(r.gpa, r.size, r.uva, m.host) for r, m in zip(self.regions, self._maps)]

    @property
    def c_table(self) -> Any:
        """cffi `struct vx_mem *` describing all regions; built once, lives as long as self."""
        self._check_open()
        if self._c_table is None:
            from virtio import ring  # the only importer of the C lib; lazy to keep layers clean

            self._c_table = ring.make_mem_table(self)
        return self._c_table

    def __repr__(self) -> str:
        regs = ", ".join(
            f"gpa={r.gpa:#x}+{r.size:#x}" + (f" x{n}" if n > 1 else "")
            for r, n in zip(self.regions, self.copies)
        )
        return f"GuestMemory([{regs}]{', closed' if self._closed else ''})"
