"""The frame-prefetch tuner of one worker: which prefetch hint its TX rings use under
`tx_prefetch = auto`, chosen by measuring.

Why measure: a TX batch prefetches the frames it is about to copy (vx_tx.h). A line the driver
wrote and we read is the line the driver writes again when it reuses the buffer, and that write
waits until our copy is invalidated. Whether a non-temporal hint (NTA: the line stays out of our
L2) or an ordinary one (T0) makes that cheaper depends on the cache path between our core and
the driver's: on an AMD EPYC guest, guest TX 64 B from testpmd to 2 devices moved 15.7 Mpps with
T0 against 10.1 with NTA in one run of interleaved repetitions, and 7.7 against 6.0 the other
way in runs where the vCPUs sat further apart (docs/benchmarks.md, 2026-12-03). A vCPU cannot
see where the host put it, and the host moves it, so the worker tries both.

The rule. Outside exploration the current hint holds. An exploration starts at the first round
with packets on an auto ring once `recheck_ns` has passed since the last one (at once for the
first): epochs of `epoch_ns` alternate the other hint and the current one, `pairs` times (the
worker cuts its C rounds at the epoch ends). Each epoch's rate is its packets over its time;
the other hint wins when the median over the pairs of (its rate / the current hint's rate in
the same pair) exceeds 1 + `margin`, and when the current hint's epochs averaged at least
`min_pps` (below that, a light or paced stream: nothing to learn, the hint stays). Interleaving
in pairs keeps a change of offered load in the middle of an exploration from deciding it. An
exploration is dropped (the current hint back, a new one at the next traffic) when the worker's
polled rings change (a queue starts or stops polling: the packets would count other rings) or
when no round ran for longer than two epochs (the rings went idle).
What exploring costs: about pairs * epoch_ns of every recheck_ns at the other hint, half of
that at the worse one (40 ms in 2 s at the defaults).

Threads: the worker thread that owns it.
"""

from __future__ import annotations

import statistics

from virtio.errors import ConfigError

__all__ = ["CANDIDATES", "PrefetchTuner"]

CANDIDATES = ("nta", "t0")
_NS_PER_S = 1_000_000_000


class PrefetchTuner:
    """The hint of a worker's auto rings, and its explorations (the rule in the module's text)."""

    def __init__(self, recheck_ns: int, *, epoch_ns: int = 10_000_000, pairs: int = 4,
                 margin: float = 0.03, min_pps: int = 50_000, first: str = "nta") -> None:
        if first not in CANDIDATES:
            raise ConfigError(f"first hint must be one of {CANDIDATES}, got {first!r}")
        if epoch_ns <= 0 or pairs <= 0 or margin < 0 or min_pps < 0:
            raise ConfigError(f"epoch_ns and pairs must be > 0, margin and min_pps >= 0, got "
                              f"{epoch_ns}, {pairs}, {margin}, {min_pps}")
        self.recheck_ns = 0
        self.configure(recheck_ns)
        self.epoch_ns = epoch_ns
        self.pairs = pairs
        self.margin = margin
        self.min_pps = min_pps
        self.current = first  # the hint outside explorations
        self.applied = first  # the hint the auto rings have now
        self.explorations = 0
        self.switches = 0
        self.aborts = 0
        self._next_explore = 0  # CLOCK_MONOTONIC ns; 0: at the first traffic
        self._schedule: list[str] = []  # the exploration's epochs, in order (empty: holding)
        self._epoch_start = 0
        self._epoch_pkts = 0
        self._rates: list[float] = []  # packets per second of each finished epoch
        self.last_rates: dict[str, float] = {}  # the last exploration: median pps per hint
        self.last_outcome = ""  # the last exploration: "switched", "kept", "light", "dropped"

    def configure(self, recheck_ns: int) -> None:
        """How long a decision holds before the next exploration (0: explore only once)."""
        if recheck_ns < 0:
            raise ConfigError(f"recheck_ns must be >= 0, got {recheck_ns}")
        self.recheck_ns = recheck_ns

    @property
    def exploring(self) -> bool:
        return bool(self._schedule)

    @property
    def decisions(self) -> int:
        """Explorations that ran to their end (kept, switched or light)."""
        return self.explorations - self.aborts - int(self.exploring)

    def due(self, now: int) -> bool:
        """Whether account() has anything to do at `now` (a worker skips counting otherwise)."""
        if self._schedule:
            return True
        return now >= self._next_explore and not (self.explorations and not self.recheck_ns)

    def round_cap_ns(self, now: int) -> int | None:
        """While exploring: how long the next C round may last (it must end at the epoch's end,
        at least 1 ns); None while holding."""
        if not self._schedule:
            return None
        return max(1, self._epoch_start + self.epoch_ns - now)

    def account(self, now: int, pkts: int) -> str | None:
        """One round has ended at `now`, having moved `pkts` packets on the auto rings. Returns
        the hint those rings must take now, or None when it stays."""
        if not self._schedule:
            if pkts <= 0 or not self.due(now):
                return None
            other = CANDIDATES[1] if self.current == CANDIDATES[0] else CANDIDATES[0]
            self._schedule = [other, self.current] * self.pairs
            self._epoch_start, self._epoch_pkts = now, 0
            self._rates = []
            self.explorations += 1
            return self._apply(self._schedule[0])
        self._epoch_pkts += max(0, pkts)
        elapsed = now - self._epoch_start
        if elapsed < self.epoch_ns:
            return None
        if elapsed > 2 * self.epoch_ns:
            return self.abort()  # a gap with no rounds (the rings went idle): not a rate
        self._rates.append(self._epoch_pkts * _NS_PER_S / elapsed)
        self._epoch_start, self._epoch_pkts = now, 0
        if len(self._rates) < len(self._schedule):  # the next epoch's hint
            return self._apply(self._schedule[len(self._rates)])
        self._decide()
        self._schedule = []
        self._next_explore = now + self.recheck_ns
        return self._apply(self.current)

    def abort(self) -> str | None:
        """Drop the exploration under way (the set of rings changed, or rounds stopped for
        longer than an epoch): back to the current hint, a new one at the next traffic.
        Returns the hint to apply, as account() does."""
        if not self._schedule:
            return None
        self._schedule = []
        self.aborts += 1
        self.last_rates, self.last_outcome = {}, "dropped"
        return self._apply(self.current)

    def _decide(self) -> None:
        other, cur = self._schedule[0], self.current
        other_rates = self._rates[0::2]
        cur_rates = self._rates[1::2]
        self.last_rates = {other: statistics.median(other_rates),
                           cur: statistics.median(cur_rates)}
        if statistics.fmean(cur_rates) < self.min_pps:
            self.last_outcome = "light"
            return
        ratios = [o / c if c > 0 else float("inf") for o, c in zip(other_rates, cur_rates,
                                                                    strict=True)]
        if statistics.median(ratios) > 1.0 + self.margin:
            self.current = other
            self.switches += 1
            self.last_outcome = "switched"
        else:
            self.last_outcome = "kept"

    def _apply(self, hint: str) -> str | None:
        if hint == self.applied:
            return None
        self.applied = hint
        return hint
