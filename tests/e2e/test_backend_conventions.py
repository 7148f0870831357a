"""QEMU's backend program conventions (docs/interop/vhost-user.rst, "Backend program
conventions") against the real `vhostx serve` process: --socket-path with a real frontend and
traffic, --fd with one end of a socketpair, --print-capabilities, a prompt exit on SIGTERM,
start-up failures that exit non-zero with a message, and the socket's group and mode."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vhostx.cli import control_request
from virtio.frontend import NetDriver, VhostUserFrontend

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MAC_A = bytes.fromhex("525400aa0001")
MAC_B = bytes.fromhex("525400bb0002")


def frames(n: int, size: int = 100) -> list[bytes]:
    return [MAC_B + MAC_A + b"\x88\xb5" + struct.pack("!I", i) + bytes(size - 18)
            for i in range(n)]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def sink_packets(control: str, device: str = "net0") -> int:
    stats = control_request(control, {"cmd": "stats"})
    dev = next(d for d in stats["devices"] if d["name"] == device)
    return int(dev["queues"].get("1", {}).get("packets", 0))


class Serve:
    """`python -m vhostx serve ARGS` as a child, with a control socket and a ready file."""

    def __init__(self, workdir: Path, *args: str, pass_fds: tuple[int, ...] = (),
                 wait_ready: bool = True) -> None:
        self.control = str(workdir / "control.sock")
        self.ready = workdir / "ready"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostx", "serve", "--control", self.control,
             "--ready-file", str(self.ready), *args],
            cwd=ROOT, env=ENV, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if wait_ready:
            assert wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, 20)
            assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        out, err = self.proc.communicate()
        return out + err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str, **kw: object) -> Serve:
        workdir = tmp_path / f"s{len(started)}"
        workdir.mkdir()
        s = Serve(workdir, *args, **kw)  # type: ignore[arg-type]
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def run_serve(*args: str, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None,
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostx", "serve", *args], cwd=ROOT,
                          env=env or ENV, pass_fds=pass_fds, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_print_capabilities_prints_the_documented_json_and_exits_0() -> None:
    # VHostUserBackendCapabilities: a union whose base is {"type": VHostUserBackendType}; net
    # adds no member, so the whole object is the type. Other options are to be ignored.
    for extra in ((), ("--fd", "999", "--not-an-option")):
        done = run_serve("--print-capabilities", *extra)
        assert done.returncode == 0, done.stderr
        assert done.stdout == '{"type": "net"}\n'
        assert json.loads(done.stdout) == {"type": "net"}


def test_socket_path_serves_one_sink_device_and_sigterm_stops_it_promptly(
        serve: Callable[..., Serve], tmp_path: Path) -> None:
    sock = str(tmp_path / "net0.sock")
    s = serve("--socket-path", sock)
    with VhostUserFrontend(sock) as fe:
        assert NetDriver(fe).send(frames(300), timeout=5) == 300
        assert wait_until(lambda: sink_packets(s.control) == 300)
        stats = control_request(s.control, {"cmd": "stats"})
        assert [d["name"] for d in stats["devices"]] == ["net0"]
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        rc = s.proc.wait(10)
    assert rc == 0 and time.monotonic() - t0 < 5.0, s.output()
    assert not os.path.exists(sock), "the listening socket outlived the daemon"


def test_socket_path_takes_port_name_and_device_options(serve: Callable[..., Serve],
                                                        tmp_path: Path) -> None:
    sock = str(tmp_path / "e.sock")
    s = serve("--socket-path", sock, "--name", "guest1", "--port", "echo", "-o", "mtu=9000",
              "--device-option", "queues=2")
    with VhostUserFrontend(sock, queues=4) as fe:
        net = NetDriver(fe)
        net.send(frames(5))
        got: list[bytes] = []
        assert wait_until(lambda: bool(got.extend(net.recv(timeout=0.2))) or len(got) >= 5)
        assert got[0][:6] == MAC_A  # echoed with the MACs swapped
        assert fe.queue_num == 2
    stats = control_request(s.control, {"cmd": "stats"})
    assert [d["name"] for d in stats["devices"]] == ["guest1"]


def test_fd_serves_an_inherited_connection_and_exits_when_it_ends(
        serve: Callable[..., Serve]) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s = serve("--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    fe = VhostUserFrontend("(socketpair)")
    fe.adopt(ours)
    try:
        assert NetDriver(fe).send(frames(200), timeout=5) == 200
        assert wait_until(lambda: sink_packets(s.control) == 200)
    finally:
        fe.close()
    assert s.proc.wait(10) == 0, s.output()


def _not_a_connected_stream_socket(kind: str, tmp_path: Path) -> tuple[int, list[object]]:
    """An fd of the given kind and the objects that keep it open."""
    if kind == "closed":
        return 250, []
    if kind == "regular file":
        f = open(tmp_path / "file", "w")  # noqa: SIM115 - closed by the caller's list
        return f.fileno(), [f]
    if kind == "pipe":
        r, w = os.pipe()
        return r, [r, w]
    if kind == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return u.fileno(), [u]
    if kind == "datagram unix":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return a.fileno(), [a, b]
    un = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if kind == "listening unix":
        un.bind(str(tmp_path / "l.sock"))
        un.listen(1)
    return un.fileno(), [un]


@pytest.mark.parametrize("kind, words", [
    ("closed", "not an open file descriptor"),
    ("regular file", "got a regular file"),
    ("pipe", "got a pipe"),
    ("udp", "got AF_INET SOCK_DGRAM"),
    ("datagram unix", "got AF_UNIX SOCK_DGRAM"),
    ("listening unix", "got a listening one"),
    ("unconnected unix", "got an unconnected one"),
])
def test_fd_that_is_not_a_connected_unix_stream_socket_exits_2(
        tmp_path: Path, kind: str, words: str) -> None:
    fd, keep = _not_a_connected_stream_socket(kind, tmp_path)
    try:
        done = run_serve("--fd", str(fd), pass_fds=() if kind == "closed" else (fd,))
    finally:
        for k in keep:
            os.close(k) if isinstance(k, int) else k.close()  # type: ignore[attr-defined]
    assert done.returncode == 2, done.stderr
    assert f"--fd {fd}" in done.stderr and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


FAKE_TUN = """
import os, sys
real = os.open
def no_tun(path, *a, **k):
    if path == "/dev/net/tun":
        raise FileNotFoundError(2, "No such file or directory", path)
    return real(path, *a, **k)
