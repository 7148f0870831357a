"""The `modinfo -p`-like listing of a parameter registry: its rows and their text table.

`describe_rows(registry)` gives one `ParamRow` per parameter (what `Registry.describe()` returns);
`format_rows(rows)` renders rows, as dicts (a daemon's control socket answer) or from
`ParamRow.as_dict()`, as the `vhostx params` table. `iosched.params` re-exports both and
`ParamRow`: import from there.

Threads: any (reads the registry as any reader does, without its lock).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .params import Registry

__all__ = ["ParamRow", "describe_rows", "format_rows"]


@dataclass(frozen=True)
class ParamRow:
    """One line of the `modinfo -p`-like listing (JSON-ready through `as_dict`).

    `devices`: the devices that have a value of their own, {device: {"value", "source"}}."""

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
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_rows(registry: Registry) -> list[ParamRow]:
    """One row per parameter of `registry`, sorted by name, with its current value and source;
    each row lists the devices that have a value of their own."""
    rows = []
    for p in registry.params():
        cur = registry.current(p.name)
        own = {d: {"value": c.value, "source": c.source.label}
               for d, c in registry.overrides(p.name).items()}  # fmt: skip
        rows.append(
            ParamRow(
                name=p.name, type=p.kind, value=cur.value, default=p.default,
                range=p.allowed(), unit=p.unit, runtime=p.runtime, scope=p.scope.value,
                source=cur.source.label, description=p.description, devices=own,
            )
        )  # fmt: skip
    return rows


def format_rows(rows: Iterable[Mapping[str, Any]]) -> str:
    """`describe()` rows (as dicts, e.g. from a daemon's control socket) as the `vhostx params`
    table: a header, one line per parameter, one `name@device` line per device value."""
    headers = ("NAME", "TYPE", "VALUE", "DEFAULT", "RANGE", "UNIT", "RT", "SCOPE", "SOURCE")
    lines: list[tuple[str, ...]] = []
    for r in rows:
        unit = r.get("unit") or "-"
        rt = "yes" if r.get("runtime") else "no"
        lines.append((
            r["name"], r["type"], _show(r["value"]), _show(r["default"]), r["range"], unit, rt,
            r["scope"], r["source"], r["description"],
        ))  # fmt: skip
        for dev, own in (r.get("devices") or {}).items():
            lines.append((
                f"{r['name']}@{dev}", r["type"], _show(own["value"]), "-", r["range"], unit, rt,
                "device", own["source"], f"device {dev}'s own value (global: {_show(r['value'])})",
            ))  # fmt: skip
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + "  DESCRIPTION"]
    for line in lines:
        cols = "  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True))
        out.append(f"{cols}  {line[-1]}")
    return "\n".join(out) + "\n"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)
