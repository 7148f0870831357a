"""Restarts of the backend under traffic: a QEMU guest keeps a TCP transfer and a ping going while
the daemon is killed (SIGKILL) and started again, over and over.

Role: the machinery shared by tests/e2e/test_restart_qemu.py (5 restarts) and
`vhostx bench restart-soak` (100 by default). The daemon serves one tap device whose TAP lives in a
network namespace (the Linux stack on the other side); the guest's chardev has `reconnect=1`, so
QEMU dials the socket again once a new daemon listens on it.

- `Pinger`: ICMP echo requests from inside the namespace to the guest at a fixed interval (a raw
  socket, so that a send that fails while the TAP is gone counts as a lost ping instead of killing
  the pinger, as busybox ping would); every request and reply is timestamped.
- `PacedSender`: one TCP connection from the namespace into the guest carrying `total` random
  bytes, paced while restarts go on (so that the transfer spans all of them), then at full speed;
  the guest prints the md5 of what it received.
- `restart_loop`: kill -9, start a new daemon, wait until the device's rings run again, wait for
  traffic to flow, repeat; one `Restart` record per round (outage, ping gap, pings lost).

Threads: the caller's thread owns the daemons and the guest (their death signals are tied to it);
`Pinger` and `PacedSender` each run one or two threads of their own.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "PacedSender",
    "Pinger",
    "Restart",
    "device_running",
    "restart_loop",
    "summarize",
    "wait_device_running",
]

_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Pinger:
    """Echo requests to `target` every `interval` seconds from a raw socket made in `netns`."""

    def __init__(self, netns: Any, target: str, interval: float = 0.2) -> None:
        self.target = target
        self.interval = interval
        self.ident = os.getpid() & 0xFFFF
        self.sock: socket.socket = netns.call(
            socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.settimeout(0.2)
        self.sent: list[float] = []  # send time of each sequence number (index = seq)
        self.replies: dict[int, float] = {}  # seq -> time of its (first) reply
        self.send_errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send_loop, name="pinger-tx", daemon=True),
                         threading.Thread(target=self._recv_loop, name="pinger-rx", daemon=True)]

    def start(self) -> Pinger:
        for t in self._threads:
            t.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop sending, wait `grace` seconds for the last replies, close the socket."""
        self._stop.set()
        self._threads[0].join()
        time.sleep(grace)
        self._threads[1].join(timeout=5)
        self.sock.close()

    def _send_loop(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            header = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, 0, self.ident, seq & 0xFFFF)
            body = struct.pack("!d", time.time()) + bytes(48)
            packet = header[:2] + struct.pack("!H", _checksum(header + body)) + header[4:] + body
            with self._lock:
                self.sent.append(time.monotonic())
            try:
                self.sock.sendto(packet, (self.target, 0))
            except OSError:  # no route while the TAP is gone: a lost ping
                self.send_errors += 1
            seq += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _recv_loop(self) -> None:
        while not (self._stop.is_set() and self._all_answered_or_late()):
            try:
                data, (addr, _) = self.sock.recvfrom(2048)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            except OSError:
                return
            ihl = (data[0] & 0x0F) * 4
            if addr != self.target or len(data) < ihl + 8:
                continue
            kind, _, _, ident, seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind != _ICMP_ECHO_REPLY or ident != self.ident:
                continue
            now = time.monotonic()
            with self._lock:
                # 16-bit sequence numbers: the most recent request with these low bits
                n = len(self.sent)
                full = seq + ((n - 1 - seq) // 0x10000) * 0x10000 if n else seq
                self.replies.setdefault(full, now)

    def _all_answered_or_late(self) -> bool:
        with self._lock:
            return not self.sent or len(self.replies) >= len(self.sent)

    def lost_between(self, t0: float, t1: float) -> int:
        """Requests sent in [t0, t1) that got no reply."""
        with self._lock:
            return sum(1 for seq, at in enumerate(self.sent)
                       if t0 <= at < t1 and seq not in self.replies)

    def last_reply_before(self, t: float) -> float | None:
        with self._lock:
            times = [r for r in self.replies.values() if r < t]
        return max(times) if times else None

    def first_reply_after(self, t: float) -> float | None:
        with self._lock:
            times = [r for r in self.replies.values() if r >= t]
        return min(times) if times else None

    def totals(self) -> tuple[int, int]:
        """(requests sent, replies received)."""
        with self._lock:
            return len(self.sent), len(self.replies)


class PacedSender:
    """Send `total` random bytes over TCP from `netns` to host:port, `rate` bytes/s while `paced`
    is set, then at full speed; wait until the guest closes (it has read everything)."""

    def __init__(self, netns: Any, host: str, port: int, total: int, rate: float,
                 chunk: int = 16 << 10, sndbuf: int = 64 << 10) -> None:
        self.netns = netns
        self.addr = (host, port)
        self.data = os.urandom(total)
        self.md5 = hashlib.md5(self.data).hexdigest()
        self.rate = rate
        self.chunk = chunk
        self.sndbuf = sndbuf
        self.paced = threading.Event()
        self.paced.set()
        self.sent = 0
        self.progress: list[tuple[float, int]] = []  # (time, bytes sent so far), per chunk
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="paced-sender", daemon=True)

    def start(self) -> PacedSender:
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return self.done.is_set()

    def _connect(self, timeout: float = 120.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s: socket.socket = self.netns.call(socket.socket, socket.AF_INET, socket.SOCK_STREAM)
            # a small send buffer: bytes accepted by the socket follow bytes delivered closely
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            s.settimeout(10)
            try:
                s.connect(self.addr)
                s.settimeout(None)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def _run(self) -> None:
        try:
            with self._connect() as s:
                view = memoryview(self.data)
                started = time.monotonic()
                while self.sent < len(self.data):
                    if self.paced.is_set():
                        due = started + self.sent / self.rate
                        delay = due - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        n = min(self.chunk, len(self.data) - self.sent)
                    else:
                        n = len(self.data) - self.sent
                    s.sendall(view[self.sent:self.sent + n])
                    self.sent += n
                    self.progress.append((time.monotonic(), self.sent))
                s.shutdown(socket.SHUT_WR)
                s.recv(1)  # the guest closes once it has read everything
            self.done.set()
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            self.error = err

    def sent_at(self, t: float) -> int:
        """Bytes handed to the socket by time t."""
        last = 0
        for at, n in self.progress:
            if at > t:
                break
            last = n
        return last


@dataclass
class Restart:
    """One kill (SIGKILL or SIGTERM) and restart: times in seconds from the kill."""

    index: int
    stopped_s: float  # the old daemon has exited (SIGTERM: it stopped its rings)
    backend_up_s: float  # the new daemon's socket listens
    rings_running_s: float  # the device is connected again with its RX and TX rings running
    ping_recovered_s: float | None  # first ping reply after the old daemon exited
    ping_gap_s: float | None  # last reply before the kill -> first reply after it
    pings_lost: int  # requests sent from the kill to the first reply after the exit, unanswered
    bytes_sent_before: int = 0  # by the paced sender, at the kill
    transfer_resumed_s: float | None = None  # the sender's bytes move again (2 chunks sent)
    extra: dict[str, Any] = field(default_factory=dict)


def device_running(stats: dict[str, Any], device: str, rings: tuple[int, ...] = (0, 1)) -> bool:
    """The device is connected and every ring in `rings` runs (not broken)."""
    for dev in stats.get("devices", []):
        if dev.get("name") == device:
            queues = dev.get("queues", {})
            return (bool(dev.get("connected")) and not dev.get("broken")
                    and all(str(r) in queues for r in rings))
    return False


def wait_device_running(daemon: Any, device: str, timeout: float,
                        rings: tuple[int, ...] = (0, 1)) -> float:
    """Poll the daemon's stats until `device_running`; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if device_running(daemon.stats(), device, rings):
                return time.monotonic()
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"device {device}: rings {rings} not running {timeout} s after the "
                               f"restart; daemon log:\n{daemon.log_tail()}")
        time.sleep(0.05)


def restart_loop(
    daemon: Any,
    start_daemon: Callable[[], Any],
    pinger: Pinger,
    *,
    restarts: int,
    device: str,
    settle_s: float = 1.0,
    ring_timeout: float = 60.0,
    sender: PacedSender | None = None,
    stop_signal: int = signal.SIGKILL,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[Any, list[Restart]]:
    """`restarts` times: wait until pings are answered again for `settle_s` seconds and the
    sender's bytes move again, kill the daemon (`stop_signal`: SIGKILL, or SIGTERM for a clean
    stop), start a new one (`start_daemon()`), wait until its device runs. Returns the last
    daemon and one record per restart."""
    records: list[Restart] = []
    for i in range(restarts):
        _wait_flowing(pinger, settle_s, timeout=ring_timeout)
        t_kill = time.monotonic()
        before = sender.sent_at(t_kill) if sender is not None else 0
        daemon.proc.send_signal(stop_signal)
        daemon.proc.wait()
        # a daemon stopping on SIGTERM may still answer a ping or two: the outage begins when it
        # is gone
        t_gone = time.monotonic()
        daemon = start_daemon()
        t_up = time.monotonic()
        t_running = wait_device_running(daemon, device, ring_timeout)
        first = _first_reply_after(pinger, t_gone, timeout=ring_timeout)
        last = pinger.last_reply_before(t_kill)
        resumed = None
        if sender is not None:  # the transfer moves again (TCP may still be backing off)
            resumed = round(_wait_progress(sender, timeout=ring_timeout) - t_kill, 3)
        rec = Restart(
            index=i + 1,
            stopped_s=round(t_gone - t_kill, 3),
            backend_up_s=round(t_up - t_kill, 3),
            rings_running_s=round(t_running - t_kill, 3),
            ping_recovered_s=None if first is None else round(first - t_kill, 3),
            ping_gap_s=None if first is None or last is None else round(first - last, 3),
            pings_lost=pinger.lost_between(t_kill, first if first is not None else time.monotonic()),
            bytes_sent_before=before,
            transfer_resumed_s=resumed,
        )
        records.append(rec)
        log(f"restart {rec.index}: exited {rec.stopped_s:.2f} s, socket back {rec.backend_up_s:.2f} s, rings running "
            f"{rec.rings_running_s:.2f} s, ping back {rec.ping_recovered_s} s after the kill, "
            f"{rec.pings_lost} pings lost, transfer moving {rec.transfer_resumed_s} s")
    return daemon, records


def _first_reply_after(pinger: Pinger, t: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first = pinger.first_reply_after(t)
        if first is not None:
            return first
        time.sleep(0.05)
    return None


def _wait_flowing(pinger: Pinger, settle_s: float, timeout: float) -> None:
    """Until every ping of the last `settle_s` seconds (sent at least one RTT ago) was answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        if pinger.first_reply_after(now - settle_s) is not None and \
                pinger.lost_between(now - settle_s, now - 1.0) == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"pings not answered for {settle_s} s in a row within {timeout} s")


