"""vfio.dma on the host: IOVA allocation, the batching plan, locked-memory checks, and the
IOMMU info parser (capability chain) the mapper starts from."""

from __future__ import annotations

import ctypes
import errno
import resource
from pathlib import Path

import pytest

from vfio import ioctls as V
from vfio.container import Container, IommuInfo, parse_type1_info
from vfio.dma import DmaMapper, IovaAllocator, check_memlock, plan_mappings
from vfio.errors import DmaError, IoctlError, IommuError, MemlockError

K4, M2, G1 = 4096, 2 << 20, 1 << 30
X86_PGSIZES = K4 | M2 | G1  # what VT-d reports with superpages


def test_allocator_stays_inside_ranges_and_skips_holes() -> None:
    a = IovaAllocator([(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFFFF)], K4)
    first = a.alloc(K4)
    assert first == 0
    big = a.alloc(0xFEE00000)  # cannot fit below the MSI hole any more
    assert big >= 0xFEF00000


def test_allocator_aligns_to_the_largest_page_that_fits() -> None:
    a = IovaAllocator([(0x1000, 2**40 - 1)], X86_PGSIZES)
    assert a.alloc(M2) % M2 == 0
    assert a.alloc(3 * M2) % M2 == 0
    assert a.alloc(G1) % G1 == 0


def test_allocator_free_merges_and_refuses_double_free() -> None:
    a = IovaAllocator([(0, 16 * K4 - 1)], K4)
    x, y = a.alloc(4 * K4), a.alloc(4 * K4)
    a.free(x, 4 * K4)
    a.free(y, 4 * K4)
    assert a.free_bytes == 16 * K4
    assert a.alloc(16 * K4) == 0
    with pytest.raises(DmaError, match="overlaps"):
        a.free(0, K4)
        a.free(0, K4)


def test_allocator_exhausted_says_what_is_left() -> None:
    a = IovaAllocator([(0, 8 * K4 - 1)], K4)
    with pytest.raises(DmaError, match=r"expected 0x9000 bytes .* largest free range is 0x8000"):
        a.alloc(9 * K4)


def test_allocator_reserve_low_keeps_iova_zero_out() -> None:
    assert IovaAllocator([(0, 2**32 - 1)], K4, reserve_low=0x100000).alloc(K4) == 0x100000


def test_plan_coalesces_adjacent_buffers_into_one_map() -> None:
    base = 0x7F0000000000
    bufs = [(base + i * K4, K4) for i in range(256)]  # 1 MiB in 256 adjacent pages
    ops, block = plan_mappings(bufs, X86_PGSIZES)
    assert len(ops) == 1 and ops[0].size == 256 * K4 and block == 256 * K4


def test_plan_without_coalescing_maps_each_buffer() -> None:
    base = 0x7F0000000000
    ops, _ = plan_mappings([(base + i * K4, K4) for i in range(8)], K4, coalesce=False)
    assert len(ops) == 8


def test_plan_keeps_separate_runs_apart_and_large_page_congruent() -> None:
    ops, block = plan_mappings([(0x40000000, M2), (0x80000000 + K4, K4), (0xC0000000, 4 * M2)],
                               X86_PGSIZES)
    assert len(ops) == 3
    assert ops[0].iova_offset == 0
    assert ops[2].iova_offset % M2 == 0  # a 2 MiB aligned vaddr gets a 2 MiB aligned IOVA
    assert block == ops[2].iova_offset + 4 * M2


def test_plan_max_chunk_splits_at_page_multiples() -> None:
    ops, _ = plan_mappings([(0x40000000, 10 * M2)], X86_PGSIZES, max_chunk=3 * M2)
    assert [op.size for op in ops] == [3 * M2, 3 * M2, 3 * M2, M2]
    assert all(op.iova_offset % M2 == 0 for op in ops)


def test_plan_refuses_more_entries_than_dma_entry_limit() -> None:
    bufs = [(0x40000000 + 2 * i * K4, K4) for i in range(10)]  # not adjacent: 10 entries
    with pytest.raises(DmaError, match="needs 10 mappings, the IOMMU allows 9 more"):
        plan_mappings(bufs, K4, entry_limit=9)


def test_plan_refuses_unaligned_buffers() -> None:
    with pytest.raises(DmaError, match="expected buffers aligned to the IOMMU page"):
        plan_mappings([(0x1001, K4)], K4)


def test_page_by_page_is_one_ioctl_per_page_batched_is_one_per_run() -> None:
    """The figure docs/vfio.md reports: ioctls per mapped GiB, batched vs page by page."""
    gib = [(0x40000000, G1)]
    assert len(plan_mappings(gib, K4, coalesce=False, max_chunk=K4)[0]) == G1 // K4
    assert len(plan_mappings(gib, X86_PGSIZES)[0]) == 1


STATUS = "Name:\tpython\nVmLck:\t    1024 kB\nCapEff:\t0000000000000000\n"


def test_memlock_error_names_limit_locked_and_shortfall() -> None:
    with pytest.raises(MemlockError) as err:
        check_memlock(8 << 20, status_text=STATUS, limit=4 << 20)
    msg = str(err.value)
    assert "RLIMIT_MEMLOCK is 4194304 bytes" in msg
    assert "1048576 are locked already (VmLck)" in msg
    assert f"raise it to at least {(8 << 20) + (1 << 20)}" in msg


