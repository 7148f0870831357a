"""The serving half of a worker thread: turns, polling start and stop, re-arming kicks, the
poll list and the C poll rounds (the ELVIS loop's steps 1-3, see iosched/worker.py).

A mixin of `Worker`: it owns no state of its own, and every method runs in the worker's own
thread only (between commands, never concurrently with them).
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING

from virtio.errors import GuestError
from virtio.kick import COp, Round, RoundBroken, set_tx_prefetch

from .policy import Policy
from .work import IDLE, POLLED, QUEUED, RUNNING, QueueState, QueueWork

if TYPE_CHECKING:
    from collections.abc import Callable

    from virtio.kick import Wait

    from .policy import SchedSettings
    from .prefetch_tuner import PrefetchTuner
    from .work import WorkerStats

__all__ = ["Serving"]

log = logging.getLogger("vhostx.data")

_DRAINED, _BUDGET = 0, 1
_NOMINAL_PKT = 64  # bytes assumed for a batch that ran before any counter reading
_ROUND_MAX_PASSES = 1 << 20  # C rounds end on time (poll_round_ns), not on a pass count


class Serving:
    """Worker methods that serve queues; the attributes below are the Worker's."""

    if TYPE_CHECKING:
        name: str
        settings: SchedSettings
        policy: Policy
        stats: WorkerStats
        _queued: collections.deque[QueueState]
        _polled: collections.deque[QueueState]
        _states: dict[QueueWork, QueueState]
        _clock: Callable[[], int]
        _next_scan: int
        _last_epoll: int
        _scan_every: int
        _n_urgent: int
        _poll_gen: int
        _round: Round | None
        _round_qs: list[QueueState]
        _round_gen: int
        _round_ns: int
        _round_max_ns: int
        _coalesce_ns: int
        _wait: Wait
        _prefetch: PrefetchTuner
        _round_auto: list[int]

        def _collect(self, arrival: int, in_turn: bool = False) -> None: ...
        def _fail(self, q: QueueState, err: GuestError) -> None: ...
        def _can_poll(self) -> bool: ...

    def _turn(self, q: QueueState) -> tuple[int, int]:
        """Serve `q` for one turn: (packets, _DRAINED | _BUDGET). GuestError propagates."""
        work, pol, st = q.work, self.policy, q.stats
        st.turns += 1
        bp, bb = pol.batch_budget(q)
        start = q.bytes_moved(0) if (q.busy and pol.multi_batch) else None
        # A C batch may busy-poll its ring (busy_poll_us) only while no other queue of this
        # worker waits: the client refills the other rings meanwhile, and they would wait.
        work.solo = not (self._queued or self._polled)
        n = work.run(bp, bb)
        total = n
        if n < bp:
            q.busy = False
            if total:
                pol.after_turn(q, total, 0, False)
            return total, _DRAINED
        if not pol.multi_batch:
            st.budget_exhausted += 1
            return total, _BUDGET
        outcome = _DRAINED
        turn_bytes = 0
        while True:
            now_bytes = q.bytes_moved(total)
            if start is None:
                start = now_bytes - min(bb, bp * _NOMINAL_PKT)
            turn_bytes = now_bytes - start
            if not pol.continue_turn(q, turn_bytes, self._pressure()):
                st.budget_exhausted += 1
                outcome = _BUDGET
                break
            n = work.run(bp, bb)
            total += n
            if n < bp:
                break
        q.busy = True
        pol.after_turn(q, total, turn_bytes, True)
        return total, outcome

    def _pressure(self) -> bool:
        """Between two batches of one turn: should the current queue yield (past the minimum)?"""
        s = self.settings
        now = self._clock()
        limit = s.max_work_stuck_ns
        if limit >= 0:
            if now - self._last_epoll >= limit // 2:
                prev = self._last_epoll
                self._last_epoll = now
                self._collect(prev, in_turn=True)
            if self._queued and now - self._queued[0].enq_ns >= limit:
                return True
        if self._scan_every and now >= self._next_scan:
            self._scan(now)
        return self._n_urgent > 0

    def _scan(self, now: int) -> None:
        """Stuck detection and min_poll_rate over the poll list; urgent queues go to its head."""
        self._next_scan = now + self._scan_every
        pol = self.policy
        stuck_on = any(d.max_queue_stuck_ns >= 0 for d in self.settings.every())
        for q in list(self._polled):
            if q.urgent:
                continue
            hit = pol.overdue(q, now)
            if not hit and stuck_on:
                try:
                    # pending() first: an RX ring's avail entries are empty buffers, not work
                    p = q.pending_count() if q.work.pending() else 0
                except GuestError as err:
                    self._fail(q, err)  # detaches it: out of the poll list
                    continue
                if p <= 0 or p != q.stuck_pending:
                    q.stuck_pending = max(p, 0)
                    q.stuck_since_ns = now
                elif pol.stuck(q, p, now):
                    q.stats.stuck_events += 1
                    hit = True
            if hit:
                q.urgent = True
                self._n_urgent += 1
                self._polled.remove(q)
                self._polled.appendleft(q)

    def _served(self, q: QueueState, now: int) -> None:
        q.last_served_ns = now
        q.last_checked_ns = now
        q.stuck_since_ns = now
        if q.urgent:
            q.urgent = False
            self._n_urgent -= 1

    def _start_polling(self, q: QueueState, now: int) -> None:
        st = q.stats
        st.poll_starts += 1
        st.polling = True
        st.poll_since_ns = now
        q.last_work_ns = now
        q.state = POLLED
        self._polled.append(q)
        self._poll_gen += 1
        self.stats.polling += 1

    def _stop_polling(self, q: QueueState, now: int) -> None:
        """q is out of the poll list: kicks back on, then the re-check."""
        st = q.stats
        self._poll_gen += 1
        st.poll_stops += 1
        st.polled_ns += max(0, now - st.poll_since_ns)
        st.polling = False
        self.stats.polling -= 1
        if q.urgent:
            q.urgent = False
            self._n_urgent -= 1
        self._rearm(q, now)

    def _rearm(self, q: QueueState, now: int) -> None:
        """Re-enable kicks, then look once more: a buffer added while kicks were off (the driver
        saw NO_NOTIFY and did not kick) is found here instead of being stranded."""
        work, st = q.work, q.stats
        try:
            work.set_notify(True)
            st.notify_on += 1
            again = work.pending()
            if again:
                work.set_notify(False)
                st.notify_off += 1
        except GuestError as err:
            self._fail(q, err)
            return
        if again:
            q.state = QUEUED
            q.enq_ns = now
            self._queued.append(q)
        else:
            q.state = IDLE
            if q.kq is not None:  # kicks on and re-checked: the C wait serves the next kick
                q.kq.give_back()

    def _serve_queued(self, q: QueueState) -> int:
        now = self._clock()
        q.state = RUNNING
        try:
            total, outcome = self._turn(q)
        except GuestError as err:
            self._fail(q, err)
            return 0
        self._served(q, now)
        st = q.stats
        if total:
            q.last_work_ns = now
        else:
            st.empty_turns += 1
        if self.settings.polling and self.policy.start_polling(q, total):
            self._start_polling(q, now)
        elif outcome == _BUDGET or q.poll_only:
            q.state = QUEUED
            q.enq_ns = now
            self._queued.append(q)
        else:
            self._rearm(q, now)
        return total

    def _serve_polled(self, now: int) -> int:
        polled = self._polled
        q = polled.popleft()
        if not q.urgent and self.policy.coalesced(q, now):
            polled.append(q)
            return 0
        q.state = RUNNING
        try:
            total, _ = self._turn(q)
        except GuestError as err:
            self._fail(q, err)
            return 0
        self._served(q, now)
        st = q.stats
        if total:
            q.last_work_ns = now
            st.kicks_avoided += 1
        else:
            st.empty_turns += 1
            self.stats.empty_polls += 1
            if not q.poll_only and self.policy.stop_polling(q, now - q.last_work_ns):
                self._stop_polling(q, now)
                return 0
        q.state = POLLED
        polled.append(q)
        return total

    def _build_round(self) -> None:
        """The Round over every polled work, if each has a C op (else None: the Python path)."""
        self._round_gen = self._poll_gen
        qs = list(self._polled)
        ops: list[COp] = []
        for q in qs:
            op = q.kq.op if q.kq is not None else getattr(q.work, "op", None)
            if op is None:
                self._round, self._round_qs = None, []
                return
            op.set_budget(*self.policy.batch_budget(q))
            ops.append(op)
        rnd = Round(ops)
        self._prefetch.abort()  # other rings: an exploration under way would mix them
        auto: list[int] = []
        for i, q in enumerate(qs):
            rnd.set_idle_exit(i, self._idle_exit_ns(q))
            s = self.policy.settings_for(q)
            rnd.set_batch_wait(i, s.poll_batch_target, s.poll_batch_wait_max_ns)
            if s.tx_prefetch == "auto":
                auto.append(i)
                set_tx_prefetch(ops[i], self._prefetch.applied)
            else:
                set_tx_prefetch(ops[i], s.tx_prefetch)
        self._round, self._round_qs, self._round_auto = rnd, qs, auto

    def _tune_prefetch(self, rnd: Round, res: list[int], now: int) -> None:
        """Feed the round's packets on tx_prefetch-auto rings to the tuner; apply its hint."""
        tuner = self._prefetch
        was_exploring = tuner.exploring
        hint = tuner.account(now, sum(res[5 * i + 3] for i in self._round_auto))
        if hint is not None:
            for i in self._round_auto:
                set_tx_prefetch(rnd.ops[i], hint)
        if was_exploring != tuner.exploring:
            st = self.stats
            st.prefetch_explorations = tuner.explorations
            st.prefetch_switches = tuner.switches
            st.prefetch_t0 = int(tuner.current == "t0")
            if was_exploring:
                log.log(logging.INFO if tuner.last_outcome == "switched" else logging.DEBUG,
                        "%s: tx_prefetch auto: %s %s (%s)", self.name, tuner.last_outcome,
                        tuner.current, ", ".join(f"{h} {r / 1e6:.2f} Mpps" for h, r in
                                                 sorted(tuner.last_rates.items())))

    def _apply_fixed_prefetch(self, q: QueueState) -> None:
        """A kicked queue's ring takes its device's tx_prefetch unless that is auto (then it
        keeps the hint it last had: nta at first, the tuner's while it was polled)."""
        if q.kq is None:
            return
        mode = self.policy.settings_for(q).tx_prefetch
        if mode != "auto":
            set_tx_prefetch(q.kq.op, mode)

    def _idle_exit_ns(self, q: QueueState) -> int:
        """How long q may find nothing before an extended C round hands it back (0: never, it
        is polled for good): its poll_stop_idle, or 1 ns when any empty batch may stop it."""
        if q.poll_only:
            return 0
        pol = self.policy
        if pol.stop_polling(q, 0):
            return 1
        return max(1, pol.settings_for(q).poll_stop_idle_ns)

    def _serve_round(self) -> int:
        """Every polled queue in one C call (vx_round): one batch each per pass, passes for up to
        poll_round_ns; then the per-queue bookkeeping of _serve_polled, once per round."""
        if self._round_gen != self._poll_gen:
            self._build_round()
        rnd = self._round
        if rnd is None:
            return self._serve_polled(self._clock())
        broken: RoundBroken | None = None
        t0 = self._clock()
        # Past poll_round_ns only while nothing needs Python: no queued queue, no scan due
        # sooner; the C round itself looks every poll_round_ns at the wait and at idle queues.
        max_ns = self._round_ns
        if not self._queued and self._round_max_ns > max_ns:
            max_ns = self._round_max_ns
            if self._scan_every:
                max_ns = max(self._round_ns, min(max_ns, self._next_scan - t0))
        cap = self._prefetch.round_cap_ns(t0) if self._round_auto else None
        if cap is not None and cap < max_ns:
            max_ns = cap  # the tuner's epoch ends there
        try:
            rnd.run_until(_ROUND_MAX_PASSES, self._round_ns, max_ns, self._coalesce_ns,
                          self._wait)
        except RoundBroken as err:
            broken = err
        now = self._clock()
        self.stats.round_ns += now - t0
        pol = self.policy
        total = 0
        empty_polls = 0
        idle: list[QueueState] = []
        # Python per round grows with the polled queues (at 32 it is of the order of the round
        # itself): one C call for every op's results, and per queue only plain attribute work
        res = rnd.results()
        after_turn = None if type(pol).after_turn is Policy.after_turn else pol.after_turn
        for q, (batches, found, full, pkts, last_work) in zip(
                self._round_qs, zip(*[iter(res)] * 5, strict=True), strict=True):  # fmt: skip
            if not batches:
                continue
            q.stats.add_round(batches, found)
            q.last_served_ns = q.last_checked_ns = q.stuck_since_ns = now  # _served, inlined
            if q.urgent:
                q.urgent = False
                self._n_urgent -= 1
            if found:
                total += pkts
                q.last_work_ns = last_work
                if after_turn is not None:
                    after_turn(q, pkts, 0, full > 0)
            empty = batches - found
            if empty:
                empty_polls += empty
                if (not found and not q.poll_only
                        and pol.stop_polling(q, now - q.last_work_ns)):  # fmt: skip
                    idle.append(q)
        self.stats.empty_polls += empty_polls
        self.stats.rounds += 1
        if self._round_auto and self._prefetch.due(now):
            self._tune_prefetch(rnd, res, now)
        if broken is not None:
            bq = self._round_qs[broken.index]
            if bq in idle:
                idle.remove(bq)
            self._fail(bq, broken.error)
        for q in idle:
            self._polled.remove(q)
            self._stop_polling(q, now)
        return total

