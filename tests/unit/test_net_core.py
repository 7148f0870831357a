"""Net data path in the C core: MRG_RXBUF spanning, echo, fwd, fd paths, the L2 switch."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_env import Env

from virtio import net
from virtio.errors import ConfigError, GuestError

HDR = 12
BIG = 1 << 40


@pytest.fixture
def env():
    e = Env(size=8 << 20)
    yield e
    e.close()


def _frame(dst: bytes, src: bytes, n: int = 60, seed: int = 1) -> bytes:
    body = bytes((i * seed + 5) & 0xFF for i in range(n - 14))
    return dst + src + b"\x08\x00" + body


MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
MAC_C = bytes.fromhex("020000000003")
BCAST = b"\xff" * 6


class Guest:
    """RX/TX pair of one guest on an Env, with helpers to send and receive frames."""

    def __init__(
        self, env: Env, *, mrg: bool = False, size: int = 64, rx_buf: int = 2048, nrx: int = 1
    ) -> None:
        self.env = env
        self.rxs = [env.pair(size, mrg_rxbuf=mrg, index=2 * i) for i in range(nrx)]
        self.rx_drv, self.rx = self.rxs[0]
        self.tx_drv, self.tx = env.pair(size, mrg_rxbuf=mrg, index=1)
        self.rx_buf = rx_buf
        self.bufs: dict[tuple[int, int], int] = {}
        self.mrg = mrg

    def post_rx(self, n: int, q: int = 0) -> None:
        drv = self.rxs[q][0]
        for _ in range(n):
            g = self.env.alloc(self.rx_buf, 64)
            self.bufs[(q, drv.add([], [(g, self.rx_buf)]))] = g
        drv.publish()

    def send(self, frames: list[bytes], hdr: bytes = bytes(HDR), split: int = 0) -> None:
        for f in frames:
            data = hdr + f
            if split:
                parts = [data[i : i + split] for i in range(0, len(data), split)]
            else:
                parts = [data]
            outs = []
            for p in parts:
                g = self.env.alloc(len(p), 8)
                self.env.write(g, p)
                outs.append((g, len(p)))
            self.tx_drv.add(outs)
        self.tx_drv.publish()

    def recv_raw(self, q: int = 0) -> list[bytes]:
        """Each used RX chain's bytes (header included)."""
        return [self.env.read(self.bufs.pop((q, h)), n) for h, n in self.rxs[q][0].get_used()]

    def recv(self, q: int = 0) -> list[bytes]:
        """Frames without headers; MRG frames reassembled using num_buffers."""
        raws = self.recv_raw(q)
        out = []
        while raws:
            first = raws.pop(0)
            nb = int.from_bytes(first[10:12], "little")
            assert nb >= 1
            data = first
            for _ in range(nb - 1):
                data += raws.pop(0)
            out.append(data[HDR:])
        return out


# ---- rx_fill and MRG_RXBUF ----------------------------------------------------------------------


def test_mrg_rxbuf_spans_chains(env):
    g = Guest(env, mrg=True, rx_buf=1024)
    g.post_rx(8)
    frame = bytes(range(256)) * 11 + b"tail"  # 2820 bytes + 12 header = 3 buffers
    assert net.rx_fill(g.rx, frame, 2) == 2
    raws = g.recv_raw()
    assert [len(r) for r in raws] == [1024, 1024, 784] * 2
    assert int.from_bytes(raws[0][10:12], "little") == 3
    assert int.from_bytes(raws[3][10:12], "little") == 3
    assert (raws[0] + raws[1] + raws[2])[HDR:] == frame
    assert g.rx.stats()["chains"] == 6 and g.rx.stats()["packets"] == 2


def test_mrg_not_enough_buffers_drops_and_keeps_chains(env):
    g = Guest(env, mrg=True, rx_buf=1024)
    g.post_rx(2)
    assert net.rx_fill(g.rx, b"x" * 3000, 1) == 0
    assert g.rx.stats()["ring_full"] == 1
    assert g.rx.pending() == 2 and g.rx.used_idx == 0  # nothing consumed, nothing published
    assert net.rx_fill(g.rx, b"y" * 100, 5) == 2  # the chains are still usable


