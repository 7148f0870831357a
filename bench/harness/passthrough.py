"""The `passthrough` scenario: one virtio-net-pci NIC in a TCG guest with an emulated VT-d
IOMMU, served over vhost-user by each backend (vhostx, DPDK's vhost PMD), driven two ways from
inside the guest: the kernel's virtio_net (paravirtual) and the project's user-space driver over
VFIO (passthrough: virtio.transport.pci + virtio.driver.net). Same traffic for both: guest TX,
guest RX, ping-pong.

Role: a scenario runner of its own (its TOML has ``kind = "passthrough"``; bench/cli.py hands
such files here), because one guest boot runs every phase of both paths:
- per backend: the backend serves two devices, ``guest`` (the guest's NIC) and ``peer``
  (a host-side peer: VhostUserFrontend + NetDriver in this process), and forwards between them
  (vhostx: two ``switch`` ports; DPDK: two net_vhost ports in ``io`` mode, paired);
- a backend's ``iommu_platform`` (the shipped file: true for both) puts the guest's NIC behind
  the vIOMMU (``iommu_platform=on,ats=on``; vhostx's device with ``iommu=true``, DPDK's vdev
  with ``iommu-support=1``): every ring and buffer address is then an IOVA the backend
  translates through its device IOTLB; false runs the NIC beside the vIOMMU (guest physical
  addresses);
- the guest runs bench/passthrough_job.py, which prints a start and end marker around every
  phase; the peer follows them: counts what the guest sends (tx), sends to the guest (rx, paced),
  echoes (pingpong);
- figures per backend, path and phase come from the guest (pps, RTT p50/p99, guest CPU per
  packet, kicks and interrupts per packet, IOMMU map operations), the peer (frames delivered to
  the host) and, for vhostx, the daemon's counters (kicks, interrupts per packet);
- ``results.json``, ``report.md`` and ``plots/*.png`` in the output directory.
Every figure is a TCG figure: the emulated guest is the bottleneck; read ratios within one run.
Threads: the main thread runs the guest and the phases; one peer thread per backend.
"""

from __future__ import annotations

import json
import platform
import subprocess
import threading
import time
import tomllib
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.pingpong import make_frame
from bench.harness.scenario_model import ScenarioError

__all__ = ["PassthroughScenario", "PeerThread", "is_passthrough", "load", "run"]

PATHS = ("paravirt", "passthrough")
PHASES = ("tx", "rx", "pingpong")
_KEYS = {"name", "description", "kind", "duration", "size", "queue_size", "boot_timeout",
         "backends", "label", "source_pps"}
_BACKEND_KEYS = {"name", "kind", "iommu_platform"}


@dataclass(frozen=True)
class PtBackend:
    name: str
    kind: str  # vhostx | dpdk
    iommu_platform: bool = False


@dataclass(frozen=True)
class PassthroughScenario:
    name: str
    description: str
    duration: float = 2.0
    size: int = 64
    queue_size: int = 256
    boot_timeout: float = 240.0
    source_pps: int = 100_000  # the peer's pace in the rx phase
    label: str = ""
    backends: tuple[PtBackend, ...] = field(default_factory=tuple)


def is_passthrough(path: Path) -> bool:
    try:
        return tomllib.loads(path.read_text()).get("kind") == "passthrough"
    except (OSError, tomllib.TOMLDecodeError):
        return False


def load(path: Path, *, duration: float | None = None,
         backends: list[str] | None = None) -> PassthroughScenario:
    """Parse and check a passthrough scenario file (ScenarioError names the bad key)."""
    raw = tomllib.loads(path.read_text())
    bad = set(raw) - _KEYS
    if bad:
        raise ScenarioError(f"{path}: unknown keys {sorted(bad)}; expected {sorted(_KEYS)}")
    bes = []
    for i, b in enumerate(raw.get("backends", [])):
        if set(b) - _BACKEND_KEYS or b.get("kind") not in ("vhostx", "dpdk"):
            raise ScenarioError(f"{path}: backends[{i}] = {b}: expected name, kind = 'vhostx' "
                                f"or 'dpdk', iommu_platform = true/false")
        bes.append(PtBackend(b.get("name", b["kind"]), b["kind"], bool(b.get("iommu_platform"))))
    if backends:
        bes = [b for b in bes if b.name in backends]
    if not bes:
        raise ScenarioError(f"{path}: no backends to run")
    dur = float(duration if duration is not None else raw.get("duration", 2.0))
    if not 0.2 <= dur <= 600:
        raise ScenarioError(f"{path}: duration = {dur}: expected 0.2-600 s")
    return PassthroughScenario(
        name=raw.get("name", path.stem), description=raw.get("description", ""), duration=dur,
        size=int(raw.get("size", 64)), queue_size=int(raw.get("queue_size", 256)),
        boot_timeout=float(raw.get("boot_timeout", 240.0)),
        source_pps=int(raw.get("source_pps", 100_000)), label=raw.get("label", ""),
        backends=tuple(bes))


