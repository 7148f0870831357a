"""Scheduling settings and policies: what a worker serves next, how long a turn lasts, when a
queue starts and stops polling.

`SchedSettings` is every scheduling parameter in user units, read from a registry at once (an
immutable snapshot handed to workers through their command queue, so a change applies between
turns, never in the middle of one). The parameters are declared here (`PARAMS`: the settings'
`SETTINGS_PARAMS` plus `policy`); those of scope device may have a value per device, carried in
the snapshot as that device's own settings, and every decision below is taken with the settings
of the queue's device (`Policy.settings_for(q)`). A `Policy` takes decisions only; the mechanics that must stay
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

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from .params import Param, Registry, Scope

if TYPE_CHECKING:
    from .work import QueueState

__all__ = [
    "PARAMS",
    "POLICIES",
    "SETTINGS_PARAMS",
    "ClassesPolicy",
    "ElvisPolicy",
    "Policy",
    "SchedSettings",
    "VhostPolicy",
    "make_policy",
    "settings_field",
]

_NS_PER_US = 1_000
_US_MAX = 60_000_000  # one minute
_BYTES_MAX = 64 << 20
_RING_MAX = 32768

# ---- parameters (ELVIS vocabulary, user-space units) -----------------------------------------
# A device-scope parameter may have a value per device: it reaches the worker through the
# device's own SchedSettings (SchedSettings.for_device), which the policy picks per queue.

POLL_START_RATE = Param(
    "poll_start_rate", int, 1,
    "start polling a queue (kicks suppressed) once one worker tick served at least this many "
    "items from it; 0 = never poll",
    unit="items", min=0, max=_RING_MAX, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
POLL_STOP_IDLE = Param(
    "poll_stop_idle", int, 3_000_000,
    "stop polling a queue (re-enable kicks, re-check the ring) after it found no new work "
    "for this long",
    unit="us", min=0, max=_US_MAX, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
POLL_COALESCING = Param(
    "poll_coalescing", int, 0,
    "skip polling a queue that was served (kicked or polled) less than this long ago; one "
    "value for every queue of a worker (its C poll round applies it); 0 = check it every round",
    unit="us", min=0, max=1_000_000, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
POLL_BATCH_TARGET = Param(
    "poll_batch_target", int, 128,
    "a polled queue whose batches carry a stream (8 items or more) is visited less often by "
    "its worker's C poll round, so that its batches grow towards this many items (at most half "
    "its ring): fewer ring lines moved between the driver's core and the worker's per item; a "
    "smaller batch (ping-pong, light traffic) is visited at every pass again; a ring the "
    "worker fills (guest RX) is never waited; 0 = off "
    "(docs/benchmarks.md, 2026-12-02: guest TX 64 B 1.16x / 0.97x DPDK with 2 / 4 queue "
    "pairs against 1.04x / 0.92x off)",
    unit="items", min=0, max=_RING_MAX, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
POLL_BATCH_WAIT_MAX = Param(
    "poll_batch_wait_max", int, 20,
    "the longest wait between two visits of a queue under poll_batch_target (the latency a "
    "stream may gain at load)",
    unit="us", min=0, max=1_000_000, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
MAX_WORK_STUCK_US = Param(
    "max_work_stuck_us", int, -1,
    "a kick waiting this long in a worker makes the queue being served yield at the end of "
    "its current batch; -1 = off (ELVIS max_work_stuck_cycles)",
    unit="us", min=-1, max=_US_MAX, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
MAX_QUEUE_STUCK_US = Param(
    "max_queue_stuck_us", int, -1,
    "a polled queue unserved this long with unchanged pending items is stuck and moves to the "
    "head of the poll list; -1 = off (ELVIS max_queue_stuck_cycles)",
    unit="us", min=-1, max=_US_MAX, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
MAX_QUEUE_STUCK_SIZE = Param(
    "max_queue_stuck_size", int, 0,
    "only a queue with at most this many pending avail entries can count as stuck; 0 = off",
    unit="items", min=0, max=_RING_MAX, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
MIN_PROCESSED_DATA_LIMIT = Param(
    "min_processed_data_limit", int, 1500,
    "shared mode: a queue's turn always continues (ignoring stuck queues and waiting kicks) "
    "until it moved this many bytes",
    unit="bytes", min=0, max=_BYTES_MAX, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
MAX_PROCESSED_DATA_LIMIT = Param(
    "max_processed_data_limit", int, 524288,
    "shared mode: a queue's turn (one or more C batches) always ends once it moved this many "
    "bytes, and the queue goes to the tail",
    unit="bytes", min=1, max=_BYTES_MAX, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
MIN_POLL_RATE = Param(
    "min_poll_rate", int, 0,
    "a polled queue is checked at least this many times per second even when others are busy "
    "(for queues that are not latency sensitive); 0 = no minimum, plain round robin",
    unit="Hz", min=0, max=1_000_000, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
TURN_MAX_PACKETS = Param(
    "turn_max_packets", int, 256,
    "packet budget of one C batch (one turn of a queue in baseline mode), like vhost-net's "
    "256-packet weight",
    unit="packets", min=1, max=65536, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
TURN_MAX_BYTES = Param(
    "turn_max_bytes", int, 524288,
    "byte budget of one C batch (one turn of a queue in baseline mode), like vhost-net's "
    "0x80000-byte weight",
    unit="bytes", min=1, max=_BYTES_MAX, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
POLL_ROUND_US = Param(
    "poll_round_us", int, 50,
    "shared mode: a worker serves its polled queues in one C call, round "
    "robin, one batch of each per pass, for up to this long before it looks at kicks, timers "
    "and commands again (with max_work_stuck_us >= 0, at most half of that); 0 = no C rounds: "
    "one queue turn per Python loop",
    unit="us", min=0, max=100_000, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
POLL_ROUND_MAX_US = Param(
    "poll_round_max_us", int, 20000,
    "shared mode: a C poll round goes on past poll_round_us while nothing needs the worker's "
    "Python side (it looks every poll_round_us: a kick or command waiting, a deadline due, a "
    "polled queue idle for its poll_stop_idle), for up to this long in all; 0 = rounds end "
    "at poll_round_us",
    unit="us", min=0, max=1_000_000, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
TX_PREFETCH = Param(
    "tx_prefetch", str, "auto",
    "how a TX batch prefetches the frames it is about to copy: nta (non-temporal: the driver's "
    "lines stay out of the worker's L2), t0 (kept), none, or auto: the worker measures nta "
    "against t0 on its polled rings every tx_prefetch_recheck and keeps the faster "
    "(iosched/prefetch_tuner.py; a ring served on kicks keeps the hint it last had, nta at "
    "first)",
    choices=("auto", "nta", "t0", "none"), runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
TX_PREFETCH_RECHECK = Param(
    "tx_prefetch_recheck", int, 2000,
    "tx_prefetch auto: a worker measures nta against t0 again this long after its last "
    "decision (at its polled rings' next traffic; about 80 ms of measuring); 0 = only once",
    unit="ms", min=0, max=3_600_000, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
POLICY = Param(
    "policy", str, "elvis",
    "shared mode: scheduling policy of the workers: elvis (ELVIS fine-grained scheduling), "
    "classes (elvis plus latency/throughput queue classes), vhost (one batch per turn, no "
    "polling); baseline mode always uses vhost",
    choices=("elvis", "classes", "vhost"), runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip


def settings_field(param: Param) -> Any:
    """A SchedSettings field carried from `param` (its default; from_registry reads it)."""
    return field(default=param.default, metadata={"param": param})


@dataclass(frozen=True)
class SchedSettings:
    """Every scheduling parameter in user units (microseconds, bytes, items, Hz).

    A field made with `settings_field(PARAM)` is read from the registry by `from_registry` (and
    listed in SETTINGS_PARAMS, so the daemon declares it and pushes its changes to the workers):
    a new parameter the worker needs is one such field, e.g.
    `irq_coalesce_frames: int = settings_field(Param(..., scope=Scope.DEVICE))`.
    `devices` holds, for each device with a value of its own of a device-scope parameter, that
    device's complete settings; `for_device(name)` returns them (or these settings for a device
    that has none)."""

    polling: bool = False  # False in baseline mode: kicks drive everything (stock vhost)
    poll_start_rate: int = settings_field(POLL_START_RATE)
    poll_stop_idle_us: int = settings_field(POLL_STOP_IDLE)
    poll_coalescing_us: int = settings_field(POLL_COALESCING)
    poll_batch_target: int = settings_field(POLL_BATCH_TARGET)
    poll_batch_wait_max_us: int = settings_field(POLL_BATCH_WAIT_MAX)
    max_work_stuck_us: int = settings_field(MAX_WORK_STUCK_US)
    max_queue_stuck_us: int = settings_field(MAX_QUEUE_STUCK_US)
    max_queue_stuck_size: int = settings_field(MAX_QUEUE_STUCK_SIZE)
    min_processed_data_limit: int = settings_field(MIN_PROCESSED_DATA_LIMIT)
    max_processed_data_limit: int = settings_field(MAX_PROCESSED_DATA_LIMIT)
    min_poll_rate: int = settings_field(MIN_POLL_RATE)
    turn_max_packets: int = settings_field(TURN_MAX_PACKETS)
    turn_max_bytes: int = settings_field(TURN_MAX_BYTES)
    poll_round_us: int = settings_field(POLL_ROUND_US)  # 0: no C poll rounds
    poll_round_max_us: int = settings_field(POLL_ROUND_MAX_US)
    tx_prefetch: str = settings_field(TX_PREFETCH)
    tx_prefetch_recheck_ms: int = settings_field(TX_PREFETCH_RECHECK)
    devices: tuple[tuple[str, SchedSettings], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_device", dict(self.devices))

    @classmethod
    def from_registry(cls, reg: Registry | None = None, *,
                      mode: str | None = None) -> SchedSettings:
        """A snapshot of the registry's current values, with one SchedSettings per device that
        has a value of its own. `mode` ("baseline" or "shared") sets `polling`; None: the
        registry's `mode` if it has one, else "shared". `reg` None: a registry at defaults."""
        if reg is None:
            reg = Registry(PARAMS)
        if mode is None:
            mode = reg.get("mode") if "mode" in reg else "shared"
        polling = mode == "shared"
        names = {f.name: f.metadata["param"].name for f in fields(cls) if "param" in f.metadata}
        own = [d for d in reg.devices() if any(reg.has_own(n, d) for n in names.values())]
        return cls(
            polling=polling,
            **{fname: reg.get(pname) for fname, pname in names.items()},
            devices=tuple(
                (d, cls(polling=polling,
                        **{fname: reg.get(pname, d) for fname, pname in names.items()}))
                for d in own
            ),
        )  # fmt: skip

    def with_(self, **changes: Any) -> SchedSettings:
        """A copy with `changes` (these settings only, not the devices' own)."""
        return replace(self, **changes)

    def for_device(self, device: str) -> SchedSettings:
        """The settings of `device`'s queues (these, unless it has values of its own)."""
        by: Mapping[str, SchedSettings] = self._by_device  # type: ignore[attr-defined]
        return by.get(device, self)

    def every(self) -> tuple[SchedSettings, ...]:
        """These settings and every device's own: what a worker-wide timer must satisfy."""
        return (self, *(s for _, s in self.devices))

    # nanosecond views the worker loop compares against its clock
    @property
    def poll_stop_idle_ns(self) -> int:
        return self.poll_stop_idle_us * _NS_PER_US

    @property
    def poll_coalescing_ns(self) -> int:
        return self.poll_coalescing_us * _NS_PER_US

    @property
    def poll_batch_wait_max_ns(self) -> int:
        return self.poll_batch_wait_max_us * _NS_PER_US

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
    def poll_round_max_ns(self) -> int:
        """How long one C poll round may go on while nothing needs the worker (at least
        poll_round_ns; with max_work_stuck_us >= 0, rounds are not extended)."""
        r = self.poll_round_ns
        if self.max_work_stuck_us >= 0:
            return r
        return max(r, self.poll_round_max_us * _NS_PER_US)

    @property
    def tx_prefetch_recheck_ns(self) -> int:
        return self.tx_prefetch_recheck_ms * 1_000_000

    @property
    def min_poll_period_ns(self) -> int:
        """0: no minimum poll rate."""
        return 0 if self.min_poll_rate <= 0 else max(1, 1_000_000_000 // self.min_poll_rate)


SETTINGS_PARAMS: tuple[Param, ...] = tuple(
    f.metadata["param"] for f in fields(SchedSettings) if "param" in f.metadata
)
"""The parameters SchedSettings carries to the workers."""
PARAMS: tuple[Param, ...] = (*SETTINGS_PARAMS, POLICY)
"""Every parameter this module reads."""


def _device_of(q: QueueState) -> str:
    work = getattr(q, "work", None)
    if work is None:
        return ""
    return str(getattr(work, "device", "") or work.name.rsplit(".", 1)[0])


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

    def settings_for(self, q: QueueState) -> SchedSettings:
        """The settings of `q`'s device: its own values where it has some, else the global."""
        s = self.settings
        return s.for_device(_device_of(q)) if s.devices else s

    # ---- turns --------------------------------------------------------------------------------

    def batch_budget(self, q: QueueState) -> tuple[int, int]:
        s = self.settings_for(q)
        return s.turn_max_packets, s.turn_max_bytes

    def turn_limit(self, q: QueueState) -> int:
        """Bytes after which a turn always ends."""
        return self.settings_for(q).max_processed_data_limit

    def continue_turn(self, q: QueueState, turn_bytes: int, pressure: bool) -> bool:
        """After a full C batch: keep serving `q`? `pressure`: a kick waited too long, a polled
        queue is stuck or overdue. Below min_processed_data_limit always yes, at or above the
        turn limit always no, in between yes unless there is pressure."""
        if turn_bytes < self.settings_for(q).min_processed_data_limit:
            return True
        if turn_bytes >= self.turn_limit(q):
            return False
        return not pressure

    def after_turn(self, q: QueueState, packets: int, turn_bytes: int, full: bool) -> None:
        """Bookkeeping after every turn that served something (`full`: a batch was full)."""

    # ---- polling ------------------------------------------------------------------------------

    def start_polling(self, q: QueueState, served: int) -> bool:
        s = self.settings_for(q)
        return s.polling and s.poll_start_rate > 0 and served >= s.poll_start_rate

    def stop_polling(self, q: QueueState, idle_ns: int) -> bool:
        s = self.settings_for(q)
        if not s.polling or s.poll_start_rate == 0:
            return True
        return idle_ns >= s.poll_stop_idle_ns

    def coalesced(self, q: QueueState, now: int) -> bool:
        """Skip this polled queue this round: it was served less than poll_coalescing ago
        (global: a C poll round applies one value to all its queues)."""
        c = self.settings.poll_coalescing_ns
        return c > 0 and now - q.last_served_ns < c

    def overdue(self, q: QueueState, now: int) -> bool:
        """min_poll_rate: the queue was last checked at least one period ago (not inverted)."""
        period = self.settings_for(q).min_poll_period_ns
        return period > 0 and now - q.last_checked_ns >= period

    def stuck(self, q: QueueState, pending: int, now: int) -> bool:
        """A polled queue unserved for max_queue_stuck_us with the same pending count all along
        (and, if max_queue_stuck_size > 0, at most that many pending items)."""
        s = self.settings_for(q)
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
        s = self.settings_for(q)
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
