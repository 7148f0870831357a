"""Kicked queues, the wait a worker thread blocks in, and C poll rounds: the Python face of
vx_wait.c and vx_round (contract in virtio/_core/vx_core.h).

Nothing here knows what an operation does: an operation is any object with a cffi `struct vx_op
*` (`c_op`), a `name`, a `kind` and an `error()` naming the ring that broke (virtio.net.Op is
one). The scheduler (iosched) builds on these handles without knowing about ports.

- `KickQueue`: one queue served on kicks (its op, kick eventfd, optional data fd, batch budget,
  busy-poll window, counters kept in C). `kick()` serves one kick in one C call.
- `Wait`: a worker's epoll over its command eventfd, the kick fds of its C-served queues and the
  fds it serves in Python, with one-shot deadline slots; `run(serve=True)` blocks with the GIL
  released and serves kicked queues in C until a command, a deadline, a Python fd or a
  scheduling decision needs the caller.
- `Round` / `RoundBroken`: many ops served in one C call (vx_round), for polled queues.
- `SpinWindow`: a busy-poll window in a C cell, shared by queues and changed from any thread.
- `set_tx_prefetch` / `tx_prefetch`: how the TX ring an op serves prefetches staged frames.

Threads: a Wait, its KickQueues and a Round are used by the one worker thread that owns them
(construction anywhere); `SpinWindow.ns` may be set from any thread; the counters may be read from
any thread (benign races, monotonic).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from virtio._vx_core import ffi, lib
from virtio.errors import ConfigError, GuestError

__all__ = [
    "KQ_IDLE",
    "KQ_PY",
    "KQ_RUN",
    "KQ_STATS_FIELDS",
    "TX_PREFETCH_MODES",
    "WAIT_CMD",
    "WAIT_FDS",
    "WAIT_SCHED",
    "WAIT_SLOTS",
    "WAIT_TIMER",
    "WHY_BROKEN",
    "WHY_BUDGET",
    "WHY_KICK",
    "WHY_POLL",
    "COp",
    "KickQueue",
    "Round",
    "RoundBroken",
    "SpinWindow",
    "Wait",
    "WaitReport",
    "now_ns",
    "set_tx_prefetch",
    "tx_prefetch",
]

_U32_MAX = 0xFFFFFFFF
_U64_MAX = 2**64 - 1

KQ_IDLE, KQ_RUN, KQ_PY = int(lib.VX_KQ_IDLE), int(lib.VX_KQ_RUN), int(lib.VX_KQ_PY)
WHY_KICK, WHY_POLL = int(lib.VX_WHY_KICK), int(lib.VX_WHY_POLL)
WHY_BUDGET, WHY_BROKEN = int(lib.VX_WHY_BUDGET), int(lib.VX_WHY_BROKEN)
WAIT_CMD, WAIT_TIMER = int(lib.VX_WAIT_CMD), int(lib.VX_WAIT_TIMER)
WAIT_FDS, WAIT_SCHED = int(lib.VX_WAIT_FDS), int(lib.VX_WAIT_SCHED)
WAIT_SLOTS = int(lib.VX_WAIT_SLOTS)
TURN_IDLE, TURN_AGAIN, TURN_HANDED = (int(lib.VX_TURN_IDLE), int(lib.VX_TURN_AGAIN),
                                      int(lib.VX_TURN_HANDED))  # fmt: skip
HOOK_BATCHED, HOOK_ENABLED = int(lib.VX_HOOK_BATCHED), int(lib.VX_HOOK_ENABLED)

KQ_STATS_FIELDS: tuple[str, ...] = tuple(n for n, _ in ffi.typeof("struct vx_kq_stats").fields)


def now_ns() -> int:
    """CLOCK_MONOTONIC as the C core reads it (the same clock as time.monotonic_ns)."""
    return int(lib.vx_now_ns())


class COp(Protocol):
    """What the C wait and rounds need of an operation (virtio.net.Op is one)."""

    name: str
    kind: int

    @property
    def c_op(self) -> Any:
        """The cffi `struct vx_op *`."""

    def set_budget(self, max_pkts: int, max_bytes: int) -> None:
        """The batch budget of the op in each pass of a Round."""

    def error(self) -> GuestError:
        """The GuestError of a failed batch (which ring broke)."""

    def results(self) -> tuple[int, int, int, int, int]:
        """What the last Round did with it: (batches, found, full, packets, last_work_ns)."""


# How a TX loop prefetches the frames it stages (vx_vq_set_tx_prefetch in vx_core.h).
TX_PREFETCH_MODES: dict[str, int] = {
    "nta": int(lib.VX_TX_PREFETCH_NTA),
    "t0": int(lib.VX_TX_PREFETCH_T0),
    "none": int(lib.VX_TX_PREFETCH_NONE),
}
_TX_PREFETCH_NAMES = {v: k for k, v in TX_PREFETCH_MODES.items()}


def set_tx_prefetch(op: COp, mode: str) -> None:
    """The frame prefetch of the ring `op` serves (its TX ring; an op without a ring: nothing):
    "nta", "t0" or "none". From the thread that owns the ring."""
    code = TX_PREFETCH_MODES.get(mode)
    if code is None:
        raise ConfigError(f"tx prefetch mode must be one of {sorted(TX_PREFETCH_MODES)}, "
                          f"got {mode!r}")
    vq = op.c_op.vq
    if vq != ffi.NULL:
        lib.vx_vq_set_tx_prefetch(vq, code)


def tx_prefetch(op: COp) -> str | None:
    """The frame prefetch of the ring `op` serves (None: it has no ring)."""
    vq = op.c_op.vq
    return None if vq == ffi.NULL else _TX_PREFETCH_NAMES[int(lib.vx_vq_tx_prefetch(vq))]


def _budget(max_pkts: int, max_bytes: int) -> tuple[int, int]:
    if max_pkts < 0 or max_bytes < 0:
        raise ConfigError(f"budgets must be >= 0, got max_pkts={max_pkts} max_bytes={max_bytes}")
    return min(max_pkts, _U32_MAX), min(max_bytes, _U64_MAX)


def _op_error(op: COp, result: int) -> GuestError:
    if result == -2:
        return GuestError(f"{op.name}: unknown operation kind {op.kind}")
    return op.error()


class SpinWindow:
    """A busy-poll window (ns) and the cap of its adaptive growth (ns; 0: fixed) in two C cells:
    the batches of every KickQueue given it read them (vx_kq.c kq_window, kq_adapt)."""

    def __init__(self, ns: int = 0, cap_ns: int = 0) -> None:
        self._cell = ffi.new("uint64_t[2]")
        self.ns = ns
        self.cap_ns = cap_ns

    @staticmethod
    def _checked(value: int) -> int:
        if value < 0:
            raise ConfigError(f"a busy-poll window must be >= 0 ns, got {value}")
        return min(value, _U64_MAX)

    @property
    def ns(self) -> int:
        return int(self._cell[0])

    @ns.setter
    def ns(self, value: int) -> None:
        self._cell[0] = self._checked(value)

    @property
    def cap_ns(self) -> int:
        return int(self._cell[1])

    @cap_ns.setter
    def cap_ns(self, value: int) -> None:
        self._cell[1] = self._checked(value)

    @property
    def c_cell(self) -> Any:
        return self._cell


class KickQueue:
    """One queue served on kicks in C (a `struct vx_kq`); see the module docstring."""

    __slots__ = ("_c", "_keep", "op")

    def __init__(self, op: COp, kick_fd: int, *, data_fd: int = -1,
                 spin: SpinWindow | None = None) -> None:  # fmt: skip
        c = ffi.new("struct vx_kq *")
        c.op = op.c_op
        c.kick_fd = kick_fd
        c.data_fd = data_fd
        c.state = KQ_PY
        c.max_pkts, c.max_bytes = 256, 524288
        if spin is not None:
            c.spin_ns = spin.c_cell
        self._c = c
        self._keep = (op, spin)
        self.op = op

    @property
    def c_kq(self) -> Any:
        return self._c

    @property
    def kick_fd(self) -> int:
        return int(self._c.kick_fd)

    @property
    def data_fd(self) -> int:
        return int(self._c.data_fd)

    @property
    def counters(self) -> Any:
        """The C counters (`struct vx_kq_stats *`: kicks, turns, empty_turns, budget_exhausted,
        notify_on, notify_off, packets), read as attributes."""
        return self._c.stats

    def set_budget(self, max_pkts: int, max_bytes: int) -> None:
        self._c.max_pkts, self._c.max_bytes = _budget(max_pkts, max_bytes)

    @property
    def state(self) -> int:
        return int(self._c.state)

    def give_back(self) -> None:
        """The Python side turned kicks on and re-checked: the wait serves the next kick."""
        self._c.state = KQ_IDLE

    @property
    def why(self) -> int:
        return int(self._c.why)

    @property
    def last(self) -> int:
        """The last C batch's return: packets, or < 0 when its ring broke."""
        return int(self._c.last)

    @property
    def last_work_ns(self) -> int:
        return int(self._c.last_work_ns)

    def error(self) -> GuestError:
        return _op_error(self.op, self.last)

    def kick(self, poll_start: int = 0, budget_to_python: bool = False) -> int:
        """Serve one kick in one C call (drain, kicks off, batch, kicks on, re-check, signal):
        TURN_IDLE, TURN_AGAIN (runnable again, kicks off) or TURN_HANDED (see `why`)."""
        return int(lib.vx_kq_kick(self._c, min(poll_start, _U32_MAX), int(budget_to_python)))


