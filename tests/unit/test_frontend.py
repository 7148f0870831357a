"""VhostUserFrontend and NetDriver against a tiny in-test backend (a thread speaking
BackendConnection over a real AF_UNIX socket, plus a pure-Python split-ring device). No daemon."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from virtio import features as vf
from virtio.errors import RemoteProtocolError, VhostError
from virtio.frontend import NetDriver, VhostUserFrontend
from virtio.vhost_user import (
    HEADER,
    SPECS,
    BackendConnection,
    MemTable,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
)

PF = ProtocolFeature
R = Request

NET_OFFER = vf.mask(
    [
        vf.VIRTIO_F_VERSION_1,
        vf.VHOST_USER_F_PROTOCOL_FEATURES,
        vf.VIRTIO_RING_F_EVENT_IDX,
        vf.VIRTIO_NET_F_MRG_RXBUF,
        vf.VIRTIO_NET_F_MQ,
        vf.VIRTIO_F_RING_PACKED,  # the frontend must not take this one
        vf.VIRTIO_NET_F_CTRL_VQ,  # nor this
    ]
)
PF_OFFER = vf.mask([PF.MQ, PF.REPLY_ACK, PF.STATUS, PF.CONFIG, PF.LOG_SHMFD])


@dataclass
class Seen:
    request: Request
    need_reply: bool
    payload: Any
    nfds: int


@dataclass
class FakeBackend:
    """Listens on a path, serves one frontend in a thread, records every request."""

    path: str
    features: int = NET_OFFER
    protocol_features: int = PF_OFFER
    queue_num: int = 1
    refuse: set[Request] = field(default_factory=set)  # ack these with 1
    bad_reply_flags: int | None = None  # send replies with these flags instead of 0x5
    seen: list[Seen] = field(default_factory=list)
    mem: mmap.mmap | None = None
    mem_uva: int = 0
    addrs: dict[int, VringAddr] = field(default_factory=dict)
    kick: dict[int, int] = field(default_factory=dict)
    call: dict[int, int] = field(default_factory=dict)
    status: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = BackendConnection()
        try:
            s, _ = self.srv.accept()
            with s:
                while True:
                    data, fds, _fl, _ad = socket.recv_fds(s, 4096, 16)
                    if not data:
                        conn.feed(b"")
                        return
                    for msg in conn.feed(data, fds):
                        out = self._handle(conn, msg)
                        if out:
                            if self.bad_reply_flags is not None:
                                req, _f, size = HEADER.unpack_from(out)
                                out = HEADER.pack(req, self.bad_reply_flags, size) + out[12:]
                            s.sendall(out)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self.done.set()

    def _handle(self, conn: BackendConnection, msg: Message) -> bytes:
        req = Request(msg.request)
        self.seen.append(Seen(req, msg.need_reply, msg.payload, len(msg.fds)))
        if req == R.SET_MEM_TABLE:
            table: MemTable = msg.payload
            (r,) = table.regions
            self.mem = mmap.mmap(msg.fds[0], r.size, flags=mmap.MAP_SHARED)
            self.mem_uva = r.uva
            msg.close_fds()
        elif req in (R.SET_VRING_KICK, R.SET_VRING_CALL):
            (self.kick if req == R.SET_VRING_KICK else self.call)[msg.payload.index] = msg.fds[0]
        elif req == R.SET_VRING_ADDR:
            self.addrs[msg.payload.index] = msg.payload
        elif req == R.SET_STATUS:
            self.status = msg.payload
        else:
            msg.close_fds()
        replies: dict[Request, Any] = {
            R.GET_FEATURES: self.features,
            R.GET_PROTOCOL_FEATURES: self.protocol_features,
            R.GET_QUEUE_NUM: self.queue_num,
            R.GET_STATUS: self.status,
        }
        if SPECS[req].has_reply:
            if req == R.GET_VRING_BASE:
                return conn.reply(msg, VringState(msg.payload.index, 7))
            return conn.reply(msg, replies[req])
        return conn.ack(msg, req not in self.refuse)

    def requests(self) -> list[Request]:
        return [s.request for s in self.seen]

    def close(self) -> None:
        self.srv.close()
        for fd in list(self.kick.values()) + list(self.call.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.mem is not None:
            self.mem.close()


@pytest.fixture
def sockpath() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        yield os.path.join(d, "vhost.sock")


@pytest.fixture
def backend(sockpath: str) -> Iterator[FakeBackend]:
    b = FakeBackend(sockpath)
    yield b
    b.close()


def run(b: FakeBackend, **kw: Any) -> VhostUserFrontend:
    b.start()
    fe = VhostUserFrontend(b.path, mem_size=8 << 20, queue_size=64, **kw)
    fe.connect(timeout=5)
    return fe


def finish(b: FakeBackend, fe: VhostUserFrontend) -> None:
    fe.close()
    assert b.done.wait(5)
    assert b.error is None, b.error


RING = [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK, R.SET_VRING_CALL]


def test_qemu_style_negotiation_sequence(backend: FakeBackend) -> None:
    fe = run(backend)
    assert fe.features == NET_OFFER & ~vf.mask([vf.VIRTIO_F_RING_PACKED, vf.VIRTIO_NET_F_CTRL_VQ])
    assert fe.protocol_features == vf.mask([PF.MQ, PF.REPLY_ACK, PF.STATUS])
    assert backend.requests() == [
        R.GET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.SET_PROTOCOL_FEATURES,
        R.GET_QUEUE_NUM,
        R.SET_OWNER,
        R.SET_FEATURES,
        R.GET_STATUS,
        R.SET_STATUS,
        R.SET_MEM_TABLE,
        *RING,
        *RING,
        R.SET_VRING_ENABLE,
        R.SET_VRING_ENABLE,
        R.GET_STATUS,
        R.SET_STATUS,
    ]
    by = {s.request: s for s in backend.seen}
    assert by[R.SET_FEATURES].payload == fe.features
    assert by[R.SET_PROTOCOL_FEATURES].payload == fe.protocol_features
    assert not by[R.SET_PROTOCOL_FEATURES].need_reply
    # REPLY_ACK honoured: every later request without its own reply asked for an ack
    after = backend.seen[3:]
    for s in after:
        assert s.need_reply == (not SPECS[s.request].has_reply), s
    assert backend.status == 0xF  # ACK|DRIVER|FEATURES_OK|DRIVER_OK
    enables = [s.payload for s in backend.seen if s.request == R.SET_VRING_ENABLE]
    assert enables == [VringState(0, 1), VringState(1, 1)]
    finish(backend, fe)
    assert backend.requests()[-3:] == [R.SET_STATUS, R.GET_VRING_BASE, R.GET_VRING_BASE]
    assert backend.status == 0
    assert fe.last_bases == {0: 7, 1: 7}


def test_memory_table_and_ring_addresses(backend: FakeBackend) -> None:
    fe = run(backend)
    (table,) = [s for s in backend.seen if s.request == R.SET_MEM_TABLE]
    (region,) = table.payload.regions
    assert table.nfds == 1
    assert (region.gpa, region.size, region.uva, region.mmap_offset) == (0, 8 << 20, fe.uva, 0)
    # the backend's mapping sees what the frontend writes
    fe.mem[4096:4101] = b"hello"
    assert backend.mem is not None and backend.mem[4096:4101] == b"hello"
    for i, q in enumerate(fe.queues):
        a = backend.addrs[i]
        assert (a.desc, a.avail, a.used) == (
            fe.uva + q.desc_gpa,
            fe.uva + q.avail_gpa,
            fe.uva + q.used_gpa,
        )
    nums = [s.payload for s in backend.seen if s.request == R.SET_VRING_NUM]
    assert nums == [VringState(0, 64), VringState(1, 64)]
    finish(backend, fe)


def test_without_reply_ack_no_need_reply_and_a_barrier(backend: FakeBackend) -> None:
    backend.protocol_features = vf.mask([PF.MQ])
    fe = run(backend)
    assert not fe.reply_ack
    assert not any(s.need_reply for s in backend.seen)
    assert backend.requests()[-1] == R.GET_FEATURES  # the barrier
    assert R.SET_STATUS not in backend.requests()
    finish(backend, fe)


def test_without_protocol_features(backend: FakeBackend) -> None:
    backend.features = vf.mask([vf.VIRTIO_F_VERSION_1])
    fe = run(backend)
    reqs = backend.requests()
    assert R.GET_PROTOCOL_FEATURES not in reqs and R.SET_VRING_ENABLE not in reqs
    assert fe.protocol_features == 0
    assert reqs[:3] == [R.GET_FEATURES, R.SET_OWNER, R.SET_FEATURES]
    finish(backend, fe)


def test_dpdk_style_order(backend: FakeBackend) -> None:
    fe = run(backend, style="dpdk")
    reqs = backend.requests()
    assert reqs[0] == R.SET_OWNER
    i = reqs.index(R.SET_MEM_TABLE)
    assert reqs[i + 1 : i + 3] == [R.SET_VRING_CALL, R.SET_VRING_CALL]
    assert reqs[i + 3 : i + 7] == [
        R.SET_VRING_NUM,
        R.SET_VRING_BASE,
        R.SET_VRING_ADDR,
        R.SET_VRING_KICK,
    ]
    assert R.GET_STATUS not in reqs and backend.status == 0xF
    finish(backend, fe)


def test_refused_ack_fails_connect_and_releases_everything(backend: FakeBackend) -> None:
    backend.refuse = {R.SET_VRING_ADDR}
    backend.start()
    fe = VhostUserFrontend(backend.path, mem_size=1 << 20, queue_size=64)
    with pytest.raises(VhostError, match="backend refused SET_VRING_ADDR: REPLY_ACK status 1"):
        fe.connect(timeout=5)
    assert fe.sock is None and fe.mem_fd == -1 and fe.kick_fds == []
    assert backend.done.wait(5)


def test_reply_with_need_reply_echoed_is_rejected(backend: FakeBackend) -> None:
    backend.bad_reply_flags = 0xD
    backend.start()
    fe = VhostUserFrontend(backend.path, mem_size=1 << 20)
    with pytest.raises(RemoteProtocolError, match=r"exactly 0x5 \(VERSION\|REPLY\), got 0xd"):
        fe.connect(timeout=5)


def test_too_few_queue_pairs(backend: FakeBackend) -> None:
    backend.start()
    fe = VhostUserFrontend(backend.path, mem_size=1 << 20, queues=4)
    with pytest.raises(VhostError, match="supports 1 queue pairs, 2 wanted"):
        fe.connect(timeout=5)


def test_connect_timeout_without_socket(sockpath: str) -> None:
    fe = VhostUserFrontend(sockpath, mem_size=1 << 20)
    with pytest.raises(VhostError, match="could not connect"):
        fe.connect(timeout=0.1)


# --------------------------------------------------------------------------- a Python device


class PyDevice:
    """Device side of one split ring over the backend's own mapping (no C core)."""

    def __init__(self, b: FakeBackend, index: int, size: int, event_idx: bool) -> None:
        assert b.mem is not None
        self.m = b.mem
        a = b.addrs[index]
        self.desc, self.avail, self.used = (x - b.mem_uva for x in (a.desc, a.avail, a.used))
        self.size = size
        self.last_avail = 0
        self.used_idx = 0
        self.call_fd = b.call[index]
        self.kick_fd = b.kick[index]
        self.event_idx = event_idx

    def u16(self, off: int) -> int:
        return int(struct.unpack_from("<H", self.m, off)[0])

    def pop(self) -> tuple[int, list[tuple[int, int, int]]] | None:
        if self.u16(self.avail + 2) == self.last_avail:
            return None
        head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.size))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain, i = [], head
        while True:
            addr, ln, flags, nxt = struct.unpack_from("<QIHH", self.m, self.desc + 16 * i)
            chain.append((addr, ln, flags))
            if not flags & 1:
                return head, chain
            i = nxt

    def push(self, head: int, length: int) -> None:
        slot = self.used_idx % self.size
        struct.pack_into("<II", self.m, self.used + 4 + 8 * slot, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> None:
        struct.pack_into("<H", self.m, self.used + 2, self.used_idx)
        os.eventfd_write(self.call_fd, 1)


def net_setup(
    b: FakeBackend, buf_size: int = 256, **kw: Any
) -> tuple[VhostUserFrontend, NetDriver, PyDevice, PyDevice]:
    fe = run(b, **kw)
    drv = NetDriver(fe, buf_size=buf_size)
    ev = fe.has_feature(vf.VIRTIO_RING_F_EVENT_IDX)
    return fe, drv, PyDevice(b, 0, 64, ev), PyDevice(b, 1, 64, ev)


def test_send_posts_frames_with_a_zero_header_and_kicks(backend: FakeBackend) -> None:
    fe, drv, _rx, tx = net_setup(backend)
    frames = [bytes([i]) * (60 + i) for i in range(5)] + [b"\xab" * 600]  # last one spans buffers
    assert drv.send(frames) == 6
    assert os.eventfd_read(tx.kick_fd) >= 1
    got = []
    while (c := tx.pop()) is not None:
        head, chain = c
        assert all(not fl & 2 for _a, _l, fl in chain)  # device-readable
        data = b"".join(bytes(tx.m[a : a + ln]) for a, ln, _fl in chain)
        assert data[:12] == bytes(12)
        got.append(data[12:])
        tx.push(head, 0)
    assert got == frames
    tx.publish()
    assert drv.reap_tx() == 6
    finish(backend, fe)


def test_rx_is_stocked_and_recv_strips_the_header(backend: FakeBackend) -> None:
    fe, drv, rx, _tx = net_setup(backend)
    assert drv.recv(timeout=0.05) == []
    bufs = []
    while (c := rx.pop()) is not None:
        bufs.append(c)
    assert len(bufs) == 64 and all(chain[0][2] & 2 for _h, chain in bufs)  # device-writable
    frame = bytes(range(100))
    head, ((addr, _ln, _fl),) = bufs[0]
    rx.m[addr : addr + 12 + len(frame)] = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1) + frame
    rx.push(head, 12 + len(frame))
    rx.publish()
    assert drv.recv(timeout=1) == [frame]
    finish(backend, fe)


