"""Live statistics in the terminal: rates per queue from two snapshots of the control socket.

Threads: the caller's (the CLI's main thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["rates", "render_stats_loop", "stats_table"]

_RATE_KEYS = ("packets", "bytes", "interrupts", "interrupts_suppressed")


def _queue_rows(snapshot: dict[str, Any]) -> dict[tuple[str, str], dict[str, int]]:
    rows: dict[tuple[str, str], dict[str, int]] = {}
    for dev in snapshot.get("devices", []):
        for qname, q in dev.get("queues", {}).items():
            rows[(dev["name"], qname)] = q
        for wname, w in dev.get("works", {}).items():
            rows.setdefault((dev["name"], "work:" + wname), {}).update(
                {"kicks": w.get("kicks", 0)}
            )
    return rows


def rates(prev: dict[str, Any], cur: dict[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    """Per-second rates of the counters between two stats snapshots."""
    dt = max(cur.get("time", 0.0) - prev.get("time", 0.0), 1e-9)
    a, b = _queue_rows(prev), _queue_rows(cur)
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key, q in b.items():
        p = a.get(key, {})
        out[key] = {k: (q.get(k, 0) - p.get(k, 0)) / dt for k in (*_RATE_KEYS, "kicks") if k in q}
    return out


def stats_table(prev: dict[str, Any], cur: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"vhostx  mode={cur.get('mode')}  uptime={cur.get('uptime_s', 0):.0f}s")
    for col in ("device", "queue", "Mpps", "Gbit/s", "kicks/s", "irq/s", "irq supp/s", "broken"):
        table.add_column(col, justify="right" if col not in ("device", "queue") else "left")
    r = rates(prev, cur)
    broken = {d["name"]: d.get("broken") for d in cur.get("devices", [])}
    for (dev, q), v in sorted(r.items()):
        table.add_row(
            dev, q,
            f"{v.get('packets', 0) / 1e6:.3f}",
            f"{v.get('bytes', 0) * 8 / 1e9:.2f}",
            f"{v.get('kicks', 0):.0f}",
            f"{v.get('interrupts', 0):.0f}",
            f"{v.get('interrupts_suppressed', 0):.0f}",
            "yes" if broken.get(dev) else "",
        )
    return table


def render_stats_loop(
    control: str,
    *,
    interval: float = 1.0,
    count: int = 0,
    fetch: Callable[[], dict[str, Any]] | None = None,
) -> int:
    """Refresh a table every `interval` seconds until Ctrl-C (or `count` refreshes)."""
    from rich.live import Live

    from .cli import control_request

    get = fetch or (lambda: control_request(control, {"cmd": "stats"}))
    prev = get()
    n = 0
    with Live(stats_table(prev, prev), refresh_per_second=4) as live:
        try:
            while count == 0 or n < count:
                time.sleep(interval)
                cur = get()
                live.update(stats_table(prev, cur))
                prev = cur
                n += 1
        except KeyboardInterrupt:
            pass
    return 0
