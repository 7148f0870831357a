"""A `source` port with echo_tx: its TX frames come back, MACs swapped, on the RX ring its paced
(or unpaced) rx_fill writes. That RX ring has two writers on two threads (the TX work's echo, the
RX work's rx_fill), so both lock it (struct vx_op shared_rx, vx_vq_set_shared).

Tests: the daemon end to end (a real daemon process, the in-tree frontend and NetDriver as the
guest), the two C ops on one RX ring from two threads at once (cffi releases the GIL for the
calls), and the config refusal on other ports."""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import pytest
from test_core_env import Env

from bench.process import DaemonProcess
from vhostx.config import parse_device_spec
from virtio import net
from virtio.errors import ConfigError
from virtio.frontend import NetDriver, VhostUserFrontend

MAC_A = bytes.fromhex("525400aa0001")
MAC_B = bytes.fromhex("525400bb0002")
ETH_PING = b"\x88\xb5"
BIG = 1 << 40
HDR = 12


def ping(seq: int) -> bytes:
    return MAC_B + MAC_A + ETH_PING + struct.pack("!I", seq) + bytes(46)


def echoed_seq(frame: bytes) -> int | None:
    """The sequence number of an echoed ping (MACs swapped), None for any other frame."""
    if frame[:6] == MAC_A and frame[6:12] == MAC_B and frame[12:14] == ETH_PING:
        return int(struct.unpack_from("!I", frame, 14)[0])
    return None


# ---- the daemon: the paced stream and the echoed pings on one RX queue -------------------------


MODERATE = ["irq_mode=moderate", "irq_coalesce_frames=32", "irq_coalesce_us=100"]


@pytest.mark.parametrize("irq", ["off", "moderate"])
@pytest.mark.parametrize("mode", ["baseline", "shared"])
def test_source_echo_tx_returns_every_ping_once_amid_the_paced_stream(
    daemon_factory: Any, mode: str, irq: str
) -> None:
    """The interrupts benchmark's round trip: pings every ~2 ms on TX, the paced stream on the
    same RX queue (moderated or not); each ping comes back once, MACs swapped."""
    extra = MODERATE if irq == "moderate" else []
    d: DaemonProcess = daemon_factory(params=[f"mode={mode}", "workers=2", *extra])
    sock = d.add_device("net0", port="source", rate_pps=20000, echo_tx="true")
    d.start()
    fe = VhostUserFrontend(sock)
    fe.connect()
    try:
        drv = NetDriver(fe)
        if mode == "shared":
            split_works(d)
        n = 40
        seen: dict[int, int] = {}
        stream = 0

        def receive(timeout: float) -> None:
            nonlocal stream
            for f in drv.recv(timeout=timeout):
                s = echoed_seq(f)
                if s is None:
                    stream += 1
                else:
                    seen[s] = seen.get(s, 0) + 1

        # the stream filled the RX ring while the works moved (nobody received): an echo finds
        # no room in a full ring and drops its frame (a NIC's full ring), so empty it first
        settle = time.monotonic() + 0.1
        while time.monotonic() < settle:
            receive(0.01)
        stream = 0
        t0 = time.monotonic()
        for seq in range(n):
            assert drv.send([ping(seq)], timeout=2) == 1
            end = time.monotonic() + 0.002  # one ping every ~2 ms, the stream meanwhile
            while time.monotonic() < end:
                receive(0.001)
        deadline = time.monotonic() + 5
        while len(seen) < n and time.monotonic() < deadline:
            receive(0.05)
        elapsed = time.monotonic() - t0
        assert seen == dict.fromkeys(range(n), 1), "every ping back exactly once"
        # the paced stream flowed meanwhile, at most at its rate (plus one batch of slack)
        assert stream > 0
        assert stream <= 20000 * elapsed + 512
    finally:
        fe.close()
    d.stop()


def split_works(d: DaemonProcess) -> None:
    """The device's TX work moved to the other worker: its two RX writers on two threads."""
    deadline = time.monotonic() + 5
    while True:
        ws = d.stats()["workers"]
        homes = [w["index"] for w in ws if w["works"] == 2]
        if homes:
            break
        assert time.monotonic() < deadline, ws
        time.sleep(0.02)
    d.request({"cmd": "migrate", "device": "net0", "worker": 1 - homes[0], "queue": "tx0"})
    assert [w["works"] for w in d.stats()["workers"]] == [1, 1]


# ---- the C ops: rx_fill and echo on one RX ring from two threads -------------------------------