os.open = no_tun
from vhostx.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_start_failures_exit_nonzero_with_a_message(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (["--socket-path", str(blocker / "net0.sock")], "cannot create directory"),
        (["--socket-path", str(blocker)], "exists and is not a socket"),
        (["--socket-path", str(tmp_path / ("x" * 120))], "at most 107 bytes"),
        (["--socket-path", str(tmp_path / "a.sock"), "--fd", "3"], "not allowed with"),
        (["--socket-path", str(tmp_path / "b.sock"), "-o", "mtu=1"], "mtu=1: out of range"),
        (["--port", "echo"], "give one of those"),
        (["--socket-path", str(tmp_path / "c.sock"), "--socket-mode", "0999"], "socket_mode"),
        (["--socket-path", str(tmp_path / "d.sock"), "--socket-group", "no-such-group-x"],
         "no such group"),
    ]
    for args, words in cases:
        done = run_serve(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)

    # a tap port without /dev/net/tun
    done = subprocess.run([sys.executable, "-c", FAKE_TUN, "serve", "--socket-path",
                           str(tmp_path / "t.sock"), "--port", "tap"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "cannot open /dev/net/tun" in done.stderr, done.stderr

    # a tap port without pyroute2 (a package of that name that fails to import shadows it)
    shadow = tmp_path / "shadow" / "pyroute2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('pyroute2 is not installed')\n")
    env = {**ENV, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
    done = run_serve("--socket-path", str(tmp_path / "p.sock"), "--port", "tap", env=env)
    assert done.returncode == 2 and "needs pyroute2" in done.stderr, done.stderr
    assert not (tmp_path / "p.sock").exists()


def _other_group() -> grp.struct_group:
    """A group that exists here and is not the test's own primary group."""
    for g in grp.getgrall():
        if g.gr_gid != os.getgid():
            return g
    pytest.skip("this host has a single group")


def test_socket_mode_and_group_apply_to_the_listening_socket(serve: Callable[..., Serve],
                                                             tmp_path: Path) -> None:
    group = _other_group()
    if os.geteuid() != 0 and os.getlogin() not in group.gr_mem:
        pytest.skip(f"changing a file's group to {group.gr_name} needs root or membership")
    cfg = tmp_path / "two.toml"
    cfg.write_text(f"""
[daemon]
socket_mode = "0660"
socket_group = "{group.gr_name}"

[[device]]
name = "a"
socket = "{tmp_path / 'a.sock'}"

[[device]]
name = "b"
socket = "{tmp_path / 'b.sock'}"
socket_mode = "0600"
""")
    s = serve("--config", str(cfg))
    a, b = os.stat(tmp_path / "a.sock"), os.stat(tmp_path / "b.sock")
    assert stat.S_ISSOCK(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o660
    assert a.st_gid == group.gr_gid
    assert stat.S_IMODE(b.st_mode) == 0o600 and b.st_gid == group.gr_gid  # the group by default
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(10) == 0
    # the command line's --socket-mode is the default for devices that set none
    sock = tmp_path / "c.sock"
    s = serve("--socket-path", str(sock), "--socket-mode", "640")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o640
