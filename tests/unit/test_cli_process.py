"""bench.process.DaemonProcess: the daemon dies with its parent (PR_SET_PDEATHSIG), and the
metrics option reaches the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.process import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]


def gone(pid: int) -> bool:
    """True when the process no longer exists or is a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


# A parent that starts a DaemonProcess, prints the daemon's pid, then waits to be killed. With
# FAKE set, the "daemon" is a sleeping Python process that writes the ready file (this tests the
# mechanism without depending on the daemon); otherwise it is the real `vhostx serve`.
PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from bench.process import DaemonProcess

    class Fake(DaemonProcess):
        def command(self):
            return [sys.executable, "-c",
                    "import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(120)"
                    % str(self.ready_file)]

    cls = Fake if {fake} else DaemonProcess
    d = cls(workdir={workdir!r}, **{kw!r})
    if not {fake}:
        d.add_device("net0", port="sink")
    d.start()
    print(d.pid, flush=True)
    time.sleep(120)
""")


def start_parent(tmp_path: Path, *, fake: bool, **kw: object) -> tuple[subprocess.Popen[str], int]:
    workdir = tmp_path / "d"
    workdir.mkdir()
    code = PARENT.format(root=str(ROOT), fake=fake, workdir=str(workdir), kw=kw)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.strip().isdigit(), f"parent did not start a daemon: {line!r}"
    return parent, int(line)


@pytest.mark.parametrize("fake", [True, False], ids=["fake-daemon", "real-daemon"])
def test_daemon_dies_when_its_parent_is_killed(tmp_path: Path, fake: bool) -> None:
    parent, pid = start_parent(tmp_path, fake=fake)
    try:
        assert not gone(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_gone(pid), f"daemon {pid} outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_without_death_signal_the_daemon_outlives_its_parent(tmp_path: Path) -> None:
    """The control experiment: the test above fails when the death signal is not set."""
    parent, pid = start_parent(tmp_path, fake=True, parent_death_signal=None)
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        time.sleep(0.5)
        assert not gone(pid)
    finally:
        parent.kill()
        parent.wait()
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_metrics_option_on_the_command_line(tmp_path: Path) -> None:
    d = DaemonProcess(["name=a,socket=/tmp/a"], workdir=str(tmp_path), metrics="127.0.0.1:0")
    cmd = d.command()
    addr = cmd[cmd.index("--metrics") + 1]
    host, port = addr.rsplit(":", 1)
    assert host == "127.0.0.1" and 0 < int(port) < 65536
    assert d.metrics_url == f"http://{addr}/metrics"
    d6 = DaemonProcess(workdir=str(tmp_path), metrics="[::1]:9477")
    assert d6.command()[d6.command().index("--metrics") + 1] == "[::1]:9477"
    assert "--metrics" not in DaemonProcess(workdir=str(tmp_path)).command()
    assert DaemonProcess(workdir=str(tmp_path)).metrics_url is None
