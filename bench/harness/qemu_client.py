"""The QEMU client: a TCG guest whose virtio-net NIC is a device of the backend under test, running
a measurement program that prints its figures on the serial console.

- `build_vxperf()`: compiles `bench/guest_src/vxperf.c` with `gcc -static` (glibc, libc6-dev)
  into the guest cache (`bench.guest.cache_dir()`, outside the repository), once per source and
  compiler; the binary goes into the guest's initramfs, never into the repository.
- `QemuRun`: one guest (`bench.qemu.Guest`: QEMU 7.2, `-accel tcg`, one vCPU, memfd memory
  shared with the backend, virtio-net-pci with `vectors=0`), every QEMU thread pinned to the
  client core. Its job brings eth0 up (IPv6 off, so the guest sends nothing of its own) and runs
  `vxperf MODE`: `pingpong` (one frame in flight, the backend reflects it: vhostx `echo`, DPDK
  `macswap`), `tx` (the guest sends as fast as it can: vhostx `sink`, DPDK `rxonly`) or `rx` (the
  backend sends: vhostx `source`, DPDK `txonly`). vxperf runs its warm-up, prints
  `VX-WINDOW begin`, measures for the window on the guest's clock, prints `VX-WINDOW end`, then
  `VX-RESULT name value` lines and, for ping-pong, the round-trip times (`VX-RTT` lines, ns).
  The host snapshots the backend when it reads each window marker.

Every figure is a TCG-guest figure: the guest's CPU is emulated, so its rates are a small
fraction of what the backend can do and its round trips are dominated by the emulated guest.

Threads: the thread that owns a `QemuRun` (the runner's main thread; QEMU dies with it).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench.guest import GuestImage, build_image, cache_dir
from bench.qemu import Guest, GuestFailure, VhostUserNic

from .scenario_model import Case, QemuClient

__all__ = ["GUEST_MAC", "VXPERF_SRC", "GuestImageInfo", "QemuResult", "QemuRun",
           "build_vxperf", "guest_image", "job_script", "parse_console", "vxperf_mode"]

VXPERF_SRC = Path(__file__).resolve().parent.parent / "guest_src" / "vxperf.c"
GUEST_MAC = "52:54:00:12:34:56"
VXPERF_PATH = "/usr/bin/vxperf"  # inside the guest
WINDOW_MARGIN = 60.0  # s beyond the expected instant of a window marker before giving up


class QemuClientError(RuntimeError):
    """The guest did not boot, the program failed, or its output was incomplete."""


def _gcc_version(gcc: str) -> str:
    try:
        out = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise QemuClientError(f"{gcc} not usable ({err}); install gcc and libc6-dev") from err
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def build_vxperf(cache: Path | None = None, *, gcc: str = "gcc") -> Path:
    """The static vxperf binary for this source and compiler, compiled into the cache once."""
    src = VXPERF_SRC.read_bytes()
    key = hashlib.sha256(src + _gcc_version(gcc).encode()).hexdigest()[:16]
    out_dir = (cache or cache_dir()) / "tools"
    out = out_dir / f"vxperf-{key}"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-vxperf-")
    os.close(fd)
    cmd = [gcc, "-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror", "-o", tmp, str(VXPERF_SRC)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        os.unlink(tmp)
        raise QemuClientError(f"{' '.join(cmd)} failed ({res.returncode}): "
                              f"{res.stderr.strip()[-800:]} (static glibc needs libc6-dev)")
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class GuestImageInfo:
    """What the QEMU client boots: the image and the measurement program, for the dimensions."""

    image: GuestImage
    vxperf: Path

    def dims(self) -> dict[str, Any]:
        return {"kernel_release": self.image.kernel_release,
                "kernel_package": f"{self.image.package} {self.image.package_version}",
                "kernel": str(self.image.kernel), "initramfs": str(self.image.initramfs),
                "vxperf": self.vxperf.name}


def guest_image() -> GuestImageInfo:
    """Build (or find in the cache) the guest image and vxperf."""
    return GuestImageInfo(build_image(), build_vxperf())


def vxperf_mode(case: Case) -> str:
    if case.kind == "pingpong":
        return "pingpong"
    if case.kind == "stream":
        return "tx" if case.direction == "guest_tx" else "rx"
    raise ValueError(f"client = 'qemu' cannot run kind = {case.kind!r}")


def job_script(case: Case, warmup: float, duration: float) -> str:
    """The guest's /job.sh: eth0 up with nothing of its own to send, then vxperf."""
    mode = vxperf_mode(case)
    size = "" if mode == "rx" else f" {case.size}"
    ping = f" {case.rx_ping_us}" if mode == "rx" and case.rx_ping_us > 0 else ""
    return (
        f"chmod 755 {VXPERF_PATH}\n"
        "i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); "
        "done\n"
        "echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6 2>/dev/null\n"
        "ip link set eth0 up || exit 9\n"
        f"{VXPERF_PATH} {mode} eth0{size} {warmup:g} {duration:g}{ping}\n"
    )


