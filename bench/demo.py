"""The main job (`vhostx demo`, scripts/demo.sh): what vhostx is for, live on screen.

Several net devices (default 4) are fed by one DPDK testpmd whose virtio-user ports send 64-byte
frames as fast as they can (txonly, forwarding on core 0). The same daemon serves them twice on
core 1, one phase after the other:

  1. shared    one worker thread, one I/O core, serves every device's queues and polls the busy
               ones (ELVIS): the driver stops kicking, the core stops sleeping and waking;
  2. baseline  a thread per device, each woken by its guest's kicks (the stock vhost model),
               all of them time-sharing the same core.

Every second the tables refresh: both phases side by side (client and daemon packet rates, kicks,
kicks avoided by polling, interrupts, the daemon's CPU, its threads and polling queues) and the
running phase's devices. The closing summary gives, per phase, the packets the client sent and
the packets the daemon counted on the devices' TX queues, which agree, and the ratio of the two
phases' rates. The daemon's totals are read while the client is still connected: a device's
queue counters live as long as its rings, and the rings go when the frontend hangs up.

The tables fit in 80 columns. Threads: the caller's (the main thread: testpmd and the daemon are
tied to the thread that starts them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vhostx.live import rates

from .process import DaemonFailed, DaemonProcess
from .testpmd import Testpmd, TestpmdError, VirtioUserVdev, find_testpmd

__all__ = [
    "MODES",
    "Phase",
    "PhaseResult",
    "Second",
    "comparison_table",
    "daemon_tx_packets",
    "devices_table",
    "register",
    "run_demo",
    "run_phase",
    "summary_lines",
]

INTERRUPTED = "not measured: stopped by Ctrl-C"
DAEMON_CPU = 1  # the one core every daemon thread runs on
CLIENT_CPU = 0  # testpmd's forwarding lcore


@dataclass(frozen=True)
class Phase:
    """One way of serving the same devices: a scheduling mode and the parameters it runs with."""

    mode: str
    title: str
    params: tuple[str, ...]


MODES = (
    Phase("shared", "shared: one worker thread serves every device",
          ("mode=shared", "workers=1", "max_workers=1")),
    Phase("baseline", "baseline: a thread per device", ("mode=baseline",)),
)


class Client(Protocol):
    """What a phase needs of its traffic source (testpmd here; a guest model in the tests)."""

    def start(self) -> None: ...
    def tx_packets(self) -> tuple[float, int]: ...  # (monotonic time, packets sent so far)
    def stop(self) -> None: ...  # stop sending, stay connected


@dataclass
class Second:
    """The figures of one interval (a second, or a whole phase)."""

    seconds: float = 0.0
    client_pps: float = 0.0
    daemon_pps: float = 0.0
    kicks_ps: float = 0.0
    avoided_ps: float = 0.0
    irq_ps: float = 0.0
    cpu: float | None = None  # cores the daemon used
    threads: int | None = None  # the daemon's workers
    polling: int = 0  # queues polling at the end of the interval


@dataclass
class PhaseResult:
    phase: Phase
    devices: int
    client_sent: int = 0
    daemon_counted: int = 0
    window: Second = field(default_factory=Second)  # the whole phase, averaged
    last: Second | None = None  # the latest second
    error: str | None = None


def _tx_rows(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> list[Any]:
    return [q for q in rates(prev, cur)[1] if ".tx" in q.name]


def daemon_tx_packets(stats: Mapping[str, Any]) -> int:
    """Packets the daemon counted on its devices' TX queues (guest -> daemon) in one snapshot."""
    return int(sum(q.totals.get("packets", 0) for q in _tx_rows(stats, stats)))


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, all its threads; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_busy(cpus: Sequence[int], seconds: float = 0.5) -> dict[int, float]:
    """{cpu: share of `seconds` it spent busy (not idle or waiting for I/O)}, from /proc/stat."""
    def read() -> dict[int, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                vals = [int(x) for x in fields[:8]]
                out[int(name[3:])] = (vals[3] + vals[4], sum(vals))
        return out

    before = read()
    time.sleep(seconds)
    after = read()
    return {c: 1.0 - (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1])
            for c in after if c in before}


