"""dpdk-testpmd as a peer: DPDK's vhost backend (net_vhost) or a VM-less guest (net_virtio_user).

Role: start one dpdk-testpmd process in interactive mode with its stdin a pipe, send it commands
(`start`, `stop`, `show port stats all`, ...) and parse the replies into exact per-port counters.
The benchmark harness (bench/harness/) and the end-to-end tests (tests/e2e/test_dpdk.py) drive it.

Threads: a `Testpmd` is driven by the thread that created it (commands are strictly sequential);
an internal reader thread only copies the process's output into the log file and an in-memory
buffer. The child is started with PR_SET_PDEATHSIG, tied to the *creating thread*: create it from a
thread that outlives it (the main thread in tests and benchmarks).

Placement: testpmd's forwarding lcores are all EAL lcores except the main one. Two busy-polling
processes on a 2-core machine must forward on distinct cores, so the usual plan is
`forward_lcores=(1,), main_lcore=0` for one side and `forward_lcores=(0,), main_lcore=1` for the
other (the main lcore sits idle in the command line reader in interactive mode).

The parsers of its replies (`parse_port_stats`, `parse_fwd_stats`, `parse_xstats`,
`parse_port_count`) and the records they return live in bench/testpmd_parse.py and are
re-exported here.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bench.testpmd_parse import (
    FwdPortStats,
    FwdStats,
    FwdStreamStats,
    PortStats,
    StatsSample,
    parse_fwd_stats,
    parse_port_count,
    parse_port_stats,
    parse_xstats,
)

__all__ = [
    "PROMPT",
    "FwdPortStats",
    "FwdStats",
    "FwdStreamStats",
    "PortStats",
    "StatsSample",
    "Testpmd",
    "TestpmdError",
    "VhostVdev",
    "VirtioUserVdev",
    "dpdk_version",
    "find_testpmd",
    "parse_fwd_stats",
    "parse_port_count",
    "parse_port_stats",
    "parse_xstats",
    "wait_for_socket",
]

PROMPT = "testpmd> "
_RUNTIME_DIR = Path("/var/run/dpdk")
_PR_SET_PDEATHSIG = 1
_counter = itertools.count()
_counter_lock = threading.Lock()


class TestpmdError(RuntimeError):
    """testpmd failed to start, died, or answered something unexpected; the message ends with the
    tail of its log and names the log file."""

    __test__ = False  # not a pytest test class despite the name


def find_testpmd() -> str | None:
    """Path of dpdk-testpmd on PATH (or $VHOSTX_TESTPMD), None if absent."""
    env = os.environ.get("VHOSTX_TESTPMD")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("dpdk-testpmd")


def dpdk_version() -> str:
    """Version of the Debian package holding testpmd (`dpkg-query -W dpdk-dev`), or 'unknown'."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "dpdk-dev"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def wait_for_socket(path: str | os.PathLike[str], timeout: float,
                    alive: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until `path` exists and is a Unix socket. Raises TimeoutError when it does not appear
    in time, RuntimeError when `alive` (the process expected to create it) exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        except FileNotFoundError:
            pass
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"process {alive.pid} exited with {alive.returncode} "
                               f"before creating socket {path}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"socket {path} did not appear within {timeout:.1f} s")
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# vdevs


@dataclass(frozen=True)
class VhostVdev:
    """A net_vhost port: DPDK's own vhost-user backend. By default it listens on `iface`."""

    iface: str
    queues: int = 1
    client: bool = False  # connect to a listening frontend instead of listening
    extra: tuple[str, ...] = ()  # further key=value devargs, verbatim

    def devarg(self, index: int) -> str:
        args = [f"net_vhost{index}", f"iface={self.iface}", f"queues={self.queues}"]
        if self.client:
            args.append("client=1")
        return ",".join([*args, *self.extra])

    @property
    def listens(self) -> bool:
        return not self.client


