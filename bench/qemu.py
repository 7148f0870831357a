"""QEMU test guests with vhost-user NICs, driven through their serial console.

Role: start ``qemu-system-x86_64`` on a ``bench.guest.GuestImage`` with one or more vhost-user NICs
(TCG, memfd ``share=on`` memory, ``vectors=0``: see docs of the environment), read the serial console
from QEMU's stdout in a reader thread, let the caller wait for console markers (``VX-READY``,
``VX-RESULT name value``, ``VX-DONE``) and always stop QEMU: ``Guest`` is a context manager, ``stop()``
is idempotent, and QEMU gets ``PR_SET_PDEATHSIG=SIGKILL`` so that it dies with the thread that
started it even if this process is killed outright (start guests from a thread that outlives them,
normally the main thread).

Threads: one thread owns a ``Guest`` (start, stop); ``wait_for``/``result``/``console`` may be called
from any thread. The reader thread only appends console lines.
"""

from __future__ import annotations

import base64
import ctypes
import io
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, cast

from bench.guest import GuestImage

__all__ = ["Guest", "GuestFailure", "VhostUserNic", "qemu_binary"]

_PR_SET_PDEATHSIG = 1


class GuestFailure(RuntimeError):
    """The guest did not show what was waited for: timeout, QEMU exited, or the job failed.

    The message ends with the tail of the serial console."""


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64, or None when it is not installed."""
    return shutil.which("qemu-system-x86_64")


@dataclass(frozen=True)
class VhostUserNic:
    """One virtio-net-pci NIC backed by a vhost-user socket (QEMU is the client by default)."""

    socket: str | os.PathLike[str]
    mac: str | None = None  # e.g. "52:54:00:12:34:56"; QEMU picks one when None
    ip: str | None = None  # guest address with prefix, e.g. "10.200.1.2/24"
    queues: int = 1  # > 1: queues=N on the netdev, mq=on on the device
    reconnect: int = 0  # seconds between reconnect attempts; 0: none (QEMU 7.2 reconnect=N)
    server: bool = False  # QEMU listens on the socket instead (server=on,wait=off)
    device_args: str = ""  # appended to -device virtio-net-pci (e.g. "iommu_platform=on")
    # behind the vIOMMU: iommu_platform=on,ats=on on a PCIe root port of its own (the machine
    # needs q35 + intel-iommu: bench.vfio_guest.viommu_machine_args)
    iommu: bool = False


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


def _clean(raw: bytes) -> str:
    """One console line without terminal escapes and carriage returns."""
    return _ESCAPES.sub("", raw.decode(errors="replace")).replace("\r", "")


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Guest:
    """A QEMU guest running one job; use as ``with Guest(...) as g: g.wait_done()``."""

    def __init__(
        self,
        image: GuestImage,
        nics: Sequence[VhostUserNic] = (),
        job: str | None = None,
        *,
        name: str = "guest",
        memory_mb: int = 512,
        cpus: int = 1,
        workdir: str | os.PathLike[str] | None = None,
        append: str = "",
        mtu: int | None = None,
        files: dict[str, bytes] | None = None,
        qemu: str | None = None,
        extra_args: Sequence[str] = (),
        affinity: set[int] | None = None,
        machine_args: Sequence[str] = (),
    ) -> None:
        if len(nics) > 8:
            raise ValueError(f"at most 8 NICs are supported, got {len(nics)}")
        self.image = image
        self.nics = tuple(nics)
        self.job = job
        self.name = name
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.append = append
        self.mtu = mtu
        self.files = dict(files or {})
        self.qemu = qemu or qemu_binary() or "qemu-system-x86_64"
        self.extra_args = tuple(extra_args)
        # before every device (a vIOMMU must exist before the PCI devices it translates for)
        self.machine_args = tuple(machine_args)
        self.affinity = set(affinity) if affinity else None  # CPUs for every QEMU thread
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"vx-{name}-"))
        )
        self.log_path = self.workdir / f"{name}.console.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.started_at: float | None = None
        self.ready_at: float | None = None

    # ---------------------------------------------------------------- command line
    def command(self, initrd: Path) -> list[str]:
        """The full QEMU command line for this guest."""
        mem = self.memory_mb
        args = [
            self.qemu,
            "-name",
            self.name,
            "-accel",
            "tcg",
            "-m",
            str(mem),
            "-smp",
            str(self.cpus),
            "-nographic",
            "-no-reboot",
            "-object",
            f"memory-backend-memfd,id=mem,size={mem}M,share=on",
            "-numa",
            "node,memdev=mem",
            *self.machine_args,
        ]
        if not self.nics:
            args += ["-nic", "none"]
        for i, nic in enumerate(self.nics):
            chardev = f"socket,id=chr{i},path={os.fspath(nic.socket)}"
            if nic.server:
                chardev += ",server=on,wait=off"
            elif nic.reconnect:
                chardev += f",reconnect={nic.reconnect}"
            netdev = f"vhost-user,id=net{i},chardev=chr{i}"
            device = f"virtio-net-pci,netdev=net{i},vectors=0,romfile="
            if nic.queues > 1:
                netdev += f",queues={nic.queues}"
                device += ",mq=on"
            if nic.mac:
                device += f",mac={nic.mac}"
            if nic.device_args:
                device += f",{nic.device_args}"
            if nic.iommu:
                device += f",iommu_platform=on,ats=on,bus=vxrp{i}"
                args += ["-device", f"pcie-root-port,id=vxrp{i},chassis={10 + i}"]
            args += ["-chardev", chardev, "-netdev", netdev, "-device", device]
        cmdline = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1"]
        for i, nic in enumerate(self.nics):
            if nic.ip:
                cmdline.append(f"vx.ip={nic.ip}" if i == 0 else f"vx.ip{i}={nic.ip}")
        if self.mtu:
            cmdline.append(f"vx.mtu={self.mtu}")
        if self.append:
            cmdline.append(self.append)
        args += [
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(initrd),
            "-append",
            " ".join(cmdline),
        ]
        return args + list(self.extra_args)

    # ---------------------------------------------------------------- life cycle
    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError(f"guest {self.name} already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        initrd = self.image.initrd_with_job(
            self.workdir / f"{self.name}.initrd.gz", self.job, self.files
        )
        cmd = self.command(initrd)
        (self.workdir / f"{self.name}.cmdline").write_text(" ".join(cmd) + "\n")
        self.started_at = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=self._child_setup,  # noqa: PLW1509 - prctl() and sched_setaffinity()
        )
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-console", daemon=True)
        self._reader.start()
        return self

    def _child_setup(self) -> None:
        """In the child before exec: die with the parent thread, and run on `affinity` (every
        thread QEMU creates inherits it)."""
        _set_pdeathsig()
        if self.affinity:
            os.sched_setaffinity(0, self.affinity)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        out = cast(io.BufferedReader, self._proc.stdout)
        with open(self.log_path, "w", errors="replace") as log:
            pending = b""
            while True:
                chunk = out.read1(65536)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    lines = [_clean(c) for c in complete]
                    log.write("\n".join(lines) + "\n")
                    log.flush()
                    with self._cond:
                        self._lines.extend(lines)
                        if self.ready_at is None and any("VX-READY" in ln for ln in lines):
                            self.ready_at = time.monotonic()
                        self._cond.notify_all()
            if pending:
                log.write(pending.decode(errors="replace") + "\n")
        with self._cond:
            if pending:
                self._lines.append(_clean(pending))
            self._eof = True
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop QEMU (wait ``timeout`` for a guest that is powering off, then SIGTERM, then
        SIGKILL) and join the console reader. Returns QEMU's exit status; idempotent."""
        proc = self._proc
        if proc is None:
            return None
        try:
            proc.wait(timeout=timeout if self._done_seen() else 0.1)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_workdir and exc_type is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # ---------------------------------------------------------------- console
    @property
    def console(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self._lines[-n:])

    def _done_seen(self) -> bool:
        with self._cond:
            return any("VX-DONE" in ln for ln in self._lines)

    def _fail(self, what: str) -> GuestFailure:
        return GuestFailure(
            f"guest {self.name}: {what} (QEMU status {self.returncode}, console "
            f"log {self.log_path}); last console lines:\n{self.tail()}"
        )

    def wait_for(self, marker: str | re.Pattern[str], timeout: float) -> str:
        """The first console line (since boot) containing ``marker`` (a substring or a compiled
        regex), waiting up to ``timeout`` seconds. Raises GuestFailure on timeout or when QEMU's
        output ends first."""

        def match(line: str) -> bool:
            if isinstance(marker, str):
                return marker in line
            return marker.search(line) is not None

        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if match(line):
                        return line
                seen = len(self._lines)
                if self._eof:
                    raise self._fail(f"console ended before {marker!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._fail(f"no {marker!r} within {timeout:.0f} s")
                self._cond.wait(left)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for ``VX-READY``; returns the seconds from QEMU start to it."""
        self.wait_for("VX-READY", timeout)
        assert self.ready_at is not None and self.started_at is not None
        return self.ready_at - self.started_at

    def result(self, name: str, timeout: float = 60.0) -> str:
        """The value of ``VX-RESULT <name> <value>`` (waits for it)."""
        line = self.wait_for(re.compile(rf"VX-RESULT {re.escape(name)} "), timeout)
        return line.split(f"VX-RESULT {name} ", 1)[1].strip()

    @property
    def results(self) -> dict[str, str]:
        """All ``VX-RESULT`` values printed so far (a later value of a name wins)."""
        out: dict[str, str] = {}
        with self._cond:
            for line in self._lines:
                m = re.search(r"VX-RESULT (\S+) ?(.*)$", line)
                if m:
                    out[m.group(1)] = m.group(2).strip()
        return out

    def wait_done(self, timeout: float = 120.0, *, check: bool = True) -> int:
        """Wait for the job to finish (``VX-EXIT n`` then ``VX-DONE``) and return n; with
        ``check`` a nonzero n raises GuestFailure."""
        line = self.wait_for(re.compile(r"VX-EXIT -?\d+"), timeout)
        status = int(re.search(r"VX-EXIT (-?\d+)", line).group(1))  # type: ignore[union-attr]
        self.wait_for("VX-DONE", 30)
        if check and status != 0:
            raise self._fail(f"job exited with status {status}")
        return status

    @staticmethod
    def run_arg(snippet: str) -> str:
        """``vx.run=`` kernel argument carrying a short shell snippet (alternative to ``job``)."""
        return "vx.run=" + base64.b64encode(snippet.encode()).decode()
