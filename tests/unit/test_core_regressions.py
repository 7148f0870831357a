"""Regression tests for bugs found in the C core by fuzzing and review, each through the Python
API (virtio.net over DeviceQueues on a memfd guest memory). Named after the bug they pin."""

from __future__ import annotations

from test_core_env import Env

from virtio import net
from virtio.driver.split import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, DriverQueue

W = VRING_DESC_F_WRITE


def test_mrg_rxbuf_never_publishes_more_used_entries_than_the_ring_holds() -> None:
    """Under MRG_RXBUF the used entries of whole frames wait in the shadow until the next flush;
    a frame that started with size-1 entries waiting could add size-1 more when the driver moved
    avail->idx during the call (a hostile guest: here one RX buffer overlaps avail->idx and the
    ring, so the frame's own bytes post more chains). The flush then wrote 14 entries into an
    8-entry used ring from slot 7: 5 entries (40 bytes) past its end, and used->idx jumped 14."""
    size, start = 8, 7
    env = Env(size=1 << 20)
    try:
        drv, rx = env.pair(size, start_idx=start, hdr_len=12, mrg_rxbuf=True)
        used_off = DriverQueue.layout(size)[2]
        base = drv.desc_gpa
        after_used = base + used_off + 4 + 8 * size  # avail_event and what follows
        env.write(after_used, b"\xab" * 64)
        a, x, t = 0, 1, 2
        big = env.alloc(64)
        hdr_buf = env.alloc(12)
        tiny = env.alloc(1)
        drv.write_desc(a, big, 64, W, 0)
        drv.write_desc(x, hdr_buf, 12, W | VRING_DESC_F_NEXT, 3)
        drv.write_desc(3, drv.avail_gpa + 2, 2 + 2 * size, W, 0)  # avail->idx and ring[]
        drv.write_desc(t, tiny, 1, W, 0)
        for _ in range(size - 1):
            drv.push_avail(a)
        drv.push_avail(x)
        drv.publish()
        # the frame (after a 12-byte header): avail->idx = 21 (6 more chains), every ring slot T
        frame = (start + size + 6).to_bytes(2, "little") + t.to_bytes(2, "little") * size + bytes(6)
        delivered = net.rx_fill(rx, frame, size)
        moved = (drv.read_used_idx() - start) & 0xFFFF
        assert moved <= size, f"used->idx moved {moved} in a ring of {size}"
        assert env.read(after_used, 64) == b"\xab" * 64, "the device wrote past the used ring"
        # the 7 frames before are delivered; the 8th (its chains rewritten to 1-byte ones) is not
        assert delivered == size - 1 and moved == size - 1
        assert rx.stats()["ring_full"] == 1
    finally:
        env.close()


def test_echo_into_an_rx_buffer_overlapping_the_tx_buffer_is_a_defined_copy() -> None:
    """A guest may hand the device an RX buffer that overlaps the TX buffer it echoes (same guest
    memory). The copy between the two was a memcpy of overlapping ranges (undefined behaviour;
    ASan: memcpy-param-overlap, found by fuzz/fuzz_tx.c through the switch); it is a memmove."""
    from test_net_core import MAC_A, MAC_B, _frame

    env = Env(size=1 << 20)
    try:
        rx_drv, rx = env.pair(64, index=0)
        tx_drv, tx = env.pair(64, index=1)
        frame = _frame(MAC_B, MAC_A, 600, seed=3)
        data = bytes(12) + frame
        g = env.alloc(len(data) + 128) + 64
        env.write(g, data)
        tx_drv.add([(g, len(data))])
        tx_drv.publish()
        # 6 bytes before the TX buffer: the header and swapped MACs land on bytes already read,
        # the frame's body is copied 6 bytes down onto itself
        rx_drv.add([], [(g - 6, len(data))])
        rx_drv.publish()
        assert net.echo(tx, rx, 8, 1 << 40) == 1
        ((_, n),) = rx_drv.get_used()
        got = env.read(g - 6, n)
        assert got[12:] == frame[6:12] + frame[0:6] + frame[12:]
    finally:
        env.close()
