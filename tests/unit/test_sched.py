"""The shared worker loop: adaptive polling without lost kicks (real split rings over a memfd, a
driver that adds buffers at the worst moments), migration between workers, budgets and stuck
detection (a greedy queue cannot starve a light one), and live parameter changes.

No timed assertions: waits are generous bounds against hangs; counts decide.
Also the fakes reused by test_pool.py (FakeWork, RingWork, wait_until).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_env import Env

from iosched.policy import SchedSettings
from iosched.pool import WorkerPool
from iosched.worker import Worker, WorkStats
from virtio import net
from virtio.errors import GuestError

SHARED = SchedSettings(polling=True)
PKT = 60  # payload bytes per test packet (plus the 12-byte net header)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


# ---- fakes --------------------------------------------------------------------------------------


class FakeWork:
    """A queue modelled in Python: `items` pending, `size` bytes each, a real kick eventfd."""

    def __init__(self, name: str = "dev.tx0", *, size: int = 1500, delay: float = 0.0) -> None:
        self.name = name
        self.device = name.split(".")[0]
        self.stats = WorkStats()
        self.poll_only = False
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.lock = threading.Lock()
        self.items = 0
        self.served = 0
        self.size = size
        self.delay = delay  # seconds per batch (a slow port)
        self.notify = True
        self.batches = 0
        self.owner: set[str] = set()

    def kick_fds(self) -> list[int]:
        return [self.kick]

    def data_fds(self) -> list[int]:
        return []

    def add(self, n: int) -> None:
        with self.lock:
            self.items += n
            wants = self.notify
        if wants:
            os.eventfd_write(self.kick, 1)

    def run(self, budget_pkts: int, budget_bytes: int) -> int:
        self.owner.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            n = min(self.items, budget_pkts, max(1, budget_bytes // self.size))
            self.items -= n
            self.served += n
            self.batches += 1
        return n

    def pending(self) -> bool:
        with self.lock:
            return self.items > 0

    def set_notify(self, enable: bool) -> None:
        with self.lock:
            self.notify = enable

    def counters(self) -> dict[str, int]:
        return {"packets": self.served, "bytes": self.served * self.size}

    def broken(self, err: GuestError) -> None:
        pass

    def close(self) -> None:
        os.close(self.kick)


class RingWork:
    """A real TX ring (C DeviceQueue, Python DriverQueue) served by tx_sink. `hook(point)` runs
    inside the worker's calls, so a test can act as the driver at exact points of the loop."""

    def __init__(self, env: Env, name: str, *, size: int = 64, event_idx: bool = False,
                 c_op: bool = False, poll_only: bool = False) -> None:
        self.name = name
        self.device = name.split(".")[0]
        self.stats = WorkStats()
        self.poll_only = poll_only  # True: no kick fd, polled for as long as it is attached
        self.drv, self.queue = env.pair(size, event_idx=event_idx)
        # c_op: the worker may serve it in C poll rounds (test_round.py); run() stays the same
        self.op = net.Op.tx_sink(self.queue) if c_op else None
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.buf = env.alloc(4096)
        env.write(self.buf, bytes(12 + PKT))
        self.lock = threading.Lock()
        self.added = 0
        self.kicks_sent = 0
        self.hook: Callable[[str], None] | None = None
        self.inside = 0
        self.overlap = 0  # two threads inside the work at once (must stay 0)

    # driver side (any thread)
    def add(self, n: int) -> int:
        """Add up to n one-buffer packets, publish, kick if the device asks. Returns added."""
        with self.lock:
            self.drv.get_used()
            k = min(n, self.drv.num_free)
            for _ in range(k):
                self.drv.add([(self.buf, 12 + PKT)])
            self.added += k
            if k and self.drv.publish():
                self.kicks_sent += 1
                os.eventfd_write(self.kick, 1)
            return k

    def publish_wants_kick(self, n: int = 1) -> bool:
        """Add n packets; return whether the device asked for a kick (and kick if so)."""
        with self.lock:
            self.drv.get_used()
            for _ in range(n):
                self.drv.add([(self.buf, 12 + PKT)])
            self.added += n
            wants = self.drv.publish()
            if wants:
                self.kicks_sent += 1
                os.eventfd_write(self.kick, 1)
            return wants

    def consumed(self) -> int:
        return int(self.queue.stats()["packets"])

    # device side (the worker)
    def _at(self, point: str) -> None:
        if self.hook is not None:
            self.hook(point)

    def _enter(self) -> None:
        self.inside += 1
        if self.inside > 1:
            self.overlap += 1

    def kick_fds(self) -> list[int]:
        return [] if self.poll_only else [self.kick]

    def data_fds(self) -> list[int]:
        return []

    def run(self, budget_pkts: int, budget_bytes: int) -> int:
        self._enter()
        try:
            self._at("run")
            return net.tx_sink(self.queue, budget_pkts, budget_bytes)
        finally:
            self.inside -= 1

    def pending(self) -> bool:
        self._at("pending")
        return self.queue.pending() > 0

    def set_notify(self, enable: bool) -> None:
        self._at(f"notify{int(enable)}")
        self.queue.set_notify(enable)
        self._at(f"notify{int(enable)}_done")

    def counters(self) -> dict[str, int]:
        return self.queue.stats()

    def broken(self, err: GuestError) -> None:
        raise AssertionError(f"ring broke: {err}")

    def close(self) -> None:
        os.close(self.kick)


