"""Where a ring resumes when a frontend (re)connects to rings that already carried traffic.

DPDK 22.11 virtio-user always sends SET_VRING_BASE 0, also when it reconnects to a restarted
backend (server=1) with rings whose used->idx is far ahead; QEMU 7.2 sends the index GET_VRING_BASE
gave it, or, when the backend was killed and never answered, the used index it read back from
guest memory. A net device completes every chain it takes in order before a ring stops, so
used->idx is where it stopped: a SET_VRING_BASE that disagrees with it is stale and the ring
resumes from used->idx (as DPDK's own backend does). Before the fix the daemon took DPDK's 0 at
its word: it served again every chain the previous daemon had served (duplicates), or, with
used->idx more than a ring ahead, broke the device ("avail index jumped").

A real NetDevice (sink port, a binding that runs nothing) is driven through the sans-IO protocol
with a real memfd.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from test_device_repeats import NullBinding

from vhostx.config import parse_device_spec
from vhostx.net import NetDevice, SwitchRegistry
from virtio import features as vf
from virtio import vhost_user as vu
from virtio.vhost_user import Request as R

MB = 1 << 20
REGION = vu.MemRegion(gpa=0, size=MB, uva=0x7F00_0000_0000, mmap_offset=0)
RING = 0x10000  # ring i at REGION + i * RING: desc, avail (+0x1000), used (+0x2000)


class Wire:
    def __init__(self) -> None:
        cfg = parse_device_spec("name=resume,socket=/tmp/unused.sock,port=sink")
        self.dev = NetDevice(cfg, NullBinding(), SwitchRegistry())  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self.memfd = os.memfd_create("vx-resume-test")
        os.ftruncate(self.memfd, MB)
        self.connect()

    def connect(self) -> None:
        self.back = vu.BackendConnection()
        self.front = vu.FrontendConnection()

    def hang_up(self) -> None:
        self.loop.run_until_complete(self.dev.disconnect())

    def close(self) -> None:
        self.loop.run_until_complete(self.dev.close())
        self.loop.close()
        os.close(self.memfd)

    def send(self, req: R, payload: Any = None, fds: tuple[int, ...] = ()) -> Any:
        data = self.front.request(req, payload, fds, need_reply=False)
        (msg,) = self.back.feed(data, list(fds))
        reply = self.loop.run_until_complete(self.dev.handle(self.back, msg))
        if not reply:
            return None
        (answer,) = self.front.feed(reply)
        return answer.payload

    def set_indexes(self, index: int, *, avail: int, used: int) -> None:
        """What the guest's rings hold: avail->idx and used->idx of ring `index`."""
        base = index * RING
        os.pwrite(self.memfd, struct.pack("<H", avail), base + 0x1000 + 2)
        os.pwrite(self.memfd, struct.pack("<H", used), base + 0x2000 + 2)

    def start(self, base: int) -> None:
        """A frontend sets up both rings from scratch with SET_VRING_BASE `base`."""
        offered = self.send(R.GET_FEATURES)
        self.send(R.SET_PROTOCOL_FEATURES, self.send(R.GET_PROTOCOL_FEATURES))
        self.send(R.SET_OWNER)
        self.send(R.SET_FEATURES, offered & ~(1 << vf.VIRTIO_F_IN_ORDER))
        self.send(R.ADD_MEM_REG, vu.SingleMemRegion(REGION), (os.dup(self.memfd),))
        for index in (0, 1):
            uva = REGION.uva + index * RING
            self.send(R.SET_VRING_NUM, vu.VringState(index, 256))
            self.send(R.SET_VRING_BASE, vu.VringState(index, base))
            self.send(R.SET_VRING_ADDR, vu.VringAddr(index, 0, desc=uva, used=uva + 0x2000,
                                                     avail=uva + 0x1000))
            self.send(R.SET_VRING_KICK, vu.VringFile(index, nofd=True))
            self.send(R.SET_VRING_CALL, vu.VringFile(index, nofd=True))
            self.send(R.SET_VRING_ENABLE, vu.VringState(index, 1))

    def queue(self, index: int) -> Any:
        q = self.dev.vrings[index].queue
        assert q is not None, f"ring {index} is not running"
        return q

    def last_avail(self, index: int) -> int:
        return int(self.queue(index).last_avail_idx)


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    yield w
    w.close()


def test_dpdk_reconnect_with_vring_base_0_resumes_from_used_idx(wire: Wire) -> None:
    """The previous daemon served 300 TX chains (more than a ring: taking DPDK's 0 at its word
    breaks the device) and 40 RX buffers; DPDK reconnects and says base 0 for both rings."""
    wire.set_indexes(1, avail=300, used=300)
    wire.set_indexes(0, avail=40 + 256, used=40)  # RX: a full ring of buffers is offered
    wire.start(base=0)
    assert wire.dev.broken is None
    assert wire.last_avail(1) == 300
    assert wire.queue(1).pending() == 0  # nothing served twice
    assert wire.last_avail(0) == 40
    assert wire.dev.counters.resumed_from_used == 2
    assert wire.send(R.GET_VRING_BASE, vu.VringState(1, 0)) == vu.VringState(1, 300)


def test_qemu_reconnect_after_kill_resumes_where_it_says(wire: Wire) -> None:
    """QEMU after a kill -9 of the backend: SET_VRING_BASE carries the used index it restored
    from guest memory, which agrees with the ring; nothing to resync."""
    wire.set_indexes(1, avail=1000, used=990)  # 10 chains the guest added during the outage
    wire.set_indexes(0, avail=1200, used=990)
    wire.start(base=990)
    assert wire.last_avail(1) == 990
    assert wire.queue(1).pending() == 10
    assert wire.last_avail(0) == 990
    assert wire.dev.counters.resumed_from_used == 0


def test_first_start_of_fresh_rings_is_not_a_resync(wire: Wire) -> None:
    wire.start(base=0)
    assert wire.last_avail(0) == wire.last_avail(1) == 0
    assert wire.dev.counters.resumed_from_used == 0


def test_reconnect_after_a_clean_stop_resumes_at_the_answered_base(wire: Wire) -> None:
    """GET_VRING_BASE answered 77 at the stop; the next frontend says 77 again."""
    wire.set_indexes(1, avail=77, used=77)
    wire.set_indexes(0, avail=77 + 256, used=77)
    wire.start(base=77)
    assert wire.send(R.GET_VRING_BASE, vu.VringState(1, 0)) == vu.VringState(1, 77)
    wire.hang_up()
    wire.connect()
    wire.start(base=77)
    assert wire.last_avail(1) == 77
    assert wire.dev.counters.resumed_from_used == 0
