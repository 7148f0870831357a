"""Module-style parameters: typed, validated, source-tracked tunables, and the registry of them.

Like Linux module parameters (`modinfo -p`). A parameter is declared as data, a `Param`, in the
module that reads it (the scheduling knobs in iosched.policy, placement in iosched.pool, `mode`
in vhostx.daemon, `busy_poll_us` in vhostx.net), each module listing its own in a `PARAMS` tuple;
this module holds only the machinery (`Param`, its parsing, scopes and sources live in
iosched.param_types and are re-exported here). Nothing registers itself on import: whoever runs
the code builds a `Registry(specs)` of the modules it uses (the daemon:
`vhostx.daemon.new_registry()`), so two registries in one process (two daemons in a test) share
no value.

A declaration has a type, a default, an allowed range (or choices), an explicit unit, a one-line
description, whether it may change at run time, and a scope:
- global: one value for the daemon;
- device: a global value, and optionally a device's own value that replaces it for that device
  (its queues). A device without its own value follows the global one, later changes included.

Sources, in rising precedence (the highest one set wins; each layer is kept, so dropping a
run-time value falls back to the command line, then the config file, then the default):

    default < config file < command line `--param name=value` < run time (the control socket)

The same layers exist per device (config file `[device.params]`, `--param name@device=value`,
`param set --device`), and any value a device has of its own beats every global one.

Parsing raw values (`Param.parse`: ints, floats, bools, strings, enums, time and size suffixes)
is described in iosched.param_types.

A refusal raises `virtio.errors.ConfigError` naming the parameter, the value as it came and what
is allowed, e.g. ``poll_stop_idle='-5': out of range, allowed [0, 60000000] us``. Unknown names
are refused with the close matches (difflib), unknown devices with the known ones, a device value
of a global parameter with its scope. Declaring a name twice, or a default outside its own range,
is a programming error (ValueError).

Threads: set (`set`, `set_many`, `reset`, `load_config`, `load_cmdline`, `subscribe`...) from the
daemon's asyncio thread (or at start-up, or a thread it hands the work to); writers are
serialised by a lock anyway. Any thread, workers included, may read: each current value is an
immutable `Current` (value, source) replaced atomically in a dict whose identity never changes,
so a read is a dict lookup or two with no lock (`handle.get()`). Subscribers run in the setter's
thread, after the new value is visible; a worker that must see a change at a precise point
should be sent it through its command queue by a subscriber rather than re-read the registry
mid-turn.
"""

from __future__ import annotations

import difflib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from virtio.errors import ConfigError

from .param_listing import ParamRow, describe_rows, format_rows
from .param_types import SIZE_UNITS, TIME_UNITS, Param, Scope, Source, parse_cpu_list

__all__ = [
    "SIZE_UNITS",
    "TIME_UNITS",
    "Current",
    "OverrideSubscriber",
    "Param",
    "ParamHandle",
    "ParamRow",
    "Registry",
    "Scope",
    "Source",
    "Subscriber",
    "format_rows",
    "parse_cpu_list",
]

log = logging.getLogger("vhostx.control")

Subscriber = Callable[[str, Any, Any], None]
"""A change callback: (name, old value, new value). Raising refuses the change."""
OverrideSubscriber = Callable[[str, str, Any, Any], None]
"""A device-value change callback: (device, name, old, new value for that device)."""


@dataclass(frozen=True)
class Current:
    """A current value and the source it came from; replaced whole, never mutated."""

    value: Any
    source: Source