class SharedRx:
    """One RX ring written by an rx_fill op (thread 1) and an echo op (thread 2) from its TX
    ring; this thread is the driver: it reaps both rings, checks every used entry and reposts."""

    def __init__(self, env: Env, *, shared: bool, size: int = 128) -> None:
        self.env = env
        self.rx_drv, self.rx = env.pair(size, index=0)
        self.tx_drv, self.tx = env.pair(size, index=1)
        self.rx_bufs: dict[int, int] = {}  # head -> buffer gpa of the chains posted
        self.free_rx = [env.alloc(2048) for _ in range(size)]
        self.tx_slots = [env.alloc(2048) for _ in range(size)]
        self.tx_free = list(self.tx_slots)
        self.tx_bufs: dict[int, int] = {}
        self.fill_frame = bytes.fromhex("ffffffffffff020000000001") + b"\x08\x00" + bytes(46)
        self.fill = net.Op.rx_fill(self.rx, self.fill_frame, shared=shared)
        self.echo = net.Op.echo(self.tx, self.rx, shared=shared)
        self.seq = 0
        self.echoed: dict[int, int] = {}
        self.filled = 0
        self.errors: list[BaseException] = []
        self.counts = {"fill": 0, "echo": 0}
        self.stop = threading.Event()

    def post_rx(self) -> None:
        while self.free_rx:
            gpa = self.free_rx.pop()
            head = self.rx_drv.add([], [(gpa, 2048)])
            assert head not in self.rx_bufs, f"RX head {head} posted twice"
            self.rx_bufs[head] = gpa
        self.rx_drv.publish()

    def post_tx(self, k: int) -> None:
        for _ in range(k):
            if not self.tx_free:
                break
            gpa = self.tx_free.pop()
            self.env.write(gpa, bytes(HDR) + ping(self.seq))
            self.seq += 1
            self.tx_bufs[self.tx_drv.add([(gpa, HDR + 60)])] = gpa
        self.tx_drv.publish()

    def reap(self) -> None:
        # get_used refuses a head not in flight (used twice) and more entries than in flight
        for head, length in self.rx_drv.get_used():
            gpa = self.rx_bufs.pop(head)
            frame = self.env.read(gpa + HDR, length - HDR)
            s = echoed_seq(frame)
            if s is None:
                assert frame == self.fill_frame, "a used RX buffer holds neither frame"
                self.filled += 1
            else:
                self.echoed[s] = self.echoed.get(s, 0) + 1
            self.free_rx.append(gpa)
        for head, _ in self.tx_drv.get_used():
            self.tx_free.append(self.tx_bufs.pop(head))

    def serve(self, name: str, op: net.Op) -> None:
        try:
            while not self.stop.is_set():
                self.counts[name] += op.run(8, BIG)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.errors.append(e)
            self.stop.set()


def test_shared_rx_ring_two_writers_on_two_threads_every_used_entry_once() -> None:
    """rx_fill and echo write one RX ring at the same time: every used entry names a chain in
    flight, once; used->idx counts exactly the frames both ops delivered; every echoed ping comes
    back once. Without the lock (shared=False) the two writers take the same avail entries and
    overwrite each other's used entries (the driver sees a head used twice or the counts differ)."""
    env = Env(8 << 20)
    r = SharedRx(env, shared=True)
    r.post_rx()
    r.post_tx(64)
    threads = [threading.Thread(target=r.serve, args=("fill", r.fill)),
               threading.Thread(target=r.serve, args=("echo", r.echo))]
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not r.stop.is_set():
            r.reap()
            r.post_rx()
            r.post_tx(64)
    finally:
        r.stop.set()
        for t in threads:
            t.join()
    assert not r.errors, r.errors
    r.reap()
    st = r.rx.stats()
    # echo's count is TX chains consumed: a ping that found the RX ring full is dropped, counted
    echoes = r.counts["echo"] - r.tx.stats()["dropped"]
    delivered = r.counts["fill"] + echoes
    assert r.filled == r.counts["fill"] and sum(r.echoed.values()) == echoes
    assert r.rx.used_idx == delivered & 0xFFFF and st["packets"] == delivered
    assert echoes > 100 and r.counts["fill"] > 100, (r.counts, echoes)
    assert all(v == 1 for v in r.echoed.values()), "an echoed ping came back twice"
    assert st["lock_contended"] > 0, "the two writers never met: the test proved nothing"


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["sink", "echo", "switch", "tap"])
def test_echo_tx_outside_a_source_port_is_refused_naming_source(port: str) -> None:
    with pytest.raises(ConfigError, match='echo_tx is only meaningful with port = "source"'):
        parse_device_spec(f"name=net0,socket=/tmp/x.sock,port={port},echo_tx=true")
    assert parse_device_spec("name=net0,socket=/tmp/x.sock,port=source,echo_tx=1").echo_tx
    assert not parse_device_spec("name=net0,socket=/tmp/x.sock,port=source").echo_tx
