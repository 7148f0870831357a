"""The `interrupts` scenario (configs/bench/interrupts.toml): for each queue count, offered rate
and interrupt mode, one vhostx daemon (an echo device of N queue pairs) and the guest-model
client (bench.irq.client), then a results page: results.json, report.md, plots/.

Modes: `eventfd` (one call eventfd per queue, the driver selects on all of them), `moderation`
(the same driver, the backend holding interrupts: irq_mode / irq_coalesce_*), `adaptive` (the
same with irq_mode = adaptive; not in the shipped matrix), `posted` (the
driver registers one posted-interrupt domain; the backend sets bits and wakes the domain only
when the driver sleeps). Figures per run: throughput, notifications per packet (the backend's
RX counters: interrupts + pi_notifications), driver syscalls per packet, driver and backend
CPU per packet; per queue count and mode a ping-pong run: RTT p50 / p99.

Threads: the main thread (the client is this thread; the daemon a child process).
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from pathlib import Path
from typing import Any

from bench.harness.system import dimensions, thread_times
from bench.process import DaemonProcess

from .client import LOOPS, IrqClient

__all__ = ["is_interrupts_scenario", "load", "run_scenario"]

MODES = ("eventfd", "moderation", "adaptive", "posted")
DEFAULT_WINDOW = 32  # frames in flight per queue pair in an unlimited stream
# posted, unlimited, C loop: how long the driver re-takes an empty bitmap before it sleeps
DEFAULT_POSTED_SPIN_US = 20


def is_interrupts_scenario(path: Path) -> bool:
    try:
        return tomllib.loads(path.read_text()).get("kind") == "interrupts"
    except (OSError, tomllib.TOMLDecodeError):
        return False


def load(path: Path) -> dict[str, Any]:
    sc = tomllib.loads(path.read_text())
    m = sc.get("matrix", {})
    bad = [x for x in m.get("modes", MODES) if x not in MODES]
    if bad:
        raise ValueError(f"{path}: matrix.modes: allowed {MODES}, got {bad}")
    bad = [x for x in m.get("daemon_modes", ["baseline"]) if x not in ("baseline", "shared")]
    if bad:
        raise ValueError(f"{path}: matrix.daemon_modes: allowed baseline, shared; got {bad}")
    if any(not 1 <= q <= 64 for q in m.get("queues", [1])):
        raise ValueError(f"{path}: matrix.queues: each 1..64, got {m.get('queues')}")
    ws = m.get("windows", [DEFAULT_WINDOW])
    if not ws or any(not isinstance(w, int) or not 1 <= w <= 128 for w in ws):
        raise ValueError(f"{path}: matrix.windows: a non-empty list, each 1..128, got {ws}")
    loop = sc.get("run", {}).get("driver_loop", "c")
    if loop not in LOOPS:
        raise ValueError(f"{path}: run.driver_loop: allowed {LOOPS}, got {loop!r}")
    spin = sc.get("run", {}).get("posted_spin_us", DEFAULT_POSTED_SPIN_US)
    if not isinstance(spin, int) or isinstance(spin, bool) or not 0 <= spin <= 100_000:
        raise ValueError(f"{path}: run.posted_spin_us: 0..100000, got {spin!r}")
    reps = sc.get("run", {}).get("unlimited_repeats", 1)
    if not isinstance(reps, int) or isinstance(reps, bool) or not 1 <= reps <= 20:
        raise ValueError(f"{path}: run.unlimited_repeats: 1..20, got {reps!r}")
    return sc


def _cpu(pid: int) -> float:
    return sum(t.cpu_s for t in thread_times(pid).values())


def _rx_counters(st: dict[str, Any]) -> dict[str, int]:
    tot: dict[str, int] = {}
    for dev in st["devices"]:
        for idx, q in dev["queues"].items():
            if int(idx) % 2 == 0:  # RX vrings: the echoes' completions
                for k in ("interrupts", "interrupts_suppressed", "interrupts_deferred",
                          "interrupts_posted", "pi_notifications", "packets"):
                    tot[k] = tot.get(k, 0) + int(q.get(k, 0))
    return tot


def _params(sc: dict[str, Any], mode: str, daemon_mode: str) -> list[str]:
    out = [f"mode={daemon_mode}", "workers=1"]
    if mode in ("moderation", "adaptive"):
        out += [f"{k}={v}" for k, v in sc.get("moderation", {}).items()]
    if mode == "adaptive":
        out.append("irq_mode=adaptive")  # the [moderation] values, while the rate is high
    return out


def _streams(rates: list[int], windows: list[int]) -> list[tuple[int, int]]:
    """(rate, window) of each stream run: a paced rate once with the first window, unlimited
    (rate 0) once per window (frames in flight per queue pair: how many completions one
    notification may cover when the driver keeps up)."""
    out = []
    for rate in rates:
        out += [(rate, w) for w in (windows if rate == 0 else windows[:1])]
    return out


def _stream_rec(client: IrqClient, daemon: DaemonProcess, run: dict[str, Any], rate: int,
                window: int, daemon_mode: str, queues: int, mode: str) -> dict[str, Any]:
    """One stream run and its figures (the backend's counters and CPU around it)."""
    c0, s0 = _cpu(daemon.pid), _rx_counters(daemon.stats())
    loop = str(run.get("driver_loop", "c"))
    spin = (int(run.get("posted_spin_us", DEFAULT_POSTED_SPIN_US))
            if mode == "posted" and loop == "c" else 0)  # the C loop's posted path only
    res = client.stream(float(run.get("duration", 3.0)), rate, window=window, loop=loop,
                        spin_us=spin)
    c1, s1 = _cpu(daemon.pid), _rx_counters(daemon.stats())
    pk = max(1, res.packets)
    notif = (s1["interrupts"] - s0["interrupts"]
             + s1.get("pi_notifications", 0) - s0.get("pi_notifications", 0))
    return {"kind": "stream", "daemon_mode": daemon_mode, "queues": queues,
            "mode": mode, "rate_pps": rate, "window": window,
            **({"driver_loop": loop, "posted_spin_us": spin} if not rate else {}),
            **res.as_dict(),
            "throughput_pps": res.packets / max(res.elapsed_s, 1e-9),
            "notifications": notif, "notifications_per_pkt": notif / pk,
            "syscalls_per_pkt": res.syscalls / pk,
            "kicks_per_pkt": res.kicks / pk,
            "irq_syscalls_per_pkt": (res.syscalls - res.kicks) / pk,
            "driver_cpu_us_per_pkt": 1e6 * res.driver_cpu_s / pk,
            "backend_cpu_us_per_pkt": 1e6 * (c1 - c0) / pk,
            "backend": {k: s1.get(k, 0) - s0.get(k, 0) for k in s1}}


def _one(sc: dict[str, Any], queues: int, mode: str, rates: list[int], out: Path,
         log: Any, daemon_mode: str = "baseline",
         windows: list[int] | None = None) -> list[dict[str, Any]]:
    windows = windows or [DEFAULT_WINDOW]
    run = sc.get("run", {})
    pl = sc.get("placement", {})
    daemon = DaemonProcess(params=_params(sc, mode, daemon_mode),
                           cpus={int(pl.get("backend_core", 1))}, log_level="WARNING")
    sock = daemon.add_device("net0", "echo", queues=queues)
    recs: list[dict[str, Any]] = []
    try:
        daemon.start()
        try:
            os.sched_setaffinity(0, {int(pl.get("client_core", 0))})
        except OSError:
            pass
        client = IrqClient(sock, queues, posted=(mode == "posted"))
        try:
            time.sleep(0.2)
            for rate, window in _streams(rates, windows):
                reps = [_stream_rec(client, daemon, run, rate, window, daemon_mode, queues, mode)
                        for _ in range(1 if rate else int(run.get("unlimited_repeats", 1)))]
                # the run of median throughput stands for them all (ratios of medians)
                rec = sorted(reps, key=lambda x: x["throughput_pps"])[len(reps) // 2]
                rec["repeats"] = len(reps)
                rec["throughput_runs_pps"] = [x["throughput_pps"] for x in reps]
                recs.append(rec)
                log(f"{daemon_mode:<8} {mode:<10} q={queues:<3} rate={rate or 'max':>6} "
                    f"window={window:<3}: "
                    f"{rec['throughput_pps']:9.0f} pps"
                    f"{f' (median of {len(reps)})' if len(reps) > 1 else ''}, "
                    f"{rec['notifications_per_pkt']:.4f} "
                    f"notif/pkt, {rec['syscalls_per_pkt']:.4f} syscalls/pkt")
            pp = client.pingpong(int(run.get("pingpongs", 400)))
            rtts = sorted(pp.rtts_ns)
            rec = {"kind": "pingpong", "daemon_mode": daemon_mode, "queues": queues,
                   "mode": mode, **pp.as_dict(),
                   "rtt_p50_us": rtts[len(rtts) // 2] / 1e3 if rtts else None,
                   "rtt_p99_us": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] / 1e3
                   if rtts else None,
                   "syscalls_per_pkt": pp.syscalls / max(1, pp.packets)}
            recs.append(rec)
            log(f"{daemon_mode:<8} {mode:<10} q={queues:<3} ping-pong: p50 {rec['rtt_p50_us']} us, "
                f"p99 {rec['rtt_p99_us']} us")
        finally:
            client.close()
    finally:
        daemon.stop()
        try:
            (out / "logs").mkdir(exist_ok=True)
            (out / "logs" / f"daemon-{daemon_mode}-{mode}-q{queues}.log").write_text(daemon.log_tail(200))
        except OSError:
            pass
    return recs


def _ratios(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (queues, rate): each mode against eventfd in the same run."""
    out = []
    streams = [r for r in recs if r["kind"] == "stream"]
    for r in streams:  # the guest model
        if r["mode"] == "eventfd":
            continue
        base = next((b for b in streams if b["mode"] == "eventfd" and b["queues"] == r["queues"]
                     and b["rate_pps"] == r["rate_pps"]
                     and b.get("window") == r.get("window")
                     and b["daemon_mode"] == r["daemon_mode"]), None)
        if base is None:
            continue
        out.append({"daemon_mode": r["daemon_mode"], "queues": r["queues"],
                    "rate_pps": r["rate_pps"], "window": r.get("window"), "mode": r["mode"],
                    "throughput_ratio": r["throughput_pps"] / max(base["throughput_pps"], 1e-9),
                    "notifications_ratio": (r["notifications_per_pkt"]
                                            / max(base["notifications_per_pkt"], 1e-12)),
                    "syscalls_ratio": r["syscalls_per_pkt"] / max(base["syscalls_per_pkt"],
                                                                  1e-12)})
    return out


def _repeats_note(doc: dict[str, Any]) -> list[str]:
    n = max((int(r.get("repeats", 1)) for r in doc["runs"] if r["kind"] == "stream"), default=1)
    if n <= 1:
        return []
    return [(f"Unlimited rows: {n} runs in a row each, the row is the run of median throughput "
            f"(every run's rate in results.json, `throughput_runs_pps`); ratios below are "
            f"ratios of these medians."), ""]


def _kicks(r: dict[str, Any]) -> str:
    """The kicks per packet of a stream row (results written before they were counted: -)."""
    k = r.get("kicks_per_pkt")
    return "-" if k is None else f"{k:.4f}"


def _report(doc: dict[str, Any]) -> str:
    lines = [f"# {doc['name']}: {doc['description']}", "",
             f"Label: {doc['label']}", "",
             f"Commit {doc['dimensions'].get('commit', '?')}; command: `{doc['command']}`", "",
             "## Streams (guest model, one driver thread, echo device)", "",
             *_repeats_note(doc),
             ("| daemon | queues | rate (pps) | in flight/pair | mode | throughput (pps) | "
              "notif/pkt | syscalls/pkt | of which kicks/pkt | driver CPU us/pkt | "
              "backend CPU us/pkt |"),
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        if r["kind"] != "stream":
            continue
        lines.append(f"| {r['daemon_mode']} | {r['queues']} | {r['rate_pps'] or 'unlimited'} | "
                     f"{r.get('window', '-')} | "
                     f"{r['mode']} | {r['throughput_pps']:.0f} | {r['notifications_per_pkt']:.4f} | "
                     f"{r['syscalls_per_pkt']:.4f} | {_kicks(r)} | "
                     f"{r['driver_cpu_us_per_pkt']:.2f} | "
                     f"{r['backend_cpu_us_per_pkt']:.2f} |")
    lines += ["", "## Ping-pong (one frame in flight)", "",
              "| daemon | queues | mode | RTT p50 (us) | RTT p99 (us) | syscalls/pkt |",
              "|---|---:|---|---:|---:|---:|"]
    for r in doc["runs"]:
        if r["kind"] == "pingpong":
            lines.append(f"| {r['daemon_mode']} | {r['queues']} | {r['mode']} | "
                         f"{r['rtt_p50_us']:.1f} | {r['rtt_p99_us']:.1f} | "
                         f"{r['syscalls_per_pkt']:.3f} |" if r["rtt_p50_us"] is not None else
                         f"| {r['daemon_mode']} | {r['queues']} | {r['mode']} | - | - | - |")
    lines += ["", "## Ratios against per-queue eventfds (same run)", "",
              ("| daemon | queues | rate (pps) | in flight/pair | mode | throughput x | "
              "notif/pkt x | syscalls/pkt x |"),
              "|---|---:|---:|---:|---|---:|---:|---:|"]
    for x in doc["ratios"]:
        lines.append(f"| {x['daemon_mode']} | {x['queues']} | {x['rate_pps'] or 'unlimited'} | "
                     f"{x.get('window', '-')} | {x['mode']} | "
                     f"{x['throughput_ratio']:.2f} | {x['notifications_ratio']:.3f} | "
                     f"{x['syscalls_ratio']:.3f} |")
    qr = [r for r in doc["runs"] if r["kind"].startswith("qemu_")]
    if qr:
        lines += ["", "## QEMU guest (TCG): paced source into the guest, moderation off / on", "",
                  ("| run | rate (pps) | moderation | received (pps) | guest irq/pkt | "
                  "guest CPU busy | RTT p50 (us) | RTT p99 (us) | held irq late, mean (us) | "
                  "note |"),
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in qr:
            def f(k: str, fmt: str, r: dict[str, Any] = r) -> str:
                return format(r[k], fmt) if r.get(k) is not None else "-"
            be = r.get("backend", {})
            fired = int(be.get("irq_deadline_fired", 0))
            late = f"{be.get('irq_late_ns', 0) / fired / 1e3:.1f}" if fired else "-"
            lines.append(f"| {r['kind']} | {r['rate_pps'] or '-'} | {r['moderation']} | "
                         f"{f('received_pps', '.0f')} | {f('guest_irqs_per_pkt', '.4f')} | "
                         f"{f('guest_cpu_busy', '.2f')} | {f('rtt_p50_us', '.1f')} | "
                         f"{f('rtt_p99_us', '.1f')} | {late} | {r.get('error', '')[:80]} |")
        qsc = doc.get("scenario", {}).get("qemu", {})
        hold = qsc.get("moderation", {}).get("irq_coalesce_us")
        added = [r for r in qr if r.get("added_rtt_p50_us") is not None]
        if added:
            lines += ["", (f"qemu_stream_ping rows: RTT of pings the guest sent every "
                      f"{qsc.get('ping_us', 2000)} us, reflected "
                      f"into the stream (they wait in the same moderated RX ring). Added p50 "
                      f"with moderation (irq_coalesce_us = {hold}):")]
            lines += [f"- {r['rate_pps']} pps: {r['added_rtt_p50_us']:+.1f} us "
                      f"(pings lost: {r.get('pings_lost', '-')})" for r in added]
    return "\n".join(lines) + "\n"


def _plots(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    w0 = doc["scenario"].get("matrix", {}).get("windows", [DEFAULT_WINDOW])[0]
    streams = [r for r in doc["runs"]  # one line against load: the first window's runs
               if r["kind"] == "stream" and r.get("window", w0) == w0]
    for dm, q in sorted({(r["daemon_mode"], r["queues"]) for r in streams}):
        for metric, label in (("notifications_per_pkt", "interrupts (notifications) per packet"),
                              ("syscalls_per_pkt", "driver syscalls per packet")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for mode in MODES:
                rs = [r for r in streams
                      if r["queues"] == q and r["mode"] == mode and r["daemon_mode"] == dm]
                if rs:
                    ax.plot([r["throughput_pps"] for r in rs], [r[metric] for r in rs],
                            marker="o", label=mode)
            ax.set_xlabel("received load (pps)")
            ax.set_ylabel(label)
            ax.set_title(f"{dm}, {q} queue pair(s), one driver ({doc['label']})", fontsize=9)
            ax.legend()
            fig.tight_layout()
            fig.savefig(pdir / f"{metric}-{dm}-q{q}.png")
            plt.close(fig)
    pps = [r for r in doc["runs"] if r["kind"] == "pingpong" and r["rtt_p50_us"] is not None]
    if pps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for dm in sorted({r["daemon_mode"] for r in pps}):
            for mode in MODES:
                rs = sorted((r for r in pps if r["mode"] == mode and r["daemon_mode"] == dm),
                            key=lambda r: r["queues"])
                if rs:
                    ax.plot([r["queues"] for r in rs], [r["rtt_p50_us"] for r in rs],
                            marker="o", label=f"{dm} {mode} p50")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queue pairs")
        ax.set_ylabel("ping-pong RTT p50 (us)")
        ax.set_title(f"latency ({doc['label']})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(pdir / "rtt.png")
        plt.close(fig)


def run_scenario(path: Path, out: Path, *, duration: float | None = None,
                 queues: list[int] | None = None, label: str = "", log: Any = print,
                 pingpongs: int | None = None, guest_model: bool = True,
                 qemu: bool = True) -> dict[str, Any]:
    """Run the scenario into `out`; guest_model / qemu: which parts (the QEMU part needs the
    [qemu] table, QEMU and the guest image)."""
    sc = load(path)
    if duration is not None:
        sc.setdefault("run", {})["duration"] = duration
    if pingpongs is not None:
        sc.setdefault("run", {})["pingpongs"] = pingpongs
    m = sc.get("matrix", {})
    qs = queues or list(m.get("queues", [1, 8, 64]))
    out.mkdir(parents=True, exist_ok=True)
    recs: list[dict[str, Any]] = []
    for dm in m.get("daemon_modes", ["baseline"]) if guest_model else []:
        for q in qs:
            for mode in m.get("modes", MODES):
                recs += _one(sc, q, mode, list(m.get("rates", [0])), out, log, dm,
                             list(m.get("windows", [DEFAULT_WINDOW])))
    if qemu:
        from .qemu import run_qemu

        recs += run_qemu(sc, out, log)
    doc = {"name": sc.get("name", "interrupts"), "description": sc.get("description", ""),
           "label": label or "dev run", "command": f"vhostx bench run {path}",
           "dimensions": dimensions(), "scenario": sc, "runs": recs, "ratios": _ratios(recs)}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "report.md").write_text(_report(doc))
    _plots(doc, out)
    return doc
