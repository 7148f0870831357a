"""Soak commands: `vhostx bench restart-soak` and `vhostx bench soak` (bench/cli.py registers them).

- `restart_soak`: one QEMU guest (TCG, tap port in a fresh network namespace, `reconnect=1`), a
  ping every 0.2 s and a paced TCP transfer into the guest, and the daemon killed (SIGKILL, or
  SIGTERM) and started again N times (default 100) with bench.restart; reports the pings lost in
  each outage, the recovery times (socket back, rings running, ping back, transfer moving) and
  whether the transfer arrived with the right md5.
- `soak`: N sink devices (default 64) in one daemon in shared mode, testpmd with N virtio-user
  ports (one process per 32) sending 64-byte frames for a given duration; samples the daemon's RSS and open fd count,
  and at the end checks, device by device, that the packets testpmd sent equal those the daemon
  counted.

Both write a JSON report (`--out`) and print a summary. Figures from a loaded two-core machine say
whether things survive, not how fast they are.

Threads: the main thread (the daemon, QEMU and testpmd are tied to it by their death signals).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.process import DaemonProcess
from bench.restart import PacedSender, Pinger, restart_loop, summarize, wait_device_running

__all__ = ["process_sample", "restart_soak", "soak"]

Log = Callable[[str], None]
PORTS_PER_TESTPMD = 32  # RTE_MAX_ETHPORTS of Debian's DPDK 22.11


def process_sample(pid: int) -> dict[str, int]:
    """RSS (KiB) and open fd count of process `pid`, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _write(out: Path | None, doc: dict[str, Any], log: Log) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"report: {out}")


# ------------------------------------------------------------------------------ restart soak


