"""The device IOTLB (ACCESS_PLATFORM): the table's rules, hostile IOTLB messages, and the C walk
through it (translations checked, misses reported once with the chain left in the ring, an
invalidated mapping never used again)."""

from __future__ import annotations

import os
import socket

import pytest
from test_core_env import Env

from virtio import net
from virtio.driver.split import DriverQueue
from virtio.errors import GuestError, RemoteProtocolError
from virtio.iotlb import DeviceIotlb, IotlbFull, IotlbPerm
from virtio.memory import GuestMemory, MemoryRegion
from virtio.ring import DeviceQueue

RO, WO, RW = IotlbPerm.RO, IotlbPerm.WO, IotlbPerm.RW
IOVA = 0x8000_0000  # buffers' IOVAs (the ring itself is mapped iova == gpa)
PAGE = 4096


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


@pytest.fixture
def tlb():
    t = DeviceIotlb(capacity=64)
    yield t
    t.close()


def _uva(env: Env, gpa: int) -> int:
    return env.uva(gpa)


# ---- the table ---------------------------------------------------------------------------------


def test_update_translate_and_repeat(env, tlb):
    g = env.alloc(2 * PAGE, PAGE)
    assert tlb.update(env.mem, IOVA, 2 * PAGE, _uva(env, g), RW) is True
    assert tlb.update(env.mem, IOVA, 2 * PAGE, _uva(env, g), RW) is False  # exact repeat
    tr = tlb.translate(IOVA + 10, 100, RO)
    assert tr is not None
    assert tr.host == env.mem.gpa_to_host(g + 10, 1) and tr.uaddr == _uva(env, g) + 10
    assert tr.length == 100
    assert tlb.translate(IOVA + 2 * PAGE, 1, RO) is None  # one past the end
    assert tlb.translate(IOVA - 1, 1, RO) is None
    assert tlb.stats()["updates"] == 1 and tlb.stats()["repeats"] == 1


def test_adjacent_mappings_coalesce_only_when_contiguous(env, tlb):
    g = env.alloc(4 * PAGE, PAGE)
    tlb.update(env.mem, IOVA, PAGE, _uva(env, g), RW)
    tlb.update(env.mem, IOVA + PAGE, PAGE, _uva(env, g + PAGE), RW)  # contiguous host
    tlb.update(env.mem, IOVA + 2 * PAGE, PAGE, _uva(env, g + 3 * PAGE), RW)  # not contiguous
    assert tlb.translate(IOVA, 3 * PAGE, RO).length == 2 * PAGE
    assert tlb.ring_uaddr(IOVA, 2 * PAGE, RO) == _uva(env, g)
    assert tlb.ring_uaddr(IOVA, 3 * PAGE, RO) is None
    assert tlb.first_unmapped(IOVA, 4 * PAGE, RO) == IOVA + 3 * PAGE


def test_overlapping_update_is_refused_until_invalidated(env, tlb):
    g = env.alloc(4 * PAGE, PAGE)
    tlb.update(env.mem, IOVA, 2 * PAGE, _uva(env, g), RW)
    assert tlb.overlaps(IOVA + PAGE, 2 * PAGE)
    assert not tlb.overlaps(IOVA + 2 * PAGE, PAGE)
    with pytest.raises(GuestError, match="overlaps another mapping"):
        tlb.update(env.mem, IOVA + PAGE, 2 * PAGE, _uva(env, g + 2 * PAGE), RW)
    with pytest.raises(GuestError, match="overlaps"):  # same range, other permission
        tlb.update(env.mem, IOVA, 2 * PAGE, _uva(env, g), RO)
    assert tlb.invalidate(IOVA + PAGE, 2 * PAGE) == 1
    assert tlb.update(env.mem, IOVA + PAGE, 2 * PAGE, _uva(env, g + 2 * PAGE), RW)
    assert tlb.translate(IOVA + PAGE, 1, RO).host == env.mem.gpa_to_host(g + 2 * PAGE, 1)


def test_invalidate_the_middle_of_a_mapping_keeps_both_ends(env, tlb):
    g = env.alloc(3 * PAGE, PAGE)
    tlb.update(env.mem, IOVA, 3 * PAGE, _uva(env, g), RW)
    assert tlb.invalidate(IOVA + PAGE, PAGE) == 1
    assert len(tlb) == 2
    assert tlb.translate(IOVA + PAGE - 1, 1, RO).host == env.mem.gpa_to_host(g + PAGE - 1, 1)
    assert tlb.translate(IOVA + PAGE, 1, RO) is None
    assert tlb.translate(IOVA + 2 * PAGE - 1, 1, RO) is None
    right = tlb.translate(IOVA + 2 * PAGE, PAGE, RO)
    assert right.host == env.mem.gpa_to_host(g + 2 * PAGE, 1) and right.length == PAGE
    assert tlb.invalidate(IOVA + 10 * PAGE, PAGE) == 0  # nothing there
    assert tlb.invalidate(0, 1 << 63) == 2 and len(tlb) == 0