def interval(prev: Mapping[str, Any], cur: Mapping[str, Any], client: tuple[float, int],
             client_prev: tuple[float, int], cpu: tuple[float | None, float | None]) -> Second:
    """The figures between two daemon snapshots, two client readings and two CPU readings."""
    workers, queues = rates(prev, cur)
    dt = max(1e-9, float(cur.get("time", 0)) - float(prev.get("time", 0)))
    tx = [q for q in queues if ".tx" in q.name]
    cdt = max(1e-9, client[0] - client_prev[0])
    c0, c1 = cpu
    return Second(
        seconds=dt,
        client_pps=(client[1] - client_prev[1]) / cdt,
        daemon_pps=sum(q.rates.get("packets", 0.0) for q in tx),
        kicks_ps=sum(q.rates.get("kicks", 0.0) for q in queues),
        avoided_ps=sum(q.rates.get("kicks_avoided", 0.0) for q in queues),
        irq_ps=sum(q.rates.get("interrupts", 0.0) for q in queues),
        cpu=None if c0 is None or c1 is None else (c1 - c0) / dt,
        threads=len(workers) or None,
        polling=sum(1 for q in queues if q.polling),
    )


def run_phase(daemon: DaemonProcess, client: Client, seconds: float, result: PhaseResult, *,
              tick: Callable[[PhaseResult, Mapping[str, Any], Mapping[str, Any]], None]
              = lambda r, p, c: None, period: float = 1.0) -> PhaseResult:
    """Drive one phase: start the client, refresh every `period` (calling `tick`), stop the
    client, and take the totals while it is still connected (its queues still exist)."""
    first = prev = daemon.stats()
    c_first = c_prev = client.tx_packets()
    cpu_first = cpu_prev = _cpu_seconds(daemon.pid)
    client.start()
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end:
            time.sleep(max(0.0, min(period, t_end - time.monotonic())))
            cur, c_cur, cpu_cur = daemon.stats(), client.tx_packets(), _cpu_seconds(daemon.pid)
            result.last = interval(prev, cur, c_cur, c_prev, (cpu_prev, cpu_cur))
            tick(result, prev, cur)
            prev, c_prev, cpu_prev = cur, c_cur, cpu_cur
    finally:
        client.stop()
    time.sleep(0.3)  # the last frames in flight reach the daemon
    final, c_final = daemon.stats(), client.tx_packets()
    result.window = interval(first, prev, c_prev, c_first, (cpu_first, cpu_prev))
    result.window.polling = result.last.polling if result.last else 0
    result.client_sent = c_final[1] - c_first[1]
    result.daemon_counted = daemon_tx_packets(final) - daemon_tx_packets(first)
    return result


# ---- rendering (80 columns) -------------------------------------------------------------------


def _mpps(x: float) -> str:
    return f"{x / 1e6:.3f}"


def _rate(x: float) -> str:
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def comparison_table(results: Sequence[PhaseResult], running: str | None) -> Any:
    """Rows of figures, one column per phase: the running one's last second, the others'
    whole-phase averages."""
    from rich.table import Table

    t = Table(title="one DPDK client, the same devices, the daemon on one core",
              title_justify="left")
    t.add_column("per second", no_wrap=True)
    cols: list[Second | None] = []
    for r in results:
        state = ("now" if r.phase.mode == running else "avg" if r.window.seconds else "next")
        if r.error:
            state = "stopped" if r.error == INTERRUPTED else "failed"
        t.add_column(f"{r.phase.mode} ({state})", justify="right", no_wrap=True)
        cols.append(r.last if r.phase.mode == running else r.window if r.window.seconds else None)

    def row(label: str, get: Callable[[Second], str]) -> None:
        t.add_row(label, *("-" if s is None else get(s) for s in cols))

    row("client sent, Mpps", lambda s: _mpps(s.client_pps))
    row("daemon received, Mpps", lambda s: _mpps(s.daemon_pps))
    row("kicks", lambda s: _rate(s.kicks_ps))
    row("kicks avoided (polling)", lambda s: _rate(s.avoided_ps))
    row("interrupts", lambda s: _rate(s.irq_ps))
    row("daemon CPU, cores", lambda s: "-" if s.cpu is None else f"{s.cpu:.2f}")
    row("daemon worker threads", lambda s: "-" if s.threads is None else str(s.threads))
    row("queues polling", lambda s: str(s.polling))
    return t


