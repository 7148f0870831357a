"""C poll rounds: virtio.net.Op (an operation as data) and Round (many ops in one C call).

No timed assertions: the time bounds given to rounds only keep a broken build from hanging.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_env import Env
from test_net_core import BCAST, MAC_A, MAC_B, Guest, _frame
from test_sched import POINTS, SHARED, RingWork, wait_until

from iosched.work import WorkStats
from iosched.worker import Worker
from virtio import net
from virtio.errors import ConfigError, GuestError

HDR = 12
BIG = 1 << 40
FOREVER = 10**12  # a time bound no round reaches: rounds in these tests end on max_passes


@pytest.fixture
def env():
    e = Env(size=16 << 20)
    yield e
    e.close()


def _sinks(env: Env, n: int, size: int = 256) -> list[tuple[object, object, net.Op]]:
    out = []
    for i in range(n):
        drv, tx = env.pair(size, index=1)
        out.append((drv, tx, net.Op.tx_sink(tx)))
    return out


def _send(env: Env, drv, count: int, length: int = 60) -> None:
    for _ in range(count):
        g = env.alloc(HDR + length, 8)
        env.write(g, bytes(HDR) + b"x" * length)
        drv.add([(g, HDR + length)])
    drv.publish()


def test_op_run_is_the_same_call_as_the_function(env):
    (drv, tx, op), = _sinks(env, 1)
    _send(env, drv, 5, 100)
    assert op.run(3, BIG) == 3
    assert net.tx_sink(tx, 64, BIG) == 2
    s = tx.stats()
    assert (s["packets"], s["bytes"]) == (5, 500)
    assert op.run(64, BIG) == 0


def test_round_results_are_every_ops_results_in_one_flat_list(env):
    rings = _sinks(env, 3)
    for (drv, _, op), count in zip(rings, (10, 3, 0), strict=True):
        _send(env, drv, count)
        op.set_budget(4, BIG)
    rnd = net.Round([op for _, _, op in rings])
    assert rnd.results() == [0] * 15  # before any run
    assert rnd.run(2, FOREVER) == 2
    flat = rnd.results()
    assert flat == [x for _, _, op in rings for x in op.results()]
    assert flat[:4] == [2, 2, 2, 8] and flat[5:9] == [2, 1, 0, 3] and flat[10:14] == [2, 0, 0, 0]
    assert net.Round([]).results() == []


def test_round_robin_one_batch_of_each_per_pass(env):
    rings = _sinks(env, 3)
    for (drv, _, op), count in zip(rings, (10, 3, 0), strict=True):
        _send(env, drv, count)
        op.set_budget(4, BIG)
    rnd = net.Round([op for _, _, op in rings])
    assert rnd.run(1, FOREVER) == 1
    # one pass: one batch of at most 4 packets each
    assert [op.results()[:4] for _, _, op in rings] == [(1, 1, 1, 4), (1, 1, 0, 3), (1, 0, 0, 0)]
    assert rnd.run(5, FOREVER) == 5
    # five more passes: the first ring's last 6 packets in 2 batches, then empty batches
    b, found, full, pkts, last = rings[0][2].results()
    assert (b, found, full, pkts) == (5, 2, 1, 6)
    assert last > 0
    assert rings[1][2].results()[:4] == (5, 0, 0, 0)
    assert rings[1][2].results()[4] == 0  # found nothing this round: no last-work time
    assert [tx.stats()["packets"] for _, tx, _ in rings] == [10, 3, 0]


def test_round_ends_on_time(env):
    rings = _sinks(env, 2)
    rnd = net.Round([op for _, _, op in rings])
    t0 = net.now_ns()
    passes = rnd.run(1 << 30, 2_000_000)  # 2 ms of empty passes
    assert net.now_ns() - t0 >= 2_000_000
    assert passes > 1
    assert all(op.results()[0] == passes for _, _, op in rings)


def test_coalescing_runs_each_op_at_most_once_per_period(env):
    rings = _sinks(env, 2)
    rnd = net.Round([op for _, _, op in rings])
    second = 1_000_000_000
    assert rnd.run(50, FOREVER, coalesce_ns=second) == 50
    assert [op.results()[0] for _, _, op in rings] == [1, 1]  # one batch each in 50 passes
    _send(env, rings[0][0], 3)
    rnd.run(20, FOREVER, coalesce_ns=second)  # the period carries over to the next round
    assert [op.results()[0] for _, _, op in rings] == [0, 0]
    assert rings[0][1].stats()["packets"] == 0
    rnd.run(3, FOREVER)  # no coalescing: every pass again
    assert [op.results()[0] for _, _, op in rings] == [3, 3]
    assert rings[0][1].stats()["packets"] == 3
    with pytest.raises(ConfigError):
        rnd.run(1, 1, coalesce_ns=-1)


def test_round_last_work_time_is_within_the_round(env):
    rings = _sinks(env, 2)
    _send(env, rings[1][0], 1)
    t0 = net.now_ns()
    net.Round([op for _, _, op in rings]).run(3, FOREVER)
    last = rings[1][2].results()[4]
    assert t0 <= last <= net.now_ns()


def test_broken_op_stops_the_round_at_its_index(env):
    rings = _sinks(env, 3)
    for drv, _, _ in rings:
        _send(env, drv, 2)
    bad_drv = rings[1][0]
    bad_drv.write_desc(0, 0x10, 64, 0, 0)  # outside guest memory
    bad_drv.push_avail(0)
    bad_drv.publish()
    rnd = net.Round([op for _, _, op in rings])
    with pytest.raises(net.RoundBroken) as info:
        rnd.run(10, FOREVER)
    assert info.value.index == 1
    assert isinstance(info.value.error, GuestError)
    assert "outside guest memory" in str(info.value.error)
    # the op before it ran, the one after it did not (the round stopped right there)
    assert rings[0][2].results()[3] == 2
    assert rings[2][2].results()[0] == 0
    assert rings[2][1].stats()["packets"] == 0
    assert rings[1][1].broken
    # the others are untouched and serve on in a round without the broken one
    rnd2 = net.Round([rings[0][2], rings[2][2]])
    assert rnd2.run(1, FOREVER) == 1
    assert rings[2][1].stats()["packets"] == 2


def test_round_of_every_op_kind(env):
    """Each op kind in one round does what its function does."""
    echo_g, fwd_src, fwd_dst, sw_a, sw_b = (Guest(env) for _ in range(5))
    for g in (echo_g, fwd_dst, sw_a, sw_b):
        g.post_rx(8)
    src_drv, src_rx = env.pair(64, index=0)
    src_bufs = []
    for _ in range(4):
        g = env.alloc(2048, 64)
        src_bufs.append(g)
        src_drv.add([], [(g, 2048)])
    src_drv.publish()
    sw = net.Switch()
    pa, pb = sw.add_port([sw_a.rx]), sw.add_port([sw_b.rx])
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s1.setblocking(False)
    s2.setblocking(False)
    fdrx_drv, fdrx = env.pair(64, index=0)
    g = env.alloc(2048, 64)
    fdrx_drv.add([], [(g, 2048)])
    fdrx_drv.publish()
    fdtx_drv, fdtx = env.pair(64, index=1)
    try:
        frame = _frame(MAC_B, MAC_A, 80)
        echo_g.send([frame])
        fwd_src.send([frame])
        sw_a.send([_frame(BCAST, MAC_A, 70)])
        s2.send(bytes(HDR) + frame)
        _send(env, fdtx_drv, 1, 90)
        ops = [
            net.Op.echo(echo_g.tx, echo_g.rx),
            net.Op.fwd(fwd_src.tx, fwd_dst.rx),
            net.Op.switch_tx(sw, pa, sw_a.tx),
            net.Op.rx_fill(src_rx, frame),
            net.Op.rx_from_fd(fdrx, s1.fileno()),
            net.Op.tx_to_fd(fdtx, s1.fileno()),
        ]
        rnd = net.Round(ops)
        assert rnd.run(2, FOREVER) == 2
        assert [op.results()[3] for op in ops] == [1, 1, 1, 4, 1, 1]
        assert echo_g.recv() == [frame[6:12] + frame[0:6] + frame[12:]]
        assert fwd_dst.recv() == [frame]
        assert len(sw_b.recv()) == 1
        assert [n for _, n in src_drv.get_used()] == [HDR + len(frame)] * 4
        assert [n for _, n in fdrx_drv.get_used()] == [HDR + len(frame)]
        assert s2.recv(4096) == bytes(HDR) + b"x" * 90
        assert sw.stats()["flooded"] == 1
        del pb
    finally:
        s1.close()
        s2.close()


def test_switch_op_needs_an_attached_port(env):
    g = Guest(env)
    with pytest.raises(ConfigError, match="not attached"):
        net.Op.switch_tx(net.Switch(), 3, g.tx)


def test_bad_arguments_are_refused(env):
    (_, _, op), = _sinks(env, 1)
    with pytest.raises(ConfigError):
        op.set_budget(-1, 10)
    with pytest.raises(ConfigError):
        net.Round([op]).run(-1, 10)
    assert net.Round([]).run(5, 10) == 0


def test_unknown_kind_is_reported_not_run(env):
    (_, tx, op), = _sinks(env, 1)
    with pytest.raises(ConfigError, match="unknown operation kind"):
        net.Op(99, "bogus", tx)
    op.c_op.kind = 99  # only a bug could do this: the C side still refuses to run it
    with pytest.raises(net.RoundBroken, match="unknown operation kind"):
        net.Round([op]).run(1, FOREVER)
    assert not tx.broken


# ---- the worker's C poll rounds (poll_round_us) ------------------------------------------------


def _consumed_all(works: list[RingWork], timeout: float = 10.0) -> bool:
    return wait_until(lambda: all(w.consumed() == w.added for w in works), timeout)


def test_worker_serves_its_polled_queues_in_c_rounds(env):
    works = [RingWork(env, f"d{i}.tx0", c_op=True) for i in range(4)]
    w = Worker("r", settings=SHARED.with_(poll_stop_idle_us=60_000_000), policy="elvis")
    stop = threading.Event()

    def driver() -> None:
        while not stop.is_set():
            for wk in works:
                wk.add(7)

    try:
        for wk in works:
            w.attach(wk).result(2)
        t = threading.Thread(target=driver, daemon=True)
        t.start()
        assert wait_until(lambda: w.stats.rounds >= 50 and sum(wk.added for wk in works) > 5000)
        stop.set()
        t.join(5)
        assert _consumed_all(works)
        assert w.stats.polling == 4
        for wk in works:
            assert wk.stats.kicks_avoided > 0
            assert wk.stats.polling
            # kicks stay suppressed while polled, in rounds as well
            assert not wk.publish_wants_kick(1)
        assert _consumed_all(works)
        assert all(wk.overlap == 0 for wk in works)
        # time inside the C rounds is counted, and is part of the worker's time
        st = w.stats
        assert 0 < st.round_ns <= st.busy_ns + st.idle_ns
    finally:
        stop.set()
        w.stop()
        for wk in works:
            wk.close()


def test_poll_round_us_zero_serves_queue_by_queue(env):
    works = [RingWork(env, f"d{i}.tx0", c_op=True) for i in range(3)]
    w = Worker("r", settings=SHARED.with_(poll_stop_idle_us=60_000_000, poll_round_us=0),
               policy="elvis")
    try:
        for wk in works:
            w.attach(wk).result(2)
        for _ in range(20):
            for wk in works:
                wk.add(3)
            assert _consumed_all(works)
        assert w.stats.polling == 3
        assert w.stats.rounds == 0
        # switched on live: the next ticks use rounds
        w.update(SHARED.with_(poll_stop_idle_us=60_000_000, poll_round_us=50)).result(2)
        assert wait_until(lambda: w.stats.rounds > 0)
        for wk in works:
            wk.add(3)
        assert _consumed_all(works)
    finally:
        w.stop()
        for wk in works:
            wk.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_lost_kick_when_a_buffer_lands_as_a_round_stops_polling(env, event_idx):
    """Two queues polled in C rounds; poll_stop_idle=0 so a queue leaves the poll list after the
    first round in which it found nothing. Right before its kicks come back on, the driver
    publishes a buffer (it sees kicks suppressed: no kick). Only the re-check finds it."""
    a = RingWork(env, "a.tx0", c_op=True, event_idx=event_idx)
    b = RingWork(env, "b.tx0", c_op=True, poll_only=True)  # keeps a round going
    seen: list[bool] = []

    def hook(point: str) -> None:
        if point == "notify1" and a.stats.poll_stops >= 1 and not seen:
            seen.append(a.publish_wants_kick(1))

    w = Worker("r", settings=SHARED.with_(poll_start_rate=1, poll_stop_idle_us=0), policy="elvis")
    try:
        w.attach(b).result(2)
        w.attach(a).result(2)
        assert wait_until(lambda: a.stats.notify_on >= 1)
        a.hook = hook
        a.add(5)
        assert wait_until(lambda: bool(seen))
        assert seen == [False], "the buffer must land while kicks are suppressed (no kick)"
        assert wait_until(lambda: a.consumed() == a.added == 6), (a.consumed(), a.added)
        assert w.stats.rounds > 0
        assert wait_until(lambda: not a.stats.polling)
        assert a.publish_wants_kick(1), "kicks must be enabled again once the queue is idle"
        assert wait_until(lambda: a.consumed() == 7)
    finally:
        a.hook = None
        w.stop()
        a.close()
        b.close()


ROUND_POINTS = tuple(p for p in POINTS if p != "run")  # a C round never calls run()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.tuples(st.sampled_from(ROUND_POINTS), st.integers(1, 3)),
                         min_size=1, max_size=30),
       event_idx=st.booleans(), stop_idle=st.sampled_from([0, 50]))
def test_no_lost_kick_in_rounds_under_adversarial_driver(schedule, event_idx, stop_idle):
    """Like test_sched's adversarial test, with the queue polled in C rounds beside a
    poll-only companion: buffers added inside every call the worker makes on the way into and
    out of polling are all consumed, with no further help from the driver."""
    env = Env(size=1 << 17)
    work = RingWork(env, "d.tx0", size=16, event_idx=event_idx, c_op=True)
    mate = RingWork(env, "m.tx0", size=16, c_op=True, poll_only=True)
    todo = list(schedule)

    def hook(point: str) -> None:
        if not todo or todo[0][0] != point:
            return
        _, k = todo.pop(0)
        with work.lock:
            work.drv.get_used()
            k = min(k, work.drv.num_free)
            for _ in range(k):
                work.drv.add([(work.buf, 12 + 60)])
            work.added += k
            if k and work.drv.publish():
                os.eventfd_write(work.kick, 1)

    w = Worker("r", settings=SHARED.with_(poll_start_rate=1, poll_stop_idle_us=stop_idle,
                                          turn_max_packets=2), policy="elvis")
    try:
        w.attach(mate).result(2)
        w.attach(work).result(2)
        work.hook = hook
        work.add(1)
        while todo:
            before = len(todo)
            assert _consumed_all([work], 3), (work.consumed(), work.added)
            time.sleep(0.002)
            if len(todo) == before:
                work.add(1)
                assert _consumed_all([work], 3), (work.consumed(), work.added)
                time.sleep(0.002)
                if len(todo) == before:
                    todo.pop(0)
        assert _consumed_all([work], 3), (work.consumed(), work.added)
        assert w.stats.rounds > 0
    finally:
        work.hook = None
        w.stop()
        work.close()
        mate.close()
        env.close()


def test_a_ring_breaking_in_a_round_detaches_only_its_queue(env):
    good = [RingWork(env, f"g{i}.tx0", c_op=True) for i in range(2)]
    bad = RingWork(env, "bad.tx0", c_op=True)
    broke: list[str] = []
    bad.broken = lambda err: broke.append(str(err))  # type: ignore[method-assign]
    w = Worker("r", settings=SHARED.with_(poll_stop_idle_us=60_000_000), policy="elvis")
    try:
        for wk in [*good, bad]:
            w.attach(wk).result(2)
        for wk in [*good, bad]:
            wk.add(4)
        assert wait_until(lambda: w.stats.polling == 3 and w.stats.rounds > 0)
        with bad.lock:  # a hostile descriptor: outside guest memory
            bad.drv.write_desc(0, 0x10, 64, 0, 0)
            bad.drv.push_avail(0)
            bad.drv.publish()
        assert wait_until(lambda: bool(broke))
        assert "outside guest memory" in broke[0]
        assert bad not in w.works
        assert wait_until(lambda: w.stats.polling == 2)
        for wk in good:
            wk.add(5)
        assert _consumed_all(good)
    finally:
        w.stop()
        for wk in [*good, bad]:
            wk.close()


def test_work_stats_add_round_counts_like_the_counters_plus_equals_with_c_counters_bound():
    class C:  # stands for a kick queue's C counters (every summed one; turns and empty moved)
        kicks = notify_on = notify_off = budget_exhausted = 0
        stream_waits = stream_found = rearm_deferred = wakes = caught = lingers = widened = 0
        turns = 7
        empty_turns = 2

    via_add, via_ops = WorkStats(C()), WorkStats(C())
    via_add.add_round(5, 3)
    via_ops.turns += 5
    via_ops.empty_turns += 2
    via_ops.kicks_avoided += 3
    assert via_add.as_dict() == via_ops.as_dict()
    assert (via_add.turns, via_add.empty_turns, via_add.kicks_avoided) == (12, 4, 3)
