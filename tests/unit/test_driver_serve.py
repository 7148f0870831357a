"""virtio.driver.serve (vx_drvserve.c): a driver thread's whole loop in C, against a device
written in Python over the fake backend's mapping (test_frontend): on the eventfd path a
completion is found through its call eventfd (one epoll_wait, one read), on the posted path
through the domain's request bit, and with nothing pending the posted loop sleeps only after
the sleep protocol and wakes on the wake eventfd; a bit of no pair is ignored; a hostile used
entry is a protocol error naming its queue; bad arguments are refused with the allowed range."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_driver_pairs import FRAME, deliver, tx_frames
from test_frontend import FakeBackend, PyDevice, backend, finish, net_setup, sockpath
from virtio._vx_core import lib

from virtio.driver.pairs import PairTurns
from virtio.driver.posted import PostedArea, PostedDomain
from virtio.driver.serve import PairServer, eventfd_server, posted_server
from virtio.errors import ConfigError, RemoteProtocolError

__all__ = ["backend", "sockpath"]  # the fixtures, imported for pytest


def echo_tx(tx, n: int) -> None:  # type: ignore[no-untyped-def]
    """Complete every TX chain posted so far (the device consumed them)."""
    posted = tx_frames(tx)
    for head, _f in posted:
        tx.push(head, 0)
    tx.publish()
    assert len(posted) == n


def test_eventfd_loop_turns_the_pair_its_call_eventfd_names(backend: FakeBackend) -> None:
    fe, drv, rx, tx = net_setup(backend)
    turns = PairTurns(drv, FRAME, window=4)
    turns.turn()
    echo_tx(tx, 4)
    deliver(rx, 3)
    os.eventfd_write(rx.call_fd, 1)
    s = eventfd_server(turns, [fe.call_fds[0]], max_wait_ms=5)
    try:
        assert s.run(0.05) == 3
        assert turns.received == 3 and turns.inflight(0) == 4 and turns.sent == 7
        assert s.wakeups == 1
        # one read for the one event, and epoll_waits that timed out until the deadline
        assert s.syscalls >= 2 and s.rounds == s.syscalls - 1
        assert s.run(0.02) == 0 and s.wakeups == 1  # nothing new: waits, no turn
    finally:
        s.close()
    finish(backend, fe)


@contextlib.contextmanager
def posted_loop(backend: FakeBackend, **kw: Any) -> Iterator[tuple[PyDevice, PostedDomain,
                                                                      PairServer]]:
    """A pair with its window of 2 sent and completed on TX, one posted domain holding its RX
    vring 0, and the posted loop over them (kw: PairServer's)."""
    fe, drv, rx, tx = net_setup(backend)
    turns = PairTurns(drv, FRAME, window=2)
    turns.turn()
    echo_tx(tx, 2)
    area = PostedArea(1)
    dom = PostedDomain(area, 0, [0])
    s = posted_server(turns, dom, [0], **kw)
    try:
        yield rx, dom, s
    finally:
        s.close()
        dom.close()
        area.close()
    finish(backend, fe)


def post(rx: PyDevice, dom: PostedDomain, frames: int) -> bool:
    """The backend's side of a post: frames, the request bit, full fence, control read, the
    wake only if the driver is not running (SN clear). True if it woke the driver."""
    deliver(rx, frames)
    dom.desc.pir[0] = 1
    lib.vx_fence_full()
    if int(dom.desc.control) & lib.VX_PI_SN:
        return False
    os.eventfd_write(dom.wake_fd, 1)
    return True


def test_posted_loop_takes_the_request_bit_and_sleeps_only_after_the_protocol(
        backend: FakeBackend) -> None:
    with posted_loop(backend, max_wait_ms=50) as (rx, dom, s):
        deliver(rx, 2)
        dom.desc.pir[0] = 1  # the backend posted vring 0 while the driver ran (SN set: no wake)
        dom.desc.pir[1] = 1 << 3  # vring 67: no pair of this loop's, ignored
        assert s.run(0.03) == 2 and s.turns.received == 2
        assert s.wakeups == 0 and s.sleeps >= 1  # then nothing pending: it slept, unwoken
        assert int(dom.desc.control) & lib.VX_PI_SN  # running again after each sleep
        assert s.syscalls == s.sleeps  # one poll per sleep, no read: nothing woke it
        woke = []
        t = threading.Thread(target=lambda: (time.sleep(0.01), woke.append(post(rx, dom, 1))))
        t.start()
        got = s.run(0.1)
        t.join()
        # asleep (SN clear) when the bit came: it was woken, one read; between two polls it ran
        # and took the bit without a wake
        assert got == 1 and s.wakeups == int(woke[0])


def test_posted_loop_spinning_takes_a_bit_posted_meanwhile_without_sleeping(
        backend: FakeBackend) -> None:
    with posted_loop(backend, spin_us=100_000) as (rx, dom, s):
        woke = []
        t = threading.Thread(target=lambda: (time.sleep(0.01), woke.append(post(rx, dom, 2))))
        t.start()
        got = s.run(0.05)  # the spin (100 ms) outlasts the run: it ends at the deadline
        t.join()
        assert woke == [False]  # the driver was running (SN set): no wake needed
        assert got == 2 and s.sleeps == 0 and s.syscalls == 0 and s.wakeups == 0
        with pytest.raises(ConfigError, match="posted path's"):
            eventfd_server(s.turns, [s.turns.drv.transport.call_fds[0]], spin_us=5)
        with pytest.raises(ConfigError, match=r"spin_us: allowed 0\.\.100000"):
            posted_server(s.turns, dom, [0], spin_us=100_001)


def test_loop_a_used_head_not_in_flight_is_a_protocol_error(backend: FakeBackend) -> None:
    fe, drv, rx, _tx = net_setup(backend)
    turns = PairTurns(drv, FRAME, window=2)
    rx.push(999, 12 + len(FRAME))
    rx.publish()
    os.eventfd_write(rx.call_fd, 1)
    s = eventfd_server(turns, [fe.call_fds[0]])
    try:
        with pytest.raises(RemoteProtocolError, match=r"queue 0: .*head 999"):
            s.run(0.05)
    finally:
        s.close()
    finish(backend, fe)


def test_loop_refuses_bad_arguments(backend: FakeBackend) -> None:
    fe, drv, _rx, _tx = net_setup(backend)
    turns = PairTurns(drv, FRAME, window=1)
    with pytest.raises(ConfigError, match=r"max_wait_ms: allowed 1\.\.60000"):
        PairServer(turns, max_wait_ms=0)
    with pytest.raises(ConfigError, match="one RX call eventfd per pair: 1, got 2"):
        eventfd_server(turns, [fe.call_fds[0], fe.call_fds[1]])
    area = PostedArea(1)
    dom = PostedDomain(area, 0, [0])
    try:
        with pytest.raises(ConfigError, match=r"vrings \[2\] are not in the domain's \[0\]"):
            posted_server(turns, dom, [2])
    finally:
        dom.close()
        area.close()
    with pytest.raises(OSError, match="driver loop"):
        PairServer(turns).run(0.01)  # neither path set up
    finish(backend, fe)
