"""The driver side publishes avail->idx with one store: a device polling the ring in parallel
never reads a torn or zeroed index.

struct.pack_into zeroes its target before writing it, so a device reading avail->idx at that
instant saw 0 and (vhostx) broke the ring or (DPDK) dequeued 64 Ki stale entries. The device
here is the C core on another thread, spinning on the ring with the GIL released.
"""

from __future__ import annotations

import threading

from test_core_env import Env

from virtio import net
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