@pytest.fixture
def env():
    e = Env(size=1 << 20)
    yield e
    e.close()


def _worker(settings: SchedSettings = SHARED, policy: str = "elvis", name: str = "t") -> Worker:
    return Worker(name, settings=settings, policy=policy)


# ---- polling and the lost-kick race -----------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_lost_kick_when_buffer_lands_during_poll_stop(env: Env, event_idx: bool) -> None:
    """Polling stops after one empty poll (poll_stop_idle=0). Right before kicks come back on,
    the driver publishes a buffer: it sees kicks suppressed and does not kick. Nothing else
    happens afterwards: only the re-check after re-enabling can find that buffer."""
    work = RingWork(env, "d.tx0", event_idx=event_idx)
    seen: list[bool] = []

    def hook(point: str) -> None:
        if point == "notify1" and work.stats.poll_stops >= 1 and not seen:
            seen.append(work.publish_wants_kick(1))

    w = _worker(SHARED.with_(poll_start_rate=1, poll_stop_idle_us=0))
    try:
        w.attach(work).result(2)
        assert wait_until(lambda: work.stats.notify_on >= 1)  # the attach turn re-armed
        work.hook = hook
        work.add(3)
        assert wait_until(lambda: bool(seen))
        assert seen == [False], "the buffer must land while kicks are suppressed (no kick)"
        assert wait_until(lambda: work.consumed() == 4), (work.consumed(), work.added)
        assert work.stats.poll_starts >= 1 and work.stats.poll_stops >= 1
        # and the worker went back to sleep with kicks on
        assert wait_until(lambda: w.stats.polling == 0 and not work.stats.polling)
        assert work.publish_wants_kick(1), "kicks must be enabled again once the queue is idle"
        assert wait_until(lambda: work.consumed() == 5)
    finally:
        w.stop()
        work.close()


def test_polling_suppresses_kicks_and_counts_kicks_avoided(env: Env) -> None:
    work = RingWork(env, "d.tx0")
    w = _worker(SHARED.with_(poll_stop_idle_us=60_000_000))
    try:
        w.attach(work).result(2)
        assert wait_until(lambda: work.stats.notify_on >= 1)  # the attach turn re-armed
        assert work.publish_wants_kick(1)
        assert wait_until(lambda: work.stats.polling)
        for _ in range(20):
            assert not work.publish_wants_kick(1), "kicks must stay suppressed while polling"
            n = work.added
            assert wait_until(lambda n=n: work.consumed() == n)
        assert work.stats.kicks_avoided >= 20
        assert work.stats.kicks == 1
        # a live change of poll_stop_idle applies to the running worker
        w.update(SHARED.with_(poll_stop_idle_us=0)).result(2)
        assert wait_until(lambda: not work.stats.polling)
        assert work.publish_wants_kick(1)
        assert wait_until(lambda: work.consumed() == work.added)
    finally:
        w.stop()
        work.close()


