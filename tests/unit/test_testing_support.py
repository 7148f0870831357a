"""virtio.testing.RecyclingDriver, the C guest of bench/micro_core.py, keeps a ring full."""

from __future__ import annotations

from test_core_env import Env

from virtio import net
from virtio.driver.split import VRING_DESC_F_WRITE, DriverQueue
from virtio.ring import DeviceQueue
from virtio.testing import RecyclingDriver

HDR = 12


def _ring(env: Env, size: int, *, rx: bool) -> tuple[RecyclingDriver, DeviceQueue, int]:
    total = DriverQueue.layout(size)[3]
    base = env.alloc(total, 4096)
    DriverQueue(env.view(base, total), base, size)  # lays out and zeroes the ring
    d_off, a_off, u_off, _ = DriverQueue.layout(size)
    drv = RecyclingDriver(env.mem, base + d_off, base + a_off, base + u_off, size)
    bufs = env.alloc(256 * size, 64)
    drv.fill_descs(bufs, 256, 256 if rx else HDR + 60, VRING_DESC_F_WRITE if rx else 0)
    dq = DeviceQueue(env.mem, index=0, size=size, desc_uva=env.uva(base + d_off),
                     avail_uva=env.uva(base + a_off), used_uva=env.uva(base + u_off))
    return drv, dq, bufs


def test_recycling_driver_refills_what_the_device_used():
    env = Env(size=8 << 20)
    try:
        drv, tx, _ = _ring(env, 16, rx=False)
        assert drv.post_all() == 16
        assert net.tx_sink(tx, 10, 1 << 30) == 10
        assert drv.recycle() == 10
        assert tx.pending() == 16  # 6 left + 10 offered again
        assert net.tx_sink(tx, 64, 1 << 30) == 16
        assert drv.recycle() == 16
        assert tx.stats()["bytes"] == 26 * 60
    finally:
        env.close()


def test_recycling_driver_rx_buffers_are_writable():
    env = Env(size=8 << 20)
    try:
        drv, rx, bufs = _ring(env, 8, rx=True)
        drv.post_all()
        frame = bytes(range(60))
        assert net.rx_fill(rx, frame, 8) == 8
        assert env.read(bufs + HDR, 60) == frame
        assert drv.recycle() == 8
        assert rx.pending() == 8
    finally:
        env.close()
