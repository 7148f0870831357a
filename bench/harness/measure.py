"""One run's measurement window, by client: testpmd streams (with the alongside ping-pong), the
guest model (ping-pong, paced stream, idle) and a QEMU guest.

Role: the Runner (bench/harness/runner.py) starts the backend and hands it here with the case and
the run's record; each `measure_*` function starts its client on the client core, warms up,
takes the two snapshots around the window (bench/harness/window.py), calls `on_window(rec)`
between them (the Runner's "window" hook) and fills rec["metrics"] and rec["mode_probe"]
["slices"]. Every process and thread it starts is registered on the caller's ExitStack.

Threads: the main thread (the Runner's); the guest model pins the calling thread to the client
core for the run (restored by the ExitStack).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import system
from .backends import CLEAN_CLIENT_CPU, RunningBackend, sample_rates, start_testpmd_client
from .modes import rtt_slices, slice_count
from .pingpong import AlongsideFlow, GuestModel, PingPongResult
from .scenario_model import Case, Scenario
from .stats import latency_summary
from .window import fill_common, snapshot

__all__ = ["measure_guest_model", "measure_qemu", "measure_testpmd_stream", "window_parts"]

OnWindow = Callable[[dict[str, Any]], None]


def window_parts(sc: Scenario) -> int:
    """Parts of a window for `[modes] slices` (each at least modes.MIN_SLICE_S)."""
    return slice_count(sc.run.duration, sc.modes.slices)


# ---- testpmd streams -------------------------------------------------------------------------
def measure_testpmd_stream(sc: Scenario, stack: ExitStack, be: RunningBackend, case: Case,
                           rec: dict[str, Any], logs: Path, on_window: OnWindow) -> None:
    client = start_testpmd_client(stack, be.sockets, case, sc.testpmd, sc.placement, logs)
    rec["client_pids"] = client.pids
    rec.setdefault("logs", []).extend(client.logs)
    flow = _start_alongside(sc, stack, be, case) if case.pingpong_alongside else None
    busy = case.busy_devices if case.busy else None
    if case.direction == "guest_tx":
        be.start_traffic()
        client.start(busy)
    else:
        client.start(busy)
        be.start_traffic()
    if flow is not None:
        flow.start()
    time.sleep(sc.run.warmup)
    tid = flow.cpu_tid if flow is not None else None
    if flow is not None:
        flow.begin_window()
    s0 = snapshot(be, case, client.pids, False, tid)
    c0 = client.port_stats()
    on_window(rec)
    c1 = _sliced_window(sc, client, case, rec, c0)
    s1 = snapshot(be, case, client.pids, False, tid)
    pp = flow.end_window() if flow is not None else None
    sched = flow.sched if flow is not None else ""
    window, rates = sample_rates(c0, c1)
    key = "tx" if case.direction == "guest_tx" else "rx"
    per_dev = [{"device": k, "pps": r[f"{key}_pps"], "bps": r[f"{key}_bps"]}
               for k, r in enumerate(rates)]
    pps = sum(d["pps"] for d in per_dev)
    m = rec.setdefault("metrics", {})
    m.update(pps=pps, bps=sum(d["bps"] for d in per_dev), per_device=per_dev,
             devices_with_traffic=sum(1 for d in per_dev if d["pps"] > 0))
    fill_common(rec, s0, s1, window, pps, be)
    m["client_tx_drops"] = client.stop()
    client_core = m["client_cpu"]["total"]
    if pp is not None:
        client_core += _alongside_metrics(sc, rec, pp, sched, s0, s1)
    # clean: the busy-polling client had its core (other load shows here first); with a
    # ping-pong alongside, testpmd and the ping-pong thread share that core
    m["clean"] = client_core >= CLEAN_CLIENT_CPU


def _sliced_window(sc: Scenario, client: Any, case: Case, rec: dict[str, Any], c0: Any) -> Any:
    """Sleep through the window, sampling the client's counters `[modes] slices` times; the
    parts' rates go to rec["mode_probe"]["slices"]. Returns the last sample."""
    parts = window_parts(sc)
    key = "tx_pps" if case.direction == "guest_tx" else "rx_pps"
    end = time.monotonic() + sc.run.duration
    prev = c0
    slices = []
    for k in range(1, parts):
        time.sleep(max(0.0, end - sc.run.duration * (parts - k) / parts - time.monotonic()))
        cur = client.port_stats()
        slices.append(round(sum(r[key] for r in sample_rates(prev, cur)[1]), 1))
        prev = cur
    time.sleep(max(0.0, end - time.monotonic()))
    last = client.port_stats()
    if parts > 1:
        slices.append(round(sum(r[key] for r in sample_rates(prev, last)[1]), 1))
    rec["mode_probe"]["slices"] = slices
    return last


