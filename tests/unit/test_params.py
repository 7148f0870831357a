"""iosched.params: declaration, parsing, precedence, source tracking, notification, listing."""

from __future__ import annotations

from typing import Any

import pytest

from iosched import params as P
from iosched.params import REGISTRY, Param, Registry, Source
from virtio.errors import ConfigError

ELVIS_NAMES = (
    "devices_per_worker",
    "poll_start_rate",
    "poll_stop_idle",
    "poll_coalescing",
    "max_work_stuck_us",
    "max_queue_stuck_us",
    "max_queue_stuck_size",
    "min_processed_data_limit",
    "max_processed_data_limit",
    "min_poll_rate",
)
EXTRA_NAMES = (
    "mode",
    "workers",
    "worker_cpus",
    "turn_max_packets",
    "turn_max_bytes",
    "placement",
    "busy_poll_us",
)


def fresh() -> Registry:
    """A registry with a copy of every declaration of REGISTRY, all at defaults."""
    reg = Registry()
    for p in REGISTRY.params():
        reg.add(p)
    return reg


# ---- what is declared ----------------------------------------------------------------------


def test_every_elvis_parameter_and_extra_is_declared_with_elvis_defaults() -> None:
    for name in ELVIS_NAMES + EXTRA_NAMES:
        assert name in REGISTRY, name
    d = {p.name: p for p in REGISTRY.params()}
    assert d["devices_per_worker"].default == 7
    assert d["poll_start_rate"].default == 1
    assert (d["poll_stop_idle"].default, d["poll_stop_idle"].unit) == (3_000_000, "us")
    assert (d["poll_coalescing"].default, d["poll_coalescing"].unit) == (0, "us")
    assert (d["max_work_stuck_us"].default, d["max_work_stuck_us"].unit) == (-1, "us")
    assert (d["max_queue_stuck_us"].default, d["max_queue_stuck_us"].unit) == (-1, "us")
    assert d["max_queue_stuck_size"].default == 0
    assert (d["min_processed_data_limit"].default, d["min_processed_data_limit"].unit) == (
        1500,
        "bytes",
    )
    assert (d["max_processed_data_limit"].default, d["max_processed_data_limit"].unit) == (
        524288,
        "bytes",
    )
    assert d["min_poll_rate"].default == 0
    assert d["mode"].choices == ("baseline", "shared") and d["mode"].default == "baseline"
    assert not d["mode"].runtime
    assert d["workers"].default == 1 and d["workers"].min == 1
    assert d["worker_cpus"].default == ""
    assert d["turn_max_packets"].default == 256
    assert d["turn_max_bytes"].default == 524288
    assert d["placement"].choices == ("first_fit", "least_loaded", "explicit")


def test_every_parameter_has_unit_description_and_valid_default() -> None:
    for p in REGISTRY.params():
        assert p.description and "\n" not in p.description, p.name
        if p.type is int and not p.choices:
            assert p.unit, f"{p.name}: numbers need an explicit unit"
        assert p.parse(p.default) == p.default


def test_handles_read_registry_values() -> None:
    assert P.POLL_STOP_IDLE.get() == REGISTRY.get("poll_stop_idle")
    assert P.MODE.value == "baseline"
    assert P.DEVICES_PER_WORKER.source is REGISTRY.source("devices_per_worker")


def test_declaring_twice_is_an_error() -> None:
    reg = Registry()
    reg.declare("a", int, 1, "a thing", min=0, max=3, unit="items")
    with pytest.raises(ValueError, match="declared twice"):
        reg.declare("a", int, 1, "again", min=0, max=3, unit="items")
    with pytest.raises(ValueError, match="declared twice"):
        fresh().add(REGISTRY.param("mode"))


def test_bad_declarations_are_refused() -> None:
    reg = Registry()
    with pytest.raises(ValueError, match="bad default"):
        reg.declare("b", int, 9, "out of its own range", min=0, max=3, unit="items")
    with pytest.raises(ValueError, match="min and max"):
        reg.declare("c", int, 1, "no max", min=0)
    with pytest.raises(ValueError, match="one-line"):
        reg.declare("d", bool, True, "two\nlines")
    with pytest.raises(ValueError, match="name"):
        reg.declare("Bad-Name", bool, True, "x")
    assert "b" not in reg and "c" not in reg


# ---- range checks for every declared parameter ---------------------------------------------


def _numeric() -> list[Param]:
    return [p for p in REGISTRY.params() if p.type in (int, float)]


