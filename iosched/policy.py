"""Scheduling settings and policies: what a worker serves next, how long a turn lasts, when a
queue starts and stops polling.

`SchedSettings` is every scheduling parameter in user units, read from the registry at once (an
immutable snapshot handed to workers through their command queue, so a change applies between
turns, never in the middle of one). A `Policy` takes decisions only; the mechanics that must stay
correct whatever the policy says (kick suppression, the re-check after re-enabling kicks, fd
registration, detach between turns) live in `iosched.worker`.

The decisions, and who asks for them (the worker thread, once per C batch or per tick, never per
packet):
  - `batch_budget(q)`        packets / bytes of one C batch
  - `continue_turn(q, ...)`  after a full batch: go on with the same queue, or end its turn
  - `start_polling(q, n)`    after a turn that served n items from a kicked queue
  - `stop_polling(q, idle)`  after an empty poll; idle = time since the queue last had work
  - `coalesced(q, now)`      skip checking this polled queue in this round
  - `overdue(q, now)`        a polled queue must be checked now (min_poll_rate)
  - `stuck(q, pending, now)` a polled queue with unchanged pending items waited too long
  - `after_turn(q, ...)`     bookkeeping (the classes policy classifies queues here)

ELVIS's two bugs are not reproduced: `continue_turn` really ends a turn between the data limits
when something else is waiting or stuck (ELVIS's "can continue" check always said yes, missing
braces), and a queue is overdue when the time since its last check is *at least* the period of
`min_poll_rate` (the ELVIS comparison looked inverted).

Threads: `SchedSettings.from_registry` on any thread (normally the daemon's asyncio thread);
policy methods only on the worker thread that owns the policy instance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from . import params as P

if TYPE_CHECKING:
    from .work import QueueState

__all__ = [
    "POLICIES",
    "ClassesPolicy",
    "ElvisPolicy",
    "Policy",
    "SchedSettings",
    "VhostPolicy",
    "make_policy",
]

_NS_PER_US = 1_000


@dataclass(frozen=True)
class SchedSettings:
    """Every ELVIS parameter in user units (microseconds, bytes, items, Hz)."""

    polling: bool = False  # False in baseline mode: kicks drive everything (stock vhost)
    poll_start_rate: int = 1
    poll_stop_idle_us: int = 3_000_000
    poll_coalescing_us: int = 0
    max_work_stuck_us: int = -1
    max_queue_stuck_us: int = -1
    max_queue_stuck_size: int = 0
    min_processed_data_limit: int = 1500
    max_processed_data_limit: int = 524288
    min_poll_rate: int = 0
    turn_max_packets: int = 256
    turn_max_bytes: int = 524288
    poll_round_us: int = 50  # 0: no C poll rounds

    @classmethod
    def from_registry(cls, reg: P.Registry = P.REGISTRY, *, mode: str | None = None) -> SchedSettings:
        """A snapshot of the registry's current values (`mode` overrides the registry's)."""
        g = reg.get
        mode = mode if mode is not None else g("mode")
        return cls(
            polling=mode == "shared",
            poll_start_rate=g("poll_start_rate"),
            poll_stop_idle_us=g("poll_stop_idle"),
            poll_coalescing_us=g("poll_coalescing"),
            max_work_stuck_us=g("max_work_stuck_us"),
            max_queue_stuck_us=g("max_queue_stuck_us"),
            max_queue_stuck_size=g("max_queue_stuck_size"),
            min_processed_data_limit=g("min_processed_data_limit"),
            max_processed_data_limit=g("max_processed_data_limit"),
            min_poll_rate=g("min_poll_rate"),
            turn_max_packets=g("turn_max_packets"),
            turn_max_bytes=g("turn_max_bytes"),
            poll_round_us=g("poll_round_us"),
        )

    def with_(self, **changes: Any) -> SchedSettings:
        return replace(self, **changes)

    # nanosecond views the worker loop compares against its clock
    @property
    def poll_stop_idle_ns(self) -> int:
        return self.poll_stop_idle_us * _NS_PER_US

    @property
    def poll_coalescing_ns(self) -> int:
        return self.poll_coalescing_us * _NS_PER_US

    @property
    def max_work_stuck_ns(self) -> int:
        """-1: off."""
        return -1 if self.max_work_stuck_us < 0 else self.max_work_stuck_us * _NS_PER_US

    @property
    def max_queue_stuck_ns(self) -> int:
        """-1: off."""
        return -1 if self.max_queue_stuck_us < 0 else self.max_queue_stuck_us * _NS_PER_US

    @property
    def poll_round_ns(self) -> int:
        """How long one C poll round may last: poll_round_us, capped at half of
        max_work_stuck_us when that is on (a waiting kick is looked at in time); 0: no rounds."""
        r = self.poll_round_us * _NS_PER_US
        if self.max_work_stuck_us >= 0:
            r = min(r, self.max_work_stuck_us * _NS_PER_US // 2)
        return r

    @property
    def min_poll_period_ns(self) -> int:
        """0: no minimum poll rate."""
        return 0 if self.min_poll_rate <= 0 else max(1, 1_000_000_000 // self.min_poll_rate)


class Policy:
    """The base policy: ELVIS's decisions with the settings as given. Subclass to change them."""

    name: ClassVar[str] = "base"
    #: whether a turn may span several C batches (False: one batch per turn, stock vhost)
    multi_batch: ClassVar[bool] = True
    #: whether queues may ever be polled under this policy
    polls: ClassVar[bool] = True

    def __init__(self, settings: SchedSettings) -> None:
        self.settings = settings

    def update(self, settings: SchedSettings) -> None:
        self.settings = settings

    # ---- turns --------------------------------------------------------------------------------

    def batch_budget(self, q: QueueState) -> tuple[int, int]:
        s = self.settings
        return s.turn_max_packets, s.turn_max_bytes

    def turn_limit(self, q: QueueState) -> int:
        """Bytes after which a turn always ends."""
        return self.settings.max_processed_data_limit

    def continue_turn(self, q: QueueState, turn_bytes: int, pressure: bool) -> bool:
        """After a full C batch: keep serving `q`? `pressure`: a kick waited too long, a polled
        queue is stuck or overdue. Below min_processed_data_limit always yes, at or above the
        turn limit always no, in between yes unless there is pressure."""
        if turn_bytes < self.settings.min_processed_data_limit:
            return True
        if turn_bytes >= self.turn_limit(q):
            return False
        return not pressure

    def after_turn(self, q: QueueState, packets: int, turn_bytes: int, full: bool) -> None:
        """Bookkeeping after every turn that served something (`full`: a batch was full)."""

    # ---- polling ------------------------------------------------------------------------------

    def start_polling(self, q: QueueState, served: int) -> bool:
        s = self.settings
        return s.polling and s.poll_start_rate > 0 and served >= s.poll_start_rate

    def stop_polling(self, q: QueueState, idle_ns: int) -> bool:
        s = self.settings
        if not s.polling or s.poll_start_rate == 0:
            return True
        return idle_ns >= s.poll_stop_idle_ns

    def coalesced(self, q: QueueState, now: int) -> bool:
        """Skip this polled queue this round: it was served less than poll_coalescing ago."""
        c = self.settings.poll_coalescing_ns
        return c > 0 and now - q.last_served_ns < c

    def overdue(self, q: QueueState, now: int) -> bool:
        """min_poll_rate: the queue was last checked at least one period ago (not inverted)."""
        period = self.settings.min_poll_period_ns
        return period > 0 and now - q.last_checked_ns >= period

    def stuck(self, q: QueueState, pending: int, now: int) -> bool:
        """A polled queue unserved for max_queue_stuck_us with the same pending count all along
        (and, if max_queue_stuck_size > 0, at most that many pending items)."""
        s = self.settings
        limit = s.max_queue_stuck_ns
        if limit < 0 or pending <= 0:
            return False
        if s.max_queue_stuck_size > 0 and pending > s.max_queue_stuck_size:
            return False
        since = max(q.last_served_ns, q.stuck_since_ns)
        return now - since >= limit

    def poll_order_key(self, q: QueueState) -> int:
        """Lower is checked earlier when the worker re-sorts its poll list (0: plain RR)."""
        return 0


