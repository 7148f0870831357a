"""Data-path benchmark: testpmd virtio-user against vhostx and against DPDK's vhost PMD, same run.

Role: for each scenario (guest TX 64 B and 1500 B into a sink, guest RX 64 B from a source), run
A/B pairs interleaved (A, B, A, B, ...), each run with one forwarding core per side: the
virtio-user client forwards on core 0, the backend (vhostx daemon pinned with its affinity, or the
DPDK vhost testpmd forwarding on lcore 1) on core 1. A run measures the client's port counters
over a window after a warm-up. It prints each run's pps, the median A/B ratio and its spread, and
writes everything, with the run's dimensions (commit, sizes, directions, durations, DPDK version,
kernel, load), as JSON into a results directory (default: a fresh temp dir, never the repo).

Also a daemon memory check: 8 sink devices, 8 virtio-user ports in one testpmd, the daemon's RSS
without its guest-memory mappings (target < 80 MB).

    python -m bench.dpdk_compare                       # vhostx vs dpdk, all scenarios + memory
    python -m bench.dpdk_compare --a dpdk --b dpdk     # DPDK vs DPDK (sanity: ratio ~1)

Threads: everything runs on the main thread (Testpmd's death signal is tied to it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.testpmd import (
    StatsSample,
    Testpmd,
    TestpmdError,
    VhostVdev,
    VirtioUserVdev,
    dpdk_version,
    find_testpmd,
)

__all__ = [
    "BACKENDS",
    "SCENARIOS",
    "MemoryReport",
    "RunResult",
    "Scenario",
    "ScenarioSummary",
    "cpu_seconds",
    "daemon_memory",
    "guest_mapping_rss_kb",
    "idle_cores",
    "main",
    "memory_check",
    "run_once",
    "summarize",
    "vhostx_available",
    "wait_quiet",
]

BACKENDS = ("vhostx", "dpdk")
CLIENT_CORE = 0
BACKEND_CORE = 1
MEMORY_TARGET_MB = 80.0
# A run is "clean" when the busy-polling client had its core: other load on a 2-core machine
# shows first as a client that got less than a full core during the window.
CLEAN_CLIENT_CPU = 0.9


@dataclass(frozen=True)
class Scenario:
    name: str
    direction: str  # "guest_tx" (client sends, backend sinks) or "guest_rx"
    size: int  # frame bytes as testpmd counts them (no CRC)

    @property
    def client_mode(self) -> str:
        return "txonly" if self.direction == "guest_tx" else "rxonly"

    @property
    def peer_mode(self) -> str:
        return "rxonly" if self.direction == "guest_tx" else "txonly"

    @property
    def vhostx_port(self) -> str:
        return "sink" if self.direction == "guest_tx" else "source"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("guest_tx_64", "guest_tx", 64),
        Scenario("guest_tx_1500", "guest_tx", 1500),
        Scenario("guest_rx_64", "guest_rx", 64),
    )
}


@dataclass
class RunResult:
    """One measured run of one backend in one scenario."""

    backend: str
    label: str  # "A" or "B"
    scenario: str
    rep: int
    pps: float  # the client's rate in the scenario's direction
    bps: float  # bits/s of frame bytes, same direction
    backend_pps: float | None  # the backend's own count of the same traffic, if it has one
    window_s: float
    client_tx_drops: int  # packets txonly could not enqueue (ring full) during the whole run
    client_cpu: float | None  # cores the client process used during the window (ideal: 1.0)
    backend_cpu: float | None  # cores the backend process used (DPDK polls: 1.0; vhostx may sleep)
    loadavg_before: tuple[float, float, float]
    started_at: float
    idle_before: float | None = None  # idle cores measured just before the run
    error: str | None = None
    clean: bool = False  # client_cpu >= CLEAN_CLIENT_CPU
    client_log: str = ""
    backend_log: str = ""


@dataclass
class ScenarioSummary:
    scenario: str
    a: str
    b: str
    a_pps: list[float]
    b_pps: list[float]
    ratios: list[float]  # per pair A_i / B_i
    median_a: float
    median_b: float
    median_ratio: float
    ratio_min: float
    ratio_max: float
    ratio_spread_pct: float  # (max - min) / median * 100
    clean_ratios: list[float]  # pairs where both runs were clean
    clean_median_ratio: float


# ----------------------------------------------------------------------------------------------
# dimensions


def _git_commit(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def dimensions(args: argparse.Namespace) -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    return {
        "commit": _git_commit(repo),
        "dpdk_version": dpdk_version(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "hostname": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "a": args.a,
        "b": args.b,
        "repeats": args.repeats,
        "warmup_s": args.warmup,
        "quiet_wait_s": args.quiet_wait,
        "quiet_cores": args.quiet_cores,
        "duration_s": args.duration,
        "scenarios": {n: asdict(SCENARIOS[n]) for n in args.scenarios},
        "placement": {"client_forward_core": CLIENT_CORE, "backend_core": BACKEND_CORE},
        "client": {"queue_size": args.queue_size, "mrg_rxbuf": args.mrg_rxbuf,
                   "in_order": args.in_order, "packed_vq": args.packed_vq,
                   "burst": args.burst, "memory_mb": args.memory_mb},
        "vhostx_params": args.param,
    }


# ----------------------------------------------------------------------------------------------
# backends


def vhostx_available() -> tuple[bool, str]:
    """Whether `python -m vhostx serve` exists and its data path imports; reason if not."""
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run([sys.executable, "-m", "vhostx", "serve", "--help"], cwd=repo,
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"cannot run python -m vhostx: {exc}"
    if out.returncode != 0:
        return False, f"python -m vhostx serve --help failed: {out.stderr.strip()[-300:]}"
    probe = subprocess.run([sys.executable, "-c", "import vhostx.daemon, virtio.ring, virtio.net"],
                           cwd=repo, capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        return False, f"daemon data path does not import: {probe.stderr.strip()[-300:]}"
    return True, ""


@contextmanager
def vhostx_daemon(devices: Sequence[tuple[str, str, dict[str, object]]], *,
                  params: Sequence[str] = (), cpus: set[int] | None = None,
                  workdir: str | None = None) -> Iterator[Any]:
    """A running vhostx daemon (vhostx.process.DaemonProcess) with net devices given as
    (name, port, options); yields it with `.sockets` {name: path}. Stopped with SIGTERM on exit;
    its final statistics are then in `.final_stats`."""
    from bench.process import DaemonProcess  # imported late: the daemon may not exist yet

    daemon = DaemonProcess(params=params, cpus=cpus, workdir=workdir, log_level="WARNING")
    sockets = {name: daemon.add_device(name, port, **opts) for name, port, opts in devices}
    daemon.sockets = sockets  # type: ignore[attr-defined]
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        if workdir is None:
            daemon.cleanup()


def _daemon_queue_packets(stats: dict[str, Any], direction: str) -> int | None:
    """Packets the daemon counted on the device's TX (guest_tx) or RX (guest_rx) queues."""
    total = 0
    found = False
    for dev in stats.get("devices", []):
        for idx, q in (dev.get("queues") or {}).items():
            if int(idx) % 2 == (1 if direction == "guest_tx" else 0) and "packets" in q:
                total += int(q["packets"])
                found = True
    return total if found else None