def test_no_mrg_frame_too_big_dropped(env):
    g = Guest(env, rx_buf=100)
    g.post_rx(3)
    assert net.rx_fill(g.rx, b"x" * 200, 3) == 0
    assert g.rx.stats()["too_big"] == 1 and g.rx.pending() == 3
    assert net.rx_fill(g.rx, b"x" * 88, 5) == 3
    assert g.recv() == [b"x" * 88] * 3


def test_rx_fill_empty_ring(env):
    g = Guest(env)
    assert net.rx_fill(g.rx, b"x" * 60, 10) == 0
    assert g.rx.stats()["ring_full"] == 1


@pytest.mark.parametrize("mrg", [False, True])
@pytest.mark.parametrize("source", ["rx_fill", "echo"])
def test_one_buffer_rx_chains_and_others_interleaved_keep_ring_order(env, mrg, source):
    # RX delivery writes one-descriptor chains directly and hands every other chain (several
    # buffers, indirect) to the general path: frames, headers, used entries and counters must
    # come out exactly as from the general path alone, in ring order
    g = Guest(env, mrg=mrg)
    expect: list[tuple[int, list[int]]] = []  # (head, buffer gpas) in ring order
    for i in range(20):
        if i % 5 == 2:  # header and frame in two buffers
            a, b = env.alloc(HDR), env.alloc(1024)
            head = g.rx_drv.add([], [(a, HDR), (b, 1024)])
            expect.append((head, [a, b]))
        elif i % 5 == 4:  # indirect, one buffer
            a = env.alloc(2048)
            head = g.rx_drv.add([], [(a, 2048)], indirect=True)
            expect.append((head, [a]))
        else:
            a = env.alloc(2048)
            expect.append((g.rx_drv.add([], [(a, 2048)]), [a]))
    g.rx_drv.publish()
    if source == "rx_fill":
        frames = [_frame(MAC_B, MAC_A, 200)] * 20
        assert net.rx_fill(g.rx, frames[0], 64) == 20
        delivered = frames
    else:
        frames = [_frame(MAC_B, MAC_A, 60 + 7 * i, seed=i) for i in range(20)]
        g.send(frames)
        assert net.echo(g.tx, g.rx, 64, BIG) == 20
        delivered = [f[6:12] + f[:6] + f[12:] for f in frames]
    used = g.rx_drv.get_used()
    assert [h for h, _ in used] == [h for h, _ in expect]
    for (head, n), (_, gpas), frame in zip(used, expect, delivered, strict=True):
        want = bytes(10) + b"\x01\x00" + frame
        assert n == len(want)
        got = env.read(gpas[0], HDR) + env.read(gpas[1], len(frame)) if len(gpas) == 2 \
            else env.read(gpas[0], n)
        assert got == want, f"chain {head}"
    st = g.rx.stats()
    assert (st["packets"], st["chains"], st["bytes"]) == (20, 20, sum(map(len, frames)))
    assert g.rx.used_idx == 20 and g.rx.pending() == 0


def test_rx_fill_one_buffer_chain_outside_memory_breaks_the_queue(env):
    # the direct write checks the buffer like the chain walk: outside guest memory breaks the
    # queue with the walk's message, naming that chain (a broken queue publishes nothing more)
    g = Guest(env)
    g.post_rx(3)
    bad = g.rx_drv.add([], [(env.gpa + env.size - 64, 2048)])  # runs past the region's end
    g.rx_drv.publish()
    with pytest.raises(GuestError, match=f"outside guest memory \\(chain {bad}\\)"):
        net.rx_fill(g.rx, b"x" * 60, 10)
    assert g.rx.broken and g.rx.used_idx == 0


