"""`vhostx devices`: list a running daemon's devices and their state, like `ip link` for vhost-user.

One row per device: whether a frontend is connected, its state (`ok`, `NEEDS_RESET` when a ring
was broken by bad guest data and the device waits for the frontend to reset it, `idle` when no
ring runs), the virtio status byte, the queues running, the negotiated features and, for a broken
device, why. The data is the daemon's `stats` snapshot (the control socket's "stats" command).

Threads: the CLI's main thread only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["device_rows", "register", "render"]

_HEADER = ("device", "frontend", "state", "status", "queues", "features", "reason")


def _state(dev: Mapping[str, Any]) -> str:
    if dev.get("needs_reset") or dev.get("broken"):
        return "NEEDS_RESET"
    return "ok" if dev.get("queues") else "idle"


def device_rows(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One plain dict per device of a stats snapshot (what `--json` prints)."""
    rows = []
    for dev in stats.get("devices", []) or []:
        status = int(dev.get("status", 0) or 0)
        rows.append({
            "name": dev.get("name"),
            "connected": dev.get("connected"),
            "state": _state(dev),
            "needs_reset": bool(dev.get("needs_reset") or dev.get("broken")),
            "status": status,
            "queues": sorted(int(q) for q in (dev.get("queues") or {})),
            "features": dev.get("features"),
            "protocol_features": dev.get("protocol_features"),
            "reason": dev.get("broken"),
        })
    return rows


def _cell(row: Mapping[str, Any], column: str) -> str:
    if column == "device":
        return str(row["name"])
    if column == "frontend":
        connected = row.get("connected")
        return "-" if connected is None else ("connected" if connected else "none")
    if column == "status":
        return f"{row['status']:#04x}"
    if column == "queues":
        return ",".join(str(q) for q in row["queues"]) or "-"
    if column == "reason":
        return str(row["reason"] or "")
    return str(row.get(column) or "-")


def render(rows: Sequence[Mapping[str, Any]], out: Any = None) -> None:
    """Print the rows as a table (rich) on `out` (default stdout)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in _HEADER:
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "red" if row["needs_reset"] else None
        table.add_row(*(_cell(row, c) for c in _HEADER), style=style)
    stream = out if out is not None else sys.stdout
    console = Console(file=stream, width=None if stream.isatty() else 200)
    if rows:
        console.print(table)
    else:
        console.print("no devices")


def _run(args: argparse.Namespace) -> int:
    from .cli import ask  # the CLI module registers this one: import it late

    rows = device_rows(ask(args.control, {"cmd": "stats"}))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        render(rows)
    # like `systemctl is-failed`: a script can tell a broken device from the exit code
    return 1 if args.check and any(r["needs_reset"] for r in rows) else 0


def register(sub: Any) -> None:
    """Add the `devices` subcommand to the CLI's subparsers."""
    p = sub.add_parser("devices", help="list a running daemon's devices and their state")
    p.add_argument("--control", required=True, help="the daemon's control socket")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when a device reports NEEDS_RESET")
    p.set_defaults(func=_run)
