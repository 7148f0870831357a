"""virtio.driver.pairs (vx_drvpair.c): a queue pair's driver turn in C, against a device written
in Python over the fake backend's mapping (test_frontend): the window kept in flight, received
frames reaped and the RX ring re-stocked, kicks where the device asks, a hostile used entry
refused as a protocol error, bad arguments refused with the allowed range."""

from __future__ import annotations

import os
import struct

import pytest
from test_frontend import FakeBackend, PyDevice, backend, finish, net_setup, sockpath

from virtio.driver.pairs import PairTurns
from virtio.errors import ConfigError, RemoteProtocolError

__all__ = ["backend", "sockpath"]  # the fixtures, imported for pytest

FRAME = bytes.fromhex("525400000001020000000001") + b"\x88\xb5" + bytes(range(50))


def tx_frames(tx: PyDevice) -> list[tuple[int, bytes]]:
    """Every chain the driver posted on TX: (head, frame without the 12-byte header)."""
    out = []
    while (c := tx.pop()) is not None:
        head, chain = c
        data = b"".join(bytes(tx.m[a : a + ln]) for a, ln, _fl in chain)
        assert data[:12] == bytes(12)
        out.append((head, data[12:]))
    return out


def deliver(rx: PyDevice, frames: int) -> None:
    """Write `frames` copies of FRAME into the driver's RX buffers and publish them."""
    hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
    for _ in range(frames):
        c = rx.pop()
        assert c is not None
        head, ((addr, _ln, _fl),) = c
        rx.m[addr : addr + 12 + len(FRAME)] = hdr + FRAME
        rx.push(head, 12 + len(FRAME))
    rx.publish()


def test_pair_turn_keeps_the_window_in_flight_reaps_and_restocks(backend: FakeBackend) -> None:
    fe, drv, rx, tx = net_setup(backend)
    turns = PairTurns(drv, FRAME, window=5)
    assert turns.turn() == 0
    posted = tx_frames(tx)
    assert [f for _h, f in posted] == [FRAME] * 5 and turns.inflight(0) == 5
    assert os.eventfd_read(tx.kick_fd) >= 1 and turns.kicks >= 1
    for head, _f in posted:
        tx.push(head, 0)
    tx.publish()
    deliver(rx, 3)
    assert turns.turn([0]) == 3
    assert turns.inflight(0) == 5 and turns.received == 3 and turns.sent == 8
    assert [f for _h, f in tx_frames(tx)] == [FRAME] * 3  # topped up by what came back
    # the three RX buffers were offered again: 61 never used, then those three, all writable
    again = []
    while (c := rx.pop()) is not None:
        again.append(c)
    assert len(again) == 64 and all(chain[0][2] & 2 for _h, chain in again)
    assert turns.turn([0]) == 0  # nothing new: nothing received, the window is full
    finish(backend, fe)


def test_pair_turn_a_used_head_not_in_flight_is_a_protocol_error(backend: FakeBackend) -> None:
    fe, drv, rx, _tx = net_setup(backend)
    turns = PairTurns(drv, FRAME, window=2)
    rx.push(999, 12 + len(FRAME))  # no such descriptor
    rx.publish()
    with pytest.raises(RemoteProtocolError, match=r"queue 0: .*head 999"):
        turns.turn()
    finish(backend, fe)


def test_pair_turns_refuse_bad_arguments(backend: FakeBackend) -> None:
    fe, drv, _rx, _tx = net_setup(backend)
    with pytest.raises(ConfigError, match=r"window: allowed 1\.\.64"):
        PairTurns(drv, FRAME, window=0)
    with pytest.raises(ConfigError, match=r"window: allowed 1\.\.64"):
        PairTurns(drv, FRAME, window=65)
    with pytest.raises(ConfigError, match="at least one byte"):
        PairTurns(drv, b"", window=1)
    turns = PairTurns(drv, FRAME, window=1)
    with pytest.raises(ValueError, match=r"pairs: each 0\.\.0"):
        turns.turn([1])
    finish(backend, fe)