def restart_soak(restarts: int = 100, *, stop_signal: int = signal.SIGKILL,
                 interval: float = 0.2, rate: float = 100_000.0, out: Path | None = None,
                 log: Log = print) -> dict[str, Any]:
    from bench.guest import build_image
    from bench.qemu import Guest, VhostUserNic
    from vhostx.netdev import Netns

    workdir = Path(tempfile.mkdtemp(prefix="vx-rsoak-"))
    sock = workdir / "net0.sock"
    subnet = "10.201.7"
    daemons: list[DaemonProcess] = []
    image = build_image()
    with Netns() as ns:
        spec = (f"name=net0,type=net,socket={sock},port=tap,tap_name=vxrs{os.getpid() % 100000},"
                f"tap_netns={ns.name},tap_address={subnet}.1/24")

        def start() -> DaemonProcess:
            d = DaemonProcess([spec], workdir=str(workdir / f"daemon{len(daemons)}"))
            Path(d.dir).mkdir(parents=True, exist_ok=True)
            daemons.append(d)
            return d.start()

        # long enough at `rate` for every round (a round takes 3-8 s here) plus a margin
        total = int(rate * 8 * restarts) + (1 << 20)
        job = (f"vx_wait_peer {subnet}.1 120 || exit 10\n"
               "vx_result recv_md5 $(nc -l -p 5002 | md5sum | cut -d' ' -f1)\n")
        nic = VhostUserNic(sock, mac="52:54:00:cc:00:02", ip=f"{subnet}.2/24", reconnect=1)
        t_start = time.monotonic()
        try:
            daemon = start()
            with Guest(image, [nic], job, name="rsoak", workdir=workdir) as g:
                g.wait_ready(300)
                wait_device_running(daemon, "net0", 60)
                pinger = Pinger(ns, f"{subnet}.2", interval).start()
                sender = PacedSender(ns, f"{subnet}.2", 5002, total, rate).start()
                try:
                    while sender.sent == 0 and sender.error is None:
                        time.sleep(0.1)
                    daemon, records = restart_loop(
                        daemon, start, pinger, restarts=restarts, device="net0", sender=sender,
                        stop_signal=stop_signal, log=log)
                    under_way = all(0 < r.bytes_sent_before < total for r in records)
                    sender.paced.clear()
                    finished = sender.join(300)
                    md5 = g.result("recv_md5", 120) if finished else None
                finally:
                    sender.paced.clear()
                    pinger.stop()
                g.wait_done(60, check=False)
            final = daemon.stats()
        finally:
            for d in daemons:
                d.stop()
    doc = {
        "kind": "restart-soak",
        "signal": signal.Signals(stop_signal).name,
        "ping_interval_s": interval,
        "transfer_bytes": total,
        "transfer_ok": bool(finished and md5 == sender.md5),
        "every_kill_during_transfer": under_way,
        "wall_s": round(time.monotonic() - t_start, 1),
        "device_broken": next(d for d in final["devices"] if d["name"] == "net0")["broken"],
        **summarize(records, pinger),
    }
    log(_restart_summary(doc))
    _write(out, doc, log)
    if doc["transfer_ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"kept {workdir} (daemon logs, guest console)")
    return doc


def _restart_summary(doc: dict[str, Any]) -> str:
    def line(name: str) -> str:
        s = doc[name]
        return (f"  {name:<20} min {s['min']:.2f}  median {s['median']:.2f}  p90 {s['p90']:.2f}  "
                f"max {s['max']:.2f} s") if s else f"  {name:<20} -"

    return "\n".join([
        (f"{doc['restarts']} restarts ({doc['signal']}) in {doc['wall_s']} s; transfer of "
        f"{doc['transfer_bytes']} bytes {'arrived intact' if doc['transfer_ok'] else 'FAILED'}; "
        f"every kill during the transfer: {doc['every_kill_during_transfer']}"),
        (f"  pings: {doc['pings_sent']} sent, {doc['pings_answered']} answered, "
        f"{doc['pings_lost_in_outages']} lost in outages, {doc['unrecovered']} outages without "
        f"recovery"),
        line("stopped_s"), line("rings_running_s"), line("ping_recovered_s"), line("transfer_resumed_s"),
    ])


# ------------------------------------------------------------------------------ device soak


def soak(devices: int = 64, duration: float = 1800.0, *, sample_s: float = 10.0,
         warmup_s: float = 10.0, out: Path | None = None, log: Log = print) -> dict[str, Any]:
    from bench.testpmd import Testpmd, VirtioUserVdev

    workdir = Path(tempfile.mkdtemp(prefix="vx-soak-"))
    daemon = DaemonProcess(params=["mode=shared"], workdir=str(workdir), cpus={1})
    socks = [daemon.add_device(f"s{i}", "sink") for i in range(devices)]
    samples: list[dict[str, Any]] = []
    mismatches: list[dict[str, Any]] = []
    t_start = time.monotonic()
    daemon.start()
    try:
        with contextlib.ExitStack() as stack:
            # DPDK's Debian build has RTE_MAX_ETHPORTS 32: one testpmd per 32 devices, each
            # forwarding on core 0 (they share it: rates fall, which a soak does not mind)
            tps = []
            for k, first in enumerate(range(0, devices, PORTS_PER_TESTPMD)):
                group = socks[first:first + PORTS_PER_TESTPMD]
                tps.append(stack.enter_context(Testpmd(
                    [VirtioUserVdev(s) for s in group], forward_mode="txonly", txpkts=64,
                    forward_lcores=(0,), main_lcore=1, total_num_mbufs=16384 + 512 * len(group),
                    memory_mb=max(256, (16384 + 512 * len(group)) * 3 // 1024 + 128),
                    log_dir=workdir, name=f"soak{k}")))
            for i in range(devices):
                wait_device_running(daemon, f"s{i}", 60)
            for tp in tps:
                tp.start_forwarding()
            time.sleep(warmup_s)
            end = time.monotonic() + duration
            while True:
                now = time.monotonic()
                sample = {"t_s": round(now - t_start, 1), **process_sample(daemon.pid),
                          "sent": sum(_sent(tps).values())}
                samples.append(sample)
                log(f"t={sample['t_s']:>7.1f} s  rss {sample['rss_kib']} KiB  fds "
                    f"{sample['fds']}  testpmd sent {sample['sent']}")
                if now >= end:
                    break
                time.sleep(min(sample_s, max(0.0, end - now)))
            for tp in tps:
                tp.stop_forwarding()
            counted = _settled_tx(daemon, devices)
            sent = _sent(tps)
            for i in range(devices):
                if counted[f"s{i}"] != sent[i]:
                    mismatches.append({"device": f"s{i}", "testpmd_sent": sent[i],
                                       "daemon_counted": counted[f"s{i}"]})
            broken = [d["name"] for d in daemon.stats()["devices"] if d["broken"]]
    finally:
        daemon.cleanup()
    if not mismatches and not broken:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"kept {workdir} (daemon and testpmd logs)")
    rss = [s["rss_kib"] for s in samples]
    fds = [s["fds"] for s in samples]
    doc = {
        "kind": "soak", "mode": "shared", "devices": devices, "duration_s": duration,
        "warmup_s": warmup_s, "packets_sent": sum(sent.values()),
        "packets_counted": sum(counted.values()), "mismatches": mismatches, "broken": broken,
        "rss_kib": {"first": rss[0], "last": rss[-1], "min": min(rss), "max": max(rss)},
        "fds": {"first": fds[0], "last": fds[-1], "min": min(fds), "max": max(fds)},
        "samples": samples,
    }
    log(f"{devices} devices for {duration:.0f} s (after {warmup_s:.0f} s warm-up): "
        f"{doc['packets_sent']} packets sent, {doc['packets_counted']} counted, "
        f"{len(mismatches)} devices disagree, {len(broken)} broken; RSS {rss[0]} -> {rss[-1]} KiB "
        f"(max {max(rss)}), fds {fds[0]} -> {fds[-1]} (max {max(fds)})")
    _write(out, doc, log)
    return doc


def _sent(tps: list[Any]) -> dict[int, int]:
    """Frames sent per device index (testpmd k's port p is device 32 * k + p)."""
    return {PORTS_PER_TESTPMD * k + port: p.tx_packets
            for k, tp in enumerate(tps) for port, p in tp.port_stats().ports.items()}


def _settled_tx(daemon: DaemonProcess, devices: int) -> dict[str, int]:
    """Every device's TX ring packet count, once none moves any more."""

    def read() -> dict[str, int]:
        stats = daemon.stats()
        return {d["name"]: int(d["queues"].get("1", {}).get("packets", 0))
                for d in stats["devices"]}

    last = read()
    for _ in range(100):
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    raise TimeoutError(f"the daemon's counters of {devices} devices still move 20 s after "
                       "testpmd stopped")
