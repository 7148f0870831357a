"""iosched.params: declaration, parsing, precedence, source tracking, notification, listing."""

from __future__ import annotations

from typing import Any

import pytest

from iosched import param_types
from iosched import params as P
from iosched.params import Param, Registry, Scope, Source
from vhostx.daemon import PARAM_SPECS
from virtio.errors import ConfigError

SPECS = {p.name: p for p in PARAM_SPECS}

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
    """A registry of every declaration the daemon uses, all at defaults."""
    return Registry(PARAM_SPECS)


# ---- what is declared ----------------------------------------------------------------------


def test_every_elvis_parameter_and_extra_is_declared_with_elvis_defaults() -> None:
    for name in ELVIS_NAMES + EXTRA_NAMES:
        assert name in SPECS, name
    d = SPECS
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
    assert d["mode"].choices == ("baseline", "shared") and d["mode"].default == "shared"
    assert not d["mode"].runtime
    assert d["workers"].default == 1 and d["workers"].min == 1
    assert d["worker_cpus"].default == ""
    assert d["turn_max_packets"].default == 256
    assert d["turn_max_bytes"].default == 524288
    assert d["placement"].choices == ("first_fit", "least_loaded", "explicit")


def test_every_parameter_has_unit_description_and_valid_default() -> None:
    for p in PARAM_SPECS:
        assert p.description and "\n" not in p.description, p.name
        if p.type is int and not p.choices:
            assert p.unit, f"{p.name}: numbers need an explicit unit"
        assert p.parse(p.default) == p.default


def test_handles_read_registry_values() -> None:
    reg = fresh()
    idle, mode = reg.handle("poll_stop_idle"), reg.handle("mode")
    assert idle.get() == reg.get("poll_stop_idle") == 3_000_000
    assert mode.value == "shared" and mode.source is Source.DEFAULT
    reg.load_cmdline(["poll_stop_idle=1s"])
    assert (idle.get(), idle.source) == (1_000_000, Source.CMDLINE)


def test_declaring_twice_is_an_error() -> None:
    reg = Registry()
    reg.declare("a", int, 1, "a thing", min=0, max=3, unit="items")
    with pytest.raises(ValueError, match="declared twice"):
        reg.declare("a", int, 1, "again", min=0, max=3, unit="items")
    with pytest.raises(ValueError, match="declared twice"):
        fresh().add(SPECS["mode"])


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
    return [p for p in PARAM_SPECS if p.type in (int, float)]


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


@pytest.mark.parametrize("p", [p for p in PARAM_SPECS if p.choices], ids=lambda p: p.name)
def test_enums_refuse_unknown_choices_and_non_strings(p: Param) -> None:
    _check_refusal(p, "nope", "not a valid choice")
    _check_refusal(p, 3, "expected a string")
    for c in p.choices:
        assert p.parse(c) == c


def test_enum_refusal_suggests_close_choice() -> None:
    with pytest.raises(ConfigError, match="did you mean shared"):
        SPECS["mode"].parse("share")


def test_every_declared_parameter_has_a_range_test() -> None:
    covered = {p.name for p in _numeric()} | {p.name for p in PARAM_SPECS if p.choices}
    covered |= {"worker_cpus"}  # below
    assert covered == set(SPECS), set(SPECS) - covered


def test_worker_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(param_types.os, "cpu_count", lambda: 4)
    p = SPECS["worker_cpus"]
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
    assert SPECS["poll_stop_idle"].parse(raw) == want


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
        SPECS["poll_stop_idle"].parse(raw)
    msg = str(info.value)
    assert msg.startswith(f"poll_stop_idle={raw!r}: ") and why in msg, msg
    assert "allowed [0, 60000000] us" in msg


def test_negative_time_and_plain_negative() -> None:
    assert SPECS["max_work_stuck_us"].parse("-1") == -1
    with pytest.raises(ConfigError) as info:
        SPECS["poll_stop_idle"].parse("-5")
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
    assert SPECS["turn_max_bytes"].parse(raw) == want


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
        SPECS["turn_max_bytes"].parse(raw)
    assert why in str(info.value), str(info.value)


