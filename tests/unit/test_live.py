"""vhostx.live: rows and rates from two stats snapshots, what the rendered tables show, and the
`vhostx params` / `vhostx workers` tables at 80 columns."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from vhostx.live import queue_rows, rates, render_stats_loop, stats_table


def baseline(t: float, pkts: int, kicks: int, irqs: int, suppressed: int, budget: int,
             loops: int, busy: int, idle: int, broken: str | None = None) -> dict[str, Any]:
    """A baseline daemon's stats: one worker per device, kicks drive every queue."""
    return {
        "ok": True, "mode": "baseline", "uptime_s": t, "time": t,
        "devices": [{"name": "net0", "broken": broken,
                     "queues": {"1": {"packets": pkts, "bytes": pkts * 64}}}],
        "workers": [{"index": 0, "name": "net0", "cpu": None, "loops": loops, "sleeps": 40,
                     "busy_ns": busy, "idle_ns": idle, "works": 2, "devices": ["net0"],
                     "polling": 0}],
        "queues": [
            {"name": "net0.tx0", "device": "net0", "worker": 0, "polling": False,
             "packets": pkts, "bytes": pkts * 64, "kicks": kicks, "interrupts": irqs,
             "interrupts_suppressed": suppressed, "budget_exhausted": budget, "turns": 200},
            {"name": "net0.rx0", "device": "net0", "worker": 0, "polling": False,
             "packets": 0, "bytes": 0, "ring_full": 0},
        ],
    }


BASE_A = baseline(100.0, 1000, 100, 10, 90, 1, 50, 1_000_000_000, 1_000_000_000)
BASE_B = baseline(102.0, 3000, 140, 30, 170, 5, 150, 1_500_000_000, 2_500_000_000,
                  broken="bad descriptor")


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


def test_rows_come_from_the_queues_list_only() -> None:
    rows = queue_rows(BASE_A)
    assert set(rows) == {"net0.rx0", "net0.tx0"}  # not the devices' C ring counters again
    tx = rows["net0.tx0"]
    assert tx["packets"] == 1000 and tx["kicks"] == 100 and tx["worker"] == 0
    assert tx["polling"] is False
    assert queue_rows({"devices": BASE_A["devices"]}) == {}


def test_baseline_rates() -> None:
    workers, queues = rates(BASE_A, BASE_B)
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


def test_baseline_table_shows_rates_and_broken_device() -> None:
    out = text_of(stats_table(BASE_A, BASE_B))
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
    a, b = dict(BASE_A), dict(BASE_B)
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


# ---- `vhostx params` and `vhostx workers` tables -----------------------------------------------


def _render(table: Any, width: int = 80) -> list[str]:
    from rich.console import Console

    con = Console(width=width, record=True, color_system=None, file=io.StringIO())
    con.print(table)
    return con.export_text().splitlines()


def test_params_table_fits_80_columns_and_keeps_every_word() -> None:
    from vhostx.daemon import new_registry
    from vhostx.live import params_table

    registry = new_registry(["net0"])
    registry.set("busy_poll_us", 0, device="net0")
    rows = [r.as_dict() for r in registry.describe()]
    lines = _render(params_table(rows))
    assert max(len(ln) for ln in lines) <= 80
    text = " ".join(" ".join(lines).split())
    for r in rows:
        assert any(ln.startswith(r["name"] + " ") for ln in lines), r["name"]
        # the description wraps but loses nothing
        assert " ".join(r["description"].split()) in text, r["name"]
        assert r["range"] in text
    assert any(ln.startswith("busy_poll_us@net0 ") for ln in lines)


def test_params_table_reads_control_rows_by_name() -> None:
    from vhostx.live import params_table

    rows = [{"name": "turn_max_packets", "value": 64, "source": "runtime", "range": "[1, 4096]",
             "unit": "packets", "description": "budget", "new_field": [1]},
            {"name": "polling", "value": True}, {"value": 3}]
    lines = _render(params_table(rows))
    text = "\n".join(lines)
    assert "turn_max_packets" in text and "64" in text and "source runtime" in text
    assert "[1, 4096] packets" in text
    assert any(ln.startswith("polling ") and "true" in ln for ln in lines)
    assert any(ln.startswith("? ") for ln in lines)


def test_workers_table_fits_80_columns() -> None:
    from vhostx.live import print_workers, workers_table

    rows = [{"index": 0, "name": "w0", "cpu": 1, "works": 2, "polling": 1, "busy_ns": 750,
             "idle_ns": 250, "devices": [f"net{i}" for i in range(40)]},
            {"index": 1, "name": "w1", "cpu": None, "works": 0, "polling": 0, "busy_ns": 0,
             "idle_ns": 0, "devices": []}]
    lines = _render(workers_table(rows))
    assert max(len(ln) for ln in lines) <= 80
    assert lines[0].split() == ["worker", "name", "cpu", "works", "polling", "busy", "devices"]
    assert lines[1].split()[:6] == ["0", "w0", "1", "2", "1", "75.0%"]
    joined = "".join(ln.split()[-1] if i else "" for i, ln in enumerate(lines))
    assert "net39" in joined  # the device list wraps, nothing is cut
    assert any(ln.split()[:6] == ["1", "w1", "-", "0", "0", "-"] for ln in lines)
    from rich.console import Console

    out = io.StringIO()
    assert print_workers([], Console(file=out, width=80)) == 0
    assert out.getvalue().strip() == "no workers"


def test_vhostx_params_prints_the_rich_table(capsys: Any, monkeypatch: Any) -> None:
    from vhostx.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["params"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["parameter", "value", "description"]
    assert max(len(ln.rstrip()) for ln in out) <= 80
    assert any(ln.startswith("turn_max_packets ") for ln in out)
