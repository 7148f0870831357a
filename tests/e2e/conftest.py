"""Fixtures for end-to-end tests with real peers: the QEMU guest image, a scratch directory with
short socket paths, a network namespace, and the daemon as a child process.

Threads: pytest's main thread only (QEMU and testpmd children are tied to the thread that starts
them through PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.testpmd import Testpmd, TestpmdError, VhostVdev, VirtioUserVdev, find_testpmd

__all__ = ["e2e_dir", "guest_image", "need_qemu", "netns", "subnet", "unique", "vhostx_daemon"]

_serial = itertools.count(1)
_subnets = itertools.count(10)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


def need_qemu() -> str:
    """Path of qemu-system-x86_64, or skip the test."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip("qemu-system-x86_64 not found (install the Debian package qemu-system-x86)")
    return path


@pytest.fixture(scope="session")
def guest_image() -> Any:
    """The test guest (kernel + busybox initramfs), built once into the cache
    ($VHOSTX_CACHE or ~/.cache/vhostx) and reused across runs."""
    need_qemu()
    from bench.guest import build_image

    return build_image()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """unique(prefix) -> a name with this process's pid, at most 15 characters (ifname limit)."""

    def make(prefix: str) -> str:
        name = f"{prefix}{os.getpid()}x{next(_serial)}"
        assert len(name) <= 15, name
        return name

    return make


@pytest.fixture
def subnet() -> str:
    """A /24 prefix "10.200.N" unique within this test run (only used inside our namespaces)."""
    return f"10.200.{next(_subnets) % 250}"


@pytest.fixture
def e2e_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory with a short path (AF_UNIX socket paths must stay under 108 bytes).
    Removed after a passing test; kept, and its path printed, after a failure."""
    path = Path(tempfile.mkdtemp(prefix=f"vxe2e{os.getpid()}-"))
    yield path
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\nkept {path} for inspection (console logs, daemon log)")
    else:
        for _ in range(5):  # a child that is still exiting may add a file while we delete
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                break
            time.sleep(0.2)


@pytest.fixture
def netns() -> Iterator[Any]:
    """A fresh network namespace (vhostx.netdev.Netns), deleted afterwards; skips when TUN or
    namespaces are unavailable."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun does not exist")
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    from vhostx import netdev

    ns = netdev.Netns()
    try:
        ns.create()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot create a network namespace: {e}")
    try:
        yield ns
    finally:
        ns.delete()
    assert not os.path.exists(ns.path), f"namespace {ns.name} left behind"


@pytest.fixture
def vhostx_daemon(e2e_dir: Path) -> Iterator[Callable[..., Any]]:
    """start(devices: list[str], **kw) -> a started bench.process.DaemonProcess in e2e_dir;
    every daemon started is stopped (SIGTERM, then SIGKILL) at teardown. Skips when the daemon's
    CLI does not exist yet."""
    try:
        from bench.process import DaemonProcess
    except ImportError as e:
        pytest.skip(f"the daemon is not available yet: {e}")
    started: list[Any] = []

    def start(devices: list[str], **kw: Any) -> Any:
        workdir = e2e_dir / f"daemon{len(started)}"
        workdir.mkdir()
        d = DaemonProcess(devices, workdir=str(workdir), **kw)
        started.append(d)
        return d.start()

    yield start
    for d in reversed(started):
        d.stop()
        assert not d.alive()


# ---- DPDK testpmd (test_dpdk.py, test_shared.py) ---------------------------------------------
# The daemon runs pinned to core 1, the virtio-user client forwards on core 0.
CLIENT_CORE = 0
DAEMON_CORE = 1
MEMORY_MB = 256  # enough for 16384 mbufs; -m 1024 costs seconds of start-up per process


@pytest.fixture(scope="module")
def testpmd_ok(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Skip the module unless dpdk-testpmd exists and can start here (one net_vhost port)."""
    binary = find_testpmd()
    if binary is None:
        pytest.skip("dpdk-testpmd not found (install the Debian package dpdk-dev)")
    sock = tmp_path_factory.mktemp("probe") / "probe.sock"
    try:
        with Testpmd([VhostVdev(str(sock))], forward_mode="rxonly", forward_lcores=(DAEMON_CORE,),
                     main_lcore=CLIENT_CORE, memory_mb=MEMORY_MB, name="probe") as tp:
            tp.port_stats()
    except (TestpmdError, OSError, TimeoutError) as exc:
        pytest.skip(f"dpdk-testpmd cannot start here: {exc}")
    return binary


@pytest.fixture
def client(testpmd_ok: str, e2e_dir: Path) -> Iterator[Callable[..., Testpmd]]:
    """client(socket, forward_mode, queues=1, **kw) -> a launched virtio-user testpmd on core 0;
    all are quit (then terminated, then killed) at teardown."""
    started: list[Testpmd] = []

    def make(sock: str, forward_mode: str, queues: int = 1, **kw: Any) -> Testpmd:
        tp = Testpmd([VirtioUserVdev(sock, queues=queues)], forward_mode=forward_mode,
                     forward_lcores=(CLIENT_CORE,), main_lcore=DAEMON_CORE, memory_mb=MEMORY_MB,
                     rxq=queues, txq=queues, log_dir=e2e_dir, name="client", **kw)
        started.append(tp)
        tp.launch()
        return tp

    yield make
    for tp in reversed(started):
        tp.close()
        assert tp.proc is not None and tp.proc.poll() is not None
