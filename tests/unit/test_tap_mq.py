"""Multiqueue TAP (open_tap(queues=N)): one fd per queue pair, and the kernel steers each flow's
packets from the stack to the queue the flow last came in on, so a multiqueue guest's RX spreads
over its pairs without per-packet work in the daemon. Needs root, /dev/net/tun, namespaces."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from test_netdev import _REASON, HDR, OUR_MAC, ipv4_frame, udp_datagram

from vhostx import netdev

pytestmark = [pytest.mark.netns] + ([pytest.mark.skip(reason=_REASON)] if _REASON else [])

QUEUES = 4


@pytest.fixture
def ns() -> Iterator[netdev.Netns]:
    with netdev.Netns() as n:
        yield n


def _read_udp(fds: tuple[int, ...], port: int, timeout: float = 5.0) -> int:
    """Index of the fd on which a UDP frame to `port` arrives (other frames are dropped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(fds), [], [], left)
        for fd in ready:
            try:
                frame = os.read(fd, 65536)[len(HDR):]
            except BlockingIOError:
                continue
            if frame[12:14] == b"\x08\x00" and frame[23] == 17 and frame[36:38] == port.to_bytes(
                2, "big"
            ):
                return fds.index(fd)
    pytest.fail(f"no UDP reply to port {port} on any TAP queue within {timeout} s")


def test_multiqueue_tap_replies_come_back_on_the_queue_of_the_flow(ns: netdev.Netns) -> None:
    subnet = f"10.201.{os.getpid() % 200}"
    peer_ip, our_ip = f"{subnet}.1", f"{subnet}.2"
    with netdev.open_tap(None, netns=ns.name, address=f"{peer_ip}/24", queues=QUEUES) as tap:
        assert len(tap.fds) == QUEUES and tap.fds[0] == tap.fd
        ns.run(["ip", "neigh", "add", our_ip, "lladdr", OUR_MAC.hex(":"), "dev", tap.name])
        echo = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind((peer_ip, 9000))
        echo.settimeout(5)
        peer_mac = bytes.fromhex(
            ns.run(["cat", f"/sys/class/net/{tap.name}/address"]).stdout.strip().replace(":", "")
        )
        try:
            for _ in range(2):
                for q in reversed(range(QUEUES)):
                    sport = 40000 + q
                    frame = ipv4_frame(OUR_MAC, peer_mac, our_ip, peer_ip, 17,
                                       udp_datagram(our_ip, peer_ip, sport, 9000, b"ping"))
                    os.write(tap.fds[q], HDR + frame)
                    data, addr = echo.recvfrom(100)
                    assert data == b"ping"
                    echo.sendto(b"pong", addr)
                    assert _read_udp(tap.fds, sport) == q, f"reply of the flow sent on queue {q}"
        finally:
            echo.close()


def test_detached_queue_gets_no_flow_and_can_come_back() -> None:
    with netdev.open_tap(None, queues=2) as tap:
        fds = tap.fds
        tap.set_queue_enabled(1, False)
        tap.set_queue_enabled(1, False)  # idempotent
        assert tap.queue_fd(1) == tap.fd  # writers fall back to queue 0
        with pytest.raises(OSError) as err:  # the kernel agrees: queue 1 is detached already
            fcntl.ioctl(fds[1], netdev.TUNSETQUEUE, struct.pack("16sH22x", b"",
                                                                netdev.IFF_DETACH_QUEUE))
        assert err.value.errno == errno.EINVAL
        tap.set_queue_enabled(1, True)
        assert tap.queue_fd(1) == fds[1]
    for fd in fds:  # close() closed every queue
        with pytest.raises(OSError):
            os.fstat(fd)


def test_single_queue_tap_is_unchanged() -> None:
    with netdev.open_tap(None) as tap:
        assert tap.fds == (tap.fd,) and tap.queue_fd(0) == tap.fd
        with open(f"/sys/class/net/{tap.name}/tun_flags") as f:
            assert not int(f.read(), 16) & netdev.IFF_MULTI_QUEUE