def test_poll_start_rate_zero_never_polls(env: Env) -> None:
    work = RingWork(env, "d.tx0")
    w = _worker(SHARED.with_(poll_start_rate=0))
    try:
        w.attach(work).result(2)
        for _ in range(30):
            work.add(5)
            n = work.added
            assert wait_until(lambda n=n: work.consumed() == n)
        assert work.stats.poll_starts == 0
        assert work.stats.kicks >= 1
    finally:
        w.stop()
        work.close()


def test_poll_start_rate_counts_items_of_one_tick(env: Env) -> None:
    work = RingWork(env, "d.tx0")
    w = _worker(SHARED.with_(poll_start_rate=8))
    try:
        w.attach(work).result(2)
        assert wait_until(lambda: work.stats.notify_on >= 1)  # the attach turn re-armed
        for i in range(5):  # one item at a time: never 8 in one tick
            assert work.add(1) == 1
            n = work.added
            assert wait_until(lambda n=n: work.consumed() == n)
            assert wait_until(lambda i=i: work.stats.notify_on >= i + 2)
        assert work.stats.poll_starts == 0
        # Now 32 at once (published together): one tick serves >= 8 and polling starts.
        work.add(32)
        assert wait_until(lambda: work.stats.poll_starts == 1)
    finally:
        w.stop()
        work.close()


POINTS = ("run", "pending", "notify0", "notify0_done", "notify1", "notify1_done")
# a schedule: entry i adds `count` buffers at the next occurrence of `point` after entry i-1 fired
SCHEDULE = st.lists(st.tuples(st.sampled_from(POINTS), st.integers(1, 3)), min_size=1,
                    max_size=40)


def _settled(work: RingWork) -> bool:
    """Everything added is consumed, and stays so a moment later (late hook adds count)."""
    if not wait_until(lambda: work.consumed() == work.added, 3):
        return False
    time.sleep(0.01)
    return wait_until(lambda: work.consumed() == work.added, 3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=SCHEDULE, event_idx=st.booleans(), rate=st.sampled_from([0, 1, 2, 5]),
       policy=st.sampled_from(["elvis", "classes", "vhost"]))
def test_no_lost_kick_under_adversarial_driver(schedule: list[tuple[str, int]],
                                               event_idx: bool, rate: int, policy: str) -> None:
    """The driver adds buffers inside the calls the worker makes (before/after enabling and
    disabling kicks, before a re-check, before a batch), with polling switching on and off all
    the time (poll_stop_idle=0). Whatever the interleaving, every buffer is consumed, with no
    further help from the driver."""
    env = Env(size=1 << 16)
    work = RingWork(env, "d.tx0", size=16, event_idx=event_idx)
    todo = list(schedule)

    def hook(point: str) -> None:
        if not todo or todo[0][0] != point:
            return
        _, k = todo.pop(0)
        with work.lock:
            work.drv.get_used()
            k = min(k, work.drv.num_free)
            for _ in range(k):
                work.drv.add([(work.buf, 12 + PKT)])
            work.added += k
            if k and work.drv.publish():
                os.eventfd_write(work.kick, 1)

    w = _worker(SHARED.with_(poll_start_rate=rate, poll_stop_idle_us=0,
                             turn_max_packets=2, min_processed_data_limit=0,
                             max_processed_data_limit=200), policy=policy)
    try:
        w.attach(work).result(2)
        work.hook = hook
        work.add(1)
        while todo:  # each entry fires once the worker reaches its point; wait for quiet
            before = len(todo)
            assert _settled(work), f"stranded: added {work.added}, consumed {work.consumed()}"
            if len(todo) == before:  # its point will not come without new work: poke once
                work.add(1)
                assert _settled(work), f"stranded: added {work.added}, consumed {work.consumed()}"
                if len(todo) == before:
                    todo.pop(0)
        assert _settled(work), f"stranded: added {work.added}, consumed {work.consumed()}"
        assert work.overlap == 0
    finally:
        work.hook = None
        w.stop()
        work.close()
        env.close()