def _check_refusal(p: Param, value: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        p.parse(value)
    msg = str(info.value)
    assert msg.startswith(f"{p.name}={value!r}: "), msg
    assert reason in msg, msg
    if p.choices:
        for c in p.choices:
            assert c in msg, msg
    elif p.type in (int, float):
        assert f"allowed [{p.min}, {p.max}] {p.unit}" in msg, msg


@pytest.mark.parametrize("p", _numeric(), ids=lambda p: p.name)
def test_numbers_below_min_above_max_wrong_type(p: Param) -> None:
    assert p.min is not None and p.max is not None
    step = 1 if p.type is int else 0.5
    _check_refusal(p, p.min - step, "out of range")
    _check_refusal(p, p.max + step, "out of range")
    _check_refusal(p, str(p.min - step), "out of range")
    _check_refusal(p, str(p.max + step), "out of range")
    _check_refusal(p, "abc", "not ")
    _check_refusal(p, True, "boolean")
    _check_refusal(p, [1], "expected")
    assert p.parse(p.min) == p.min
    assert p.parse(str(p.max)) == p.max


@pytest.mark.parametrize("p", [p for p in REGISTRY.params() if p.choices], ids=lambda p: p.name)
def test_enums_refuse_unknown_choices_and_non_strings(p: Param) -> None:
    _check_refusal(p, "nope", "not a valid choice")
    _check_refusal(p, 3, "expected a string")
    for c in p.choices:
        assert p.parse(c) == c


def test_enum_refusal_suggests_close_choice() -> None:
    with pytest.raises(ConfigError, match="did you mean shared"):
        REGISTRY.parse("mode", "share")


def test_every_declared_parameter_has_a_range_test() -> None:
    covered = {p.name for p in _numeric()} | {p.name for p in REGISTRY.params() if p.choices}
    covered |= {"worker_cpus"}  # below
    assert covered == set(REGISTRY), set(REGISTRY) - covered


def test_worker_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P.os, "cpu_count", lambda: 4)
    p = REGISTRY.param("worker_cpus")
    assert p.parse(" 0-1,3 ") == "0-1,3"
    assert p.parse("") == ""
    assert P.parse_cpu_list("0-1,3") == (0, 1, 3)
    assert P.parse_cpu_list("2,1,1-2") == (1, 2)
    assert P.parse_cpu_list("") == ()
    for bad, why in [("4", "CPU 4 does not exist"), ("0-9", "CPU 9"), ("3-1", "bad CPU range"),
                     ("x", "bad CPU list item"), ("1,,2", "bad CPU list item"),
                     ("-1", "bad CPU")]:  # fmt: skip
        with pytest.raises(ConfigError) as info:
            p.parse(bad)
        msg = str(info.value)
        assert msg.startswith(f"worker_cpus={bad!r}: ") and why in msg, msg
        assert "allowed CPU list" in msg, msg
    with pytest.raises(ConfigError, match="expected a string"):
        p.parse(3)


# ---- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("3s", 3_000_000),
        ("500ms", 500_000),
        ("1.5ms", 1500),
        ("20us", 20),
        ("20µs", 20),
        ("2000ns", 2),
        ("0s", 0),
        ("42", 42),
        ("0x10", 16),
        ("1_000", 1000),
        (" 7 ", 7),
        (9, 9),
        (3.0, 3),
    ],
)
def test_time_suffixes(raw: Any, want: int) -> None:
    assert REGISTRY.parse("poll_stop_idle", raw) == want


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("3h", "unknown time suffix 'h'"),
        ("1500ns", "not a whole number of us"),
        ("0.5us", "not a whole number"),
        ("61s", "out of range (61000000 us)"),
        ("ms", "not an integer or a time"),
        ("3.5", "not an integer or a time"),
        ("64k", "unknown time suffix"),
    ],
)
def test_time_suffix_refusals(raw: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        REGISTRY.parse("poll_stop_idle", raw)
    msg = str(info.value)
    assert msg.startswith(f"poll_stop_idle={raw!r}: ") and why in msg, msg
    assert "allowed [0, 60000000] us" in msg


def test_negative_time_and_plain_negative() -> None:
    assert REGISTRY.parse("max_work_stuck_us", "-1") == -1
    with pytest.raises(ConfigError) as info:
        REGISTRY.parse("poll_stop_idle", "-5")
    assert str(info.value) == "poll_stop_idle='-5': out of range, allowed [0, 60000000] us"


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("512KiB", 524288),
        ("512kib", 524288),
        ("64k", 65536),
        ("64K", 65536),
        ("1M", 1 << 20),
        ("1MiB", 1 << 20),
        ("1500B", 1500),
        ("1500", 1500),
        ("0.5k", 512),
        (4096, 4096),
    ],
)
def test_size_suffixes(raw: Any, want: int) -> None:
    assert REGISTRY.parse("turn_max_bytes", raw) == want


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("1kb", "unknown size suffix 'kb'"),
        ("3s", "unknown size suffix 's'"),
        ("1G", "out of range (1073741824 bytes)"),
        ("0.3k", "not a whole number of bytes"),
    ],
)
def test_size_suffix_refusals(raw: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        REGISTRY.parse("turn_max_bytes", raw)
    assert why in str(info.value), str(info.value)


def test_plain_units_take_no_suffix() -> None:
    with pytest.raises(ConfigError, match="no unit suffix for packets"):
        REGISTRY.parse("turn_max_packets", "64k")
    with pytest.raises(ConfigError, match="no unit suffix for devices"):
        REGISTRY.parse("devices_per_worker", "5s")


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (True, True), (False, False), (1, True), (0, False),
        ("true", True), ("True", True), ("yes", True), ("ON", True), ("1", True),
        ("false", False), ("no", False), ("off", False), ("0", False),
    ],
)  # fmt: skip
def test_bool_parsing(raw: Any, want: bool) -> None:
    reg = Registry()
    reg.declare("flag", bool, False, "a flag")
    assert reg.parse("flag", raw) is want


