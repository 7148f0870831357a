"""Shared mode end to end: the real daemon with mode=shared, driven by the Python frontend over real
sockets and memfd memory. Ports work as in baseline; devices and single queues migrate between
workers during traffic without losing or duplicating a packet; workers come and go at run time;
polling starts under load and stops after poll_stop_idle; the control socket's answers and
errors; the statistics have the contract's shape (docs/internal-api.md "Daemon statistics").

No timed assertions: every wait is a generous bound against hangs.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bench.process import DaemonProcess
from virtio.frontend import NetDriver, VhostUserFrontend

MAC_A = bytes.fromhex("525400aa0001")
MAC_B = bytes.fromhex("525400bb0002")
SHARED = ["mode=shared", "workers=2"]


def frame(dst: bytes, src: bytes, n: int, size: int = 100) -> bytes:
    return dst + src + b"\x88\xb5" + struct.pack("!I", n) + bytes(size - 18)


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def queue(d: DaemonProcess, name: str) -> dict[str, Any]:
    return next(q for q in d.stats()["queues"] if q["name"] == name)


def ring_packets(d: DaemonProcess, dev: str, ring: str) -> int:
    for dv in d.stats()["devices"]:
        if dv["name"] == dev:
            return int(dv["queues"].get(ring, {}).get("packets", 0))
    raise KeyError(dev)


def ok(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer.get("ok"), answer
    return answer


class Sender(threading.Thread):
    """Sends numbered frames on one TX queue until stopped; counts what was posted."""

    def __init__(self, net: NetDriver, pair: int = 0) -> None:
        super().__init__(daemon=True)
        self.net, self.pair = net, pair
        self.sent = 0
        self.stop_evt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_evt.is_set():
                batch = [frame(MAC_B, MAC_A, self.sent + i) for i in range(32)]
                self.sent += self.net.send(batch, pair=self.pair, timeout=0.5)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self) -> int:
        self.stop_evt.set()
        self.join(10)
        assert not self.is_alive()
        assert self.error is None, self.error
        return self.sent


def test_ports_work_and_stats_have_the_contract_shape(daemon_factory) -> None:
    d = daemon_factory(params=SHARED)
    s_sink = d.add_device("net0", port="sink")
    s_echo = d.add_device("net1", port="echo")
    d.start()
    with VhostUserFrontend(s_sink) as f0, VhostUserFrontend(s_echo) as f1:
        n0, n1 = NetDriver(f0), NetDriver(f1)
        assert n0.send([frame(MAC_B, MAC_A, i) for i in range(500)], timeout=5) == 500
        sent = [frame(MAC_B, MAC_A, i) for i in range(40)]
        n1.send(sent)
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < 40 and time.monotonic() < deadline:
            got += n1.recv(timeout=0.5)
        assert got == [f[6:12] + f[0:6] + f[12:] for f in sent]
        assert wait_until(lambda: ring_packets(d, "net0", "1") == 500)
        st = d.stats()
        assert st["mode"] == "shared" and st["params"]["mode"] == "shared"
        assert [w["index"] for w in st["workers"]] == [0, 1]
        w0 = st["workers"][0]
        for key in ("name", "cpu", "busy_ns", "idle_ns", "loops", "sleeps", "empty_polls",
                    "works", "devices", "polling"):
            assert key in w0, key
        # first_fit with devices_per_worker=7: both devices on worker 0
        assert w0["devices"] == ["net0", "net1"]
        q = queue(d, "net0.tx0")
        for key in ("device", "worker", "polling", "packets", "bytes", "kicks", "kicks_avoided",
                    "interrupts", "interrupts_suppressed", "poll_starts", "poll_stops",
                    "polled_ns", "ring_full", "stuck_events", "budget_exhausted", "turns",
                    "empty_turns"):
            assert key in q, key
        assert q["device"] == "net0" and q["worker"] == 0 and q["packets"] == 500
        assert q["bytes"] == 500 * 100


def test_migrate_device_and_queue_back_and_forth_during_traffic_loses_nothing(
        daemon_factory) -> None:
    d = daemon_factory(params=SHARED)
    s0 = d.add_device("net0", port="sink", queues=2)
    d.start()
    with VhostUserFrontend(s0, queues=4) as fe:
        net = NetDriver(fe)
        senders = [Sender(net, 0), Sender(net, 1)]
        for s in senders:
            s.start()
        assert wait_until(lambda: ring_packets(d, "net0", "1") > 100)
        for i in range(6):
            ok(d.request({"cmd": "migrate", "device": "net0", "worker": (i + 1) % 2}))
            time.sleep(0.05)
            ok(d.request({"cmd": "migrate", "device": "net0", "worker": i % 2, "queue": "tx1"}))
            time.sleep(0.05)
        sent = [s.finish() for s in senders]
        assert wait_until(lambda: ring_packets(d, "net0", "1") == sent[0]), (
            ring_packets(d, "net0", "1"), sent)
        assert wait_until(lambda: ring_packets(d, "net0", "3") == sent[1])
        # every buffer came back: nothing stranded in the rings
        assert wait_until(lambda: (net.reap_tx(0), net.reap_tx(1)) is not None
                          and fe.queues[1].in_flight == 0 and fe.queues[3].in_flight == 0)
        placed = {q["name"]: q["worker"] for q in d.stats()["queues"]}
        assert placed["net0.tx0"] == 0 and placed["net0.tx1"] == 1


def test_migration_with_echo_keeps_every_frame_in_order(daemon_factory) -> None:
    d = daemon_factory(params=SHARED)
    s0 = d.add_device("net0", port="echo")
    d.start()
    with VhostUserFrontend(s0) as fe:
        net = NetDriver(fe)
        got: list[bytes] = []
        n = 0
        for round_ in range(8):
            batch = [frame(MAC_B, MAC_A, n + i) for i in range(60)]
            n += len(batch)
            assert net.send(batch, timeout=5) == len(batch)
            target = (round_ + 1) % 2
            if round_ % 2:
                ok(d.request({"cmd": "migrate", "device": "net0", "worker": target,
                              "queue": "net0.tx0"}))
            else:
                ok(d.request({"cmd": "migrate", "device": "net0", "worker": target}))
            deadline = time.monotonic() + 20
            while len(got) < n and time.monotonic() < deadline:
                got += net.recv(timeout=0.2)
        assert [struct.unpack("!I", f[14:18])[0] for f in got] == list(range(n))


def test_control_errors_name_the_allowed_values(daemon_factory) -> None:
    d = daemon_factory(params=SHARED)
    d.add_device("net0", port="sink")
    d.start()
    bad = d.request({"cmd": "migrate", "device": "net0", "worker": 7})
    assert not bad["ok"] and "no worker 7" in bad["error"] and "0, 1" in bad["error"]
    bad = d.request({"cmd": "migrate", "device": "nope", "worker": 0})
    assert not bad["ok"] and "net0" in bad["error"]
    bad = d.request({"cmd": "migrate", "device": "net0", "worker": 1, "queue": "tx0"})
    assert not bad["ok"] and "no running queue" in bad["error"]
    bad = d.request({"cmd": "migrate", "device": "net0"})
    assert not bad["ok"] and "worker" in bad["error"]
    bad = d.request({"cmd": "frobnicate"})
    assert not bad["ok"] and "migrate" in bad["error"] and "worker_add" in bad["error"]
    assert ok(d.request({"cmd": "worker_remove", "worker": 1}))["worker"] == 1
    bad = d.request({"cmd": "worker_remove", "worker": 0})
    assert not bad["ok"] and "last" in bad["error"]
    bad = d.request({"cmd": "worker_remove", "worker": 1})
    assert not bad["ok"] and "no worker 1" in bad["error"]


def test_worker_add_and_remove_move_works(daemon_factory) -> None:
    d = daemon_factory(params=["mode=shared", "workers=1", "devices_per_worker=1",
                                "max_workers=8"])
    socks = [d.add_device(f"net{i}", port="sink") for i in range(3)]
    d.start()
    # first_fit with one device per worker: three devices made three workers
    st = d.stats()
    assert [w["devices"] for w in st["workers"]] == [["net0"], ["net1"], ["net2"]]
    new = ok(d.request({"cmd": "worker_add"}))["worker"]
    assert new == 3
    with VhostUserFrontend(socks[1]) as fe:
        net = NetDriver(fe)
        sender = Sender(net)
        sender.start()
        assert wait_until(lambda: ring_packets(d, "net1", "1") > 50)
        ok(d.request({"cmd": "worker_remove", "worker": 1}))
        w = queue(d, "net1.tx0")["worker"]
        assert w in (0, 2, 3) and w == 3  # least loaded: the new, empty worker
        ok(d.request({"cmd": "worker_remove", "worker": 3}))
        sent = sender.finish()
        assert wait_until(lambda: ring_packets(d, "net1", "1") == sent)
        assert queue(d, "net1.tx0")["worker"] in (0, 2)
    assert sorted(w["index"] for w in d.stats()["workers"]) == [0, 2]


def test_polling_starts_under_load_and_stops_after_poll_stop_idle(daemon_factory) -> None:
    d = daemon_factory(params=SHARED + ["poll_stop_idle=300ms"])
    s0 = d.add_device("net0", port="sink")
    d.start()
    with VhostUserFrontend(s0) as fe:
        net = NetDriver(fe)
        sender = Sender(net)
        sender.start()
        assert wait_until(lambda: queue(d, "net0.tx0")["polling"])
        assert wait_until(lambda: queue(d, "net0.tx0")["kicks_avoided"] > 10)
        sent = sender.finish()
        assert wait_until(lambda: ring_packets(d, "net0", "1") == sent)
        assert wait_until(lambda: not queue(d, "net0.tx0")["polling"])
        q = queue(d, "net0.tx0")
        assert q["poll_starts"] >= 1 and q["poll_stops"] == q["poll_starts"]
        assert q["polled_ns"] > 0
        w = d.stats()["workers"][0]
        assert w["polling"] == 0
        # The worker sleeps now: its loop count stays put while nothing happens.
        loops = d.stats()["workers"][0]["loops"]
        time.sleep(0.3)
        assert d.stats()["workers"][0]["loops"] - loops <= 2
        # Kicks work again after polling stopped: nothing stranded.
        assert net.send([frame(MAC_B, MAC_A, 0)] * 5, timeout=5) == 5
        assert wait_until(lambda: ring_packets(d, "net0", "1") == sent + 5)
        # poll_start_rate=0 (live): the next burst never polls
        ok(d.request({"cmd": "param_set", "name": "poll_start_rate", "value": 0}))
        starts = queue(d, "net0.tx0")["poll_starts"]
        assert net.send([frame(MAC_B, MAC_A, 1)] * 50, timeout=5) == 50
        assert wait_until(lambda: ring_packets(d, "net0", "1") == sent + 55)
        assert queue(d, "net0.tx0")["poll_starts"] == starts


def test_live_poll_stop_idle_change_stops_polling(daemon_factory) -> None:
    d = daemon_factory(params=SHARED + ["poll_stop_idle=60s"])
    s0 = d.add_device("net0", port="sink")
    d.start()
    with VhostUserFrontend(s0) as fe:
        net = NetDriver(fe)
        assert net.send([frame(MAC_B, MAC_A, i) for i in range(100)], timeout=5) == 100
        assert wait_until(lambda: queue(d, "net0.tx0")["polling"])
        time.sleep(0.3)
        assert queue(d, "net0.tx0")["polling"], "60 s of poll_stop_idle has not passed"
        ok(d.request({"cmd": "param_set", "name": "poll_stop_idle", "value": "10ms"}))
        assert wait_until(lambda: not queue(d, "net0.tx0")["polling"])


def test_explicit_worker_key_and_least_loaded_placement(daemon_factory) -> None:
    d = daemon_factory(params=["mode=shared", "workers=3", "placement=least_loaded"])
    d.add_device("a", port="sink", worker=2)
    d.add_device("b", port="sink")
    d.add_device("c", port="sink")
    d.start()
    homes = {w["index"]: w["devices"] for w in d.stats()["workers"]}
    assert homes == {0: ["b"], 1: ["c"], 2: ["a"]}
    ws = ok(d.request({"cmd": "workers"}))["workers"]
    assert [w["index"] for w in ws] == [0, 1, 2]


def test_set_vring_call_on_a_running_ring_keeps_serving(daemon_factory) -> None:
    import os

    from virtio.vhost_user import Request, VringFile

    d = daemon_factory(params=SHARED)
    s0 = d.add_device("net0", port="echo")
    d.start()
    with VhostUserFrontend(s0) as fe:
        net = NetDriver(fe)
        net.send([frame(MAC_B, MAC_A, 0)])
        assert wait_until(lambda: bool(net.recv(timeout=0.2)))
        new_call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.call(Request.SET_VRING_CALL, VringFile(0), [new_call])
        old = fe.call_fds[0]
        fe.call_fds[0] = new_call
        os.close(old)
        net.send([frame(MAC_B, MAC_A, i) for i in range(1, 30)])
        got: list[bytes] = []
        assert wait_until(lambda: bool(got.extend(net.recv(timeout=0.2)) or len(got) >= 29))
        assert [struct.unpack("!I", f[14:18])[0] for f in got] == list(range(1, 30))


# ---- migration under DPDK testpmd traffic ---------------------------------------------------------
# The daemon (both workers) runs pinned to core 1, the virtio-user client forwards on core 0.

DAEMON_CORE = 1  # as in conftest.py


def _rings(stats: dict[str, Any], device: str = "net0") -> dict[int, dict[str, int]]:
    dev = next(d for d in stats["devices"] if d["name"] == device)
    return {int(k): v for k, v in dev["queues"].items()}


def _settled(daemon: Any) -> dict[int, dict[str, int]]:
    last = _rings(daemon.stats())
    for _ in range(50):
        time.sleep(0.1)
        now = _rings(daemon.stats())
        if now == last:
            return now
        last = now
    raise AssertionError(f"daemon counters still moving 5 s after the client stopped: {last}")


def _migrate_back_and_forth(daemon: Any, rounds: int, queue: str | None) -> None:
    for i in range(rounds):
        ok(daemon.request({"cmd": "migrate", "device": "net0", "worker": (i + 1) % 2}))
        time.sleep(0.1)
        if queue is not None:
            ok(daemon.request({"cmd": "migrate", "device": "net0", "worker": i % 2,
                               "queue": queue}))
            time.sleep(0.1)


@pytest.mark.dpdk
@pytest.mark.timeout(120)
def test_dpdk_txonly_into_sink_migrating_device_and_queue_loses_nothing(
        client: Any, vhostx_daemon: Any, e2e_dir: Any) -> None:
    sock = str(e2e_dir / "net0.sock")
    daemon = vhostx_daemon([f"name=net0,type=net,socket={sock},port=sink,queues=2"],
                           cpus={DAEMON_CORE}, params=SHARED)
    tp = client(sock, "txonly", queues=2, txpkts=64)
    tp.start_forwarding()
    time.sleep(0.5)
    _migrate_back_and_forth(daemon, 6, "tx1")
    fwd = tp.stop_forwarding()
    rings = _settled(daemon)
    sent = tp.port_stats().ports[0]
    per_stream = {s.tx_queue: s.tx_packets for s in fwd.streams}
    assert sent.tx_packets > 0 and sent.tx_errors == 0
    assert all(n > 0 for n in per_stream.values()), per_stream
    assert rings[1]["packets"] + rings[3]["packets"] == sent.tx_packets
    xs = tp.xstats(0)
    assert xs["tx_q0_good_packets"] == rings[1]["packets"]
    assert xs["tx_q1_good_packets"] == rings[3]["packets"]
    assert rings[1]["errors"] == rings[3]["errors"] == 0
    st = daemon.stats()
    queues = {q["name"]: q for q in st["queues"]}
    assert {queues["net0.tx0"]["worker"], queues["net0.tx1"]["worker"]} == {0, 1}
    assert sum(q["poll_starts"] for q in queues.values()) >= 2  # polled, and re-polled after moves


@pytest.mark.dpdk
@pytest.mark.timeout(120)
def test_dpdk_echo_macswap_migrating_loses_nothing(
        client: Any, vhostx_daemon: Any, e2e_dir: Any) -> None:
    sock = str(e2e_dir / "net0.sock")
    daemon = vhostx_daemon([f"name=net0,type=net,socket={sock},port=echo"],
                           cpus={DAEMON_CORE}, params=SHARED)
    tp = client(sock, "macswap", txpkts=64)
    tp.start_forwarding(tx_first=4)  # 4 bursts of 32 circulate
    time.sleep(0.5)
    _migrate_back_and_forth(daemon, 6, "tx0")
    loop = tp.stop_forwarding()
    _settled(daemon)
    tp.set_forward_mode("rxonly")  # drain what the daemon echoed after the client stopped
    tp.start_forwarding()
    time.sleep(0.5)
    tp.stop_forwarding()
    rings = _settled(daemon)
    port = tp.port_stats().ports[0]
    assert loop.ports[0].rx_packets > 128, "the packets did not circulate"
    dropped = rings[1]["packets"] - rings[0]["packets"]  # consumed from TX, not put into RX
    assert rings[1]["packets"] == port.tx_packets
    assert rings[0]["packets"] == port.rx_packets
    assert port.rx_packets == port.tx_packets - dropped
    assert dropped == rings[1].get("dropped", 0) + rings[0].get("dropped", 0)
    assert port.rx_bytes == 64 * port.rx_packets