def test_permissions(env, tlb):
    g = env.alloc(2 * PAGE, PAGE)
    tlb.update(env.mem, IOVA, PAGE, _uva(env, g), RO)
    tlb.update(env.mem, IOVA + PAGE, PAGE, _uva(env, g + PAGE), WO)
    assert tlb.translate(IOVA, 8, RO) is not None
    with pytest.raises(GuestError, match="does not allow WO"):
        tlb.translate(IOVA, 8, WO)
    with pytest.raises(GuestError, match="does not allow RO"):
        tlb.translate(IOVA + PAGE, 8, RO)
    # a read over both stops at the write-only one: never coalesced across a permission
    assert tlb.translate(IOVA, 2 * PAGE, RO).length == PAGE


@pytest.mark.parametrize(
    ("iova", "size", "perm", "match"),
    [
        (IOVA, 0, RW, "expected a size > 0, got 0"),
        ((1 << 64) - PAGE, 2 * PAGE, RW, "wraps past 2\\^64"),
        (IOVA, PAGE, 0, "expected perm 1 \\(RO\\), 2 \\(WO\\) or 3 \\(RW\\), got 0"),
        (IOVA, PAGE, 7, "got 7"),
    ],
)
def test_hostile_updates_get_a_clear_error(env, tlb, iova, size, perm, match):
    g = env.alloc(PAGE, PAGE)
    with pytest.raises(RemoteProtocolError, match=match):
        tlb.update(env.mem, iova, size, _uva(env, g), perm)
    assert len(tlb) == 0


def test_update_outside_guest_memory_is_refused(env, tlb):
    with pytest.raises(GuestError, match="not in the memory table"):
        tlb.update(env.mem, IOVA, PAGE, 0x1000, RW)
    end = env.region.uva + env.region.size
    with pytest.raises(GuestError, match="not in the memory table"):
        tlb.update(env.mem, IOVA, 2 * PAGE, end - PAGE, RW)  # runs off the region
    with pytest.raises(RemoteProtocolError, match="uaddr .* wraps"):
        tlb.update(env.mem, IOVA, 2 * PAGE, (1 << 64) - PAGE, RW)
    with pytest.raises(GuestError, match="before any memory table"):
        tlb.update(None, IOVA, PAGE, env.region.uva, RW)
    assert len(tlb) == 0


def test_update_across_two_regions_is_split():
    fds = [os.memfd_create("vx-iotlb-a"), os.memfd_create("vx-iotlb-b")]
    for fd in fds:
        os.ftruncate(fd, 4 * PAGE)
    regions = [MemoryRegion(0, 4 * PAGE, 0x10_0000, 0), MemoryRegion(4 * PAGE, 4 * PAGE,
                                                                       0x10_4000, 0)]
    mem = GuestMemory.map(regions, fds)
    t = DeviceIotlb(capacity=8)
    try:
        t.update(mem, IOVA, 2 * PAGE, 0x10_3000, RW)
        assert len(t) == 2
        assert t.translate(IOVA + PAGE, 1, RO).host == mem.uva_to_host(0x10_4000, 1)
        assert t.translate(IOVA, 2 * PAGE, RO).length == PAGE  # two mmaps: not contiguous
    finally:
        t.close()
        mem.close()
        for fd in fds:
            os.close(fd)


def test_a_flood_of_updates_is_capped_with_a_clear_error(env):
    t = DeviceIotlb()  # the default capacity
    try:
        g = env.alloc(PAGE, PAGE)
        with pytest.raises(IotlbFull, match=f"IOTLB full: {t.capacity} mappings"):
            for i in range(1_000_000):  # stops at the capacity, long before a million
                t.update(env.mem, IOVA + 2 * i * PAGE, PAGE, _uva(env, g), RO)
        assert len(t) == t.capacity
        t.invalidate(IOVA, 2 * PAGE)
        t.update(env.mem, IOVA, PAGE, _uva(env, g), RO)  # room again
    finally:
        t.close()


def test_capacity_is_bounded():
    with pytest.raises(ValueError, match="capacity"):
        DeviceIotlb(capacity=0)


def test_rehost_follows_a_new_memory_table(env, tlb):
    g = env.alloc(PAGE, PAGE)
    tlb.update(env.mem, IOVA, PAGE, _uva(env, g), RW)
    tlb.update(env.mem, IOVA + PAGE, PAGE, _uva(env, g), RW)
    fd = os.memfd_create("vx-iotlb-new")
    os.ftruncate(fd, env.size)
    new = GuestMemory.map([env.region], [fd])
    try:
        assert tlb.rehost(new) == 0
        assert tlb.translate(IOVA, 1, RO).host == new.uva_to_host(_uva(env, g), 1)
        assert tlb.rehost(GuestMemory.empty()) == 2 and len(tlb) == 0
    finally:
        new.close()
        os.close(fd)


