"""VIRTIO_F_IN_ORDER: the device completes chains in the order they were made available.

The driver side (DriverQueue with in_order) takes descriptors in ring order and raises on any used
entry that does not name the oldest chain in flight, so every test here that collects used
entries checks the order. The hypothesis test throws mixes of good and bad chains (dropped, too
big, scattered, indirect, header in its own buffer) at every TX operation, with RX rings that run
out of buffers, and at the RX operations with mergeable buffers spanning several chains.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_env import Env
from test_net_core import MAC_A, MAC_B, Guest, _frame

from vhostx.config import parse_device_spec
from virtio import features as vf
from virtio import net
from virtio.errors import ConfigError, VhostError

HDR = 12
BIG = 1 << 40


# ---- the checking driver ------------------------------------------------------------------------


def test_driver_takes_descriptors_in_ring_order():
    env = Env(in_order=True)
    try:
        drv, tx = env.pair(8, index=1)
        g = env.alloc(4096)
        heads = [drv.add([(g, 64)] * n) for n in (1, 2, 1, 3)]
        assert heads == [0, 1, 3, 4]
        drv.publish()
        assert net.tx_sink(tx, 64, BIG) == 4
        assert [h for h, _ in drv.get_used()] == heads
        # descriptors 7, then 0.. again: ring order wraps
        assert [drv.add([(g, 64)]) for _ in range(3)] == [7, 0, 1]
    finally:
        env.close()


def test_driver_refuses_a_used_entry_out_of_order():
    env = Env(in_order=True)
    try:
        drv, _ = env.pair(8, index=1)
        g = env.alloc(4096)
        a, b = drv.add([(g, 64)]), drv.add([(g, 64)])
        drv.publish()
        # a device that completes b before a
        used = drv.used_gpa
        env.write(used + 4, b.to_bytes(4, "little") + bytes(4) + a.to_bytes(4, "little") + bytes(4))
        env.write(used + 2, (2).to_bytes(2, "little"))
        with pytest.raises(VhostError, match="IN_ORDER"):
            drv.get_used()
    finally:
        env.close()


def test_device_offers_in_order_unless_configured_off():
    from vhostx.net import NetDevice, SwitchRegistry

    class _Binding:  # NetDevice only stores it before negotiation
        def __getattr__(self, name):
            raise AssertionError(f"binding used: {name}")

    on = NetDevice(parse_device_spec("name=a,socket=/tmp/x.sock"), _Binding(), SwitchRegistry())
    off = NetDevice(parse_device_spec("name=b,socket=/tmp/y.sock,in_order=off"), _Binding(),
                    SwitchRegistry())
    assert on.offered_features() & (1 << vf.VIRTIO_F_IN_ORDER)
    assert not off.offered_features() & (1 << vf.VIRTIO_F_IN_ORDER)
    with pytest.raises(ConfigError, match="in_order"):
        parse_device_spec("name=c,socket=/tmp/z.sock,in_order=maybe")


# ---- every operation, hostile mixes -------------------------------------------------------------

# a TX chain: (shape, frame length)
CHAIN = st.tuples(
    st.sampled_from(["one", "split", "hdr_apart", "indirect", "short", "huge"]),
    st.integers(14, 1500),
)
TX_KINDS = ["sink", "echo", "fwd", "switch", "to_fd"]


class _Side(Guest):
    """One guest's TX and RX rings on an in-order Env, with hostile TX chain shapes."""

    def post_rx(self, n: int, q: int = 0) -> None:
        super().post_rx(min(n, self.rx_drv.num_free), q)

    def add_tx(self, shape: str, length: int) -> bool:
        frame = _frame(MAC_B, MAC_A, max(length, 14))
        data = bytes(HDR) + frame
        if shape == "short":
            data = data[: HDR - 2]  # shorter than the net header: dropped
        elif shape == "huge":
            data = bytes(HDR) + bytes(70000)  # longer than any frame: dropped or too big
        g = self.env.alloc(len(data), 8)
        self.env.write(g, data)
        if shape == "split":
            cut = len(data) // 2
            outs = [(g, cut), (g + cut, len(data) - cut)]
        elif shape == "hdr_apart":
            outs = [(g, HDR), (g + HDR, len(data) - HDR)]
        else:
            outs = [(g, len(data))]
        if self.tx_drv.num_free < (1 if shape == "indirect" else len(outs)):
            return False
        self.tx_drv.add(outs, indirect=shape == "indirect")
        return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(TX_KINDS),
    chains=st.lists(CHAIN, min_size=1, max_size=40),
    budgets=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    rx_posts=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    mrg=st.booleans(),
    rx_buf=st.sampled_from([64, 256, 2048]),
)
def test_tx_ops_complete_in_avail_order(kind, chains, budgets, rx_posts, mrg, rx_buf):
    env = Env(size=16 << 20, in_order=True)
    s1 = s2 = None
    try:
        a = _Side(env, mrg=mrg, size=16, rx_buf=rx_buf)
        b = _Side(env, mrg=mrg, size=16, rx_buf=rx_buf)
        if kind == "sink":
            op = net.Op.tx_sink(a.tx)
        elif kind == "echo":
            op = net.Op.echo(a.tx, a.rx)
        elif kind == "fwd":
            op = net.Op.fwd(a.tx, b.rx)
        elif kind == "switch":
            sw = net.Switch()
            pa = sw.add_port([a.rx])
            sw.add_port([b.rx])
            op = net.Op.switch_tx(sw, pa, a.tx)
        else:
            s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s1.setblocking(False)
            s2.setblocking(False)
            s1.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # EAGAIN comes soon
            op = net.Op.tx_to_fd(a.tx, s1.fileno())
        pending = list(chains)
        added = completed = 0
        for step in range(max(len(budgets), len(rx_posts)) + 40):
            while pending and a.add_tx(*pending[0]):
                pending.pop(0)
                added += 1
            a.tx_drv.publish()
            a.post_rx(rx_posts[step % len(rx_posts)])
            b.post_rx(rx_posts[step % len(rx_posts)])
            op.run(budgets[step % len(budgets)], BIG)
            completed += len(a.tx_drv.get_used())  # raises if out of order
            a.rx_drv.get_used()
            b.rx_drv.get_used()
            if s2 is not None:
                try:
                    while True:
                        s2.recv(1 << 17)
                except BlockingIOError:
                    pass
            if not pending and completed == added:
                break
        assert a.tx.broken is None
        assert completed == added == len(chains)
    finally:
        for s in (s1, s2):
            if s is not None:
                s.close()
        env.close()


