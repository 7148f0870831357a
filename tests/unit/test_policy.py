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


def on(device: str, **kw):
    """A queue state of a work of `device`."""
    return q(work=SimpleNamespace(name=f"{device}.tx0", device=device), **kw)


def device_registry(*devices: str) -> Registry:
    reg = fresh_registry()
    for d in devices:
        reg.add_device(d)
    return reg


def test_from_registry_carries_each_devices_own_settings_and_the_rest_follow() -> None:
    reg = device_registry("net0", "net1", "net2")
    reg.load_config({"turn_max_packets": 32, "poll_stop_idle": "1ms"}, device="net0")
    reg.set("min_poll_rate", 50, device="net1")
    reg.set("turn_max_bytes", "64k")  # global: every device that has no own value follows
    s = SchedSettings.from_registry(reg, mode="shared")
    assert [d for d, _ in s.devices] == ["net0", "net1"]  # net2 has nothing of its own
    n0, n1 = s.for_device("net0"), s.for_device("net1")
    assert (n0.turn_max_packets, n0.poll_stop_idle_us, n0.turn_max_bytes) == (32, 1000, 65536)
    assert (n1.turn_max_packets, n1.min_poll_rate, n1.turn_max_bytes) == (256, 50, 65536)
    assert s.for_device("net2") is s and s.for_device("unknown") is s
    assert n0.polling and not n0.devices
    assert len(s.every()) == 3
    assert not SchedSettings.from_registry(reg, mode="baseline").for_device("net0").polling


def test_policy_decides_with_the_settings_of_the_queues_device() -> None:
    reg = device_registry("net0", "net1")
    reg.set_many({"turn_max_packets": 16, "turn_max_bytes": "4k", "poll_start_rate": 0,
                  "max_processed_data_limit": 3000, "min_poll_rate": 1000,
                  "max_queue_stuck_us": 100}, device="net0")  # fmt: skip
    s = SchedSettings.from_registry(reg, mode="shared")
    for p in (ElvisPolicy(s), ClassesPolicy(s)):
        assert p.batch_budget(on("net0")) == (16, 4096)
        assert p.batch_budget(on("net1")) == (256, 524288)
        assert p.batch_budget(q()) == (256, 524288)  # a work of no device: the global values
        assert not p.start_polling(on("net0"), 10**6) and p.start_polling(on("net1"), 1)
        assert p.stop_polling(on("net0"), 0) and not p.stop_polling(on("net1"), 0)
        assert not p.continue_turn(on("net0"), 3000, pressure=False)
        assert p.continue_turn(on("net1"), 3000, pressure=False)
        assert p.overdue(on("net0"), 1_000_000) and not p.overdue(on("net1"), 10**12)
        assert p.stuck(on("net0"), 2, 100_000) and not p.stuck(on("net1"), 2, 10**12)
    assert ClassesPolicy(s).turn_limit(on("net0", klass="throughput",
                                          worker_has_latency=lambda: True)) == 1500
    # a later snapshot after a global change: net1 follows it, net0 keeps its own
    reg.set("turn_max_packets", 64)
    p = ElvisPolicy(s)
    p.update(SchedSettings.from_registry(reg, mode="shared"))
    assert p.batch_budget(on("net0"))[0] == 16 and p.batch_budget(on("net1"))[0] == 64


def test_parameters_are_declared_beside_their_readers() -> None:
    from iosched import pool
    from vhostx import daemon, heap, irq, net

    assert {p.name for p in PARAMS} == {
        "poll_start_rate", "poll_stop_idle", "poll_coalescing", "max_work_stuck_us",
        "max_queue_stuck_us", "max_queue_stuck_size", "min_processed_data_limit",
        "max_processed_data_limit", "min_poll_rate", "turn_max_packets", "turn_max_bytes",
        "poll_round_us", "poll_round_max_us", "poll_batch_target", "poll_batch_wait_max",
        "tx_prefetch", "tx_prefetch_recheck", "policy",
    }  # fmt: skip
    assert {p.name for p in pool.PARAMS} == {
        "workers", "worker_cpus", "placement", "devices_per_worker", "max_workers"}
    assert [p.name for p in daemon.PARAMS] == ["mode"]
    assert [p.name for p in net.PARAMS] == ["busy_poll_us", "busy_poll_max_us"]
    assert [p.name for p in irq.PARAMS] == [
        "irq_mode", "irq_coalesce_frames", "irq_coalesce_us", "irq_adaptive_on_kpps",
        "irq_adaptive_off_kpps", "irq_adaptive_window_us"]
    assert [p.name for p in heap.PARAMS] == ["heap_trim_s"]
    assert set(daemon.PARAM_SPECS) == {*PARAMS, *pool.PARAMS, *daemon.PARAMS, *net.PARAMS,
                                       *irq.PARAMS, *heap.PARAMS}


def test_a_new_per_device_worker_parameter_is_one_settings_field() -> None:
    """What interrupt moderation per queue will need: one field, and from_registry carries the
    global value and every device's own to the workers."""
    from dataclasses import dataclass

    from iosched.params import Param, Scope
    from iosched.policy import settings_field

    frames = Param("irq_coalesce_frames", int, 0, "interrupt after this many used entries",
                   unit="frames", min=0, max=256, runtime=True, scope=Scope.DEVICE)

    @dataclass(frozen=True)
    class Extended(SchedSettings):
        irq_coalesce_frames: int = settings_field(frames)

    reg = Registry([*PARAMS, frames])
    reg.add_device("net0")
    reg.add_device("net1")
    reg.load_config({"irq_coalesce_frames": 32}, device="net0")
    reg.set("irq_coalesce_frames", 4)
    s = Extended.from_registry(reg, mode="shared")
    assert s.irq_coalesce_frames == 4
    assert s.for_device("net0").irq_coalesce_frames == 32
    assert s.for_device("net1").irq_coalesce_frames == 4  # follows the global value
    assert not hasattr(SchedSettings(), "irq_coalesce_frames")  # the base class is unchanged