# ---- migration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_lost_kick_when_buffer_lands_between_detach_and_attach(env: Env,
                                                                  event_idx: bool) -> None:
    """Phase 1 detached the queue from the old worker with kicks suppressed; the driver adds a
    buffer and does not kick; phase 2 attaches it to the new worker, which must serve it."""
    work = RingWork(env, "d.tx0", event_idx=event_idx)
    a, b = _worker(name="a"), _worker(name="b")
    try:
        a.attach(work).result(2)
        work.add(4)
        assert wait_until(lambda: work.consumed() == 4 and work.stats.polling)
        for i in range(10):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            src.detach(work).result(2)
            assert not work.publish_wants_kick(2), "kicks were left suppressed by the old worker"
            dst.attach(work).result(2)
            n = work.added
            assert wait_until(lambda n=n: work.consumed() == n), (work.consumed(), n)
        assert work.overlap == 0
    finally:
        a.stop()
        b.stop()
        work.close()


def test_migration_under_a_busy_driver_loses_and_duplicates_nothing(env: Env) -> None:
    """A driver thread adds bursts as fast as it can while the pool migrates the device (and
    then one queue) back and forth; every buffer is consumed exactly once, by one worker at a
    time."""
    works = [RingWork(env, "d.tx0", size=64), RingWork(env, "d.tx1", size=64)]
    pool = WorkerPool(mode="shared", workers=2, settings=SHARED.with_(poll_stop_idle_us=200))
    stop = threading.Event()
    rng = random.Random(7)

    def driver() -> None:
        while not stop.is_set():
            for wk in works:
                wk.add(rng.randint(1, 8))
            if rng.random() < 0.3:
                time.sleep(0.0003)

    binding = pool.bind("d")
    try:
        for wk in works:
            binding.attach(wk).result(2)
        t = threading.Thread(target=driver, daemon=True)
        t.start()
        for i in range(40):
            if i % 3 == 2:
                pool.migrate("d", i % 2, queue="tx1")
            else:
                pool.migrate("d", (i + 1) % 2)
            time.sleep(rng.random() * 0.003)
        stop.set()
        t.join(5)
        for wk in works:
            assert wait_until(lambda wk=wk: wk.consumed() == wk.added), (wk.consumed(), wk.added)
            assert wk.overlap == 0
            assert wk.queue.stats()["errors"] == 0
        placed = {q["name"]: q["worker"] for q in pool.stats()["queues"]}
        assert placed == {"d.tx0": 0, "d.tx1": 0}  # last: i=39, the device to worker 0
    finally:
        stop.set()
        pool.stop()
        for wk in works:
            wk.close()


# ---- budgets, stuck detection, fairness ----------------------------------------------------


def test_greedy_queue_cannot_starve_a_light_one_on_the_same_worker() -> None:
    greedy, light = FakeWork("g.tx0", size=1500), FakeWork("l.tx0", size=64)
    w = _worker(SHARED.with_(max_processed_data_limit=64 * 1024, turn_max_packets=16))
    try:
        w.attach(greedy).result(2)
        w.attach(light).result(2)
        greedy.add(10**9)  # saturated for the whole test
        for burst in range(50):
            light.add(3)
            assert wait_until(lambda b=burst: light.served == 3 * (b + 1))
        assert greedy.items > 0, "the greedy queue must still be saturated"
        assert greedy.stats.budget_exhausted >= 1
        assert light.stats.turns >= 50
    finally:
        w.stop()
        greedy.close()
        light.close()


