"""A NetDevice with ``iommu=true`` driven through the sans-IO protocol (no worker, no daemon):
what it offers, rings that wait for their IOVAs (MISS on the backend channel, started by the
UPDATE, stopped by an INVALIDATE), and hostile IOTLB messages."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
from typing import Any

import pytest
from test_device_repeats import NullBinding

from vhostx.config import parse_device_spec
from vhostx.net import NetDevice, SwitchRegistry
from virtio import features as vf
from virtio import vhost_user as vu
from virtio.errors import RemoteProtocolError
from virtio.iotlb import IotlbPerm, IotlbType
from virtio.vhost_user import ProtocolFeature as PF
from virtio.vhost_user import Request as R

MB = 1 << 20
REGION = vu.MemRegion(gpa=0, size=2 * MB, uva=0x7F00_0000_0000, mmap_offset=0)
RING_IOVA = 0xFEE0_0000  # the rings of queue 0 (desc, avail, used one page apart)
ACCESS_PLATFORM = 1 << vf.VIRTIO_F_ACCESS_PLATFORM


class IommuWire:
    def __init__(self, iommu: bool = True) -> None:
        self.binding = NullBinding()
        spec = f"name=io,socket=/tmp/unused.sock,iommu={'true' if iommu else 'false'}"
        self.dev = NetDevice(parse_device_spec(spec), self.binding, SwitchRegistry())  # type: ignore[arg-type]
        self.back = vu.BackendConnection()
        self.front = vu.FrontendConnection()
        self.loop = asyncio.new_event_loop()
        self.dev._loop = self.loop
        self.memfd = os.memfd_create("vx-iotlb-dev")
        os.ftruncate(self.memfd, REGION.size)
        self.channel: socket.socket | None = None

    def close(self) -> None:
        self.loop.run_until_complete(self.dev.close())
        self.loop.close()
        os.close(self.memfd)
        if self.channel is not None:
            self.channel.close()

    def send(self, req: R, payload: Any = None, fds: tuple[int, ...] = (),
             need_reply: bool = False) -> Any:
        data = self.front.request(req, payload, fds, need_reply=need_reply)
        (msg,) = self.back.feed(data, list(fds))
        reply = self.loop.run_until_complete(self.dev.handle(self.back, msg))
        if not reply:
            return None
        (answer,) = self.front.feed(reply)
        return answer.payload

    def iotlb(self, iova: int, size: int, uaddr: int, perm: int, type_: int) -> Any:
        return self.send(R.IOTLB_MSG, vu.IotlbMsg(iova, size, uaddr, perm, type_), need_reply=True)

    def setup(self) -> None:
        """Negotiate ACCESS_PLATFORM, the backend channel, memory, and ring 0 at IOVAs."""
        offered = self.send(R.GET_FEATURES)
        pf = self.send(R.GET_PROTOCOL_FEATURES)
        self.send(R.SET_PROTOCOL_FEATURES, pf)
        self.send(R.SET_OWNER)
        self.send(R.SET_FEATURES, offered & ~(1 << vf.VIRTIO_F_IN_ORDER))
        ours, theirs = socket.socketpair()
        self.channel = theirs
        theirs.setblocking(False)
        assert self.send(R.SET_BACKEND_REQ_FD, None, (ours.detach(),), True) == 0
        assert self.send(R.SET_MEM_TABLE, vu.MemTable((REGION,)), (os.dup(self.memfd),),
                         True) == 0
        self.send(R.SET_VRING_NUM, vu.VringState(0, 256), need_reply=True)
        self.send(R.SET_VRING_BASE, vu.VringState(0, 0), need_reply=True)
        addr = vu.VringAddr(0, 0, desc=RING_IOVA, used=RING_IOVA + 0x2000,
                            avail=RING_IOVA + 0x1000)
        self.send(R.SET_VRING_ADDR, addr, need_reply=True)
        self.send(R.SET_VRING_ENABLE, vu.VringState(0, 1), need_reply=True)
        assert self.send(R.SET_VRING_KICK, vu.VringFile(0, nofd=True), need_reply=True) == 0

    def misses(self) -> list[vu.IotlbMsg]:
        assert self.channel is not None
        out = []
        try:
            data = self.channel.recv(1 << 16)
        except BlockingIOError:
            return out
        while data:
            req, flags, size = vu.HEADER.unpack_from(data)
            assert req == vu.BackendRequest.IOTLB_MSG and flags == vu.VERSION and size == 32
            out.append(vu.IotlbMsg.unpack(data[12:44]))
            data = data[44:]
        return out


@pytest.fixture
def wire():
    w = IommuWire()
    yield w
    w.close()


def test_offers_access_platform_with_backend_req_only_when_asked() -> None:
    on, off = IommuWire(True), IommuWire(False)
    try:
        assert on.send(R.GET_FEATURES) & ACCESS_PLATFORM
        pf = on.send(R.GET_PROTOCOL_FEATURES)
        assert pf >> PF.BACKEND_REQ & 1 and pf >> PF.REPLY_ACK & 1
        assert not off.send(R.GET_FEATURES) & ACCESS_PLATFORM
        assert not off.send(R.GET_PROTOCOL_FEATURES) >> PF.BACKEND_REQ & 1
    finally:
        on.close()
        off.close()


def test_ring_waits_for_its_iovas_then_starts_and_stops_on_invalidate(wire) -> None:
    wire.setup()
    vr = wire.dev.vrings[0]
    assert vr.queue is None  # the rings' IOVAs are not mapped yet
    (miss,) = wire.misses()
    assert (miss.type, miss.iova, miss.perm) == (IotlbType.MISS, RING_IOVA, IotlbPerm.RO)
    assert wire.iotlb(RING_IOVA, 0x3000, REGION.uva + 0x10000, IotlbPerm.RW,
                      IotlbType.UPDATE) == 0
    assert vr.queue is not None and vr.queue.iotlb is wire.dev.iotlb
    assert wire.misses() == []
    # the used ring's page goes: the ring stops at once and asks for it again
    assert wire.iotlb(RING_IOVA + 0x2000, 0x1000, 0, 0, IotlbType.INVALIDATE) == 0
    assert vr.queue is None
    (miss,) = wire.misses()
    assert (miss.iova, miss.perm) == (RING_IOVA + 0x2000, IotlbPerm.WO)
    stats = wire.dev.stats()["iotlb"]
    assert stats["updates"] == 1 and stats["invalidations"] == 1 and stats["miss_sent"] == 2
    assert stats["quiesced"] == 1


def test_read_only_used_ring_breaks_the_device(wire) -> None:
    wire.setup()
    assert wire.iotlb(RING_IOVA, 0x3000, REGION.uva + 0x10000, IotlbPerm.RO,
                      IotlbType.UPDATE) == 0
    assert wire.dev.broken is not None and "does not allow WO" in wire.dev.broken


@pytest.mark.parametrize(
    ("iova", "size", "perm", "type_", "match"),
    [
        (RING_IOVA, 0x1000, IotlbPerm.RO, IotlbType.MISS, "MISS goes from the backend"),
        (RING_IOVA, 0x1000, IotlbPerm.RO, 9, "expected type 2 \\(UPDATE\\).*got 9"),
        (RING_IOVA, 0, IotlbPerm.RO, IotlbType.UPDATE, "expected a size > 0"),
        (RING_IOVA, 0, 0, IotlbType.INVALIDATE, "expected a size > 0"),
        ((1 << 64) - 0x1000, 0x2000, IotlbPerm.RO, IotlbType.UPDATE, "wraps"),
        (RING_IOVA, 0x1000, 4, IotlbType.UPDATE, "expected perm 1 \\(RO\\)"),
    ],
)
def test_hostile_iotlb_messages_close_the_connection(wire, iova, size, perm, type_, match) -> None:
    wire.setup()
    with pytest.raises(RemoteProtocolError, match=match):
        wire.iotlb(iova, size, REGION.uva, perm, type_)


def test_update_outside_guest_memory_is_refused_and_the_connection_stays(wire) -> None:
    wire.setup()
    assert wire.iotlb(RING_IOVA, 0x1000, 0x1234_0000, IotlbPerm.RW, IotlbType.UPDATE) == 1
    assert wire.dev.stats()["iotlb"]["refused"] == 1
    assert wire.iotlb(RING_IOVA, 0x3000, REGION.uva, IotlbPerm.RW, IotlbType.UPDATE) == 0


def test_iotlb_without_access_platform_is_a_protocol_error() -> None:
    w = IommuWire(True)
    try:
        w.send(R.SET_PROTOCOL_FEATURES, w.send(R.GET_PROTOCOL_FEATURES))
        w.send(R.SET_FEATURES, 1 << vf.VIRTIO_F_VERSION_1)
        with pytest.raises(RemoteProtocolError, match="needs VIRTIO_F_ACCESS_PLATFORM"):
            w.iotlb(RING_IOVA, 0x1000, REGION.uva, IotlbPerm.RW, IotlbType.UPDATE)
    finally:
        w.close()


def test_backend_channel_needs_backend_req() -> None:
    w = IommuWire(False)
    try:
        w.send(R.SET_PROTOCOL_FEATURES, w.send(R.GET_PROTOCOL_FEATURES))
        a, b = socket.socketpair()
        with pytest.raises(RemoteProtocolError, match="BACKEND_REQ"):
            w.send(R.SET_BACKEND_REQ_FD, None, (a.detach(),))
        b.close()
    finally:
        w.close()


class _RecordingBinding(NullBinding):
    """Records, at each detach and barrier, whether the IOTLB still held ``watch``; a barrier
    answers only when the test completes ``pending``."""

    def __init__(self) -> None:
        super().__init__()
        self.dev: Any = None
        self.watch = 0
        self.seen_at_detach: list[bool] = []
        self.seen_at_barrier: list[bool] = []
        self.pending: concurrent.futures.Future[Any] | None = None

    def _mapped(self) -> bool:
        t = self.dev.iotlb
        return t is not None and t.translate(self.watch, 1, IotlbPerm.RO) is not None

    def detach(self, work: Any) -> Any:
        self.seen_at_detach.append(self._mapped())
        return super().detach(work)

    def barrier(self) -> list[concurrent.futures.Future[Any]]:
        self.seen_at_barrier.append(self._mapped())
        self.barriers += 1
        return [self.pending] if self.pending is not None else [self._done()]


BUF_IOVA = 0x4000_0000


def _two_rings_mapped(wire) -> _RecordingBinding:
    binding = _RecordingBinding()
    binding.dev = wire.dev
    wire.dev.worker = binding
    wire.binding = binding
    wire.setup()
    addr = vu.VringAddr(1, 0, desc=RING_IOVA + 0x3000, used=RING_IOVA + 0x5000,
                        avail=RING_IOVA + 0x4000)
    wire.send(R.SET_VRING_NUM, vu.VringState(1, 256), need_reply=True)
    wire.send(R.SET_VRING_BASE, vu.VringState(1, 0), need_reply=True)
    wire.send(R.SET_VRING_ADDR, addr, need_reply=True)
    wire.send(R.SET_VRING_ENABLE, vu.VringState(1, 1), need_reply=True)
    wire.send(R.SET_VRING_KICK, vu.VringFile(1, nofd=True), need_reply=True)
    assert wire.iotlb(RING_IOVA, 0x6000, REGION.uva + 0x10000, IotlbPerm.RW,
                      IotlbType.UPDATE) == 0
    assert wire.iotlb(BUF_IOVA, 0x1000, REGION.uva + 0x40000, IotlbPerm.RW,
                      IotlbType.UPDATE) == 0
    assert [vr.queue is not None for vr in wire.dev.vrings[:2]] == [True, True]
    assert binding.attached, "the rings run: the TX ring's work is attached (a sink's RX none)"
    return binding


def test_invalidate_of_a_ring_detaches_the_works_before_the_mapping_goes(wire) -> None:
    """A ring's own addresses (host pointers in its DeviceQueue): the works are detached first
    (their worker finishes its batch), the mapping goes, the ack follows, the ring re-plans."""
    binding = _two_rings_mapped(wire)
    binding.watch = RING_IOVA + 0x4000  # ring 1's avail ring
    queue = wire.dev.vrings[1].queue
    assert wire.iotlb(RING_IOVA + 0x4000, 0x1000, 0, 0, IotlbType.INVALIDATE) == 0
    assert binding.seen_at_detach and all(binding.seen_at_detach)  # detached while still mapped
    assert wire.dev.iotlb.translate(RING_IOVA + 0x4000, 1, IotlbPerm.RO) is None
    assert wire.dev.vrings[1].queue is None and queue is not None  # stopped, asks again
    assert binding.barriers == 0 and wire.dev.stats()["iotlb"]["quiesced"] == 1


def test_invalidate_of_a_buffer_removes_then_waits_for_every_worker_before_the_ack(wire) -> None:
    """A range no ring's own addresses use: nothing is detached; the mapping goes first (a walk
    starting afterwards misses), then the barrier waits out the batches running on every
    worker, and only then is the ack sent."""
    binding = _two_rings_mapped(wire)
    binding.watch = BUF_IOVA
    rings = [vr.queue for vr in wire.dev.vrings[:2]]
    works = list(binding.attached)
    binding.seen_at_detach.clear()
    binding.pending = concurrent.futures.Future()
    data = wire.front.request(R.IOTLB_MSG, vu.IotlbMsg(BUF_IOVA, 0x1000, 0, 0,
                                                       IotlbType.INVALIDATE), need_reply=True)
    (msg,) = wire.back.feed(data, [])
    task = wire.loop.create_task(wire.dev.handle(wire.back, msg))
    wire.loop.run_until_complete(asyncio.sleep(0.05))
    assert binding.seen_at_barrier == [False]  # removed before the barrier was asked for
    assert not task.done()  # no ack while a worker may still be in a batch
    binding.pending.set_result(None)
    (ack,) = wire.front.feed(wire.loop.run_until_complete(task))
    assert ack.payload == 0
    assert binding.seen_at_detach == [] and binding.attached == works
    assert [vr.queue for vr in wire.dev.vrings[:2]] == rings  # the rings ran on
    st = wire.dev.stats()["iotlb"]
    assert st["barriers"] == 1 and st["quiesced"] == 0 and st["invalidations"] == 1
    # an UPDATE of an unmapped range inserts without stopping or waiting for anything
    binding.pending = None
    assert wire.iotlb(BUF_IOVA, 0x1000, REGION.uva + 0x40000, IotlbPerm.RW,
                      IotlbType.UPDATE) == 0
    assert binding.seen_at_detach == [] and binding.barriers == 1


def test_full_iotlb_evicts_all_but_the_rings_instead_of_refusing_the_update(wire) -> None:
    """Before: an UPDATE past the capacity was refused and the page stayed in the sent set, so
    the ring whose buffer needed it stalled for good (a guest with an identity DMA domain gets
    one mapping per 4 KiB page it touches). Now the table makes room and the ring keeps going."""
    from virtio.iotlb import DeviceIotlb

    wire.setup()
    assert [m.iova for m in wire.misses()] == [RING_IOVA]
    wire.dev.iotlb.close()
    wire.dev.iotlb = DeviceIotlb(capacity=4)
    assert wire.iotlb(RING_IOVA, 0x3000, REGION.uva + 0x10000, IotlbPerm.RW,
                      IotlbType.UPDATE) == 0
    queue = wire.dev.vrings[0].queue
    assert queue is not None
    for k in range(3):  # the table is full: the ring's mapping and three buffer pages
        assert wire.iotlb(BUF_IOVA + k * 0x1000, 0x1000, REGION.uva + 0x40000 + k * 0x1000,
                          IotlbPerm.RW, IotlbType.UPDATE) == 0
    assert len(wire.dev.iotlb) == 4
    assert wire.iotlb(BUF_IOVA + 0x8000, 0x1000, REGION.uva + 0x50000, IotlbPerm.RW,
                      IotlbType.UPDATE) == 0  # refused (ack 1) before
    t = wire.dev.iotlb
    assert t.translate(BUF_IOVA + 0x8000, 1, IotlbPerm.RO).uaddr == REGION.uva + 0x50000
    assert all(t.translate(BUF_IOVA + k * 0x1000, 1, IotlbPerm.RO) is None for k in range(3))
    # the ring runs on, not restarted, its addresses still translated
    assert wire.dev.vrings[0].queue is queue
    assert t.translate(RING_IOVA, 16 * 256, IotlbPerm.RO).uaddr == REGION.uva + 0x10000
    assert t.translate(RING_IOVA + 0x1000, 6 + 2 * 256, IotlbPerm.RO).uaddr == (
        REGION.uva + 0x11000)
    assert t.translate(RING_IOVA + 0x2000, 6 + 8 * 256, IotlbPerm.WO).uaddr == (
        REGION.uva + 0x12000)
    stats = wire.dev.stats()["iotlb"]
    assert stats["evictions"] == 1 and stats["evicted"] == 4 and stats["refused"] == 0
    assert wire.misses() == []  # nothing needed asking again


def test_eviction_keeps_a_ring_that_spans_several_mappings(wire) -> None:
    from virtio.iotlb import DeviceIotlb

    wire.setup()
    wire.misses()
    wire.dev.iotlb.close()
    wire.dev.iotlb = DeviceIotlb(capacity=7)
    for k in range(6):  # the rings' three pages in half pages: the descriptor table spans two
        assert wire.iotlb(RING_IOVA + k * 0x800, 0x800, REGION.uva + 0x10000 + k * 0x800,
                          IotlbPerm.RW, IotlbType.UPDATE) == 0
    queue = wire.dev.vrings[0].queue
    assert queue is not None
    wire.misses()  # the avail and used pages, asked for while the rings were being mapped
    assert wire.iotlb(BUF_IOVA, 0x1000, REGION.uva + 0x40000, IotlbPerm.RW,
                      IotlbType.UPDATE) == 0
    assert wire.iotlb(BUF_IOVA + 0x1000, 0x1000, REGION.uva + 0x41000, IotlbPerm.RW,
                      IotlbType.UPDATE) == 0  # full: evicts, the rings' pieces go back
    assert wire.dev.vrings[0].queue is queue and wire.misses() == []
    assert wire.dev.iotlb.translate(BUF_IOVA, 1, IotlbPerm.RO) is None
