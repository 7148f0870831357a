"""What a measurement window records: snapshots of the backend and client at both ends, and the
metrics every run derives from two of them (CPU per thread and core, the backend's own rate,
notification counters per packet, memory).

`snapshot(be, case, client_pids, own_thread, alongside_tid)` reads, at one instant, the backend's
and the client's thread CPU times (and this process's own thread, when the guest model runs on
it), the daemon's stats without the alongside device, and the backend's packet count.
`fill_common(rec, s0, s1, window, packets, be)` fills ``rec["metrics"]`` from two snapshots.

Threads: the runner's (main) thread.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from . import system
from .backends import RunningBackend, notification_counters
from .scenario_model import Case

__all__ = ["fill_common", "snapshot"]


def snapshot(be: RunningBackend, case: Case, client_pids: list[int],
             own_thread: bool, alongside_tid: int | None = None) -> dict[str, Any]:
    """One instant of the backend and the client (see the module docstring)."""
    stats = be.stats()
    snap = {
        "t": time.monotonic(),
        "backend_threads": {pid: system.thread_times(pid) for pid in be.pids},
        "client_threads": {pid: system.thread_times(pid) for pid in client_pids},
        "stats": be.stream_stats(stats),
        "backend_packets": be.packets(case.direction if case.kind == "stream" else "guest_tx",
                                      stats),
    }
    if own_thread or alongside_tid is not None:
        me = system.thread_times(os.getpid())
        if own_thread:
            tid = threading.get_native_id()
            snap["own"] = {tid: me[tid]} if tid in me else {}
        if alongside_tid is not None:
            snap["alongside"] = ({alongside_tid: me[alongside_tid]} if alongside_tid in me
                                 else {})
    return snap


def fill_common(rec: dict[str, Any], s0: dict[str, Any], s1: dict[str, Any],
                window: float, packets: float, be: RunningBackend) -> None:
    """rec["metrics"]: window, backend and client CPU, backend pps, notifications, memory."""
    m = rec.setdefault("metrics", {})
    m["window_s"] = round(window, 4)
    bt0: dict[int, Any] = {}
    bt1: dict[int, Any] = {}
    for pid in be.pids:
        bt0.update(s0["backend_threads"].get(pid, {}))
        bt1.update(s1["backend_threads"].get(pid, {}))
    m["backend_cpu"] = system.cpu_usage(bt0, bt1, window)
    ct0: dict[int, Any] = {}
    ct1: dict[int, Any] = {}
    for pid in s1["client_threads"]:
        ct0.update(s0["client_threads"].get(pid, {}))
        ct1.update(s1["client_threads"].get(pid, {}))
    if "own" in s1:
        ct0.update(s0.get("own", {}))
        ct1.update(s1["own"])
    m["client_cpu"] = system.cpu_usage(ct0, ct1, window)
    b0, b1 = s0["backend_packets"], s1["backend_packets"]
    if b0 is not None and b1 is not None and b1[0] > b0[0]:
        m["backend_pps"] = (b1[1] - b0[1]) / (b1[0] - b0[0])
    if s0["stats"] is not None and s1["stats"] is not None:
        n0, n1 = notification_counters(s0["stats"]), notification_counters(s1["stats"])
        delta = {k: max(0, n1[k] - n0[k]) for k in n1}
        per = {}
        base = delta["packets"] or packets * window
        for k in ("kicks", "kicks_avoided", "interrupts", "interrupts_suppressed",
                  "poll_switches", "wakes", "caught"):
            per[k] = delta[k] / base if base else None
        m["notifications"] = {"counts": delta, "per_packet": per}
    m["memory"] = be.memory()
