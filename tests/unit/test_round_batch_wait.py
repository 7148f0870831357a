"""Batch waiting in C poll rounds (vx_round.c): a ring whose batches carry a stream is visited
less often, so that its batches grow; a ping-pong or light ring is visited at every pass.

The spacing is read back with Round.batch_waits(); its rule is exact (double plus 1 us, halve,
reset), so the assertions are on values, never on elapsed time.
"""

from __future__ import annotations

import threading

import pytest
from test_core_env import Env
from test_round import BIG, FOREVER, _consumed_all, _sinks
from test_round import _send as _send_fresh
from test_sched import SHARED, RingWork, wait_until

from iosched.policy import SchedSettings
from iosched.worker import Worker
from virtio import net
from virtio.errors import ConfigError

STEP = 1000  # VX_BATCH_WAIT_STEP_NS
FLOOR = 8  # VX_BATCH_WAIT_FLOOR


@pytest.fixture
def env():
    e = Env(size=16 << 20)
    yield e
    e.close()


def _send(env: Env, drv, count: int) -> None:
    drv.get_used()  # descriptors the device completed are free again
    _send_fresh(env, drv, count)


def _visit(rnd: net.Round, op: net.Op, *, limit: int = 10**6) -> int:
    """Run single passes until `op` gets its next batch; returns the passes that skipped it."""
    for skipped in range(limit):
        rnd.run(1, FOREVER)
        if op.results()[0]:
            return skipped
    raise AssertionError("the op was never visited")


def _waiting_ring(env: Env, target: int = 128, max_ns: int = 10**9, size: int = 256):
    """One sink ring alone in a round, with batch waiting set."""
    (drv, tx, op), = _sinks(env, 1, size=size)
    rnd = net.Round([op])
    rnd.set_batch_wait(0, target, max_ns)
    return drv, tx, op, rnd