def test_bool_and_float_refusals() -> None:
    reg = Registry()
    reg.declare("flag", bool, False, "a flag")
    reg.declare("ratio", float, 0.5, "a ratio", min=0.0, max=1.0, unit="")
    reg.declare("wait", float, 1.0, "a wait", min=0.0, max=10.0, unit="ms")
    with pytest.raises(ConfigError, match=r"flag='maybe': not a boolean"):
        reg.parse("flag", "maybe")
    with pytest.raises(ConfigError, match="flag=2: not a boolean"):
        reg.parse("flag", 2)
    assert reg.parse("ratio", "0.25") == 0.25
    assert reg.parse("ratio", 1) == 1.0
    with pytest.raises(ConfigError, match=r"ratio='nan': not a finite number"):
        reg.parse("ratio", "nan")
    with pytest.raises(ConfigError, match=r"ratio=1.5: out of range, allowed \[0.0, 1.0\]"):
        reg.parse("ratio", 1.5)
    assert reg.parse("wait", "500us") == 0.5
    assert reg.parse("wait", "2ms") == 2.0
    with pytest.raises(ConfigError, match=r"wait='2s': out of range \(2000.0 ms\)"):
        reg.parse("wait", "2s")


# ---- unknown names -------------------------------------------------------------------------


def test_unknown_name_suggests_close_matches() -> None:
    reg = fresh()
    with pytest.raises(
        ConfigError, match=r"unknown parameter 'poll_stop_idl'; did you mean poll_stop_idle"
    ):
        reg.set("poll_stop_idl", 5)
    with pytest.raises(ConfigError, match="did you mean devices_per_worker"):
        reg.load_cmdline(["device_per_worker=3"])
    with pytest.raises(ConfigError, match="unknown parameter 'zzz'; known: busy_poll_us, devices_per_worker"):
        reg.get("zzz")
    with pytest.raises(ConfigError, match="did you mean"):
        reg.subscribe(lambda *a: None, "turn_max_packet")


# ---- sources and precedence ----------------------------------------------------------------


