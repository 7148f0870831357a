"""DMA through the IOMMU: IOVA allocation, batched mapping, locked-memory checks, buffers.

Role: policy above the raw MAP_DMA/UNMAP_DMA of vfio.container.
- ``IovaAllocator`` hands out IOVA space inside the ranges the IOMMU reports, aligned to the
  largest supported page size that fits the request (so the IOMMU can use its large pages).
- ``plan_mappings`` is the batching logic, pure: buffers adjacent in virtual memory are coalesced
  into one MAP_DMA (type1 pins and maps any contiguous range in one ioctl), a ``max_chunk`` (for
  IOMMUs with windows, e.g. sPAPR TCE) splits at large-page aligned boundaries, and the plan is
  refused up front if it needs more entries than ``dma_entry_limit`` leaves.
- ``check_memlock`` refuses a mapping RLIMIT_MEMLOCK cannot cover, saying which limit and how much.
- ``DmaMapper`` ties these to a container and counts ioctls; ``DmaBuffer`` is anonymous memory
  with its vaddr.
Threads: one thread at a time per mapper.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import re
import resource
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .container import Container, IommuInfo
from .errors import DmaError, MemlockError

__all__ = [
    "DmaBuffer",
    "DmaMapper",
    "IovaAllocator",
    "MapOp",
    "check_memlock",
    "locked_vm",
    "plan_mappings",
]

CAP_IPC_LOCK = 14


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _largest_page(pgsizes: int, size: int, *, vaddr: int | None = None) -> int:
    """The largest page size in ``pgsizes`` not above ``size`` (and dividing ``vaddr``)."""
    best = pgsizes & -pgsizes or 4096
    for b in range(63, -1, -1):
        p = 1 << b
        if pgsizes >> b & 1 and p <= size and (vaddr is None or vaddr % p == 0):
            return max(p, best)
    return best


class IovaAllocator:
    """First-fit IOVA allocation over the IOMMU's usable ranges (inclusive ends)."""

    def __init__(self, ranges: Iterable[tuple[int, int]], pgsizes: int = 4096,
                 *, reserve_low: int = 0) -> None:
        self.pgsizes = pgsizes or 4096
        self.page = self.pgsizes & -self.pgsizes
        self._free: list[tuple[int, int]] = []  # [start, end) sorted, page aligned
        for start, end in sorted(ranges):
            s = _align_up(max(start, reserve_low), self.page)
            e = (end + 1) // self.page * self.page
            if e > s:
                self._free.append((s, e))
        if not self._free:
            raise DmaError(f"IOVA allocator: expected at least one usable range of "
                           f"{self.page} bytes, got {list(ranges)}")

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in self._free)

    def alloc(self, size: int, align: int | None = None) -> int:
        if size <= 0:
            raise DmaError(f"IOVA allocator: expected a positive size, got {size}")
        size = _align_up(size, self.page)
        align = align or _largest_page(self.pgsizes, size)
        for i, (s, e) in enumerate(self._free):
            start = _align_up(s, align)
            if start + size <= e:
                pieces = [(a, b) for a, b in ((s, start), (start + size, e)) if b > a]
                self._free[i : i + 1] = pieces
                return start
        raise DmaError(f"IOVA allocator: expected {size:#x} bytes aligned to {align:#x} "
                       f"free, the largest free range is "
                       f"{max((e - s for s, e in self._free), default=0):#x}")

    def free(self, iova: int, size: int) -> None:
        size = _align_up(size, self.page)
        starts = [s for s, _ in self._free]
        i = bisect.bisect_left(starts, iova)
        if (i > 0 and self._free[i - 1][1] > iova) or (
            i < len(self._free) and self._free[i][0] < iova + size
        ):
            raise DmaError(f"IOVA allocator: freeing {iova:#x}+{size:#x}, which overlaps "
                           f"space that is already free")
        self._free.insert(i, (iova, iova + size))
        merged: list[tuple[int, int]] = []
        for s, e in self._free:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._free = merged


@dataclass(frozen=True)
class MapOp:
    """One MAP_DMA: ``size`` bytes at ``vaddr``, ``iova_offset`` into the plan's IOVA block."""

    vaddr: int
    size: int
    iova_offset: int


