"""Per-queue-pair repeats on one vhost-user connection (QEMU multiqueue).

QEMU 7.2 with `-netdev vhost-user,queues=N` keeps one vhost device per queue pair on the same
socket, and each sends SET_OWNER, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_FEATURES and the whole
memory table again. Before the fix the daemon refused the second pair's first ADD_MEM_REG with
"memory regions overlap in gpa: [0x0,0xa0000) and [0x0,0xa0000)" and the guest's network never
came up. These tests drive a real NetDevice (sink port, a binding that runs nothing) through the
sans-IO protocol with real memfds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
from collections.abc import Iterator
from typing import Any

import pytest

from vhostx.config import parse_device_spec
from vhostx.net import NetDevice, SwitchRegistry
from virtio import features as vf
from virtio import vhost_user as vu
from virtio.errors import RemoteProtocolError
from virtio.memory import MemoryRegion
from virtio.vhost_user import ProtocolFeature as PF
from virtio.vhost_user import Request as R

MB = 1 << 20
LOW = vu.MemRegion(gpa=0, size=0xA0000, uva=0x7F00_0000_0000, mmap_offset=0)
HIGH = vu.MemRegion(gpa=0x100000, size=MB, uva=0x7F00_0010_0000, mmap_offset=0x100000)


class NullBinding:
    """A DeviceBinding that attaches nothing anywhere (no worker runs in these tests)."""

    def __init__(self) -> None:
        self.attached: list[Any] = []
        self.barriers = 0

    def _done(self) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        fut.set_result(None)
        return fut

    def attach(self, work: Any) -> concurrent.futures.Future[Any]:
        self.attached.append(work)
        return self._done()

    def detach(self, work: Any) -> concurrent.futures.Future[Any]:
        self.attached.remove(work)
        return self._done()

    def barrier(self) -> list[concurrent.futures.Future[Any]]:
        self.barriers += 1
        return [self._done()]


class Wire:
    """One frontend connection to a device, handled in-process, one request at a time."""

    def __init__(self, queues: int = 2) -> None:
        self.binding = NullBinding()
        cfg = parse_device_spec(f"name=mq{queues},socket=/tmp/unused.sock,queues={queues}")
        self.dev = NetDevice(cfg, self.binding, SwitchRegistry())  # type: ignore[arg-type]
        self.back = vu.BackendConnection()
        self.front = vu.FrontendConnection()
        self.loop = asyncio.new_event_loop()
        self.memfd = os.memfd_create("vx-repeat-test")
        os.ftruncate(self.memfd, 2 * MB)

    def close(self) -> None:
        self.loop.run_until_complete(self.dev.close())
        self.loop.close()
        os.close(self.memfd)

    def send(self, req: R, payload: Any = None, fds: tuple[int, ...] = (),
             need_reply: bool = False) -> Any:
        """Send one request (fds as the kernel would hand them over: fresh duplicates) and
        return the payload of its reply or ack (None when none is due)."""
        data = self.front.request(req, payload, fds, need_reply=need_reply)
        (msg,) = self.back.feed(data, list(fds))
        reply = self.loop.run_until_complete(self.dev.handle(self.back, msg))
        if not reply:
            return None
        (answer,) = self.front.feed(reply)
        return answer.payload

    def mem_fd(self) -> int:
        return os.dup(self.memfd)

    def negotiate(self, need_reply: bool = True) -> int:
        """One queue pair's vhost device initialising (QEMU 7.2 vhost_user_backend_init order)."""
        offered = self.send(R.GET_FEATURES)
        pf = self.send(R.GET_PROTOCOL_FEATURES)
        assert self.send(R.SET_PROTOCOL_FEATURES, pf) is None
        assert self.send(R.GET_QUEUE_NUM) == len(self.dev.vrings) // 2
        assert self.send(R.SET_OWNER, need_reply=need_reply) in (None, 0)
        return int(offered)

    def start_pair(self, pair: int, features: int) -> None:
        """One queue pair's vhost device starting: features, memory, both rings."""
        assert self.send(R.SET_FEATURES, features) is None
        assert self.send(R.ADD_MEM_REG, vu.SingleMemRegion(LOW), (self.mem_fd(),), True) == 0
        assert self.send(R.ADD_MEM_REG, vu.SingleMemRegion(HIGH), (self.mem_fd(),), True) == 0
        for index in (2 * pair, 2 * pair + 1):
            base = HIGH.uva + index * 0x10000
            assert self.send(R.SET_VRING_NUM, vu.VringState(index, 256), need_reply=True) == 0
            assert self.send(R.SET_VRING_BASE, vu.VringState(index, 0), need_reply=True) == 0
            addr = vu.VringAddr(index, 0, desc=base, used=base + 0x2000, avail=base + 0x1000)
            assert self.send(R.SET_VRING_ADDR, addr, need_reply=True) == 0
            assert self.send(R.SET_VRING_KICK, vu.VringFile(index, nofd=True), need_reply=True) == 0
            assert self.send(R.SET_VRING_CALL, vu.VringFile(index, nofd=True), need_reply=True) == 0
            assert self.send(R.SET_VRING_ENABLE, vu.VringState(index, 1), need_reply=True) == 0


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    yield w
    w.close()