@dataclass(frozen=True)
class VirtioUserVdev:
    """A net_virtio_user port: a VM-less virtio-net driver speaking vhost-user on `path`.
    None leaves an option at DPDK's default (in_order=1, mrg_rxbuf=1, packed_vq=0, queue_size 256).
    """

    path: str
    queues: int = 1
    queue_size: int | None = None
    mrg_rxbuf: bool | None = None
    in_order: bool | None = None
    packed_vq: bool | None = None
    server: bool = False  # listen on `path` and let the backend connect
    mac: str | None = None
    extra: tuple[str, ...] = ()

    def devarg(self, index: int) -> str:
        args = [f"net_virtio_user{index}", f"path={self.path}", f"queues={self.queues}"]
        if self.queue_size is not None:
            args.append(f"queue_size={self.queue_size}")
        for key, value in (("mrg_rxbuf", self.mrg_rxbuf), ("in_order", self.in_order),
                           ("packed_vq", self.packed_vq)):
            if value is not None:
                args.append(f"{key}={int(value)}")
        if self.server:
            args.append("server=1")
        if self.mac is not None:
            args.append(f"mac={self.mac}")
        return ",".join([*args, *self.extra])

    @property
    def listens(self) -> bool:
        return self.server


Vdev = VhostVdev | VirtioUserVdev


# ----------------------------------------------------------------------------------------------
# the process


_prctl: Any = None
try:  # resolved once here, so that the child only makes one foreign call before exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    pass


def _set_pdeathsig() -> None:  # runs in the child between fork and exec: no locks, no imports
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass
class _Output:
    """Everything the process printed, guarded by a condition the reader thread notifies."""

    buf: bytearray = field(default_factory=bytearray)
    cond: threading.Condition = field(default_factory=threading.Condition)
    eof: bool = False


