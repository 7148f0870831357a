"""SIGTERM under traffic: every ring stops where its used index says, and a new daemon takes over.

The driver side of `virtio` plays the guest over the real socket (QEMU 7.2 order) and keeps the
TX ring of a sink device busy while the daemon gets SIGTERM. A frontend that loses its backend
without an answer to GET_VRING_BASE resumes from the used index in guest memory (QEMU 7.2
vhost_virtqueue_stop), so the daemon must have published a used entry for every chain it took:
the used index after the exit equals the chains the daemon's final statistics count. Before the
fix the final statistics were read while the workers still ran, so they could count fewer chains
than the ring showed used. A new daemon then listens on the same socket and serves a new frontend.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.restart import wait_device_running
from virtio.frontend import NetDriver, VhostUserFrontend

FRAME = bytes(range(64))


def test_sigterm_final_stats_match_the_used_index_in_guest_memory(
    e2e_dir: Path, vhostx_daemon: Callable[..., Any]
) -> None:
    sock = str(e2e_dir / "net0.sock")
    spec = f"name=net0,type=net,socket={sock},port=sink"
    daemon = vhostx_daemon([spec])
    fe = VhostUserFrontend(sock)
    fe.connect()
    try:
        net = NetDriver(fe)
        txq = fe.queues[1]
        wait_device_running(daemon, "net0", 10)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            net.send([FRAME] * 32, timeout=0.05)
        assert txq.read_used_idx() > 0, "the daemon served nothing"
        daemon.proc.send_signal(signal.SIGTERM)
        while daemon.alive():  # traffic goes on until the daemon is gone
            net.send([FRAME] * 32, timeout=0.01)
        final = daemon.stop()
        assert daemon.returncode == 0, daemon.log_tail()
        assert final is not None
        dev = next(d for d in final["devices"] if d["name"] == "net0")
        q = dev["queues"]["1"]
        used = txq.read_used_idx()
        assert q["chains"] == q["packets"], q
        assert q["chains"] & 0xFFFF == used, (q, used)  # ring indexes are 16 bits
        assert (txq.avail_idx - used) & 0xFFFF <= txq.size  # nothing used that was not offered
    finally:
        fe.close(graceful=False)
    # the same socket, a new daemon, a new frontend
    daemon2 = vhostx_daemon([spec])
    with VhostUserFrontend(sock) as fe2:
        net2 = NetDriver(fe2)
        assert net2.send([FRAME] * 100, timeout=5) == 100
        deadline = time.monotonic() + 5
        while fe2.queues[1].read_used_idx() < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fe2.queues[1].read_used_idx() == 100
        assert wait_device_running(daemon2, "net0", 5)
