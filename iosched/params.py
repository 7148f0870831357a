"""Module-style parameters: one registry of typed, validated, source-tracked tunables.

Like Linux module parameters (`modinfo -p`): each parameter is declared once, beside the code
that reads it, with a type, a default, an allowed range (or choices), an explicit unit, a one-line
description, whether it may change at run time and the scope it applies to. `vhostx params`
prints the registry with `format_table()`.

Sources, in rising precedence (the highest one set wins; each layer is kept, so dropping a
run-time override falls back to the command line, then the config file, then the default):

    default < config file ([params] table of configs/*.toml) < command line `--param name=value`
            < run time (the control socket)

Parsing (`Param.parse`):
- int: Python ints (not bools) or strings read with `int(s, 0)` (so `0x10`, `1_000`), falling
  back to base 10 (`010`).
- float: ints, floats or strings; NaN and infinities are refused.
- bool: bools, 0/1, or the strings true/false, 1/0, yes/no, on/off (any case).
- str: strings only. enum: one of the declared choices, by exact name.
- Unit suffixes, only for parameters whose unit is a time or a size:
  time (unit "ns", "us", "ms" or "s"): a number with suffix `ns`, `us` (or `µs`), `ms` or `s`,
  e.g. `3s`, `500ms`, `1.5ms`, `20us`, converted to the parameter's unit and refused unless it is
  a whole number of that unit; size (unit "bytes"): suffix `B`, `k`/`K`/`KiB`, `M`/`MiB`,
  `G`/`GiB`, always powers of 1024 like the kernel's memparse (`64k` = 65536, `512KiB`, `1M`).
  A bare number is in the parameter's own unit. Other units take no suffix.

A refusal raises `virtio.errors.ConfigError` naming the parameter, the value as it came and what
is allowed, e.g. ``poll_stop_idle='-5': out of range, allowed [0, 60000000] us``. Unknown names
are refused with the close matches (difflib). Declaring a name twice, or a default outside its own
range, is a programming error (ValueError).

Threads: declare and set (`set`, `set_many`, `reset`, `load_config`, `load_cmdline`, `subscribe`)
from the daemon's asyncio thread (or at import / start-up); writers are serialised by a lock
anyway. Any thread, workers included, may read: each current value is an immutable `Current`
(value, source) replaced atomically in a dict whose identity never changes, so a read is one dict
lookup with no lock (`handle.get()`). Subscribers run in the setter's thread, after the new value
is visible; a worker that must see a change at a precise point should be sent it through its
command queue by a subscriber rather than re-read the registry mid-turn.
"""

from __future__ import annotations

import difflib
import enum
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from virtio.errors import ConfigError

__all__ = [
    "BUSY_POLL_US",
    "DEVICES_PER_WORKER",
    "MAX_PROCESSED_DATA_LIMIT",
    "MAX_QUEUE_STUCK_SIZE",
    "MAX_QUEUE_STUCK_US",
    "MAX_WORK_STUCK_US",
    "MIN_POLL_RATE",
    "MIN_PROCESSED_DATA_LIMIT",
    "MODE",
    "PLACEMENT",
    "POLICY",
    "POLL_COALESCING",
    "POLL_START_RATE",
    "POLL_STOP_IDLE",
    "REGISTRY",
    "SIZE_UNITS",
    "TIME_UNITS",
    "TURN_MAX_BYTES",
    "TURN_MAX_PACKETS",
    "WORKERS",
    "WORKER_CPUS",
    "Current",
    "Param",
    "ParamHandle",
    "ParamRow",
    "Registry",
    "Scope",
    "Source",
    "Subscriber",
    "declare",
    "parse_cpu_list",
]

log = logging.getLogger("vhostx.control")


class Scope(enum.StrEnum):
    """What one value of a parameter applies to (the registry holds the daemon-wide value)."""

    GLOBAL = "global"
    WORKER = "worker"
    DEVICE = "device"
    QUEUE = "queue"


class Source(enum.IntEnum):
    """Where a value came from; a higher source overrides a lower one."""

    DEFAULT = 0
    CONFIG = 1
    CMDLINE = 2
    RUNTIME = 3

    @property
    def label(self) -> str:
        return _SOURCE_LABELS[self]