class Testpmd:
    """One interactive dpdk-testpmd process.

    ```
    with Testpmd([VhostVdev(sock)], forward_mode="rxonly", forward_lcores=(1,), main_lcore=0) as peer:
        peer.start_forwarding()
        s0 = peer.port_stats(); time.sleep(5); s1 = peer.port_stats()
        print(s1.rates_since(s0))
    ```
    Entering the context (or `launch()`) waits for the sockets of listening vdevs to appear and for
    the first prompt, and checks that every vdev became a port. Leaving it quits testpmd, then
    terminates, then kills it, and removes its EAL runtime directory.
    """

    __test__ = False

    def __init__(
        self,
        vdevs: Sequence[Vdev],
        *,
        forward_mode: str = "io",
        forward_lcores: Sequence[int] = (1,),
        main_lcore: int = 0,
        nb_cores: int | None = None,
        txpkts: int | Sequence[int] | None = None,
        burst: int | None = None,
        rxq: int | None = None,
        txq: int | None = None,
        rxd: int | None = None,
        txd: int | None = None,
        mbcache: int | None = None,
        total_num_mbufs: int = 16384,
        memory_mb: int = 1024,
        allow: Sequence[str] = (),
        eal_args: Sequence[str] = (),
        app_args: Sequence[str] = (),
        binary: str | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        name: str = "testpmd",
        socket_timeout: float = 20.0,
        start_timeout: float = 60.0,
        command_timeout: float = 20.0,
        quiet_vhost_log: bool = True,
        link_check: bool = False,
    ) -> None:
        if not vdevs:
            raise ValueError("at least one vdev is needed")
        if main_lcore in forward_lcores:
            raise ValueError(f"main lcore {main_lcore} is also a forwarding lcore {forward_lcores}")
        self.vdevs = list(vdevs)
        self.forward_mode = forward_mode
        self.forward_lcores = tuple(forward_lcores)
        self.main_lcore = main_lcore
        self.nb_cores = nb_cores if nb_cores is not None else len(self.forward_lcores)
        self.name = name
        self.binary = binary or find_testpmd()
        if self.binary is None:
            raise TestpmdError("dpdk-testpmd not found (install the Debian package dpdk-dev)")
        with _counter_lock:
            serial = next(_counter)
        self.file_prefix = f"vhx{os.getpid()}_{serial}_{name}"
        self.socket_timeout = socket_timeout
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        lcores = sorted({main_lcore, *self.forward_lcores})

        eal = ["-l", ",".join(map(str, lcores)), "--main-lcore", str(main_lcore),
               "--no-huge", "-m", str(memory_mb), "--file-prefix", self.file_prefix]
        if allow:
            for dev in allow:
                eal += ["-a", dev]
        else:
            eal.append("--no-pci")
        if quiet_vhost_log:
            eal.append("--log-level=lib.vhost.config:warning")
        for i, vdev in enumerate(self.vdevs):
            eal += ["--vdev", vdev.devarg(i)]
        eal += list(eal_args)

        app = ["-i", f"--forward-mode={forward_mode}", f"--nb-cores={self.nb_cores}",
               f"--total-num-mbufs={total_num_mbufs}"]
        if txpkts is not None:
            sizes = [txpkts] if isinstance(txpkts, int) else list(txpkts)
            app.append("--txpkts=" + ",".join(map(str, sizes)))
        for opt, val in (("burst", burst), ("rxq", rxq), ("txq", txq), ("rxd", rxd), ("txd", txd),
                         ("mbcache", mbcache)):
            if val is not None:
                app.append(f"--{opt}={val}")
        if not link_check:  # a vhost port is down until its frontend connects: do not wait 9 s
            app.append("--disable-link-check")
        app += list(app_args)
        self.argv = [self.binary, *eal, "--", *app]

        fd, log_path = tempfile.mkstemp(prefix=f"{self.file_prefix}-", suffix=".log",
                                        dir=os.fspath(log_dir) if log_dir is not None else None)
        os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = _Output()
        self._reader: threading.Thread | None = None
        self._forwarding = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.launch()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def launch(self) -> None:
        """Start the process; wait for the backends it must connect to, its own listening
        sockets, and its first prompt; check the port count."""
        if self.proc is not None:
            raise TestpmdError(f"{self.name}: already launched")
        for vdev in self.vdevs:
            if isinstance(vdev, VirtioUserVdev) and not vdev.server:
                wait_for_socket(vdev.path, self.socket_timeout)
            elif isinstance(vdev, VhostVdev) and vdev.client:
                wait_for_socket(vdev.iface, self.socket_timeout)
        argv = self.argv
        stdbuf = shutil.which("stdbuf")
        if stdbuf is not None:  # replies are printf()s: unbuffer them, the prompt has no newline
            argv = [stdbuf, "-o0", "-e0", *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=_set_pdeathsig, close_fds=True,  # noqa: PLW1509 - see _set_pdeathsig
        )
        self._reader = threading.Thread(target=self._read_output, name=f"{self.name}-reader",
                                        daemon=True)
        self._reader.start()
        try:
            for vdev in self.vdevs:
                if vdev.listens:
                    path = vdev.iface if isinstance(vdev, VhostVdev) else vdev.path
                    wait_for_socket(path, self.socket_timeout, alive=self.proc)
            self._wait_prompt(0, self.start_timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise self._error(f"did not start: {exc}") from exc
        ports = parse_port_count(self.command("show port summary all"))
        if ports != len(self.vdevs):
            raise self._error(f"has {ports} ports, expected {len(self.vdevs)} (a vdev failed to probe)")

    def close(self) -> None:
        """Quit, then SIGTERM, then SIGKILL; idempotent. Removes the EAL runtime directory."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                if self._forwarding:
                    self._send("stop")
                self._send("quit")
            except (OSError, ValueError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._forwarding = False
        shutil.rmtree(_RUNTIME_DIR / self.file_prefix, ignore_errors=True)

    def log_text(self) -> str:
        with self._out.cond:
            return self._out.buf.decode(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- commands --------------------------------------------------------------------------

    def command(self, cmd: str, timeout: float | None = None) -> str:
        """Send one command line and return what testpmd printed until its next prompt."""
        if self.proc is None:
            raise TestpmdError(f"{self.name}: not launched")
        with self._out.cond:
            start = len(self._out.buf)
        try:
            self._send(cmd)
        except (OSError, ValueError) as exc:
            raise self._error(f"cannot take command {cmd!r}: {exc}") from exc
        end = self._wait_prompt(start, timeout if timeout is not None else self.command_timeout,
                                what=cmd)
        with self._out.cond:
            reply = bytes(self._out.buf[start:end]).decode(errors="replace")
        # drop the echoed command line ("cmd\r\n")
        first, _, rest = reply.partition("\n")
        return rest if cmd in first else reply

    def start_forwarding(self, tx_first: int | None = None) -> None:
        """`start`, or `start tx_first N`: send N bursts first (to seed io/mac/macswap loops)."""
        self.command("start" if tx_first is None else f"start tx_first {tx_first}")
        self._forwarding = True

    @property
    def forwarding(self) -> bool:
        """True between start_forwarding() and stop_forwarding()."""
        return self._forwarding

    def set_portlist(self, ports: Sequence[int]) -> None:
        """`set portlist a,b,...` (while stopped): forward only on these ports (the others stay
        configured and connected but carry no traffic)."""
        if not ports:
            raise ValueError("set_portlist needs at least one port")
        reply = self.command("set portlist " + ",".join(str(p) for p in ports))
        if "Invalid" in reply or "Bad arguments" in reply or "invalid" in reply:
            raise self._error(f"refused portlist {list(ports)}: {reply.strip()}")

    def set_forward_mode(self, mode: str) -> None:
        """`set fwd MODE` (while stopped)."""
        reply = self.command(f"set fwd {mode}")
        if "Invalid" in reply or "Bad arguments" in reply:
            raise self._error(f"refused forward mode {mode!r}: {reply.strip()}")
        self.forward_mode = mode

    def stop_forwarding(self) -> FwdStats:
        """`stop`: the forwarding lcores finish; returns the forward statistics it prints."""
        text = self.command("stop")
        self._forwarding = False
        return parse_fwd_stats(text)

    def port_stats(self) -> StatsSample:
        t0 = time.monotonic()
        text = self.command("show port stats all")
        t1 = time.monotonic()
        ports = parse_port_stats(text)
        if len(ports) != len(self.vdevs):
            raise self._error(f"'show port stats all' gave ports {sorted(ports)}")
        return StatsSample((t0 + t1) / 2, ports)

    def fwd_stats(self) -> FwdStats:
        return parse_fwd_stats(self.command("show fwd stats all"))

    def xstats(self, port: int) -> dict[str, int]:
        return parse_xstats(self.command(f"show port xstats {port}"))

    def clear_port_stats(self) -> None:
        self.command("clear port stats all")

    def clear_fwd_stats(self) -> None:
        self.command("clear fwd stats all")

    # -- internals -------------------------------------------------------------------------

    def _send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with open(self.log_path, "ab", buffering=0) as log:
            log.write(("$ " + " ".join(self.argv) + "\n").encode())
            while True:
                try:
                    ready, _, _ = select.select([fd], [], [], 1.0)
                    if not ready:
                        continue
                    chunk = os.read(fd, 65536)
                except (OSError, ValueError):
                    chunk = b""
                if not chunk:
                    break
                log.write(chunk)
                with self._out.cond:
                    self._out.buf += chunk
                    self._out.cond.notify_all()
        with self._out.cond:
            self._out.eof = True
            self._out.cond.notify_all()

    def _wait_prompt(self, start: int, timeout: float, what: str = "start-up") -> int:
        """Index of the first prompt found at or after `start`."""
        prompt = PROMPT.encode()
        deadline = time.monotonic() + timeout
        with self._out.cond:
            while True:
                idx = self._out.buf.find(prompt, start)
                if idx >= 0:
                    return idx
                if self._out.eof:
                    raise self._error(f"exited during {what!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._error(f"no prompt within {timeout:.0f} s after {what!r}")
                self._out.cond.wait(left)

    def _error(self, msg: str) -> TestpmdError:
        rc = self.proc.poll() if self.proc is not None else None
        state = f"exit code {rc}" if rc is not None else "running"
        return TestpmdError(f"{self.name} (pid {self.pid}, {state}) {msg}; log {self.log_path}:\n"
                            f"{self.log_tail()}")
