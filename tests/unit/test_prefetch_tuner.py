"""tx_prefetch: the C core's per-ring frame prefetch hint, and the worker's tuner that picks nta
or t0 by measuring (iosched/prefetch_tuner.py).

The tuner's tests drive it with a synthetic clock and packet counts (the rate each hint would
give), so they assert on its decisions exactly; the worker test runs real rings.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from test_core_env import Env
from test_round import BIG, FOREVER, _consumed_all, _sinks
from test_round import _send as _send_fresh
from test_sched import SHARED, RingWork, wait_until

from iosched.params import Registry
from iosched.policy import PARAMS, SchedSettings
from iosched.prefetch_tuner import PrefetchTuner
from iosched.worker import Worker
from virtio import net
from virtio.errors import ConfigError
from virtio.kick import set_tx_prefetch, tx_prefetch

MS = 1_000_000
STEP = MS  # one synthetic C round


@pytest.fixture
def env():
    e = Env(size=16 << 20)
    yield e
    e.close()


def _drive(tuner: PrefetchTuner, rate, t0: int, t1: int) -> list[tuple[int, str]]:
    """Rounds of STEP ns from t0 to t1; `rate(hint, now)` is the packets/s the applied hint
    gives. Returns the hints the tuner asked for, with when."""
    asked = []
    now = t0
    while now < t1:
        pkts = int(rate(tuner.applied, now) * STEP / 1e9)
        now += STEP
        hint = tuner.account(now, pkts)
        if hint is not None:
            asked.append((now, hint))
    return asked


def test_a_faster_t0_is_found_at_the_first_traffic_and_kept():
    t = PrefetchTuner(2000 * MS)
    assert (t.current, t.applied, t.exploring) == ("nta", "nta", False)
    asked = _drive(t, lambda h, now: 15e6 if h == "t0" else 10e6, 0, 200 * MS)
    assert t.current == t.applied == "t0"
    assert (t.explorations, t.switches) == (1, 1)
    assert not t.exploring
    # the exploration alternated the other hint first, then ended on the winner
    assert [h for _, h in asked][:2] == ["t0", "nta"]
    assert asked[-1][1] == "t0"
    assert asked[-1][0] <= 2 * 4 * 10 * MS + 3 * STEP  # 4 pairs of 10 ms epochs


def test_equal_rates_keep_the_current_hint():
    t = PrefetchTuner(2000 * MS)
    _drive(t, lambda h, now: 10e6, 0, 200 * MS)
    assert (t.current, t.applied, t.switches, t.explorations) == ("nta", "nta", 0, 1)
    assert (t.decisions, t.aborts, t.last_outcome) == (1, 0, "kept")


def test_a_gain_within_the_margin_is_not_a_switch():
    t = PrefetchTuner(2000 * MS, margin=0.05)
    _drive(t, lambda h, now: 10.4e6 if h == "t0" else 10e6, 0, 200 * MS)
    assert t.current == "nta"


def test_a_light_stream_teaches_nothing():
    t = PrefetchTuner(2000 * MS, min_pps=50_000)
    _drive(t, lambda h, now: 40_000 if h == "t0" else 20_000, 0, 200 * MS)
    assert (t.current, t.explorations) == ("nta", 1)


def test_no_traffic_no_exploration_and_it_waits_for_traffic():
    t = PrefetchTuner(2000 * MS)
    assert _drive(t, lambda h, now: 0, 0, 500 * MS) == []
    assert t.explorations == 0
    asked = _drive(t, lambda h, now: 10e6, 500 * MS, 600 * MS)
    assert asked[0] == (500 * MS + STEP, "t0")


def test_rechecks_follow_a_change_of_the_machine():
    """t0 wins at first; after the host moved the vCPUs nta is faster: the next exploration,
    recheck_ns after the first decision, goes back to nta."""
    t = PrefetchTuner(1000 * MS)

    def rate(h: str, now: int) -> float:
        fast = "t0" if now < 500 * MS else "nta"
        return 12e6 if h == fast else 8e6

    _drive(t, rate, 0, 900 * MS)
    assert (t.current, t.explorations) == ("t0", 1)
    _drive(t, rate, 900 * MS, 1300 * MS)
    assert (t.current, t.explorations, t.switches) == ("nta", 2, 2)


def test_nothing_is_counted_between_explorations():
    t = PrefetchTuner(1000 * MS)
    assert t.due(0)  # the first traffic explores
    _drive(t, lambda h, now: 10e6, 0, 200 * MS)
    assert not t.exploring
    end = 4 * 2 * 10 * MS + 2 * STEP
    assert not t.due(end + 500 * MS)
    assert t.due(end + 1000 * MS)


def test_recheck_zero_explores_once():
    t = PrefetchTuner(0)
    _drive(t, lambda h, now: 10e6, 0, 5000 * MS)
    assert t.explorations == 1


def test_a_load_step_during_an_exploration_does_not_decide_it():
    """The offered load doubles in the middle of the exploration, hints equal: the pairs
    before and after the step compare like with like, so nothing changes."""
    t = PrefetchTuner(2000 * MS)
    _drive(t, lambda h, now: 10e6 if now < 45 * MS else 20e6, 0, 200 * MS)
    assert (t.current, t.switches) == ("nta", 0)


def test_rounds_are_cut_at_the_epoch_end_while_exploring():
    t = PrefetchTuner(2000 * MS, epoch_ns=10 * MS)
    assert t.round_cap_ns(0) is None
    t.account(5 * MS, 1000)  # traffic: the exploration starts at 5 ms
    assert t.exploring
    assert t.round_cap_ns(7 * MS) == 8 * MS
    assert t.round_cap_ns(15 * MS) == 1  # overdue: the next round ends at once


def test_an_idle_gap_or_a_new_set_of_rings_drops_the_exploration():
    t = PrefetchTuner(2000 * MS)
    assert t.account(MS, 1000) == "t0"
    assert t.account(5 * MS, 1000) is None
    assert t.account(500 * MS, 0) == "nta"  # no round for 495 ms: not a rate of t0
    assert (t.exploring, t.aborts, t.switches) == (False, 1, 0)
    assert t.account(501 * MS, 1000) == "t0"  # the next traffic explores again
    assert t.abort() == "nta"
    assert t.abort() is None  # nothing under way
    assert (t.current, t.aborts) == ("nta", 2)


def test_bad_tuner_arguments_are_refused():
    with pytest.raises(ConfigError):
        PrefetchTuner(-1)
    with pytest.raises(ConfigError):
        PrefetchTuner(0, first="t1")
    with pytest.raises(ConfigError):
        PrefetchTuner(0, pairs=0)


def test_the_parameters_defaults_and_choices():
    s = SchedSettings.from_registry()
    assert (s.tx_prefetch, s.tx_prefetch_recheck_ms) == ("auto", 2000)
    assert s.tx_prefetch_recheck_ns == 2000 * MS
    reg = Registry(PARAMS)
    with pytest.raises(ConfigError, match="auto"):
        reg.set("tx_prefetch", "t1")
    with pytest.raises(ConfigError, match="range"):
        reg.set("tx_prefetch_recheck", "-1")


def test_every_hint_moves_every_frame(env):
    """The hint changes only how the frames are prefetched: each one consumes all of them."""
    for mode in ("nta", "t0", "none"):
        (drv, tx, op), = _sinks(env, 1)
        assert tx_prefetch(op) == "nta"  # a new ring's default
        set_tx_prefetch(op, mode)
        assert tx_prefetch(op) == mode
        _send_fresh(env, drv, 100)
        rnd = net.Round([op])
        while tx.stats()["packets"] < 100:
            rnd.run(10, FOREVER)
        assert tx.stats()["packets"] == 100
    with pytest.raises(ConfigError, match="nta"):
        set_tx_prefetch(op, "t2")
    assert op.run(64, BIG) == 0


@contextlib.contextmanager
def _streaming_worker(env: Env, settings: SchedSettings):
    """A shared-mode worker over two sink rings that a driver thread keeps filling; yields
    (worker, works, stop) and stops everything after."""
    works = [RingWork(env, f"d{i}.tx0", c_op=True, size=256) for i in range(2)]
    w = Worker("p", settings=settings, policy="elvis")
    stop = threading.Event()

    def driver() -> None:
        while not stop.is_set():
            for wk in works:
                wk.add(32)

    t = threading.Thread(target=driver, daemon=True)
    try:
        for wk in works:
            w.attach(wk).result(2)
        t.start()
        yield w, works, stop
    finally:
        stop.set()
        if t.is_alive():
            t.join(5)
        w.stop()
        for wk in works:
            wk.close()


def test_a_worker_under_auto_measures_and_its_rings_follow_its_hint(env):
    settings = SHARED.with_(poll_stop_idle_us=2000, tx_prefetch_recheck_ms=50)
    with _streaming_worker(env, settings) as (w, works, stop):
        # an exploration may be dropped (a ring stopped polling on a loaded machine): wait for
        # one that ran to its end
        assert wait_until(lambda: w.submit(lambda: w._prefetch.decisions).result(2) >= 1,
                          timeout=30)

        def settled() -> bool:  # in the worker's thread: between explorations, rings agree
            tuner = w._prefetch
            return not tuner.exploring and all(
                tx_prefetch(wk.op) == tuner.applied == tuner.current for wk in works)

        assert wait_until(lambda: w.submit(settled).result(2), timeout=20)
        assert w.stats.prefetch_t0 == int(w.submit(lambda: w._prefetch.current).result(2) == "t0")
        stop.set()
        time.sleep(0.05)
        assert _consumed_all(works)


def test_a_fixed_hint_is_applied_and_never_explored(env):
    with _streaming_worker(env, SHARED.with_(poll_stop_idle_us=2000, tx_prefetch="t0")) as (
            w, works, stop):  # fmt: skip
        assert wait_until(lambda: w.stats.rounds >= 50)
        stop.set()
        assert w.stats.prefetch_explorations == 0
        assert [tx_prefetch(wk.op) for wk in works] == ["t0", "t0"]
