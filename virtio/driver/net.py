"""virtio-net driver over any transport: the net client of the driver side (tests, benchmarks,
the guest model and the passthrough driver).

``NetDriver`` drives queue pair ``p`` of a started ``virtio.transport.Transport``: TX queue
``2*p+1`` carries frames behind a zeroed net header, RX queue ``2*p`` is kept stocked with
device-writable buffers, ``recv`` waits for the RX interrupt and returns frames without the
header (merging MRG_RXBUF buffers). The per-packet work is the C core's (vx_drvq.c through
DriverQueue's batch API): one call copies a batch of frames into fixed buffers and posts them,
one reaps TX completions, one copies received frames out; Python runs once per batch.
Fixed buffers: buffer i of a queue belongs to descriptor i (``queue_size`` buffers of
``buf_size`` bytes per queue, allocated from the transport's driver memory).

The same class runs over vhost-user (virtio.frontend.VhostUserFrontend) and over virtio-pci
through VFIO (virtio.transport.pci.VirtioPciTransport): the transport is the only difference.
Threads: one thread owns a transport and its NetDriver (no locks).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from virtio import features as vf
from virtio.driver.split import DriverQueue
from virtio.errors import RemoteProtocolError, VhostError

if TYPE_CHECKING:
    from virtio.transport import Transport

__all__ = ["NetDriver"]

_PAGE = 4096


class NetDriver:
    """virtio-net over a started transport: RX queue 2*pair, TX queue 2*pair+1.

    ``buf_size`` is the size of each RX and TX buffer (the net header included). Without
    MRG_RXBUF the device must fit a whole packet in one RX buffer, so make it large enough.
    Counters: ``tx_packets``, ``rx_packets``, ``kicks`` (notifications sent), ``interrupts``
    (RX interrupts waited for and received).
    """

    def __init__(self, transport: Transport, *, buf_size: int = 2048) -> None:
        if not transport.connected or not transport.queues:
            raise VhostError(f"NetDriver needs a started transport (queues set up), got "
                             f"{type(transport).__name__} with {len(transport.queues)} queues")
        self.transport = transport
        self.fe = transport  # the name earlier versions used
        self.hdr_len = vf.net_hdr_len(transport.features)
        self.mrg_rxbuf = transport.has_feature(vf.VIRTIO_NET_F_MRG_RXBUF)
        if buf_size <= self.hdr_len:
            raise ValueError(f"buf_size must exceed the {self.hdr_len}-byte net header")
        self.buf_size = buf_size
        self.pairs = transport.num_queues // 2
        n = transport.queue_size
        for q in transport.queues[: 2 * self.pairs]:
            addr = transport.alloc(n * buf_size, _PAGE)
            off = addr - transport.dma_base
            q.attach_buffers(transport.mem[off : off + n * buf_size], addr, buf_size)
        self._rx_out = bytearray(n * buf_size)
        self._rx_view = memoryview(self._rx_out)
        self._rx_lens = array("I", bytes(4 * n))
        self.tx_packets = 0
        self.rx_packets = 0
        self.kicks = 0
        self.interrupts = 0
        for p in range(self.pairs):
            self._txq(p).set_interrupts(False)  # TX completions are polled
            self._refill(p)

    def _rxq(self, pair: int) -> DriverQueue:
        return self.transport.queues[2 * pair]

    def _txq(self, pair: int) -> DriverQueue:
        return self.transport.queues[2 * pair + 1]

    def _kick(self, index: int) -> None:
        self.transport.kick(index)
        self.kicks += 1

    # ------------------------------------------------------------------ TX
    def reap_tx(self, pair: int = 0) -> int:
        """Free the buffers of TX chains the device has used; returns how many."""
        try:
            return self._txq(pair).reap()
        except VhostError as err:
            raise RemoteProtocolError(f"TX queue {2 * pair + 1}: {err}") from err

    def send(self, frames: Sequence[bytes], pair: int = 0, *, timeout: float = 1.0) -> int:
        """Post ``frames`` on the TX queue (zeroed net header first) and kick if the device
        wants it. Waits up to ``timeout`` for room when the ring is full; returns frames posted."""
        if not frames:
            return 0
        return self.send_packed(b"".join(frames), array("I", map(len, frames)), pair,
                                timeout=timeout)

    def send_packed(self, data: bytes | memoryview, lens: array[int], pair: int = 0, *,
                    timeout: float = 1.0) -> int:
        """send() for frames already packed: ``data`` holds them back to back, ``lens`` (a
        uint32 array) their lengths. A driver that sends the same frames again and again packs
        them once (no list, join or length array per batch)."""
        q = self._txq(pair)
        if not lens:
            return 0
        longest = max(lens)
        nbuf = (self.hdr_len + longest + self.buf_size - 1) // self.buf_size
        if nbuf > q.size:
            raise ValueError(f"frame of {longest} bytes needs {nbuf} buffers > ring size")
        self.reap_tx(pair)
        sent = q.tx_frames(data, lens, self.hdr_len)
        if sent < len(lens):
            deadline = time.monotonic() + timeout
            view = memoryview(data)
            while sent < len(lens):
                if q.publish_batch():
                    self._kick(2 * pair + 1)
                if not self.reap_tx(pair):
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.0002)
                    continue
                off = sum(lens[:sent])
                sent += q.tx_frames(view[off:], lens[sent:], self.hdr_len)
        if q.publish_batch():
            self._kick(2 * pair + 1)
        self.tx_packets += sent
        return sent

    # ------------------------------------------------------------------ RX
    def _refill(self, pair: int) -> None:
        q = self._rxq(pair)
        if q.rx_post() and q.publish_batch():
            self._kick(2 * pair)

    def _reap_rx(self, pair: int) -> int:
        """Whole received frames copied into self._rx_out (lengths in self._rx_lens); counted."""
        try:
            n = self._rxq(pair).rx_frames(self.hdr_len, self.mrg_rxbuf, self._rx_out,
                                          self._rx_lens)
        except VhostError as err:
            raise RemoteProtocolError(f"RX queue {2 * pair}: {err}") from err
        self.rx_packets += n
        return n

    def _collect(self, pair: int) -> list[bytes]:
        n = self._reap_rx(pair)
        if not n:
            return []
        out: list[bytes] = []
        view, off = self._rx_view, 0
        for length in self._rx_lens[:n]:
            out.append(bytes(view[off : off + length]))
            off += length
        return out

    def poll_rx_count(self, pair: int = 0) -> int:
        """poll_rx() that only counts: the frames are reaped and the ring refilled, but no
        bytes object is made (a load generator that needs the count, not the frames)."""
        n = self._reap_rx(pair)
        self._refill(pair)
        return n

    def poll_rx(self, pair: int = 0) -> list[bytes]:
        """Frames received on RX queue 2*pair so far (no wait, interrupts left as they are),
        the ring refilled: for drivers that learn of completions their own way (posted
        interrupts: virtio.driver.posted)."""
        frames = self._collect(pair)
        self._refill(pair)
        return frames

    def recv(self, timeout: float = 1.0, pair: int = 0) -> list[bytes]:
        """Frames received on RX queue 2*pair, without the net header; waits up to ``timeout``
        for the first one (the RX interrupt), returns [] if none came."""
        q = self._rxq(pair)
        deadline = time.monotonic() + timeout
        while True:
            frames = self._collect(pair)
            self._refill(pair)
            if frames:
                return frames
            q.set_interrupts(True)
            frames = self._collect(pair)  # re-check after enabling: no lost interrupt
            if frames:
                self._refill(pair)
                return frames
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            if self.transport.wait_call(2 * pair, min(left, 0.05)):
                self.interrupts += 1