def test_a_streaming_ring_waits_longer_until_its_batches_reach_the_target(env):
    drv, tx, op, rnd = _waiting_ring(env)
    expect = 0
    for _ in range(4):
        _send(env, drv, 32)  # one testpmd burst: under half the target
        _visit(rnd, op)
        expect = expect * 2 + STEP
        assert rnd.batch_waits() == [expect]
    assert expect == 15 * STEP
    _send(env, drv, 129)  # past the target: the wait halves
    _visit(rnd, op)
    assert rnd.batch_waits() == [expect // 2]
    _send(env, drv, 100)  # between half the target and the target: kept
    _visit(rnd, op)
    assert rnd.batch_waits() == [expect // 2]
    assert tx.stats()["packets"] == 4 * 32 + 129 + 100


def test_a_wait_that_found_nothing_grows_and_a_small_batch_ends_it(env):
    drv, _, op, rnd = _waiting_ring(env)
    _send(env, drv, 32)
    _visit(rnd, op)
    assert rnd.batch_waits() == [STEP]
    _visit(rnd, op)  # empty: the driver's gap was longer than the wait
    assert rnd.batch_waits() == [3 * STEP]
    _send(env, drv, FLOOR - 1)  # a ping-pong's batch: visited at every pass again
    _visit(rnd, op)
    assert rnd.batch_waits() == [0]
    assert rnd.run(50, FOREVER) == 50
    assert op.results()[0] == 50  # empty rings at wait 0 stay at every pass
    assert rnd.batch_waits() == [0]


def test_ping_pong_is_visited_at_every_pass(env):
    drv, tx, op, rnd = _waiting_ring(env)
    for i in range(20):
        _send(env, drv, 1)
        assert rnd.run(1, FOREVER) == 1
        assert op.results()[:4] == (1, 1, 0, 1)
        assert rnd.batch_waits() == [0]
    assert tx.stats()["packets"] == 20


def test_the_wait_never_exceeds_its_maximum(env):
    drv, _, op, rnd = _waiting_ring(env, max_ns=5 * STEP)
    waits = []
    for _ in range(6):
        _send(env, drv, 32)
        _visit(rnd, op)
        waits.append(rnd.batch_waits()[0])
    assert waits == [STEP, 3 * STEP, 5 * STEP, 5 * STEP, 5 * STEP, 5 * STEP]


def test_target_capped_at_half_the_ring_and_at_the_budget(env):
    # ring of 32: the target 128 becomes 16; a batch under the floor, then one of 8 (at the
    # floor, but not under half of 16), leave the wait at 0
    drv, _, op, rnd = _waiting_ring(env, size=32)
    _send(env, drv, 6)
    _visit(rnd, op)
    assert rnd.batch_waits() == [0]
    _send(env, drv, 8)
    _visit(rnd, op)
    assert rnd.batch_waits() == [0]
    # a budget of 8 packets caps the target under twice the floor: waiting is off
    (drv2, _, op2), = _sinks(env, 1)
    op2.set_budget(8, BIG)
    rnd2 = net.Round([op2])
    rnd2.set_batch_wait(0, 128, 10**9)
    _send(env, drv2, 32)
    _visit(rnd2, op2)
    assert rnd2.batch_waits() == [0]


def test_guest_rx_stuck_at_a_third_of_its_rate_a_filled_ring_is_never_waited(env):
    # the bug: a source port's RX ring was batch-waited like a TX ring; a wait grown while the
    # stream started stayed for the whole run (guest RX 64 B at ~20 Mpps instead of ~45)
    rdrv, rx = env.pair(256, index=0)
    op = net.Op.rx_fill(rx, b"f" * 60)
    rnd = net.Round([op])
    rnd.set_batch_wait(0, 128, 10**9)
    for n in (32, 32, 100, 32):  # batches that grow a TX ring's wait
        for _ in range(n):
            rdrv.add([], [(env.alloc(256), 256)])
        rdrv.publish()
        assert _visit(rnd, op) == 0  # visited at the very next pass
        assert rnd.batch_waits() == [0]
        rdrv.get_used()
        rnd.run(1, FOREVER)  # an empty visit, which grows a waiting TX ring's wait
        assert rnd.batch_waits() == [0]


def test_target_zero_is_off_and_clears_the_wait(env):
    drv, _, op, rnd = _waiting_ring(env)
    _send(env, drv, 32)
    _visit(rnd, op)
    assert rnd.batch_waits() == [STEP]
    rnd.set_batch_wait(0, 0, 10**9)
    assert rnd.batch_waits() == [0]
    _send(env, drv, 32)
    assert rnd.run(5, FOREVER) == 5
    assert op.results()[:4] == (5, 1, 0, 32)
    with pytest.raises(ConfigError):
        rnd.set_batch_wait(0, -1, 0)


def test_a_skipped_ring_loses_nothing(env):
    """Waiting only delays a visit: everything sent is consumed once the wait is over."""
    rings = _sinks(env, 3)
    rnd = net.Round([op for _, _, op in rings])
    for i in range(3):
        rnd.set_batch_wait(i, 128, 50 * STEP)
    sent = 0
    for _ in range(30):
        for drv, _, _ in rings:
            _send(env, drv, 40)
        sent += 40
        rnd.run(200, FOREVER)
        while any(tx.stats()["packets"] < sent for _, tx, _ in rings):
            rnd.run(1000, FOREVER)
    assert [tx.stats()["packets"] for _, tx, _ in rings] == [sent] * 3


def test_defaults_and_ranges_of_the_parameters():
    s = SchedSettings.from_registry()
    assert (s.poll_batch_target, s.poll_batch_wait_max_us) == (128, 20)
    assert s.poll_batch_wait_max_ns == 20_000


def test_worker_with_batch_waiting_consumes_everything_and_kicks_come_back(env):
    """The parameters reach the worker's C round; streams on two rings are all consumed, and
    once the driver stops the queues leave polling and a kick is served (nothing lost)."""
    works = [RingWork(env, f"d{i}.tx0", c_op=True, size=256) for i in range(2)]
    settings_ = SHARED.with_(poll_stop_idle_us=2000, poll_batch_target=128,
                             poll_batch_wait_max_us=200)
    w = Worker("r", settings=settings_, policy="elvis")
    stop = threading.Event()

    def driver() -> None:
        while not stop.is_set():
            for wk in works:
                wk.add(32)  # one testpmd burst, as far as the ring has room

    try:
        for wk in works:
            w.attach(wk).result(2)
        t = threading.Thread(target=driver, daemon=True)
        t.start()
        assert wait_until(lambda: w.stats.rounds >= 50 and sum(wk.added for wk in works) > 20000)
        stop.set()
        t.join(5)
        assert _consumed_all(works)
        assert all(wk.stats.kicks_avoided > 0 for wk in works)
        assert wait_until(lambda: all(not wk.stats.polling for wk in works))
        for wk in works:
            assert wk.publish_wants_kick(1)
            wk.add(1)
        assert _consumed_all(works)
    finally:
        stop.set()
        w.stop()
        for wk in works:
            wk.close()
