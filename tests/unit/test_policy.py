"""Scheduling settings from the registry and the policies' decisions, including the two ELVIS
bugs that must not come back (a "can continue" check that always said yes, an inverted
minimum-poll-rate comparison)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from iosched.params import Registry, Source
from iosched.policy import (
    PARAMS,
    POLICIES,
    ClassesPolicy,
    ElvisPolicy,
    SchedSettings,
    VhostPolicy,
    make_policy,
)


def fresh_registry() -> Registry:
    return Registry(PARAMS)


def q(**kw):
    base = {"last_served_ns": 0, "last_checked_ns": 0, "stuck_since_ns": 0, "klass": "latency",
            "full_ewma": 0, "worker_has_latency": lambda: False}
    base.update(kw)
    return SimpleNamespace(**base)


def test_from_registry_reads_every_parameter_in_user_units() -> None:
    reg = fresh_registry()
    reg.set_many({"poll_stop_idle": "250ms", "poll_coalescing": "20us",
                  "max_work_stuck_us": 50, "max_queue_stuck_us": "1ms",
                  "max_queue_stuck_size": 8, "min_processed_data_limit": "2k",
                  "max_processed_data_limit": "64KiB", "min_poll_rate": 100,
                  "turn_max_packets": 64, "turn_max_bytes": "128k", "poll_start_rate": 4},
                 Source.CMDLINE)
    s = SchedSettings.from_registry(reg)
    assert s == SchedSettings(
        polling=True, poll_start_rate=4, poll_stop_idle_us=250_000, poll_coalescing_us=20,
        max_work_stuck_us=50, max_queue_stuck_us=1000, max_queue_stuck_size=8,
        min_processed_data_limit=2048, max_processed_data_limit=65536, min_poll_rate=100,
        turn_max_packets=64, turn_max_bytes=131072)
    assert s.poll_stop_idle_ns == 250_000_000 and s.max_queue_stuck_ns == 1_000_000
    assert s.min_poll_period_ns == 10_000_000
    assert not SchedSettings.from_registry(reg, mode="baseline").polling
    assert SchedSettings().max_work_stuck_ns == -1  # off


def test_continue_turn_really_stops_between_the_limits_under_pressure() -> None:
    p = ElvisPolicy(SchedSettings(polling=True, min_processed_data_limit=1500,
                                  max_processed_data_limit=10_000))
    assert p.continue_turn(q(), 1499, pressure=True)  # below min: always on
    assert p.continue_turn(q(), 5000, pressure=False)
    assert not p.continue_turn(q(), 5000, pressure=True)  # the ELVIS bug said yes here
    assert not p.continue_turn(q(), 10_000, pressure=False)  # at max: always off


def test_overdue_is_at_least_one_period_since_the_last_check() -> None:
    p = ElvisPolicy(SchedSettings(polling=True, min_poll_rate=1000))  # period 1 ms
    assert not p.overdue(q(last_checked_ns=0), 999_999)
    assert p.overdue(q(last_checked_ns=0), 1_000_000)  # not inverted
    assert p.overdue(q(last_checked_ns=0), 50_000_000)
    assert not ElvisPolicy(SchedSettings(polling=True)).overdue(q(), 10**12)  # 0: off


def test_stuck_needs_the_threshold_and_respects_the_size_filter() -> None:
    p = ElvisPolicy(SchedSettings(polling=True, max_queue_stuck_us=100, max_queue_stuck_size=4))
    assert not p.stuck(q(), 2, 99_999)
    assert p.stuck(q(), 2, 100_000)
    assert not p.stuck(q(), 5, 10**9)  # more pending than max_queue_stuck_size
    assert not p.stuck(q(), 0, 10**9)
    assert p.stuck(q(last_served_ns=10**9), 2, 10**9 + 100_000)
    off = ElvisPolicy(SchedSettings(polling=True))
    assert not off.stuck(q(), 2, 10**12)
    nosize = ElvisPolicy(SchedSettings(polling=True, max_queue_stuck_us=0))
    assert nosize.stuck(q(), 10_000, 0)  # size 0: no size filter


def test_polling_decisions() -> None:
    p = ElvisPolicy(SchedSettings(polling=True, poll_start_rate=3, poll_stop_idle_us=10))
    assert not p.start_polling(q(), 2) and p.start_polling(q(), 3)
    assert not p.stop_polling(q(), 9_999) and p.stop_polling(q(), 10_000)
    p.update(SchedSettings(polling=True, poll_start_rate=0))
    assert not p.start_polling(q(), 10**6) and p.stop_polling(q(), 0)
    base = ElvisPolicy(SchedSettings(polling=False))
    assert not base.start_polling(q(), 10**6)
    v = VhostPolicy(SchedSettings(polling=True))
    assert not v.polls and not v.multi_batch and not v.start_polling(q(), 10**6)
    c = ElvisPolicy(SchedSettings(polling=True, poll_coalescing_us=5))
    assert c.coalesced(q(last_served_ns=0), 4_999) and not c.coalesced(q(), 5_000)


def test_classes_policy_classifies_and_shortens_throughput_turns() -> None:
    s = SchedSettings(polling=True, min_processed_data_limit=1500, max_processed_data_limit=80_000)
    p = ClassesPolicy(s)
    heavy = q(worker_has_latency=lambda: True)
    for _ in range(20):
        p.after_turn(heavy, 256, 100_000, True)
    assert heavy.klass == "throughput"
    assert p.turn_limit(heavy) == 10_000
    assert not p.continue_turn(heavy, 10_000, pressure=False)
    alone = q(klass="throughput", worker_has_latency=lambda: False)
    assert p.turn_limit(alone) == 80_000
    for _ in range(20):
        p.after_turn(heavy, 3, 0, False)
    assert heavy.klass == "latency"


def test_registry_of_policies() -> None:
    assert set(POLICIES) == {"elvis", "classes", "vhost"}
    assert set(fresh_registry().param("policy").choices) == set(POLICIES)
    assert isinstance(make_policy("elvis", SchedSettings()), ElvisPolicy)
    with pytest.raises(ValueError, match="allowed"):
        make_policy("nope", SchedSettings())
