"""vhostx.live: rows and rates from two stats snapshots (session-1 and session-2 shapes), and what
the rendered tables show."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from vhostx.live import queue_rows, rates, render_stats_loop, stats_table

SESSION1_A: dict[str, Any] = {
    "ok": True, "mode": "baseline", "uptime_s": 10.0, "time": 100.0,
    "devices": [{"name": "net0", "broken": None,
                 "queues": {"0": {"packets": 0, "bytes": 0, "ring_full": 0},
                            "1": {"packets": 1000, "bytes": 64000, "interrupts": 10,
                                  "interrupts_suppressed": 90}},
                 "works": {"net0.tx0": {"kicks": 100, "turns": 200, "budget_exhausted": 1}}}],
    "workers": [{"name": "net0", "loops": 50, "sleeps": 40, "busy_ns": 1_000_000_000,
                 "idle_ns": 1_000_000_000, "works": 1}],
}
SESSION1_B: dict[str, Any] = {
    "ok": True, "mode": "baseline", "uptime_s": 12.0, "time": 102.0,
    "devices": [{"name": "net0", "broken": "bad descriptor",
                 "queues": {"0": {"packets": 0, "bytes": 0, "ring_full": 0},
                            "1": {"packets": 3000, "bytes": 192000, "interrupts": 30,
                                  "interrupts_suppressed": 170}},
                 "works": {"net0.tx0": {"kicks": 140, "turns": 260, "budget_exhausted": 5}}}],
    "workers": [{"name": "net0", "loops": 150, "sleeps": 60, "busy_ns": 1_500_000_000,
                 "idle_ns": 2_500_000_000, "works": 1}],
}


def shared(t: float, pkts: int, kicks: int, avoided: int, busy: int, idle: int,
           polling: bool = True) -> dict[str, Any]:
    return {
        "ok": True, "mode": "shared", "uptime_s": t, "time": t,
        "devices": [{"name": "net0", "broken": None}, {"name": "net1", "broken": None}],
        "workers": [
            {"index": 0, "name": "w0", "cpu": 1, "busy_ns": busy, "idle_ns": idle,
             "loops": int(t * 1000), "sleeps": 0, "empty_polls": int(t * 10), "works": 2,
             "devices": ["net0", "net1"], "polling": 1 if polling else 0},
            {"index": 1, "name": "w1", "cpu": None, "busy_ns": 0, "idle_ns": 0, "loops": 0,
             "sleeps": 0, "empty_polls": 0, "works": 0, "devices": [], "polling": 0},
        ],
        "queues": [
            {"name": "net0.tx0", "device": "net0", "worker": 0, "polling": polling,
             "packets": pkts, "bytes": pkts * 1500, "kicks": kicks, "kicks_avoided": avoided,
             "interrupts": 0, "interrupts_suppressed": 0, "ring_full": 0, "stuck_events": 3,
             "budget_exhausted": 0, "turns": 0, "empty_turns": 0},
            {"name": "net1.tx0", "device": "net1", "worker": 0, "polling": False,
             "packets": 0, "bytes": 0},
        ],
    }


def text_of(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=220, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_session1_rows_name_rings_like_works() -> None:
    rows = queue_rows(SESSION1_A)
    assert set(rows) == {"net0.rx0", "net0.tx0"}
    tx = rows["net0.tx0"]
    assert tx["packets"] == 1000 and tx["kicks"] == 100 and tx["worker"] == "net0"
    assert tx["polling"] is None


def test_session1_rates() -> None:
    workers, queues = rates(SESSION1_A, SESSION1_B)
    tx = next(q for q in queues if q.name == "net0.tx0")
    assert tx.rates["packets"] == 1000.0  # 2000 packets in 2 s
    assert tx.rates["bytes"] == 64000.0
    assert tx.rates["kicks"] == 20.0
    assert tx.rates["interrupts"] == 10.0 and tx.rates["interrupts_suppressed"] == 40.0
    assert tx.rates["budget_exhausted"] == 2.0
    (w,) = workers
    assert w.rates["loops"] == 50.0
    # busy went up 0.5 s and idle 1.5 s: 25 % busy
    assert w.busy_pct == 25.0 and w.idle_pct == 75.0


def test_session1_table_shows_rates_and_broken_device() -> None:
    out = text_of(stats_table(SESSION1_A, SESSION1_B))
    assert "mode=baseline" in out
    assert "broken: net0: bad descriptor" in out
    line = next(ln for ln in out.splitlines() if " tx0 " in ln)
    assert "1.00k" in line and " 0.5 " in line  # 1000 pps, 0.5 Mbit/s
    assert "0.020" in line  # kicks per packet: 20/s over 1000/s
    wline = next(ln for ln in out.splitlines() if "net0" in ln and "%" in ln)
    assert "25.0%" in wline and "75.0%" in wline


def test_shared_rates_and_table() -> None:
    a = shared(10.0, 0, 0, 0, busy=0, idle=0)
    b = shared(11.0, 1_000_000, 100, 900, busy=600_000_000, idle=400_000_000)
    workers, queues = rates(a, b)
    tx = next(q for q in queues if q.name == "net0.tx0")
    assert tx.polling is True and tx.worker == "0"
    assert tx.rates["packets"] == 1e6 and tx.rates["kicks_avoided"] == 900
    assert tx.totals["stuck_events"] == 3
    w0 = next(w for w in workers if w.key == "0")
    assert w0.busy_pct == 60.0 and w0.rates["empty_polls"] == 10.0 and w0.polling == 1
    out = text_of(stats_table(a, b))
    line = next(ln for ln in out.splitlines() if "tx0" in ln and "net0" in ln)
    cells = [c.strip() for c in line.split("│")[1:-1]]
    assert cells[:4] == ["net0", "tx0", "0", "on"]
    assert cells[4] == "1.00M"  # pps
    assert cells[5] == "12000.0"  # 1e6 * 1500 B * 8 = 12 Gbit/s
    assert cells[6] == "100" and cells[7] == "900"
    assert cells[10] == "0.000"  # kicks per packet 1e-4 shown with 3 decimals
    assert cells[12] == "3"  # stuck total
    off = next(ln for ln in out.splitlines() if "net1" in ln and "tx0" in ln)
    assert "off" in off
    wline = next(ln for ln in out.splitlines() if ln.startswith("│ 0"))
    assert "w0" in wline and "60.0%" in wline and "40.0%" in wline


def test_first_snapshot_has_no_rates_and_does_not_divide_by_zero() -> None:
    a = shared(10.0, 5, 1, 1, busy=1, idle=1)
    workers, queues = rates(a, a)
    assert all(not q.rates for q in queues) and all(w.busy_pct is None for w in workers)
    out = text_of(stats_table(a, a))
    assert "tx0" in out


def test_counter_that_restarts_counts_from_zero() -> None:
    a = shared(10.0, 5000, 50, 0, busy=0, idle=0)
    b = shared(12.0, 200, 4, 0, busy=0, idle=0)  # the work was re-made: counters restarted
    _, queues = rates(a, b)
    tx = next(q for q in queues if q.name == "net0.tx0")
    assert tx.rates["packets"] == 100.0 and tx.rates["kicks"] == 2.0


def test_unknown_and_odd_fields_do_not_break_the_view() -> None:
    odd: dict[str, Any] = {"time": 5.0, "mode": None, "devices": "x", "workers": [None, 3, {}],
                           "queues": [{"name": "q", "packets": "many", "worker": None,
                                       "future": {"a": 1}}], "new_section": [1, 2]}
    odd2 = dict(odd, time=6.0)
    out = text_of(stats_table(odd, odd2))
    assert "q" in out
    assert text_of(stats_table({}, {}))  # an empty dict still renders


def test_daemon_time_missing_uses_local_interval() -> None:
    a, b = dict(SESSION1_A), dict(SESSION1_B)
    del a["time"], b["time"]
    _, queues = rates(a, b, dt=4.0)
    tx = next(q for q in queues if q.name == "net0.tx0")
    assert tx.rates["packets"] == 500.0


def test_render_stats_loop_counts_refreshes() -> None:
    snaps = iter([shared(float(t), t * 1000, t, 0, busy=t, idle=t) for t in range(1, 5)])
    calls: list[int] = []

    def fetch() -> dict[str, Any]:
        calls.append(1)
        return next(snaps)

    console = Console(file=io.StringIO(), width=220, color_system=None)
    assert render_stats_loop("unused", interval=0.01, count=3, fetch=fetch, console=console) == 0
    assert len(calls) == 4  # the first snapshot, then one per refresh
    assert "tx0" in console.file.getvalue()  # type: ignore[attr-defined]
