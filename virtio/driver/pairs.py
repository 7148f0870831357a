"""Queue-pair driver turns in C (vx_drvpair.c): a load generator's driver with no Python work per
packet. ``PairTurns`` keeps ``window`` copies of one frame in flight on every queue pair of a
``NetDriver`` over vhost-user (eventfd kicks): a turn of pair p reaps and drops its received
frames, re-stocks its RX ring, tops its TX ring up to ``window`` frames in flight (in flight =
sent minus received: an echo device's loop) and kicks where the device asks. Python decides
which pairs to turn (the notification path: eventfds, posted interrupts) and calls C once for
all of them.

The pairs' NetDriver counters (rx_packets, tx_packets, kicks) do not see these frames: read
``received``, ``sent`` and ``kicks`` here.
Threads: the thread that owns the NetDriver (one at a time).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from virtio._vx_core import ffi, lib
from virtio.errors import ConfigError, RemoteProtocolError

if TYPE_CHECKING:
    from virtio.driver.net import NetDriver

__all__ = ["PairTurns"]

_SCRATCH_FRAMES = 64  # frames one reap copies out (and drops) at most


class PairTurns:
    """The C driver turns of every queue pair of ``drv`` (see the module docstring)."""

    def __init__(self, drv: NetDriver, frame: bytes, window: int) -> None:
        t = drv.transport
        kick_fds = getattr(t, "kick_fds", None)
        if not kick_fds or len(kick_fds) < 2 * drv.pairs:
            raise ConfigError(f"PairTurns needs eventfd kicks (vhost-user), got "
                              f"{type(t).__name__}")
        if not 1 <= window <= t.queue_size:
            raise ConfigError(f"window: allowed 1..{t.queue_size} (the ring size), got {window}")
        if not frame:
            raise ConfigError("PairTurns needs a frame of at least one byte")
        need = drv.hdr_len + len(frame)
        if need > drv.buf_size * min(t.queue_size, _SCRATCH_FRAMES):
            raise ConfigError(f"frame of {len(frame)} bytes: allowed up to "
                              f"{drv.buf_size * min(t.queue_size, _SCRATCH_FRAMES) - drv.hdr_len}")
        self.drv = drv
        self.pairs = drv.pairs
        self.window = window
        self._frames = ffi.new("uint8_t[]", frame * window)
        self._lens = ffi.new("uint32_t[]", [len(frame)] * window)
        self._scratch = ffi.new("uint8_t[]", _SCRATCH_FRAMES * drv.buf_size)
        self._c: Any = ffi.new("struct vx_drvpair[]", self.pairs)
        for p in range(self.pairs):
            rxq, txq = t.queues[2 * p], t.queues[2 * p + 1]
            c = self._c[p]
            c.rx, c.tx = rxq._q, txq._q
            c.rx_bufs, c.rx_addr, c.rx_buf_size = rxq._need_fixed()
            c.tx_bufs, c.tx_addr, c.tx_buf_size = txq._need_fixed()
            c.hdr_len = drv.hdr_len
            c.mrg_rxbuf = 1 if drv.mrg_rxbuf else 0
            c.frames, c.lens, c.window = self._frames, self._lens, window
            c.scratch, c.scratch_len = self._scratch, len(self._scratch)
            c.rx_kick_fd, c.tx_kick_fd = kick_fds[2 * p], kick_fds[2 * p + 1]
        self._err = ffi.new("uint32_t *")
        self._all = array("I", range(self.pairs))

    def turn(self, pairs: Sequence[int] | None = None) -> int:
        """One turn of each pair named (every pair when None); returns frames received."""
        idx = self._all if pairs is None else array("I", pairs)
        if pairs is not None and any(not 0 <= p < self.pairs for p in idx):
            raise ValueError(f"pairs: each 0..{self.pairs - 1}, got {list(pairs)}")
        r = lib.vx_drvpair_turns(self._c, ffi.from_buffer("uint32_t[]", idx), len(idx),
                                 self._err)
        if r < 0:
            raise self.error(int(self._err[0]), int(r))
        return int(r)

    def error(self, pair: int, rc: int) -> RemoteProtocolError:
        """The protocol error of `pair`'s failed turn (rc < 0: its vx_drvq return; the pair's
        err_ring says which ring), naming the queue."""
        ring = int(self._c[pair].err_ring)
        q = self.drv.transport.queues[2 * pair + ring]
        return RemoteProtocolError(f"queue {2 * pair + ring}: {q._device_error(rc)}")

    def inflight(self, pair: int) -> int:
        return int(self._c[pair].inflight)

    @property
    def received(self) -> int:
        return sum(int(self._c[p].received) for p in range(self.pairs))

    @property
    def sent(self) -> int:
        return sum(int(self._c[p].sent) for p in range(self.pairs))

    @property
    def kicks(self) -> int:
        """Kick eventfd writes the turns made."""
        return sum(int(self._c[p].kicks) for p in range(self.pairs))