def test_plain_units_take_no_suffix() -> None:
    with pytest.raises(ConfigError, match="no unit suffix for packets"):
        SPECS["turn_max_packets"].parse("64k")
    with pytest.raises(ConfigError, match="no unit suffix for devices"):
        SPECS["devices_per_worker"].parse("5s")


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
    with pytest.raises(ConfigError, match="unknown parameter 'zzz'; known: busy_poll_max_us, busy_poll_us, devices_per_worker"):
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
    assert fresh().get("poll_stop_idle") == 3_000_000  # registries share no value


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
    assert set(rows) == set(SPECS)
    r = rows["poll_stop_idle"].as_dict()
    assert r == {
        "name": "poll_stop_idle",
        "type": "int",
        "value": 1_000_000,
        "default": 3_000_000,
        "range": "[0, 60000000]",
        "unit": "us",
        "runtime": True,
        "scope": "device",
        "source": "runtime",
        "description": SPECS["poll_stop_idle"].description,
        "devices": {},
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


# ---- scopes and per-device values ----------------------------------------------------------

DEVICE_SCOPE = {
    "poll_start_rate", "poll_stop_idle", "max_queue_stuck_us", "max_queue_stuck_size",
    "min_processed_data_limit", "max_processed_data_limit", "min_poll_rate", "turn_max_packets",
    "turn_max_bytes", "busy_poll_us", "busy_poll_max_us", "irq_mode", "irq_coalesce_frames",
    "irq_coalesce_us",
    "irq_adaptive_on_kpps", "irq_adaptive_off_kpps", "irq_adaptive_window_us",
    "poll_batch_target", "poll_batch_wait_max", "tx_prefetch",
}  # fmt: skip


def with_devices(*names: str) -> Registry:
    reg = fresh()
    for name in names:
        reg.add_device(name)
    return reg


def test_scopes_are_global_or_device_and_device_ones_are_read_per_queue() -> None:
    assert set(Scope) == {Scope.GLOBAL, Scope.DEVICE}
    assert {p.name for p in PARAM_SPECS if p.scope is Scope.DEVICE} == DEVICE_SCOPE


def test_device_value_from_config_beats_every_global_source_and_others_follow() -> None:
    reg = with_devices("net0", "net1")
    reg.load_config({"turn_max_packets": 64}, device="net0", where="d.toml: device net0")
    reg.set("turn_max_packets", 32)  # a run-time global value does not touch net0's own
    assert (reg.get("turn_max_packets", "net0"), reg.source("turn_max_packets", "net0")) == (
        64, Source.CONFIG)  # fmt: skip
    assert (reg.get("turn_max_packets", "net1"), reg.source("turn_max_packets", "net1")) == (
        32, Source.RUNTIME)  # fmt: skip
    assert reg.get("turn_max_packets") == 32
    assert reg.has_own("turn_max_packets", "net0") and not reg.has_own("turn_max_packets", "net1")
    assert reg.overrides("turn_max_packets") == {"net0": reg.current("turn_max_packets", "net0")}
    assert reg.device_snapshot() == {"net0": {"turn_max_packets": 64}}
    assert reg.snapshot()["turn_max_packets"] == 32


def test_device_without_own_value_follows_later_global_changes() -> None:
    reg = with_devices("net0", "net1")
    net0, net1 = reg.handle("busy_poll_us", "net0"), reg.handle("busy_poll_us", "net1")
    seen0: list[tuple[str, Any, Any]] = []
    seen1: list[tuple[str, Any, Any]] = []
    net0.subscribe(lambda *a: seen0.append(a))
    net1.subscribe(lambda *a: seen1.append(a))
    reg.set("busy_poll_us", 0, device="net1")
    reg.set("busy_poll_us", 20)  # net0 follows it, net1 keeps its own
    assert (net0.get(), net1.get()) == (20, 0)
    assert seen0 == [("busy_poll_us", 50, 20)] and seen1 == [("busy_poll_us", 50, 0)]
    assert reg.reset("busy_poll_us", device="net1") == 20  # its own value gone: follows again
    assert seen1[-1] == ("busy_poll_us", 0, 20) and not reg.has_own("busy_poll_us", "net1")
    reg.set("busy_poll_us", 30)
    assert (net0.get(), net1.get()) == (30, 30)
    assert seen1[-1] == ("busy_poll_us", 20, 30)


def test_device_values_per_source_fall_back_like_the_global_ones() -> None:
    reg = with_devices("net0")
    reg.load_config({"poll_stop_idle": "1s"}, device="net0")
    reg.load_cmdline(["poll_stop_idle@net0=2s", "poll_stop_idle=5s"])
    reg.set("poll_stop_idle", "3s", device="net0")
    assert (reg.get("poll_stop_idle", "net0"), reg.source("poll_stop_idle", "net0")) == (
        3_000_000, Source.RUNTIME)  # fmt: skip
    reg.reset("poll_stop_idle", device="net0")
    assert reg.source("poll_stop_idle", "net0") is Source.CMDLINE
    reg.reset("poll_stop_idle", Source.CMDLINE, device="net0")
    assert (reg.get("poll_stop_idle", "net0"), reg.source("poll_stop_idle", "net0")) == (
        1_000_000, Source.CONFIG)  # fmt: skip
    reg.reset("poll_stop_idle", Source.CONFIG, device="net0")
    assert (reg.get("poll_stop_idle", "net0"), reg.source("poll_stop_idle", "net0")) == (
        5_000_000, Source.CMDLINE)  # the global value again  # fmt: skip


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda r: r.set("turn_max_packets", 8, device="net9"),
         ["unknown device 'net9'", "devices: net0, net1"]),
        (lambda r: r.set("workers", 2, Source.CONFIG, device="net0"),
         ["workers@net0", "scope global", "without a device"]),
        (lambda r: r.set("turn_max_packets", 0, device="net0", where="control socket"),
         ["control socket: device net0: turn_max_packets=0: out of range, allowed [1, 65536]"]),
        (lambda r: r.set("busy_poll_us", "5ms", device="net0"),
         ["busy_poll_us='5ms': out of range (5000 us), allowed [0, 1000] us"]),
        (lambda r: r.load_config({"policy": "elvis"}, device="net1", where="d.toml"),
         ["d.toml: policy@net1", "scope global"]),
        (lambda r: r.load_cmdline(["turn_max_packets@=3"]), ["expected name=value or name@device"]),
        (lambda r: r.load_cmdline(["turn_max_packets@net7=3"]), ["unknown device 'net7'"]),
        (lambda r: r.reset("mode", Source.CONFIG, device="net0"), ["mode@net0", "scope global"]),
        (lambda r: r.handle("busy_poll_us", "nope"), ["unknown device 'nope'"]),
    ],
    ids=["unknown-device", "global-scope", "range", "suffix-range", "config-global",
         "cmdline-empty-device", "cmdline-unknown-device", "reset-global", "handle"],
)
def test_device_values_are_refused_with_what_is_allowed(call: Any, words: list[str]) -> None:
    reg = with_devices("net0", "net1")
    with pytest.raises(ConfigError) as info:
        call(reg)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert reg.device_snapshot() == {}  # nothing half-applied