def _start_alongside(sc: Scenario, stack: ExitStack, be: RunningBackend,
                     case: Case) -> AlongsideFlow:
    """Connect the guest model to the alongside device; the flow starts later (`start`)."""
    if be.alongside is None:
        raise RuntimeError(f"backend {be.spec.name} has no alongside ping-pong device")
    gm_cfg = sc.guest_model
    gm = stack.enter_context(GuestModel([be.alongside], queue_size=gm_cfg.queue_size,
                                        mem_mb=gm_cfg.mem_mb))
    flow = AlongsideFlow(gm, size=case.size, core=sc.placement.client_core, wait=gm_cfg.wait,
                         interval=1.0 / case.pingpong_rate if case.pingpong_rate else 0.0)
    stack.callback(flow.stop)  # before the guest model closes (LIFO)
    return flow


def _alongside_metrics(sc: Scenario, rec: dict[str, Any], res: PingPongResult, sched: str,
                       s0: dict[str, Any], s1: dict[str, Any]) -> float:
    """metrics["alongside"] of a stream run; returns the ping-pong thread's CPU (cores)."""
    case_rate = rec["params"]["pingpong_rate"]
    cpu = system.cpu_usage(s0.get("alongside", {}), s1.get("alongside", {}), s1["t"] - s0["t"])
    rate = res.received / res.elapsed_s if res.elapsed_s else 0.0
    rec["metrics"]["alongside"] = {
        "device": "one more device of the same backend, not counted in pps/per_device",
        "core": sc.placement.client_core,
        "shares_core_with": "testpmd client forwarding lcore",
        "size": rec["params"]["size"], "wait": sc.guest_model.wait,
        "sched": sched,
        "attempted_rate": case_rate or "back to back",
        "round_trips_per_s": rate, "round_trips": res.received, "sent": res.sent,
        "lost": res.lost, "bad": res.bad, "late": res.late,
        "elapsed_s": round(res.elapsed_s, 4),
        "latency": latency_summary(res.rtt_ns), "cpu": cpu,
    }
    rec["_alongside_rtt_ns"] = res.rtt_ns
    if res.received == 0:
        rec["error"] = (f"the alongside ping-pong completed no round trip in "
                        f"{res.elapsed_s:.1f} s (sent {res.sent}, lost {res.lost}, bad "
                        f"replies {res.bad})")
    return float(cpu["total"])


# ---- guest model: ping-pong, paced stream, idle ----------------------------------------------
def measure_guest_model(sc: Scenario, stack: ExitStack, be: RunningBackend, case: Case,
                        rec: dict[str, Any], on_window: OnWindow) -> None:
    gm_cfg = sc.guest_model
    gm = stack.enter_context(GuestModel(be.sockets, queue_size=gm_cfg.queue_size,
                                        mem_mb=gm_cfg.mem_mb))
    be.start_traffic()
    old_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(threading.get_native_id(), {sc.placement.client_core})
    stack.callback(os.sched_setaffinity, threading.get_native_id(), old_affinity)
    run = sc.run
    m = rec.setdefault("metrics", {})
    if case.kind == "pingpong":
        gm.pingpong(run.warmup, case.size, wait=gm_cfg.wait, record=False)
        s0 = snapshot(be, case, [], True)
        on_window(rec)
        res = gm.pingpong(run.duration, case.size, wait=gm_cfg.wait)
        s1 = snapshot(be, case, [], True)
        window = s1["t"] - s0["t"]
        rate = res.received / res.elapsed_s if res.elapsed_s else 0.0
        m.update(pps=rate, bps=rate * case.size * 8, round_trips=res.received,
                 sent=res.sent, lost=res.lost, bad=res.bad, late=res.late,
                 per_flow=res.per_flow,
                 latency=latency_summary(res.rtt_ns))
        rec["_rtt_ns"] = res.rtt_ns
        rec["mode_probe"]["slices"] = [round(x, 1) for x in
                                       rtt_slices(res.rtt_ns, window_parts(sc))]
        if res.received == 0:
            rec["error"] = (f"no round trip completed in the {res.elapsed_s:.1f} s window "
                            f"(sent {res.sent}, lost {res.lost}, bad replies {res.bad})")
        fill_common(rec, s0, s1, window, 2 * rate, be)
    elif case.kind == "stream":
        gm.stream(run.warmup, case.size, case.rate)
        s0 = snapshot(be, case, [], True)
        on_window(rec)
        res2 = gm.stream(run.duration, case.size, case.rate)
        s1 = snapshot(be, case, [], True)
        window = s1["t"] - s0["t"]
        pps = res2.posted / res2.elapsed_s if res2.elapsed_s else 0.0
        m.update(pps=pps, bps=pps * case.size * 8, offered_pps=case.rate * case.devices,
                 posted=res2.posted, offered=res2.offered,
                 per_device=[{"device": k, "pps": n / res2.elapsed_s, "bps":
                              n / res2.elapsed_s * case.size * 8}
                             for k, n in enumerate(res2.per_flow)])
        fill_common(rec, s0, s1, window, pps, be)
    else:  # idle
        m["primed"] = gm.prime()
        time.sleep(run.warmup + case.idle_time)
        s0 = snapshot(be, case, [], True)
        on_window(rec)
        time.sleep(run.duration)
        s1 = snapshot(be, case, [], True)
        fill_common(rec, s0, s1, s1["t"] - s0["t"], 0.0, be)
        m["pps"] = 0.0


