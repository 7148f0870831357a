"""Run the daemon as a child process: used by tests, benchmarks and the demo.

`DaemonProcess` starts `python -m vhostx serve` with a control socket and a ready file in a private
directory, waits until every socket listens, offers live stats over the control socket, and stops
the daemon with SIGTERM (then SIGKILL) — returning the final statistics it wrote on exit.

The daemon dies with its parent: it is started with PR_SET_PDEATHSIG (SIGKILL by default), so a
benchmark or test killed with SIGKILL leaves no daemon behind. The kernel ties that signal to the
*thread* that started the child, not to the process: start a daemon from a thread that lives as
long as the daemon should (the main thread, as bench/ does), or pass `parent_death_signal=None`.

Threads: the caller's.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from vhostx.cli import control_request
from vhostx.metrics import parse_addr

__all__ = ["DaemonFailed", "DaemonProcess"]

_PR_SET_PDEATHSIG = 1
_prctl: Any = None
try:  # resolved here, so that the child makes only foreign calls between fork and exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    pass


def _death_signal_setter(sig: int) -> Any:
    """A preexec_fn: ask for `sig` when the parent (thread) dies; if the parent already died
    between fork and prctl (we were re-parented), exit at once instead of living on."""
    parent = os.getpid()

    def preexec() -> None:  # between fork and exec: no locks, no imports, no allocation to speak of
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _free_port(host: str) -> int:
    """A TCP port free right now on `host` (the daemon binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class DaemonFailed(RuntimeError):
    """The daemon exited early or did not become ready; the message carries its log tail."""


class DaemonProcess:
    def __init__(
        self,
        devices: Sequence[str] = (),
        *,
        config: str | None = None,
        params: Sequence[str] = (),
        cpus: set[int] | None = None,
        workdir: str | None = None,
        extra_args: Sequence[str] = (),
        log_level: str = "INFO",
        metrics: str | None = None,
        parent_death_signal: int | None = signal.SIGKILL,
        launcher: Sequence[str] = ("-m", "vhostx"),
    ) -> None:
        """`metrics`: "HOST:PORT" for `serve --metrics`; port 0 is replaced here by a port free
        at that moment, so that `metrics` / `metrics_url` tell where to scrape.
        `parent_death_signal`: the signal the daemon gets when the thread that started it dies
        (None: none; the daemon then outlives a killed parent).
        `launcher`: what follows the interpreter on the command line, before the daemon's own
        arguments (bench/malloc_trace.py wraps the daemon in tracemalloc this way)."""
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="vhostx-"))
        self.control = str(self.dir / "control.sock")
        self.ready_file = self.dir / "ready"
        self.stats_file = self.dir / "final-stats.json"
        self.log_path = self.dir / "daemon.log"
        self.devices = list(devices)
        self.config = config
        self.params = list(params)
        self.extra_args = list(extra_args)
        self.log_level = log_level
        self.cpus = cpus
        self.metrics = metrics
        if metrics is not None:
            host, port = parse_addr(metrics)
            if port == 0:
                bracketed = f"[{host}]" if ":" in host else host
                self.metrics = f"{bracketed}:{_free_port(host)}"
        self.parent_death_signal = parent_death_signal
        self.launcher = list(launcher)
        self.proc: subprocess.Popen[bytes] | None = None
        self.final_stats: dict[str, Any] | None = None

    def sock(self, name: str) -> str:
        """A socket path inside the private directory (short enough for AF_UNIX)."""
        return str(self.dir / f"{name}.sock")

    def add_device(self, name: str, port: str = "sink", **options: object) -> str:
        """Add a net device (before start) with its socket in the private dir; return the path."""
        path = self.sock(name)
        opts = "".join(f",{k}={v}" for k, v in options.items())
        self.devices.append(f"name={name},type=net,socket={path},port={port}{opts}")
        return path

    def command(self) -> list[str]:
        args = [sys.executable, *self.launcher, "--log-level", self.log_level, "serve",
                "--control", self.control, "--ready-file", str(self.ready_file),
                "--stats-file", str(self.stats_file)]
        if self.config:
            args += ["--config", self.config]
        if self.metrics is not None:
            args += ["--metrics", self.metrics]
        for dev in self.devices:
            args += ["--device", dev]
        for p in self.params:
            args += ["--param", p]
        return args + self.extra_args

    def start(self, timeout: float = 15.0) -> Self:
        preexec = (None if self.parent_death_signal is None
                   else _death_signal_setter(int(self.parent_death_signal)))
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                self.command(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=preexec,  # noqa: PLW1509 - only prctl() and getppid(): no locks
            )
        if self.cpus:
            # Pinned before its threads exist: they inherit the mask.
            os.sched_setaffinity(self.proc.pid, self.cpus)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise DaemonFailed(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonFailed(f"daemon not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    @property
    def metrics_url(self) -> str | None:
        """http://HOST:PORT/metrics when the daemon was started with metrics, else None."""
        return None if self.metrics is None else f"http://{self.metrics}/metrics"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        return control_request(self.control, req)

    def stats(self) -> dict[str, Any]:
        return self.request({"cmd": "stats"})

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """SIGTERM, wait, SIGKILL if needed; return the final stats (None if none written)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.stats_file.exists():
            self.final_stats = json.loads(self.stats_file.read_text())
        return self.final_stats

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            for p in sorted(self.dir.glob("*")):
                try:
                    p.unlink()
                except OSError:
                    pass
            try:
                self.dir.rmdir()
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
