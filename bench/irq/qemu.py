"""The QEMU part of the `interrupts` scenario: a TCG guest (the same on a KVM host) receiving a
paced stream from a vhostx `source` port (rate_pps) at several rates, moderation off and on,
with the guest's interrupts per packet read from its /proc/interrupts and its CPU from
/proc/stat (bench/guest_src/vxperf.c rx). The RTT cost of the added delay is measured in a
second pair of runs per rate (`stream_ping`): the guest also pings every `ping_us` (default
2000, jittered, from its own timer thread) on the same NIC and the port reflects its TX frames
into the stream (echo_tx), so each ping waits in the same moderated RX ring as the stream; the
added p50 of a rate is its p50 with moderation on minus off. (Separate runs: the pings and
their polling loop cost the guest CPU, which changes how often a saturated guest re-arms.) A ping-pong run against
an `echo` port, moderation off, on and adaptive, shows the cost with nothing else in flight
(each completion waits out the whole hold). The backend's lateness of each deadline firing
comes with the backend counters: irq_deadline_fired, irq_late_ns.

Threads: the main thread (QEMU dies with it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.harness.qemu_client import QemuRun, guest_image
from bench.harness.scenario_model import Case, QemuClient
from bench.process import DaemonProcess

__all__ = ["run_qemu"]


def _case(kind: str, rate: int, ping_us: int = 0) -> Case:
    return Case(test=f"irq_{kind}", kind=kind, direction="guest_rx", size=64, devices=1, busy=0,
                queues=1, rate=rate, client="qemu", idle_time=0.0,
                rx_ping_us=ping_us if kind == "stream" else 0)


def _rx_stats(d: DaemonProcess) -> dict[str, int]:
    q = d.stats()["devices"][0]["queues"].get("0", {})
    return {k: int(q.get(k, 0)) for k in ("packets", "interrupts", "interrupts_deferred",
                                         "interrupts_suppressed", "irq_deadline_flushes",
                                         "irq_deadline_fired", "irq_late_ns")}


def _guest(info: Any, sock: str, case: Case, q: dict[str, Any], core: int, workdir: Path,
           name: str, d: DaemonProcess) -> dict[str, Any]:
    warm, dur = float(q.get("warmup", 2.0)), float(q.get("duration", 5.0))
    with QemuRun(info, sock, case, QemuClient(), warmup=warm, duration=dur, core=core,
                 workdir=workdir, name=name) as g:
        g.wait_window_begin()
        s0 = _rx_stats(d)
        g.wait_window_end()
        s1 = _rx_stats(d)
        res = g.finish()
    out: dict[str, Any] = {"guest": dict(res.values), "boot_s": res.boot_s,
                           "backend": {k: s1[k] - s0[k] for k in s1}}
    if res.rtt_ns:
        rtts = sorted(res.rtt_ns)
        out["rtt_p50_us"] = rtts[len(rtts) // 2] / 1e3
        out["rtt_p99_us"] = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] / 1e3
    return out


def run_qemu(sc: dict[str, Any], out: Path, log: Any) -> list[dict[str, Any]]:
    """Every QEMU run of the scenario's [qemu] table (empty when it has none)."""
    q = sc.get("qemu")
    if not q:
        return []
    info = guest_image()
    core = int(sc.get("placement", {}).get("client_core", 0))
    bcore = int(sc.get("placement", {}).get("backend_core", 1))
    mod = [f"{k}={v}" for k, v in q.get("moderation", {}).items()]
    ping_us = int(q.get("ping_us", 2000))
    if not 0 <= ping_us <= 1_000_000:
        raise ValueError(f"qemu.ping_us: allowed 0..1000000 (0: no pings in the stream), got "
                         f"{ping_us}")
    recs: list[dict[str, Any]] = []
    work = out / "qemu"
    work.mkdir(parents=True, exist_ok=True)
    rates = q.get("rates", [10000, 50000])
    plans = [("stream", rate, m) for rate in rates for m in ("off", "on")]
    if ping_us:
        plans += [("stream_ping", rate, m) for rate in rates for m in ("off", "on")]
    if q.get("pingpong", True):
        plans += [("pingpong", 0, "off"), ("pingpong", 0, "on"), ("pingpong", 0, "adaptive")]
    for i, (kind, rate, m) in enumerate(plans):
        params = ["mode=baseline"] + {"on": mod, "adaptive": [*mod, "irq_mode=adaptive"]}.get(
            m, ["irq_mode=off"])
        d = DaemonProcess(params=params, cpus={bcore}, log_level="WARNING")
        stream = kind.startswith("stream")
        opts: dict[str, Any] = {}
        if stream:
            opts = {"rate_pps": rate, **({"echo_tx": True} if kind == "stream_ping" else {})}
        sock = d.add_device("net0", "source" if stream else "echo", **opts)
        case = _case("stream" if stream else kind, rate, ping_us if kind == "stream_ping" else 0)
        t0 = time.monotonic()
        try:
            d.start()
            r = _guest(info, sock, case, q, core, work, f"irq{i:02d}", d)
        except (RuntimeError, OSError, KeyError) as err:  # reported; the others go on
            r = {"error": f"{type(err).__name__}: {err}"[:600]}
        finally:
            d.stop()
        rec = {"kind": f"qemu_{kind}", "rate_pps": rate, "moderation": m, "tcg_guest": True,
               "wall_s": round(time.monotonic() - t0, 1), **r}
        g = r.get("guest", {})
        if stream and g:
            pk = max(1, int(g.get("if_packets", 0)))
            rec["guest_irqs_per_pkt"] = int(g.get("virtio_irqs", 0)) / pk
            tot = max(1, int(g.get("cpu_total_ticks", 0)))
            rec["guest_cpu_busy"] = int(g.get("cpu_busy_ticks", 0)) / tot
            rec["received_pps"] = pk / max(float(q.get("duration", 5.0)), 1e-9)
            if "rtt_p50_us" in r:
                rec["pings_lost"] = int(g.get("pings_sent", 0)) - int(g.get("pings_received", 0))
            pings = f", ping p50 {r['rtt_p50_us']:.1f} us" if "rtt_p50_us" in r else ""
            log(f"qemu {kind} {rate:>6} pps moderation {m:<3}: "
                f"{rec['guest_irqs_per_pkt']:.4f} irq/pkt, guest CPU "
                f"{rec['guest_cpu_busy']:.2f}{pings}")
        elif kind == "pingpong" and "rtt_p50_us" in r:
            log(f"qemu ping-pong moderation {m:<3}: p50 {r['rtt_p50_us']:.1f} us, "
                f"p99 {r['rtt_p99_us']:.1f} us")
        else:
            log(f"qemu {kind} {rate} moderation {m}: {r.get('error', 'no result')}")
        recs.append(rec)
    _added_p50(recs)
    return recs


def _added_p50(recs: list[dict[str, Any]]) -> None:
    """On each moderated stream record: `added_rtt_p50_us`, its ping p50 minus the p50 without
    moderation at the same rate in the same run."""
    off = {r["rate_pps"]: r["rtt_p50_us"] for r in recs
           if r["kind"] == "qemu_stream_ping" and r["moderation"] == "off" and "rtt_p50_us" in r}
    for r in recs:
        if r["kind"] == "qemu_stream_ping" and r["moderation"] != "off" and "rtt_p50_us" in r \
                and r["rate_pps"] in off:
            r["added_rtt_p50_us"] = r["rtt_p50_us"] - off[r["rate_pps"]]
