"""vhostx.netdev against the real kernel: TAP fds, namespaces, bridges.

Every test here needs root, /dev/net/tun and network namespaces (marker ``netns``); they are
skipped with the reason when those are not available. Names include the pid, so parallel runs
do not collide, and every test checks that teardown leaves nothing behind where it matters.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from vhostx import netdev
from virtio.errors import ConfigError

pytestmark: list[pytest.MarkDecorator] = [pytest.mark.netns]

HDR = bytes(12)  # virtio-net header, VERSION_1 layout, no offloads
OUR_MAC = bytes.fromhex("020000c0ffee")
BROADCAST = b"\xff" * 6


def _netns_unavailable() -> str | None:
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    if os.geteuid() != 0:
        return "needs root (TUN devices and network namespaces)"
    name = f"vxprobe{os.getpid()}"
    try:
        with netdev.Netns(name):
            pass
    except Exception as e:  # noqa: BLE001 - any failure means: no namespaces here
        return f"cannot create a network namespace: {e}"
    return None


_REASON = _netns_unavailable()
if _REASON:
    pytestmark = [pytest.mark.netns, pytest.mark.skip(reason=_REASON)]


# ------------------------------------------------------------------------------- frames


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def arp_frame(op: int, src_mac: bytes, src_ip: str, dst_mac: bytes, dst_ip: str) -> bytes:
    eth = (BROADCAST if op == 1 else dst_mac) + src_mac + b"\x08\x06"
    arp = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        op,
        src_mac,
        socket.inet_aton(src_ip),
        dst_mac if op == 2 else bytes(6),
        socket.inet_aton(dst_ip),
    )
    return eth + arp


def ipv4_frame(
    src_mac: bytes, dst_mac: bytes, src: str, dst: str, proto: int, payload: bytes
) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0x1234,
        0x4000,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return dst_mac + src_mac + b"\x08\x00" + hdr + payload


def icmp_echo(ident: int, seq: int, data: bytes) -> bytes:
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    return msg[:2] + struct.pack("!H", _csum(msg)) + msg[4:]


def udp_datagram(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, len(udp))
    c = _csum(pseudo + udp) or 0xFFFF
    return udp[:6] + struct.pack("!H", c) + udp[8:]


class Peer:
    """Plays the guest on the other side of a TAP fd: answers ARP for its address."""

    def __init__(self, tap: netdev.Tap, my_ip: str) -> None:
        self.tap = tap
        self.my_ip = my_ip

    def send(self, frame: bytes) -> None:
        os.write(self.tap.fd, HDR + frame)

    def recv_until(self, want, timeout: float = 5.0) -> bytes:  # type: ignore[no-untyped-def]
        """Read frames (dropping the 12-byte header) until ``want(frame)``; answer ARP requests
        for ``my_ip`` on the way. Fails the test on timeout."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no expected frame within {timeout} s; saw: {seen}")
            r, _, _ = select.select([self.tap.fd], [], [], left)
            if not r:
                continue
            try:
                data = os.read(self.tap.fd, 65536)
            except BlockingIOError:
                continue
            assert len(data) >= 12 + 14, f"short read {len(data)}"
            frame = data[12:]
            seen.append(frame[12:14].hex() + ":" + str(len(frame)))
            if want(frame):
                return frame
            if (
                frame[12:14] == b"\x08\x06"
                and struct.unpack("!H", frame[20:22])[0] == 1
                and frame[38:42] == socket.inet_aton(self.my_ip)
            ):
                sender_mac, sender_ip = frame[22:28], socket.inet_ntoa(frame[28:32])
                self.send(arp_frame(2, OUR_MAC, self.my_ip, sender_mac, sender_ip))


def _is_arp_reply_from(ip: str):  # type: ignore[no-untyped-def]
    def want(frame: bytes) -> bool:
        return (
            frame[12:14] == b"\x08\x06"
            and struct.unpack("!H", frame[20:22])[0] == 2
            and frame[28:32] == socket.inet_aton(ip)
        )

    return want


def _host_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


_subnet = iter(range(100, 250))


@pytest.fixture
def subnet() -> str:
    """A /24 prefix "10.200.N" unique within this test run."""
    return f"10.200.{next(_subnet)}"


