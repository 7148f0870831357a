"""The guest-model client of the `interrupts` scenario: ONE driver thread serving N queue pairs
of an echo device, learning of RX completions either from one call eventfd per queue or from a
posted-interrupt domain (virtio.driver.posted), and counting what it costs.

- `IrqClient(sock, pairs, posted)`: connects (VhostUserFrontend + NetDriver), and with `posted`
  negotiates VHOSTX_POSTED_IRQ and registers one domain holding every RX vring.
- `stream(duration, rate_pps)`: frames spread round robin over the pairs at `rate_pps` in total,
  echoes received; 0: as fast as the driver goes, each pair kept at `window` frames in flight by
  C driver turns (virtio.driver.pairs) of the pairs the notification path names, the whole
  driver loop in C by default (virtio.driver.serve; `loop="python"`: the notification path in
  Python, one C call per wake-up). Returns packets, elapsed time, the driver's syscalls and CPU.
- `pingpong(count)`: one frame in flight (pair i % N), the driver sleeping between; RTTs in ns.

Syscalls counted are the driver's own on the notification path: kicks (eventfd writes), waits
(epoll_wait over the per-queue eventfds, select() on the posted wake eventfd) and eventfd reads.
`kicks` counts the first kind on its own: kicks are the driver-to-device direction, which the
daemon's mode decides (a polling worker suppresses them), not the interrupt delivery mode.
The driver's per-packet work is C's in every mode (unlimited streams: the C loop, or one C call
per wake-up for every pair named; paced streams and ping-pong: C batches per pair, no Python
object per frame): what differs between modes is the notification path.

Threads: the thread that made the client (one driver thread, like a vCPU).
"""

from __future__ import annotations

import os
import select
import struct
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from virtio.driver.pairs import PairTurns
from virtio.driver.posted import PostedArea, PostedDomain, register
from virtio.driver.serve import eventfd_server, posted_server
from virtio.frontend import DEFAULT_PROTOCOL_FEATURES, NetDriver, VhostUserFrontend
from virtio.vhost_user import ProtocolFeature as PF

__all__ = ["LOOPS", "IrqClient", "StreamResult"]

LOOPS = ("c", "python")  # an unlimited stream's driver loop (IrqClient._unlimited)

_TS = struct.Struct("<Q")
_ETH = bytes.fromhex("525400000001" "020000000001" "0800")


@dataclass
class StreamResult:
    packets: int = 0
    sent: int = 0
    elapsed_s: float = 0.0
    syscalls: int = 0  # kicks included
    kicks: int = 0  # of `syscalls`: eventfd writes to the device (driver-to-device direction)
    wakeups: int = 0  # notifications the driver saw (eventfd reads, posted wake-ups)
    driver_cpu_s: float = 0.0
    rtts_ns: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d.pop("rtts_ns")
        return d