class ParamHandle:
    """A cheap reader of one parameter (the global value, or one device's), from any thread."""

    __slots__ = ("_current", "_device", "_own", "_registry", "device", "name", "param")

    def __init__(self, registry: Registry, param: Param, device: str | None = None) -> None:
        self.name = param.name
        self.param = param
        self.device = device
        self._registry = registry
        self._current = registry._current  # the dicts themselves: their identity never changes
        self._own: dict[str, Current] | None = (
            registry._dev_current[device] if device is not None else None
        )

    def _cur(self) -> Current:
        own = self._own
        if own is not None:
            cur = own.get(self.name)
            if cur is not None:
                return cur
        return self._current[self.name]

    def get(self) -> Any:
        """The current value (one or two dict lookups, no lock)."""
        return self._cur().value

    @property
    def value(self) -> Any:
        return self._cur().value

    @property
    def source(self) -> Source:
        return self._cur().source

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(name, old, new)` when this value changes; returns an unsubscriber."""
        return self._registry.subscribe(callback, self.name, device=self.device)

    def __repr__(self) -> str:
        cur = self._cur()
        at = f"@{self.device}" if self.device is not None else ""
        return f"<param {self.name}{at}={cur.value!r} ({cur.source.label})>"


_UNSET: Any = object()
_Key = tuple[str, str | None]  # (parameter, device or None for the global value)


class Registry:
    """Declared parameters, their values per source (globally and per device), subscribers."""

    def __init__(self, specs: Iterable[Param] = ()) -> None:
        self._params: dict[str, Param] = {}
        self._layers: dict[str, dict[Source, Any]] = {}
        self._current: dict[str, Current] = {}
        # per device: name -> layers / Current, only for the parameters it has a value of
        self._dev_layers: dict[str, dict[str, dict[Source, Any]]] = {}
        self._dev_current: dict[str, dict[str, Current]] = {}
        self._subs: dict[tuple[str | None, str | None], list[Subscriber]] = {}
        self._override_subs: dict[str | None, list[OverrideSubscriber]] = {}
        self._lock = threading.RLock()
        self.add_all(specs)

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
        """Build a `Param` and add it (a shorthand for tests and one-off registries)."""
        return self.add(
            Param(
                name=name, type=type, default=default, description=description, unit=unit,
                min=min, max=max, choices=tuple(choices), runtime=runtime, scope=Scope(scope),
                check=check, allowed_hint=allowed_hint,
            )
        )  # fmt: skip

    def add(self, param: Param) -> ParamHandle:
        """Register a declaration; returns a handle on its global value."""
        with self._lock:
            if param.name in self._params:
                raise ValueError(f"parameter {param.name!r} is declared twice")
            self._params[param.name] = param
            self._layers[param.name] = {Source.DEFAULT: param.default}
            self._current[param.name] = Current(param.default, Source.DEFAULT)
        return ParamHandle(self, param)

    def add_all(self, params: Iterable[Param]) -> None:
        for param in params:
            self.add(param)

    def add_device(self, device: str) -> None:
        """Make `device` known (its per-device values may then be set); adding it again is a
        no-op."""
        with self._lock:
            self._dev_layers.setdefault(device, {})
            self._dev_current.setdefault(device, {})

    def devices(self) -> list[str]:
        return sorted(self._dev_current)

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

    def handle(self, name: str, device: str | None = None) -> ParamHandle:
        """A reader of `name`'s global value, or of the value `device` uses."""
        param = self.param(name)
        if device is not None:
            self._check_device(device, "")
        return ParamHandle(self, param, device)

    def current(self, name: str, device: str | None = None) -> Current:
        """The value in force (for `device`: its own if it has one, else the global one)."""
        self.param(name)
        if device is not None:
            own = self._check_device(device, "").get(name)
            if own is not None:
                return own
        return self._current[name]

    def get(self, name: str, device: str | None = None) -> Any:
        return self.current(name, device).value

    def source(self, name: str, device: str | None = None) -> Source:
        return self.current(name, device).source

    def has_own(self, name: str, device: str) -> bool:
        """Whether `device` has a value of its own for `name` (else it follows the global)."""
        self.param(name)
        return name in self._check_device(device, "")

    def overrides(self, name: str) -> dict[str, Current]:
        """The devices with a value of their own for `name`, and that value."""
        self.param(name)
        return {d: cur[name] for d, cur in sorted(self._dev_current.items()) if name in cur}

    def snapshot(self) -> dict[str, Any]:
        """name -> current global value, for every parameter (a consistent-enough copy)."""
        return {n: self._current[n].value for n in sorted(self._params)}

    def device_snapshot(self) -> dict[str, dict[str, Any]]:
        """device -> {name: value} of the values devices have of their own."""
        return {d: {n: c.value for n, c in sorted(cur.items())}
                for d, cur in sorted(self._dev_current.items()) if cur}  # fmt: skip

    def parse(self, name: str, value: Any) -> Any:
        """Check a value for `name` without applying it; return the typed value."""
        return self.param(name).parse(value)

    # ---- setting (asyncio thread) --------------------------------------------------------

    def set(
        self,
        name: str,
        value: Any,
        source: Source = Source.RUNTIME,
        *,
        device: str | None = None,
        where: str = "",
    ) -> Any:
        """Validate and set `name` (globally, or `device`'s own value) at `source`; return the
        value now in force there.

        At `Source.RUNTIME`, a parameter declared with runtime=False is refused; a device value
        of a global-scope parameter always is. If a subscriber raises, every layer and value is
        restored and a ConfigError is raised from it.
        """
        self.set_many({name: value}, source, device=device, where=where)
        return self.get(name, device)

    def set_many(
        self,
        values: Mapping[str, Any],
        source: Source = Source.RUNTIME,
        *,
        device: str | None = None,
        where: str = "",
    ) -> None:
        """Validate every value first, then apply them all or none."""
        updates = [
            (name, device, source, self._validate(name, raw, source, device, where))
            for name, raw in values.items()
        ]
        self._commit(updates, where)

    def reset(
        self,
        name: str,
        source: Source = Source.RUNTIME,
        *,
        device: str | None = None,
        where: str = "",
    ) -> Any:
        """Drop the value `name` has at `source` (globally or `device`'s own), falling back to
        lower sources (a device with no value of its own left follows the global value)."""
        param = self.param(name)
        if source is Source.DEFAULT:
            raise ConfigError(f"{_prefix(where)}{name}: the default cannot be removed")
        if device is not None:
            self._check_device(device, where)
            self._check_device_scope(param, device, where)
        if source is Source.RUNTIME and not param.runtime:
            raise self._not_runtime(param, where)
        self._commit([(name, device, source, _UNSET)], where)
        return self.get(name, device)

    def load_config(self, table: Mapping[str, Any], *, device: str | None = None,
                    where: str = "config file [params]") -> None:
        """Apply a config table of name = value (TOML-typed values or strings): the [params]
        table, or a device's [device.params] with `device`."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table of name = value")
        self.set_many({str(k): v for k, v in table.items()}, Source.CONFIG, device=device,
                      where=where)

    def load_cmdline(self, items: Iterable[str], *, where: str = "--param") -> None:
        """Apply `--param name=value` (global) and `--param name@device=value` strings (a later
        one for the same target wins); all or nothing."""
        targets: dict[str | None, dict[str, str]] = {}
        for item in items:
            lhs, sep, raw = item.partition("=")
            name, at, device = lhs.strip().partition("@")
            if not sep or not name.strip() or (at and not device.strip()):
                raise ConfigError(f"{where} {item!r}: expected name=value or name@device=value")
            targets.setdefault(device.strip() if at else None, {})[name.strip()] = raw.strip()
        updates = [
            (name, dev, Source.CMDLINE, self._validate(name, raw, Source.CMDLINE, dev, where))
            for dev, values in targets.items()
            for name, raw in values.items()
        ]
        self._commit(updates, where)

    def subscribe(
        self, callback: Subscriber, name: str | None = None, *, device: str | None = None
    ) -> Callable[[], None]:
        """Call `callback(name, old, new)` after `name` (or any parameter, if None) changes: its
        global value, or with `device` the value that device uses (its own, or the global one
        it follows). Returns a function that unsubscribes it."""
        if name is not None:
            self.param(name)
        if device is not None:
            self._check_device(device, "")
        return self._add_sub(self._subs, (name, device), callback)

    def subscribe_overrides(
        self, callback: OverrideSubscriber, name: str | None = None
    ) -> Callable[[], None]:
        """Call `callback(device, name, old, new)` after a device's own value of `name` (or of
        any parameter) is set or dropped and the value that device uses changed."""
        if name is not None:
            self.param(name)
        return self._add_sub(self._override_subs, name, callback)

    def _add_sub(self, table: dict[Any, list[Any]], key: Any, callback: Any) -> Callable[[], None]:
        with self._lock:
            table.setdefault(key, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                subs = table.get(key, [])
                if callback in subs:
                    subs.remove(callback)

        return unsubscribe

    # ---- listing -------------------------------------------------------------------------

    def describe(self) -> list[ParamRow]:
        """One row per parameter, sorted by name, like `modinfo -p` with values; each row lists
        the devices that have a value of their own."""
        return describe_rows(self)

    def format_table(self) -> str:
        """The listing as plain text: one header line, one line per parameter, and under it one
        `name@device` line per device with a value of its own."""
        return format_rows([r.as_dict() for r in self.describe()])

    # ---- internals -----------------------------------------------------------------------

    def _check_device(self, device: str, where: str) -> dict[str, Current]:
        try:
            return self._dev_current[device]
        except KeyError:
            known = ", ".join(sorted(self._dev_current)) or "none"
            raise ConfigError(
                f"{_prefix(where)}unknown device {device!r}; devices: {known}"
            ) from None

    @staticmethod
    def _check_device_scope(param: Param, device: str, where: str) -> None:
        if param.scope is not Scope.DEVICE:
            raise ConfigError(
                f"{_prefix(where)}{param.name}@{device}: {param.name} has scope "
                f"{param.scope.value}: one value for the whole daemon, none per device; set it "
                "without a device"
            )

    def _validate(
        self, name: str, raw: Any, source: Source, device: str | None, where: str
    ) -> Any:
        if name not in self._params:
            raise ConfigError(f"{_prefix(where)}{self._unknown(name)}")
        param = self._params[name]
        if source is Source.DEFAULT:
            raise ConfigError(f"{_prefix(where)}{name}: defaults are fixed by the declaration")
        if device is not None:
            self._check_device(device, where)
            self._check_device_scope(param, device, where)
        if source is Source.RUNTIME and not param.runtime:
            raise self._not_runtime(param, where)
        try:
            return param.parse(raw)
        except ConfigError as err:
            at = f"device {device}: " if device is not None else ""
            if not where and not at:
                raise
            raise ConfigError(f"{_prefix(where)}{at}{err}") from err

    def _value_for(self, name: str, device: str | None) -> Any:
        if device is not None:
            own = self._dev_current[device].get(name)
            if own is not None:
                return own.value
        return self._current[name].value

    def _commit(self, updates: list[tuple[str, str | None, Source, Any]], where: str) -> None:
        with self._lock:
            keys: list[_Key] = list(dict.fromkeys((n, d) for n, d, _, _ in updates))
            names = list(dict.fromkeys(n for n, _ in keys))
            # every value a change may reach: the global one, and each device's (a device
            # without its own value follows the global)
            reach: list[_Key] = [(n, d) for n in names for d in (None, *self._dev_current)]
            before = {k: self._value_for(*k) for k in reach}
            saved = {k: self._save(k) for k in keys}
            for name, device, source, value in updates:
                layers = self._layer(name, device)
                if value is _UNSET:
                    layers.pop(source, None)
                else:
                    layers[source] = value
            for name, device in keys:
                self._recompute(name, device)
            own = set(keys)
            notify: list[tuple[Callable[[], None], Callable[[], None], str]] = []
            for key in reach:
                name, device = key
                old, new = before[key], self._value_for(name, device)
                if old == new and type(old) is type(new):
                    continue
                label = f"{name}@{device}" if device is not None else name
                for cb in [*self._subs.get((name, device), ()), *self._subs.get((None, device), ())]:
                    notify.append((partial(cb, name, old, new), partial(cb, name, new, old),
                                   f"{label}={new!r}: refused by {_qualname(cb)}"))
                if device is not None and key in own:
                    for ocb in [*self._override_subs.get(name, ()),
                                *self._override_subs.get(None, ())]:  # fmt: skip
                        notify.append((partial(ocb, device, name, old, new),
                                       partial(ocb, device, name, new, old),
                                       f"{label}={new!r}: refused by {_qualname(ocb)}"))
            done: list[Callable[[], None]] = []
            for call, undo, what in notify:
                try:
                    call()
                except Exception as err:
                    for k, state in saved.items():
                        self._restore(k, state)
                    for done_undo in reversed(done):
                        try:
                            done_undo()  # tell it the change is undone
                        except Exception:  # already rolling back: log, go on
                            log.exception("parameter %s: subscriber failed during rollback", what)
                    raise ConfigError(f"{_prefix(where)}{what}: {err}; kept the old value") from err
                done.append(undo)

    def _layer(self, name: str, device: str | None) -> dict[Source, Any]:
        if device is None:
            return self._layers[name]
        return self._dev_layers[device].setdefault(name, {})

    def _recompute(self, name: str, device: str | None) -> None:
        layers = self._layer(name, device)
        if device is None:
            top = max(layers)
            self._current[name] = Current(layers[top], top)  # the atomic replacement
            return
        cur = self._dev_current[device]
        if layers:
            top = max(layers)
            cur[name] = Current(layers[top], top)
        else:
            cur.pop(name, None)
            self._dev_layers[device].pop(name, None)

    def _save(self, key: _Key) -> tuple[dict[Source, Any], Current | None]:
        name, device = key
        if device is None:
            return dict(self._layers[name]), self._current[name]
        return dict(self._dev_layers[device].get(name, {})), self._dev_current[device].get(name)

    def _restore(self, key: _Key, state: tuple[dict[Source, Any], Current | None]) -> None:
        name, device = key
        layers, cur = state
        if device is None:
            self._layers[name] = layers
            assert cur is not None
            self._current[name] = cur
            return
        if layers:
            self._dev_layers[device][name] = layers
        else:
            self._dev_layers[device].pop(name, None)
        if cur is not None:
            self._dev_current[device][name] = cur
        else:
            self._dev_current[device].pop(name, None)

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


def _qualname(cb: Any) -> str:
    return str(getattr(cb, "__qualname__", repr(cb)))


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""
