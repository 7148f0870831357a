"""The in-guest half of the passthrough comparison: one NIC, two drivers, the same traffic.

Runs inside the passthrough guest (bench/passthrough_guest.py) as root, chrooted into the host's
root: ``python -m bench.passthrough_job --mac M --peer-mac P [...]``. It finds the virtio-net-pci
function with MAC ``M`` and drives the same traffic over it two ways:
- ``paravirt``: the guest kernel's virtio_net, through an AF_PACKET socket on its interface;
- ``passthrough``: the function bound to vfio-pci and driven from user space by
  virtio.transport.pci.VirtioPciTransport + virtio.driver.net.NetDriver (the project's driver).
Phases per path: ``tx`` (the guest sends for ``--duration`` s), ``rx`` (the host's peer sends,
the guest counts), ``pingpong`` (one frame out, the peer's echo back, RTT). Around every phase it
prints ``VX-RESULT pt.<path>.<phase> start|end`` so the host can switch its peer, and the
figures as ``VX-RESULT pt.<path>.<phase>.<figure> <value>``: pps, packets, cpu_us_per_pkt
(guest CPU busy time from /proc/stat per packet), kicks_per_pkt, irqs_per_pkt, rtt_p50_us,
rtt_p99_us, map_ops (IOMMU MAP_DMA ioctls of the user-space driver).
``--check N`` (tests): passthrough only; sends ``check_frame(0..N-1)``, then echoes the first N
frames the host sends back to it with the MACs swapped (the host checks both byte for byte),
waiting at most ``--check-wait`` s (60) for them; any other frame is counted in
``pt.check.rx_stray`` (the first eight described in ``pt.check.rx_stray_samples``: length,
header, ``txK`` when it is a copy of the job's own frame K).
Threads: the main thread only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from bench.harness.pingpong import make_frame, parse_frame

__all__ = ["ETH_P_VX", "check_frame", "find_nic", "main"]

ETH_P_VX = 0x88B5
PCI = Path("/sys/bus/pci/devices")


def result(name: str, value: object) -> None:
    print(f"VX-RESULT {name} {value}", flush=True)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def check_frame(k: int, dst: bytes, src: bytes, size: int = 0) -> bytes:
    """Frame k of the byte-for-byte check: a size from 60 to 1514 and a payload both sides
    derive from k."""
    size = size or 60 + (k * 97) % 1455
    body = b"".join(hashlib.sha256(f"{k}:{i}".encode()).digest() for i in range(size // 32 + 1))
    return (dst + src + ETH_P_VX.to_bytes(2, "big") + body)[:size]


def find_nic(mac: str) -> tuple[str, str | None]:
    """(BDF, interface name or None) of the virtio-net-pci function with ``mac``."""
    for dev in sorted(PCI.iterdir()):
        if (dev / "vendor").read_text().strip() != "0x1af4":
            continue
        for net in dev.glob("virtio*/net/*"):
            if (net / "address").read_text().strip() == mac.lower():
                return dev.name, net.name
    raise SystemExit(f"no virtio-net-pci function with MAC {mac} bound to virtio-pci")


def cpu_busy_s() -> float:
    """Guest CPU seconds not idle since boot (all CPUs; /proc/stat, USER_HZ 100)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - (f[4] if len(f) > 4 else 0)) / os.sysconf("SC_CLK_TCK")


class Port(Protocol):
    def send(self, frames: list[bytes]) -> int: ...
    def recv(self, timeout: float) -> list[bytes]: ...
    def counters(self) -> tuple[int | None, int | None]: ...  # (kicks, interrupts) so far
    def close(self) -> None: ...
    map_ops: int | None