def _wait_progress(sender: PacedSender, timeout: float) -> float:
    """Until 2 more chunks went out (or all of it); returns the monotonic time."""
    start = sender.sent
    deadline = time.monotonic() + timeout
    while sender.sent < start + 2 * sender.chunk and sender.sent < len(sender.data):
        if sender.error is not None:
            raise RuntimeError(f"the transfer failed: {sender.error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the transfer made no progress in {timeout} s "
                               f"({sender.sent} bytes sent)")
        time.sleep(0.05)
    return time.monotonic()


def summarize(records: list[Restart], pinger: Pinger) -> dict[str, Any]:
    """Totals and percentiles of the records (for reports)."""

    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        v = sorted(values)
        return {"min": v[0], "median": v[len(v) // 2], "p90": v[min(len(v) - 1, int(len(v) * 0.9))],
                "max": v[-1]}

    sent, answered = pinger.totals()
    return {
        "restarts": len(records),
        "pings_sent": sent,
        "pings_answered": answered,
        "pings_lost_in_outages": sum(r.pings_lost for r in records),
        "ping_send_errors": pinger.send_errors,
        "stopped_s": stats([r.stopped_s for r in records]),
        "rings_running_s": stats([r.rings_running_s for r in records]),
        "ping_recovered_s": stats([r.ping_recovered_s for r in records
                                   if r.ping_recovered_s is not None]),
        "transfer_resumed_s": stats([r.transfer_resumed_s for r in records
                                     if r.transfer_resumed_s is not None]),
        "unrecovered": sum(1 for r in records if r.ping_recovered_s is None),
        "records": [asdict(r) for r in records],
    }