def test_device_value_of_a_start_up_only_parameter_is_refused_at_run_time() -> None:
    reg = Registry([Param("ring_hint", int, 4, "start-up only, per device", unit="items",
                          min=1, max=8, scope=Scope.DEVICE)])
    reg.add_device("net0")
    with pytest.raises(ConfigError, match="ring_hint: cannot be changed at run time"):
        reg.set("ring_hint", 2, device="net0")
    reg.load_config({"ring_hint": 2}, device="net0")
    assert reg.get("ring_hint", "net0") == 2


def test_registries_are_independent() -> None:
    a, b = with_devices("net0"), with_devices("net0")
    a.set("turn_max_packets", 8)
    a.set("busy_poll_us", 0, device="net0")
    a.add_device("net1")
    assert (b.get("turn_max_packets"), b.get("busy_poll_us", "net0")) == (256, 50)
    assert b.devices() == ["net0"] and a.devices() == ["net0", "net1"]
    with pytest.raises(ConfigError, match="unknown device"):
        Registry(PARAM_SPECS).set("busy_poll_us", 0, device="net0")


def test_override_subscribers_see_device_values_only_and_can_refuse() -> None:
    reg = with_devices("net0")
    seen: list[tuple[str, str, Any, Any]] = []
    reg.subscribe_overrides(lambda *a: seen.append(a), "turn_max_bytes")
    reg.set("turn_max_bytes", "64k")  # a global change: not an override
    reg.set("turn_max_bytes", "128k", device="net0")
    assert seen == [("net0", "turn_max_bytes", 65536, 131072)]
    followed: list[tuple[str, Any, Any]] = []
    reg.subscribe(lambda *a: followed.append(a), "turn_max_bytes", device="net0")

    def refuse(name: str, old: Any, new: Any) -> None:
        raise RuntimeError("the ring cannot take it")

    reg.subscribe(refuse, "turn_max_bytes", device="net0")
    with pytest.raises(ConfigError) as info:
        reg.set("turn_max_bytes", "1M", device="net0")
    assert "turn_max_bytes@net0=1048576" in str(info.value)
    assert "the ring cannot take it" in str(info.value)
    # rolled back: its value and source as before, the subscriber that accepted told so
    assert reg.get("turn_max_bytes", "net0") == 131072
    assert followed == [("turn_max_bytes", 131072, 1048576), ("turn_max_bytes", 1048576, 131072)]
    assert len(seen) == 1  # refused before the override subscriber heard of it