class KernelPort:
    """The paravirtual path: the kernel's virtio_net through an AF_PACKET socket."""

    def __init__(self, ifname: str, bdf: str) -> None:
        subprocess.run(["ip", "link", "set", ifname, "up"], check=True)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_VX))
        self.sock.bind((ifname, ETH_P_VX))
        self.sock.setblocking(False)
        self.irq_names = [p.name for p in (PCI / bdf).glob("virtio*")]
        self.map_ops: int | None = None  # the kernel's DMA API (identity domain: iommu=pt)

    def send(self, frames: list[bytes]) -> int:
        sent = 0
        for f in frames:
            try:
                self.sock.send(f)
                sent += 1
            except (BlockingIOError, OSError):
                break
        return sent

    def recv(self, timeout: float) -> list[bytes]:
        out: list[bytes] = []
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return out
        while len(out) < 256:
            try:
                out.append(self.sock.recv(2048))
            except BlockingIOError:
                break
        return out

    def counters(self) -> tuple[int | None, int | None]:
        total = 0
        for line in Path("/proc/interrupts").read_text().splitlines()[1:]:
            if any(n in line for n in self.irq_names):
                total += sum(int(x) for x in line.split()[1:] if x.isdigit())
        return None, total

    def close(self) -> None:
        self.sock.close()


class VfioPort:
    """The passthrough path: the function on vfio-pci, the project's user-space driver."""

    def __init__(self, bdf: str, queue_size: int) -> None:
        from vfio import Sysfs
        from virtio.driver.net import NetDriver
        from virtio.transport.pci import VirtioPciTransport

        self.bdf = bdf
        self.sysfs = Sysfs()
        self.previous = self.sysfs.bind_vfio(bdf)
        self.t = VirtioPciTransport.open(bdf, queues=2, queue_size=queue_size)
        self.net = NetDriver(self.t)
        self.map_ops: int | None = self.t.map_ops
        result("pt.passthrough.iova_mode", self.t.iova_mode)
        result("pt.passthrough.irq", self.t.irq_kind)
        result("pt.passthrough.features", f"{self.t.features:#x}")
        for i, (q, regs) in enumerate(zip(self.t.queues, self.t.queue_registers(), strict=True)):
            result(f"pt.passthrough.queue{i}", f"driver desc={q.desc_gpa:#x} avail={q.avail_gpa:#x} "
                   f"used={q.used_gpa:#x} device " + " ".join(f"{k}={v:#x}" for k, v in regs.items()))

    def send(self, frames: list[bytes]) -> int:
        return self.net.send(frames, timeout=0.0)

    def recv(self, timeout: float) -> list[bytes]:
        return self.net.recv(timeout=timeout)

    def counters(self) -> tuple[int | None, int | None]:
        return self.t.kicks, self.t.interrupts

    def close(self) -> None:
        self.t.close()
        back = self.sysfs.unbind_vfio(self.bdf)
        result("pt.passthrough.given_back_to", back)


def _per(v: int | None, n: int) -> str:
    return "na" if v is None or n == 0 else f"{v / n:.4f}"