class WaitReport:
    """What one Wait.run returned (a copy: the next run overwrites the C report)."""

    __slots__ = ("due", "fds", "ids", "reasons")

    def __init__(self, reasons: int, due: int, fds: list[int], ids: list[int]) -> None:
        self.reasons = reasons
        self.due = due
        self.fds = fds
        self.ids = ids


class Wait:
    """One worker thread's wait (a `struct vx_wait`); see the module docstring."""

    def __init__(self, cmd_fd: int) -> None:
        w = lib.vx_wait_new(cmd_fd)
        if w == ffi.NULL:
            e = ffi.errno
            raise OSError(e, f"cannot create a wait over command fd {cmd_fd}: {os.strerror(e)}")
        self._w: Any = w
        self._rep = lib.vx_wait_report(w)
        self._stats = lib.vx_wait_stats(w)
        self._kqs: dict[int, KickQueue] = {}
        self._hook: Any = None

    def _check(self, r: int, what: str) -> None:
        if r < 0:
            raise OSError(-r, f"{what}: {os.strerror(-r)}")

    def add(self, kq: KickQueue, ident: int) -> None:
        """Serve `kq` here from now on (state KQ_PY: the caller serves it first)."""
        if not 0 <= ident <= _U32_MAX:
            raise ConfigError(f"a kick queue id is a u32, got {ident}")
        kq.c_kq.id = ident
        r = lib.vx_wait_add(self._w, kq.c_kq)
        if r == -errno.EEXIST:
            raise ConfigError(f"kick fd {kq.kick_fd} / data fd {kq.data_fd}: already watched by "
                              "this worker (one fd per queue)")
        self._check(r, f"watching kick fd {kq.kick_fd}")
        self._kqs[ident] = kq

    def remove(self, kq: KickQueue) -> None:
        self._kqs.pop(int(kq.c_kq.id), None)
        lib.vx_wait_remove(self._w, kq.c_kq)

    def watch(self, fd: int) -> None:
        """Report readability of `fd` (edge-triggered; never read here)."""
        self._check(lib.vx_wait_watch(self._w, fd), f"watching fd {fd}")

    def unwatch(self, fd: int) -> None:
        lib.vx_wait_unwatch(self._w, fd)

    def configure(self, poll_start: int, budget_to_python: bool) -> None:
        """poll_start > 0: hand over a queue whose C batch served at least that many items;
        budget_to_python: hand over a queue whose batch used its budget (else requeue it)."""
        lib.vx_wait_configure(self._w, min(max(poll_start, 0), _U32_MAX), int(budget_to_python))

    def set_deadline(self, slot: int, at_ns: int) -> None:
        """One-shot deadline of slot `slot` (CLOCK_MONOTONIC ns; 0: none)."""
        if not 0 <= slot < WAIT_SLOTS:
            raise ConfigError(f"deadline slot: allowed 0..{WAIT_SLOTS - 1}, got {slot}")
        lib.vx_wait_set_deadline(self._w, slot, max(0, min(at_ns, _U64_MAX)))

    def run(self, serve: bool) -> int:
        """serve=True: block (GIL released) and serve kicked queues until the caller is needed;
        serve=False: collect events without blocking or serving. Returns the WAIT_* reasons; the
        details are in `report()` until the next run."""
        r = int(lib.vx_wait_run(self._w, 1 if serve else 0))
        if r < 0:
            e = ffi.errno
            raise OSError(e, f"worker wait failed: {os.strerror(e)}")
        return r

    def report(self) -> WaitReport:
        rep = self._rep
        fds = [int(rep.fds[i]) for i in range(rep.nfds)] if rep.nfds else []
        ids = [int(rep.ids[i]) for i in range(rep.nids)] if rep.nids else []
        return WaitReport(int(rep.reasons), int(rep.due), fds, ids)

    def kick_queue(self, ident: int) -> KickQueue:
        return self._kqs[ident]

    @property
    def c_wait(self) -> Any:
        """The cffi `struct vx_wait *` (for Round.run_until)."""
        return self._w

    def ready(self) -> bool:
        """Would run(False) find anything now (vx_wait_ready: one poll(), nothing consumed)?"""
        return bool(lib.vx_wait_ready(self._w, lib.vx_now_ns()))

    @property
    def stats(self) -> Any:
        """The C counters (`struct vx_wait_stats *`: loops, sleeps, busy_ns, idle_ns, batches,
        calls), read as attributes."""
        return self._stats

    def set_hook(self, fn: Callable[[int, int], None] | None) -> None:
        """TEST SUPPORT: fn(point, kq id) at HOOK_BATCHED / HOOK_ENABLED of every C turn (runs in
        the worker thread, inside the wait, with the GIL)."""
        if fn is None:
            lib.vx_wait_set_hook(self._w, ffi.NULL, ffi.NULL)
            self._hook = None
            return

        @ffi.callback("void(void *, uint32_t, uint32_t)")  # type: ignore[untyped-decorator]
        def hook(_arg: Any, point: int, ident: int) -> None:
            fn(int(point), int(ident))

        self._hook = hook
        lib.vx_wait_set_hook(self._w, hook, ffi.NULL)

    def close(self) -> None:
        if self._w is not None:
            for kq in list(self._kqs.values()):
                lib.vx_wait_remove(self._w, kq.c_kq)
            self._kqs.clear()
            lib.vx_wait_free(self._w)
            self._w = None