def test_rx_fill_publishes_used_entries_every_32_chains(env):
    # a long call publishes as it goes (the driver consumes and refills meanwhile): 100 frames
    # are 4 used->idx stores (32, 64, 96, 100); the interrupt decision is still one per call
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        drv, rx = env.pair(128, call_fd=call)
        for _ in range(100):
            drv.add([], [(env.alloc(2048), 2048)])
        drv.publish()
        assert net.rx_fill(rx, b"p" * 60, 256) == 100
        st = rx.stats()
        assert (st["batches"], st["interrupts"], rx.used_idx) == (4, 1, 100)
        assert len(drv.get_used()) == 100
    finally:
        os.close(call)


@pytest.mark.parametrize("hdr_len", [0, 10, 12, 20])
def test_rx_fill_header_of_each_length_before_the_frame(env, hdr_len):
    # the header rx_fill builds once per call: zeros, num_buffers = 1 when it has that field
    drv, rx = env.pair(16, hdr_len=hdr_len)
    bufs = [env.alloc(256) for _ in range(3)]
    for b in bufs:
        env.write(b, b"\xee" * 256)
        drv.add([], [(b, 256)])
    drv.publish()
    assert net.rx_fill(rx, b"f" * 60, 3) == 3
    hdr = bytearray(hdr_len)
    if hdr_len >= 12:
        hdr[10] = 1
    assert [n for _, n in drv.get_used()] == [hdr_len + 60] * 3
    for b in bufs:
        assert env.read(b, hdr_len + 61) == bytes(hdr) + b"f" * 60 + b"\xee"


def test_rx_fill_no_mrg_short_chain_stops_the_direct_path(env):
    # without MRG_RXBUF a chain too short for the frame is refused (too_big) and stays in the
    # ring, after the chains before it were filled
    g = Guest(env)
    g.post_rx(2)
    g.rx_drv.add([], [(env.alloc(64), 64)])
    g.post_rx(2)
    assert net.rx_fill(g.rx, b"z" * 100, 10) == 2
    assert g.rx.stats()["too_big"] == 1 and g.rx.pending() == 3


# ---- echo -------------------------------------------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(14, 1500), min_size=1, max_size=10),
    split=st.sampled_from([0, 1, 5, 64, 300, 1000]),
    mrg=st.booleans(),
)
def test_echo_swaps_macs(sizes, split, mrg):
    env = Env(size=8 << 20)
    try:
        g = Guest(env, mrg=mrg, rx_buf=512 if mrg else 2048, size=2048)
        g.post_rx(40 if mrg else 10)
        if split and split < 14:
            sizes = sizes[:1]
        frames = [_frame(MAC_B, MAC_A, n, seed=i + 2) for i, n in enumerate(sizes)]
        g.send(frames, split=split)
        assert net.echo(g.tx, g.rx, 64, BIG) == len(frames)
        got = g.recv()
        assert got == [f[6:12] + f[0:6] + f[12:] for f in frames]
        assert [h for h, _ in g.tx_drv.get_used()]
    finally:
        env.close()


def test_echo_budget_bytes(env):
    g = Guest(env)
    g.post_rx(10)
    g.send([_frame(MAC_B, MAC_A, 100)] * 5)
    assert net.echo(g.tx, g.rx, 64, 150) == 2  # stops once max_bytes is reached
    assert g.tx.pending() == 3


# ---- fwd between two memories -------------------------------------------------------------------


def test_fwd_between_two_memories():
    e1, e2 = (
        Env(size=4 << 20, gpa=0x100000),
        Env(size=4 << 20, gpa=0x40000000, uva=0x5000_0000_0000),
    )
    try:
        g1, g2 = Guest(e1), Guest(e2, mrg=True, rx_buf=700)
        g2.post_rx(8)
        frames = [_frame(MAC_B, MAC_A, n) for n in (60, 1000, 1500)]
        hdr = bytes([1, 0, 14, 0, 0, 0, 34, 0, 16, 0, 0, 0])  # NEEDS_CSUM passes through
        g1.send(frames, hdr=hdr, split=300)
        assert net.fwd(g1.tx, g2.rx, 64, BIG) == 3
        raws = g2.recv_raw()
        assert raws[0][:10] == hdr[:10]
        assert g2.recv() == [] and len(raws) == 1 + 2 + 3
        # reassemble by num_buffers
        out, i = [], 0
        while i < len(raws):
            nb = int.from_bytes(raws[i][10:12], "little")
            out.append(b"".join(raws[i : i + nb])[HDR:])
            i += nb
        assert out == frames
        assert len(g1.tx_drv.get_used()) == 3
    finally:
        e1.close()
        e2.close()


