"""DriverQueue's batch API (vx_drvq.c) against the C core's device side in the same process:
frames copied in and out byte for byte, chains over several buffers, MRG_RXBUF merging, the
bookkeeping shared with the single-chain API, and a device that lies about used entries."""

from __future__ import annotations

import os
import socket
import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_env import Env

from virtio import net
from virtio.errors import VhostError

HDR = 12
BUF = 256


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


def _attach(env: Env, drv, buf_size: int = BUF) -> int:
    base = env.alloc(drv.size * buf_size, 4096)
    drv.attach_buffers(env.view(base, drv.size * buf_size), base, buf_size)
    return base


def _dgram() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_tx_frames_reach_the_device_byte_for_byte_and_reap_frees_them(env):
    drv, dev = env.pair(16, index=1)
    _attach(env, drv)
    frames = [os.urandom(60 + 7 * i) for i in range(10)] + [os.urandom(600)]  # 600: 3 buffers
    assert drv.tx_frames(b"".join(frames), array("I", map(len, frames)), HDR) == 11
    assert drv.num_free == 16 - 10 - 3
    assert drv.publish_batch() is True and drv.kicks == 1
    a, b = _dgram()
    try:
        assert net.tx_to_fd(dev, a.fileno(), 64, 1 << 20) == 11
        got = [b.recv(4096) for _ in frames]
    finally:
        a.close()
        b.close()
    assert got == [bytes(HDR) + f for f in frames]
    assert drv.reap() == 11 and drv.num_free == 16 and drv.in_flight == 0


def test_tx_frames_stops_when_the_ring_is_full(env):
    drv, dev = env.pair(8, index=1)
    _attach(env, drv)
    frames = [bytes([i]) * 100 for i in range(12)]
    assert drv.tx_frames(b"".join(frames), array("I", map(len, frames)), HDR) == 8
    assert drv.num_free == 0
    drv.publish_batch()
    assert net.tx_sink(dev, 64, 1 << 20) == 8
    assert drv.reap() == 8
    assert drv.tx_frames(b"".join(frames[8:]), array("I", [100] * 4), HDR) == 4


def test_rx_frames_copy_out_without_the_header(env):
    drv, dev = env.pair(16, index=0)
    _attach(env, drv)
    assert drv.rx_post() == 16 and drv.num_free == 0
    drv.publish_batch()
    a, b = _dgram()
    frames = [os.urandom(64 + i) for i in range(5)]
    try:
        for f in frames:
            a.send(bytes(HDR) + f)
        assert net.rx_from_fd(dev, b.fileno(), 64) == 5
    finally:
        a.close()
        b.close()
    out, lens = bytearray(16 * BUF), array("I", bytes(4 * 16))
    assert drv.rx_frames(HDR, False, out, lens) == 5
    assert list(lens[:5]) == [len(f) for f in frames]
    assert bytes(out[: sum(map(len, frames))]) == b"".join(frames)
    assert drv.num_free == 5 and drv.rx_post() == 5


def test_rx_frames_merge_mrg_rxbuf_buffers_and_wait_for_the_last_one(env):
    drv, _dev = env.pair(8, index=0)
    base = _attach(env, drv)
    drv.rx_post()
    frame = os.urandom(BUF * 2 + 50 - HDR)
    parts = [frame[: BUF - HDR], frame[BUF - HDR : 2 * BUF - HDR], frame[2 * BUF - HDR :]]
    # play the device by hand: buffers 7, 6, 5 (the stack hands out 0 first: ids 0, 1, 2)
    used_off = drv.used_gpa
    for k, part in enumerate(parts):
        data = (struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 3) if k == 0 else b"") + part
        env.write(base + k * BUF, data)
        env.write(used_off + 4 + 8 * k, struct.pack("<II", k, len(data)))
    out, lens = bytearray(8 * BUF), array("I", bytes(32))
    env.write(used_off + 2, struct.pack("<H", 2))  # two of three published: nothing yet
    assert drv.rx_frames(HDR, True, out, lens) == 0 and drv.last_used == 0
    env.write(used_off + 2, struct.pack("<H", 3))
    assert drv.rx_frames(HDR, True, out, lens) == 1
    assert lens[0] == len(frame) and bytes(out[: len(frame)]) == frame