@pytest.fixture
def ns() -> Iterator[netdev.Netns]:
    with netdev.Netns() as n:
        yield n
    assert not os.path.exists(n.path), f"namespace {n.name} left behind"


# ------------------------------------------------------------------------------- tests


def test_tap_in_netns_answers_arp(ns: netdev.Netns, subnet: str) -> None:
    name = netdev.unique_name("vxt")
    with netdev.open_tap(name, netns=ns.name, address=f"{subnet}.1/24") as tap:
        assert tap.name == name and tap.netns == ns.name
        assert name not in _host_links(), "tap should have moved out of the host namespace"
        assert name in ns.links()
        peer = Peer(tap, f"{subnet}.2")
        peer.send(arp_frame(1, OUR_MAC, f"{subnet}.2", bytes(6), f"{subnet}.1"))
        reply = peer.recv_until(_is_arp_reply_from(f"{subnet}.1"))
        assert reply[:6] == OUR_MAC
        assert reply[32:38] == OUR_MAC and reply[38:42] == socket.inet_aton(f"{subnet}.2")
    assert name not in ns.links(), "closing the fd must delete the interface"


def test_tap_icmp_echo_reply(ns: netdev.Netns, subnet: str) -> None:
    with netdev.open_tap(None, netns=ns.name, address=f"{subnet}.1/24") as tap:
        assert tap.name.startswith("tap")
        peer = Peer(tap, f"{subnet}.2")
        # learn the kernel's MAC first
        peer.send(arp_frame(1, OUR_MAC, f"{subnet}.2", bytes(6), f"{subnet}.1"))
        their_mac = peer.recv_until(_is_arp_reply_from(f"{subnet}.1"))[6:12]
        payload = os.urandom(56)
        peer.send(
            ipv4_frame(
                OUR_MAC, their_mac, f"{subnet}.2", f"{subnet}.1", 1, icmp_echo(0x77, 1, payload)
            )
        )

        def echo_reply(frame: bytes) -> bool:
            return (
                frame[12:14] == b"\x08\x00"
                and frame[23] == 1
                and frame[34] == 0
                and frame[38:40] == b"\x00\x77"
            )

        reply = peer.recv_until(echo_reply)
        assert reply[26:30] == socket.inet_aton(f"{subnet}.1")
        assert reply[30:34] == socket.inet_aton(f"{subnet}.2")
        assert reply[42 : 42 + 56] == payload
        assert _csum(reply[34:]) == 0, "ICMP checksum of the reply"


def test_udp_into_socket_opened_by_netns_call(ns: netdev.Netns, subnet: str) -> None:
    with netdev.open_tap(None, netns=ns.name, address=f"{subnet}.1/24") as tap:
        sock = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.bind((f"{subnet}.1", 0))  # only possible because the socket lives in ns
            port = sock.getsockname()[1]
            sock.settimeout(5)
            peer = Peer(tap, f"{subnet}.2")
            peer.send(arp_frame(1, OUR_MAC, f"{subnet}.2", bytes(6), f"{subnet}.1"))
            their_mac = peer.recv_until(_is_arp_reply_from(f"{subnet}.1"))[6:12]
            data = b"hello through the tap " + os.urandom(8)
            peer.send(
                ipv4_frame(
                    OUR_MAC,
                    their_mac,
                    f"{subnet}.2",
                    f"{subnet}.1",
                    17,
                    udp_datagram(f"{subnet}.2", f"{subnet}.1", 4242, port, data),
                )
            )
            got, src = sock.recvfrom(2048)
            assert got == data and src == (f"{subnet}.2", 4242)


def test_bridge_in_netns_carries_arp(ns: netdev.Netns, subnet: str) -> None:
    br_name = netdev.unique_name("vxb")
    with netdev.Bridge(br_name, netns=ns.name, address=f"{subnet}.1/24") as br:
        with netdev.open_tap(None, netns=ns.name) as tap:
            br.add_port(tap.name)
            peer = Peer(tap, f"{subnet}.2")
            deadline = time.monotonic() + 10
            # the bridge port goes through listening/learning unless STP is off (default: off)
            peer.send(arp_frame(1, OUR_MAC, f"{subnet}.2", bytes(6), f"{subnet}.1"))
            peer.recv_until(
                _is_arp_reply_from(f"{subnet}.1"), timeout=max(1.0, deadline - time.monotonic())
            )
        assert br_name in ns.links()
    assert br_name not in ns.links()


