"""Bounded busy-poll inside one C batch (spin_ns), and the QueueWorkItem counters seam.

No timed assertions: time bounds here only keep a broken build from hanging the suite.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from test_core_env import Env

from vhostx.net import QueueWorkItem
from virtio import net
from virtio.errors import GuestError

HDR = 12
BIG = 1 << 40
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
BCAST = b"\xff" * 6


_CALLS: list[tuple[threading.Thread, object]] = []


@pytest.fixture
def env():
    e = Env(size=8 << 20)
    yield e
    # A failed test may leave a call spinning in C: break its ring (a bogus avail->idx) so that
    # it returns before the guest memory is unmapped under it.
    while _CALLS:
        call, drv = _CALLS.pop()
        if call.is_alive():
            drv.write_avail_idx((drv.avail_idx + 0x8000) & 0xFFFF)  # type: ignore[attr-defined]
            call.join(10)
    e.close()


def _send(env: Env, drv, frames: list[bytes]) -> None:
    for f in frames:
        g = env.alloc(HDR + len(f), 8)
        env.write(g, bytes(HDR) + f)
        drv.add([(g, HDR + len(f))])
    drv.publish()


# ---- QueueWorkItem: device and counters() (internal-api.md, "QueueWork") ---------------------


def test_work_item_device_and_counters(env):
    drv, tx = env.pair(64, index=1)
    work = QueueWorkItem("net7.tx0", tx, lambda p, b: net.tx_sink(tx, p, b), kick_fd=-1)
    assert work.device == "net7"
    assert QueueWorkItem("x.tx0", tx, work.run, kick_fd=-1, device="dev").device == "dev"
    c0 = work.counters()
    for key in (
        "packets",
        "bytes",
        "interrupts",
        "interrupts_suppressed",
        "ring_full",
        "ring_empty",
        "batches",
    ):
        assert c0[key] == 0, key
    assert work.run(64, BIG) == 0
    assert work.counters()["ring_empty"] == 1
    _send(env, drv, [b"a" * 60, b"b" * 100])
    assert work.run(64, BIG) == 2
    c = work.counters()
    assert (c["packets"], c["bytes"], c["batches"]) == (2, 160, 1)


# ---- spin_ns: the bounded busy-poll inside one C call ------------------------------------------

LONG = 30 * 10**9  # a spin window no correct test run ever reaches: the calls end on their budget
WAIT_S = 20.0  # generous bound so that a broken build fails instead of hanging


def _wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.0005)


class Call(threading.Thread):
    """One C call in a thread (cffi releases the GIL): result or exception kept. `drv` is the
    driver side of the ring the call may spin on (the fixture uses it to end a stuck call)."""

    def __init__(self, fn, drv) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: int | None = None
        self.error: BaseException | None = None
        _CALLS.append((self, drv))

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def finish(self) -> int | None:
        self.join(WAIT_S + 5)
        assert not self.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def _spin_counters(q) -> tuple[int, int, int]:
    s = q.stats()
    return s["spins"], s["spin_found"], s["spin_ns"]


def test_spin_zero_returns_at_once_and_never_spins(env):
    drv, tx = env.pair(64, index=1)
    assert net.tx_sink(tx, 64, BIG, spin_ns=0) == 0
    _send(env, drv, [b"a" * 60] * 3)
    assert net.tx_sink(tx, 64, BIG, spin_ns=0) == 3  # ring ran empty below the budget
    rdrv, rx = env.pair(64, index=0)
    for _ in range(2):
        rdrv.add([], [(env.alloc(256), 256)])
    rdrv.publish()
    assert net.rx_fill(rx, b"f" * 60, 64, spin_ns=0) == 2
    assert _spin_counters(tx) == (0, 0, 0) and _spin_counters(rx) == (0, 0, 0)


def test_empty_ring_at_start_never_spins(env):
    """Spinning only follows work: an idle queue costs nothing, whatever spin_ns says."""
    _drv, tx = env.pair(64, index=1)
    _rdrv, rx = env.pair(64, index=0)
    assert net.tx_sink(tx, 64, BIG, spin_ns=LONG) == 0
    assert net.rx_fill(rx, b"f" * 60, 64, spin_ns=LONG) == 0
    assert _spin_counters(tx) == (0, 0, 0) and _spin_counters(rx) == (0, 0, 0)
    assert tx.stats()["ring_empty"] == 1 and rx.stats()["ring_full"] == 1


@pytest.mark.parametrize("event_idx", [False, True])
def test_tx_spin_publishes_first_then_serves_late_buffer(env, event_idx):
    """The first part of the batch is published (used->idx) and signalled while the call is still
    waiting; a buffer posted during the wait is served by the same call."""
    call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        drv, tx = env.pair(64, index=1, event_idx=event_idx, call_fd=call_fd)
        _send(env, drv, [b"a" * 60] * 3)
        c = Call(lambda: net.tx_sink(tx, 4, BIG, spin_ns=LONG), drv)
        c.start()
        _wait_for(lambda: drv.read_used_idx() == 3, "used->idx 3 while the call spins")
        assert c.is_alive()  # still inside the call: the entries were published before the wait
        assert len(drv.get_used()) == 3
        assert os.eventfd_read(call_fd) >= 1  # and the interrupt decision was made before it
        _send(env, drv, [b"b" * 100])
        assert c.finish() == 4  # the late buffer in the same call (budget 4 ends it)
        assert drv.read_used_idx() == 4
        spins, found, _ = _spin_counters(tx)
        assert spins >= 1 and found >= 1
        assert tx.stats()["packets"] == 4 and tx.stats()["bytes"] == 280
    finally:
        os.close(call_fd)


def test_rx_spin_publishes_first_then_fills_late_buffer(env):
    call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        drv, rx = env.pair(64, index=0, call_fd=call_fd)
        bufs = {}
        for _ in range(2):
            g = env.alloc(256)
            bufs[drv.add([], [(g, 256)])] = g
        drv.publish()
        frame = bytes(range(60))
        c = Call(lambda: net.rx_fill(rx, frame, 3, spin_ns=LONG), drv)
        c.start()
        _wait_for(lambda: drv.read_used_idx() == 2, "used->idx 2 while the call spins")
        assert c.is_alive()
        used = drv.get_used()
        assert [n for _, n in used] == [HDR + 60] * 2
        assert env.read(bufs[used[0][0]] + HDR, 60) == frame  # the data is there too
        assert os.eventfd_read(call_fd) >= 1
        g = env.alloc(256)
        drv.add([], [(g, 256)])
        drv.publish()
        assert c.finish() == 3
        assert env.read(g + HDR, 60) == frame
        assert rx.stats()["ring_full"] == 0  # the wait found buffers: nothing was refused
    finally:
        os.close(call_fd)


def test_rx_spin_mrg_waits_for_enough_buffers(env):
    """MRG_RXBUF: a frame that needs more chains than posted waits for the rest in the call."""
    drv, rx = env.pair(64, index=0, mrg_rxbuf=True)
    drv.add([], [(env.alloc(512), 512)])
    drv.publish()
    frame = b"m" * 700  # 712 bytes with the header: two 512-byte chains
    drv.add([], [(env.alloc(512), 512)])
    drv.publish()
    drv.add([], [(env.alloc(512), 512)])
    drv.publish()
    c = Call(lambda: net.rx_fill(rx, frame, 2, spin_ns=LONG), drv)
    c.start()
    _wait_for(lambda: drv.read_used_idx() == 2, "the first frame published")
    assert c.is_alive()  # one chain left, not enough for the second frame: waiting
    drv.add([], [(env.alloc(512), 512)])
    drv.publish()
    assert c.finish() == 2
    assert drv.read_used_idx() == 4


def test_spin_budget_runs_out_and_call_returns(env):
    """With nothing more posted, the call returns after its spin budget, work published."""
    drv, tx = env.pair(64, index=1)
    _send(env, drv, [b"a" * 60])
    assert net.tx_sink(tx, 64, BIG, spin_ns=2_000_000) == 1
    spins, found, spent = _spin_counters(tx)
    assert spins == 1 and found == 0 and spent > 0
    assert drv.read_used_idx() == 1


def test_spin_sees_hostile_avail_jump(env):
    """A bogus avail->idx written while the call spins breaks the queue like any other read."""
    drv, tx = env.pair(8, index=1)
    _send(env, drv, [b"a" * 60])
    c = Call(lambda: net.tx_sink(tx, 8, BIG, spin_ns=LONG), drv)
    c.start()
    _wait_for(lambda: drv.read_used_idx() == 1, "the first chain published")
    drv.write_avail_idx((drv.avail_idx + 100) & 0xFFFF)  # 100 > ring size 8
    with pytest.raises(GuestError):
        c.finish()
    assert tx.broken and "ahead of last_avail_idx" in tx.broken
    assert drv.read_used_idx() == 1  # published before the wait, nothing after


def test_spin_sees_hostile_descriptor(env):
    drv, tx = env.pair(8, index=1)
    _send(env, drv, [b"a" * 60])
    c = Call(lambda: net.tx_sink(tx, 8, BIG, spin_ns=LONG), drv)
    c.start()
    _wait_for(lambda: drv.read_used_idx() == 1, "the first chain published")
    head = drv.add([(env.alloc(64), 64)])
    drv.write_desc(head, 0xFFFF_FFFF_0000, 64, 0, 0)  # outside guest memory
    drv.publish()
    with pytest.raises(GuestError):
        c.finish()
    assert tx.broken and "outside guest memory" in tx.broken


def _echo_pair(env):
    rdrv, rx = env.pair(64, index=0)
    tdrv, tx = env.pair(64, index=1)
    for _ in range(8):
        rdrv.add([], [(env.alloc(2048), 2048)])
    rdrv.publish()
    return rdrv, rx, tdrv, tx


def test_echo_spin_publishes_rx_before_waiting(env):
    rdrv, rx, tdrv, tx = _echo_pair(env)
    frame = MAC_B + MAC_A + b"\x08\x00" + b"e" * 46
    _send(env, tdrv, [frame])
    c = Call(lambda: net.echo(tx, rx, 2, BIG, spin_ns=LONG), tdrv)
    c.start()
    _wait_for(
        lambda: rdrv.read_used_idx() == 1 and tdrv.read_used_idx() == 1,
        "the echoed frame and the TX completion published",
    )
    assert c.is_alive()
    _send(env, tdrv, [frame])
    assert c.finish() == 2
    assert rdrv.read_used_idx() == 2 and tdrv.read_used_idx() == 2


def test_fwd_spin_does_not_hold_the_rx_lock(env):
    """While one fwd call waits on its empty TX ring, another sender can deliver into the same
    RX queue (the lock is dropped around the wait)."""
    rdrv, rx, tdrv, tx = _echo_pair(env)
    t2drv, tx2 = env.pair(64, index=3)
    frame = MAC_B + MAC_A + b"\x08\x00" + b"f" * 46
    _send(env, tdrv, [frame])
    c = Call(lambda: net.fwd(tx, rx, 2, BIG, spin_ns=LONG), tdrv)
    c.start()
    _wait_for(lambda: rdrv.read_used_idx() == 1, "the first frame forwarded")
    _send(env, t2drv, [frame])
    assert net.fwd(tx2, rx, 8, BIG) == 1  # would wait for the other call without the unlock
    assert c.is_alive()
    assert rdrv.read_used_idx() == 2
    _send(env, tdrv, [frame])
    assert c.finish() == 2
    assert rdrv.read_used_idx() == 3


def test_switch_spin_signals_destinations_before_waiting(env):
    sw = net.Switch()
    adrv, arx = env.pair(64, index=0)
    bdrv, brx = env.pair(64, index=2)
    tdrv, atx = env.pair(64, index=1)
    for d in (adrv, bdrv):
        for _ in range(4):
            d.add([], [(env.alloc(2048), 2048)])
        d.publish()
    pa = sw.add_port([arx])
    sw.add_port([brx])
    frame = BCAST + MAC_A + b"\x08\x00" + b"s" * 46
    _send(env, tdrv, [frame])
    c = Call(lambda: sw.tx(pa, atx, 2, BIG, spin_ns=LONG), tdrv)
    c.start()
    _wait_for(lambda: bdrv.read_used_idx() == 1, "the flooded frame published at port b")
    assert c.is_alive() and adrv.read_used_idx() == 0  # no hairpin
    _send(env, tdrv, [frame])
    assert c.finish() == 2
    assert bdrv.read_used_idx() == 2


def test_rx_from_fd_spin_waits_for_buffers(env):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        b.setblocking(False)
        drv, rx = env.pair(64, index=0)
        drv.add([], [(env.alloc(2048), 2048)])
        drv.publish()
        for i in range(2):
            a.send(bytes(HDR) + bytes([i]) * 60)
        c = Call(lambda: net.rx_from_fd(rx, b.fileno(), 2, spin_ns=LONG), drv)
        c.start()
        _wait_for(lambda: drv.read_used_idx() == 1, "the first packet published")
        assert c.is_alive()
        drv.add([], [(env.alloc(2048), 2048)])
        drv.publish()
        assert c.finish() == 2
    finally:
        a.close()
        b.close()


def test_tx_to_fd_eagain_never_spins(env):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        a.setblocking(False)
        drv, tx = env.pair(64, index=1)
        _send(env, drv, [b"t" * 60] * 2)
        # fill the socket until EAGAIN
        try:
            while True:
                a.send(b"x" * 60000)
        except BlockingIOError:
            pass
        assert net.tx_to_fd(tx, a.fileno(), 8, BIG, spin_ns=LONG) == 0
        assert tx.stats()["eagain"] == 1 and tx.stats()["spins"] == 0
    finally:
        a.close()
        b.close()


# ---- the sink copies into rotating buffers ------------------------------------------------------


def test_rotating_sink_counts(env):
    """Many more packets than rotation slots (64; 2600 also wraps 2048), sizes around the slot
    length (2048) and chains split in pieces: packets, bytes, too_big, dropped count right."""
    drv, tx = env.pair(256, index=1)
    sizes = [60, 1500, 2048, 2049, 9000, 1]
    total_pkts = total_bytes = 0
    rounds = 0
    while total_pkts < 2600:
        for i, n in enumerate(sizes):
            data = bytes(HDR) + bytes([rounds & 0xFF]) * n
            parts = [data] if i % 2 else [data[:7], data[7:]]
            outs = []
            for p in parts:
                g = env.alloc(len(p), 8)
                env.write(g, p)
                outs.append((g, len(p)))
            drv.add(outs)
            total_pkts += 1
            total_bytes += n
        drv.publish()
        assert net.tx_sink(tx, 256, BIG) == len(sizes)
        drv.get_used()
        rounds += 1
        env._next = env.gpa + (1 << 20)  # reuse the buffer area (rings sit below it)
    # a header-only chain and one too big for the scratch buffer
    g = env.alloc(HDR, 8)
    drv.add([(g, HDR - 2)])
    big = env.alloc(HDR + 200_000, 8)
    drv.add([(big, HDR + 200_000)])
    drv.publish()
    assert net.tx_sink(tx, 256, BIG) == 2
    s = tx.stats()
    assert s["packets"] == total_pkts and s["bytes"] == total_bytes
    assert s["dropped"] == 1 and s["too_big"] == 1


def test_no_spin_while_other_queues_wait(env):
    """The worker clears `solo` while other queues wait: the batch then never busy-polls."""
    from vhostx.net import BusyPoll

    class Fixed:
        def __init__(self, us):
            self.us = us

        def get(self):
            return self.us

        def subscribe(self, cb):
            return lambda: None

    _drv, tx = env.pair(64, index=1)
    seen: list[int] = []

    def run(p: int, b: int, s: int) -> int:
        seen.append(s)
        return net.tx_sink(tx, p, b, spin_ns=s)

    work = QueueWorkItem("net0.tx0", tx, run, kick_fd=-1, busy_poll=BusyPoll(Fixed(7)))
    work.run(8, BIG)
    work.solo = False
    work.run(8, BIG)
    work.solo = True
    work.run(8, BIG)
    assert seen == [7000, 0, 7000]