def run_phase(port: Port, path: str, phase: str, a: argparse.Namespace) -> None:
    me, peer = mac_bytes(a.mac), mac_bytes(a.peer_mac)
    name = f"pt.{path}.{phase}"
    result(name, "start")
    time.sleep(0.3 if phase == "rx" else 0.0)  # the host's source starts on the marker
    k0, i0 = port.counters()
    c0, t0 = cpu_busy_s(), time.monotonic()
    packets, rtts = 0, []
    end = t0 + a.duration
    if phase == "tx":
        batch = [make_frame(a.size, 0, s, 0, dst=peer, src=me) for s in range(32)]
        while time.monotonic() < end:
            packets += port.send(batch)
    elif phase == "rx":
        while time.monotonic() < end:
            packets += len(port.recv(0.05))
    else:
        seq = 0
        while time.monotonic() < end:
            seq += 1
            sent_at = time.monotonic_ns()
            if port.send([make_frame(a.size, 1, seq, sent_at, dst=peer, src=me)]) != 1:
                continue
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                got = [parse_frame(f) for f in port.recv(0.05)]
                if any(g is not None and g[1] == seq for g in got):
                    rtts.append(time.monotonic_ns() - sent_at)
                    break
        packets = 2 * len(rtts)
    elapsed = time.monotonic() - t0
    busy = cpu_busy_s() - c0
    k1, i1 = port.counters()
    result(name, "end")
    result(f"{name}.packets", packets)
    result(f"{name}.pps", f"{packets / elapsed:.1f}")
    result(f"{name}.cpu_us_per_pkt", f"{busy / packets * 1e6:.2f}" if packets else "na")
    result(f"{name}.kicks_per_pkt", _per(None if k0 is None else k1 - k0, packets))  # type: ignore[operator]
    result(f"{name}.irqs_per_pkt", _per(None if i0 is None else i1 - i0, packets))  # type: ignore[operator]
    result(f"{name}.map_ops", "na" if port.map_ops is None else port.map_ops)
    if rtts:
        rtts.sort()
        result(f"{name}.rtt_p50_us", f"{rtts[len(rtts) // 2] / 1000:.1f}")
        result(f"{name}.rtt_p99_us", f"{rtts[min(len(rtts) - 1, len(rtts) * 99 // 100)] / 1000:.1f}")


def run_check(port: Port, a: argparse.Namespace) -> None:
    me, peer = mac_bytes(a.mac), mac_bytes(a.peer_mac)
    frames = [check_frame(k, peer, me) for k in range(a.check)]
    sent = 0
    deadline = time.monotonic() + 30
    while sent < len(frames) and time.monotonic() < deadline:
        sent += port.send(frames[sent : sent + 16])
    result("pt.check.tx_sent", sent)
    result("pt.check.rx_ready", "yes")
    echoed, stray, digest = 0, 0, hashlib.sha256()
    samples: list[str] = []
    deadline = time.monotonic() + a.check_wait
    while echoed < a.check and time.monotonic() < deadline:
        for f in port.recv(0.1):
            if f[:6] != me or f[12:14] != ETH_P_VX.to_bytes(2, "big") or echoed >= a.check:
                stray += 1
                if len(samples) < 8:
                    own = frames.index(f) if f in frames else -1
                    samples.append(f"{len(f)}:{f[:14].hex()}:tx{own}")
                continue
            digest.update(f)
            back = f[6:12] + f[0:6] + f[12:]
            while port.send([back]) != 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            echoed += 1
    result("pt.check.rx_echoed", echoed)
    result("pt.check.rx_stray", stray)
    result("pt.check.rx_stray_samples", ",".join(samples) or "-")
    result("pt.check.rx_sha256", digest.hexdigest())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--mac", required=True)
    ap.add_argument("--peer-mac", required=True)
    ap.add_argument("--paths", default="paravirt,passthrough")
    ap.add_argument("--phases", default="tx,rx,pingpong")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--check", type=int, default=0)
    ap.add_argument("--check-wait", type=float, default=60.0)
    a = ap.parse_args(argv)
    bdf, ifname = find_nic(a.mac)
    result("pt.nic", bdf)
    if a.check:
        port: Port = VfioPort(bdf, a.queue_size)
        try:
            run_check(port, a)
        finally:
            port.close()
        return 0
    for path in a.paths.split(","):
        if path == "paravirt":
            if ifname is None:
                raise SystemExit(f"{bdf} has no kernel interface")
            port = KernelPort(ifname, bdf)
        elif path == "passthrough":
            if ifname is not None:
                subprocess.run(["ip", "link", "set", ifname, "down"], check=False)
            port = VfioPort(bdf, a.queue_size)
        else:
            raise SystemExit(f"--paths: expected paravirt and/or passthrough, got {path!r}")
        try:
            for phase in a.phases.split(","):
                run_phase(port, path, phase, a)
        finally:
            port.close()
    result("pt.done", "yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