class IrqClient:
    def __init__(self, sock: str, pairs: int, *, posted: bool, size: int = 64,
                 queue_size: int = 256) -> None:
        pf = DEFAULT_PROTOCOL_FEATURES | ((1 << PF.VHOSTX_POSTED_IRQ) if posted else 0)
        mem = max(64 << 20, 2 * pairs * queue_size * 2048 + (32 << 20))  # RX + TX buffers
        self.fe = VhostUserFrontend(sock, queues=2 * pairs, queue_size=queue_size,
                                    protocol_features=pf, mem_size=mem)
        self.fe.connect()
        self.drv = NetDriver(self.fe)
        self.pairs = pairs
        self.frame = _ETH + bytes(max(60, size) - len(_ETH))
        self.area: PostedArea | None = None
        self.dom: PostedDomain | None = None
        self.syscalls = 0
        self.kicks = 0
        self.wakeups = 0
        if posted:
            self.area = PostedArea(1)
            self.dom = PostedDomain(self.area, 0, [2 * p for p in range(pairs)])
            register(self.fe, self.dom)
        rx_fds = [self.fe.call_fds[2 * p] for p in range(pairs)]
        self._pair_of_fd = {fd: p for p, fd in enumerate(rx_fds)}
        self._epoll = select.epoll()
        if not posted:
            for fd in rx_fds:
                self._epoll.register(fd, select.EPOLLIN)
        real_kick = self.fe.kick

        def kick(index: int) -> None:
            self.syscalls += 1
            self.kicks += 1
            real_kick(index)

        self.fe.kick = kick  # type: ignore[method-assign]
        for p in range(pairs):
            self.fe.queues[2 * p].set_interrupts(True)

    # ---- learning of completions --------------------------------------------------------------
    def _ready_pairs(self, timeout: float) -> list[int]:
        """The pairs with RX completions; sleeps up to `timeout` when none is known."""
        if self.dom is not None:
            got = self.dom.take()
            if not got and timeout > 0:
                if not self.dom.prepare_sleep():
                    self.syscalls += 1  # select
                    if self.dom.sleep(timeout):
                        self.syscalls += 1  # eventfd read
                        self.wakeups += 1
                got = self.dom.take()
            return [v // 2 for v in got]
        # per-queue eventfds, the way a user-space driver waits on many: one epoll_wait, then
        # one read per eventfd it names
        self.syscalls += 1
        out = []
        for fd, _ev in self._epoll.poll(max(0.0, timeout)):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            self.syscalls += 1
            self.wakeups += 1
            out.append(self._pair_of_fd[fd])
        return out

    def _poll(self, pair: int) -> int:
        """Collect a pair's echoes, re-checking used->idx after used_event moved (an entry the
        device published meanwhile came with no interrupt: virtqueue_enable_cb's re-check)."""
        got = self.drv.poll_rx_count(pair)
        while self.fe.queues[2 * pair].more_used():
            got += self.drv.poll_rx_count(pair)
        return got

    # ---- traffic ------------------------------------------------------------------------------
    def _packs(self, window: int) -> list[tuple[memoryview, array[int]]]:
        """packs[n]: n frames packed for NetDriver.send_packed (made once per stream)."""
        data = memoryview(self.frame * window)
        lens = array("I", [len(self.frame)]) * window
        flen = len(self.frame)
        return [(data[: n * flen], lens[:n]) for n in range(window + 1)]

    def stream(self, duration: float, rate_pps: int, *, window: int = 32,
               loop: str = "c", spin_us: int = 0) -> StreamResult:
        """Paced (`rate_pps` frames/s in total, round robin over the pairs, each pair keeping
        at most `window` in flight) or unlimited (rate 0: `_unlimited`, its driver `loop`)."""
        if not rate_pps:
            return self._unlimited(duration, window, loop, spin_us)
        res = StreamResult()
        packs = self._packs(window)
        inflight = [0] * self.pairs
        sys0, k0, wk0, cpu0 = self.syscalls, self.kicks, self.wakeups, time.thread_time()
        start = time.monotonic()
        end = start + duration
        nxt = 0
        now = start
        while now < end:
            # what is due by the clock, round robin over the pairs with room
            due = int(rate_pps * (now - start)) - res.sent
            batches = [0] * self.pairs
            tries = 0
            while due > 0 and tries < self.pairs:
                p = nxt % self.pairs
                nxt += 1
                if inflight[p] + batches[p] < window:
                    batches[p] += 1
                    due -= 1
                    tries = 0
                else:
                    tries += 1
            sent_any = False
            for p, n in enumerate(batches):
                if n:
                    k = self.drv.send_packed(*packs[n], p, timeout=0.0)
                    inflight[p] += k
                    res.sent += k
                    sent_any = True
            wait = max(0.0, min(end, start + (res.sent + 1) / rate_pps) - time.monotonic())
            # completions: the pairs the notification path names
            for p in self._ready_pairs(0.0 if sent_any else wait):
                got = self._poll(p)
                inflight[p] = max(0, inflight[p] - got)
                res.packets += got
            now = time.monotonic()
        res.elapsed_s = now - start
        res.syscalls = self.syscalls - sys0
        res.kicks = self.kicks - k0
        res.wakeups = self.wakeups - wk0
        res.driver_cpu_s = time.thread_time() - cpu0
        self._drain(0.2)
        return res

    def _unlimited(self, duration: float, window: int, loop: str, spin_us: int) -> StreamResult:
        """Every pair kept at `window` frames in flight. The pairs the notification path names
        get their driver turn in C (virtio.driver.pairs: reap, re-stock, top up, kick). `loop`
        "c": the driver thread's whole loop is C's too (virtio.driver.serve: epoll_wait and
        eventfd reads, or the posted bitmap and sleep protocol), the way a native driver runs;
        "python": the notification path is this class's (`_ready_pairs`), one C call per
        wake-up: its per-wake-up cost, not the notification mechanism, then sets the pace when
        wake-ups carry few frames. `spin_us` (C loop, posted only): how long the driver keeps
        taking an empty bitmap before the sleep protocol."""
        if loop not in LOOPS:
            raise ValueError(f"driver loop: allowed {LOOPS}, got {loop!r}")
        res = StreamResult()
        turns = PairTurns(self.drv, self.frame, window)
        sys0, k0, wk0, cpu0 = self.syscalls, self.kicks, self.wakeups, time.thread_time()
        start = time.monotonic()
        end = start + duration
        turns.turn()
        now = start
        if loop == "c":
            rx = [2 * p for p in range(self.pairs)]
            server = (posted_server(turns, self.dom, rx, spin_us=spin_us) if self.dom is not None
                      else eventfd_server(turns, [self.fe.call_fds[v] for v in rx]))
            try:
                server.run(duration)
            finally:
                server.close()
            now = time.monotonic()
            self.syscalls += server.syscalls
            self.wakeups += server.wakeups
        while now < end:
            ready = self._ready_pairs(min(0.05, end - now))
            if ready:
                turns.turn(ready)
            now = time.monotonic()
        res.elapsed_s = now - start
        res.packets, res.sent = turns.received, turns.sent
        res.syscalls = self.syscalls - sys0 + turns.kicks
        res.kicks = self.kicks - k0 + turns.kicks
        res.wakeups = self.wakeups - wk0
        res.driver_cpu_s = time.thread_time() - cpu0
        self._drain(0.2)
        return res

    def _drain(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready = self._ready_pairs(0.01)
            if not ready:
                break
            for p in ready:
                self._poll(p)

    def pingpong(self, count: int, *, timeout: float = 1.0) -> StreamResult:
        res = StreamResult()
        self._drain(0.05)
        sys0, k0, wk0, cpu0 = self.syscalls, self.kicks, self.wakeups, time.thread_time()
        start = time.monotonic()
        for i in range(count):
            p = i % self.pairs
            t0 = time.monotonic_ns()
            frame = self.frame[:14] + _TS.pack(t0) + self.frame[14 + _TS.size:]
            self.drv.send([frame], p, timeout=0.0)
            res.sent += 1
            got = 0
            deadline = time.monotonic() + timeout
            while not got and time.monotonic() < deadline:
                for q in self._ready_pairs(deadline - time.monotonic()):
                    got += self._poll(q)
            if got:
                res.rtts_ns.append(time.monotonic_ns() - t0)
                res.packets += got
        res.elapsed_s = time.monotonic() - start
        res.syscalls = self.syscalls - sys0
        res.kicks = self.kicks - k0
        res.wakeups = self.wakeups - wk0
        res.driver_cpu_s = time.thread_time() - cpu0
        return res

    def close(self) -> None:
        try:
            self._epoll.close()
            self.fe.close()
        finally:
            if self.dom is not None:
                self.dom.close()
            if self.area is not None:
                self.area.close()