def _client(sock: str, sc: Scenario, args: argparse.Namespace, logs: Path) -> Testpmd:
    return Testpmd(
        [VirtioUserVdev(sock, queue_size=args.queue_size, mrg_rxbuf=args.mrg_rxbuf,
                        in_order=args.in_order, packed_vq=args.packed_vq)],
        forward_mode=sc.client_mode, forward_lcores=(CLIENT_CORE,), main_lcore=BACKEND_CORE,
        txpkts=sc.size if sc.client_mode == "txonly" else None, burst=args.burst,
        memory_mb=args.memory_mb, log_dir=logs, name="client",
    )


def idle_cores(sample_s: float = 1.0) -> float:
    """Idle cores (idle + iowait) over `sample_s`, from /proc/stat."""
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])

    i0, t0 = read()
    time.sleep(sample_s)
    i1, t1 = read()
    cpus = os.cpu_count() or 1
    return cpus * (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, need_idle: float) -> float:
    """Wait up to `max_wait` s until at least `need_idle` cores are idle; returns the last idle
    figure (the run goes ahead anyway: its CPU shares tell whether it was disturbed)."""
    deadline = time.monotonic() + max_wait
    idle = idle_cores()
    while idle < need_idle and time.monotonic() < deadline:
        idle = idle_cores()
    return idle


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (all its threads), None if unreadable."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(client: Testpmd, sc: Scenario, warmup: float, duration: float,
             backend_count: Any, backend_pid: int | None, result: RunResult) -> None:
    """Fill result's pps, bps, window, backend_pps and CPU shares over `duration` after `warmup`."""
    time.sleep(warmup)
    c0, k0 = cpu_seconds(client.pid), cpu_seconds(backend_pid)
    s0: StatsSample = client.port_stats()
    b0 = backend_count()
    time.sleep(duration)
    s1: StatsSample = client.port_stats()
    b1 = backend_count()
    c1, k1 = cpu_seconds(client.pid), cpu_seconds(backend_pid)
    rates = s1.rates_since(s0)[0]
    key = "tx" if sc.direction == "guest_tx" else "rx"
    result.window_s = s1.t - s0.t
    result.pps, result.bps = rates[f"{key}_pps"], rates[f"{key}_bps"]
    if b0 is not None and b1 is not None:
        result.backend_pps = (b1[1] - b0[1]) / (b1[0] - b0[0])
    if c0 is not None and c1 is not None:
        result.client_cpu = (c1 - c0) / result.window_s
        result.clean = result.client_cpu >= CLEAN_CLIENT_CPU
    if k0 is not None and k1 is not None:
        result.backend_cpu = (k1 - k0) / result.window_s


