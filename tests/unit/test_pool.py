"""The worker pool: placement (first_fit, least_loaded, explicit), baseline's worker per device,
workers added and removed at run time (their works move), migration errors and statistics."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
from test_sched import FakeWork, wait_until

from iosched.policy import SchedSettings
from iosched.pool import WorkerPool
from virtio.errors import ConfigError


@pytest.fixture
def pools():
    made: list[WorkerPool] = []

    def make(**kw) -> WorkerPool:
        kw.setdefault("mode", "shared")
        p = WorkerPool(**kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def homes(pool: WorkerPool) -> dict[int, list[str]]:
    return {w["index"]: w["devices"] for w in pool.stats()["workers"]}


def test_first_fit_fills_devices_per_worker_then_creates_a_worker(pools) -> None:
    pool = pools(workers=2, devices_per_worker=2, max_workers=8)
    for name in "abcde":
        pool.bind(name)
    assert homes(pool) == {0: ["a", "b"], 1: ["c", "d"], 2: ["e"]}
    pool.set_placement(devices_per_worker=3)  # later placements only
    pool.bind("f")
    assert homes(pool)[0] == ["a", "b", "f"]


def test_first_fit_grows_the_pool_only_up_to_max_workers(pools) -> None:
    pool = pools(workers=1, devices_per_worker=1, max_workers=2)
    for name in "abcd":
        pool.bind(name)
    # a, b fill workers 0 and 1; then no new worker: the least loaded takes the device
    assert homes(pool) == {0: ["a", "c"], 1: ["b", "d"]}
    pool.set_placement(max_workers=3)  # later placements only
    pool.bind("e")
    assert homes(pool)[2] == ["e"]
    with pytest.raises(ConfigError, match="max_workers"):
        pool.set_placement(max_workers=-1)


def test_max_workers_zero_means_the_cpus_the_workers_may_use(pools) -> None:
    import os

    pool = pools(workers=1, devices_per_worker=1, cpus=(0,))
    assert pool.worker_cap() == 1  # one CPU to run on: polling workers would share it
    for name in "abc":
        pool.bind(name)
    assert homes(pool) == {0: ["a", "b", "c"]}
    free = pools(workers=1)
    assert free.worker_cap() == len(os.sched_getaffinity(0))


def test_least_loaded_and_explicit(pools) -> None:
    pool = pools(workers=3, placement="least_loaded")
    pool.bind("a", worker=2)
    pool.bind("b")
    pool.bind("c")
    pool.bind("d")
    assert homes(pool) == {0: ["b", "d"], 1: ["c"], 2: ["a"]}
    with pytest.raises(ConfigError, match=r"worker=9.*workers: 0, 1, 2"):
        pool.bind("x", worker=9)
    pool.set_placement("explicit")
    pool.bind("e")  # no index: first_fit
    assert "e" in homes(pool)[0]


def test_baseline_has_one_worker_per_device(pools) -> None:
    pool = pools(mode="baseline")
    a = pool.bind("a")
    b = pool.bind("b")
    st = pool.stats()["workers"]
    assert [(w["name"], w["devices"], w["policy"]) for w in st] == [
        ("a", ["a"], "vhost"), ("b", ["b"], "vhost")]
    work = FakeWork("a.tx0")
    a.attach(work).result(2)
    work.add(3)
    assert wait_until(lambda: work.served == 3)
    assert work.stats.poll_starts == 0
    a.detach(work).result(2)
    pool.unbind(a)
    assert [w["name"] for w in pool.stats()["workers"]] == ["b"]
    with pytest.raises(ConfigError, match="shared"):
        pool.add_worker()
    with pytest.raises(ConfigError, match="shared"):
        pool.migrate("b", 0)
    pool.unbind(b)
    work.close()


def test_remove_worker_moves_its_works_and_refuses_the_last(pools) -> None:
    pool = pools(workers=2, devices_per_worker=1)
    ba, bb = pool.bind("a"), pool.bind("b")
    wa, wb = FakeWork("a.tx0"), FakeWork("b.tx0")
    ba.attach(wa).result(2)
    bb.attach(wb).result(2)
    new = pool.add_worker()
    assert new == 2
    pool.remove_worker(1)  # b moves to the least loaded: the new, empty worker 2
    placed = {q["name"]: q["worker"] for q in pool.stats()["queues"]}
    assert placed == {"a.tx0": 0, "b.tx0": 2}
    wb.add(5)
    assert wait_until(lambda: wb.served == 5)
    pool.remove_worker(0)
    assert {q["name"]: q["worker"] for q in pool.stats()["queues"]} == {"a.tx0": 2, "b.tx0": 2}
    wa.add(5)
    assert wait_until(lambda: wa.served == 5)
    with pytest.raises(ConfigError, match="last"):
        pool.remove_worker(2)
    with pytest.raises(ConfigError, match="no worker 0"):
        pool.remove_worker(0)
    assert homes(pool) == {2: ["a", "b"]}
    for w in (wa, wb):
        w.close()


def test_migrate_device_and_queue_and_replan_keeps_placement(pools) -> None:
    pool = pools(workers=2)
    b = pool.bind("d")
    tx0, tx1 = FakeWork("d.tx0"), FakeWork("d.tx1")
    b.attach(tx0).result(2)
    b.attach(tx1).result(2)
    pool.migrate("d", 1, queue="tx1")
    assert pool.placement_of("d.tx1") == 1 and pool.placement_of("d.tx0") == 0
    # the device re-plans (detach all, new works with the same names): placement is kept
    b.detach(tx0).result(2)
    b.detach(tx1).result(2)
    n0, n1 = FakeWork("d.tx0"), FakeWork("d.tx1")
    b.attach(n0).result(2)
    b.attach(n1).result(2)
    assert pool.placement_of("d.tx1") == 1 and pool.placement_of("d.tx0") == 0
    pool.migrate("d", 1)  # the whole device: the per-queue override is gone
    assert pool.placement_of("d.tx0") == 1 and pool.placement_of("d.tx1") == 1
    pool.migrate("d", 0, queue="d.tx0")
    assert {w["index"]: w["works"] for w in pool.stats()["workers"]} == {0: 1, 1: 1}
    for w in (n0, n1):
        w.owner.clear()
        w.add(7)
    assert wait_until(lambda: n0.served == 7 and n1.served == 7)
    assert n0.owner == {"vhostx-w0"} and n1.owner == {"vhostx-w1"}
    with pytest.raises(ConfigError, match="no running queue 'rx3'.*d.tx0, d.tx1"):
        pool.migrate("d", 1, queue="rx3")
    with pytest.raises(ConfigError, match="no device 'zz'; devices: d"):
        pool.migrate("zz", 1)
    n1.migratable_alone = False  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="whole device"):
        pool.migrate("d", 0, queue="tx1")
    for w in (tx0, tx1, n0, n1):
        w.close()


def test_migrating_while_serving_never_runs_a_work_on_two_workers(pools) -> None:
    pool = pools(workers=2, settings=SchedSettings(polling=True, poll_stop_idle_us=100))
    b = pool.bind("d")
    work = FakeWork("d.tx0", size=64)
    lock = threading.Lock()
    inside = [0, 0]  # current, max
    run = work.run

    def guarded(p: int, by: int) -> int:
        with lock:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
        try:
            return run(p, by)
        finally:
            with lock:
                inside[0] -= 1

    work.run = guarded  # type: ignore[method-assign]
    b.attach(work).result(2)
    total = 0
    for i in range(100):
        work.add(50)
        total += 50
        pool.migrate("d", (i + 1) % 2)
    assert wait_until(lambda: work.served == total)
    assert inside[1] == 1
    assert work.owner == {"vhostx-w0", "vhostx-w1"}
    work.close()


def test_live_update_reaches_every_worker_and_policy_switch(pools) -> None:
    pool = pools(workers=2)
    pool.update(SchedSettings(polling=True, turn_max_packets=3))
    for w in pool.workers.values():
        assert w.submit(lambda w=w: w.settings.turn_max_packets).result(2) == 3
    pool.set_policy("classes")
    assert {w["policy"] for w in pool.stats()["workers"]} == {"classes"}
    with pytest.raises(ConfigError, match="allowed"):
        pool.set_policy("nope")
    with pytest.raises(ConfigError, match="placement='x'"):
        pool.set_placement("x")


class _HeldWork(FakeWork):
    """A work whose batch stays inside run() until ``release`` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.inside = threading.Event()
        self.release = threading.Event()

    def run(self, budget_pkts: int, budget_bytes: int) -> int:
        self.inside.set()
        self.release.wait(10)
        return super().run(budget_pkts, budget_bytes)


def test_barrier_completes_on_every_worker_only_after_the_running_batch(pools) -> None:
    pool = pools(workers=2, placement="least_loaded")
    a, b = pool.bind("a", worker=0), pool.bind("b", worker=1)
    held = _HeldWork("a.tx0")
    a.attach(held).result(5)
    other = FakeWork("b.tx0")
    b.attach(other).result(5)
    held.add(1)
    assert held.inside.wait(5), "the batch started"
    futs = b.barrier()  # from any device's binding: every worker of the pool
    assert len(futs) == 2
    done, pending = concurrent.futures.wait(futs, timeout=0.3)
    assert len(done) == 1 and len(pending) == 1  # worker 1 answered, worker 0 is in the batch
    held.release.set()
    concurrent.futures.wait(futs, timeout=5)
    assert all(f.done() and f.exception() is None for f in futs)
    assert held.served == 1
    a.detach(held).result(5)
    b.detach(other).result(5)
    held.close()
    other.close()
