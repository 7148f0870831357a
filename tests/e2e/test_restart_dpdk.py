"""Restarts under testpmd traffic with DPDK virtio-user as the frontend.

- vhostx as the client (`client = true`), virtio-user listening (`server=1`): the daemon is killed
  (SIGKILL) and started again, then testpmd is quit and started again, while testpmd sends
  (txonly into a sink port). After each recovery traffic flows again, the device is not broken,
  and over a window after the recovery the packets testpmd sent equal those the daemon counted.
  DPDK sends SET_VRING_BASE 0 when it reconnects, with used->idx far ahead: the daemon resumes
  from used->idx (tests/unit/test_device_resume.py pins the rule).
- SIGTERM under traffic (vhostx listening, virtio-user the client): the daemon stops every ring
  cleanly: the final statistics it writes count every packet testpmd sent (nothing in flight is
  lost), and a new daemon takes over the same socket and the traffic.

The daemon runs pinned to core 1, testpmd forwards on core 0 (tests/e2e/conftest.py); the two
testpmd processes of a test have distinct file prefixes (bench.testpmd numbers them).

Threads: pytest's main thread only (testpmd's death signal is tied to the thread that starts it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.restart import wait_device_running
from bench.testpmd import Testpmd, VirtioUserVdev

pytestmark = [pytest.mark.dpdk, pytest.mark.timeout(170)]

CLIENT_CORE = 0
DAEMON_CORE = 1
MEMORY_MB = 256


def _queues(daemon: Any) -> dict[int, dict[str, int]]:
    dev = next(d for d in daemon.stats()["devices"] if d["name"] == "net0")
    assert dev["broken"] is None, dev["broken"]
    return {int(k): v for k, v in dev["queues"].items()}


def _settled_tx(daemon: Any) -> int:
    """The daemon's TX ring packet count once it stops moving."""
    last = _queues(daemon)[1]["packets"]
    for _ in range(50):
        time.sleep(0.1)
        now = _queues(daemon)[1]["packets"]
        if now == last:
            return int(now)
        last = now
    raise AssertionError(f"daemon TX counter still moving 5 s after testpmd stopped: {last}")


def _window_agrees(tp: Testpmd, daemon: Any, seconds: float = 1.5) -> int:
    """Forwarding stopped: snapshot both sides, send for `seconds`, stop, compare the deltas."""
    d0 = _settled_tx(daemon)
    t0 = tp.port_stats().ports[0].tx_packets
    tp.start_forwarding()
    time.sleep(seconds)
    tp.stop_forwarding()
    d1 = _settled_tx(daemon)
    t1 = tp.port_stats().ports[0].tx_packets
    assert t1 - t0 > 0, "testpmd sent nothing after the recovery"
    assert d1 - d0 == t1 - t0, f"daemon counted {d1 - d0}, testpmd sent {t1 - t0}"
    return t1 - t0


def _server_testpmd(sock: str, e2e_dir: Path) -> Testpmd:
    return Testpmd([VirtioUserVdev(sock, server=True)], forward_mode="txonly", txpkts=64,
                   forward_lcores=(CLIENT_CORE,), main_lcore=DAEMON_CORE, memory_mb=MEMORY_MB,
                   log_dir=e2e_dir, name="vuserver")


def test_client_mode_restarts_of_each_side_under_traffic(
    testpmd_ok: str, e2e_dir: Path, vhostx_daemon: Callable[..., Any]
) -> None:
    """Before the used->idx resync the restarted daemon broke the device at once: "avail idx
    44256 is 44256 ahead of last_avail_idx 0 (ring size 256)"."""
    sock = str(e2e_dir / "vu.sock")
    spec = f"name=net0,type=net,socket={sock},port=sink,client=true"
    daemon = vhostx_daemon([spec], cpus={DAEMON_CORE})
    tp = _server_testpmd(sock, e2e_dir)
    try:
        tp.launch()  # virtio-user accepts the daemon's connection during its probe
        wait_device_running(daemon, "net0", 30)
        _window_agrees(tp, daemon)
        for side in ("daemon", "testpmd", "daemon", "testpmd"):
            tp.start_forwarding()
            time.sleep(1.0)
            if side == "daemon":
                before = _queues(daemon)[1]["packets"]
                assert before > 0
                daemon.proc.kill()
                daemon.proc.wait()
                daemon = vhostx_daemon([spec], cpus={DAEMON_CORE})
                wait_device_running(daemon, "net0", 30)
                # traffic resumes (the rings were ahead of DPDK's SET_VRING_BASE 0)
                deadline = time.monotonic() + 10
                while _queues(daemon)[1]["packets"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert _queues(daemon)[1]["packets"] > 0, daemon.log_tail()
                assert "resuming from used->idx" in daemon.log_path.read_text()
                tp.stop_forwarding()
            else:
                tp.stop_forwarding()
                tp.close()
                tp = _server_testpmd(sock, e2e_dir)
                tp.launch()
                wait_device_running(daemon, "net0", 30)
            _window_agrees(tp, daemon)
    finally:
        tp.close()


def test_sigterm_under_traffic_stops_rings_cleanly_and_a_new_daemon_takes_over(
    client: Callable[..., Testpmd], e2e_dir: Path, vhostx_daemon: Callable[..., Any]
) -> None:
    sock = str(e2e_dir / "net0.sock")
    spec = f"name=net0,type=net,socket={sock},port=sink"
    daemon = vhostx_daemon([spec], cpus={DAEMON_CORE})
    tp = client(sock, "txonly", txpkts=64)
    tp.start_forwarding()
    time.sleep(1.5)
    final = daemon.stop()  # SIGTERM while testpmd sends
    assert daemon.returncode == 0, daemon.log_tail()
    assert final is not None
    dev = next(d for d in final["devices"] if d["name"] == "net0")
    served = dev["queues"]["1"]["packets"]
    assert served > 0 and dev["broken"] is None
    tp.stop_forwarding()
    sent = tp.port_stats().ports[0].tx_packets
    # what testpmd put into the ring after the daemon stopped serving it stays there (the ring
    # is full: testpmd's TX fails); what the daemon took, it counted, up to the last chain
    assert 0 < served <= sent
    log = daemon.log_path.read_text()
    assert "Traceback" not in log
    # a new daemon on the same socket: virtio-user reconnects as a client only when restarted,
    # so a new testpmd connects and sends
    tp.close()
    daemon2 = vhostx_daemon([spec], cpus={DAEMON_CORE})
    tp2 = client(sock, "txonly", txpkts=64)
    wait_device_running(daemon2, "net0", 30)
    _window_agrees(tp2, daemon2)