class PeerThread:
    """The host-side peer on the backend's second device: counts, sends or echoes."""

    def __init__(self, net: Any, me: bytes, guest: bytes, size: int, source_pps: int) -> None:
        self.net, self.me, self.guest, self.size = net, me, guest, size
        self.source_pps = source_pps
        self.mode = "idle"
        self.received = 0
        self.sent = 0
        self.echoed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pt-peer", daemon=True)

    def start(self) -> PeerThread:
        self._thread.start()
        return self

    def set_mode(self, mode: str) -> tuple[int, int, int]:
        """Switch to ``mode``; returns the counters (received, sent, echoed) at the switch."""
        self.mode = mode
        return self.received, self.sent, self.echoed

    def _run(self) -> None:
        frames = [make_frame(self.size, 2, s, 0, dst=self.guest, src=self.me) for s in range(32)]
        next_at = time.monotonic()
        while not self._stop.is_set():
            mode = self.mode
            if mode == "rx":
                now = time.monotonic()
                if now < next_at:
                    time.sleep(min(next_at - now, 0.001))
                    continue
                self.sent += self.net.send(frames, timeout=0.0)
                next_at = max(next_at + len(frames) / self.source_pps, now - 0.01)
                self.net.recv(timeout=0.0)
                continue
            got = self.net.recv(timeout=0.02)
            self.received += len(got)
            if mode == "pingpong" and got:
                back = [f[6:12] + f[0:6] + f[12:] for f in got]
                self.echoed += self.net.send(back, timeout=0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _vhostx_counters(stats: dict[str, Any] | None) -> dict[str, int]:
    """Kicks and interrupts the daemon counted on the guest device's queues."""
    out = {"kicks": 0, "interrupts": 0}
    for q in (stats or {}).get("queues", []):
        if q.get("device") == "guest":
            out["kicks"] += int(q.get("kicks", 0))
    for dev in (stats or {}).get("devices", []):
        if dev.get("name") == "guest":
            for q in (dev.get("queues") or {}).values():
                out["interrupts"] += int(q.get("interrupts", 0))
    return out


def _run_backend(sc: PassthroughScenario, be: PtBackend, out: Path,
                 log: Any) -> dict[str, Any]:
    from bench.harness.backends import vhostx_daemon
    from bench.passthrough_guest import GUEST_MAC, PEER_MAC, passthrough_guest
    from bench.passthrough_job import mac_bytes
    from bench.testpmd import Testpmd, VhostVdev
    from virtio.driver.net import NetDriver
    from virtio.frontend import VhostUserFrontend

    rundir = out / "runs" / be.name
    rundir.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"backend": asdict(be), "phases": {}, "guest": {}}
    with ExitStack() as stack:
        daemon = None
        if be.kind == "vhostx":
            iommu: dict[str, object] = {"iommu": "true"} if be.iommu_platform else {}
            daemon = stack.enter_context(vhostx_daemon(
                [("guest", "switch", iommu), ("peer", "switch", {})], cpus={1},
                workdir=str(rundir)))
            guest_sock, peer_sock = daemon.sockets["guest"], daemon.sockets["peer"]
        else:
            guest_sock, peer_sock = str(rundir / "guest.sock"), str(rundir / "peer.sock")
            extra = ("iommu-support=1",) if be.iommu_platform else ()
            pmd = stack.enter_context(Testpmd(
                [VhostVdev(guest_sock, extra=extra), VhostVdev(peer_sock)], forward_mode="io",
                forward_lcores=(1,), main_lcore=0, memory_mb=1536, total_num_mbufs=16384,
                log_dir=rundir, name="dpdk", start_timeout=120.0, socket_timeout=60.0,
                app_args=("--port-topology=paired",)))
        fe = stack.enter_context(VhostUserFrontend(peer_sock, mem_size=16 << 20))
        peer = PeerThread(NetDriver(fe), mac_bytes(PEER_MAC), mac_bytes(GUEST_MAC), sc.size,
                          sc.source_pps)
        args = ["--duration", str(sc.duration), "--size", str(sc.size),
                "--queue-size", str(sc.queue_size)]
        guest = stack.enter_context(passthrough_guest(
            guest_sock, args, iommu_platform=be.iommu_platform, workdir=rundir, name="pt"))
        if be.kind == "dpdk":
            pmd.start_forwarding()
        peer.start()
        stack.callback(peer.stop)
        rec["boot_s"] = round(guest.wait_ready(sc.boot_timeout), 2)
        for path in PATHS:
            for phase in PHASES:
                name = f"pt.{path}.{phase}"
                guest.wait_for(f"VX-RESULT {name} start", sc.boot_timeout)
                s0 = _vhostx_counters(daemon.stats()) if daemon is not None else None
                c0 = peer.set_mode(phase)
                t0 = time.monotonic()
                guest.wait_for(f"VX-RESULT {name} end", sc.duration * 4 + 60)
                c1 = peer.set_mode("idle")
                dt = time.monotonic() - t0
                s1 = _vhostx_counters(daemon.stats()) if daemon is not None else None
                ph: dict[str, Any] = {"peer_received_pps": round((c1[0] - c0[0]) / dt, 1),
                                      "peer_sent_pps": round((c1[1] - c0[1]) / dt, 1)}
                if s0 is not None and s1 is not None and all(s1[k] >= s0[k] for k in s0):
                    # (a device reset in the window restarts the daemon's queue counters)
                    ph["backend_kicks"] = s1["kicks"] - s0["kicks"]
                    ph["backend_interrupts"] = s1["interrupts"] - s0["interrupts"]
                rec["phases"][f"{path}.{phase}"] = ph
                log(f"{be.name}: {path} {phase} done")
        guest.wait_for("VX-RESULT pt.done", sc.boot_timeout)
        guest.wait_done(timeout=60, check=False)
        res = guest.results
        for key, value in res.items():
            parts = key.split(".")
            if len(parts) == 4 and parts[0] == "pt" and f"{parts[1]}.{parts[2]}" in rec["phases"]:
                rec["phases"][f"{parts[1]}.{parts[2]}"][parts[3]] = _num(value)
            elif key.startswith("pt.passthrough.") and len(parts) == 3:
                rec["guest"][parts[2]] = value
        for ph in rec["phases"].values():
            pk = ph.get("packets")
            if isinstance(pk, (int, float)) and pk and "backend_kicks" in ph:
                ph["backend_kicks_per_pkt"] = round(ph["backend_kicks"] / pk, 4)
                ph["backend_irqs_per_pkt"] = round(ph["backend_interrupts"] / pk, 4)
        rec["console_log"] = str(guest.log_path)
    return rec


def _num(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def run(sc: PassthroughScenario, out: Path, *, plots: bool = True,
        log: Any = print) -> dict[str, Any]:
    """Run every backend of ``sc``; write results.json, report.md and plots into ``out``."""
    from bench.harness.passthrough_report import render_report, write_plots

    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "scenario": asdict(sc), "commit": _commit(), "host": platform.node(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "accel": "tcg", "label": sc.label, "backends": [],
    }
    for be in sc.backends:
        log(f"backend {be.name}: starting (iommu_platform={be.iommu_platform})")
        try:
            doc["backends"].append(_run_backend(sc, be, out, log))
        except Exception as err:  # noqa: BLE001 - one backend failing does not hide the others
            doc["backends"].append({"backend": asdict(be), "error": f"{type(err).__name__}: "
                                    f"{err}"[-2000:]})
            log(f"backend {be.name}: FAILED {err}")
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    if plots:
        doc["plots"] = write_plots(doc, out / "plots")
    (out / "report.md").write_text(render_report(doc))
    return doc
