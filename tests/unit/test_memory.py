"""GuestMemory: translation bounds, overlap refusal, snapshot refcounting of mmaps."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.errors import GuestError
from virtio.memory import GuestMemory, MemoryRegion

MB = 1 << 20


@pytest.fixture
def fds():
    opened: list[int] = []

    def make(size: int = MB) -> int:
        fd = os.memfd_create("vx-mem-test")
        os.ftruncate(fd, size)
        opened.append(fd)
        return fd

    yield make
    for fd in opened:
        os.close(fd)


def _mapped(host: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= host < hi:
                return True
    return False


def test_translate_bounds(fds):
    r = MemoryRegion(gpa=0x10000, size=MB, uva=0x7000_0000, mmap_offset=0)
    m = GuestMemory.map([r], [fds()])
    base = m.gpa_to_host(0x10000, 1)
    assert m.uva_to_host(0x7000_0000, MB) == base
    assert m.gpa_to_host(0x10000 + MB - 1, 1) == base + MB - 1
    for gpa, n in [
        (0x10000 - 1, 1),
        (0x10000 + MB, 1),
        (0x10000 + MB - 1, 2),
        (0x10000, MB + 1),
        (2**64 - 1, 2),
        (0, 2**64 - 1),
    ]:
        with pytest.raises(GuestError):
            m.gpa_to_host(gpa, n)
    with pytest.raises(GuestError):
        m.uva_to_host(0x10000, 1)  # a gpa is not a uva
    m.close()


@settings(max_examples=200, deadline=None)
@given(addr=st.integers(0, 2**64 - 1), length=st.integers(0, 2**64 - 1))
def test_translate_property(addr, length):
    fd = os.memfd_create("vx-prop")
    os.ftruncate(fd, 65536)
    try:
        m = GuestMemory.map([MemoryRegion(0x4000_0000, 65536, 0x1000_0000, 0)], [fd])
        inside = 0x4000_0000 <= addr < 0x4000_0000 + 65536 and addr + length <= 0x4000_0000 + 65536
        if inside:
            assert m.gpa_to_host(addr, length) == m.gpa_to_host(0x4000_0000, 0) + addr - 0x4000_0000
        else:
            with pytest.raises(GuestError):
                m.gpa_to_host(addr, length)
        m.close()
    finally:
        os.close(fd)


def test_view_shares_the_fd(fds):
    fd = fds()
    m = GuestMemory.map([MemoryRegion(0, MB, 0x1000, 0)], [fd])
    m.view(100, 5)[:] = b"hello"
    assert os.pread(fd, 5, 100) == b"hello"
    m.close()


def test_mmap_offset(fds):
    fd = fds(2 * MB)
    os.pwrite(fd, b"XY", MB + 4096)
    m = GuestMemory.map([MemoryRegion(0, 8192, 0x1000, MB + 4096)], [fd])
    assert bytes(m.view(0, 2)) == b"XY"
    m.close()
    m = GuestMemory.map([MemoryRegion(0, 100, 0x1000, MB + 4096 + 1)], [fd])  # unaligned offset
    assert bytes(m.view(0, 1)) == b"Y"
    m.close()


@pytest.mark.parametrize(
    "regions",
    [
        [MemoryRegion(0, MB, 0x100000, 0), MemoryRegion(MB - 1, MB, 0x900000, 0)],  # gpa overlap
        [MemoryRegion(0, MB, 0x100000, 0), MemoryRegion(4 * MB, MB, 0x100000 + 5, 0)],  # uva
        [MemoryRegion(0, 0, 0x100000, 0)],  # zero size
        [MemoryRegion(2**64 - 4096, 8192, 0, 0)],  # overflow
    ],
)
def test_refuses_bad_tables(fds, regions):
    with pytest.raises(GuestError):
        GuestMemory.map(regions, [fds() for _ in regions])


def test_fd_count_mismatch(fds):
    with pytest.raises(GuestError):
        GuestMemory.map([MemoryRegion(0, MB, 0, 0)], [])


def test_mmap_failure_is_guest_error():
    with pytest.raises(GuestError):
        GuestMemory.map([MemoryRegion(0, MB, 0, 0)], [999_999])


def test_with_without_region_refcounts(fds):
    ra = MemoryRegion(0, MB, 0x1000_0000, 0)
    rb = MemoryRegion(4 * MB, MB, 0x2000_0000, 0)
    m0 = GuestMemory.empty()
    m1 = m0.with_region(ra, fds())
    m2 = m1.with_region(rb, fds())
    ha, hb = m2.gpa_to_host(0, 1), m2.gpa_to_host(4 * MB, 1)
    assert m1.gpa_to_host(0, 1) == ha  # the mapping is shared, not re-made
    with pytest.raises(GuestError):
        m2.with_region(MemoryRegion(MB // 2, MB, 0x3000_0000, 0), fds())  # overlap refused
    m3 = m2.without_region(ra)
    with pytest.raises(GuestError):
        m3.gpa_to_host(0, 1)
    assert m3.gpa_to_host(4 * MB, 1) == hb
    for m in (m0, m1, m2):
        m.close()
    assert not _mapped(ha)  # nobody holds region a any more
    assert _mapped(hb)  # m3 still does
    m3.view(4 * MB, 3)[:] = b"abc"
    m3.close()
    m3.close()  # idempotent
    assert not _mapped(hb)
    with pytest.raises(GuestError):
        m3.gpa_to_host(4 * MB, 1)


def test_without_unknown_region(fds):
    m = GuestMemory.map([MemoryRegion(0, MB, 0x1000, 0)], [fds()])
    with pytest.raises(GuestError):
        m.without_region(MemoryRegion(0, MB, 0x2000, 0))
    m.close()


def test_c_table(fds):
    m = GuestMemory.map(
        [MemoryRegion(0x1000, MB, 0x5000, 0), MemoryRegion(8 * MB, MB, 0x9000_0000, 0)],
        [fds(), fds()],
    )
    t = m.c_table
    assert t.nregions == 2
    assert t.regions[1].gpa == 8 * MB and t.regions[1].host == m.gpa_to_host(8 * MB, 1)
    m.close()


def test_qemu_mq_exact_repeat_counts_copies_and_maps_once(fds):
    """One vhost device per queue pair adds the same region again: a copy, not an overlap."""
    r = MemoryRegion(0, 0xA0000, 0x7000_0000, 0)
    fd = fds()
    m1 = GuestMemory.empty().with_region(r, fd)
    dup = os.dup(fd)  # another fd of the same file
    m2 = m1.with_region(r, dup)
    os.close(dup)  # with_region closes no fd; the mapping does not need it
    assert m2.copies == (2,) and m2.regions == (r,)
    assert m2.gpa_to_host(0, 1) == m1.gpa_to_host(0, 1)
    with pytest.raises(GuestError, match="another file"):
        m2.with_region(r, fds())
    with pytest.raises(GuestError, match="overlap"):
        m2.with_region(MemoryRegion(0x1000, 0xA0000, 0x7000_1000, 0x1000), fd)
    m3 = m2.without_region(r)
    assert m3.copies == (1,)
    m4 = m3.without_region(r)
    assert m4.regions == ()
    host = m3.gpa_to_host(0, 1)
    for m in (m1, m2, m3):
        m.close()
    assert not _mapped(host)
    m4.close()


_REGIONS = [MemoryRegion(i * 4 * MB, MB, 0x4000_0000 + i * 4 * MB, 0) for i in range(3)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(_REGIONS) - 1)), max_size=25))
def test_repeats_and_removals_follow_a_multiset(ops):
    """ADD_MEM_REG / REM_MEM_REG of exact repeats behave like a multiset of regions: a region is
    mapped exactly while its count is above zero, and removing an absent one is an error."""
    fds = []
    for _ in _REGIONS:
        fd = os.memfd_create("vx-mem-prop")
        os.ftruncate(fd, MB)
        fds.append(fd)
    count = [0] * len(_REGIONS)
    mem = GuestMemory.empty()
    try:
        for add, i in ops:
            r = _REGIONS[i]
            if add:
                new = mem.with_region(r, fds[i])
                count[i] += 1
            elif count[i] == 0:
                with pytest.raises(GuestError):
                    mem.without_region(r)
                continue
            else:
                new = mem.without_region(r)
                count[i] -= 1
            mem.close()
            mem = new
            want = [r for r, n in zip(_REGIONS, count) if n]
            assert sorted(mem.regions, key=lambda x: x.gpa) == want
            assert dict(zip(mem.regions, mem.copies)) == {
                r: n for r, n in zip(_REGIONS, count) if n
            }
            for r, n in zip(_REGIONS, count):
                if n:
                    mem.gpa_to_host(r.gpa + r.size - 1, 1)
                else:
                    with pytest.raises(GuestError):
                        mem.gpa_to_host(r.gpa, 1)
    finally:
        mem.close()
        for fd in fds:
            os.close(fd)
    with open("/proc/self/maps") as f:
        assert "vx-mem-prop" not in f.read()  # every mapping went with its last copy
