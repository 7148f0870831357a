"""Scenario files: TOML data naming backends, clients, traffic, placement and repetitions.

`load_scenario(path)` / `parse_scenario(dict)` check every key before anything starts and raise
`ScenarioError` (a `ConfigError`) naming where the key is, the value that came and what is
allowed: unknown keys (with close matches), wrong types, values out of range, inconsistent
combinations (a paced rate with testpmd, guest RX with a rate, a reference that is not a backend).
`Scenario.cases()` expands each test's sweep (cartesian product, in file order) into `Case`s.

The format is documented key by key in docs/harness.md. Pure module: no I/O beyond reading the
file; any thread.
"""

from __future__ import annotations

import difflib
import itertools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from virtio.errors import ConfigError

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "Case",
    "GuestModelClient",
    "ModeSettings",
    "Placement",
    "QemuClient",
    "RunSettings",
    "Scenario",
    "ScenarioError",
    "TestSpec",
    "TestpmdClient",
    "find_scenario",
    "load_scenario",
    "parse_scenario",
    "scenario_dirs",
]

BACKEND_KINDS = ("vhostx", "dpdk", "vfio")
TEST_KINDS = ("stream", "pingpong", "idle")
DIRECTIONS = ("guest_tx", "guest_rx")
MODES = ("baseline", "shared")
SWEEPABLE = ("devices", "busy", "size", "rate", "queues", "direction")
MAX_DEVICES = 64


class ScenarioError(ConfigError):
    """A scenario file is invalid: the message names the key, the value and what is allowed."""


# ----------------------------------------------------------------------------------------------
# the data


@dataclass(frozen=True)
class RunSettings:
    duration: float = 5.0  # measurement window, seconds
    warmup: float = 2.0  # excluded, before the window
    repeats: int = 3  # runs per backend per case (A B A B ...)
    quiet_wait: float = 0.0  # before each run wait up to this long for idle cores (0: off)
    quiet_cores: float = 1.5  # idle cores wanted
    reference: str = ""  # backend the ratios are against ("" -> the last backend)
    min_pairs: int = 0  # same-mode pairs wanted per compared backend and case (0: min(3, repeats))
    max_extra_repeats: int = -1  # extra repetitions allowed per case to get them (-1: repeats)

    @property
    def pairs_wanted(self) -> int:
        return self.min_pairs or min(3, self.repeats)

    @property
    def extra_limit(self) -> int:
        return self.repeats if self.max_extra_repeats < 0 else self.max_extra_repeats


@dataclass(frozen=True)
class ModeSettings:
    """How each run's machine mode is found (`[modes]`, bench/harness/modes.py)."""

    probe: str = "dpdk"  # "dpdk": a DPDK-vs-DPDK reference probe before and after each run
    probe_duration: float = 0.5  # s, the probe's window
    gap: float = 1.8  # ratio between neighbouring rates that separates two modes
    slices: int = 4  # parts of a run's window whose rates are compared (1: off)

    def as_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "probe_duration": self.probe_duration, "gap": self.gap,
                "slices": self.slices}


@dataclass(frozen=True)
class Placement:
    backend_core: int = 1  # backend threads (vhostx daemon affinity, DPDK forwarding lcore)
    client_core: int = 0  # the client (testpmd forwarding lcore, the guest model's thread)


@dataclass(frozen=True)
class Backend:
    name: str
    kind: str  # vhostx | dpdk | vfio (reserved)
    mode: str = "baseline"  # vhostx
    params: tuple[tuple[str, Any], ...] = ()  # vhostx --param name=value, in file order
    memory_mb: int = 1024  # dpdk
    total_num_mbufs: int = 0  # dpdk; 0: sized from the number of devices
    burst: int = 0  # dpdk; 0: testpmd's default (32)

    def param_args(self) -> list[str]:
        """The daemon's --param items: mode first, then the scenario's params."""
        items = [f"mode={self.mode}"]
        items += [f"{k}={_param_text(v)}" for k, v in self.params]
        return items


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class TestpmdClient:
    queue_size: int = 0  # 0: DPDK's default (256)
    burst: int = 0  # 0: default (32)
    memory_mb: int = 1024
    total_num_mbufs: int = 0  # 0: sized from the number of devices
    mrg_rxbuf: bool | None = None
    in_order: bool | None = None
    packed_vq: bool | None = None


