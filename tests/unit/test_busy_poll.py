"""Bounded busy-poll inside one C batch (spin_ns), and the QueueWorkItem counters seam.

No timed assertions: time bounds here only keep a broken build from hanging the suite.
"""

from __future__ import annotations

import pytest
from test_core_env import Env

from vhostx.net import QueueWorkItem
from virtio import net

HDR = 12
BIG = 1 << 40


@pytest.fixture
def env():
    e = Env(size=8 << 20)
    yield e
    e.close()


def _send(env: Env, drv, frames: list[bytes]) -> None:
    for f in frames:
        g = env.alloc(HDR + len(f), 8)
        env.write(g, bytes(HDR) + f)
        drv.add([(g, HDR + len(f))])
    drv.publish()


# ---- QueueWorkItem: device and counters() (internal-api.md, "QueueWork") ---------------------


def test_work_item_device_and_counters(env):
    drv, tx = env.pair(64, index=1)
    work = QueueWorkItem("net7.tx0", tx, lambda p, b: net.tx_sink(tx, p, b), kick_fd=-1)
    assert work.device == "net7"
    assert QueueWorkItem("x.tx0", tx, work.run, kick_fd=-1, device="dev").device == "dev"
    c0 = work.counters()
    for key in ("packets", "bytes", "interrupts", "interrupts_suppressed", "ring_full",
                "ring_empty", "batches"):
        assert c0[key] == 0, key
    assert work.run(64, BIG) == 0
    assert work.counters()["ring_empty"] == 1
    _send(env, drv, [b"a" * 60, b"b" * 100])
    assert work.run(64, BIG) == 2
    c = work.counters()
    assert (c["packets"], c["bytes"], c["batches"]) == (2, 160, 1)