def test_open_tap_creates_missing_netns_and_removes_it(subnet: str) -> None:
    name = netdev.unique_name("vxns")
    assert not netdev.netns_exists(name)
    tap = netdev.open_tap(None, netns=name, address=f"{subnet}.1/24")
    try:
        assert netdev.netns_exists(name)
        out = subprocess.run(
            ["ip", "netns", "exec", name, "ip", "-o", "addr", "show", tap.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"{subnet}.1/24" in out
    finally:
        tap.close()
    assert not netdev.netns_exists(name)
    assert (
        name
        not in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
    )
    tap.close()  # idempotent


def test_host_tap_teardown_leaves_nothing() -> None:
    before = _host_links()
    tap = netdev.open_tap(None)
    assert tap.name in _host_links() and tap.netns is None
    with open(f"/sys/class/net/{tap.name}/flags") as f:
        flags = int(f.read(), 16)
    assert flags & 0x1, "interface should be administratively up"
    tap.close()
    assert _host_links() == before


def test_netns_run_and_popen_are_inside(ns: netdev.Netns) -> None:
    out = ns.run(["ip", "-o", "link", "show"]).stdout
    assert "lo:" in out and "LOOPBACK,UP" in out, out
    assert "tap" not in out, "a fresh namespace holds only lo"
    proc = ns.popen(["sleep", "60"])
    assert proc.poll() is None
    ns.delete()
    assert proc.returncode is not None, "delete() must kill processes started with popen"
    assert not os.path.exists(ns.path)


def test_offloads_and_header_length() -> None:
    with netdev.open_tap(None, offloads=netdev.Offload.CSUM | netdev.Offload.TSO4) as tap:
        assert tap.offloads == netdev.Offload.CSUM | netdev.Offload.TSO4
        tap.set_vnet_hdr_len(10)
        tap.set_offloads(0)
        assert tap.vnet_hdr_len == 10 and tap.offloads == 0
        with pytest.raises(ConfigError, match="TSO/UFO need CSUM"):
            tap.set_offloads(netdev.Offload.TSO4)
        with pytest.raises(ConfigError, match="vnet_hdr_len=11"):
            tap.set_vnet_hdr_len(11)


def test_bad_arguments_raise_config_error() -> None:
    before = _host_links()
    with pytest.raises(ConfigError, match="address='10.0.0.1'"):
        netdev.open_tap(None, address="10.0.0.1")
    with pytest.raises(ConfigError, match="1-15 characters"):
        netdev.open_tap("a-very-long-interface-name")
    with pytest.raises(ConfigError, match="netns='a/b'"):
        netdev.open_tap(None, netns="a/b")
    assert _host_links() == before


def test_name_clash_is_a_config_error(ns: netdev.Netns) -> None:
    name = netdev.unique_name("vxt")
    with (
        netdev.open_tap(name),
        pytest.raises(ConfigError, match=f"tap {name}: TUNSETIFF failed: EBUSY"),
    ):
        netdev.open_tap(name)
    # the name is free again in the host namespace; moving a second one into ns clashes
    with (
        netdev.open_tap(name, netns=ns.name),
        pytest.raises(ConfigError, match=f"cannot move it into netns {ns.name!r}"),
    ):
        netdev.open_tap(name, netns=ns.name)
    assert name not in _host_links()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_open_tap_inside_running_event_loop(loop: str, subnet: str) -> None:
    """pyroute2 0.9's sync API fails with "this event loop is already running" when called on a
    thread that runs a loop, which is exactly the daemon's main thread at device setup."""
    ns_name = netdev.unique_name("vxns")

    async def setup() -> tuple[str, list[str], str]:
        with netdev.open_tap(None, netns=ns_name, address=f"{subnet}.1/24") as tap:
            links = netdev.Netns(ns_name).links()
            br = netdev.Bridge(netdev.unique_name("vxb"), netns=ns_name)
            br.add_port(tap.name)
            br.close()
            return tap.name, links, br.name

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        name, links, br_name = uvloop.run(setup())
    else:
        name, links, br_name = asyncio.run(setup())
    assert name in links and br_name not in links
    assert not netdev.netns_exists(ns_name)
