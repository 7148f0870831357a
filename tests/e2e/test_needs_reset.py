"""A device broken by a hostile guest says so and recovers, without restarting the daemon.

The guest model (virtio.frontend) writes a descriptor pointing far outside guest memory on the TX
ring of one device. That device then reports NEEDS_RESET (virtio status 0x40) in GET_STATUS, in
`vhostx stats` (`needs_reset`), in the metrics (`vhostx_device_needs_reset`) and in `vhostx
devices`; the other device keeps working. A frontend that resets the device (RESET_DEVICE, SET_STATUS
0 as QEMU 7.2 does when it stops the rings, or a reconnect) gets a working device again.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.process import DaemonProcess
from virtio import features as vf
from virtio.frontend import DEFAULT_PROTOCOL_FEATURES, NetDriver, VhostUserFrontend
from virtio.vhost_user import ProtocolFeature as PF
from virtio.vhost_user import Request, VringState

NEEDS_RESET = 0x40
MAC_A = bytes.fromhex("525400aa0001")
MAC_B = bytes.fromhex("525400bb0002")
REPO = Path(__file__).resolve().parents[2]


def _frame(n: int) -> bytes:
    return MAC_B + MAC_A + b"\x88\xb5" + struct.pack("!I", n) + bytes(82)


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _dev(d: DaemonProcess, name: str) -> dict[str, Any]:
    return next(x for x in d.stats()["devices"] if x["name"] == name)


def _tx_packets(d: DaemonProcess, name: str) -> int:
    return int(_dev(d, name)["queues"].get("1", {}).get("packets", 0))


def _break(fe: VhostUserFrontend) -> None:
    """Post a TX chain whose buffer lies far outside guest memory and kick."""
    txq = fe.queues[1]
    txq.write_desc(0, addr=1 << 40, length=64, flags=0, next_=0)
    txq.push_avail(0)
    txq.publish()
    fe.kick(1)


def _fresh_rings(fe: VhostUserFrontend) -> NetDriver:
    """What a driver does after a reset: new rings in its memory, set up from index 0."""
    for fd in fe.kick_fds + fe.call_fds:
        os.close(fd)
    fe.queues.clear()
    fe.kick_fds.clear()
    fe.call_fds.clear()
    fe._start_rings()
    return NetDriver(fe)


def _works(d: DaemonProcess, fe: VhostUserFrontend, name: str) -> None:
    before = _tx_packets(d, name)
    NetDriver(fe).send([_frame(i) for i in range(8)])
    assert _wait(lambda: _tx_packets(d, name) == before + 8), _dev(d, name)


def _cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhostx", *args, "--control", d.control],
        check=False, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> Iterator[DaemonProcess]:
    d = daemon_factory(metrics="127.0.0.1:0")
    d.add_device("bad", port="sink")
    d.add_device("good", port="sink")
    d.start()
    yield d


def _connect(d: DaemonProcess, name: str) -> VhostUserFrontend:
    pf = DEFAULT_PROTOCOL_FEATURES | (1 << PF.RESET_DEVICE)
    return VhostUserFrontend(d.sock(name), protocol_features=pf)


def _broken(d: DaemonProcess, fe: VhostUserFrontend) -> None:
    _break(fe)
    assert _wait(lambda: _dev(d, "bad")["needs_reset"]), _dev(d, "bad")


def test_hostile_descriptor_reports_needs_reset_everywhere(daemon: DaemonProcess) -> None:
    d = daemon
    with _connect(d, "bad") as evil, _connect(d, "good") as fine:
        assert not _dev(d, "bad")["needs_reset"]
        _broken(d, evil)
        dev = _dev(d, "bad")
        assert dev["broken"].startswith("bad.tx0: "), dev["broken"]
        assert dev["status"] & NEEDS_RESET
        assert evil.call(Request.GET_STATUS) & NEEDS_RESET  # what the frontend reads
        assert not _dev(d, "good")["needs_reset"]
        _works(d, fine, "good")  # the other device is untouched
        assert d.metrics_url is not None
        with urllib.request.urlopen(d.metrics_url, timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'vhostx_device_needs_reset{device="bad"} 1' in metrics, metrics
        assert 'vhostx_device_needs_reset{device="good"} 0' in metrics, metrics
        listing = _cli(d, "devices", "--json")
        assert listing.returncode == 0, listing.stderr
        rows = {r["name"]: r for r in json.loads(listing.stdout)}
        assert rows["bad"]["state"] == "NEEDS_RESET" and rows["bad"]["needs_reset"]
        assert rows["bad"]["reason"] == dev["broken"]
        assert rows["good"]["state"] == "ok" and rows["good"]["connected"]
        table = _cli(d, "devices")
        assert table.returncode == 0 and "NEEDS_RESET" in table.stdout, table.stdout
        assert _cli(d, "devices", "--check").returncode == 1
        # a driver writing its status back cannot clear the device's bit
        evil.call(Request.SET_STATUS, evil.call(Request.GET_STATUS) & ~NEEDS_RESET)
        assert evil.call(Request.GET_STATUS) & NEEDS_RESET
    assert d.alive()


def test_reset_device_gives_a_working_device(daemon: DaemonProcess) -> None:
    d = daemon
    with _connect(d, "bad") as fe:
        assert fe.has_pf(PF.RESET_DEVICE)
        _broken(d, fe)
        fe.call(Request.RESET_DEVICE)
        assert not _dev(d, "bad")["needs_reset"]
        assert fe.call(Request.GET_STATUS) == 0
        fe.call(Request.SET_FEATURES, fe.features)  # the device forgot them
        net = _fresh_rings(fe)
        net.send([_frame(i) for i in range(8)])
        assert _wait(lambda: _tx_packets(d, "bad") == 8), _dev(d, "bad")
        assert not fe.call(Request.GET_STATUS) & NEEDS_RESET
        assert _cli(d, "devices", "--check").returncode == 0
    assert d.alive()


def test_set_status_zero_gives_a_working_device(daemon: DaemonProcess) -> None:
    """QEMU 7.2 stops a device with SET_STATUS 0 and a GET_VRING_BASE per ring, then sets it up
    again: after that the broken device works; the rings do not restart on their own before."""
    d = daemon
    with _connect(d, "bad") as fe:
        _broken(d, fe)
        fe.call(Request.SET_STATUS, 0)
        assert not _dev(d, "bad")["needs_reset"]
        time.sleep(0.3)  # the hostile chain is still in the ring: nothing may serve it now
        assert not _dev(d, "bad")["needs_reset"] and not _dev(d, "bad")["queues"]
        for i in range(len(fe.queues)):
            fe.call(Request.GET_VRING_BASE, VringState(i, 0))
        fe.call(Request.SET_FEATURES, fe.features)  # QEMU repeats it at every start
        net = _fresh_rings(fe)
        net.send([_frame(i) for i in range(8)])
        assert _wait(lambda: _tx_packets(d, "bad") == 8), _dev(d, "bad")
        assert _dev(d, "bad")["counters"]["guest_errors"] == 1
    assert d.alive()


def test_reconnect_gives_a_working_device(daemon: DaemonProcess) -> None:
    d = daemon
    fe = _connect(d, "bad")
    fe.connect()
    _broken(d, fe)
    fe.close(graceful=False)
    assert _wait(lambda: not _dev(d, "bad")["needs_reset"])
    with _connect(d, "bad") as again:
        assert not again.call(Request.GET_STATUS) & NEEDS_RESET
        assert again.has_feature(vf.VIRTIO_F_VERSION_1)
        _works(d, again, "bad")
    assert _dev(d, "bad")["counters"]["connections"] == 2
    assert d.alive()
