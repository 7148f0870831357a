"""Live statistics in the terminal (`vhostx stats`): a table of workers and one of queues, with
rates from the deltas between two snapshots of the control socket's `stats`.

The stats dict is the control socket's (docs/internal-api.md, "Daemon statistics"): "workers"
with an index, "queues" per queue work, "devices" for their state; every field is read by name,
so fields added later are ignored. A field that is absent shows as "-"; a counter that went
backwards (its queue work was re-made) counts from zero.

`params_table` / `workers_table` (and `print_params` / `print_workers`, which the `vhostx params`
and `vhostx workers` commands call) render the parameter listing and the workers as rich tables
readable at 80 columns.

Threads: the caller's (the CLI's main thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["QueueRow", "WorkerRow", "params_table", "print_params", "print_workers",
           "queue_rows", "rates", "render_stats_loop", "stats_table", "worker_rows",
           "workers_table"]

_QUEUE_COUNTERS = ("packets", "bytes", "kicks", "kicks_avoided", "interrupts",
                   "interrupts_suppressed", "ring_full", "stuck_events", "budget_exhausted",
                   "turns", "empty_turns", "poll_starts", "poll_stops", "polled_ns")
_WORKER_COUNTERS = ("busy_ns", "idle_ns", "loops", "sleeps", "empty_polls")


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


def _list(v: Any) -> list[Mapping[str, Any]]:
    if isinstance(v, Mapping):
        return [dict(x, name=x.get("name", k)) for k, x in v.items() if isinstance(x, Mapping)]
    if isinstance(v, list | tuple):
        return [x for x in v if isinstance(x, Mapping)]
    return []


def queue_rows(stats: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{queue name: row} with "device", "worker", "polling" (None when unknown) and counters."""
    out: dict[str, dict[str, Any]] = {}
    for q in _list(stats.get("queues")):
        name = str(q.get("name", f"queue{len(out)}"))
        out[name] = dict(q, name=name)
    return out