def devices_table(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> Any:
    """The running phase's devices: their worker, polling, received Mpps, kicks and interrupts."""
    from rich.table import Table

    t = Table(title="devices (this phase, last second)", title_justify="left")
    for col in ("device", "worker", "polling", "Mpps", "kicks/s", "avoided/s", "irq/s"):
        t.add_column(col, justify="left" if col == "device" else "right", no_wrap=True)
    per: dict[str, dict[str, Any]] = {}
    for q in rates(prev, cur)[1]:
        d = per.setdefault(q.device or q.name.split(".")[0],
                           {"workers": set(), "poll": 0, "pps": 0.0, "k": 0.0, "a": 0.0, "i": 0.0})
        d["workers"].add(q.worker or "-")
        d["poll"] += 1 if q.polling else 0
        if ".tx" in q.name:
            d["pps"] += q.rates.get("packets", 0.0)
        d["k"] += q.rates.get("kicks", 0.0)
        d["a"] += q.rates.get("kicks_avoided", 0.0)
        d["i"] += q.rates.get("interrupts", 0.0)
    for name, d in sorted(per.items()):
        t.add_row(name, ",".join(sorted(d["workers"])), f"{d['poll']} queues" if d["poll"] else "no",
                  _mpps(d["pps"]), _rate(d["k"]), _rate(d["a"]), _rate(d["i"]))
    if not per:
        t.add_row("(no queue running yet)", "", "", "", "", "", "")
    return t


def summary_lines(results: Sequence[PhaseResult]) -> list[str]:
    """The closing summary: per phase, what the client sent and the daemon counted."""
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.phase.mode}: {r.error}")
            continue
        share = (f" ({100.0 * r.daemon_counted / r.client_sent:.1f}%)" if r.client_sent else "")
        lines.append(f"{r.phase.mode}: the client sent {r.client_sent:,} packets over "
                     f"{r.devices} devices, the daemon received {r.daemon_counted:,}{share}; "
                     f"{_mpps(r.window.daemon_pps)} Mpps")
    done = {r.phase.mode: r for r in results if not r.error and r.window.daemon_pps > 0}
    if "shared" in done and "baseline" in done:
        ratio = done["shared"].window.daemon_pps / done["baseline"].window.daemon_pps
        lines.append(f"one shared I/O core moved {ratio:.2f}x the packets per second of a thread "
                     "per device on the same core")
    return lines


# ---- the real client and the job -------------------------------------------------------------


class TestpmdClient:
    """testpmd's virtio-user ports, txonly: `start` starts forwarding, `stop` stops it."""

    __test__ = False

    def __init__(self, peer: Testpmd) -> None:
        self.peer = peer

    def start(self) -> None:
        self.peer.start_forwarding()

    def tx_packets(self) -> tuple[float, int]:
        s = self.peer.port_stats()
        return s.t, sum(p.tx_packets for p in s.ports.values())

    def stop(self) -> None:
        self.peer.stop_forwarding()


def _layout(header: str, results: Sequence[PhaseResult], running: str | None,
            prev: Mapping[str, Any] | None, cur: Mapping[str, Any] | None) -> Any:
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = [Text(header), comparison_table(results, running)]
    if prev is not None and cur is not None:
        parts.append(devices_table(prev, cur))
    return Group(*parts)