# ---- QEMU guests (TCG) -----------------------------------------------------------------------
def measure_qemu(sc: Scenario, info: Any, stack: ExitStack, be: RunningBackend, case: Case,
                 rec: dict[str, Any], rundir: Path, logs: Path, on_window: OnWindow) -> None:
    """`info`: the qemu_client.GuestImageInfo the Runner built for the scenario."""
    from .qemu_client import QemuRun

    run = sc.run
    be.start_traffic()
    guest = QemuRun(info, be.sockets[0], case, sc.qemu, warmup=run.warmup,
                    duration=run.duration, core=sc.placement.client_core,
                    workdir=rundir, name=f"g{rec['index']:03d}")
    # registered before the guest: runs after QEMU stopped, keeps its console log
    stack.callback(_copy_quietly, guest.console_log, logs / "guest.console.log")
    stack.enter_context(guest)
    pids = [guest.pid] if guest.pid is not None else []
    rec["client_pids"] = pids
    rec.setdefault("logs", []).append(str(logs / "guest.console.log"))
    guest.wait_window_begin()
    s0 = snapshot(be, case, pids, False)
    on_window(rec)
    guest.wait_window_end()
    s1 = snapshot(be, case, pids, False)
    res = guest.finish()
    v = res.values
    elapsed = v["elapsed_ns"] / 1e9
    m = rec.setdefault("metrics", {})
    m.update(client="qemu", tcg_guest=True, boot_s=round(res.boot_s, 3),
             guest_window_s=round(elapsed, 4), guest=dict(v))
    if res.mode == "pingpong":
        rate = v["received"] / elapsed if elapsed else 0.0
        m.update(pps=rate, bps=rate * case.size * 8, round_trips=v["received"],
                 sent=v["sent"], lost=v["lost"], bad=v["bad"], per_flow=[v["received"]],
                 latency=latency_summary(res.rtt_ns))
        rec["_rtt_ns"] = res.rtt_ns
        rec["mode_probe"]["slices"] = [round(x, 1) for x in
                                       rtt_slices(res.rtt_ns, window_parts(sc))]
        if v["received"] == 0:
            rec["error"] = (f"the guest completed no round trip in {elapsed:.1f} s (sent "
                            f"{v['sent']}, lost {v['lost']}, bad replies {v['bad']})")
        fill_common(rec, s0, s1, s1["t"] - s0["t"], 2 * rate, be)
    else:
        # the guest driver's own counters (frames through eth0) over the guest's window
        pps = v["if_packets"] / elapsed if elapsed else 0.0
        bps = v["if_bytes"] * 8 / elapsed if elapsed else 0.0
        m.update(pps=pps, bps=bps, per_device=[{"device": 0, "pps": pps, "bps": bps}],
                 devices_with_traffic=int(pps > 0))
        fill_common(rec, s0, s1, s1["t"] - s0["t"], pps, be)
        # clean: the guest's vCPU (busy sending or receiving) had the client core
        m["clean"] = m["client_cpu"]["total"] >= CLEAN_CLIENT_CPU
        if pps == 0:
            rec["error"] = f"the guest moved no frame in its {elapsed:.1f} s window"


def _copy_quietly(src: Path, dst: Path) -> None:
    try:
        shutil.copyfile(src, dst)
    except OSError:
        pass