# ---- the C walk through the IOTLB ----------------------------------------------------------------


def _iommu_pair(env: Env, tlb: DeviceIotlb, size: int = 16, *, hdr_len: int = 0,
                mrg_rxbuf: bool = False):
    total = DriverQueue.layout(size)[3]
    base = env.alloc(total, PAGE)
    drv = DriverQueue(env.view(base, total), base, size)
    span = (total + PAGE - 1) & ~(PAGE - 1)
    tlb.update(env.mem, base, span, _uva(env, base), RW)  # the ring: iova == gpa
    uaddr = tlb.ring_uaddr(drv.desc_gpa, 16 * size, RO)
    assert uaddr == _uva(env, drv.desc_gpa)
    dev = DeviceQueue(
        env.mem, index=0, size=size, hdr_len=hdr_len, mrg_rxbuf=mrg_rxbuf, iotlb=tlb,
        desc_uva=uaddr, avail_uva=_uva(env, drv.avail_gpa), used_uva=_uva(env, drv.used_gpa),
    )
    env.queues.append(dev)
    return drv, dev


def _pipe():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _miss_fd_count(tlb: DeviceIotlb) -> int:
    try:
        return os.eventfd_read(tlb.miss_fd)
    except BlockingIOError:
        return 0


def test_walk_reads_through_the_iotlb(env, tlb):
    drv, dev = _iommu_pair(env, tlb)
    g = env.alloc(PAGE, PAGE)
    env.write(g, b"hello through the iommu")
    tlb.update(env.mem, IOVA, PAGE, _uva(env, g), RO)
    drv.add([(IOVA, 23)])
    drv.publish()
    a, b = _pipe()
    try:
        assert net.tx_to_fd(dev, a.fileno(), 8, 1 << 20) == 1
        assert b.recv(100) == b"hello through the iommu"
    finally:
        a.close()
        b.close()


def test_buffer_over_two_mappings_is_gathered(env, tlb):
    drv, dev = _iommu_pair(env, tlb)
    g = env.alloc(3 * PAGE, PAGE)
    env.write(g + PAGE - 4, b"head")
    env.write(g + 2 * PAGE, b"tail")
    tlb.update(env.mem, IOVA, PAGE, _uva(env, g), RO)
    tlb.update(env.mem, IOVA + PAGE, PAGE, _uva(env, g + 2 * PAGE), RO)  # elsewhere in host
    drv.add([(IOVA + PAGE - 4, 8)])
    drv.publish()
    a, b = _pipe()
    try:
        assert net.tx_to_fd(dev, a.fileno(), 8, 1 << 20) == 1
        assert b.recv(100) == b"headtail"
    finally:
        a.close()
        b.close()


def test_miss_leaves_the_chain_and_is_reported_once(env, tlb):
    drv, dev = _iommu_pair(env, tlb)
    g = env.alloc(PAGE, PAGE)
    env.write(g, b"late")
    drv.add([(IOVA + 0x123, 4)])
    drv.publish()
    a, b = _pipe()
    try:
        assert net.tx_to_fd(dev, a.fileno(), 8, 1 << 20) == 0
        assert dev.pending() == 1 and dev.last_avail_idx == 0  # nothing consumed
        assert dev.iotlb_last_miss() == IOVA + 0x123
        assert _miss_fd_count(tlb) == 1
        assert tlb.take_misses() == [(IOVA, RO)]  # the page, with the permission wanted
        assert net.tx_to_fd(dev, a.fileno(), 8, 1 << 20) == 0  # misses again: not re-reported
        assert tlb.take_misses() == [] and _miss_fd_count(tlb) == 0
        assert tlb.stats()["misses"] == 1
        tlb.update(env.mem, IOVA, PAGE, _uva(env, g), RO)
        env.write(g + 0x123, b"late")
        assert net.tx_to_fd(dev, a.fileno(), 8, 1 << 20) == 1  # resumed
        assert b.recv(100) == b"late"
        assert dev.broken is None
    finally:
        a.close()
        b.close()


