"""The guest model as a benchmark client: ping-pong latency, paced streams, idle connections.

Built on `virtio.frontend` (VhostUserFrontend + NetDriver): one frontend per device, over a real
AF_UNIX socket and memfd guest memory, against any vhost-user backend (the vhostx daemon with an
`echo` or `sink` port, DPDK's net_vhost in testpmd with `macswap` or `rxonly`).

Ping-pong frame (after the 14-byte Ethernet header, ethertype 0x88B5, local experimental):
    magic "VXPP" | flow u16 | seq u64 | send timestamp u64 (CLOCK_MONOTONIC ns) | zero padding
Each flow (one per device) keeps one frame in flight; the round-trip time is the receive instant
minus the timestamp carried back in the frame. A reply whose magic, flow or sequence number does
not match counts as `bad`; a frame not back within `loss_timeout` counts as `lost`.

`wait = "interrupt"`: the client sleeps in select() on the RX call eventfds (an interrupt-driven
guest). `wait = "poll"`: it spins on the used rings (a busy-polling guest driver).

Threads: one thread owns a `GuestModel` (normally the main thread, pinned by the runner to the
client core for the window; for `AlongsideFlow`, the flow's own thread while it runs). Nothing
here is asyncio.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from virtio.frontend import NetDriver, VhostUserFrontend

__all__ = ["PINGPONG", "AlongsideFlow", "GuestModel", "PingPongResult", "StreamResult",
           "make_frame"]

PINGPONG = struct.Struct("<4sHQQ")
MAGIC = b"VXPP"
ETHERTYPE = b"\x88\xb5"
_HDR = 14


def make_frame(size: int, flow: int, seq: int, ts_ns: int, *, dst: bytes, src: bytes) -> bytes:
    """One ping-pong frame of `size` bytes (no net header, no CRC)."""
    if size < _HDR + PINGPONG.size:
        raise ValueError(f"a ping-pong frame needs at least {_HDR + PINGPONG.size} bytes")
    body = PINGPONG.pack(MAGIC, flow & 0xFFFF, seq, ts_ns)
    return (dst + src + ETHERTYPE + body).ljust(size, b"\0")


def parse_frame(frame: bytes) -> tuple[int, int, int] | None:
    """(flow, seq, ts_ns) of a ping-pong frame, None if it is not one."""
    if len(frame) < _HDR + PINGPONG.size or frame[12:14] != ETHERTYPE:
        return None
    magic, flow, seq, ts = PINGPONG.unpack_from(frame, _HDR)
    if magic != MAGIC:
        return None
    return flow, seq, ts


@dataclass
class PingPongResult:
    rtt_ns: list[int] = field(default_factory=list)
    per_flow: list[int] = field(default_factory=list)  # completed round trips per flow
    sent: int = 0
    received: int = 0
    lost: int = 0
    bad: int = 0
    late: int = 0  # replies to frames of an earlier call (its window ended) or declared lost
    elapsed_s: float = 0.0


@dataclass
class StreamResult:
    offered: int = 0  # frames due by the pacing schedule
    posted: int = 0  # frames actually put on the TX rings
    per_flow: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


class GuestModel:
    """One VhostUserFrontend + NetDriver per socket."""

    def __init__(self, sockets: Sequence[str], *, queue_size: int = 256, mem_mb: int = 16,
                 style: str = "qemu", connect_timeout: float = 20.0) -> None:
        self.sockets = list(sockets)
        self.queue_size = queue_size
        self.mem_mb = mem_mb
        self.style = style
        self.connect_timeout = connect_timeout
        self.frontends: list[VhostUserFrontend] = []
        self.drivers: list[NetDriver] = []
        # Sequence numbers carry on from one pingpong() call to the next (warm-up, window): a
        # reply still in flight when a call ended arrives in the next one and is told apart.
        self._seq: list[int] = []

    def connect(self) -> Self:
        try:
            for sock in self.sockets:
                fe = VhostUserFrontend(sock, mem_size=self.mem_mb << 20, queues=2,
                                       queue_size=self.queue_size, style=self.style)
                self.frontends.append(fe)
                fe.connect(self.connect_timeout)
                self.drivers.append(NetDriver(fe))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for fe in self.frontends:
            try:
                fe.close()
            except Exception:  # noqa: BLE001 - a dead peer must not stop the others' cleanup
                fe.close(graceful=False)
        self.frontends.clear()
        self.drivers.clear()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _macs(flow: int) -> tuple[bytes, bytes]:
        return bytes([0x52, 0x54, 0x00, 0xBB, 0, flow & 0xFF]), bytes([0x52, 0x54, 0x00, 0xAA, 0,
                                                                       flow & 0xFF])

    # ------------------------------------------------------------------------- ping-pong
    def pingpong(self, duration: float, size: int = 64, *, wait: str = "interrupt",
                 loss_timeout: float = 1.0, record: bool = True, interval: float = 0.0,
                 should_stop: Callable[[], bool] | None = None) -> PingPongResult:
        """Round trips on every flow for `duration` seconds (one frame in flight per flow).

        `interval` > 0 paces each flow: a frame is sent at most every `interval` seconds (the next
        one right after the reply when the round trip took longer); in between the thread
        sleeps."""
        n = len(self.drivers)
        res = PingPongResult(per_flow=[0] * n)
        if len(self._seq) != n:
            self._seq = [0] * n
        seq = self._seq
        inflight: list[int | None] = [None] * n  # send time of the frame in flight
        macs = [self._macs(i) for i in range(n)]
        call_fds = [fe.call_fds[0] for fe in self.frontends]
        fd_flow = {fd: i for i, fd in enumerate(call_fds)}
        now = time.monotonic_ns
        start = now()
        deadline = start + int(duration * 1e9)
        loss_ns = int(loss_timeout * 1e9)
        interval_ns = int(interval * 1e9)
        due = [start] * n  # earliest next send per flow (paced)
        while True:
            t = now()
            if t >= deadline or (should_stop is not None and should_stop()):
                break
            for i in range(n):
                if inflight[i] is None:
                    if t < due[i]:
                        continue
                    seq[i] += 1
                    ts = now()
                    frame = make_frame(size, i, seq[i], ts, dst=macs[i][0], src=macs[i][1])
                    if self.drivers[i].send([frame], timeout=0.0) == 1:
                        inflight[i] = ts
                        due[i] = ts + interval_ns
                        res.sent += 1
                elif t - inflight[i] > loss_ns:  # type: ignore[operator]
                    res.lost += 1
                    inflight[i] = None
            if interval_ns and all(f is None for f in inflight):
                pause = (min(min(due), deadline) - now()) / 1e9
                if pause > 0:
                    time.sleep(min(pause, 0.05))
                continue
            waiting = []
            for i in range(n):
                if inflight[i] is None:
                    continue
                got = self.drivers[i].recv(timeout=0.0)
                if got:
                    self._account(i, got, seq, inflight, res, record)
                else:
                    waiting.append(call_fds[i])
            if waiting and wait == "interrupt":
                ready, _, _ = select.select(waiting, [], [], 0.05)
                for fd in ready:
                    _drain(fd)
                    i = fd_flow[fd]
                    got = self.drivers[i].recv(timeout=0.0)
                    if got:
                        self._account(i, got, seq, inflight, res, record)
        res.elapsed_s = (now() - start) / 1e9
        return res

    def _account(self, i: int, frames: list[bytes], seq: list[int], inflight: list[int | None],
                 res: PingPongResult, record: bool) -> None:
        t = time.monotonic_ns()
        for frame in frames:
            parsed = parse_frame(frame)
            if parsed is not None and parsed[0] == (i & 0xFFFF) and parsed[1] < seq[i]:
                res.late += 1  # an older frame's reply: not this one's, not corrupt either
                continue
            if parsed is None or parsed[0] != (i & 0xFFFF) or parsed[1] != seq[i]:
                res.bad += 1
                continue
            res.received += 1
            res.per_flow[i] += 1
            if record:
                res.rtt_ns.append(t - parsed[2])
            inflight[i] = None

    # ------------------------------------------------------------------------- paced stream
    def stream(self, duration: float, size: int, rate_pps: int, *, tick: float = 0.001,
               should_stop: Callable[[], bool] | None = None) -> StreamResult:
        """Send `rate_pps` frames per second on every device's TX queue for `duration`."""
        n = len(self.drivers)
        res = StreamResult(per_flow=[0] * n)
        frames = [make_frame(size, i, 0, 0, dst=self._macs(i)[0], src=self._macs(i)[1])
                  for i in range(n)]
        start = time.monotonic()
        end = start + duration
        while True:
            t = time.monotonic()
            if t >= end or (should_stop is not None and should_stop()):
                break
            due = int(rate_pps * (t - start))
            for i, drv in enumerate(self.drivers):
                want = min(due - res.per_flow[i], self.queue_size)
                if want > 0:
                    res.per_flow[i] += drv.send([frames[i]] * want, timeout=0.0)
            # keep RX rings stocked and completions reaped for echoing backends
            for drv in self.drivers:
                drv.reap_tx()
            sleep = tick - (time.monotonic() - t)
            if sleep > 0:
                time.sleep(sleep)
        res.elapsed_s = time.monotonic() - start
        res.offered = int(rate_pps * res.elapsed_s) * n
        res.posted = sum(res.per_flow)
        return res

    def prime(self, frames: int = 256, size: int = 64) -> int:
        """Send a few frames on every device (to wake a polling backend before an idle phase)."""
        sent = 0
        for i, drv in enumerate(self.drivers):
            frame = make_frame(size, i, 0, 0, dst=self._macs(i)[0], src=self._macs(i)[1])
            for _ in range(max(1, frames // 32)):
                sent += drv.send([frame] * 32, timeout=0.1)
                drv.recv(timeout=0.0)
        return sent


class AlongsideFlow:
    """A ping-pong flow on its own thread beside a stream (`pingpong_alongside`): warm-up round
    trips (not recorded) from `start()` until `begin_window()`, recorded ones until
    `end_window()`, which returns the window's result.

    The thread owns `model` from `start()` until it ends (the caller must not use it meanwhile;
    it closes it afterwards) and pins itself to `core`. With `realtime` it asks for SCHED_FIFO
    priority 1, so that a reply wakes it at once instead of waiting for the busy poller it shares
    the core with to use up its time slice (it sleeps between frames, so it takes little from
    that poller); `sched` says what it got. `cpu_tid` is its native thread id, for CPU
    accounting. Any thread may call the methods; `stop()` is idempotent."""

    def __init__(self, model: GuestModel, *, size: int, core: int, wait: str = "interrupt",
                 interval: float = 0.0, realtime: bool = True) -> None:
        self.model = model
        self.size = size
        self.core = core
        self.wait = wait
        self.interval = interval
        self.realtime = realtime
        self.sched = "SCHED_OTHER"
        self.cpu_tid: int | None = None
        self._pinned = threading.Event()
        self._window = threading.Event()
        self._end = threading.Event()
        self._result: PingPongResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pingpong-alongside",
                                        daemon=True)

    def start(self) -> Self:
        """Start the thread; returns once it has pinned itself (cpu_tid is known)."""
        self._thread.start()
        self._pinned.wait(5.0)
        return self

    def _run(self) -> None:
        try:
            self.cpu_tid = threading.get_native_id()
            os.sched_setaffinity(0, {self.core})
            if self.realtime:
                try:
                    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
                    self.sched = "SCHED_FIFO 1"
                except OSError as err:
                    self.sched = f"SCHED_OTHER (SCHED_FIFO refused: {err.strerror})"
            self._pinned.set()
            run = self.model.pingpong
            run(1e9, self.size, wait=self.wait, interval=self.interval, record=False,
                should_stop=self._window.is_set)
            if not self._end.is_set():
                self._result = run(1e9, self.size, wait=self.wait, interval=self.interval,
                                   should_stop=self._end.is_set)
        except BaseException as err:  # noqa: BLE001 - handed to the caller in end_window()
            self._error = err
        finally:
            self._pinned.set()

    def begin_window(self) -> None:
        self._window.set()

    def end_window(self, timeout: float = 5.0) -> PingPongResult:
        """Stop the flow and return its window's result; RuntimeError when the flow failed."""
        self.stop(timeout)
        if self._error is not None:
            raise RuntimeError(f"alongside ping-pong failed: {type(self._error).__name__}: "
                               f"{self._error}") from self._error
        if self._result is None:
            raise RuntimeError("alongside ping-pong did not finish its window")
        return self._result

    def stop(self, timeout: float = 5.0) -> None:
        self._window.set()
        self._end.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
