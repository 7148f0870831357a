"""What a worker serves and what it keeps per served work: the types the worker (iosched.worker)
and the policies (iosched.policy) share, below both of them.

- `QueueWork`: the protocol of one opaque unit of work a device hands to a worker (normally one
  virtqueue and the port operation behind it, built by the device layer).
- `WorkStats` / `WorkerStats`: counters. A counter of a work served in C (its `kick_queue`) is
  the sum of what the Python side counted and what the C side counted (virtio.kick: the
  KickQueue's or the Wait's C counters), so Python runs per command, timer and statistics
  snapshot, not per kick, and the counters stay monotonic across migrations.
- `QueueState`: the worker's per-work scheduling state, handed to the policy's decisions.

Threads: counters are written by the worker thread that serves the work, read from any thread
(benign races, monotonic); QueueState only in its worker's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any, Protocol

from virtio.errors import GuestError
from virtio.kick import KickQueue

__all__ = ["IDLE", "POLLED", "QUEUED", "RUNNING", "QueueState", "QueueWork", "WorkStats",
           "WorkerStats"]

IDLE, QUEUED, POLLED, RUNNING = 0, 1, 2, 3
_FALLBACK_PKT = 1500  # bytes per packet when a work has no counters()


class QueueWork(Protocol):
    """One thing a worker serves: usually one virtqueue and the port behind it.

    Optional (read with getattr): `device: str` (the device's name), `counters() -> dict` (the C
    queue counters; "bytes" drives the data limits), `queue` (an object whose `pending()` gives
    the pending count for stuck detection), `migratable_alone: bool` (False: the work shares a
    ring with another work of its device without a lock, so it may only move with its whole
    device), `op` (a virtio.kick.COp: the worker may serve the work in C poll rounds),
    `kick_queue` (a virtio.kick.KickQueue over the same op and kick fd: the worker serves its
    kicks inside its C wait, with no Python per kick; its `stats` must then count with the
    kick queue's C counters, `WorkStats(kick_queue.counters)`).
    """

    name: str
    stats: WorkStats
    poll_only: bool  # no kick fd: the work is polled for as long as it is attached
    solo: bool  # set by the worker before each turn: no other queue of this worker is waiting

    def kick_fds(self) -> list[int]:
        """Eventfds the driver writes to kick (drained by the worker on wake-up)."""

    def data_fds(self) -> list[int]:
        """Other fds whose readability means work (a TAP fd); never read by the worker."""

    def run(self, budget_pkts: int, budget_bytes: int) -> int:
        """Serve one C batch; return the packets handled (0: nothing to do)."""

    def pending(self) -> bool:
        """Whether there is work right now (checked after re-enabling notifications)."""

    def set_notify(self, enable: bool) -> None:
        """Ask the driver for kicks (True) or suppress them (False)."""

    def broken(self, err: GuestError) -> None:
        """Worker thread: the ring broke and the work was detached; tell its device."""


class _Counter:
    """A counter kept in Python (`_name`) plus, when bound, the same-named C counter."""

    __slots__ = ("name", "py")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.py = "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        c = obj._c
        v = getattr(obj, self.py)
        return v if c is None else v + int(getattr(c, self.name))

    def __set__(self, obj: Any, value: int) -> None:
        # only the worker thread writes, and the C part moves only inside its C calls
        c = obj._c
        setattr(obj, self.py, value if c is None else value - int(getattr(c, self.name)))


class _Counters:
    """Base of the counter sets: plain fields plus `_Counter`s, `as_dict()`, `freeze_c()`."""

    _PLAIN: tuple[tuple[str, Any], ...] = ()
    _SUMMED: tuple[str, ...] = ()

    def __init__(self, c: Any = None, **values: Any) -> None:
        self._c = c
        for name in self._SUMMED:
            object.__setattr__(self, "_" + name, 0)
        for name, default in self._PLAIN:
            object.__setattr__(self, name, default)
        for name, v in values.items():
            setattr(self, name, v)

    def as_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self._SUMMED}
        d.update((name, getattr(self, name)) for name, _ in self._PLAIN)
        return d

    def freeze_c(self) -> None:
        """The C counters are about to go away: keep their last values (one atomic swap)."""
        c = self._c
        if c is not None:
            self._c = SimpleNamespace(**{n: int(getattr(c, n)) for n in self._SUMMED})

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"{type(self).__name__}({fields})"


class WorkStats(_Counters):
    """Per-work scheduling counters. They live with the work, so they survive migrations and are
    monotonic. `c`: the work's C counters (KickQueue.counters) when its kicks are served in C."""

    kicks = _Counter()
    turns = _Counter()
    empty_turns = _Counter()
    notify_on = _Counter()
    notify_off = _Counter()
    budget_exhausted = _Counter()
    stream_waits = _Counter()  # C only: empty batches after a full one that waited for a refill
    stream_found = _Counter()  # ... whose wait found one
    rearm_deferred = _Counter()  # C only: batches with work requeued, kicks off (others runnable)
    wakes = _Counter()  # C only: wake-ups of the sleeping queue (arrivals no busy-poll caught)
    caught = _Counter()  # C only: arrivals a busy-poll window found with kicks still off
    lingers = _Counter()  # C only: batches whose spin caught buffers, requeued with kicks off
    widened = _Counter()  # C only: wake-ups soon after a re-arm that doubled the adaptive window
    _SUMMED = ("kicks", "turns", "empty_turns", "notify_on", "notify_off", "budget_exhausted",
               "stream_waits", "stream_found", "rearm_deferred", "wakes", "caught", "lingers",
               "widened")
    _PLAIN = (
        ("kicks_avoided", 0),
        ("poll_starts", 0),
        ("poll_stops", 0),
        ("polled_ns", 0),  # closed polling periods; add now - poll_since_ns while `polling`
        ("stuck_events", 0),
        ("polling", False),
        ("poll_since_ns", 0),
    )
    kicks_avoided: int
    poll_starts: int
    poll_stops: int
    polled_ns: int
    stuck_events: int
    polling: bool
    poll_since_ns: int
    _turns: int  # the Python parts of two _Counters (see add_round)
    _empty_turns: int

    def add_round(self, batches: int, found: int) -> None:
        """A C poll round's `batches` of this work, `found` of them with work: turns,
        empty_turns and kicks_avoided in one call (the shared worker's per-round path). Adding
        to a counter's Python part is what `+=` through it does, without its two C reads."""
        self._turns += batches
        self._empty_turns += batches - found
        self.kicks_avoided += found


class WorkerStats(_Counters):
    """Per-worker counters; loops, sleeps, busy_ns and idle_ns add the worker's C wait's."""

    loops = _Counter()
    sleeps = _Counter()
    busy_ns = _Counter()  # ticks and C batches that moved packets
    idle_ns = _Counter()  # asleep, or ticks / C batches that found nothing
    _SUMMED = ("loops", "sleeps", "busy_ns", "idle_ns")
    _PLAIN = (
        ("works", 0),
        ("empty_polls", 0),  # checks of a polled queue that found nothing
        ("rounds", 0),  # C poll rounds (poll_round_us): all polled queues served in one C call
        ("round_ns", 0),  # time inside those C calls (the rest of busy_ns is Python around them)
        ("polling", 0),  # works currently polled
        # tx_prefetch auto (iosched/prefetch_tuner.py): measurements of nta against t0, the
        # ones that changed the hint, and the hint now (1: t0, 0: nta)
        ("prefetch_explorations", 0),
        ("prefetch_switches", 0),
        ("prefetch_t0", 0),
    )
    works: int
    empty_polls: int
    rounds: int
    round_ns: int
    polling: int
    prefetch_explorations: int
    prefetch_switches: int
    prefetch_t0: int


class QueueState:
    """The worker's per-work scheduling state (worker thread only). `peers()` gives the states
    of every work on the same worker (ClassesPolicy asks about them)."""

    __slots__ = (
        "_peers",
        "busy",
        "bytes_fn",
        "enq_ns",
        "full_ewma",
        "ident",
        "klass",
        "kq",
        "last_checked_ns",
        "last_served_ns",
        "last_work_ns",
        "pending_count",
        "poll_only",
        "state",
        "stats",
        "stuck_pending",
        "stuck_since_ns",
        "urgent",
        "work",
    )  # fmt: skip

    def __init__(self, work: QueueWork, now: int, peers: Callable[[], Iterable[QueueState]],
                 ident: int = 0) -> None:  # fmt: skip
        self._peers = peers
        self.work = work
        self.ident = ident
        self.stats: WorkStats = work.stats
        self.poll_only = bool(getattr(work, "poll_only", False))
        kq = getattr(work, "kick_queue", None)
        self.kq: KickQueue | None = kq if isinstance(kq, KickQueue) else None
        self.state = IDLE
        self.enq_ns = now
        self.last_served_ns = now
        self.last_checked_ns = now
        self.last_work_ns = now
        self.stuck_pending = 0
        self.stuck_since_ns = now
        self.urgent = False
        self.busy = False  # the last turn had a full batch
        self.full_ewma = 0
        self.klass = "latency"
        counters = getattr(work, "counters", None)
        self.bytes_fn: Callable[[], int] | None = (
            (lambda: int(counters()["bytes"])) if callable(counters) else None
        )
        queue = getattr(work, "queue", None)
        qpending = getattr(queue, "pending", None)
        self.pending_count: Callable[[], int] = (
            qpending if callable(qpending) else (lambda: int(work.pending()))
        )

    def bytes_moved(self, packets: int) -> int:
        """The work's byte counter (or packets x 1500 without counters)."""
        fn = self.bytes_fn
        return fn() if fn is not None else packets * _FALLBACK_PKT

    def worker_has_latency(self) -> bool:
        """Another work on this worker is in the latency class (ClassesPolicy)."""
        return any(o is not self and o.klass == "latency" for o in self._peers())