def test_recv_merges_mrg_rxbuf_buffers(backend: FakeBackend) -> None:
    fe, drv, rx, _tx = net_setup(backend)
    assert drv.mrg_rxbuf
    bufs = [rx.pop() for _ in range(3)]
    frame = os.urandom(256 + 256 + 100 - 12)
    parts = [frame[:244], frame[244:500], frame[500:]]
    for k, (c, part) in enumerate(zip(bufs, parts, strict=True)):
        assert c is not None
        head, ((addr, _ln, _fl),) = c
        data = (struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 3) if k == 0 else b"") + part
        rx.m[addr : addr + len(data)] = data
        rx.push(head, len(data))
    rx.publish()
    assert drv.recv(timeout=1) == [frame]
    finish(backend, fe)


def test_recv_waits_for_the_interrupt(backend: FakeBackend) -> None:
    fe, drv, rx, _tx = net_setup(backend)
    c = rx.pop()
    assert c is not None
    head, ((addr, _ln, _fl),) = c
    data = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1) + b"late frame"

    def later() -> None:
        rx.m[addr : addr + len(data)] = data
        rx.push(head, len(data))
        rx.publish()

    t = threading.Timer(0.1, later)
    t.start()
    assert drv.recv(timeout=2) == [b"late frame"]
    t.join()
    finish(backend, fe)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_close_releases_every_fd(backend: FakeBackend) -> None:
    before = open_fds()
    fe, drv, rx, tx = net_setup(backend)
    assert drv.send([b"x" * 60]) == 1
    del drv, rx, tx
    finish(backend, fe)
    backend.close()
    leaked = open_fds() - before
    assert not leaked, f"fds left open: {leaked}"


def test_legacy_header_without_version_1(backend: FakeBackend) -> None:
    backend.features = vf.mask([vf.VHOST_USER_F_PROTOCOL_FEATURES])
    fe, drv, _rx, tx = net_setup(backend)
    assert drv.hdr_len == 10 and not drv.mrg_rxbuf
    assert drv.send([b"abc" * 20]) == 1
    c = tx.pop()
    assert c is not None
    ((addr, ln, _fl),) = c[1]
    assert bytes(tx.m[addr : addr + ln]) == bytes(10) + b"abc" * 20
    finish(backend, fe)
