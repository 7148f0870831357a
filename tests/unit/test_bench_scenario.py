"""Scenario files: every shipped one parses; every error path names the key, value and range."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bench.harness.scenario import (
    ScenarioError,
    find_scenario,
    load_scenario,
    parse_scenario,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "bench"

BASE: dict[str, Any] = {
    "name": "t",
    "run": {"duration": 1.0, "warmup": 0.5, "repeats": 2, "reference": "dpdk"},
    "backends": [
        {"name": "vx", "kind": "vhostx", "mode": "baseline", "params": {"busy_poll_us": 10}},
        {"name": "dpdk", "kind": "dpdk"},
    ],
    "tests": [{"name": "tx", "kind": "stream"}],
}


def make(**edits: Any) -> dict[str, Any]:
    """BASE with edits: a__b__0__c = value sets raw[a][b][0][c]."""
    raw = copy.deepcopy(BASE)
    if any(k.startswith("tests__1") for k in edits):
        raw["tests"].append({})
    for path, value in edits.items():
        keys = path.split("__")
        cur: Any = raw
        for k in keys[:-1]:
            cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
        if isinstance(cur, list):
            cur[int(keys[-1])] = value
        else:
            cur[keys[-1]] = value
    return raw


def _harness_scenarios() -> list[Path]:
    """The shipped scenarios the generic harness runs (a `kind` key names another runner,
    checked in tests/unit/test_configs.py)."""
    return [p for p in sorted(CONFIGS.glob("*.toml")) if "kind" not in tomllib.loads(p.read_text())]


@pytest.mark.parametrize("path", _harness_scenarios(), ids=lambda p: p.stem)
def test_shipped_scenarios_parse(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.cases()
    assert sc.reference in [b.name for b in sc.backends]


def test_client_mbcache_defaults_to_testpmds_own_and_is_kept() -> None:
    assert parse_scenario(make()).testpmd.mbcache == 0
    sc = parse_scenario(make(clients={"testpmd": {"mbcache": 512}}))
    assert sc.testpmd.mbcache == 512


def test_shipped_set_is_complete() -> None:
    names = {p.stem for p in CONFIGS.glob("*.toml")}
    assert {"smoke", "throughput", "scaling", "latency", "idle"} <= names


def test_defaults_and_params() -> None:
    sc = parse_scenario(make())
    assert sc.run.repeats == 2 and sc.placement.backend_core != sc.placement.client_core
    vx = sc.backends[0]
    assert vx.param_args() == ["mode=baseline", "busy_poll_us=10"]
    (case,) = sc.cases()
    assert case.client == "testpmd" and case.devices == 1 and case.label == "tx"


def test_params_are_checked_against_the_daemons_own_declarations() -> None:
    from vhostx.daemon import PARAM_SPECS

    every = {p.name: p.default for p in PARAM_SPECS if p.name != "mode"}
    sc = parse_scenario(make(backends__0__params=every))
    assert dict(sc.backends[0].params) == every


def test_sweep_is_cartesian_in_file_order() -> None:
    sc = parse_scenario(make(tests__0__sweep={"direction": ["guest_tx", "guest_rx"],
                                              "size": [64, 1500]}))
    got = [(c.direction, c.size) for c in sc.cases()]
    assert got == [("guest_tx", 64), ("guest_tx", 1500), ("guest_rx", 64), ("guest_rx", 1500)]
    assert sc.cases()[1].label == "tx[direction=guest_tx,size=1500]"


def test_reference_defaults_to_last_backend() -> None:
    sc = parse_scenario(make(run={"repeats": 1}))
    assert sc.reference == "dpdk"


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"run__durations": 1}, "did you mean 'duration'"),
        ({"run__duration": "5"}, "run.duration = '5': expected a number"),
        ({"run__duration": 0}, "run.duration = 0: out of range, allowed [0.1, 3600]"),
        ({"run__repeats": 1.5}, "run.repeats = 1.5: expected an integer"),
        ({"run__repeats": True}, "run.repeats = True: expected an integer"),
        ({"run__repeats": 0}, "out of range, allowed [1, 100]"),
        ({"run__reference": "nope"}, "run.reference = 'nope': not a backend"),
        ({"run": 3}, "run: expected a table"),
        ({"placement": {"backend_core": 0, "client_core": 0}}, "two pollers on one core"),
        ({"placement": {"backend_core": 99}}, "placement.backend_core = 99: out of range"),
        ({"backends": []}, "at least one [[backends]]"),
        ({"backends__1": {"name": "dpdk", "kind": "spdk"}}, "allowed vhostx | dpdk | vfio"),
        ({"backends__1": {"name": "v", "kind": "vfio"}}, "reserved slot"),
        ({"backends__1": {"name": "vx", "kind": "dpdk"}}, "used twice"),
        ({"backends__1": {"name": "dpdk", "kind": "dpdk", "mode": "shared"}},
         "key 'mode' does not apply to kind = 'dpdk'"),
        ({"backends__0__mode": "turbo"}, "mode = 'turbo': allowed baseline | shared"),
        ({"backends__0__params": {"busy_poll_us": 5000}},
         "busy_poll_us='5000': out of range, allowed [0, 1000] us"),
        ({"backends__0__params": {"busy_poll_us": "2ms"}}, "out of range (2000 us)"),
        ({"backends__0__params": {"placement": "random"}},
         "allowed one of first_fit, least_loaded, explicit"),
        ({"backends__0__params": {"turn_max_packts": 8}}, "did you mean turn_max_packets"),
        ({"backends__0__params": {"turn_max_packets@net0": 8}}, "unknown device 'net0'"),
        ({"backends__0__params": {"no_such_param": 1}}, "no_such_param"),
        ({"backends__0__params": {"mode": "shared"}}, "with the backend's own 'mode' key"),
        ({"backends__0__params": [1]}, "expected a table"),
        ({"backends__0__name": "a b"}, "expected letters, digits"),
        ({"clients": {"qemu": {"memory_mb": 64}}}, "clients.qemu.memory_mb = 64: out of range"),
        ({"clients": {"testpmd": {"queue_size": 100}}}, "expected a power of two"),
        ({"clients": {"testpmd": {"mrg_rxbuf": 1}}}, "mrg_rxbuf = 1: expected true or false"),
        ({"clients": {"testpmd": {"mbcache": 513}}}, "clients.testpmd.mbcache = 513: out of range"),
        ({"clients": {"guest_model": {"wait": "spin"}}}, "allowed interrupt | poll"),
        ({"clients": {"virtio": {}}}, "unknown key 'virtio'"),
        ({"tests": []}, "at least one [[tests]]"),
        ({"tests__0__kind": "flood"}, "allowed stream | pingpong | idle"),
        ({"tests__0__direction": "tx"}, "allowed guest_tx | guest_rx"),
        ({"tests__0__size": 59}, "size = 59: out of range, allowed [60, 9000]"),
        ({"tests__0__devices": 65}, "devices = 65: out of range, allowed [1, 64]"),
        ({"tests__0__colour": "red"}, "unknown key 'colour'"),
        ({"tests__0__busy": 2}, "busy = 2 exceeds devices = 1"),
        ({"tests__0__rate": 1000, "tests__0__client": "testpmd"}, "needs client = 'guest_model'"),
        ({"tests__0__rate": 1000, "tests__0__client": "guest_model",
          "tests__0__direction": "guest_rx"}, "rate applies to guest_tx only"),
        ({"tests__0__kind": "pingpong", "tests__0__client": "testpmd"}, "uses the guest model"),
        ({"tests__0__kind": "pingpong", "tests__0__queues": 2}, "one queue pair per device"),
        ({"tests__0__idle_time": 2.0}, "idle_time applies to kind = 'idle' only"),
        ({"tests__0__sweep": {"colour": [1]}}, "'colour' cannot be swept"),
        ({"tests__0__size": 64, "tests__0__sweep": {"size": [64]}},
         "'size' is both set and swept"),
        ({"tests__0__sweep": {"devices": []}}, "expected a non-empty list"),
        ({"tests__0__sweep": {"devices": [1, 128]}}, "128: out of range, allowed [1, 64]"),
        ({"tests__0__sweep": {"devices": [1, 1]}}, "repeated values"),
        ({"tests__0__sweep": {"devices": ["2"]}}, "expected integers"),
        ({"tests__0__sweep": {"direction": ["up"]}}, "'up': allowed guest_tx | guest_rx"),
        ({"tests__0__busy": 4, "tests__0__sweep": {"devices": [2, 8]}},
         "busy = 4 exceeds devices = 2"),
        ({"tests__1": {"name": "tx", "kind": "idle"}}, "used twice"),
    ],
)
def test_errors(edits: dict[str, Any], message: str) -> None:
    raw = make(**edits)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert message in str(err.value)


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nduration = 1")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")
    with pytest.raises(ScenarioError, match="no such scenario file"):
        find_scenario(str(tmp_path / "missing.toml"))
    with pytest.raises(ScenarioError, match="did you mean 'smoke'"):
        find_scenario("smokey")
    assert find_scenario("smoke").name == "smoke.toml"
    good = tmp_path / "x.toml"
    good.write_text('[[backends]]\nkind = "dpdk"\n[[tests]]\nkind = "idle"\n')
    sc = load_scenario(good)
    assert sc.name == "x" and sc.backends[0].name == "dpdk" and sc.tests[0].name == "idle0"
    nested = tmp_path / "n.toml"
    nested.write_text('[[backends]]\nkind = "dpdk"\n[[tests]]\nkind = "idle"\nsize = 10\n')
    with pytest.raises(ScenarioError, match=r"n.toml: tests 'idle0'.size = 10"):
        load_scenario(nested)


def test_overrides() -> None:
    sc = parse_scenario(make(tests__0__sweep={"devices": [1, 2]}))
    o = sc.with_overrides(repeats=5, duration=0.5, backends=["vx"], tests=["tx"])
    assert o.run.repeats == 5 and o.run.duration == 0.5 and [b.name for b in o.backends] == ["vx"]
    assert o.reference == "vx"  # the reference was dropped with its backend
    with pytest.raises(ScenarioError, match="--repeats 0: out of range"):
        sc.with_overrides(repeats=0)
    with pytest.raises(ScenarioError, match="'qemu' is not a backend"):
        sc.with_overrides(backends=["qemu"])
    with pytest.raises(ScenarioError, match="'rx' is not a test"):
        sc.with_overrides(tests=["rx"])