class VhostPolicy(Policy):
    """Stock vhost (baseline mode): one C batch per turn, kicks only, never polls."""

    name = "vhost"
    multi_batch = False
    polls = False

    def start_polling(self, q: QueueState, served: int) -> bool:
        return False

    def stop_polling(self, q: QueueState, idle_ns: int) -> bool:
        return True


class ElvisPolicy(Policy):
    """The default for shared workers: ELVIS fine-grained I/O scheduling (see the module doc)."""

    name = "elvis"


class ClassesPolicy(ElvisPolicy):
    """ELVIS plus a latency/throughput classification of queues.

    A queue is "throughput" when an exponential average of its turns fills C batches (its ring
    rarely runs dry within one batch), else "latency". Throughput queues get a shorter turn limit
    (`max(min_processed_data_limit, max_processed_data_limit // 8)`) whenever a latency queue
    shares the worker, and latency queues are checked first when the poll list is re-ordered.
    """

    name = "classes"
    _ALPHA_SHIFT = 3  # EWMA weight 1/8

    def after_turn(self, q: QueueState, packets: int, turn_bytes: int, full: bool) -> None:
        # fixed point x256: 256 = every recent turn had a full batch
        sample = 256 if full else 0
        q.full_ewma += (sample - q.full_ewma) >> self._ALPHA_SHIFT
        q.klass = "throughput" if q.full_ewma >= 128 else "latency"

    def turn_limit(self, q: QueueState) -> int:
        s = self.settings
        if q.klass == "throughput" and q.worker_has_latency():
            return max(s.min_processed_data_limit, s.max_processed_data_limit // 8)
        return s.max_processed_data_limit

    def poll_order_key(self, q: QueueState) -> int:
        return 0 if q.klass == "latency" else 1


POLICIES: dict[str, type[Policy]] = {
    "elvis": ElvisPolicy,
    "classes": ClassesPolicy,
    "vhost": VhostPolicy,
}


def make_policy(name: str, settings: SchedSettings) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(POLICIES)}") from None
    return cls(settings)
