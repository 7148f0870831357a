"""Scenario files: TOML data naming backends, clients, traffic, placement and repetitions.

`load_scenario(path)` / `parse_scenario(dict)` check every key before anything starts and raise
`ScenarioError` (a `ConfigError`) naming where the key is, the value that came and what is
allowed: unknown keys (with close matches), wrong types, values out of range, inconsistent
combinations (a paced rate with testpmd, guest RX with a rate, a reference that is not a backend).
The data they build (the dataclasses, `Scenario.cases()`) lives in bench/harness/scenario_model.py;
`Scenario` and `ScenarioError` are re-exported here.

The format is documented key by key in docs/harness.md. Pure module: no I/O beyond reading the
file; any thread.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from virtio.errors import ConfigError

from .scenario_model import (
    BACKEND_KINDS,
    CLIENTS,
    DIRECTIONS,
    MAX_DEVICES,
    MODES,
    SWEEPABLE,
    TEST_KINDS,
    Backend,
    GuestModelClient,
    ModeSettings,
    Placement,
    QemuClient,
    RunSettings,
    Scenario,
    ScenarioError,
    TestpmdClient,
    TestSpec,
    param_text,
)

__all__ = [
    "Scenario",
    "ScenarioError",
    "find_scenario",
    "load_scenario",
    "parse_scenario",
    "scenario_dirs",
]


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
_TESTPMD = ["queue_size", "burst", "memory_mb", "total_num_mbufs", "mbcache", "mrg_rxbuf",
            "in_order", "packed_vq"]
_GUEST_MODEL = ["queue_size", "wait", "mem_mb"]
_QEMU = ["memory_mb", "boot_timeout"]
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
        new_registry().load_cmdline(f"{k}={param_text(v)}" for k, v in params)
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
        mbcache=_int(tp, "mbcache", 0, 0, 512, w),  # RTE_MEMPOOL_CACHE_MAX_SIZE
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