def test_four_sources_in_rising_precedence_and_source_tracking() -> None:
    reg = fresh()
    assert (reg.get("poll_stop_idle"), reg.source("poll_stop_idle")) == (3_000_000, Source.DEFAULT)

    reg.load_config({"poll_stop_idle": "2s", "devices_per_worker": 4, "mode": "shared"})
    assert (reg.get("poll_stop_idle"), reg.source("poll_stop_idle")) == (2_000_000, Source.CONFIG)

    reg.load_cmdline(["poll_stop_idle=1s", "turn_max_packets = 64"])
    assert (reg.get("poll_stop_idle"), reg.source("poll_stop_idle")) == (1_000_000, Source.CMDLINE)

    reg.set("poll_stop_idle", "10ms")
    assert (reg.get("poll_stop_idle"), reg.source("poll_stop_idle")) == (10_000, Source.RUNTIME)

    # A lower source set later does not override a higher one, but is kept underneath.
    reg.load_config({"poll_stop_idle": "5s"})
    assert (reg.get("poll_stop_idle"), reg.source("poll_stop_idle")) == (10_000, Source.RUNTIME)
    assert reg.reset("poll_stop_idle") == 1_000_000
    assert reg.source("poll_stop_idle") is Source.CMDLINE
    reg.reset("poll_stop_idle", Source.CMDLINE)
    assert (reg.get("poll_stop_idle"), reg.source("poll_stop_idle")) == (5_000_000, Source.CONFIG)
    reg.reset("poll_stop_idle", Source.CONFIG)
    assert (reg.get("poll_stop_idle"), reg.source("poll_stop_idle")) == (3_000_000, Source.DEFAULT)

    assert (reg.get("devices_per_worker"), reg.source("devices_per_worker")) == (4, Source.CONFIG)
    assert (reg.get("turn_max_packets"), reg.source("turn_max_packets")) == (64, Source.CMDLINE)
    assert (reg.get("mode"), reg.source("mode")) == ("shared", Source.CONFIG)
    assert reg.source("workers") is Source.DEFAULT
    rows = {r.name: r for r in reg.describe()}
    assert rows["devices_per_worker"].source == "config"
    assert rows["turn_max_packets"].source == "cmdline"
    assert rows["workers"].source == "default"
    assert REGISTRY.get("poll_stop_idle") == 3_000_000  # fresh() did not touch the global one


def test_cmdline_later_wins_and_bad_items() -> None:
    reg = fresh()
    reg.load_cmdline(["workers=2", "workers=3"])
    assert reg.get("workers") == 3
    with pytest.raises(ConfigError, match="--param 'workers': expected name=value"):
        reg.load_cmdline(["workers"])
    with pytest.raises(
        ConfigError, match=r"--param: workers='0': out of range, allowed \[1, 1024\]"
    ):
        reg.load_cmdline(["workers=0"])


def test_config_table_is_all_or_nothing_and_names_where() -> None:
    reg = fresh()
    with pytest.raises(ConfigError) as info:
        reg.load_config({"workers": 4, "poll_start_rate": -1}, where="cfg.toml [params]")
    assert str(info.value).startswith("cfg.toml [params]: poll_start_rate=-1: out of range")
    assert reg.get("workers") == 1 and reg.source("workers") is Source.DEFAULT
    with pytest.raises(ConfigError, match="expected a table"):
        reg.load_config([("workers", 2)])  # type: ignore[arg-type]
    reg.load_config({"workers": "4", "placement": "least_loaded", "turn_max_bytes": "64k"})
    assert reg.snapshot()["turn_max_bytes"] == 65536


def test_runtime_refuses_non_runtime_params() -> None:
    reg = fresh()
    for p in reg.params():
        if p.runtime:
            continue
        with pytest.raises(ConfigError, match=f"{p.name}: cannot be changed at run time"):
            reg.set(p.name, p.default)
        with pytest.raises(ConfigError, match="cannot be changed at run time"):
            reg.reset(p.name)
    assert reg.source("mode") is Source.DEFAULT
    # The same parameter is fine from the config file and the command line.
    reg.load_config({"mode": "shared"})
    reg.load_cmdline(["workers=2"])
    assert (reg.get("mode"), reg.get("workers")) == ("shared", 2)


def test_runtime_set_validates_before_applying() -> None:
    reg = fresh()
    calls: list[Any] = []
    reg.subscribe(lambda *a: calls.append(a))
    with pytest.raises(ConfigError):
        reg.set_many({"poll_stop_idle": "1s", "poll_coalescing": "-1"})
    assert reg.get("poll_stop_idle") == 3_000_000 and calls == []
    with pytest.raises(ConfigError, match="defaults are fixed"):
        reg.set("poll_stop_idle", 1, Source.DEFAULT)


# ---- notification and rollback -------------------------------------------------------------


def test_subscribers_per_parameter_and_for_all() -> None:
    reg = fresh()
    one: list[tuple[str, Any, Any]] = []
    every: list[tuple[str, Any, Any]] = []
    unsub = reg.handle("poll_stop_idle").subscribe(lambda n, o, v: one.append((n, o, v)))
    reg.subscribe(lambda n, o, v: every.append((n, o, v)))
    reg.set("poll_stop_idle", "1ms")
    reg.set("turn_max_packets", 32)
    reg.set("turn_max_packets", "32")  # no change: no call
    assert one == [("poll_stop_idle", 3_000_000, 1000)]
    assert every == [("poll_stop_idle", 3_000_000, 1000), ("turn_max_packets", 256, 32)]
    unsub()
    reg.set("poll_stop_idle", 7)
    assert len(one) == 1 and every[-1] == ("poll_stop_idle", 1000, 7)
    reg.reset("poll_stop_idle")
    assert every[-1] == ("poll_stop_idle", 7, 3_000_000)


