"""Worker threads: each owns a set of queue works and serves them with no locks on the data path.

A worker sleeps in epoll on the kick fds (and any other wake fds) of its works plus one command
eventfd. While some work has something to do, it serves the runnable works round robin, one turn
each, with kicks suppressed; when a work runs dry it re-enables kicks and re-checks the ring once
more before it stops serving it (the driver may have added a buffer during the switch).

Threads: `submit`, `attach`, `detach`, `stop` and `snapshot` may be called from any thread
(normally the daemon's asyncio thread); everything else runs in the worker's own thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from virtio.errors import GuestError

__all__ = ["QueueWork", "TurnBudget", "WorkStats", "Worker", "WorkerStats"]

log = logging.getLogger("vhostx.data")


class QueueWork(Protocol):
    """One thing a worker serves: usually one virtqueue and the port behind it."""

    name: str
    stats: WorkStats
    poll_only: bool  # no kick fd: the work is polled for as long as it is attached

    def kick_fds(self) -> list[int]:
        """Eventfds the driver writes to kick (drained by the worker on wake-up)."""

    def data_fds(self) -> list[int]:
        """Other fds whose readability means work (a TAP fd); never read by the worker."""

    def run(self, budget_pkts: int, budget_bytes: int) -> int:
        """Serve one turn; return the packets handled (0: nothing to do)."""

    def pending(self) -> bool:
        """Whether there is work right now (checked after re-enabling notifications)."""

    def set_notify(self, enable: bool) -> None:
        """Ask the driver for kicks (True) or suppress them (False)."""

    def broken(self, err: GuestError) -> None:
        """Worker thread: the ring broke and the work was detached; tell its device."""


@dataclass
class TurnBudget:
    """How much one queue may do in one turn before the worker moves on."""

    packets: int = 256
    bytes: int = 512 * 1024


@dataclass
class WorkStats:
    """Per-work counters kept by the worker thread (Python side, once per wake or turn)."""

    kicks: int = 0
    turns: int = 0
    empty_turns: int = 0
    notify_on: int = 0
    notify_off: int = 0
    budget_exhausted: int = 0


@dataclass
class WorkerStats:
    loops: int = 0
    sleeps: int = 0
    busy_ns: int = 0
    idle_ns: int = 0
    works: int = 0


_EV_IN = select.EPOLLIN


class Worker:
    """A data-path thread serving any mix of queue works (baseline: one device's queues)."""

    def __init__(
        self,
        name: str,
        *,
        cpu: int | None = None,
        budget: TurnBudget | None = None,
    ) -> None:
        self.name = name
        self.cpu = cpu
        self.budget = budget or TurnBudget()
        self.stats = WorkerStats()
        self._cmd_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cmds: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._cmd_lock = threading.Lock()
        self._works: list[QueueWork] = []
        self._by_fd: dict[int, list[QueueWork]] = {}
        self._kick_fds: set[int] = set()
        self._runnable: list[QueueWork] = []
        self._stopping = False
        self._epoll = select.epoll()
        self._epoll.register(self._cmd_fd, _EV_IN)
        self._thread = threading.Thread(target=self._main, name=f"vhostx-{name}", daemon=True)
        self._thread.start()

    # ---- any thread -------------------------------------------------------------------------

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` in the worker thread between turns; the future carries its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if not self._thread.is_alive():
            fut.set_exception(RuntimeError(f"worker {self.name} is not running"))
            return fut
        with self._cmd_lock:
            self._cmds.append((fn, fut))
        os.eventfd_write(self._cmd_fd, 1)
        return fut

    def attach(self, work: QueueWork) -> concurrent.futures.Future[Any]:
        return self.submit(lambda: self._attach(work))

    def detach(self, work: QueueWork) -> concurrent.futures.Future[Any]:
        return self.submit(lambda: self._detach(work))

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            fut = self.submit(self._request_stop)
            try:
                fut.result(timeout)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            self._thread.join(timeout)
        try:
            self._epoll.close()
        finally:
            try:
                os.close(self._cmd_fd)
            except OSError:
                pass

    @property
    def works(self) -> list[QueueWork]:
        return list(self._works)

    # ---- worker thread ----------------------------------------------------------------------

    def _request_stop(self) -> None:
        self._stopping = True

    def _attach(self, work: QueueWork) -> None:
        if work in self._works:
            return
        self._works.append(work)
        for fd in work.kick_fds():
            if fd >= 0:
                self._kick_fds.add(fd)
        for fd in work.kick_fds() + work.data_fds():
            if fd < 0:
                continue
            users = self._by_fd.setdefault(fd, [])
            if not users:
                self._epoll.register(fd, _EV_IN | select.EPOLLET)
            users.append(work)
        # Serve it at once: the driver may have queued buffers before we were listening.
        work.set_notify(False)
        work.stats.notify_off += 1
        self._runnable.append(work)
        self.stats.works = len(self._works)

    def _detach(self, work: QueueWork) -> None:
        if work not in self._works:
            return
        self._works.remove(work)
        if work in self._runnable:
            self._runnable.remove(work)
        for fd in work.kick_fds() + work.data_fds():
            users = self._by_fd.get(fd)
            if not users or work not in users:
                continue
            users.remove(work)
            if not users:
                del self._by_fd[fd]
                self._kick_fds.discard(fd)
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
        self.stats.works = len(self._works)

    def _run_commands(self) -> None:
        try:
            os.eventfd_read(self._cmd_fd)
        except BlockingIOError:
            pass
        with self._cmd_lock:
            cmds, self._cmds = self._cmds, []
        for fn, fut in cmds:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def _wake(self, fd: int) -> None:
        if fd == self._cmd_fd:
            self._run_commands()
            return
        works = self._by_fd.get(fd)
        if not works:
            return
        kick = fd in self._kick_fds
        if kick:
            try:
                os.eventfd_read(fd)
            except OSError:
                pass
        for work in works:
            if kick:
                work.stats.kicks += 1
            if work not in self._runnable:
                work.set_notify(False)
                work.stats.notify_off += 1
                self._runnable.append(work)

    def _fail(self, work: QueueWork, err: GuestError) -> None:
        log.warning("worker %s: %s broke: %s", self.name, work.name, err)
        self._detach(work)
        try:
            work.broken(err)
        except Exception:
            log.exception("error callback failed")

    def _serve_once(self) -> None:
        budget_pkts = self.budget.packets
        budget_bytes = self.budget.bytes
        for work in list(self._runnable):
            st = work.stats
            st.turns += 1
            try:
                n = work.run(budget_pkts, budget_bytes)
            except GuestError as err:
                self._fail(work, err)
                continue
            if n >= budget_pkts:
                st.budget_exhausted += 1
                continue
            if n > 0:
                continue
            st.empty_turns += 1
            if work.poll_only:
                continue
            # Ring dry: re-enable kicks, then look once more (the lost-kick race).
            work.set_notify(True)
            try:
                again = work.pending()
            except GuestError as err:
                self._fail(work, err)
                continue
            if again:
                work.set_notify(False)
                continue
            st.notify_on += 1
            self._runnable.remove(work)

    def _main(self) -> None:
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})
            except OSError as err:
                log.warning("worker %s: cannot pin to cpu %s: %s", self.name, self.cpu, err)
        stats = self.stats
        clock = time.perf_counter_ns
        poll = self._epoll.poll
        last = clock()
        while not self._stopping:
            if self._runnable:
                events = poll(0)
                for fd, _ in events:
                    self._wake(fd)
                self._serve_once()
                now = clock()
                stats.busy_ns += now - last
                last = now
            else:
                stats.sleeps += 1
                events = poll(-1)
                now = clock()
                stats.idle_ns += now - last
                last = now
                for fd, _ in events:
                    self._wake(fd)
            stats.loops += 1
        # Leave every work with kicks enabled so a restarted backend sees the ring as the driver left it.
        for work in list(self._works):
            try:
                work.set_notify(True)
            except GuestError:
                pass
