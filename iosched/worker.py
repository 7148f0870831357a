"""Worker threads (I/O cores): each owns a set of queue works and serves them with no locks on the
data path, in either mode:

- baseline (policy `vhost`): driven only by kicks. A kick suppresses further kicks and queues the
  work; each queued work gets one C batch per round, round robin; a work whose ring runs dry
  re-enables kicks and re-checks the ring once more before it goes idle (the lost-kick race).
- shared (policy `elvis`, `classes`): the ELVIS loop (its serving steps in iosched/serving.py). Each tick
    1. serves the head of the work list (queues that were kicked) for one turn; a turn is one or
       more C batches, bounded by min/max_processed_data_limit, cut short by pressure (a kick
       waiting longer than max_work_stuck_us, a stuck or overdue polled queue);
    2. a kicked queue that served >= poll_start_rate items in that turn starts polling (kicks
       stay suppressed) and joins the round-robin poll list; otherwise it re-enables kicks and
       re-checks, or goes back to the tail when its turn ended on the budget;
    3. checks the head of the poll list (skipping it under poll_coalescing unless it is stuck or
       overdue) and moves it to the tail; new buffers count as a kick avoided; after
       poll_stop_idle without work the queue stops polling: kicks on, then one more re-check;
    4. never sleeps while a queue is polled or queued; otherwise waits in C (no CPU).
  Stuck detection (max_queue_stuck_us / max_queue_stuck_size) and min_poll_rate run on a timer
  scan of the poll list and move a queue to its head.

Where the thread waits: in a virtio.kick.Wait (C, GIL released) over its command eventfd and the
fds of its works. A work with a `kick_queue` (a C op and its kick fd) is served on kicks inside
that wait, entirely in C: drain, kicks off, one batch per turn (round robin, the policy's batch
budget), kicks on, re-check. The wait returns to Python only for a command, a due deadline, an
fd of a work served in Python, or a decision: a batch that served >= poll_start_rate items
(shared mode: the policy decides on polling), a full batch under a multi-batch policy (the turn
goes on in Python), a broken ring. So baseline runs Python per command and statistics snapshot,
not per kick; its kick counters are kept in C (work.stats adds them). While the Python side
serves queued or polled works (shared mode polling, works without a kick queue), each tick
collects the wait's events without blocking, and kicked C-served queues join the Python lists.

A work attached to a worker is treated as runnable at once (kicks off, queued): a kick that landed
while the work was on no worker (between the two phases of a migration) is never lost.

Threads: `submit`, `attach`, `detach`, `update`, `stop` and the `stats`/`works` readers may be
called from any thread (normally the daemon's asyncio thread or the pool); everything else runs in
the worker's own thread. Commands run between turns (between two C batches at most), never in the
middle of one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from virtio.errors import GuestError
from virtio.kick import (
    WAIT_CMD,
    WAIT_FDS,
    WAIT_SCHED,
    WHY_BROKEN,
    WHY_BUDGET,
    WHY_KICK,
    Round,
    Wait,
)

from .policy import Policy, SchedSettings, make_policy
from .prefetch_tuner import PrefetchTuner
from .serving import Serving
from .work import IDLE, POLLED, QUEUED, QueueState, QueueWork, WorkerStats, WorkStats

__all__ = ["QueueState", "QueueWork", "WorkStats", "Worker", "WorkerStats"]

log = logging.getLogger("vhostx.data")


class Worker(Serving):
    """A data-path thread serving any mix of queue works (baseline: one device's queues)."""

    def __init__(
        self,
        name: str,
        *,
        cpu: int | None = None,
        settings: SchedSettings | None = None,
        policy: str | Policy = "vhost",
        index: int = 0,
    ) -> None:
        self.name = name
        self.index = index
        self.cpu = cpu
        self.settings = settings or SchedSettings()
        self.policy = policy if isinstance(policy, Policy) else make_policy(policy, self.settings)
        self._cmd_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # The one place the thread blocks: kicks of C-served works are served inside it.
        self._wait = Wait(self._cmd_fd)
        self.stats = WorkerStats(self._wait.stats)
        self._ids: dict[int, QueueState] = {}  # C kick queue id -> its state
        self._next_id = 1
        self._cmds: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._cmd_lock = threading.Lock()
        self._states: dict[QueueWork, QueueState] = {}
        self._by_fd: dict[int, list[QueueState]] = {}
        self._kick_fds: set[int] = set()
        self._queued: collections.deque[QueueState] = collections.deque()
        self._polled: collections.deque[QueueState] = collections.deque()
        self._stopping = False
        self._clock = time.monotonic_ns
        self._last_epoll = self._clock()
        self._next_scan = 0
        self._scan_every = 0  # 0: no scan (stuck detection and min_poll_rate off)
        self._n_urgent = 0
        # C poll rounds (poll_round_us): the Round over the polled works, rebuilt whenever the
        # poll list's membership or the settings change (_poll_gen moves).
        self._poll_gen = 0
        self._round: Round | None = None
        self._round_qs: list[QueueState] = []
        self._round_gen = -1
        self._round_ns = 0
        self._round_max_ns = 0
        self._coalesce_ns = 0
        self._round_auto: list[int] = []  # the round's ops under tx_prefetch auto
        self._prefetch = PrefetchTuner(self.settings.tx_prefetch_recheck_ns)
        self._apply_settings_values()
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

    def update(
        self, settings: SchedSettings, policy: str | None = None
    ) -> concurrent.futures.Future[Any]:
        """New settings (and optionally another policy) from the next tick on."""
        return self.submit(lambda: self._update(settings, policy))

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            fut = self.submit(self._request_stop)
            try:
                fut.result(timeout)
            except Exception as err:  # noqa: BLE001 - stopping anyway
                log.debug("worker %s: stop request failed (%s); joining anyway", self.name, err)
            self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a port call: leave it the wait it may still use
            log.warning("worker %s did not stop within %.1f s", self.name, timeout)
            return
        try:
            self.stats.freeze_c()
            self._wait.close()
        finally:
            try:
                os.close(self._cmd_fd)
            except OSError:
                pass

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def works(self) -> list[QueueWork]:
        return list(self._states)

    def work_stats(self, work: QueueWork) -> dict[str, Any]:
        """Scheduling counters of one work, with the open polling period added (any thread)."""
        st = work.stats
        d = st.as_dict()
        if st.polling:
            d["polled_ns"] = st.polled_ns + max(0, self._clock() - st.poll_since_ns)
        return d

    # ---- worker thread: commands --------------------------------------------------------------

    def _request_stop(self) -> None:
        self._stopping = True

    def _update(self, settings: SchedSettings, policy: str | None) -> None:
        self.settings = settings
        if policy is not None and policy != self.policy.name:
            self.policy = make_policy(policy, settings)
        else:
            self.policy.update(settings)
        self._apply_settings_values()
        if not settings.polling or not self._can_poll() or any(
                s.poll_start_rate == 0 for s in settings.every()):  # fmt: skip
            now = self._clock()
            for q in list(self._polled):
                s = self.policy.settings_for(q)
                if not q.poll_only and (not s.polling or s.poll_start_rate == 0
                                        or not self._can_poll()):  # fmt: skip
                    self._polled.remove(q)
                    self._stop_polling(q, now)

    def _can_poll(self) -> bool:
        return self.policy.polls

    def _apply_settings_values(self) -> None:
        s = self.settings
        self._poll_gen += 1  # budgets may have changed: rebuild the round
        self._round_ns = s.poll_round_ns if s.polling else 0
        self._round_max_ns = s.poll_round_max_ns if s.polling else 0
        self._coalesce_ns = s.poll_coalescing_ns
        # per-device settings (s.every()): the scan must come as often as the most demanding
        periods = [p for d in s.every() for p in (d.max_queue_stuck_ns, d.min_poll_period_ns)
                   if p > 0]  # fmt: skip
        if any(d.max_queue_stuck_ns == 0 for d in s.every()):
            periods.append(1)
        self._scan_every = max(2_000, min(periods) // 4) if periods else 0
        self._next_scan = 0
        # What the C wait hands back instead of deciding itself: a kicked queue that may start
        # polling (its batch served >= poll_start_rate), a full batch of a multi-batch policy.
        pol = self.policy
        poll_start = s.poll_start_rate if (s.polling and pol.polls) else 0
        self._wait.configure(max(0, poll_start), pol.multi_batch)
        self._prefetch.configure(s.tx_prefetch_recheck_ns)
        for q in self._states.values():
            if q.kq is not None:
                q.kq.set_budget(*pol.batch_budget(q))
                self._apply_fixed_prefetch(q)

    def _attach(self, work: QueueWork) -> None:
        if work in self._states:
            return
        now = self._clock()
        q = QueueState(work, now, self._states.values, self._next_id)
        self._next_id += 1
        if q.kq is not None:  # served in C on kicks: the wait watches its fds
            q.kq.set_budget(*self.policy.batch_budget(q))
            self._apply_fixed_prefetch(q)
            self._wait.add(q.kq, q.ident)
            self._ids[q.ident] = q
        else:
            for fd in work.kick_fds():
                if fd >= 0:
                    self._kick_fds.add(fd)
            for fd in work.kick_fds() + work.data_fds():
                if fd < 0:
                    continue
                users = self._by_fd.setdefault(fd, [])
                if not users:
                    self._wait.watch(fd)
                users.append(q)
        self._states[work] = q
        self.stats.works = len(self._states)
        # Runnable at once: the driver may have queued buffers (and kicked) before we listened.
        try:
            work.set_notify(False)
        except GuestError as err:
            self._fail(q, err)
            return
        work.stats.notify_off += 1
        if q.poll_only and self.settings.polling and self._can_poll():
            self._start_polling(q, now)
        else:
            q.state = QUEUED
            q.enq_ns = now
            self._queued.append(q)

    def _detach(self, work: QueueWork) -> None:
        q = self._states.pop(work, None)
        if q is None:
            return
        if q.state == QUEUED:
            self._queued.remove(q)
        elif q.state == POLLED:
            self._polled.remove(q)
            self._poll_gen += 1
        if q.urgent:
            q.urgent = False
            self._n_urgent -= 1
        st = q.stats
        if st.polling:  # close the polling period; the next owner decides afresh
            st.polled_ns += max(0, self._clock() - st.poll_since_ns)
            st.polling = False
            st.poll_stops += 1
            self.stats.polling -= 1
        q.state = IDLE
        if q.kq is not None:
            self._wait.remove(q.kq)
            self._ids.pop(q.ident, None)
        for fd in [] if q.kq is not None else work.kick_fds() + work.data_fds():
            users = self._by_fd.get(fd)
            if not users or q not in users:
                continue
            users.remove(q)
            if not users:
                del self._by_fd[fd]
                self._kick_fds.discard(fd)
                self._wait.unwatch(fd)
        self.stats.works = len(self._states)

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

    # ---- worker thread: events ----------------------------------------------------------------

    def _collect(self, arrival: int, in_turn: bool = False) -> None:
        """Look at the wait without blocking (the Python side is serving queues): kicked
        C-served queues join the queue list (their kicks already off), Python fds are handled,
        commands run unless mid-turn."""
        reasons = self._wait.run(False)
        if reasons & (WAIT_FDS | WAIT_SCHED):
            rep = self._wait.report()
            if rep.fds:
                self._events(rep.fds, arrival)
            for ident in rep.ids:
                self._handed(ident, arrival)
        if reasons & WAIT_CMD and not in_turn:  # level-triggered: mid-turn it shows up later
            self._run_commands()

    def _handed(self, ident: int, now: int) -> None:
        """The C wait handed a C-served queue over (its kicks off): decide as after a turn."""
        q = self._ids.get(ident)
        if q is None or q.kq is None:
            return
        kq = q.kq
        why = kq.why
        if why == WHY_BROKEN:
            self._fail(q, kq.error())
            return
        if why == WHY_KICK:  # kicked (or runnable) while the Python side serves other queues
            q.state = QUEUED
            q.enq_ns = now
            self._queued.append(q)
            return
        # WHY_POLL / WHY_BUDGET: one C batch served kq.last items; the rest is _serve_queued's
        n = max(kq.last, 0)
        self._served(q, now)
        q.last_work_ns = now
        pol = self.policy
        bp, _ = pol.batch_budget(q)
        q.busy = n >= bp
        pol.after_turn(q, n, 0, q.busy)
        if self.settings.polling and pol.start_polling(q, n):
            self._start_polling(q, now)
        elif why == WHY_BUDGET or q.poll_only:  # its turn goes on first
            q.state = QUEUED
            q.enq_ns = now
            self._queued.appendleft(q)
        else:
            self._rearm(q, now)

    def _events(self, fds: list[int], arrival: int) -> None:
        """Python-served works whose fds fired (kick fds are drained here)."""
        for fd in fds:
            states = self._by_fd.get(fd)
            if not states:
                continue
            kick = fd in self._kick_fds
            if kick:
                try:
                    os.eventfd_read(fd)
                except OSError:
                    pass
            for q in list(states):
                if kick:
                    q.stats.kicks += 1
                if q.state == IDLE:
                    try:
                        q.work.set_notify(False)
                    except GuestError as err:
                        self._fail(q, err)
                        continue
                    q.stats.notify_off += 1
                    q.state = QUEUED
                    q.enq_ns = arrival
                    self._queued.append(q)
                # QUEUED / POLLED / RUNNING: already going to be looked at

    def _fail(self, q: QueueState, err: GuestError) -> None:
        work = q.work
        log.warning("worker %s: %s broke: %s", self.name, work.name, err)
        if work in self._states:
            self._detach(work)
        try:
            work.broken(err)
        except Exception:
            log.exception("error callback failed")

    def _waited(self) -> None:
        reasons = self._wait.run(True)
        now = self._clock()
        if reasons & (WAIT_FDS | WAIT_SCHED):
            rep = self._wait.report()
            for ident in rep.ids:
                self._handed(ident, now)
            if rep.fds:
                self._events(rep.fds, now)
        if reasons & WAIT_CMD:
            self._run_commands()

    def _main(self) -> None:
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})
            except OSError as err:
                log.warning("worker %s: cannot pin to cpu %s: %s", self.name, self.cpu, err)
        stats = self.stats
        clock = self._clock
        last = clock()
        while not self._stopping:
            if self._queued or self._polled:
                self._last_epoll = last
                self._collect(last)
                now = clock()
                if self._scan_every and now >= self._next_scan:
                    self._scan(now)
                moved = 0
                if self._queued:
                    moved += self._serve_queued(self._queued.popleft())
                if self._polled:
                    # one polled queue too: served in C between two Python looks, a queue
                    # served turn by turn met the worker's Python every busy-poll window
                    if self._round_ns:
                        moved += self._serve_round()
                    else:
                        moved += self._serve_polled(clock())
                now = clock()
                if moved:
                    stats.busy_ns += now - last
                else:
                    stats.idle_ns += now - last
                last = now
            else:
                # Nothing for Python to serve: wait in C (GIL released), which serves kicked
                # C-served queues itself and returns only when Python is needed. Its sleeps,
                # loops and busy/idle time are counted in C.
                self._waited()
                last = clock()
            stats.loops += 1
        # Leave every work with kicks enabled so a restarted backend sees the ring as the driver
        # left it.
        for work in list(self._states):
            try:
                work.set_notify(True)
            except GuestError:
                pass