def test_subscriber_sees_new_value_applied() -> None:
    reg = fresh()
    seen: list[int] = []
    reg.subscribe(lambda n, o, v: seen.append(reg.get(n)), "poll_coalescing")
    reg.set("poll_coalescing", "20us")
    assert seen == [20]


def test_subscriber_raising_rolls_back() -> None:
    reg = fresh()
    reg.load_cmdline(["poll_stop_idle=1s"])
    log: list[tuple[str, Any, Any]] = []

    def first(name: str, old: Any, new: Any) -> None:
        log.append((name, old, new))

    def refuse(name: str, old: Any, new: Any) -> None:
        raise RuntimeError("worker 3 cannot take it")

    reg.subscribe(first, "poll_stop_idle")
    reg.subscribe(refuse, "poll_stop_idle")
    with pytest.raises(ConfigError) as info:
        reg.set("poll_stop_idle", "2s")
    msg = str(info.value)
    assert "poll_stop_idle=2000000" in msg and "worker 3 cannot take it" in msg, msg
    assert isinstance(info.value.__cause__, RuntimeError)
    # No half-applied value: value, source and layers are as before.
    assert (reg.get("poll_stop_idle"), reg.source("poll_stop_idle")) == (1_000_000, Source.CMDLINE)
    reg.reset("poll_stop_idle")  # no runtime layer was left behind
    assert reg.get("poll_stop_idle") == 1_000_000
    # The subscriber that had accepted was told the change was undone.
    assert log == [
        ("poll_stop_idle", 1_000_000, 2_000_000),
        ("poll_stop_idle", 2_000_000, 1_000_000),
    ]


def test_rollback_of_a_batch_restores_every_value() -> None:
    reg = fresh()

    def refuse_bytes(name: str, old: Any, new: Any) -> None:
        raise ValueError("too big for the ring")

    reg.subscribe(refuse_bytes, "turn_max_bytes")
    with pytest.raises(ConfigError, match="too big for the ring"):
        reg.set_many({"turn_max_packets": 64, "turn_max_bytes": "1M"})
    assert reg.get("turn_max_packets") == 256 and reg.get("turn_max_bytes") == 524288
    assert reg.source("turn_max_packets") is Source.DEFAULT


def test_values_are_replaced_not_mutated() -> None:
    reg = fresh()
    before = reg.current("turn_max_packets")
    reg.set("turn_max_packets", 8)
    after = reg.current("turn_max_packets")
    assert before is not after and before.value == 256 and after.value == 8
    with pytest.raises(AttributeError):
        after.value = 9  # type: ignore[misc]


# ---- listing -------------------------------------------------------------------------------


def test_describe_rows() -> None:
    reg = fresh()
    reg.set("poll_stop_idle", "1s")
    rows = {r.name: r for r in reg.describe()}
    assert set(rows) == set(REGISTRY)
    r = rows["poll_stop_idle"].as_dict()
    assert r == {
        "name": "poll_stop_idle",
        "type": "int",
        "value": 1_000_000,
        "default": 3_000_000,
        "range": "[0, 60000000]",
        "unit": "us",
        "runtime": True,
        "scope": "queue",
        "source": "runtime",
        "description": REGISTRY.param("poll_stop_idle").description,
    }
    assert rows["mode"].type == "enum" and rows["mode"].range == "baseline|shared"


def test_format_table_contains_every_parameter() -> None:
    reg = fresh()
    reg.load_cmdline(["workers=2"])
    text = reg.format_table()
    lines = text.splitlines()
    assert lines[0].split()[:9] == [
        "NAME", "TYPE", "VALUE", "DEFAULT", "RANGE", "UNIT", "RT", "SCOPE", "SOURCE",
    ]  # fmt: skip
    assert len(lines) == 1 + len(reg)
    for p in reg.params():
        line = next((ln for ln in lines if ln.split()[0] == p.name), None)
        assert line is not None, p.name
        assert p.description in line
        assert p.unit in line
    workers = next(ln for ln in lines if ln.startswith("workers "))
    assert workers.split()[2:4] == ["2", "1"] and "cmdline" in workers
    worker_cpus = next(ln for ln in lines if ln.startswith("worker_cpus "))
    assert '""' in worker_cpus
