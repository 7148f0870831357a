"""End-to-end tests against the real daemon with DPDK's virtio-user PMD (dpdk-testpmd) as the guest.

The daemon runs as a child process (tests/e2e/conftest.py `vhostx_daemon`) pinned to core 1; the
testpmd client forwards on core 0 with its main lcore on 1, so the two busy sides never share a
core. Packet counts are exact: the client's ethdev counters (`show port stats all`) against the
daemon's per-queue counters read over its control socket while the client is still connected
(the queues' counters leave the daemon's statistics when the frontend disconnects).
No throughput is asserted here; rates belong to the benchmark harness (docs/harness.md).

Threads: pytest's main thread only (testpmd's death signal is tied to the thread that starts it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench.testpmd import PortStats

__all__: list[str] = []

pytestmark = [pytest.mark.dpdk, pytest.mark.timeout(90)]

DAEMON_CORE = 1  # as in conftest.py: the client forwards on core 0


def _daemon_queues(stats: dict[str, Any], device: str = "net0") -> dict[int, dict[str, int]]:
    for dev in stats["devices"]:
        if dev["name"] == device:
            return {int(k): v for k, v in dev["queues"].items()}
    raise AssertionError(f"device {device} not in daemon stats: {[d['name'] for d in stats['devices']]}")


def _settled_queues(daemon: Any, device: str = "net0") -> dict[int, dict[str, int]]:
    """The daemon's queue counters once they stop moving (the client has stopped sending)."""
    last = _daemon_queues(daemon.stats(), device)
    for _ in range(50):
        time.sleep(0.1)
        now = _daemon_queues(daemon.stats(), device)
        if now == last:
            return now
        last = now
    raise AssertionError(f"daemon counters still moving 5 s after the client stopped: {last}")


def _device(e2e_dir: Path, port: str, **opts: object) -> tuple[str, str]:
    sock = str(e2e_dir / "net0.sock")
    extra = "".join(f",{k}={v}" for k, v in opts.items())
    return sock, f"name=net0,type=net,socket={sock},port={port}{extra}"


def _one(stats: dict[int, PortStats]) -> PortStats:
    assert list(stats) == [0]
    return stats[0]


def test_txonly_into_sink_counts_match(client: Any, vhostx_daemon: Any, e2e_dir: Path) -> None:
    sock, spec = _device(e2e_dir, "sink")
    daemon = vhostx_daemon([spec], cpus={DAEMON_CORE})
    tp = client(sock, "txonly", txpkts=64)
    tp.start_forwarding()
    time.sleep(2)
    tp.stop_forwarding()
    queues = _settled_queues(daemon)
    sent = _one(tp.port_stats().ports)
    assert sent.tx_packets > 0
    assert sent.tx_errors == 0
    assert queues[1]["packets"] == sent.tx_packets
    assert queues[1]["bytes"] == sent.tx_bytes == 64 * sent.tx_packets
    assert queues[1]["errors"] == 0
    assert queues.get(0, {}).get("packets", 0) == 0  # nothing was sent to the guest
    assert sent.rx_packets == 0


def test_rxonly_from_source_receives_frames_of_the_configured_size(
        client: Any, vhostx_daemon: Any, e2e_dir: Path) -> None:
    size = 100
    sock, spec = _device(e2e_dir, "source", frame_size=size)
    daemon = vhostx_daemon([spec], cpus={DAEMON_CORE})
    tp = client(sock, "rxonly")
    tp.start_forwarding()
    time.sleep(2)
    tp.stop_forwarding()
    queues = _settled_queues(daemon)
    got = _one(tp.port_stats().ports)
    assert got.rx_packets > 0
    assert got.rx_bytes == size * got.rx_packets
    assert got.rx_errors == 0
    xs = tp.xstats(0)
    assert xs["rx_q0_size_65_127_packets"] == got.rx_packets  # 100 B frames, nothing else
    # The daemon may have filled buffers the client has not polled yet (at most one ring).
    assert got.rx_packets <= queues[0]["packets"] <= got.rx_packets + 256


@pytest.mark.parametrize("in_order", ["on", "off"])
def test_echo_returns_every_packet(client: Any, vhostx_daemon: Any, e2e_dir: Path,
                                   in_order: str) -> None:
    """Both directions, with VIRTIO_F_IN_ORDER negotiated (virtio-user takes its in-order paths,
    which trust used->idx alone to free TX mbufs) and without."""
    sock, spec = _device(e2e_dir, "echo", in_order=in_order)
    daemon = vhostx_daemon([spec], cpus={DAEMON_CORE})
    tp = client(sock, "macswap", txpkts=64)
    dev = next(d for d in daemon.stats()["devices"] if d["name"] == "net0")
    assert bool(int(dev["features"], 16) >> 35 & 1) == (in_order == "on")
    # 4 bursts of 32 circulate: client -> daemon echo -> client macswap -> daemon ...
    tp.start_forwarding(tx_first=4)
    time.sleep(2)
    loop = tp.stop_forwarding()
    # Drain what the daemon echoed after the client stopped, without sending anything more.
    _settled_queues(daemon)
    tp.set_forward_mode("rxonly")
    tp.start_forwarding()
    time.sleep(0.5)
    tp.stop_forwarding()
    queues = _settled_queues(daemon)
    port = _one(tp.port_stats().ports)
    assert loop.ports[0].rx_packets > 128, "the packets did not circulate"
    dropped = queues[1]["packets"] - queues[0]["packets"]  # consumed from TX, not put into RX
    assert queues[1]["packets"] == port.tx_packets
    assert queues[0]["packets"] == port.rx_packets
    assert port.rx_packets == port.tx_packets - dropped
    assert dropped == queues[1].get("dropped", 0) + queues[0].get("dropped", 0)
    assert port.rx_bytes == 64 * port.rx_packets


def test_two_queue_pairs_into_sink_both_carry_traffic(
        client: Any, vhostx_daemon: Any, e2e_dir: Path) -> None:
    sock, spec = _device(e2e_dir, "sink", queues=2)
    daemon = vhostx_daemon([spec], cpus={DAEMON_CORE})
    tp = client(sock, "txonly", queues=2, txpkts=64)
    tp.start_forwarding()
    time.sleep(2)
    fwd = tp.stop_forwarding()
    queues = _settled_queues(daemon)
    sent = _one(tp.port_stats().ports)
    per_stream = {s.tx_queue: s.tx_packets for s in fwd.streams}
    assert sorted(per_stream) == [0, 1]
    assert all(n > 0 for n in per_stream.values()), per_stream
    assert queues[1]["packets"] > 0 and queues[3]["packets"] > 0
    assert queues[1]["packets"] + queues[3]["packets"] == sent.tx_packets
    xs = tp.xstats(0)
    assert xs["tx_q0_good_packets"] == queues[1]["packets"]
    assert xs["tx_q1_good_packets"] == queues[3]["packets"]