@dataclass(frozen=True)
class GuestModelClient:
    queue_size: int = 256
    wait: str = "interrupt"  # pingpong: wait for the call eventfd, or "poll" the used ring
    mem_mb: int = 16  # guest memory per device


@dataclass(frozen=True)
class QemuClient:
    memory_mb: int = 256  # guest RAM (memfd, shared with the backend)
    boot_timeout: float = 180.0  # s from QEMU start to the guest's VX-READY


@dataclass(frozen=True)
class TestSpec:
    """One [[tests]] entry before its sweep is expanded."""

    __test__ = False

    name: str
    kind: str  # stream | pingpong | idle
    direction: str = "guest_tx"
    size: int = 64
    devices: int = 1
    busy: int = 0  # stream: devices carrying traffic (0: all)
    queues: int = 1  # queue pairs per device
    rate: int = 0  # stream: offered packets/s per device (0: unlimited, testpmd)
    client: str = ""  # "" -> testpmd for unlimited streams, guest_model otherwise; or qemu
    idle_time: float = 0.0  # idle: seconds without traffic before the window
    pingpong_alongside: bool = False  # stream: one more device carrying a guest-model ping-pong
    pingpong_rate: int = 1000  # round trips/s the alongside flow attempts (0: back to back)
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()


@dataclass(frozen=True)
class Case:
    """One point of a test: every dimension fixed."""

    test: str
    kind: str
    direction: str
    size: int
    devices: int
    busy: int
    queues: int
    rate: int
    client: str
    idle_time: float
    sweep_values: tuple[tuple[str, Any], ...] = ()
    pingpong_alongside: bool = False  # one more device (not counted in `devices`): a ping-pong
    pingpong_rate: int = 1000  # flow by the guest model during the stream's window

    @property
    def label(self) -> str:
        if not self.sweep_values:
            return self.test
        return self.test + "[" + ",".join(f"{k}={v}" for k, v in self.sweep_values) + "]"

    @property
    def busy_devices(self) -> int:
        return self.devices if self.busy == 0 else self.busy


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: RunSettings
    placement: Placement
    backends: tuple[Backend, ...]
    testpmd: TestpmdClient
    guest_model: GuestModelClient
    tests: tuple[TestSpec, ...]
    source: str = ""  # the file it came from
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    qemu: QemuClient = QemuClient()
    modes: ModeSettings = ModeSettings()

    @property
    def reference(self) -> str:
        return self.run.reference or self.backends[-1].name

    def cases(self) -> list[Case]:
        out: list[Case] = []
        for t in self.tests:
            keys = [k for k, _ in t.sweep]
            for combo in itertools.product(*(vals for _, vals in t.sweep)) if t.sweep else [()]:
                values = dict(zip(keys, combo, strict=True))
                base = replace(t, **values) if values else t
                client = base.client or ("testpmd" if base.kind == "stream" and base.rate == 0
                                         else "guest_model")
                case = Case(base.name, base.kind, base.direction, base.size, base.devices,
                            base.busy, base.queues, base.rate, client, base.idle_time,
                            tuple(values.items()), base.pingpong_alongside,
                            base.pingpong_rate)
                _check_case(case, f"tests '{t.name}'" + (f" sweep {values}" if values else ""))
                out.append(case)
        return out

    def with_overrides(self, *, repeats: int | None = None, duration: float | None = None,
                       warmup: float | None = None, quiet_wait: float | None = None,
                       backends: list[str] | None = None,
                       tests: list[str] | None = None, min_pairs: int | None = None,
                       max_extra_repeats: int | None = None,
                       probe: str | None = None) -> Scenario:
        """The scenario with command-line overrides applied (validated like the file)."""
        run = self.run
        for key, value, lo, hi in (("repeats", repeats, 1, 100), ("duration", duration, 0.1, 3600),
                                   ("warmup", warmup, 0.0, 600), ("quiet_wait", quiet_wait, 0, 3600),
                                   ("min_pairs", min_pairs, 0, 100),
                                   ("max_extra_repeats", max_extra_repeats, -1, 100)):
            if value is not None:
                if not lo <= value <= hi:
                    raise ScenarioError(f"--{key.replace('_', '-')} {value}: out of range, "
                                        f"allowed [{lo}, {hi}]")
                run = replace(run, **{key: value})  # type: ignore[arg-type]
        sc = replace(self, run=run)
        if probe is not None:
            if probe not in ("dpdk", "none"):
                raise ScenarioError(f"--probe {probe!r}: allowed dpdk | none")
            sc = replace(sc, modes=replace(sc.modes, probe=probe))
        if backends:
            known = [b.name for b in self.backends]
            for name in backends:
                if name not in known:
                    raise ScenarioError(f"--backends: {name!r} is not a backend of this scenario; "
                                        f"known: {', '.join(known)}")
            sc = replace(sc, backends=tuple(b for b in self.backends if b.name in backends))
            if sc.run.reference and sc.run.reference not in backends:
                sc = replace(sc, run=replace(sc.run, reference=""))
        if tests:
            known = [t.name for t in self.tests]
            for name in tests:
                if name not in known:
                    raise ScenarioError(f"--tests: {name!r} is not a test of this scenario; "
                                        f"known: {', '.join(known)}")
            sc = replace(sc, tests=tuple(t for t in self.tests if t.name in tests))
        return sc