def worker_rows(stats: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{worker key: row}; the key is the index when the daemon gives one, else the name."""
    out: dict[str, dict[str, Any]] = {}
    for pos, w in enumerate(_list(stats.get("workers"))):
        key = str(w.get("index", w.get("name", pos)))
        out[key] = dict(w)
    return out


@dataclass
class QueueRow:
    name: str
    device: str
    worker: str
    polling: bool | None
    rates: dict[str, float]  # per second, for the counters present in both snapshots
    totals: dict[str, float]  # current values


@dataclass
class WorkerRow:
    key: str
    name: str
    cpu: Any
    works: Any
    polling: Any
    busy_pct: float | None
    idle_pct: float | None
    rates: dict[str, float]


def _delta(cur: Any, prev: Any) -> float | None:
    """The increase of a counter; None when either side is missing. A counter that went down
    was re-made (its queue work restarted at zero): its whole current value is the increase."""
    c, p = _num(cur), _num(prev)
    if c is None or p is None:
        return None
    return c if c < p else c - p


def _dt(prev: Mapping[str, Any], cur: Mapping[str, Any], fallback: float | None) -> float | None:
    t1, t0 = _num(cur.get("time")), _num(prev.get("time"))
    if t1 is not None and t0 is not None and t1 > t0:
        return t1 - t0
    return fallback if fallback and fallback > 0 else None


def rates(prev: Mapping[str, Any], cur: Mapping[str, Any], *,
          dt: float | None = None) -> tuple[list[WorkerRow], list[QueueRow]]:
    """Worker and queue rows with per-second rates between two snapshots (no rates when the
    interval is unknown or zero, e.g. the first snapshot against itself)."""
    interval = _dt(prev, cur, dt)
    pq, cq = queue_rows(prev), queue_rows(cur)
    queues = []
    for name, q in cq.items():
        p = pq.get(name, {})
        r: dict[str, float] = {}
        if interval:
            for key in _QUEUE_COUNTERS:
                d = _delta(q.get(key), p.get(key)) if p else None
                if d is not None:
                    r[key] = d / interval
        totals = {k: v for k in _QUEUE_COUNTERS if (v := _num(q.get(k))) is not None}
        pol = q.get("polling")
        queues.append(QueueRow(name, str(q.get("device", "")),
                               "" if q.get("worker") is None else str(q.get("worker")),
                               None if pol is None else bool(pol), r, totals))
    pw, cw = worker_rows(prev), worker_rows(cur)
    workers = []
    for key, w in cw.items():
        p = pw.get(key, {})
        r = {}
        busy = idle = None
        if interval and p:
            for k in _WORKER_COUNTERS:
                d = _delta(w.get(k), p.get(k))
                if d is not None:
                    r[k] = d / interval
            db, di = _delta(w.get("busy_ns"), p.get("busy_ns")), _delta(w.get("idle_ns"), p.get("idle_ns"))
            if db is not None and di is not None and db + di > 0:
                busy, idle = 100.0 * db / (db + di), 100.0 * di / (db + di)
            elif db is not None:
                busy = min(100.0, 100.0 * db / (interval * 1e9))
                idle = 100.0 - busy
        polling = w.get("polling")
        if polling is None and "queues" in cur:
            polling = sum(1 for q in queues if q.worker == key and q.polling)
        workers.append(WorkerRow(key, str(w.get("name", key)), w.get("cpu"), w.get("works"),
                                 polling, busy, idle, r))
    return workers, queues


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}" if x == int(x) or abs(x) >= 10 else f"{x:.1f}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _plain(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def stats_table(prev: Mapping[str, Any], cur: Mapping[str, Any], *,
                dt: float | None = None) -> Any:
    """A rich renderable: a title line, the workers table and the queues table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    workers, queues = rates(prev, cur, dt=dt)
    devices = _list(cur.get("devices"))
    broken = [f"{d.get('name')}: {d.get('broken')}" for d in devices if d.get("broken")]
    uptime = _num(cur.get("uptime_s"))
    title = Text.assemble(
        ("vhostx ", "bold"), f"mode={cur.get('mode', '?')}  ",
        f"uptime={uptime:.0f}s  " if uptime is not None else "",
        f"devices={len(devices)}  workers={len(workers)}  queues={len(queues)}",
    )
    parts: list[Any] = [title]
    if broken:
        parts.append(Text("broken: " + "; ".join(broken), style="bold red"))

    wt = Table(title="workers", title_justify="left", expand=False)
    for col in ("worker", "name", "cpu", "busy", "idle", "loops/s", "empty polls/s", "sleeps/s",
                "works", "polling"):
        wt.add_column(col, justify="left" if col in ("worker", "name") else "right", no_wrap=True)
    for w in sorted(workers, key=lambda w: (len(w.key), w.key)):
        wt.add_row(w.key, w.name if w.name != w.key else "", _plain(w.cpu), _pct(w.busy_pct),
                   _pct(w.idle_pct), _si(w.rates.get("loops")), _si(w.rates.get("empty_polls")),
                   _si(w.rates.get("sleeps")), _plain(w.works), _plain(w.polling))
    if not workers:
        wt.add_row("(none)", *[""] * 9)

    qt = Table(title="queues", title_justify="left", expand=False)
    qt.caption = ("avoided: kicks saved by polling; supp: interrupts suppressed; full: RX frames "
                  "dropped, ring full; stuck: stuck-queue events (total); budget: turns that "
                  "used their whole budget")
    qt.caption_justify = "left"
    for col in ("device", "queue", "worker", "poll", "pps", "Mbit/s", "kicks/s", "avoided/s",
                "irq/s", "supp/s", "kicks/pkt", "full/s", "stuck", "budget/s"):
        qt.add_column(col, justify="left" if col in ("device", "queue", "worker") else "right",
                      no_wrap=True)
    for q in sorted(queues, key=lambda q: (q.device, q.name)):
        r = q.rates
        pps = r.get("packets")
        kpp = (f"{r['kicks'] / pps:.3f}" if pps and "kicks" in r else "-")
        qt.add_row(
            q.device, q.name.removeprefix(q.device + ".") if q.device else q.name, q.worker or "-",
            "-" if q.polling is None else ("[green]on[/green]" if q.polling else "off"),
            _si(pps), "-" if "bytes" not in r else f"{r['bytes'] * 8 / 1e6:.1f}",
            _si(r.get("kicks")), _si(r.get("kicks_avoided")), _si(r.get("interrupts")),
            _si(r.get("interrupts_suppressed")), kpp, _si(r.get("ring_full")),
            _si(q.totals.get("stuck_events")), _si(r.get("budget_exhausted")),
        )
    if not queues:
        qt.add_row("(no running queues)", *[""] * 13)
    parts += [wt, qt]
    return Group(*parts)


# ----------------------------------------------------------------------------------------------
# `vhostx params` and `vhostx workers`


def _console(console: Any) -> Any:
    from rich.console import Console

    return console if console is not None else Console()  # a pipe: 80 columns


def params_table(rows: list[Mapping[str, Any]]) -> Any:
    """A rich table of parameter rows (the registry's `describe()` as dicts, or the control
    socket's `params` answer): name and value, then the description with a dim line of default,
    range and unit, when it may change, scope and where the value came from. Every field is read
    by name; an absent one is left out. Fits 80 columns: only the description wraps."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    t.add_column("parameter", no_wrap=True, style="bold")
    t.add_column("value", no_wrap=True, overflow="fold", max_width=16)
    t.add_column("description", overflow="fold", min_width=24, ratio=1)
    for r in rows:
        facts = []
        if "default" in r and r.get("default") != r.get("value"):
            facts.append(f"default {_plain(r['default'])}")
        rng = " ".join(str(x) for x in (r.get("range"), r.get("unit")) if x)
        if rng:
            facts.append(rng)
        if "runtime" in r:
            facts.append("run time" if r["runtime"] else "start-up only")
        for key in ("scope", "source"):
            if r.get(key):
                facts.append(f"{key} {r[key]}")
        cell = Text(str(r.get("description", "")))
        if facts:
            cell.append("\n" + ", ".join(facts), style="dim")
        value = r.get("value")
        t.add_row(str(r.get("name", "?")), "-" if value is None else _value(value), cell)
        for dev, own in (r.get("devices") or {}).items():  # per-device values of device scope
            note = Text(f"device {dev}'s own value (global: {_plain(value)})")
            if isinstance(own, Mapping) and own.get("source"):
                note.append(f", source {own['source']}", style="dim")
            own_value = own.get("value") if isinstance(own, Mapping) else own
            t.add_row(f"{r.get('name', '?')}@{dev}", _value(own_value), note)
    return t


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def print_params(rows: list[Mapping[str, Any]], console: Any = None) -> int:
    """`vhostx params`: the table, or "no parameters"."""
    con = _console(console)
    if not rows:
        con.print("no parameters")
        return 0
    con.print(params_table(rows))
    return 0


def workers_table(rows: list[Mapping[str, Any]]) -> Any:
    """A rich table of the control socket's `workers` rows: index, name, cpu, works, polling,
    busy share (busy_ns of busy_ns + idle_ns) and devices (the only column that wraps)."""
    from rich.table import Table

    t = Table(box=None, show_edge=False, pad_edge=False, expand=False, header_style="bold")
    for col in ("worker", "name", "cpu", "works", "polling", "busy"):
        t.add_column(col, no_wrap=True, justify="left" if col in ("worker", "name") else "right")
    t.add_column("devices", overflow="fold")
    for i, w in enumerate(rows):
        busy, idle = _num(w.get("busy_ns")) or 0.0, _num(w.get("idle_ns")) or 0.0
        devices = w.get("devices")
        t.add_row(_plain(w.get("index", i)), _plain(w.get("name")), _plain(w.get("cpu")),
                  _plain(w.get("works")), _plain(w.get("polling")),
                  _pct(100.0 * busy / (busy + idle) if busy + idle > 0 else None),
                  ",".join(str(d) for d in devices) if isinstance(devices, list | tuple)
                  else _plain(devices))
    return t


def print_workers(rows: list[Mapping[str, Any]], console: Any = None) -> int:
    """`vhostx workers`: the table, or "no workers"."""
    con = _console(console)
    if not rows:
        con.print("no workers")
        return 0
    con.print(workers_table(rows))
    return 0


def render_stats_loop(
    control: str,
    *,
    interval: float = 1.0,
    count: int = 0,
    fetch: Callable[[], dict[str, Any]] | None = None,
    console: Any = None,
) -> int:
    """Refresh the tables every `interval` seconds until Ctrl-C (or after `count` refreshes)."""
    import sys

    from rich.console import Console
    from rich.live import Live

    from .cli import control_request

    if console is None:
        # Into a pipe or a file: no terminal to size by, so wide enough for every column.
        console = Console() if sys.stdout.isatty() else Console(width=220)

    get = fetch or (lambda: control_request(control, {"cmd": "stats"}))
    prev = get()
    t_prev = time.monotonic()
    n = 0
    with Live(stats_table(prev, prev), console=console, refresh_per_second=4,
              auto_refresh=False) as live:
        try:
            while count == 0 or n < count:
                time.sleep(interval)
                cur = get()
                t_cur = time.monotonic()
                live.update(stats_table(prev, cur, dt=t_cur - t_prev), refresh=True)
                prev, t_prev = cur, t_cur
                n += 1
        except KeyboardInterrupt:
            pass
    return 0