class RoundBroken(Exception):
    """A Round stopped because op `index` broke; `error` is its GuestError."""

    def __init__(self, index: int, error: GuestError) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class Round:
    """Many ops served by one C call (vx_round): round robin, one batch of each per pass, passes
    repeated until max_passes or max_ns (see vx_core.h). Build one for a fixed list of ops (the
    owner rebuilds it when the list changes); run it from the thread owning all their rings.
    """

    __slots__ = ("_arr", "_out", "n", "ops")

    def __init__(self, ops: Sequence[COp]) -> None:
        self.ops = list(ops)
        self.n = len(self.ops)
        self._arr = ffi.new("struct vx_op *[]", [o.c_op for o in self.ops] or 1)
        self._out = ffi.new("uint64_t[]", 5 * self.n or 1)

    def results(self) -> list[int]:
        """What the last run did with every op, flat: op i's (batches, found, full, packets,
        last_work_ns) are items 5 i .. 5 i + 4 (op.results() of each, in one C call)."""
        lib.vx_round_results(self._arr, self.n, self._out)
        return ffi.unpack(self._out, 5 * self.n)  # type: ignore[no-any-return]

    def set_idle_exit(self, index: int, idle_ns: int) -> None:
        """run_until: op `index` found idle for idle_ns ends the round at its next check (0:
        never, the op is polled for good)."""
        if idle_ns < 0:
            raise ConfigError(f"idle_ns must be >= 0, got {idle_ns}")
        self._arr[index].idle_ns = min(idle_ns, _U64_MAX)

    def set_batch_wait(self, index: int, target: int, max_ns: int) -> None:
        """Batch waiting for op `index` (vx_round.c): while its batches carry a stream, visit it
        less often so that they grow towards `target` packets, waiting at most max_ns between
        two visits; target 0: off (visited at every pass)."""
        if target < 0 or max_ns < 0:
            raise ConfigError(f"target and max_ns must be >= 0, got {target}, {max_ns}")
        op = self._arr[index]
        op.batch_target = min(target, _U32_MAX)
        op.batch_wait_max_ns = min(max_ns, _U64_MAX)
        if not target:
            op.batch_wait_ns = 0

    def batch_waits(self) -> list[int]:
        """Each op's current spacing under batch waiting, in ns (0: visited at every pass)."""
        return [int(self._arr[i].batch_wait_ns) for i in range(self.n)]

    def run_until(self, max_passes: int, check_ns: int, max_ns: int, coalesce_ns: int = 0,
                  wait: Wait | None = None) -> int:
        """run() that goes on past check_ns, up to max_ns, while nothing needs the caller: it
        looks every check_ns for an op idle for its set_idle_exit() and for anything `wait`
        would report (vx_round_until). Returns and raises as run()."""
        if max_passes < 0 or check_ns < 0 or max_ns < 0 or coalesce_ns < 0:
            raise ConfigError(f"max_passes, check_ns, max_ns and coalesce_ns must be >= 0, got "
                              f"{max_passes}, {check_ns}, {max_ns}, {coalesce_ns}")
        r = lib.vx_round_until(self._arr, self.n, min(max_passes, _U32_MAX),
                               min(check_ns, _U64_MAX), min(max_ns, _U64_MAX),
                               min(coalesce_ns, _U64_MAX), ffi.NULL if wait is None else wait.c_wait)
        if r < 0:
            i = -r - 1
            op = self.ops[i]
            raise RoundBroken(i, _op_error(op, int(op.c_op.result)))
        return int(r)

    def run(self, max_passes: int, max_ns: int, coalesce_ns: int = 0) -> int:
        """Passes completed (>= 1 when there are ops); RoundBroken when an op's ring broke (the
        round stopped there; every op's results() tell what ran until then). coalesce_ns > 0:
        each op runs at most once per coalesce_ns (across rounds too)."""
        if max_passes < 0 or max_ns < 0 or coalesce_ns < 0:
            raise ConfigError(f"max_passes, max_ns and coalesce_ns must be >= 0, got "
                              f"{max_passes}, {max_ns}, {coalesce_ns}")
        r = lib.vx_round(self._arr, self.n, min(max_passes, _U32_MAX), min(max_ns, _U64_MAX),
                         min(coalesce_ns, _U64_MAX))
        if r < 0:
            i = -r - 1
            op = self.ops[i]
            raise RoundBroken(i, _op_error(op, int(op.c_op.result)))
        return int(r)