def run_once(backend: str, label: str, sc: Scenario, rep: int, args: argparse.Namespace,
             workdir: Path) -> RunResult:
    """One run: start the backend on core 1, the client on core 0, measure, stop both."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix=f"{backend}-{sc.name}-{rep}-", dir=workdir / "sockets"))
    sock = str(rundir / "net0.sock")
    result = RunResult(backend, label, sc.name, rep, 0.0, 0.0, None, 0.0, 0, None, None,
                       os.getloadavg(), time.time())
    client: Testpmd | None = None
    with ExitStack() as stack:
        try:
            if backend == "dpdk":
                peer = stack.enter_context(Testpmd(
                    [VhostVdev(sock)], forward_mode=sc.peer_mode, forward_lcores=(BACKEND_CORE,),
                    main_lcore=CLIENT_CORE, txpkts=sc.size if sc.peer_mode == "txonly" else None,
                    burst=args.burst, memory_mb=args.memory_mb, log_dir=logs, name="peer"))
                result.backend_log = str(peer.log_path)

                def backend_count() -> tuple[float, int] | None:
                    s = peer.port_stats()
                    p = s.ports[0]
                    return s.t, (p.rx_packets if sc.direction == "guest_tx" else p.tx_packets)

                def start_backend() -> None:
                    peer.start_forwarding()

                backend_pid = peer.pid
            elif backend == "vhostx":
                opts: dict[str, object] = {}
                if sc.vhostx_port == "source":
                    opts["frame_size"] = max(60, sc.size)
                daemon = stack.enter_context(vhostx_daemon(
                    [("net0", sc.vhostx_port, opts)], params=args.param, cpus={BACKEND_CORE},
                    workdir=str(rundir)))
                sock = daemon.sockets["net0"]
                result.backend_log = str(daemon.log_path)

                def backend_count() -> tuple[float, int] | None:
                    try:
                        t = time.monotonic()
                        n = _daemon_queue_packets(daemon.stats(), sc.direction)
                    except (OSError, ValueError):
                        return None
                    return None if n is None else (t, n)

                def start_backend() -> None:  # the daemon serves as soon as rings start
                    return None

                backend_pid = daemon.pid
            else:
                raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")

            client = stack.enter_context(_client(sock, sc, args, logs))
            result.client_log = str(client.log_path)
            if sc.direction == "guest_tx":  # receiver first, then the sender
                start_backend()
                client.start_forwarding()
            else:
                client.start_forwarding()
                start_backend()
            _measure(client, sc, args.warmup, args.duration, backend_count, backend_pid, result)
            fwd = client.stop_forwarding()
            result.client_tx_drops = sum(p.tx_dropped for p in fwd.ports.values())
        except (TestpmdError, OSError, RuntimeError, TimeoutError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
    return result


# ----------------------------------------------------------------------------------------------
# summary and report


def summarize(results: Sequence[RunResult], scenario: str, a: str, b: str) -> ScenarioSummary:
    """Median A/B ratio over pairs (rep i of A with rep i of B); failed runs leave their pair out."""
    ok = [r for r in results if r.scenario == scenario and r.error is None and r.pps > 0]
    a_by = {r.rep: r.pps for r in ok if r.label == "A"}
    b_by = {r.rep: r.pps for r in ok if r.label == "B"}
    clean = {(r.label, r.rep) for r in ok if r.clean}
    reps = sorted(set(a_by) & set(b_by))
    ratios = [a_by[i] / b_by[i] for i in reps]
    clean_ratios = [a_by[i] / b_by[i] for i in reps if ("A", i) in clean and ("B", i) in clean]
    med = statistics.median(ratios) if ratios else float("nan")
    lo = min(ratios) if ratios else float("nan")
    hi = max(ratios) if ratios else float("nan")
    return ScenarioSummary(
        scenario, a, b, [a_by[i] for i in sorted(a_by)], [b_by[i] for i in sorted(b_by)], ratios,
        statistics.median(a_by.values()) if a_by else float("nan"),
        statistics.median(b_by.values()) if b_by else float("nan"),
        med, lo, hi, (hi - lo) / med * 100 if ratios and med > 0 else float("nan"),
        clean_ratios, statistics.median(clean_ratios) if clean_ratios else float("nan"),
    )


def _mpps(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x / 1e6:.3f}"


def _cpu(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(results: Sequence[RunResult], summaries: Sequence[ScenarioSummary]) -> str:
    lines = [(f"{'scenario':<15} {'rep':>3} {'backend':<10} {'Mpps':>8} {'Gbit/s':>7} "
              f"{'backend Mpps':>12} {'cpu c/b':>9} {'load1':>5}  note")]
    for r in results:
        label = f"{r.label}:{r.backend}"
        note = r.error.splitlines()[0][:60] if r.error else ""
        lines.append(f"{r.scenario:<15} {r.rep:>3} {label:<10} {_mpps(r.pps):>8} "
                     f"{r.bps / 1e9:>7.2f} {_mpps(r.backend_pps):>12} "
                     f"{_cpu(r.client_cpu):>4}/{_cpu(r.backend_cpu):<4} "
                     f"{r.loadavg_before[0]:>5.2f}  {note}")
    lines.append("")
    lines.append(f"{'scenario':<15} {'A':<7} {'B':<7} {'median A Mpps':>13} {'median B Mpps':>13} "
                 f"{'A/B median':>10} {'min':>6} {'max':>6} {'spread':>7} pairs  clean pairs: median")
    for s in summaries:
        lines.append(f"{s.scenario:<15} {s.a:<7} {s.b:<7} {_mpps(s.median_a):>13} "
                     f"{_mpps(s.median_b):>13} {s.median_ratio:>10.3f} {s.ratio_min:>6.3f} "
                     f"{s.ratio_max:>6.3f} {s.ratio_spread_pct:>6.1f}% {len(s.ratios):>5}  "
                     f"{len(s.clean_ratios):>11}: {s.clean_median_ratio:.3f}")
    lines.append(f"(a run is clean when the client process got >= {CLEAN_CLIENT_CPU} of a core "
                 "during its window: cpu c/b = client/backend cores used)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# memory check

_SMAPS_HDR = re.compile(r"^[0-9a-f]+-[0-9a-f]+\s+\S+\s+[0-9a-f]+\s+\S+\s+\d+\s*(.*)$")


def _is_guest_mapping(path: str) -> bool:
    return "memfd:" in path or path.startswith("/dev/shm") or path.endswith("(deleted)")


def guest_mapping_rss_kb(smaps_text: str) -> tuple[int, int]:
    """(Rss kB, number of mappings) of guest-memory mappings (memfd, /dev/shm, deleted files) in
    the text of /proc/PID/smaps."""
    total = 0
    count = 0
    current_guest = False
    for line in smaps_text.splitlines():
        m = _SMAPS_HDR.match(line)
        if m:
            current_guest = _is_guest_mapping(m.group(1).strip())
            count += current_guest
            continue
        if current_guest and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total, count


@dataclass
class MemoryReport:
    devices: int
    vm_rss_kb: int
    guest_rss_kb: int
    guest_mappings: int
    daemon_rss_mb: float  # VmRSS minus guest mappings
    target_mb: float
    within_target: bool
    ports_with_traffic: int
    idle_rss_mb: float = 0.0  # VmRSS with the 8 devices listening, before any client connected
    error: str | None = None


def daemon_memory(pid: int) -> tuple[int, int, int]:
    """(VmRSS kB, guest-mapping Rss kB, guest mappings) of a live process."""
    vm_rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            vm_rss = int(line.split()[1])
    guest, count = guest_mapping_rss_kb(Path(f"/proc/{pid}/smaps").read_text())
    return vm_rss, guest, count


def memory_check(args: argparse.Namespace, workdir: Path, devices: int = 8) -> MemoryReport:
    """8 sink devices in one daemon, 8 virtio-user ports in one testpmd sending 64 B frames."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rundir = tempfile.mkdtemp(prefix="memory-", dir=workdir / "sockets")
    report = MemoryReport(devices, 0, 0, 0, 0.0, MEMORY_TARGET_MB, False, 0)
    try:
        with vhostx_daemon([(f"net{i}", "sink", {}) for i in range(devices)], params=args.param,
                           cpus={BACKEND_CORE}, workdir=rundir) as daemon:
            report.idle_rss_mb = daemon_memory(daemon.pid)[0] / 1024
            vdevs = [VirtioUserVdev(daemon.sockets[f"net{i}"]) for i in range(devices)]
            with Testpmd(vdevs, forward_mode="txonly", forward_lcores=(CLIENT_CORE,),
                         main_lcore=BACKEND_CORE, txpkts=64, memory_mb=args.memory_mb,
                         total_num_mbufs=32768, log_dir=logs, name="client8") as client:
                client.start_forwarding()
                time.sleep(max(2.0, args.warmup))
                s0 = client.port_stats()
                time.sleep(1.0)
                s1 = client.port_stats()
                report.ports_with_traffic = sum(
                    1 for r in s1.rates_since(s0).values() if r["tx_pps"] > 0)
                vm, guest, count = daemon_memory(daemon.pid)
                client.stop_forwarding()
        report.vm_rss_kb, report.guest_rss_kb, report.guest_mappings = vm, guest, count
        report.daemon_rss_mb = (vm - guest) / 1024
        report.within_target = report.daemon_rss_mb < MEMORY_TARGET_MB
    except Exception as exc:  # noqa: BLE001 - the report carries any failure
        report.error = f"{type(exc).__name__}: {exc}"
    return report