def test_fwd_no_rx_buffer_drops(env):
    g1, g2 = Guest(env), Guest(env)
    g2.post_rx(1)
    g1.send([_frame(MAC_B, MAC_A)] * 3)
    assert net.fwd(g1.tx, g2.rx, 64, BIG) == 3  # all TX consumed: a slow receiver never stalls us
    assert len(g2.recv()) == 1
    assert g2.rx.stats()["ring_full"] == 2 and g1.tx.stats()["dropped"] == 2
    assert len(g1.tx_drv.get_used()) == 3


def test_fwd_dropped_frames_do_not_use_the_byte_budget(env):
    # the TX loop stages chains before acting: a frame dropped for lack of RX buffers must not
    # count against max_bytes, as if each chain were handled on its own
    g1, g2 = Guest(env), Guest(env)
    g2.post_rx(2)
    g1.send([_frame(MAC_B, MAC_A, 100)] * 6)
    assert net.fwd(g1.tx, g2.rx, 64, 250) == 6  # 2 delivered (200 B), 4 dropped
    assert g1.tx.stats()["packets"] == 2 and g1.tx.stats()["dropped"] == 4
    g2.post_rx(4)
    g1.send([_frame(MAC_B, MAC_A, 100)] * 6)
    assert net.fwd(g1.tx, g2.rx, 64, 250) == 3  # the third delivered frame reaches the budget
    assert g1.tx.pending() == 3
    assert len(g2.recv()) == 5


def test_budget_stops_at_the_same_chain_with_scattered_chains_in_a_stage(env):
    g = Guest(env)
    g.post_rx(10)
    frames = [_frame(MAC_B, MAC_A, 100, seed=i + 1) for i in range(6)]
    for i, f in enumerate(frames):
        g.send([f], split=40 if i % 2 else 0)  # flat, scattered, flat, ...
    assert net.echo(g.tx, g.rx, 64, 350) == 4
    assert g.recv() == [f[6:12] + f[0:6] + f[12:] for f in frames[:4]]
    assert net.echo(g.tx, g.rx, 64, BIG) == 2
    assert g.recv() == [f[6:12] + f[0:6] + f[12:] for f in frames[4:]]


def test_fwd_broken_rx_does_not_break_tx(env):
    g1, g2 = Guest(env), Guest(env)
    g2.rx_drv.push_avail(1000)  # head out of range
    g2.rx_drv.publish()
    g1.send([_frame(MAC_B, MAC_A)] * 2)
    assert net.fwd(g1.tx, g2.rx, 64, BIG) == 2
    assert g2.rx.broken and g1.tx.broken is None
    assert g1.tx.stats()["dropped"] == 2


# ---- fd paths -----------------------------------------------------------------------------------


@pytest.fixture
def seqpacket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_tx_to_fd_writes_header_and_frame(env, seqpacket):
    a, b = seqpacket
    g = Guest(env)
    frames = [_frame(MAC_B, MAC_A, n) for n in (60, 300, 1514)]
    hdr = bytes(range(1, 13))
    g.send(frames, hdr=hdr, split=100)
    assert net.tx_to_fd(g.tx, a.fileno(), 64, BIG) == 3
    assert [b.recv(4096) for _ in frames] == [hdr + f for f in frames]
    assert len(g.tx_drv.get_used()) == 3