def _open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return True
    except OSError:
        return False


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mapped(host: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= host < hi:
                return True
    return False


def _features(offered: int) -> int:
    return offered & ~(1 << vf.VIRTIO_F_IN_ORDER)


# ------------------------------------------------------------------ the bug, end to end


def test_qemu_mq_second_pair_memory_table_is_not_an_overlap(wire: Wire) -> None:
    """The QEMU 7.2 queues=2 sequence: pair 1 repeats everything pair 0 said; every request is
    acked 0 and all four rings run."""
    before = _fd_count()
    offered = wire.negotiate()
    wire.negotiate()  # pair 1's vhost device: same SET_PROTOCOL_FEATURES, SET_OWNER
    feats = _features(offered)
    wire.start_pair(0, feats)
    assert len(wire.binding.attached) >= 1
    wire.start_pair(1, feats)  # refused before the fix: ADD_MEM_REG "regions overlap"
    dev = wire.dev
    assert [vr.queue is not None for vr in dev.vrings] == [True] * 4
    assert dev.memory is not None and dev.memory.copies == (2, 2)
    assert len(dev.memory.regions) == 2
    # SET_PROTOCOL_FEATURES, SET_OWNER, SET_FEATURES and two ADD_MEM_REG
    assert dev.counters.repeats == 5
    assert _fd_count() == before  # every region fd was closed (the mmaps keep the file)


# ------------------------------------------------------------------ memory table


def test_qemu_mq_add_mem_reg_repeat_is_counted_and_its_fd_closed(wire: Wire) -> None:
    wire.negotiate()
    fd1, fd2 = wire.mem_fd(), wire.mem_fd()
    assert wire.send(R.ADD_MEM_REG, vu.SingleMemRegion(LOW), (fd1,), True) == 0
    mem1 = wire.dev.memory
    assert mem1 is not None
    host = mem1.gpa_to_host(0, 1)
    assert wire.send(R.ADD_MEM_REG, vu.SingleMemRegion(LOW), (fd2,), True) == 0
    mem2 = wire.dev.memory
    assert mem2 is not None and mem2 is not mem1 and mem1.closed
    assert mem2.copies == (1 + 1,) and len(mem2.regions) == 1
    assert mem2.gpa_to_host(0, 1) == host  # the same mapping, nothing mapped again
    assert not _open(fd1) and not _open(fd2)
    assert wire.dev.counters.repeats == 1


def test_qemu_mq_rem_mem_reg_of_one_copy_leaves_the_other_mapped(wire: Wire) -> None:
    wire.negotiate()
    for _ in range(2):
        assert wire.send(R.ADD_MEM_REG, vu.SingleMemRegion(LOW), (wire.mem_fd(),), True) == 0
    assert wire.dev.memory is not None
    host = wire.dev.memory.gpa_to_host(0, 1)
    assert wire.send(R.REM_MEM_REG, vu.SingleMemRegion(LOW), (wire.mem_fd(),), True) == 0
    mem = wire.dev.memory
    assert mem is not None and mem.copies == (1,)
    assert mem.gpa_to_host(0x9FFFF, 1) == host + 0x9FFFF
    mem.view(0, 4)[:] = b"live"
    assert _mapped(host)
    assert wire.send(R.REM_MEM_REG, vu.SingleMemRegion(LOW), (wire.mem_fd(),), True) == 0
    assert wire.dev.memory is not None and wire.dev.memory.regions == ()
    assert not _mapped(host)  # the last copy took the mapping with it
    with pytest.raises(RemoteProtocolError, match="no memory region"):
        wire.send(R.REM_MEM_REG, vu.SingleMemRegion(LOW), (wire.mem_fd(),), True)


def test_qemu_mq_partial_overlap_is_still_refused(wire: Wire) -> None:
    wire.negotiate()
    assert wire.send(R.ADD_MEM_REG, vu.SingleMemRegion(LOW), (wire.mem_fd(),), True) == 0
    shifted = vu.MemRegion(gpa=0x8000, size=0xA0000, uva=LOW.uva + 0x8000, mmap_offset=0x8000)
    fd = wire.mem_fd()
    with pytest.raises(RemoteProtocolError, match=r"overlap in gpa: \[0x0,0xa0000\) and \[0x8000"):
        wire.send(R.ADD_MEM_REG, vu.SingleMemRegion(shifted), (fd,), True)
    assert not _open(fd)


def test_qemu_mq_same_layout_from_another_file_is_refused(wire: Wire) -> None:
    wire.negotiate()
    assert wire.send(R.ADD_MEM_REG, vu.SingleMemRegion(LOW), (wire.mem_fd(),), True) == 0
    other = os.memfd_create("vx-other")
    os.ftruncate(other, MB)
    with pytest.raises(RemoteProtocolError, match="from another file"):
        wire.send(R.ADD_MEM_REG, vu.SingleMemRegion(LOW), (other,), True)
    assert not _open(other)


def _table(*regions: vu.MemRegion) -> vu.MemTable:
    return vu.MemTable(tuple(regions))


def test_qemu_mq_set_mem_table_repeat_keeps_the_mappings(wire: Wire) -> None:
    wire.negotiate()
    wire.send(R.SET_MEM_TABLE, _table(LOW, HIGH), (wire.mem_fd(), wire.mem_fd()))
    mem = wire.dev.memory
    assert mem is not None
    fds = (wire.mem_fd(), wire.mem_fd())
    assert wire.send(R.SET_MEM_TABLE, _table(HIGH, LOW), fds, need_reply=True) == 0
    assert wire.dev.memory is mem and not mem.closed  # untouched: the rings' pointers stay
    assert not any(_open(fd) for fd in fds)
    assert wire.dev.counters.repeats == 1
    # a different table is a replacement, not a conflict
    assert wire.send(R.SET_MEM_TABLE, _table(LOW), (wire.mem_fd(),), need_reply=True) == 0
    assert wire.dev.memory is not mem and mem.closed
    assert wire.dev.memory is not None
    assert wire.dev.memory.regions == (MemoryRegion(LOW.gpa, LOW.size, LOW.uva, LOW.mmap_offset),)


# ------------------------------------------------------------------ negotiation


def test_qemu_mq_set_features_repeat_while_rings_run_is_accepted(wire: Wire) -> None:
    feats = _features(wire.negotiate())
    wire.start_pair(0, feats)
    running = [w.name for w in wire.binding.attached]
    assert wire.send(R.SET_FEATURES, feats) is None
    assert wire.dev.acked_features == feats
    assert [w.name for w in wire.binding.attached] == running


def test_qemu_mq_conflicting_set_features_while_rings_run_is_an_error(wire: Wire) -> None:
    feats = _features(wire.negotiate())
    wire.start_pair(0, feats)
    other = feats & ~(1 << vf.VIRTIO_NET_F_MRG_RXBUF)
    with pytest.raises(RemoteProtocolError, match=f"SET_FEATURES {other:#x} conflicts with "
                                                  f"the features {feats:#x}"):
        wire.send(R.SET_FEATURES, other)


def test_set_features_renegotiated_after_rings_stopped(wire: Wire) -> None:
    feats = _features(wire.negotiate())
    wire.start_pair(0, feats)
    for index in (0, 1):
        wire.send(R.GET_VRING_BASE, vu.VringState(index, 0))
    other = feats & ~(1 << vf.VIRTIO_NET_F_MRG_RXBUF)
    assert wire.send(R.SET_FEATURES, other) is None
    assert wire.dev.acked_features == other


def test_qemu_mq_set_protocol_features_repeat_and_conflict(wire: Wire) -> None:
    wire.negotiate()
    pf = wire.dev.acked_protocol_features
    assert wire.send(R.SET_PROTOCOL_FEATURES, pf) is None
    assert wire.dev.counters.repeats == 1
    less = pf & ~(1 << PF.STATUS)
    with pytest.raises(RemoteProtocolError, match=f"SET_PROTOCOL_FEATURES {less:#x} conflicts "
                                                  f"with {pf:#x}"):
        wire.send(R.SET_PROTOCOL_FEATURES, less)


def test_qemu_mq_set_owner_and_get_queue_num_repeat(wire: Wire) -> None:
    wire.negotiate()
    assert wire.send(R.SET_OWNER, need_reply=True) == 0
    assert wire.dev.owner and wire.dev.counters.repeats == 1
    assert wire.send(R.GET_QUEUE_NUM) == wire.send(R.GET_QUEUE_NUM) == 2
    assert wire.send(R.GET_MAX_MEM_SLOTS) == wire.send(R.GET_MAX_MEM_SLOTS)


def test_qemu_mq_set_status_repeat_and_bits_cleared_without_reset(wire: Wire) -> None:
    wire.negotiate()
    assert wire.send(R.SET_STATUS, 0x0F, need_reply=True) == 0
    assert wire.send(R.SET_STATUS, 0x0F, need_reply=True) == 0  # repeated: accepted
    assert wire.dev.counters.repeats == 1
    assert wire.send(R.SET_STATUS, 0x0B, need_reply=True) == 1  # clears DRIVER_OK: refused
    assert wire.send(R.GET_STATUS) == 0x0F
    assert wire.send(R.SET_STATUS, 0, need_reply=True) == 0  # a reset clears everything
    assert wire.send(R.GET_STATUS) == 0
    assert wire.send(R.SET_STATUS, 0x40, need_reply=True) == 0  # NEEDS_RESET is the device's
    assert wire.send(R.GET_STATUS) == 0


def test_qemu_mq_four_pairs_negotiate_on_one_connection() -> None:
    w = Wire(queues=4)
    try:
        feats = _features(w.negotiate())
        for _ in range(3):
            w.negotiate()
        for pair in range(4):
            w.start_pair(pair, feats)
        assert all(vr.queue is not None for vr in w.dev.vrings)
        assert w.dev.memory is not None and w.dev.memory.copies == (4, 4)
    finally:
        w.close()


def test_protocol_features_may_change_after_reset_device(wire: Wire) -> None:
    wire.negotiate()
    pf = wire.dev.acked_protocol_features
    assert pf & (1 << PF.RESET_DEVICE)
    assert wire.send(R.RESET_DEVICE, need_reply=True) == 0
    less = pf & ~(1 << PF.STATUS)
    assert wire.send(R.SET_PROTOCOL_FEATURES, less) is None  # a new negotiation, not a conflict
    assert wire.dev.acked_protocol_features == less
