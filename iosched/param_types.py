"""The declaration of one module-style parameter (`Param`) and how raw values are parsed into
typed, checked ones; the scopes and sources a value can have. `iosched.params` re-exports all of
it beside the `Registry`: import from there.

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

Threads: any (everything here is immutable or pure).
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from virtio.errors import ConfigError

__all__ = ["SIZE_UNITS", "TIME_UNITS", "Param", "Scope", "Source", "parse_cpu_list"]


class Scope(enum.StrEnum):
    """Which values a parameter has: one for the daemon, or also one per device."""

    GLOBAL = "global"  # one value for the whole daemon
    DEVICE = "device"  # the global value, replaced for a device (all its queues) by its own


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
        object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "scope", Scope(self.scope))
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
        if self.type in (int, float) and not (self.min <= typed <= self.max):
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