def test_invalidated_mapping_is_never_used_again(env, tlb):
    """After an invalidation the same IOVA misses, and a remap reads the new place only."""
    drv, dev = _iommu_pair(env, tlb)
    old, new = env.alloc(PAGE, PAGE), env.alloc(PAGE, PAGE)
    env.write(old, b"OLD!")
    env.write(new, b"NEW!")
    tlb.update(env.mem, IOVA, PAGE, _uva(env, old), RO)
    a, b = _pipe()
    try:
        drv.add([(IOVA, 4)])
        drv.publish()
        assert net.tx_to_fd(dev, a.fileno(), 8, 1 << 20) == 1
        assert b.recv(10) == b"OLD!"
        drv.get_used()
        assert tlb.invalidate(IOVA, PAGE) == 1
        drv.add([(IOVA, 4)])
        drv.publish()
        assert net.tx_to_fd(dev, a.fileno(), 8, 1 << 20) == 0  # no translation: a miss
        with pytest.raises(BlockingIOError):
            b.recv(10)
        tlb.update(env.mem, IOVA, PAGE, _uva(env, new), RO)
        assert net.tx_to_fd(dev, a.fileno(), 8, 1 << 20) == 1
        assert b.recv(10) == b"NEW!"
    finally:
        a.close()
        b.close()


def test_device_write_into_a_read_only_mapping_breaks_the_queue(env, tlb):
    drv, dev = _iommu_pair(env, tlb)
    g = env.alloc(PAGE, PAGE)
    env.write(g, b"\xaa" * 64)
    tlb.update(env.mem, IOVA, PAGE, _uva(env, g), RO)
    drv.add([], [(IOVA, 64)])
    drv.publish()
    with pytest.raises(GuestError, match="does not allow a device write"):
        net.rx_fill(dev, b"\x01" * 60, 8)
    assert env.read(g, 64) == b"\xaa" * 64  # nothing written
    assert tlb.stats()["denied"] == 1


def test_rx_miss_drops_the_frame_and_keeps_the_chain(env, tlb):
    drv, dev = _iommu_pair(env, tlb)
    g = env.alloc(PAGE, PAGE)
    drv.add([], [(IOVA, 128)])
    drv.publish()
    assert net.rx_fill(dev, b"\x02" * 60, 8) == 0
    assert dev.pending() == 1 and tlb.take_misses() == [(IOVA, WO)]
    tlb.update(env.mem, IOVA, PAGE, _uva(env, g), WO)
    assert net.rx_fill(dev, b"\x02" * 60, 1) == 1
    assert env.read(g, 60) == b"\x02" * 60


def test_unanswered_misses_do_not_hold_their_slots_for_ever(env):
    """A frontend that never answers some misses must not stop new ones from being reported;
    and RX from an fd asks for every posted buffer at once, leaving the frame in the fd."""
    tlb = DeviceIotlb(capacity=512)
    drv, dev = _iommu_pair(env, tlb, size=128, hdr_len=12, mrg_rxbuf=True)
    for i in range(100):  # 100 chains, 100 pages nobody maps
        drv.add([], [(IOVA + i * PAGE, 2048)])
    drv.publish()
    a, b = _pipe()
    try:
        a.send(bytes(12) + b"\x04" * 60)
        assert net.rx_from_fd(dev, b.fileno(), 8) == 0
        first = tlb.take_misses(limit=200)
        assert first == [(IOVA + i * PAGE, WO) for i in range(64)]  # the slots' worth
        assert net.rx_from_fd(dev, b.fileno(), 8) == 0  # nothing answered: the rest now
        second = tlb.take_misses(limit=200)
        assert second == [(IOVA + i * PAGE, WO) for i in range(64, 100)]
        g = env.alloc(PAGE, PAGE)
        for i in range(100):
            tlb.update(env.mem, IOVA + i * PAGE, PAGE, _uva(env, g), WO)
        assert net.rx_from_fd(dev, b.fileno(), 8) == 1  # the frame waited in the fd
        assert env.read(g + 12, 60) == b"\x04" * 60
    finally:
        a.close()
        b.close()
        tlb.close()


@pytest.mark.parametrize("mrg_rxbuf", [False, True])
def test_one_buffer_rx_path_read_iovas_as_guest_physical(env, tlb, mrg_rxbuf):
    """The direct RX path for one-descriptor chains took the descriptor's address as a guest
    physical one even on an IOTLB ring: with an IOVA that is also a valid GPA, the frame went to
    that GPA (a decoy here) instead of where the IOTLB maps it."""
    drv, dev = _iommu_pair(env, tlb, hdr_len=12, mrg_rxbuf=mrg_rxbuf)
    decoy = env.alloc(PAGE, PAGE)
    env.write(decoy, b"\xdd" * 128)
    real = env.alloc(PAGE, PAGE)
    tlb.update(env.mem, decoy, PAGE, _uva(env, real), WO)  # IOVA == the decoy's GPA
    drv.add([], [(decoy, 128)])
    drv.publish()
    assert net.rx_fill(dev, b"\x05" * 60, 1) == 1
    assert env.read(real + 12, 60) == b"\x05" * 60
    assert env.read(decoy, 128) == b"\xdd" * 128