def plan_mappings(buffers: Sequence[tuple[int, int]], pgsizes: int = 4096, *,
                  max_chunk: int | None = None, entry_limit: int | None = None,
                  coalesce: bool = True) -> tuple[list[MapOp], int]:
    """Plan the MAP_DMA calls for ``buffers`` ((vaddr, size), page aligned) laid out back to back
    in one IOVA block; returns (ops, block size). With ``coalesce`` buffers contiguous in virtual
    memory share one op; ``max_chunk`` caps an op at the largest page size multiple not above
    it; ``entry_limit`` (dma_entry_limit left) refuses a plan needing more ops."""
    page = pgsizes & -pgsizes or 4096
    runs: list[list[int]] = []  # [vaddr, size, iova_offset]
    block = 0
    for vaddr, size in buffers:
        if vaddr % page or size % page or size <= 0:
            raise DmaError(f"DMA plan: expected buffers aligned to the IOMMU page ({page:#x}), "
                           f"got vaddr {vaddr:#x} size {size:#x}")
        if coalesce and runs and runs[-1][0] + runs[-1][1] == vaddr:
            runs[-1][1] += size
        else:
            # keep each run's IOVA congruent to its vaddr modulo its largest usable page
            align = _largest_page(pgsizes, size, vaddr=vaddr)
            block = _align_up(block, align)
            runs.append([vaddr, size, block])
        block += size
    ops: list[MapOp] = []
    for vaddr, size, off in runs:
        if max_chunk is None or size <= max_chunk:
            ops.append(MapOp(vaddr, size, off))
            continue
        chunk = max(page, max_chunk // _largest_page(pgsizes, max_chunk) *
                    _largest_page(pgsizes, max_chunk))
        for done in range(0, size, chunk):
            ops.append(MapOp(vaddr + done, min(chunk, size - done), off + done))
    if entry_limit is not None and len(ops) > entry_limit:
        raise DmaError(f"DMA plan: needs {len(ops)} mappings, the IOMMU allows {entry_limit} "
                       f"more (vfio_iommu_type1 dma_entry_limit); map larger contiguous buffers")
    return ops, block


def _status_field(text: str, name: str) -> int | None:
    m = re.search(rf"^{name}:\s*(\S+)(?:\s*kB)?", text, re.MULTILINE)
    if not m:
        return None
    return int(m.group(1), 16) if name.startswith("Cap") else int(m.group(1)) * 1024


def locked_vm(status_text: str | None = None) -> int:
    """Bytes this process has locked (VmLck of /proc/self/status; type1 charges pins there)."""
    text = status_text if status_text is not None else Path("/proc/self/status").read_text()
    return _status_field(text, "VmLck") or 0


def check_memlock(needed: int, *, status_text: str | None = None,
                  limit: int | None = None) -> None:
    """Raise MemlockError unless ``needed`` more bytes can be pinned: RLIMIT_MEMLOCK (soft)
    minus what is locked already; a process with CAP_IPC_LOCK is not limited."""
    text = status_text if status_text is not None else Path("/proc/self/status").read_text()
    cap = _status_field(text, "CapEff")
    if cap is not None and cap >> CAP_IPC_LOCK & 1:
        return
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if limit == resource.RLIM_INFINITY:
        return
    locked = locked_vm(text)
    if locked + needed > limit:
        raise MemlockError(
            f"mapping {needed} bytes for DMA pins them, but RLIMIT_MEMLOCK is {limit} bytes and "
            f"{locked} are locked already (VmLck): {locked + needed - limit} bytes short; raise "
            f"it to at least {locked + needed} (ulimit -l {(locked + needed + 1023) // 1024}, or "
            f"prlimit --memlock)"
        )


class DmaBuffer:
    """Anonymous, page-aligned memory for DMA; ``iova`` is set once mapped."""

    def __init__(self, size: int) -> None:
        self.size = _align_up(size, mmap.PAGESIZE)
        self.mem = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.iova: int | None = None

    def view(self) -> memoryview:
        return memoryview(self.mem)

    def close(self) -> None:
        self.mem.close()