def test_listing_shows_device_values_and_their_sources() -> None:
    reg = with_devices("net0", "net1")
    reg.load_config({"busy_poll_us": 0}, device="net1")
    reg.set("busy_poll_us", 10, device="net0")
    row = next(r for r in reg.describe() if r.name == "busy_poll_us")
    assert row.devices == {"net0": {"value": 10, "source": "runtime"},
                           "net1": {"value": 0, "source": "config"}}
    assert row.value == 50 and row.source == "default"
    lines = reg.format_table().splitlines()
    assert len(lines) == 1 + len(reg) + 2
    net1 = next(ln for ln in lines if ln.startswith("busy_poll_us@net1 "))
    assert net1.split()[1:3] == ["int", "0"] and "config" in net1 and "global: 50" in net1
    i = next(i for i, ln in enumerate(lines) if ln.startswith("busy_poll_us "))
    assert lines[i + 1].startswith("busy_poll_us@net0 ")  # right under its parameter


def test_a_new_device_parameter_is_one_declaration() -> None:
    """Declared as data with scope device, it gets config, command line, run-time and listing
    support per device with nothing else to write (e.g. interrupt moderation per queue)."""
    irq = Param("example_frames", int, 0, "interrupt after this many used entries",
                unit="frames", min=0, max=256, runtime=True, scope=Scope.DEVICE)
    reg = Registry([*PARAM_SPECS, irq])
    reg.add_device("net0")
    reg.add_device("net1")
    reg.load_config({"example_frames": 32}, device="net0")
    reg.load_cmdline(["example_frames=4"])
    reg.set("example_frames", "16", device="net1")
    assert [reg.get("example_frames", d) for d in ("net0", "net1")] == [32, 16]
    assert reg.get("example_frames") == 4
    with pytest.raises(ConfigError, match=r"allowed \[0, 256\] frames"):
        reg.set("example_frames", 300, device="net0")
    assert "example_frames@net0" in reg.format_table()
