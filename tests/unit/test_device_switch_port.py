"""A switch device's port across re-plans (vhostx.device._replan, vhostx.net.NetDevice).

A switch port is taken by the plan of a device whose RX ring runs, even while its TX ring does
not run yet: that plan has no work. Before the fix, every request that re-planned in that state
(QEMU and a guest driver set ring 1 up in five or six requests after ring 0) took another port
for the same RX ring and lost the previous one: the switch flooded each frame of an unknown
destination into that ring once per leaked port (a guest driver on vfio-pci saw three copies of
each of its own TX frames), and the leaked ports kept writing into the ring after it stopped.
Driven through the sans-IO protocol with real memfds, no worker (NullBinding).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_device_repeats import HIGH, Wire, _features

from vhostx.config import parse_device_spec
from vhostx.net import NetDevice, SwitchRegistry
from virtio import vhost_user as vu
from virtio.vhost_user import Request as R


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire(queues=1)
    cfg = parse_device_spec("name=swp,socket=/tmp/unused.sock,port=switch,switch=swp")
    w.dev = NetDevice(cfg, w.binding, SwitchRegistry())  # type: ignore[arg-type]
    yield w
    w.close()


def _ports(w: Wire) -> list[int]:
    sw = w.dev._switch
    assert sw is not None
    return list(sw.ports)


def _ring(w: Wire, index: int) -> list[tuple[R, object]]:
    base = HIGH.uva + index * 0x10000
    return [
        (R.SET_VRING_NUM, vu.VringState(index, 256)),
        (R.SET_VRING_BASE, vu.VringState(index, 0)),
        (R.SET_VRING_ADDR, vu.VringAddr(index, 0, desc=base, used=base + 0x2000,
                                        avail=base + 0x1000)),
        (R.SET_VRING_KICK, vu.VringFile(index, nofd=True)),
        (R.SET_VRING_CALL, vu.VringFile(index, nofd=True)),
        (R.SET_VRING_ENABLE, vu.VringState(index, 1)),
    ]


def _start_memory(w: Wire) -> None:
    feats = _features(w.negotiate())
    assert w.send(R.SET_FEATURES, feats) is None
    for reg in (vu.MemRegion(gpa=0, size=0xA0000, uva=0x7F00_0000_0000, mmap_offset=0), HIGH):
        assert w.send(R.ADD_MEM_REG, vu.SingleMemRegion(reg), (w.mem_fd(),), True) == 0


def test_switch_port_not_leaked_by_replans_while_only_the_rx_ring_runs(wire: Wire) -> None:
    _start_memory(wire)
    for req, payload in _ring(wire, 0):
        assert wire.send(req, payload, need_reply=True) == 0
    assert wire.dev.vrings[0].queue is not None and wire.dev.vrings[1].queue is None
    assert len(_ports(wire)) == 1  # the RX ring's port; no work yet (no TX ring)
    for req, payload in _ring(wire, 1)[:-1]:  # ring 1 set up, not enabled: still RX only
        assert wire.send(req, payload, need_reply=True) == 0
        assert len(_ports(wire)) == 1, f"after {req.name}: ports {_ports(wire)}"
    req, payload = _ring(wire, 1)[-1]
    assert wire.send(req, payload, need_reply=True) == 0
    assert wire.dev.vrings[1].queue is not None
    assert len(_ports(wire)) == 1 and len(wire.binding.attached) == 1


def test_switch_port_released_when_the_rings_stop_after_rx_only_replans(wire: Wire) -> None:
    _start_memory(wire)
    for req, payload in _ring(wire, 0) + _ring(wire, 1)[:-1]:
        assert wire.send(req, payload, need_reply=True) == 0
    wire.send(R.GET_VRING_BASE, vu.VringState(0, 0))
    assert wire.dev.vrings[0].queue is None
    assert _ports(wire) == []  # nothing delivers into the stopped ring any more