# ----------------------------------------------------------------------------------------------
# validation helpers


def _close(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=2)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


def _check_keys(table: Mapping[str, Any], known: list[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ScenarioError(f"{where}: unknown key {key!r}{_close(key, known)}; "
                                f"known keys: {', '.join(known)}")


def _table(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{where}{key}: expected a table, got {type(value).__name__} {value!r}")
    return value


def _int(table: Mapping[str, Any], key: str, default: int, lo: int, hi: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where}.{key} = {value!r}: expected an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise ScenarioError(f"{where}.{key} = {value}: out of range, allowed [{lo}, {hi}]")
    return value


def _float(table: Mapping[str, Any], key: str, default: float, lo: float, hi: float,
           where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}.{key} = {value!r}: expected a number in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise ScenarioError(f"{where}.{key} = {value}: out of range, allowed [{lo}, {hi}]")
    return float(value)


def _str(table: Mapping[str, Any], key: str, default: str, where: str,
         choices: tuple[str, ...] | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ScenarioError(f"{where}.{key} = {value!r}: expected a string"
                            + (f", one of {', '.join(choices)}" if choices else ""))
    if choices is not None and value not in choices:
        raise ScenarioError(f"{where}.{key} = {value!r}: allowed {' | '.join(choices)}"
                            f"{_close(value, list(choices))}")
    return value


def _bool(table: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = _opt_bool(table, key, where)
    return default if value is None else value


def _opt_bool(table: Mapping[str, Any], key: str, where: str) -> bool | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}.{key} = {value!r}: expected true or false")
    return value


# ----------------------------------------------------------------------------------------------
# sections

_TOP = ["name", "description", "run", "placement", "modes", "backends", "clients", "tests"]
_RUN = ["duration", "warmup", "repeats", "quiet_wait", "quiet_cores", "reference", "min_pairs",
        "max_extra_repeats"]
_MODES = ["probe", "probe_duration", "gap", "slices"]
_PLACEMENT = ["backend_core", "client_core"]
_BACKEND = ["name", "kind", "mode", "params", "memory_mb", "total_num_mbufs", "burst"]
_CLIENTS = ["testpmd", "guest_model", "qemu"]
_TESTPMD = ["queue_size", "burst", "memory_mb", "total_num_mbufs", "mrg_rxbuf", "in_order",
            "packed_vq"]
_GUEST_MODEL = ["queue_size", "wait", "mem_mb"]
_QEMU = ["memory_mb", "boot_timeout"]
CLIENTS = ("testpmd", "guest_model", "qemu")
_TEST = ["name", "kind", "direction", "size", "devices", "busy", "queues", "rate", "client",
         "idle_time", "pingpong_alongside", "pingpong_rate", "sweep"]


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def _parse_run(raw: Mapping[str, Any]) -> RunSettings:
    t = _table(raw, "run", "")
    _check_keys(t, _RUN, "[run]")
    w = "run"
    return RunSettings(
        duration=_float(t, "duration", 5.0, 0.1, 3600, w),
        warmup=_float(t, "warmup", 2.0, 0.0, 600, w),
        repeats=_int(t, "repeats", 3, 1, 100, w),
        quiet_wait=_float(t, "quiet_wait", 0.0, 0.0, 3600, w),
        quiet_cores=_float(t, "quiet_cores", 1.5, 0.0, 1024, w),
        reference=_str(t, "reference", "", w),
        min_pairs=_int(t, "min_pairs", 0, 0, 100, w),
        max_extra_repeats=_int(t, "max_extra_repeats", -1, -1, 100, w),
    )


def _parse_modes(raw: Mapping[str, Any]) -> ModeSettings:
    t = _table(raw, "modes", "")
    _check_keys(t, _MODES, "[modes]")
    w = "modes"
    return ModeSettings(probe=_str(t, "probe", "dpdk", w, ("dpdk", "none")),
                        probe_duration=_float(t, "probe_duration", 0.5, 0.1, 10.0, w),
                        gap=_float(t, "gap", 1.8, 1.2, 10.0, w),
                        slices=_int(t, "slices", 4, 1, 20, w))


def _parse_placement(raw: Mapping[str, Any]) -> Placement:
    t = _table(raw, "placement", "")
    _check_keys(t, _PLACEMENT, "[placement]")
    hi = max(0, _cpu_count() - 1)
    p = Placement(_int(t, "backend_core", min(1, hi), 0, hi, "placement"),
                  _int(t, "client_core", 0, 0, hi, "placement"))
    if p.backend_core == p.client_core and _cpu_count() > 1:
        raise ScenarioError(f"placement: backend_core and client_core are both {p.client_core}: "
                            "two pollers on one core collapse (about 30 kpps); give them "
                            "distinct cores")
    return p


def _parse_backend(t: Any, i: int) -> Backend:
    where = f"backends[{i}]"
    if not isinstance(t, Mapping):
        raise ScenarioError(f"{where}: expected a table ([[backends]]), got {t!r}")
    _check_keys(t, _BACKEND, f"[[backends]] #{i}")
    kind = _str(t, "kind", "", where, BACKEND_KINDS)
    name = _str(t, "name", kind, where)
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ScenarioError(f"{where}.name = {name!r}: expected letters, digits, '-', '_', '.'")
    where = f"backends '{name}'"
    if kind == "vfio":
        raise ScenarioError(f"{where}: kind = 'vfio' is a reserved slot (VFIO passthrough needs an "
                            "IOMMU this machine lacks); not runnable yet")
    allowed = {"vhostx": ["name", "kind", "mode", "params"],
               "dpdk": ["name", "kind", "memory_mb", "total_num_mbufs", "burst"]}[kind]
    for key in t:
        if key not in allowed:
            raise ScenarioError(f"{where}: key {key!r} does not apply to kind = {kind!r}; "
                                f"allowed: {', '.join(allowed)}")
    params: tuple[tuple[str, Any], ...] = ()
    if "params" in t:
        ptab = t["params"]
        if not isinstance(ptab, Mapping):
            raise ScenarioError(f"{where}.params = {ptab!r}: expected a table like "
                                "{ workers = 1, busy_poll_us = 0 }")
        params = tuple(ptab.items())
        _check_vhostx_params(params, where)
    return Backend(
        name=name, kind=kind,
        mode=_str(t, "mode", "baseline", where, MODES) if kind == "vhostx" else "",
        params=params,
        memory_mb=_int(t, "memory_mb", 1024, 64, 65536, where),
        total_num_mbufs=_int(t, "total_num_mbufs", 0, 0, 4_000_000, where),
        burst=_int(t, "burst", 0, 0, 512, where),
    )


def _check_vhostx_params(params: tuple[tuple[str, Any], ...], where: str) -> None:
    """Check names, types and ranges against the daemon's own parameter declarations
    (vhostx.daemon.PARAM_SPECS, the specs `vhostx params` lists): all of them at once, as the
    daemon's --param would."""
    from vhostx.daemon import new_registry

    for key, value in params:
        if key == "mode":
            raise ScenarioError(f"{where}.params.mode: set the mode with the backend's own "
                                "'mode' key, not in params")
        if isinstance(value, list | dict):
            raise ScenarioError(f"{where}.params.{key} = {value!r}: expected a scalar")
    try:
        new_registry().load_cmdline(f"{k}={_param_text(v)}" for k, v in params)
    except ConfigError as err:
        raise ScenarioError(f"{where}.params: {err}") from err


def _parse_clients(raw: Mapping[str, Any]) -> tuple[TestpmdClient, GuestModelClient,
                                                    QemuClient]:
    t = _table(raw, "clients", "")
    _check_keys(t, _CLIENTS, "[clients]")
    qm = _table(t, "qemu", "clients.")
    _check_keys(qm, _QEMU, "[clients.qemu]")
    qemu = QemuClient(memory_mb=_int(qm, "memory_mb", 256, 128, 8192, "clients.qemu"),
                      boot_timeout=_float(qm, "boot_timeout", 180.0, 10.0, 1200.0,
                                          "clients.qemu"))
    tp = _table(t, "testpmd", "clients.")
    _check_keys(tp, _TESTPMD, "[clients.testpmd]")
    w = "clients.testpmd"
    qs = _int(tp, "queue_size", 0, 0, 32768, w)
    if qs and qs & (qs - 1):
        raise ScenarioError(f"{w}.queue_size = {qs}: expected a power of two (or 0: default)")
    testpmd = TestpmdClient(
        queue_size=qs, burst=_int(tp, "burst", 0, 0, 512, w),
        memory_mb=_int(tp, "memory_mb", 1024, 64, 65536, w),
        total_num_mbufs=_int(tp, "total_num_mbufs", 0, 0, 4_000_000, w),
        mrg_rxbuf=_opt_bool(tp, "mrg_rxbuf", w), in_order=_opt_bool(tp, "in_order", w),
        packed_vq=_opt_bool(tp, "packed_vq", w),
    )
    gm = _table(t, "guest_model", "clients.")
    _check_keys(gm, _GUEST_MODEL, "[clients.guest_model]")
    w = "clients.guest_model"
    gqs = _int(gm, "queue_size", 256, 2, 32768, w)
    if gqs & (gqs - 1):
        raise ScenarioError(f"{w}.queue_size = {gqs}: expected a power of two")
    guest = GuestModelClient(queue_size=gqs, wait=_str(gm, "wait", "interrupt", w,
                                                        ("interrupt", "poll")),
                             mem_mb=_int(gm, "mem_mb", 16, 4, 4096, w))
    return testpmd, guest, qemu


_SWEEP_CHECK: dict[str, tuple[str, Any]] = {
    "devices": ("int", (1, MAX_DEVICES)), "busy": ("int", (0, MAX_DEVICES)),
    "size": ("int", (60, 9000)), "rate": ("int", (0, 10_000_000)), "queues": ("int", (1, 8)),
    "direction": ("str", DIRECTIONS),
}


def _parse_test(t: Any, i: int) -> TestSpec:
    where = f"tests[{i}]"
    if not isinstance(t, Mapping):
        raise ScenarioError(f"{where}: expected a table ([[tests]]), got {t!r}")
    _check_keys(t, _TEST, f"[[tests]] #{i}")
    kind = _str(t, "kind", "", where, TEST_KINDS)
    name = _str(t, "name", f"{kind}{i}", where)
    where = f"tests '{name}'"
    sweep: list[tuple[str, tuple[Any, ...]]] = []
    if "sweep" in t:
        st = t["sweep"]
        if not isinstance(st, Mapping):
            raise ScenarioError(f"{where}.sweep = {st!r}: expected a table like "
                                "{ devices = [1, 2, 4] }")
        for key, values in st.items():
            if key not in SWEEPABLE:
                raise ScenarioError(f"{where}.sweep: {key!r} cannot be swept{_close(key, list(SWEEPABLE))}; "
                                    f"sweepable: {', '.join(SWEEPABLE)}")
            if key in t:
                raise ScenarioError(f"{where}: {key!r} is both set and swept; keep one")
            if not isinstance(values, list) or not values:
                raise ScenarioError(f"{where}.sweep.{key} = {values!r}: expected a non-empty list")
            typ, allowed = _SWEEP_CHECK[key]
            for v in values:
                if typ == "int":
                    lo, hi = allowed
                    if isinstance(v, bool) or not isinstance(v, int):
                        raise ScenarioError(f"{where}.sweep.{key}: {v!r}: expected integers in "
                                            f"[{lo}, {hi}]")
                    if not lo <= v <= hi:
                        raise ScenarioError(f"{where}.sweep.{key}: {v}: out of range, allowed "
                                            f"[{lo}, {hi}]")
                elif v not in allowed:
                    raise ScenarioError(f"{where}.sweep.{key}: {v!r}: allowed {' | '.join(allowed)}")
            if len(set(map(str, values))) != len(values):
                raise ScenarioError(f"{where}.sweep.{key} = {values!r}: repeated values")
            sweep.append((key, tuple(values)))
    if "pingpong_rate" in t and t.get("pingpong_alongside") is not True:
        raise ScenarioError(f"{where}.pingpong_rate: applies only with pingpong_alongside = true")
    return TestSpec(
        name=name, kind=kind,
        direction=_str(t, "direction", "guest_tx", where, DIRECTIONS),
        size=_int(t, "size", 64, 60, 9000, where),
        devices=_int(t, "devices", 1, 1, MAX_DEVICES, where),
        busy=_int(t, "busy", 0, 0, MAX_DEVICES, where),
        queues=_int(t, "queues", 1, 1, 8, where),
        rate=_int(t, "rate", 0, 0, 10_000_000, where),
        client=_str(t, "client", "", where, ("", *CLIENTS)),
        idle_time=_float(t, "idle_time", 0.0, 0.0, 3600, where),
        pingpong_alongside=_bool(t, "pingpong_alongside", False, where),
        pingpong_rate=_int(t, "pingpong_rate", 1000, 0, 100_000, where),
        sweep=tuple(sweep),
    )


def _check_case(c: Case, where: str) -> None:
    """Rules across keys, checked on every expanded case."""
    if c.busy > c.devices:
        raise ScenarioError(f"{where}: busy = {c.busy} exceeds devices = {c.devices}")
    if c.client == "qemu":
        if c.kind == "idle":
            raise ScenarioError(f"{where}: client = 'qemu' runs kind = 'stream' or 'pingpong'")
        for key, value, want in (("devices", c.devices, 1), ("queues", c.queues, 1),
                                 ("rate", c.rate, 0), ("busy", c.busy, 0)):
            if value != want:
                raise ScenarioError(f"{where}: client = 'qemu' boots one guest with one NIC "
                                    f"and one queue pair, unpaced: {key} = {value} (allowed "
                                    f"{want})")
    elif c.kind == "stream":
        if c.rate and c.client == "testpmd":
            raise ScenarioError(f"{where}: rate = {c.rate} needs client = 'guest_model' (testpmd "
                                "txonly cannot pace a virtio-user port)")
        if c.rate and c.direction == "guest_rx":
            raise ScenarioError(f"{where}: rate applies to guest_tx only (in guest_rx the backend "
                                "is the sender)")
        if c.client == "guest_model" and c.direction == "guest_rx":
            raise ScenarioError(f"{where}: guest_rx streams use client = 'testpmd'")
        if c.client == "guest_model" and c.queues != 1:
            raise ScenarioError(f"{where}: the guest model drives one queue pair per device")
        if c.busy and c.client != "testpmd":
            raise ScenarioError(f"{where}: busy applies to testpmd clients only")
    else:
        if c.client == "testpmd":
            raise ScenarioError(f"{where}: kind = {c.kind!r} uses the guest model (or qemu) "
                                "client")
        for key, bad in (("rate", c.rate), ("busy", c.busy)):
            if bad:
                raise ScenarioError(f"{where}: {key} applies to kind = 'stream' only")
        if c.queues != 1:
            raise ScenarioError(f"{where}: kind = {c.kind!r} uses one queue pair per device")
    if c.kind != "idle" and c.idle_time:
        raise ScenarioError(f"{where}: idle_time applies to kind = 'idle' only")
    if c.pingpong_alongside:
        if c.kind != "stream" or c.client != "testpmd" or c.direction != "guest_tx":
            raise ScenarioError(f"{where}: pingpong_alongside applies to guest_tx streams driven "
                                f"by testpmd only (got kind = {c.kind!r}, client = {c.client!r}, "
                                f"direction = {c.direction!r})")
        if c.queues != 1:
            raise ScenarioError(f"{where}: pingpong_alongside needs queues = 1 (the guest model "
                                "drives one queue pair)")
        if c.devices + 1 > MAX_DEVICES:
            raise ScenarioError(f"{where}: pingpong_alongside adds a device: devices = "
                                f"{c.devices} + 1 exceeds {MAX_DEVICES}")


# ----------------------------------------------------------------------------------------------
# entry points


def parse_scenario(raw: Mapping[str, Any], *, source: str = "", default_name: str = "") -> Scenario:
    _check_keys(raw, _TOP, "top level")
    name = _str(raw, "name", default_name or "scenario", "top level")
    description = _str(raw, "description", "", "top level")
    run = _parse_run(raw)
    modes = _parse_modes(raw)
    placement = _parse_placement(raw)
    braw = raw.get("backends")
    if not isinstance(braw, list) or not braw:
        raise ScenarioError("backends: expected at least one [[backends]] table")
    backends = tuple(_parse_backend(b, i) for i, b in enumerate(braw))
    names = [b.name for b in backends]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ScenarioError(f"backends: name(s) {', '.join(sorted(dup))} used twice; give each "
                            "backend a distinct name")
    if run.reference and run.reference not in names:
        raise ScenarioError(f"run.reference = {run.reference!r}: not a backend; known: "
                            f"{', '.join(names)}")
    testpmd, guest, qemu = _parse_clients(raw)
    traw = raw.get("tests")
    if not isinstance(traw, list) or not traw:
        raise ScenarioError("tests: expected at least one [[tests]] table")
    tests = tuple(_parse_test(t, i) for i, t in enumerate(traw))
    tnames = [t.name for t in tests]
    tdup = {n for n in tnames if tnames.count(n) > 1}
    if tdup:
        raise ScenarioError(f"tests: name(s) {', '.join(sorted(tdup))} used twice")
    sc = Scenario(name, description, run, placement, backends, testpmd, guest, tests,
                  source=source, raw=raw, qemu=qemu, modes=modes)
    cases = sc.cases()  # checks the rules across keys on every sweep point
    if guest.wait == "poll" and any(c.pingpong_alongside for c in cases):
        raise ScenarioError("clients.guest_model.wait = 'poll' with pingpong_alongside: the "
                            "alongside flow shares the client core with testpmd, and two pollers "
                            "on one core collapse; use wait = 'interrupt'")
    return sc


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except OSError as err:
        raise ScenarioError(f"{p}: cannot read: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{p}: not valid TOML: {err}") from err
    try:
        return parse_scenario(raw, source=str(p), default_name=p.stem)
    except ScenarioError as err:
        raise ScenarioError(f"{p}: {err}") from None


def scenario_dirs() -> list[Path]:
    """Where `vhostx bench run NAME` looks: ./configs/bench, then the checkout's configs/bench."""
    here = Path(__file__).resolve().parent.parent.parent / "configs" / "bench"
    cwd = Path.cwd() / "configs" / "bench"
    return [cwd] if cwd.resolve() == here else [cwd, here]


def find_scenario(name_or_path: str) -> Path:
    """A path as given, or NAME -> configs/bench/NAME.toml."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        if not p.exists():
            raise ScenarioError(f"{name_or_path}: no such scenario file")
        return p
    for d in scenario_dirs():
        cand = d / f"{name_or_path}.toml"
        if cand.exists():
            return cand
    known = sorted({f.stem for d in scenario_dirs() if d.is_dir() for f in d.glob("*.toml")})
    raise ScenarioError(f"no scenario named {name_or_path!r}{_close(name_or_path, known)}; "
                        f"shipped: {', '.join(known)}")