def test_single_chain_api_and_batches_share_the_bookkeeping(env):
    drv, dev = env.pair(8, index=1)
    _attach(env, drv)
    g = env.alloc(128)
    env.write(g, bytes(HDR) + b"x" * 60)
    head = drv.add([(g, HDR + 60)])
    assert drv.tx_frames(b"y" * 60, array("I", [60]), HDR) == 1
    assert drv.num_free == 6 and drv.in_flight == 2
    drv.publish()
    assert net.tx_sink(dev, 8, 1 << 20) == 2
    used = drv.get_used()
    assert used[0][0] == head and drv.num_free == 8


def test_in_order_batches_take_descriptors_in_ring_order():
    env = Env(in_order=True)
    try:
        drv, dev = env.pair(8, index=1)
        _attach(env, drv)
        for _ in range(3):  # wrap the FIFO of free ids several times
            assert drv.tx_frames(b"z" * 300, array("I", [100, 100, 100]), HDR) == 3
            drv.publish_batch()
            assert net.tx_sink(dev, 8, 1 << 20) == 3
            assert drv.reap() == 3
    finally:
        env.close()


def test_device_returning_a_head_not_in_flight_is_refused(env):
    drv, _dev = env.pair(8, index=0)
    _attach(env, drv)
    drv.rx_post()
    env.write(drv.used_gpa + 4, struct.pack("<II", 9, 64))
    env.write(drv.used_gpa + 2, struct.pack("<H", 1))
    with pytest.raises(VhostError, match="head 9 which is not in flight"):
        drv.rx_frames(HDR, False, bytearray(4096), array("I", bytes(32)))


def test_device_publishing_more_used_than_in_flight_is_refused(env):
    drv, _dev = env.pair(8, index=1)
    _attach(env, drv)
    drv.tx_frames(b"q" * 60, array("I", [60]), HDR)
    env.write(drv.used_gpa + 2, struct.pack("<H", 5))
    with pytest.raises(VhostError, match="5 used entries but only 1 are in flight"):
        drv.reap()


def test_rx_length_beyond_the_buffer_is_refused(env):
    drv, _dev = env.pair(8, index=0)
    _attach(env, drv)
    drv.rx_post()
    env.write(drv.used_gpa + 4, struct.pack("<II", 0, BUF + 1))
    env.write(drv.used_gpa + 2, struct.pack("<H", 1))
    with pytest.raises(VhostError, match=f"{BUF + 1} bytes into a {BUF}-byte buffer"):
        drv.rx_frames(HDR, False, bytearray(4096), array("I", bytes(32)))


def test_batch_api_needs_attached_buffers(env):
    drv, _dev = env.pair(8, index=0)
    with pytest.raises(ValueError, match="attach_buffers"):
        drv.rx_post()


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3 * BUF)), max_size=12),
    idx=st.integers(0, 65535),
    mrg=st.booleans(),
    nbufs=st.integers(0, 20),
)
def test_hostile_used_ring_never_crashes_or_frees_twice(entries, idx, mrg, nbufs):
    """Random used entries from a lying device: rx_frames and reap return or raise VhostError;
    no descriptor is ever free twice (free + in flight never exceed the ring)."""
    env = Env(size=1 << 20)
    try:
        for index in (0, 1):
            drv, _dev = env.pair(8, index=index)
            base = _attach(env, drv)
            if index == 0:
                drv.rx_post()
            else:
                drv.tx_frames(b"t" * 600, array("I", [100] * 6), HDR)
            for k in range(8):
                env.write(base + k * BUF, struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, nbufs))
            for k, (hid, ln) in enumerate(entries):
                env.write(drv.used_gpa + 4 + 8 * k, struct.pack("<II", hid, ln))
            env.write(drv.used_gpa + 2, struct.pack("<H", idx))
            try:
                if index == 0:
                    drv.rx_frames(HDR, mrg, bytearray(8 * BUF), array("I", bytes(32)))
                else:
                    drv.reap()
            except VhostError:
                pass
            held = drv.in_flight
            assert drv.num_free <= 8 and drv.num_free + held <= 8
    finally:
        env.close()