# ----------------------------------------------------------------------------------------------
# entry point


def _tristate(text: str) -> bool | None:
    if text == "default":
        return None
    if text in ("0", "1"):
        return text == "1"
    raise argparse.ArgumentTypeError(f"{text!r}: expected 0, 1 or default")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.dpdk_compare", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", help="results directory (default: a new temp dir)")
    p.add_argument("--a", default="vhostx", choices=BACKENDS, help="backend A (default vhostx)")
    p.add_argument("--b", default="dpdk", choices=BACKENDS, help="backend B (default dpdk)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   type=lambda s: [x for x in s.split(",") if x],
                   help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    p.add_argument("--repeats", type=int, default=3, help="A/B pairs per scenario")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the window")
    p.add_argument("--duration", type=float, default=5.0, help="measurement window, seconds")
    p.add_argument("--burst", type=int, default=None, help="testpmd --burst (default 32)")
    p.add_argument("--queue-size", type=int, default=None, help="virtio-user queue_size")
    p.add_argument("--mrg-rxbuf", type=_tristate, default=None, help="0, 1 or default")
    p.add_argument("--in-order", type=_tristate, default=None, help="0, 1 or default")
    p.add_argument("--packed-vq", type=_tristate, default=None, help="0, 1 or default")
    p.add_argument("--memory-mb", type=int, default=1024, help="testpmd -m")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each run, wait up to this many seconds for idle cores (0: off)")
    p.add_argument("--quiet-cores", type=float, default=1.5,
                   help="idle cores wanted before a run (default 1.5 of a 2-core machine)")
    p.add_argument("--param", action="append", default=[], help="vhostx --param name=value")
    p.add_argument("--memory", dest="memory", action="store_true", default=None,
                   help="run the 8-device memory check (default: when vhostx is A or B)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-throughput", action="store_true", help="only the memory check")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if find_testpmd() is None:
        print("dpdk-testpmd not found: install the Debian package dpdk-dev", file=sys.stderr)
        return 2
    uses_vhostx = "vhostx" in (args.a, args.b)
    if uses_vhostx:
        ok, why = vhostx_available()
        if not ok:
            print(f"vhostx daemon unavailable: {why}\n(use --a dpdk --b dpdk for DPDK vs DPDK)",
                  file=sys.stderr)
            return 2
    memory = uses_vhostx if args.memory is None else args.memory
    workdir = Path(args.results or tempfile.mkdtemp(prefix="vhostx-dpdk-compare-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sockets").mkdir(exist_ok=True)

    dims = dimensions(args)
    results: list[RunResult] = []
    summaries: list[ScenarioSummary] = []
    if not args.no_throughput:
        for name in args.scenarios:
            sc = SCENARIOS[name]
            for rep in range(args.repeats):
                for label, backend in (("A", args.a), ("B", args.b)):
                    idle = wait_quiet(args.quiet_wait, args.quiet_cores) if args.quiet_wait else None
                    r = run_once(backend, label, sc, rep, args, workdir)
                    r.idle_before = idle
                    results.append(r)
                    print(f"{sc.name:<15} rep {rep} {label}:{backend:<7} "
                          + (f"{_mpps(r.pps)} Mpps" if r.error is None else f"FAILED {r.error[:200]}"),
                          file=sys.stderr, flush=True)
            summaries.append(summarize(results, name, args.a, args.b))
    mem: MemoryReport | None = None
    if memory:
        mem = memory_check(args, workdir)

    print(f"commit {dims['commit']}  DPDK {dims['dpdk_version']}  kernel {dims['kernel']}  "
          f"cpus {dims['cpus']}  warmup {args.warmup}s window {args.duration}s")
    if results:
        print(format_table(results, summaries))
    if mem is not None:
        if mem.error:
            print(f"\nmemory check: FAILED {mem.error}")
        else:
            print(f"\nmemory check: {mem.devices} devices, daemon RSS without guest memory "
                  f"{mem.daemon_rss_mb:.1f} MB (idle {mem.idle_rss_mb:.1f} MB; VmRSS "
                  f"{mem.vm_rss_kb / 1024:.1f} MB, guest "
                  f"mappings {mem.guest_mappings} / {mem.guest_rss_kb / 1024:.1f} MB), target "
                  f"< {mem.target_mb:.0f} MB: {'ok' if mem.within_target else 'OVER'}; "
                  f"{mem.ports_with_traffic}/{mem.devices} ports carried traffic")
    out = workdir / f"dpdk_compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "dimensions": dims,
        "runs": [asdict(r) for r in results],
        "summary": [asdict(s) for s in summaries],
        "memory": asdict(mem) if mem is not None else None,
    }, indent=1))
    print(f"\nresults: {out}")
    failed = any(r.error for r in results) or (mem is not None and mem.error is not None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
