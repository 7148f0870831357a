"""Poll rounds that go on while nothing needs the worker's Python side (vx_round_until,
Round.run_until, poll_round_max_us) and the wait's readiness probe (vx_wait_ready)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_core_env import Env
from test_round import BIG, _consumed_all, _send, _sinks
from test_sched import SHARED, RingWork, wait_until

from iosched.worker import Worker
from virtio import net
from virtio.errors import ConfigError
from virtio.kick import Wait

MS = 1_000_000


@pytest.fixture
def env():
    e = Env(size=16 << 20)
    yield e
    e.close()


@pytest.fixture
def wait():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    w = Wait(fd)
    yield w, fd
    w.close()
    os.close(fd)


def _timed(fn) -> tuple[int, int]:
    t0 = net.now_ns()
    r = fn()
    return r, net.now_ns() - t0


def test_round_until_goes_on_to_max_while_nothing_waits(env, wait):
    rings = _sinks(env, 2)
    rnd = net.Round([op for _, _, op in rings])
    w, _ = wait
    passes, took = _timed(lambda: rnd.run_until(1 << 30, MS // 10, 5 * MS, 0, w))
    assert took >= 5 * MS  # 50 checks found nothing to hand back
    assert passes > 1
    assert all(op.results()[0] == passes for _, _, op in rings)


def test_round_until_ends_at_a_check_when_the_wait_is_ready(env, wait):
    rings = _sinks(env, 2)
    rnd = net.Round([op for _, _, op in rings])
    w, fd = wait
    assert not w.ready()
    os.eventfd_write(fd, 1)  # a command waiting
    assert w.ready()
    _, took = _timed(lambda: rnd.run_until(1 << 30, MS // 10, 2000 * MS, 0, w))
    assert MS // 10 <= took < 1000 * MS
    assert w.ready()  # looked at, not consumed


def test_round_until_ends_when_an_op_is_idle_for_its_idle_exit(env):
    rings = _sinks(env, 2)
    rnd = net.Round([op for _, _, op in rings])
    rnd.set_idle_exit(1, 2 * MS)
    _, took = _timed(lambda: rnd.run_until(1 << 30, MS // 10, 2000 * MS))
    assert 2 * MS <= took < 1000 * MS
    with pytest.raises(ConfigError):
        rnd.set_idle_exit(0, -1)
    with pytest.raises(ConfigError):
        rnd.run_until(1, -1, 1)


def test_round_until_busy_op_does_not_count_as_idle(env):
    rings = _sinks(env, 2, size=256)
    drv, tx, op = rings[0]
    rnd = net.Round([o for _, _, o in rings])
    rnd.set_idle_exit(0, 1)  # the busy ring: idle the moment it finds nothing
    _send(env, drv, 200)
    op.set_budget(1, BIG)  # one packet a pass: busy for 200 passes
    passes = rnd.run_until(150, 1, 2000 * MS)
    assert passes == 150  # it found work at every check: never idle
    assert tx.stats()["packets"] == 150


def test_round_until_without_check_is_vx_round(env):
    rings = _sinks(env, 2)
    rnd = net.Round([op for _, _, op in rings])
    _, took = _timed(lambda: rnd.run_until(1 << 30, 2 * MS, 2 * MS))
    assert took >= 2 * MS


def test_wait_ready_sees_a_due_deadline_slot(wait):
    w, _ = wait
    assert not w.ready()
    w.set_deadline(0, net.now_ns() + 1000 * MS)
    assert not w.ready()
    w.set_deadline(0, net.now_ns())
    assert w.ready()


def test_busy_rounds_return_to_python_once_per_poll_round_max_not_per_poll_round(env):
    """With every polled queue busy, a worker left the C round every poll_round_us (50 us) to
    run its per-round Python: at 32 queues as long as the round itself."""
    works = [RingWork(env, f"d{i}.tx0", c_op=True) for i in range(3)]
    w = Worker("r", settings=SHARED.with_(poll_stop_idle_us=60_000_000, poll_round_us=50,
                                          poll_round_max_us=20_000), policy="elvis")
    stop = threading.Event()

    def driver() -> None:
        while not stop.is_set():
            for wk in works:
                wk.add(7)
            time.sleep(0)

    try:
        for wk in works:
            w.attach(wk).result(2)
        t = threading.Thread(target=driver, daemon=True)
        t.start()
        assert wait_until(lambda: w.stats.polling == 3 and w.stats.rounds > 0)
        r0, t0 = w.stats.rounds, time.monotonic()
        time.sleep(0.5)
        rounds, elapsed = w.stats.rounds - r0, time.monotonic() - t0
        # a command is still answered at once (the round looks at the wait every 50 us)
        assert w.submit(lambda: 7).result(1) == 7
        stop.set()
        t.join(5)
        assert _consumed_all(works)
        # rounds ending at poll_round_us: ~1,700 in 0.5 s on a loaded 2-core machine (10,000
        # at most); at poll_round_max_us ~25 (a command or a kick ends one early)
        assert rounds < elapsed / 2e-3, (rounds, elapsed)
    finally:
        stop.set()
        w.stop()
        for wk in works:
            wk.close()


def test_empty_sink_ring_in_a_round_counts_like_a_batch_that_found_nothing(env):
    rings = _sinks(env, 2)
    drv, tx, op = rings[0]
    rnd = net.Round([o for _, _, o in rings])
    assert rnd.run(6, 10**12) == 6
    assert op.results()[:4] == (6, 0, 0, 0)
    assert tx.stats()["ring_empty"] == 6  # as tx_turn_begin counts it
    _send(env, drv, 3)  # entries there: the batch runs
    rnd.run(2, 10**12)
    assert op.results()[:4] == (2, 1, 0, 3)
    assert tx.stats()["ring_empty"] == 7


def test_broken_empty_ring_still_breaks_the_round(env):
    rings = _sinks(env, 2)
    drv, tx, _ = rings[1]
    drv.write_desc(0, 0x10, 64, 0, 0)  # outside guest memory
    drv.push_avail(0)
    drv.publish()
    rnd = net.Round([o for _, _, o in rings])
    with pytest.raises(net.RoundBroken):
        rnd.run(1, 10**12)
    assert tx.broken
    drv.write_avail_idx(0)  # the driver takes the entry back: avail->idx == last_avail_idx
    # broken and empty: the round still reports it (the empty-ring shortcut defers to the op)
    with pytest.raises(net.RoundBroken) as info:
        rnd.run(1, 10**12)
    assert info.value.index == 1
