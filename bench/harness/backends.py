"""Backends under test and testpmd clients, as context managers the runner stacks.

- vhostx: the daemon (`DaemonProcess`, through `vhostx_daemon`) with one net device per scenario
  device, pinned to the backend core, in the backend's mode with its parameters. Ports: `sink`
  (guest TX streams, idle), `source` (guest RX streams), `echo` (ping-pong). Counters come from
  the control socket's stats: the "queues" list (docs/internal-api.md, "Daemon statistics"),
  read by field name, so fields the daemon adds later are ignored.
- dpdk: DPDK's vhost PMD (`net_vhost`) in testpmd, forwarding on the backend core: `rxonly`
  (guest TX, idle), `txonly` (guest RX), `macswap` (ping-pong). Debian's DPDK is built with
  RTE_MAX_ETHPORTS = 32, so more than 32 devices take several testpmd processes (groups of 32)
  time-sharing the core.
- testpmd client: virtio-user ports, K per process (groups of 32), forwarding on the client core.
- `daemon_memory(pid)` / `guest_mapping_rss_kb(smaps)`: resident memory with and without the
  guest-memory mappings; `CLEAN_CLIENT_CPU`: the client share of a core below which a run was
  disturbed.

`pingpong_alongside` (a guest_tx stream with one more device for a guest-model ping-pong flow):
vhostx serves it as one more device `pp0` with an `echo` port in the same daemon (same mode,
workers and core); DPDK as one more net_vhost port of the same testpmd process. testpmd has one
forward mode per process, so that process forwards in `io` mode (rx burst, then tx back on the
same port): the ping-pong port echoes, and each stream port offers its frames back to the
client's RX ring, which a txonly client never drains, so after the first ring-full every burst
costs DPDK one enqueue attempt that finds no room (the frames are then freed, as `rxonly` frees
them). The backend's packet counters and notification counters exclude the ping-pong device.

Threads: the main thread (testpmd children are tied to the thread that starts them).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.process import DaemonProcess
from bench.testpmd import StatsSample, Testpmd, VhostVdev, VirtioUserVdev

from .scenario_model import Backend, Case, Placement, TestpmdClient

__all__ = [
    "ALONGSIDE_DEVICE",
    "CLEAN_CLIENT_CPU",
    "MAX_PORTS_PER_TESTPMD",
    "BackendFailed",
    "RunningBackend",
    "TestpmdGroup",
    "auto_mbufs",
    "daemon_memory",
    "guest_mapping_rss_kb",
    "notification_counters",
    "start_backend",
    "start_testpmd_client",
    "vhostx_daemon",
]

MAX_PORTS_PER_TESTPMD = 32  # RTE_MAX_ETHPORTS of Debian's DPDK 22.11 build
ALONGSIDE_DEVICE = "pp0"  # the vhostx device of a pingpong_alongside flow
# A run is "clean" when the busy-polling client had its core: other load on a 2-core machine
# shows first as a client that got less than a full core during the window.
CLEAN_CLIENT_CPU = 0.9


class BackendFailed(RuntimeError):
    """The backend could not start; `permanent` when every later run would fail the same way
    (the daemon refused its configuration)."""

    def __init__(self, msg: str, *, permanent: bool = False) -> None:
        super().__init__(msg)
        self.permanent = permanent


def auto_mbufs(ports: int, queues: int, queue_size: int = 0) -> int:
    """--total-num-mbufs for `ports` x `queues` ports on one lcore: enough to fill every RX and
    TX ring (`queue_size` entries each, 0: DPDK's 256) plus the lcore's mempool cache and a
    burst, never below the 16384 of reference/environment.md's commands.

    Not more: testpmd's mempool is a FIFO ring behind a 250-mbuf lcore cache, so a TX client
    whose rings drain quickly cycles through the *whole* pool. An earlier sizing of 1024 mbufs
    per port gave 32-port clients a 40960-mbuf pool (about 90 MB of 4 KiB pages with --no-huge):
    the client then ran at about half speed against whichever backend kept its rings empty
    (measured 2026-11-21, docs/bench-results/README.md)."""
    qs = queue_size or 256
    return max(16384, ports * queues * 2 * qs + 2048)


def _groups(n: int) -> list[range]:
    return [range(i, min(n, i + MAX_PORTS_PER_TESTPMD)) for i in range(0, n, MAX_PORTS_PER_TESTPMD)]


@dataclass
class TestpmdGroup:
    """Several testpmd processes acting as one: port k of the group is port k % 32 of process
    k // 32."""

    __test__ = False

    procs: list[Testpmd] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    @property
    def logs(self) -> list[str]:
        return [str(p.log_path) for p in self.procs]

    def port_stats(self) -> list[StatsSample]:
        return [p.port_stats() for p in self.procs]

    def start(self, busy: int | None = None) -> None:
        """Start forwarding; with `busy`, only ports < busy carry traffic (`set portlist`)."""
        for g, proc in enumerate(self.procs):
            base = g * MAX_PORTS_PER_TESTPMD
            nports = len(proc.vdevs)
            if busy is not None and busy < base + nports:
                mine = [k - base for k in range(base, min(busy, base + nports))]
                if not mine:
                    continue
                proc.set_portlist(mine)
            proc.start_forwarding()

    def stop(self) -> int:
        """Stop forwarding; returns the TX drops (ring full) reported by the forward stats."""
        drops = 0
        for proc in self.procs:
            if proc._forwarding:
                fwd = proc.stop_forwarding()
                drops += sum(p.tx_dropped for p in fwd.ports.values())
        return drops


def sample_rates(before: list[StatsSample], after: list[StatsSample]) -> tuple[float, list[dict[str, float]]]:
    """(window seconds, per-port rates in group order) between two group samples."""
    rates: list[dict[str, float]] = []
    windows = []
    for s0, s1 in zip(before, after, strict=True):
        windows.append(s1.t - s0.t)
        r = s1.rates_since(s0)
        rates += [r[k] for k in sorted(r)]
    return (sum(windows) / len(windows) if windows else 0.0), rates


def start_testpmd_client(stack: ExitStack, sockets: Sequence[str], case: Case,
                         client: TestpmdClient, placement: Placement, logs: Path) -> TestpmdGroup:
    mode = "txonly" if case.direction == "guest_tx" else "rxonly"
    group = TestpmdGroup()
    for gi, rng in enumerate(_groups(len(sockets))):
        vdevs = [VirtioUserVdev(sockets[k], queues=case.queues,
                                queue_size=client.queue_size or None, mrg_rxbuf=client.mrg_rxbuf,
                                in_order=client.in_order, packed_vq=client.packed_vq) for k in rng]
        q = case.queues if case.queues > 1 else None
        proc = Testpmd(
            vdevs, forward_mode=mode, forward_lcores=(placement.client_core,),
            main_lcore=placement.backend_core,
            txpkts=case.size if mode == "txonly" else None, burst=client.burst or None,
            rxq=q, txq=q, memory_mb=client.memory_mb, mbcache=client.mbcache or None,
            total_num_mbufs=client.total_num_mbufs or auto_mbufs(len(vdevs), case.queues,
                                                                 client.queue_size),
            log_dir=logs, name=f"client{gi}", start_timeout=120.0, socket_timeout=60.0,
            app_args=("--port-topology=loop",),  # each port's stream stays on its own device
        )
        group.procs.append(stack.enter_context(proc))
    return group


# ----------------------------------------------------------------------------------------------
# backends


def notification_counters(stats: dict[str, Any] | None) -> dict[str, int]:
    """Summed notification counters of the daemon stats' "queues" list: packets, kicks,
    kicks_avoided, interrupts, interrupts_suppressed, poll_switches (starts + stops), and of the
    queues served in the worker's C wait: wakes (arrivals that found the queue asleep) and caught
    (arrivals a busy-poll window found with kicks still off)."""
    out = {"packets": 0, "kicks": 0, "kicks_avoided": 0, "interrupts": 0,
           "interrupts_suppressed": 0, "poll_switches": 0, "wakes": 0, "caught": 0}
    for q in _queues(stats):
        for key in ("packets", "kicks", "kicks_avoided", "interrupts", "interrupts_suppressed",
                    "wakes", "caught"):
            out[key] += _int(q.get(key))
        out["poll_switches"] += _int(q.get("poll_starts")) + _int(q.get("poll_stops"))
    return out


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _queues(stats: dict[str, Any] | None) -> list[dict[str, Any]]:
    queues = (stats or {}).get("queues")
    return [q for q in queues if isinstance(q, dict)] if isinstance(queues, list) else []


def _direction_packets(stats: dict[str, Any], direction: str) -> int | None:
    """Packets of the guest's TX (guest_tx) or RX (guest_rx) queues; None without queues."""
    tag = ".tx" if direction == "guest_tx" else ".rx"
    found = [_int(q.get("packets")) for q in _queues(stats) if tag in str(q.get("name", ""))]
    return sum(found) if found else None


# ----------------------------------------------------------------------------------------------
# the vhostx daemon and memory


@contextmanager
def vhostx_daemon(devices: Sequence[tuple[str, str, dict[str, object]]], *,
                  params: Sequence[str] = (), cpus: set[int] | None = None,
                  workdir: str | None = None) -> Iterator[Any]:
    """A running vhostx daemon (DaemonProcess) with net devices given as (name, port, options);
    yields it with `.sockets` {name: path}. Stopped with SIGTERM on exit; its final statistics
    are then in `.final_stats`."""
    daemon = DaemonProcess(params=params, cpus=cpus, workdir=workdir, log_level="WARNING")
    sockets = {name: daemon.add_device(name, port, **opts) for name, port, opts in devices}
    daemon.sockets = sockets  # type: ignore[attr-defined]  # the harness's own note on it
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        if workdir is None:
            daemon.cleanup()


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


def daemon_memory(pid: int) -> tuple[int, int, int]:
    """(VmRSS kB, guest-mapping Rss kB, guest mappings) of a live process."""
    vm_rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            vm_rss = int(line.split()[1])
    guest, count = guest_mapping_rss_kb(Path(f"/proc/{pid}/smaps").read_text())
    return vm_rss, guest, count


class RunningBackend:
    """A started backend: its sockets, pids, logs and counters."""

    def __init__(self, spec: Backend) -> None:
        self.spec = spec
        self.sockets: list[str] = []
        self.pids: list[int] = []
        self.logs: list[str] = []
        self.daemon: Any = None  # DaemonProcess (vhostx)
        self.peers: TestpmdGroup | None = None  # DPDK
        self.alongside: str | None = None  # socket of the pingpong_alongside device
        self.alongside_device: str | None = None  # its daemon device name (vhostx)
        self.stream_ports: int | None = None  # DPDK: ports below this index carry the stream
        self.setup: dict[str, Any] = {}  # how the backend was set up for this case (recorded)

    def start_traffic(self) -> None:
        if self.peers is not None:
            self.peers.start()

    def stats(self) -> dict[str, Any] | None:
        """The daemon's live stats (vhostx), None for DPDK or when the control socket fails."""
        if self.daemon is None:
            return None
        try:
            return self.daemon.stats()
        except (OSError, ValueError, RuntimeError):
            return None

    def stream_stats(self, stats: dict[str, Any] | None) -> dict[str, Any] | None:
        """The daemon's stats without the alongside ping-pong device (its queues and its
        per-device entry), so that stream counters count the stream only."""
        name = self.alongside_device
        if stats is None or name is None:
            return stats
        out = dict(stats)
        out["queues"] = [q for q in _queues(stats) if q.get("device") != name]
        if isinstance(stats.get("devices"), list):
            out["devices"] = [d for d in stats["devices"]
                              if not isinstance(d, dict) or d.get("name") != name]
        return out

    def packets(self, direction: str, stats: dict[str, Any] | None = None) -> tuple[float, int] | None:
        """(monotonic time, packets the backend itself counted in `direction`), without the
        alongside ping-pong device."""
        t = time.monotonic()
        if self.peers is not None:
            samples = self.peers.port_stats()
            n = 0
            for g, s in enumerate(samples):
                for port, p in s.ports.items():
                    if (self.stream_ports is not None
                            and g * MAX_PORTS_PER_TESTPMD + port >= self.stream_ports):
                        continue
                    n += p.rx_packets if direction == "guest_tx" else p.tx_packets
            return t, n
        st = self.stream_stats(stats if stats is not None else self.stats())
        if st is None:
            return None
        n2 = _direction_packets(st, direction)
        return None if n2 is None else (t, n2)

    def memory(self) -> dict[str, Any]:
        """Resident memory of the backend's processes with and without the guest-memory
        mappings (memfd, /dev/shm, deleted files; for DPDK this also removes its own memfd-backed
        EAL memory, see docs/harness.md)."""
        vm = guest = maps = 0
        for pid in self.pids:
            try:
                a, b, c = daemon_memory(pid)
            except OSError:
                continue
            vm, guest, maps = vm + a, guest + b, maps + c
        return {"vm_rss_kb": vm, "guest_rss_kb": guest, "guest_mappings": maps,
                "rss_without_guest_mb": round((vm - guest) / 1024, 2)}


def _vhostx_port(case: Case) -> tuple[str, dict[str, object]]:
    if case.kind == "pingpong":
        return "echo", {}
    if case.kind == "stream" and case.direction == "guest_rx":
        return "source", {"frame_size": max(60, case.size)}
    return "sink", {}


def _dpdk_mode(case: Case) -> str:
    if case.kind == "pingpong":
        return "macswap"
    if case.pingpong_alongside:
        return "io"  # one forward mode per testpmd: the ping-pong port must echo
    if case.kind == "stream" and case.direction == "guest_rx":
        return "txonly"
    return "rxonly"


@contextmanager
def start_backend(spec: Backend, case: Case, placement: Placement, rundir: Path,
                  logs: Path) -> Iterator[RunningBackend]:
    """Start `spec` with `case.devices` devices; stopped (every process) on exit."""
    rb = RunningBackend(spec)
    with ExitStack() as stack:
        if spec.kind == "vhostx":
            from bench.process import DaemonFailed

            port, opts = _vhostx_port(case)
            if case.queues > 1:
                opts = {**opts, "queues": case.queues}
            devices = [(f"net{i}", port, opts) for i in range(case.devices)]
            if case.pingpong_alongside:
                devices.append((ALONGSIDE_DEVICE, "echo", {}))
            # registered first, so it runs last: after the daemon stopped and wrote its log
            stack.callback(_keep_log, rundir / "daemon.log", logs)
            try:
                daemon = stack.enter_context(vhostx_daemon(
                    devices, params=spec.param_args(), cpus={placement.backend_core},
                    workdir=str(rundir)))
            except DaemonFailed as err:
                text = str(err)
                permanent = "ConfigError" in text or "allowed" in text or "exited with 2" in text
                raise BackendFailed(f"vhostx ({spec.name}) did not start: {_tail(text)}",
                                    permanent=permanent) from err
            rb.daemon = daemon
            rb.sockets = [daemon.sockets[f"net{i}"] for i in range(case.devices)]
            rb.pids = [daemon.pid]
            rb.logs = [str(daemon.log_path)]
            rb.setup = {"port": port}
            if case.pingpong_alongside:
                rb.alongside = daemon.sockets[ALONGSIDE_DEVICE]
                rb.alongside_device = ALONGSIDE_DEVICE
                rb.setup["alongside"] = {"device": ALONGSIDE_DEVICE, "port": "echo"}
        elif spec.kind == "dpdk":
            mode = _dpdk_mode(case)
            total = case.devices + (1 if case.pingpong_alongside else 0)
            socks = [str(rundir / f"vh{i}.sock") for i in range(total)]
            rb.sockets = socks[:case.devices]
            rb.setup = {"forward_mode": mode}
            if case.pingpong_alongside:
                rb.alongside = socks[-1]
                rb.stream_ports = case.devices
                rb.setup["alongside"] = {"port": case.devices, "forward_mode": mode}
            group = TestpmdGroup()
            for gi, rng in enumerate(_groups(total)):
                q = case.queues if case.queues > 1 else None
                proc = Testpmd(
                    [VhostVdev(socks[k], queues=case.queues) for k in rng],
                    forward_mode=mode, forward_lcores=(placement.backend_core,),
                    main_lcore=placement.client_core,
                    txpkts=case.size if mode == "txonly" else None, burst=spec.burst or None,
                    rxq=q, txq=q, memory_mb=spec.memory_mb,
                    total_num_mbufs=spec.total_num_mbufs or auto_mbufs(len(rng), case.queues),
                    log_dir=logs, name=f"peer{gi}", start_timeout=120.0, socket_timeout=60.0,
                    # loop: port k answers on port k (paired would send device 0's echo to 1)
                    app_args=("--port-topology=loop",),
                )
                group.procs.append(stack.enter_context(proc))
            rb.peers = group
            rb.pids = group.pids
            rb.logs = group.logs
        else:
            raise BackendFailed(f"backend kind {spec.kind!r} is not runnable", permanent=True)
        yield rb


def _keep_log(path: Path, logs: Path) -> None:
    """Copy the daemon's log out of the run's socket directory before that is removed."""
    import shutil

    try:
        shutil.copyfile(path, logs / "daemon.log")
    except OSError:
        pass


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-800:]