_SOURCE_LABELS = {
    Source.DEFAULT: "default",
    Source.CONFIG: "config",
    Source.CMDLINE: "cmdline",
    Source.RUNTIME: "runtime",
}

# Time units in nanoseconds, size units in bytes. Keys are the accepted suffixes.
TIME_UNITS: dict[str, int] = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9}
SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
}
_PARAM_TIME_UNITS = ("ns", "us", "ms", "s")
_BOOL_WORDS = {
    "true": True, "1": True, "yes": True, "on": True,
    "false": False, "0": False, "no": False, "off": False,
}  # fmt: skip
_KIND_WORDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SUFFIXED_RE = re.compile(r"^([+-]?(?:\d[\d_]*)?(?:\.\d+)?)\s*([A-Za-zµ]+)$")

Subscriber = Callable[[str, Any, Any], None]
"""A change callback: (name, old value, new value). Raising refuses the change."""


@dataclass(frozen=True)
class Param:
    """The declaration of one parameter (immutable)."""

    name: str
    type: type  # int, float, bool or str (an enum is str with choices)
    default: Any
    description: str
    unit: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    runtime: bool = False
    scope: Scope = Scope.GLOBAL
    # Extra check on a typed value: returns None, or raises ValueError whose text says why.
    check: Callable[[Any], None] | None = field(default=None, compare=False)
    allowed_hint: str = ""  # what is allowed, for a str parameter with a `check`

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"parameter name {self.name!r}: expected [a-z][a-z0-9_]*")
        if self.type not in (int, float, bool, str):
            raise ValueError(f"parameter {self.name}: type must be int, float, bool or str")
        if self.choices and self.type is not str:
            raise ValueError(f"parameter {self.name}: choices need type str")
        if self.type in (int, float) and (self.min is None or self.max is None):
            raise ValueError(f"parameter {self.name}: a number needs both min and max")
        if self.type not in (int, float) and (self.min is not None or self.max is not None):
            raise ValueError(f"parameter {self.name}: min/max only apply to numbers")
        if not self.description or "\n" in self.description:
            raise ValueError(f"parameter {self.name}: needs a one-line description")
        try:
            typed = self.parse(self.default)
        except ConfigError as err:
            raise ValueError(f"parameter {self.name}: bad default: {err}") from err
        object.__setattr__(self, "default", typed)

    @property
    def kind(self) -> str:
        """ "int", "float", "bool", "str" or "enum"."""
        return "enum" if self.choices else self.type.__name__

    def allowed(self) -> str:
        """What may be given, as shown in refusals and listings (without the unit)."""
        if self.choices:
            return "|".join(self.choices)
        if self.type in (int, float):
            return f"[{self.min}, {self.max}]"
        if self.type is bool:
            return "true|false"
        return self.allowed_hint or "any string"

    def _allowed_msg(self) -> str:
        if self.choices:
            return "allowed one of " + ", ".join(self.choices)
        unit = f" {self.unit}" if self.unit and self.type in (int, float) else ""
        return f"allowed {self.allowed()}{unit}"

    def _refuse(self, value: Any, reason: str) -> ConfigError:
        return ConfigError(f"{self.name}={value!r}: {reason}, {self._allowed_msg()}")

    def parse(self, value: Any) -> Any:
        """Turn a raw value (TOML/JSON-typed or a string) into a checked typed value."""
        if self.type is bool:
            typed: Any = self._parse_bool(value)
        elif self.type is int:
            typed = self._parse_int(value)
        elif self.type is float:
            typed = self._parse_float(value)
        else:
            if not isinstance(value, str):
                raise self._refuse(value, "expected a string")
            typed = value.strip()
            if self.choices and typed not in self.choices:
                near = difflib.get_close_matches(typed, self.choices, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise self._refuse(value, f"not a valid choice{hint}")
        if self.type in (int, float) and not (self.min <= typed <= self.max):  # type: ignore[operator]
            shown = ""
            if isinstance(value, str) and str(typed) != value.strip():
                shown = f" ({typed} {self.unit})" if self.unit else f" ({typed})"
            raise self._refuse(value, f"out of range{shown}")
        if self.check is not None:
            try:
                self.check(typed)
            except ValueError as err:
                raise self._refuse(value, str(err)) from err
        return typed

    def _parse_bool(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise self._refuse(value, "not a boolean (true/false, 1/0, yes/no, on/off)")

    def _parse_int(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self._refuse(value, "expected an integer, not a boolean")
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise self._refuse(value, "expected an integer")
        if not isinstance(value, str):
            raise self._refuse(value, "expected an integer")
        text = value.strip()
        for base in (0, 10):
            try:
                return int(text, base)
            except ValueError:
                pass
        scaled = self._parse_suffixed(value, text)
        if scaled.denominator != 1:
            raise self._refuse(value, f"not a whole number of {self.unit} ({float(scaled)})")
        return int(scaled)

    def _parse_float(self, value: Any) -> float:
        if isinstance(value, bool):
            raise self._refuse(value, "expected a number, not a boolean")
        if isinstance(value, int | float):
            result = float(value)
        elif isinstance(value, str):
            text = value.strip()
            try:
                result = float(text)
            except ValueError:
                result = float(self._parse_suffixed(value, text))
        else:
            raise self._refuse(value, "expected a number")
        if not math.isfinite(result):
            raise self._refuse(value, "not a finite number")
        return result

    def _parse_suffixed(self, value: Any, text: str) -> Fraction:
        """`3s`, `500ms`, `64k`... converted into this parameter's unit, exactly."""
        if self.unit in _PARAM_TIME_UNITS:
            table, base, what = TIME_UNITS, TIME_UNITS[self.unit], "time"
        elif self.unit == "bytes":
            table, base, what = SIZE_UNITS, 1, "size"
        else:
            raise self._refuse(
                value,
                f"not {_KIND_WORDS[self.type]} (no unit suffix for {self.unit or 'a plain number'})",
            )
        m = _SUFFIXED_RE.match(text)
        if not m or m.group(1) in ("", "+", "-"):
            raise self._refuse(
                value, f"not {_KIND_WORDS[self.type]} or a {what} with a unit suffix"
            )
        number, suffix = m.group(1), m.group(2)
        key = suffix if what == "time" else suffix.lower()
        if key not in table:
            accepted = (
                ", ".join(dict.fromkeys(table)) if what == "time" else "B, k, KiB, M, MiB, G, GiB"
            )
            raise self._refuse(value, f"unknown {what} suffix {suffix!r} (accepted: {accepted})")
        return Fraction(number.replace("_", "")) * table[key] / base


@dataclass(frozen=True)
class Current:
    """A current value and the source it came from; replaced whole, never mutated."""

    value: Any
    source: Source


@dataclass(frozen=True)
class ParamRow:
    """One line of the `modinfo -p`-like listing (JSON-ready through `as_dict`)."""

    name: str
    type: str
    value: Any
    default: Any
    range: str
    unit: str
    runtime: bool
    scope: str
    source: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ParamHandle:
    """What `declare` returns: a cheap reader of one parameter, usable from any thread."""

    __slots__ = ("_current", "_registry", "name", "param")

    def __init__(self, registry: Registry, param: Param) -> None:
        self.name = param.name
        self.param = param
        self._registry = registry
        self._current = registry._current  # the dict itself: its identity never changes

    def get(self) -> Any:
        """The current value (one dict lookup, no lock)."""
        return self._current[self.name].value

    @property
    def value(self) -> Any:
        return self._current[self.name].value

    @property
    def source(self) -> Source:
        return self._current[self.name].source

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(name, old, new)` when this parameter changes; returns an unsubscriber."""
        return self._registry.subscribe(callback, self.name)

    def __repr__(self) -> str:
        cur = self._current[self.name]
        return f"<param {self.name}={cur.value!r} ({cur.source.label})>"


_UNSET: Any = object()


class Registry:
    """Declared parameters, their values per source, and change subscribers."""

    def __init__(self) -> None:
        self._params: dict[str, Param] = {}
        self._layers: dict[str, dict[Source, Any]] = {}
        self._current: dict[str, Current] = {}
        self._subs: dict[str | None, list[Subscriber]] = {}
        self._lock = threading.RLock()

    # ---- declaration ---------------------------------------------------------------------

    def declare(
        self,
        name: str,
        type: type,
        default: Any,
        description: str,
        *,
        unit: str = "",
        min: float | None = None,
        max: float | None = None,
        choices: Iterable[str] = (),
        runtime: bool = False,
        scope: Scope | str = Scope.GLOBAL,
        check: Callable[[Any], None] | None = None,
        allowed_hint: str = "",
    ) -> ParamHandle:
        """Declare a parameter (at import time, beside the code that reads it)."""
        param = Param(
            name=name,
            type=type,
            default=default,
            description=description,
            unit=unit,
            min=min,
            max=max,
            choices=tuple(choices),
            runtime=runtime,
            scope=Scope(scope),
            check=check,
            allowed_hint=allowed_hint,
        )
        return self.add(param)

    def add(self, param: Param) -> ParamHandle:
        """Register an already built declaration (e.g. copied from another registry)."""
        with self._lock:
            if param.name in self._params:
                raise ValueError(f"parameter {param.name!r} is declared twice")
            self._params[param.name] = param
            self._layers[param.name] = {Source.DEFAULT: param.default}
            self._current[param.name] = Current(param.default, Source.DEFAULT)
        return ParamHandle(self, param)

    # ---- reading (any thread) ------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._params))

    def __len__(self) -> int:
        return len(self._params)

    def params(self) -> list[Param]:
        """Every declaration, sorted by name."""
        return [self._params[n] for n in sorted(self._params)]

    def param(self, name: str) -> Param:
        """The declaration of `name`; unknown names raise ConfigError with close matches."""
        try:
            return self._params[name]
        except KeyError:
            raise self._unknown(name) from None

    def handle(self, name: str) -> ParamHandle:
        return ParamHandle(self, self.param(name))

    def get(self, name: str) -> Any:
        """The current value of `name`."""
        self.param(name)
        return self._current[name].value

    def source(self, name: str) -> Source:
        """Which source the current value of `name` came from."""
        self.param(name)
        return self._current[name].source

    def current(self, name: str) -> Current:
        self.param(name)
        return self._current[name]

    def snapshot(self) -> dict[str, Any]:
        """name -> current value, for every parameter (a consistent-enough copy)."""
        return {n: self._current[n].value for n in sorted(self._params)}

    def parse(self, name: str, value: Any) -> Any:
        """Check a value for `name` without applying it; return the typed value."""
        return self.param(name).parse(value)

    # ---- setting (asyncio thread) --------------------------------------------------------

    def set(
        self, name: str, value: Any, source: Source = Source.RUNTIME, *, where: str = ""
    ) -> Any:
        """Validate and set `name` at `source`; return the new current value.

        At `Source.RUNTIME`, a parameter declared with runtime=False is refused. If a subscriber
        raises, every layer and value is restored and a ConfigError is raised from it.
        """
        self.set_many({name: value}, source, where=where)
        return self._current[name].value

    def set_many(
        self, values: Mapping[str, Any], source: Source = Source.RUNTIME, *, where: str = ""
    ) -> None:
        """Validate every value first, then apply them all or none."""
        updates: list[tuple[str, Source, Any]] = []
        for name, raw in values.items():
            updates.append((name, source, self._validate(name, raw, source, where)))
        self._commit(updates, where)

    def reset(self, name: str, source: Source = Source.RUNTIME, *, where: str = "") -> Any:
        """Drop the value `name` has at `source` (falling back to lower sources)."""
        param = self.param(name)
        if source is Source.DEFAULT:
            raise ConfigError(f"{_prefix(where)}{name}: the default cannot be removed")
        if source is Source.RUNTIME and not param.runtime:
            raise self._not_runtime(param, where)
        self._commit([(name, source, _UNSET)], where)
        return self._current[name].value

    def load_config(self, table: Mapping[str, Any], *, where: str = "config file [params]") -> None:
        """Apply the [params] table of a config file (TOML-typed values or strings)."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table of name = value")
        self.set_many({str(k): v for k, v in table.items()}, Source.CONFIG, where=where)

    def load_cmdline(self, items: Iterable[str], *, where: str = "--param") -> None:
        """Apply `--param name=value` strings (a later one for the same name wins)."""
        values: dict[str, str] = {}
        for item in items:
            name, sep, raw = item.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"{where} {item!r}: expected name=value")
            values[name.strip()] = raw.strip()
        self.set_many(values, Source.CMDLINE, where=where)

    def subscribe(self, callback: Subscriber, name: str | None = None) -> Callable[[], None]:
        """Call `callback(name, old, new)` after `name` (or any parameter, if None) changes.

        Returns a function that unsubscribes it.
        """
        if name is not None:
            self.param(name)
        with self._lock:
            self._subs.setdefault(name, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                subs = self._subs.get(name, [])
                if callback in subs:
                    subs.remove(callback)

        return unsubscribe

    # ---- listing -------------------------------------------------------------------------

    def describe(self) -> list[ParamRow]:
        """One row per parameter, sorted by name, like `modinfo -p` with values."""
        rows = []
        for p in self.params():
            cur = self._current[p.name]
            rows.append(
                ParamRow(
                    name=p.name,
                    type=p.kind,
                    value=cur.value,
                    default=p.default,
                    range=p.allowed(),
                    unit=p.unit,
                    runtime=p.runtime,
                    scope=p.scope.value,
                    source=cur.source.label,
                    description=p.description,
                )
            )
        return rows

    def format_table(self) -> str:
        """The listing as plain text: one header line, one line per parameter."""
        headers = ("NAME", "TYPE", "VALUE", "DEFAULT", "RANGE", "UNIT", "RT", "SCOPE", "SOURCE")
        lines: list[tuple[str, ...]] = []
        for r in self.describe():
            lines.append(
                (
                    r.name,
                    r.type,
                    _show(r.value),
                    _show(r.default),
                    r.range,
                    r.unit or "-",
                    "yes" if r.runtime else "no",
                    r.scope,
                    r.source,
                    r.description,
                )
            )
        widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]
        out = [
            "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + "  DESCRIPTION"
        ]
        for line in lines:
            cols = "  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True))
            out.append(f"{cols}  {line[-1]}")
        return "\n".join(out) + "\n"

    # ---- internals -----------------------------------------------------------------------

    def _validate(self, name: str, raw: Any, source: Source, where: str) -> Any:
        param = self.param(name) if name in self._params else None
        if param is None:
            raise ConfigError(f"{_prefix(where)}{self._unknown(name)}")
        if source is Source.DEFAULT:
            raise ConfigError(f"{_prefix(where)}{name}: defaults are fixed by the declaration")
        if source is Source.RUNTIME and not param.runtime:
            raise self._not_runtime(param, where)
        try:
            return param.parse(raw)
        except ConfigError as err:
            if not where:
                raise
            raise ConfigError(f"{where}: {err}") from err

    def _commit(self, updates: list[tuple[str, Source, Any]], where: str) -> None:
        with self._lock:
            names = list(dict.fromkeys(n for n, _, _ in updates))
            saved = {n: (dict(self._layers[n]), self._current[n]) for n in names}
            for name, source, value in updates:
                if value is _UNSET:
                    self._layers[name].pop(source, None)
                else:
                    self._layers[name][source] = value
            changed: list[tuple[str, Any, Any]] = []
            for name in names:
                layers = self._layers[name]
                top = max(layers)
                old = self._current[name]
                self._current[name] = Current(layers[top], top)  # the atomic replacement
                if old.value != layers[top] or type(old.value) is not type(layers[top]):
                    changed.append((name, old.value, layers[top]))
            notified: list[tuple[Subscriber, str, Any, Any]] = []
            for name, old, new in changed:
                for cb in list(self._subs.get(name, ())) + list(self._subs.get(None, ())):
                    try:
                        cb(name, old, new)
                    except Exception as err:
                        for n, (layers, cur) in saved.items():
                            self._layers[n] = layers
                            self._current[n] = cur
                        for done_cb, n, o, v in reversed(notified):
                            try:
                                done_cb(n, v, o)  # tell it the change is undone
                            except Exception:  # already rolling back: log, go on
                                log.exception("parameter %s: subscriber failed during rollback", n)
                        raise ConfigError(
                            f"{_prefix(where)}{name}={new!r}: refused by "
                            f"{getattr(cb, '__qualname__', repr(cb))}: {err}; kept {old!r}"
                        ) from err
                    notified.append((cb, name, old, new))

    def _unknown(self, name: str) -> ConfigError:
        near = difflib.get_close_matches(name, list(self._params), n=3, cutoff=0.6)
        if near:
            return ConfigError(f"unknown parameter {name!r}; did you mean {', '.join(near)}?")
        return ConfigError(
            f"unknown parameter {name!r}; known: {', '.join(sorted(self._params)) or 'none'}"
        )

    @staticmethod
    def _not_runtime(param: Param, where: str) -> ConfigError:
        return ConfigError(
            f"{_prefix(where)}{param.name}: cannot be changed at run time; set it in the config "
            f"file [params] or with --param {param.name}=VALUE and restart the daemon"
        )


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def parse_cpu_list(text: str, ncpus: int | None = None) -> tuple[int, ...]:
    """Parse a CPU list like "1" or "0-1,3" into sorted unique CPU numbers.

    "" means no CPUs (no pinning). Every CPU must be below `ncpus` (default: os.cpu_count()).
    Raises ValueError saying what is wrong.
    """
    if ncpus is None:
        ncpus = os.cpu_count() or 1
    text = text.strip()
    if not text:
        return ()
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo_s, dash, hi_s = part.partition("-")
        try:
            lo = int(lo_s.strip(), 10)
            hi = int(hi_s.strip(), 10) if dash else lo
        except ValueError:
            raise ValueError(f"bad CPU list item {part!r}") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"bad CPU range {part!r}")
        if hi >= ncpus:
            raise ValueError(f"CPU {hi} does not exist (this host has {ncpus})")
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def _check_cpu_list(value: str) -> None:
    parse_cpu_list(value)


REGISTRY = Registry()
"""The daemon's registry: every parameter of every module is declared here."""


def declare(
    name: str,
    type: type,
    default: Any,
    description: str,
    **kw: Any,
) -> ParamHandle:
    """Declare a parameter on REGISTRY (keyword options as `Registry.declare`)."""
    return REGISTRY.declare(name, type, default, description, **kw)


# ---- the scheduling parameters (ELVIS vocabulary, user-space units) --------------------------

_US_MAX = 60_000_000  # one minute
_BYTES_MAX = 64 << 20
_RING_MAX = 32768

MODE = declare(
    "mode", str, "baseline",
    "baseline: one worker thread per device (the vhost model); shared: ELVIS-style workers "
    "each serving the queues of many devices",
    choices=("baseline", "shared"), scope=Scope.GLOBAL,
)  # fmt: skip
WORKERS = declare(
    "workers", int, 1,
    "shared mode: worker threads started with the daemon (baseline ignores it: one per device)",
    unit="workers", min=1, max=1024, scope=Scope.GLOBAL,
)  # fmt: skip
WORKER_CPUS = declare(
    "worker_cpus", str, "",
    'CPUs the worker threads are pinned to, e.g. "1" or "0-1,3", handed out in order; '
    '"" = no pinning',
    check=_check_cpu_list, allowed_hint="CPU list like 0-1,3 below os.cpu_count()",
    scope=Scope.WORKER,
)  # fmt: skip
PLACEMENT = declare(
    "placement", str, "first_fit",
    "shared mode: how a new device picks its worker: first_fit (ELVIS: first with fewer than "
    "devices_per_worker), least_loaded, or explicit (the device's worker= key); next attach",
    choices=("first_fit", "least_loaded", "explicit"), runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
POLICY = declare(
    "policy", str, "elvis",
    "shared mode: scheduling policy of the workers: elvis (ELVIS fine-grained scheduling), "
    "classes (elvis plus latency/throughput queue classes), vhost (one batch per turn, no "
    "polling); baseline mode always uses vhost",
    choices=("elvis", "classes", "vhost"), runtime=True, scope=Scope.WORKER,
)  # fmt: skip
DEVICES_PER_WORKER = declare(
    "devices_per_worker", int, 7,
    "shared mode: devices one worker serves before first_fit places the next on another "
    "worker (a new one if all are full); applies to later placements",
    unit="devices", min=1, max=1024, runtime=True, scope=Scope.WORKER,
)  # fmt: skip
MAX_WORKERS = declare(
    "max_workers", int, 0,
    "shared mode: first_fit starts a new worker for a device only while the pool has fewer "
    "workers than this, else it places the device on the least loaded one; 0 = the number of "
    "CPUs the workers may run on (worker_cpus, else the daemon's affinity): polling workers "
    "time-sharing one core starve each other; applies to later placements",
    unit="workers", min=0, max=1024, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
POLL_START_RATE = declare(
    "poll_start_rate", int, 1,
    "start polling a queue (kicks suppressed) once one worker tick served at least this many "
    "items from it; 0 = never poll",
    unit="items", min=0, max=_RING_MAX, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
POLL_STOP_IDLE = declare(
    "poll_stop_idle", int, 3_000_000,
    "stop polling a queue (re-enable kicks, re-check the ring) after it found no new work "
    "for this long",
    unit="us", min=0, max=_US_MAX, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
POLL_COALESCING = declare(
    "poll_coalescing", int, 0,
    "skip polling a queue that was served (kicked or polled) less than this long ago; 0 = "
    "check it every round",
    unit="us", min=0, max=1_000_000, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
MAX_WORK_STUCK_US = declare(
    "max_work_stuck_us", int, -1,
    "a kick waiting this long in a worker makes the queue being served yield at the end of "
    "its current batch; -1 = off (ELVIS max_work_stuck_cycles)",
    unit="us", min=-1, max=_US_MAX, runtime=True, scope=Scope.WORKER,
)  # fmt: skip
MAX_QUEUE_STUCK_US = declare(
    "max_queue_stuck_us", int, -1,
    "a polled queue unserved this long with unchanged pending items is stuck and moves to the "
    "head of the poll list; -1 = off (ELVIS max_queue_stuck_cycles)",
    unit="us", min=-1, max=_US_MAX, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
MAX_QUEUE_STUCK_SIZE = declare(
    "max_queue_stuck_size", int, 0,
    "only a queue with at most this many pending avail entries can count as stuck; 0 = off",
    unit="items", min=0, max=_RING_MAX, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
MIN_PROCESSED_DATA_LIMIT = declare(
    "min_processed_data_limit", int, 1500,
    "shared mode: a queue's turn always continues (ignoring stuck queues and waiting kicks) "
    "until it moved this many bytes",
    unit="bytes", min=0, max=_BYTES_MAX, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
MAX_PROCESSED_DATA_LIMIT = declare(
    "max_processed_data_limit", int, 524288,
    "shared mode: a queue's turn (one or more C batches) always ends once it moved this many "
    "bytes, and the queue goes to the tail",
    unit="bytes", min=1, max=_BYTES_MAX, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
MIN_POLL_RATE = declare(
    "min_poll_rate", int, 0,
    "a polled queue is checked at least this many times per second even when others are busy "
    "(for queues that are not latency sensitive); 0 = no minimum, plain round robin",
    unit="Hz", min=0, max=1_000_000, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
TURN_MAX_PACKETS = declare(
    "turn_max_packets", int, 256,
    "packet budget of one C batch (one turn of a queue in baseline mode), like vhost-net's "
    "256-packet weight",
    unit="packets", min=1, max=65536, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
TURN_MAX_BYTES = declare(
    "turn_max_bytes", int, 524288,
    "byte budget of one C batch (one turn of a queue in baseline mode), like vhost-net's "
    "0x80000-byte weight",
    unit="bytes", min=1, max=_BYTES_MAX, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
POLL_ROUND_US = declare(
    "poll_round_us", int, 50,
    "shared mode: a worker with two or more polled queues serves them all in one C call, round "
    "robin, one batch of each per pass, for up to this long before it looks at kicks, timers "
    "and commands again (with max_work_stuck_us >= 0, at most half of that); 0 = no C rounds: "
    "one queue turn per Python loop",
    unit="us", min=0, max=100_000, runtime=True, scope=Scope.WORKER,
)  # fmt: skip
BUSY_POLL_US = declare(
    "busy_poll_us", int, 50,
    "inside one C batch that has found work, keep re-reading the ring once it runs empty, for "
    "up to this long in total per batch, before returning to the worker loop (like vhost-net's "
    "busyloop_timeout); completions are published first; an idle ring never spins; bounds one "
    "batch's extra latency for other queues on the same worker; 0 = return at once",
    unit="us", min=0, max=1000, runtime=True, scope=Scope.QUEUE,
)  # fmt: skip