@pytest.mark.parametrize("mrg", [False, True])
def test_rx_fill_direct_and_general_chains_complete_in_avail_order(mrg):
    # one-descriptor chains are written directly, the others (two buffers, indirect) through the
    # general path: the used entries still name the chains in avail order
    env = Env(size=16 << 20, in_order=True)
    try:
        drv, rx = env.pair(64, mrg_rxbuf=mrg, index=0)
        op = net.Op.rx_fill(rx, _frame(MAC_B, MAC_A, 300))
        got = 0
        for step in range(6):
            for i in range(10):
                if (step + i) % 4 == 1:
                    drv.add([], [(env.alloc(HDR), HDR), (env.alloc(1024), 1024)])
                elif (step + i) % 4 == 3:
                    drv.add([], [(env.alloc(2048), 2048)], indirect=True)
                else:
                    drv.add([], [(env.alloc(2048), 2048)])
            drv.publish()
            op.run(7 + step * 3, BIG)
            got += len(drv.get_used())  # raises if out of order
        assert rx.broken is None
        assert got == rx.stats()["chains"] == rx.stats()["packets"] > 40
    finally:
        env.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.integers(14, 3000), min_size=1, max_size=30),
    posts=st.lists(st.integers(0, 7), min_size=1, max_size=10),
    rx_buf=st.sampled_from([128, 512, 2048]),
    mrg=st.booleans(),
    source=st.sampled_from(["fill", "fd"]),
)
def test_rx_ops_complete_in_avail_order(frames, posts, rx_buf, mrg, source):
    env = Env(size=16 << 20, in_order=True)
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s1.setblocking(False)
    try:
        drv, rx = env.pair(16, mrg_rxbuf=mrg, index=0)
        if source == "fill":
            op = net.Op.rx_fill(rx, _frame(MAC_B, MAC_A, frames[0]))
        else:
            op = net.Op.rx_from_fd(rx, s1.fileno())
            for n in frames:
                s2.send(bytes(HDR) + _frame(MAC_B, MAC_A, n))
        got = 0
        for step in range(40):
            for _ in range(min(posts[step % len(posts)], drv.num_free)):
                drv.add([], [(env.alloc(rx_buf, 64), rx_buf)])
            drv.publish()
            op.run(3, BIG)
            got += len(drv.get_used())  # raises if out of order
        assert rx.broken is None
        assert got == (rx.stats()["chains"])
    finally:
        s1.close()
        s2.close()
        env.close()