def test_tx_to_fd_zero_byte_budget_takes_one_chain_per_call(env, seqpacket):
    a, b = seqpacket
    g = Guest(env)
    g.send([b"x" * 4], hdr=b"")  # shorter than the net header: dropped
    g.send([_frame(MAC_B, MAC_A)])
    assert net.tx_to_fd(g.tx, a.fileno(), 64, 0) == 1
    assert g.tx.stats()["dropped"] == 1
    assert net.tx_to_fd(g.tx, a.fileno(), 64, 0) == 1
    assert len(b.recv(4096)) == HDR + 60


def test_tx_to_fd_eagain_leaves_chain(env, seqpacket):
    a, b = seqpacket
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    g = Guest(env, size=256)
    g.send([_frame(MAC_B, MAC_A, 1500)] * 200)
    n = net.tx_to_fd(g.tx, a.fileno(), 256, BIG)
    assert 0 < n < 200
    assert g.tx.stats()["eagain"] == 1 and g.tx.pending() == 200 - n
    got = 0
    while True:
        try:
            b.recv(4096)
            got += 1
        except BlockingIOError:
            break
    assert got == n
    total = n
    while total < 200:
        k = net.tx_to_fd(g.tx, a.fileno(), 256, BIG)
        total += k
        while True:
            try:
                b.recv(4096)
            except BlockingIOError:
                break
    assert total == 200


@pytest.mark.parametrize("mrg", [False, True])
def test_rx_from_fd(env, seqpacket, mrg):
    a, b = seqpacket
    g = Guest(env, mrg=mrg, rx_buf=1024 if mrg else 2048)
    g.post_rx(8)
    frames = [_frame(MAC_A, MAC_B, n) for n in (60, 1500, 200)]
    for f in frames:
        b.send(bytes([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x77, 0x77]) + f)  # garbage num_buffers
    assert net.rx_from_fd(g.rx, a.fileno(), 64) == 3
    assert g.rx.stats()["eagain"] == 1
    raws = g.recv_raw()
    assert raws[0][0] == 1  # the header came from the fd
    out, i = [], 0
    while i < len(raws):
        nb = int.from_bytes(raws[i][10:12], "little")
        assert nb == (2 if mrg and len(frames[len(out)]) > 1000 else 1)
        out.append(b"".join(raws[i : i + nb])[HDR:])
        i += nb
    assert out == frames


def test_rx_from_fd_no_buffers_does_not_read(env, seqpacket):
    a, b = seqpacket
    g = Guest(env)
    b.send(bytes(HDR) + _frame(MAC_A, MAC_B))
    assert net.rx_from_fd(g.rx, a.fileno(), 64) == 0
    assert a.recv(4096)  # still queued in the socket


def test_rx_from_pipe(env):
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        g = Guest(env)
        g.post_rx(2)
        os.write(w, bytes(HDR) + b"p" * 50)
        assert net.rx_from_fd(g.rx, r, 64) == 1
        assert g.recv() == [b"p" * 50]
    finally:
        os.close(r)
        os.close(w)


# ---- switch -------------------------------------------------------------------------------------