def test_memlock_fits_or_is_unlimited_or_cap_ipc_lock() -> None:
    check_memlock(1 << 20, status_text=STATUS, limit=4 << 20)
    check_memlock(1 << 40, status_text=STATUS, limit=resource.RLIM_INFINITY)
    cap = STATUS.replace("0000000000000000", f"{1 << 14:016x}")
    check_memlock(1 << 40, status_text=cap, limit=1)


def _type1_answer(pgsizes: int, ranges: list[tuple[int, int]], avail: int) -> bytes:
    head = ctypes.sizeof(V.IommuType1Info)
    rng_off = head
    rng_len = ctypes.sizeof(V.IovaRangeCapHeader) + 16 * len(ranges)
    avail_off = rng_off + rng_len
    buf = bytearray(avail_off + ctypes.sizeof(V.DmaAvailCap))
    info = V.IommuType1Info.from_buffer(buf)
    info.argsz, info.flags = len(buf), V.IOMMU_INFO_PGSIZES | V.IOMMU_INFO_CAPS
    info.iova_pgsizes, info.cap_offset = pgsizes, rng_off
    cap = V.IovaRangeCapHeader.from_buffer(buf, rng_off)
    cap.header.id, cap.header.version, cap.header.next, cap.nr_iovas = 1, 1, avail_off, len(ranges)
    for i, (s, e) in enumerate(ranges):
        r = V.IovaRange.from_buffer(buf, rng_off + ctypes.sizeof(V.IovaRangeCapHeader) + 16 * i)
        r.start, r.end = s, e
    dav = V.DmaAvailCap.from_buffer(buf, avail_off)
    dav.header.id, dav.header.version, dav.avail = V.DMA_AVAIL_CAP, 1, avail
    del info, cap, r, dav
    return bytes(buf)


def test_type1_info_capability_chain_is_decoded() -> None:
    info = parse_type1_info(_type1_answer(X86_PGSIZES, [(0, 0xFEDFFFFF),
                                                        (0xFEF00000, 2**39 - 1)], 65535))
    assert info.page_sizes == [K4, M2, G1]
    assert info.iova_ranges == ((0, 0xFEDFFFFF), (0xFEF00000, 2**39 - 1))
    assert info.dma_avail == 65535


def test_type1_info_chain_loop_is_refused() -> None:
    buf = bytearray(_type1_answer(K4, [(0, 2**32 - 1)], 1))
    V.CapHeader.from_buffer(buf, ctypes.sizeof(V.IommuType1Info)).next = \
        ctypes.sizeof(V.IommuType1Info)
    with pytest.raises(IommuError, match="not seen before"):
        parse_type1_info(bytes(buf))


class _FakeContainer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def map_dma(self, vaddr: int, iova: int, size: int, **kw: bool) -> None:
        self.calls.append(("map", iova, size))

    def unmap_dma(self, iova: int, size: int) -> int:
        self.calls.append(("unmap", iova, size))
        return size


def test_mapper_counts_ioctls_and_tracks_dma_avail() -> None:
    c = _FakeContainer()
    m = DmaMapper(c, IommuInfo(X86_PGSIZES, ((0, 2**39 - 1),), 100))  # type: ignore[arg-type]
    base = 0x40000000
    iova = m.map([(base + i * K4, K4) for i in range(512)])
    assert m.ioctls == 1 and m.info.dma_avail == 99 and iova % M2 == 0
    pages = m.map([(base + 8 * M2, 16 * K4)], per_page=True)
    assert m.ioctls == 17 and m.info.dma_avail == 83
    assert m.map_ioctls_per_gib == 17 / ((512 + 16) * K4 / G1)
    assert m.unmap(pages) == 16 * K4 and m.info.dma_avail == 99
    assert c.calls[-1] == ("unmap", pages, 16 * K4)
    with pytest.raises(DmaError, match="expected an IOVA returned by map"):
        m.unmap(pages)


def test_mapper_dma_mask_keeps_iovas_below_the_device_limit() -> None:
    c = _FakeContainer()
    info = IommuInfo(X86_PGSIZES, ((0, 0xFEDFFFFF), (0xFEF00000, 2**39 - 1)))
    m = DmaMapper(c, info, dma_mask_bits=28, reserve_low=0x100000)  # type: ignore[arg-type]
    iova = m.map([(0x40000000, 64 * K4)])
    assert 0x100000 <= iova and iova + 64 * K4 <= 1 << 28
    with pytest.raises(DmaError, match="largest free range"):
        m.map([(0x80000000, 1 << 28)])


def test_container_on_a_non_vfio_file_names_the_ioctl(tmp_path: Path) -> None:
    (tmp_path / "vfio").write_bytes(b"")
    with pytest.raises(IoctlError) as err:
        Container(str(tmp_path / "vfio"))
    assert err.value.name == "VFIO_GET_API_VERSION" and err.value.errno == errno.ENOTTY
    assert str(err.value).startswith(f"VFIO_GET_API_VERSION ({tmp_path / 'vfio'}) failed: ENOTTY")