def test_stuck_queue_moves_to_the_head_and_cuts_the_greedy_turn() -> None:
    """The greedy queue's turn limit is huge (64 MiB) and each of its batches is slow; the light
    queue is polled with items that do not change: after max_queue_stuck_us it is stuck, the
    greedy turn yields past min_processed_data_limit and the light queue is served next."""
    greedy = FakeWork("g.tx0", size=1500, delay=0.0005)
    light = FakeWork("l.tx0", size=64)
    s = SHARED.with_(max_processed_data_limit=64 << 20, min_processed_data_limit=0,
                     turn_max_packets=16, max_queue_stuck_us=2000, poll_stop_idle_us=60_000_000)
    w = _worker(s)
    try:
        w.attach(greedy).result(2)
        w.attach(light).result(2)
        light.add(1)
        assert wait_until(lambda: light.stats.polling)
        greedy.add(10**9)
        assert wait_until(lambda: greedy.stats.polling)
        for i in range(5):
            light.add(2)
            assert wait_until(lambda i=i: light.served == 1 + 2 * (i + 1))
        assert light.stats.stuck_events >= 1
        assert greedy.stats.budget_exhausted >= 1
        assert greedy.items > 0
    finally:
        w.stop()
        greedy.close()
        light.close()


def test_max_work_stuck_bounds_a_kick_waiting_behind_a_busy_queue() -> None:
    greedy = FakeWork("g.tx0", size=1500, delay=0.0005)
    light = FakeWork("l.tx0", size=64)
    s = SHARED.with_(poll_start_rate=0, max_processed_data_limit=64 << 20,
                     min_processed_data_limit=0, turn_max_packets=16, max_work_stuck_us=1000)
    w = _worker(s)
    try:
        w.attach(greedy).result(2)
        w.attach(light).result(2)
        greedy.add(10**9)
        assert wait_until(lambda: greedy.batches > 3)
        turns = greedy.stats.budget_exhausted
        for i in range(5):
            light.add(1)  # a kick while the greedy turn runs
            assert wait_until(lambda i=i: light.served == i + 1)
        assert greedy.stats.budget_exhausted > turns, "the greedy turn must have yielded"
        assert greedy.items > 0
    finally:
        w.stop()
        greedy.close()
        light.close()


def test_min_poll_rate_overrides_coalescing() -> None:
    """With poll_coalescing far beyond the test, a polled queue is only checked because of
    min_poll_rate (overdue = last check at least one period ago)."""
    work = FakeWork("d.tx0")
    s = SHARED.with_(poll_stop_idle_us=600_000_000, poll_coalescing_us=600_000_000,
                     min_poll_rate=200)
    w = _worker(s)
    try:
        w.attach(work).result(2)
        work.add(1)
        assert wait_until(lambda: work.stats.polling and work.served == 1)
        for i in range(3):
            work.add(1)
            assert wait_until(lambda i=i: work.served == 2 + i)
        assert work.stats.kicks_avoided >= 3
    finally:
        w.stop()
        work.close()


def test_turn_budget_change_applies_to_a_running_worker() -> None:
    work = FakeWork("d.tx0", size=100)
    w = _worker(SHARED.with_(poll_start_rate=0, turn_max_packets=256,
                             max_processed_data_limit=1 << 20))
    try:
        w.attach(work).result(2)
        work.add(200)
        assert wait_until(lambda: work.served == 200)
        assert work.stats.budget_exhausted == 0
        w.update(SHARED.with_(poll_start_rate=0, turn_max_packets=4, min_processed_data_limit=0,
                              max_processed_data_limit=400)).result(2)
        work.add(200)
        assert wait_until(lambda: work.served == 400)
        assert work.stats.budget_exhausted >= 40  # 200 items / (400 B / 100 B per turn)
    finally:
        w.stop()
        work.close()


def test_idle_shared_worker_sleeps_after_poll_stop_idle() -> None:
    work = FakeWork("d.tx0")
    w = _worker(SHARED.with_(poll_stop_idle_us=20_000))
    try:
        w.attach(work).result(2)
        work.add(5)
        assert wait_until(lambda: work.served == 5)
        assert wait_until(lambda: not work.stats.polling and w.stats.polling == 0)
        loops = w.stats.loops
        time.sleep(0.2)
        assert w.stats.loops - loops <= 1, "an idle worker must block in epoll, not spin"
        assert work.notify, "kicks must be on while the worker sleeps"
    finally:
        w.stop()
        work.close()