def test_switch_learning_and_flooding(env):
    a, b, c = Guest(env), Guest(env), Guest(env)
    for g in (a, b, c):
        g.post_rx(16)
    sw = net.Switch()
    pa, pb, pc = (sw.add_port([g.rx]) for g in (a, b, c))
    # unknown destination: flooded to every other port, source learned
    a.send([_frame(MAC_B, MAC_A)])
    assert sw.tx(pa, a.tx, 64, BIG) == 1
    assert sw.lookup(MAC_A) == pa and sw.lookup(MAC_B) is None
    assert a.recv() == [] and len(b.recv()) == 1 and len(c.recv()) == 1
    # B answers A: unicast, only A receives
    b.send([_frame(MAC_A, MAC_B)])
    assert sw.tx(pb, b.tx, 64, BIG) == 1
    assert a.recv() == [_frame(MAC_A, MAC_B)] and c.recv() == [] and b.recv() == []
    # now A -> B is unicast too
    a.send([_frame(MAC_B, MAC_A, 100)])
    sw.tx(pa, a.tx, 64, BIG)
    assert b.recv() == [_frame(MAC_B, MAC_A, 100)] and c.recv() == []
    # broadcast floods
    c.send([_frame(BCAST, MAC_C)])
    sw.tx(pc, c.tx, 64, BIG)
    assert len(a.recv()) == 1 and len(b.recv()) == 1 and c.recv() == []
    s = sw.stats()
    assert s["learned"] == 3 and s["flooded"] == 2 and s["unicast"] == 2
    # MAC moves to another port
    c.send([_frame(BCAST, MAC_A)])
    sw.tx(pc, c.tx, 64, BIG)
    assert sw.lookup(MAC_A) == pc and sw.stats()["moved"] == 1
    assert len(a.recv()) == 1 and len(b.recv()) == 1
    # remove a port: its entries go, floods skip it
    sw.remove_port(pb)
    assert sw.lookup(MAC_B) is None
    a.send([_frame(MAC_B, MAC_A)])
    sw.tx(pa, a.tx, 64, BIG)
    assert b.recv() == [] and len(c.recv()) == 1  # MAC_B forgotten: flooded, to c only
    with pytest.raises(ConfigError):
        sw.tx(pb, b.tx, 64, BIG)


def test_switch_multiqueue_port_spreads_flows(env):
    a = Guest(env)
    m = Guest(env, nrx=4)
    for q in range(4):
        m.post_rx(32, q)
    sw = net.Switch()
    pa = sw.add_port([a.rx])
    pm = sw.add_port([q for _, q in m.rxs])
    frames = []
    for i in range(64):
        ip = bytes([10, 0, 0, 1, 10, 0, i // 8, i % 8 + 1])
        f = MAC_B + MAC_A + b"\x08\x00" + bytes([0x45]) + bytes(8) + bytes([17]) + bytes(2) + ip
        frames.append(f + bytes([0, i, 0, 53]) + bytes(30))
    a.send(frames)
    assert sw.tx(pa, a.tx, 64, BIG) == 64
    counts = [len(m.recv(q)) for q in range(4)]
    assert sum(counts) == 64 and sum(1 for c in counts if c) >= 2, counts
    # one flow always lands on the same queue
    a.tx_drv.get_used()
    a.send([frames[5]] * 8)
    sw.tx(pa, a.tx, 64, BIG)
    assert sorted(len(m.recv(q)) for q in range(4)) == [0, 0, 0, 8]
    assert pm >= 0


def test_switch_concurrent_senders_into_one_rx(env):
    dst = Guest(env, size=1024)
    senders = [Guest(env, size=512) for _ in range(4)]
    sw = net.Switch()
    pd = sw.add_port([dst.rx])
    ports = [sw.add_port([s.rx]) for s in senders]
    dst.post_rx(1024)
    dst.send([])  # nothing
    # teach the switch where MAC_B lives
    dst.send([_frame(BCAST, MAC_B)])
    for s in senders:
        s.post_rx(4)
    sw.tx(pd, dst.tx, 64, BIG)
    for i, s in enumerate(senders):
        s.send([_frame(MAC_B, bytes([2, 0, 0, 0, 1, i]), 80, seed=i + 1)] * 200)

    def run(i: int) -> None:
        left = 200
        while left:
            left -= sw.tx(ports[i], senders[i].tx, 32, BIG)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = dst.recv()
    assert len(got) == 800 and dst.rx.broken is None
    for i in range(4):
        assert got.count(_frame(MAC_B, bytes([2, 0, 0, 0, 1, i]), 80, seed=i + 1)) == 200


def test_switch_tx_breaks_on_hostile_tx(env):
    a, b = Guest(env), Guest(env)
    sw = net.Switch()
    pa = sw.add_port([a.rx])
    sw.add_port([b.rx])
    a.tx_drv.write_desc(0, 0x10, 64, 0, 0)
    a.tx_drv.push_avail(0)
    a.tx_drv.publish()
    with pytest.raises(GuestError, match="outside guest memory"):
        sw.tx(pa, a.tx, 64, BIG)
