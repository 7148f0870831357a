"""The driver side publishes avail->idx with one store: a device polling the ring in parallel
never reads a torn or zeroed index.

struct.pack_into zeroes its target before writing it, so a device reading avail->idx at that
instant saw 0 and (vhostx) broke the ring or (DPDK) dequeued 64 Ki stale entries. The device
here is the C core on another thread, spinning on the ring with the GIL released.

The driver side also orders its plain Python stores and loads with the C core's fences
(release before avail->idx, acquire after used->idx, full where a notification could be lost):
the spy tests pin each fence to its place.
"""

from __future__ import annotations

import threading

from test_core_env import Env

from virtio import net
from virtio.driver import split
from virtio.errors import GuestError

HDR = 12


def test_publish_never_shows_a_zero_avail_idx_to_a_polling_device():
    env = Env(size=8 << 20)
    try:
        drv, tx = env.pair(64, index=1, start_idx=0x7000)  # far from 0: a zeroed idx is "ahead"
        frame = bytes(HDR + 60)
        bufs = [env.alloc(len(frame), 8) for _ in range(64)]
        for g in bufs:
            env.write(g, frame)
        total = 20_000
        served = 0
        error: list[BaseException] = []
        done = threading.Event()

        def device() -> None:
            nonlocal served
            try:
                while not done.is_set() or served < total:
                    served += net.tx_sink(tx, 256, 1 << 30, spin_ns=2_000_000)
                    if served >= total:
                        return
            except GuestError as err:  # the torn-index bug ends here
                error.append(err)

        t = threading.Thread(target=device)
        t.start()
        sent = 0
        try:
            while sent < total and not error:
                drv.get_used()
                if drv.num_free == 0:
                    continue
                g = bufs[sent % len(bufs)]
                drv.add([(g, len(frame))])
                drv.publish()
                sent += 1
        finally:
            done.set()
            if error or sent < total:
                drv.write_avail_idx((drv.avail_idx + 0x8000) & 0xFFFF)  # unblock a spinning call
            t.join(60)
        assert not t.is_alive()
        assert not error, f"device saw a torn avail idx: {error[0]}"
        assert served == total and tx.broken is None
    finally:
        env.close()


def _fence_spy(monkeypatch, drv, events: list[tuple[str, int, int]]) -> None:
    """Record each C fence the driver issues with avail->idx and used_event at that moment."""

    def spy(name: str):
        def fence() -> None:
            events.append((name, drv._m16[(drv._avail_off + 2) >> 1], drv.read_used_event()))

        return fence

    for name in ("release", "acquire", "full"):
        monkeypatch.setattr(split, f"_fence_{name}", spy(name))


def test_publish_fences_release_before_the_index_and_full_after_it(monkeypatch):
    env = Env()
    try:
        drv, _ = env.pair(8)
        drv.add([(env.alloc(64), 64)])
        events: list[tuple[str, int, int]] = []
        _fence_spy(monkeypatch, drv, events)
        drv.publish()
        assert [(name, idx) for name, idx, _ in events] == [("release", 0), ("full", 1)]
    finally:
        env.close()


def test_get_used_fences_acquire_after_the_index_and_full_after_used_event(monkeypatch):
    env = Env()
    try:
        drv, tx = env.pair(8, event_idx=True)
        drv.add([(env.alloc(64), 64)])
        drv.publish()
        assert net.tx_sink(tx, 8, 1 << 20) == 1
        events: list[tuple[str, int, int]] = []
        _fence_spy(monkeypatch, drv, events)
        assert len(drv.get_used()) == 1
        # acquire right after reading used->idx (used_event still 0), full once it moved to 1
        assert [(name, ev) for name, _, ev in events] == [("acquire", 0), ("full", 1)]
        events.clear()
        drv.set_interrupts(True)
        assert [name for name, _, _ in events] == ["full"]  # the caller re-checks used after it
    finally:
        env.close()