def run_demo(seconds: float = 10.0, devices: int = 4, size: int = 64,
             console: Any = None) -> int:
    """Both phases, `seconds` each, with live tables; returns the exit code."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    if find_testpmd() is None:
        console.print("dpdk-testpmd is missing: run scripts/install.sh first", style="red")
        return 1
    if (os.cpu_count() or 1) < 2 or not {DAEMON_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
        console.print(f"the demo needs CPUs {CLIENT_CPU} and {DAEMON_CPU} (client and daemon)",
                      style="red")
        return 1
    results = [PhaseResult(p, devices) for p in MODES]
    busy = {c: b for c, b in cpu_busy((CLIENT_CPU, DAEMON_CPU)).items() if b > 0.15}
    with Live(_layout("starting...", results, None, None, None), console=console,
              refresh_per_second=4, auto_refresh=False) as live:
        try:
            for i, res in enumerate(results):
                phase = res.phase
                t_end = time.monotonic() + seconds

                def tick(r: PhaseResult, prev: Mapping[str, Any], cur: Mapping[str, Any],
                         i: int = i, t_end: float = t_end) -> None:
                    left = max(0.0, t_end - time.monotonic())
                    head = (f"phase {i + 1}/{len(results)}: {r.phase.title}, {devices} devices, "
                            f"{size} B frames; {left:.0f} s left (Ctrl-C stops)")
                    live.update(_layout(head, results, r.phase.mode, prev, cur), refresh=True)

                live.update(_layout(f"phase {i + 1}/{len(results)}: starting {phase.mode} and "
                                    f"testpmd ({devices} virtio-user ports)...",
                                    results, None, None, None), refresh=True)
                try:
                    _one_phase(res, seconds, size, tick)
                except (TestpmdError, DaemonFailed) as err:
                    res.error = "failed: " + str(err).splitlines()[0]
                live.update(_layout("done" if i == len(results) - 1 else "next phase...",
                                    results, None, None, None), refresh=True)
        except KeyboardInterrupt:  # the children got the SIGINT too: what ran is not measured
            for r in results:
                if not r.window.seconds and not r.error:
                    r.error = INTERRUPTED
    console.print()
    for line in summary_lines(results):
        console.print(line, highlight=False)
    if busy:
        cpus = ", ".join(f"CPU {c} {100 * b:.0f}%" for c, b in sorted(busy.items()))
        console.print(f"note: before the demo other work kept {cpus} busy; the phases shared "
                      "those cores with it (a single polling thread gets less of a busy core "
                      "than four), so these figures say little", style="yellow", highlight=False)
    if any(r.error == INTERRUPTED for r in results):
        return 130
    return 1 if any(r.error for r in results) else 0


def _one_phase(res: PhaseResult, seconds: float, size: int,
               tick: Callable[[PhaseResult, Mapping[str, Any], Mapping[str, Any]], None]) -> None:
    d = DaemonProcess(params=res.phase.params, cpus={DAEMON_CPU}, log_level="WARNING")
    socks = [d.add_device(f"net{k}", port="sink") for k in range(res.devices)]
    try:
        d.start()
        with Testpmd([VirtioUserVdev(s) for s in socks], forward_mode="txonly",
                     forward_lcores=(CLIENT_CPU,), main_lcore=DAEMON_CPU, txpkts=size,
                     memory_mb=512, name="demo", app_args=("--port-topology=loop",)) as peer:
            run_phase(d, TestpmdClient(peer), seconds, res, tick=tick)
    finally:
        d.cleanup()


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.seconds <= 0 or args.devices < 1 or not 60 <= args.size <= 1514:
        print("vhostx demo: expected --seconds > 0, --devices >= 1 and --size in [60, 1514]",
              file=sys.stderr)
        return 2
    return run_demo(seconds=args.seconds, devices=args.devices, size=args.size)


def register(subparsers: Any) -> None:
    """Add `demo` to vhostx's parser (entry point `vhostx.commands`: demo)."""
    d = subparsers.add_parser(
        "demo", help="shared I/O core vs a thread per device, one DPDK client, live tables",
        description="Serve N devices fed by DPDK testpmd's virtio-user twice, shared (one I/O "
        "core, polling) then baseline (a thread per device), with live tables.")
    d.add_argument("--seconds", type=float, default=10.0, help="traffic time per phase")
    d.add_argument("--devices", type=int, default=4, help="net devices (virtio-user ports)")
    d.add_argument("--size", type=int, default=64, help="frame size in bytes")
    d.set_defaults(func=_cmd_demo)
