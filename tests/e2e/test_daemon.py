"""The real daemon over real sockets and memfd memory, driven by the Python frontend (a guest
model): every port, the stats it reports, and hostile frontends that must only lose their own
connection or break their own device."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

import pytest

from bench.process import DaemonFailed, DaemonProcess
from virtio.errors import VhostError
from virtio.frontend import NetDriver, VhostUserFrontend
from virtio.vhost_user import FrontendConnection, Request

MAC_A = bytes.fromhex("525400aa0001")
MAC_B = bytes.fromhex("525400bb0002")


def frame(dst: bytes, src: bytes, n: int, size: int = 100) -> bytes:
    body = struct.pack("!I", n) + bytes(size - 18)
    return dst + src + b"\x88\xb5" + body


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def queue_packets(d: DaemonProcess, dev: str, q: str) -> int:
    for dv in d.stats()["devices"]:
        if dv["name"] == dev:
            return int(dv["queues"].get(q, {}).get("packets", 0))
    raise KeyError(dev)


def device(d: DaemonProcess, dev: str) -> dict:
    return next(x for x in d.stats()["devices"] if x["name"] == dev)


@pytest.mark.parametrize("style", ["qemu", "dpdk"])
def test_sink_counts_every_packet(daemon_factory, style: str) -> None:
    d = daemon_factory()
    sock = d.add_device("net0", port="sink")
    d.start()
    with VhostUserFrontend(sock, style=style) as fe:
        net = NetDriver(fe)
        frames = [frame(MAC_B, MAC_A, i) for i in range(1000)]
        assert net.send(frames, timeout=5) == 1000
        assert wait_until(lambda: queue_packets(d, "net0", "1") == 1000)
        st = device(d, "net0")
        assert st["queues"]["1"]["bytes"] == 1000 * 100
        assert st["broken"] is None


def test_echo_returns_frames_with_macs_swapped(daemon_factory) -> None:
    d = daemon_factory()
    sock = d.add_device("net0", port="echo")
    d.start()
    with VhostUserFrontend(sock) as fe:
        net = NetDriver(fe)
        sent = [frame(MAC_B, MAC_A, i) for i in range(50)]
        net.send(sent)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 50 and time.monotonic() < deadline:
            got += net.recv(timeout=0.5)
        assert got == [f[6:12] + f[0:6] + f[12:] for f in sent]


def test_source_fills_rx_with_generated_frames(daemon_factory) -> None:
    d = daemon_factory()
    sock = d.add_device("net0", port="source", frame_size=128)
    d.start()
    with VhostUserFrontend(sock) as fe:
        net = NetDriver(fe)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 300 and time.monotonic() < deadline:
            got += net.recv(timeout=0.5)
        assert len(got) >= 300
        assert all(len(f) == 128 for f in got)
        assert got[0][12:14] == b"\x08\x00"  # IPv4


def test_switch_between_two_guests_learns_and_delivers(daemon_factory) -> None:
    d = daemon_factory()
    sa = d.add_device("a", port="switch")
    sb = d.add_device("b", port="switch")
    d.start()
    with VhostUserFrontend(sa) as fa, VhostUserFrontend(sb) as fb:
        na, nb = NetDriver(fa), NetDriver(fb)
        # Unknown destination: flooded to b. b answers: a's MAC was learned, so unicast back.
        na.send([frame(MAC_B, MAC_A, 1)])
        got_b: list[bytes] = []
        assert wait_until(lambda: bool(got_b.extend(nb.recv(timeout=0.2)) or got_b), 10)
        assert got_b[0][:6] == MAC_B and got_b[0][6:12] == MAC_A
        nb.send([frame(MAC_A, MAC_B, i) for i in range(20)])
        got_a: list[bytes] = []
        assert wait_until(lambda: bool(got_a.extend(na.recv(timeout=0.2)) or len(got_a) >= 20), 10)
        assert [struct.unpack("!I", f[14:18])[0] for f in got_a] == list(range(20))


def test_unknown_request_closes_only_that_connection(daemon_factory) -> None:
    d = daemon_factory()
    s0 = d.add_device("net0", port="sink")
    s1 = d.add_device("net1", port="sink")
    d.start()
    with VhostUserFrontend(s1) as good:
        net = NetDriver(good)
        for bad in (
            struct.pack("=III", 1000, 1, 0),  # unknown request id
            struct.pack("=III", 1, 2, 0),  # version bits 2
            struct.pack("=III", 8, 1, 3) + b"abc",  # SET_VRING_NUM with 3 payload bytes
            struct.pack("=III", 5, 1, 1 << 30),  # absurd size
        ):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(s0)
            s.sendall(bad)
            assert s.recv(100) == b"", f"connection not closed after {bad!r}"
            s.close()
        assert d.alive()
        net.send([frame(MAC_B, MAC_A, 0)])
        assert wait_until(lambda: queue_packets(d, "net1", "1") == 1)
    # net0 accepts a well-behaved frontend after all that.
    with VhostUserFrontend(s0) as fe:
        NetDriver(fe).send([frame(MAC_B, MAC_A, 0)])
        assert wait_until(lambda: queue_packets(d, "net0", "1") == 1)
    stats = device(d, "net0")
    assert stats["counters"]["protocol_errors"] >= 3


def test_fds_on_a_request_that_takes_none_close_the_connection(daemon_factory) -> None:
    d = daemon_factory()
    s0 = d.add_device("net0")
    d.start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(s0)
    r, w = os.pipe()
    socket.send_fds(s, [FrontendConnection().request(Request.GET_FEATURES)], [r])
    os.close(r)
    os.close(w)
    assert s.recv(100) == b""
    s.close()
    assert d.alive()


def test_feature_never_offered_closes_connection(daemon_factory) -> None:
    d = daemon_factory()
    s0 = d.add_device("net0")
    d.start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(s0)
    conn = FrontendConnection()
    s.sendall(conn.request(Request.SET_FEATURES, 1 << 34))  # RING_PACKED: not offered
    assert s.recv(100) == b""
    assert d.alive()


def test_hostile_descriptor_breaks_only_that_device(daemon_factory) -> None:
    d = daemon_factory()
    s0 = d.add_device("bad", port="sink")
    s1 = d.add_device("good", port="sink")
    d.start()
    with VhostUserFrontend(s0) as evil, VhostUserFrontend(s1) as fine:
        txq = evil.queues[1]
        # A descriptor pointing far outside guest memory, then a chain that loops on itself.
        txq.write_desc(0, addr=1 << 40, length=64, flags=0, next_=0)
        txq.push_avail(0)
        txq.publish()
        evil.kick(1)
        assert wait_until(lambda: device(d, "bad")["broken"] is not None)
        assert "bad" in device(d, "bad")["broken"] or device(d, "bad")["broken"]
        assert device(d, "bad")["status"] & 0x40 or not evil.has_pf(16)
        net = NetDriver(fine)
        net.send([frame(MAC_B, MAC_A, i) for i in range(10)])
        assert wait_until(lambda: queue_packets(d, "good", "1") == 10)
        assert d.alive()


def test_second_frontend_is_refused_while_one_is_connected(daemon_factory) -> None:
    d = daemon_factory()
    s0 = d.add_device("net0")
    d.start()
    with VhostUserFrontend(s0) as fe:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(s0)
        assert s.recv(10) == b""
        s.close()
        NetDriver(fe).send([frame(MAC_B, MAC_A, 0)])
        assert wait_until(lambda: queue_packets(d, "net0", "1") == 1)


def test_reconnect_resumes_service(daemon_factory) -> None:
    d = daemon_factory()
    s0 = d.add_device("net0")
    d.start()
    for round_ in range(3):
        with VhostUserFrontend(s0) as fe:
            NetDriver(fe).send([frame(MAC_B, MAC_A, i) for i in range(5)])
            assert wait_until(lambda: queue_packets(d, "net0", "1") == 5), f"round {round_}"
        assert wait_until(lambda: "1" not in device(d, "net0")["queues"])


def test_sigterm_stops_cleanly_and_writes_stats(daemon_factory) -> None:
    d = daemon_factory()
    s0 = d.add_device("net0")
    d.start()
    with VhostUserFrontend(s0) as fe:
        NetDriver(fe).send([frame(MAC_B, MAC_A, i) for i in range(7)])
        assert wait_until(lambda: queue_packets(d, "net0", "1") == 7)
        final = d.stop()
    assert d.returncode == 0
    assert final is not None and final["devices"][0]["name"] == "net0"
    assert not os.path.exists(s0)


def test_multiqueue_pairs_both_carry_traffic(daemon_factory) -> None:
    d = daemon_factory()
    s0 = d.add_device("net0", port="sink", queues=2)
    d.start()
    with VhostUserFrontend(s0, queues=4) as fe:
        net = NetDriver(fe)
        net.send([frame(MAC_B, MAC_A, i) for i in range(10)], pair=0)
        net.send([frame(MAC_B, MAC_A, i) for i in range(20)], pair=1)
        assert wait_until(lambda: queue_packets(d, "net0", "1") == 10)
        assert wait_until(lambda: queue_packets(d, "net0", "3") == 20)


def test_net_device_offers_no_config_and_refuses_get_config(daemon_factory) -> None:
    """PROTOCOL_F_CONFIG is not offered to net frontends (QEMU 7.2 masks it with a warning on
    every start, DPDK does not know it): GET_CONFIG without it closes that connection only."""
    d = daemon_factory()
    s0 = d.add_device("net0", queues=2, mac="52:54:00:12:34:56", mtu=9000)
    d.start()
    from virtio.frontend import DEFAULT_PROTOCOL_FEATURES
    from virtio.vhost_user import Config

    with VhostUserFrontend(s0, queues=4, protocol_features=DEFAULT_PROTOCOL_FEATURES | 1 << 9) as fe:
        assert not fe.offered_protocol_features & (1 << 9)
        assert not fe.has_pf(9)
        with pytest.raises(VhostError):
            fe.call(Request.GET_CONFIG, Config(0, 12, 0, bytes(12)))
    assert d.alive()


def test_client_mode_dials_the_frontend_and_redials_after_disconnect(daemon_factory, tmp_path) -> None:
    path = str(tmp_path / "fe.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        d = daemon_factory()
        d.devices.append(f"name=net0,type=net,socket={path},port=sink,client=true")
        d.start()
        for round_ in range(2):
            fe = VhostUserFrontend(path)
            fe.accept(listener)
            try:
                NetDriver(fe).send([frame(MAC_B, MAC_A, i) for i in range(6)])
                assert wait_until(lambda: queue_packets(d, "net0", "1") == 6), f"round {round_}"
            finally:
                fe.close()
    finally:
        listener.close()


def test_parameters_precedence_and_live_change(daemon_factory, tmp_path) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text("[params]\nturn_max_packets = 16\nturn_max_bytes = \"256KiB\"\n")
    # baseline: one C batch per turn, so a turn's budget shows in budget_exhausted
    d = daemon_factory(config=str(cfg), params=["mode=baseline", "turn_max_packets=32"])
    s0 = d.add_device("net0")
    d.start()
    got = d.request({"cmd": "param_get", "name": "turn_max_packets"})
    assert (got["value"], got["source"]) == (32, "cmdline")  # the command line beats the file
    got = d.request({"cmd": "param_get", "name": "turn_max_bytes"})
    assert (got["value"], got["source"]) == (256 * 1024, "config")
    bad = d.request({"cmd": "param_set", "name": "turn_max_packets", "value": "0"})
    assert not bad["ok"] and "turn_max_packets" in bad["error"] and "allowed" in bad["error"]
    bad = d.request({"cmd": "param_set", "name": "mode", "value": "shared"})
    assert not bad["ok"] and "run time" in bad["error"]
    bad = d.request({"cmd": "param_set", "name": "turn_max_packets", "value": "1",
                     "device": "net9"})
    assert not bad["ok"] and "unknown device 'net9'" in bad["error"]
    # A live change of net0's own value is visible in behaviour: with one packet per turn every
    # busy turn exhausts; the global value stays.
    got = d.request({"cmd": "param_set", "name": "turn_max_packets", "value": "1",
                     "device": "net0"})
    assert got["ok"] and (got["value"], got["own"]) == (1, True), got
    assert d.request({"cmd": "param_get", "name": "turn_max_packets"})["value"] == 32
    with VhostUserFrontend(s0) as fe:
        NetDriver(fe).send([frame(MAC_B, MAC_A, i) for i in range(40)])
        assert wait_until(lambda: queue_packets(d, "net0", "1") == 40)
        work = device(d, "net0")["works"]["net0.tx0"]
        assert work["budget_exhausted"] >= 20, work


def test_bad_parameter_at_start_exits_2(daemon_factory) -> None:
    d = daemon_factory(params=["poll_stop_idle=-5"])
    d.add_device("net0")
    with pytest.raises(DaemonFailed, match="exited with 2"):
        d.start(timeout=10)
    assert d.returncode == 2
    assert "poll_stop_idle" in d.log_tail() and "allowed" in d.log_tail()