@dataclass(frozen=True)
class Mapping:
    iova: int
    block: int
    ops: tuple[MapOp, ...]


class DmaMapper:
    """Maps and unmaps process memory in a container, allocating IOVA space."""

    def __init__(self, container: Container, info: IommuInfo | None = None, *,
                 reserve_low: int = 0, dma_mask_bits: int = 64) -> None:
        """``dma_mask_bits``: the device's DMA address width (e.g. 28 for QEMU's edu); IOVAs
        are allocated below 2**dma_mask_bits. ``reserve_low``: IOVAs below it are not used."""
        self.container = container
        self.info = info or container.iommu_info()
        top = (1 << dma_mask_bits) - 1
        ranges = [(s, min(e, top)) for s, e in self.info.iova_ranges if s <= top]
        self.allocator = IovaAllocator(ranges, self.info.pgsizes, reserve_low=reserve_low)
        self.ioctls = 0  # MAP_DMA + UNMAP_DMA issued
        self.map_ioctls = 0  # MAP_DMA issued
        self.mapped_bytes = 0  # mapped now
        self.total_mapped_bytes = 0  # mapped since creation
        self._mappings: dict[int, Mapping] = {}

    def map(self, buffers: Sequence[tuple[int, int]], *, coalesce: bool = True,
            max_chunk: int | None = None, per_page: bool = False, read: bool = True,
            write: bool = True) -> int:
        """Map ``buffers`` back to back in IOVA space; returns the IOVA of the first.
        ``per_page`` issues one MAP_DMA per IOMMU page (the unbatched reference)."""
        if per_page:
            coalesce, max_chunk = False, self.info.min_page
        ops, block = plan_mappings(buffers, self.info.pgsizes, coalesce=coalesce,
                                   max_chunk=max_chunk, entry_limit=self.info.dma_avail)
        total = sum(op.size for op in ops)
        check_memlock(total)
        iova = self.allocator.alloc(block, _largest_page(self.info.pgsizes, block))
        done: list[MapOp] = []
        try:
            for op in ops:
                self.container.map_dma(op.vaddr, iova + op.iova_offset, op.size,
                                       read=read, write=write)
                self.ioctls += 1
                self.map_ioctls += 1
                done.append(op)
        except Exception:
            for op in done:
                self.container.unmap_dma(iova + op.iova_offset, op.size)
            self.allocator.free(iova, block)
            raise
        self._mappings[iova] = Mapping(iova, block, tuple(ops))
        self.mapped_bytes += total
        self.total_mapped_bytes += total
        if self.info.dma_avail is not None:
            self.info = IommuInfo(self.info.pgsizes, self.info.iova_ranges,
                                  self.info.dma_avail - len(ops), self.info.caps)
        return iova

    @property
    def map_ioctls_per_gib(self) -> float:
        """MAP_DMA ioctls per GiB mapped since creation (0.0 before the first map)."""
        gib = self.total_mapped_bytes / (1 << 30)
        return self.map_ioctls / gib if gib else 0.0

    def map_buffer(self, buf: DmaBuffer, **kw: bool) -> int:
        buf.iova = self.map([(buf.vaddr, buf.size)], **kw)
        return buf.iova

    def unmap(self, iova: int) -> int:
        """Unmap what ``map`` returned ``iova`` for, with one UNMAP_DMA for the whole block
        (type1 unmaps every mapping inside the range); returns the bytes unmapped."""
        m = self._mappings.pop(iova, None)
        if m is None:
            raise DmaError(f"unmap: expected an IOVA returned by map(), got {iova:#x}")
        last = m.ops[-1]
        unmapped = self.container.unmap_dma(iova, last.iova_offset + last.size)
        self.ioctls += 1
        self.allocator.free(iova, m.block)
        self.mapped_bytes -= sum(op.size for op in m.ops)
        if self.info.dma_avail is not None:
            self.info = IommuInfo(self.info.pgsizes, self.info.iova_ranges,
                                  self.info.dma_avail + len(m.ops), self.info.caps)
        return unmapped