@dataclass
class QemuResult:
    mode: str
    values: dict[str, int] = field(default_factory=dict)  # VX-RESULT name -> integer value
    rtt_ns: list[int] = field(default_factory=list)
    exit_status: int | None = None
    boot_s: float = 0.0


_RESULT = re.compile(r"VX-RESULT (\S+) (-?\d+)\s*$")


def parse_console(text: str, mode: str) -> QemuResult:
    """The figures vxperf printed (integers only) and its RTT samples; QemuClientError when they
    are incomplete (the sample count printed last must match the VX-RTT lines)."""
    res = QemuResult(mode)
    for line in text.splitlines():
        if line.startswith("VX-RTT "):
            res.rtt_ns.extend(int(x) for x in line.split()[1:])
            continue
        m = _RESULT.search(line)
        if m:
            res.values[m.group(1)] = int(m.group(2))
    need = {"pingpong": ("elapsed_ns", "sent", "received", "lost", "bad", "rtt_samples"),
            "tx": ("elapsed_ns", "sent", "if_packets", "if_bytes"),
            "rx": ("elapsed_ns", "received", "if_packets", "if_bytes")}[mode]
    missing = [k for k in need if k not in res.values]
    if missing:
        raise QemuClientError(f"vxperf {mode}: no {', '.join(missing)} on the console")
    if (mode == "pingpong" or "rtt_samples" in res.values) and \
            res.values["rtt_samples"] != len(res.rtt_ns):
        raise QemuClientError(f"vxperf {mode}: {len(res.rtt_ns)} RTT samples on the console, "
                              f"{res.values['rtt_samples']} announced")
    return res


class QemuRun:
    """One guest on `socket` running vxperf for `case`; a context manager that always stops QEMU.

    `wait_window_begin()` / `wait_window_end()` return when the guest printed the marker;
    `finish()` waits for the job to end and returns the parsed result."""

    def __init__(self, info: GuestImageInfo, socket: str, case: Case, settings: QemuClient, *,
                 warmup: float, duration: float, core: int, workdir: Path, name: str) -> None:
        self.case = case
        self.settings = settings
        self.warmup = warmup
        self.duration = duration
        self.mode = vxperf_mode(case)
        self.guest = Guest(info.image, [VhostUserNic(socket, mac=GUEST_MAC)],
                           job_script(case, warmup, duration), name=name,
                           memory_mb=settings.memory_mb, workdir=workdir,
                           files={VXPERF_PATH: info.vxperf.read_bytes()}, affinity={core})
        self.boot_s = 0.0

    @property
    def pid(self) -> int | None:
        return self.guest.pid

    @property
    def console_log(self) -> Path:
        return self.guest.log_path

    def __enter__(self) -> Self:
        self.guest.start()
        try:
            self.boot_s = self.guest.wait_ready(self.settings.boot_timeout)
        except GuestFailure as err:
            self.guest.stop()
            raise QemuClientError(str(err)) from err
        except BaseException:
            self.guest.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.guest.stop()

    def _wait(self, marker: str, timeout: float) -> None:
        try:
            self.guest.wait_for(marker, timeout)
        except GuestFailure as err:
            raise QemuClientError(str(err)) from err

    def wait_window_begin(self) -> None:
        self._wait("VX-WINDOW begin", self.warmup + WINDOW_MARGIN)

    def wait_window_end(self) -> None:
        self._wait("VX-WINDOW end", self.duration + WINDOW_MARGIN)

    def finish(self) -> QemuResult:
        try:
            status = self.guest.wait_done(WINDOW_MARGIN, check=False)
        except GuestFailure as err:
            raise QemuClientError(str(err)) from err
        if status != 0:
            raise QemuClientError(f"vxperf {self.mode} exited with status {status}; console "
                                  f"{self.guest.log_path}:\n{self.guest.tail(15)}")
        res = parse_console(self.guest.console, self.mode)
        res.exit_status = status
        res.boot_s = self.boot_s
        return res
