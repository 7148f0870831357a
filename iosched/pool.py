"""The worker pool: which worker serves which queue work, in either mode.

- baseline: one worker per device, created by `bind()` and stopped by `unbind()` (the vhost model:
  a thread per device, kicks only; policy `vhost`).
- shared: `workers` workers (I/O cores, optionally pinned) started at once; each serves any mix of
  queues from any devices. `bind()` places a device on a worker: the device's explicit `worker`
  index when given, else the `placement` parameter: first_fit (ELVIS: the first worker with fewer
  than devices_per_worker devices, a new worker when all are full, as long as the pool has fewer
  than `max_workers`, else the least loaded), least_loaded, or explicit (devices without an index
  fall back to first_fit). max_workers 0 means as many as the CPUs the workers may run on
  (worker_cpus, else the process's affinity): a polling worker keeps its core busy, and two of them
  time-sharing one core serve each of their queues half the time, in slices of milliseconds.

The pool's parameters (workers, worker_cpus, placement, devices_per_worker, max_workers) are
declared here (`PARAMS`); whoever builds the pool reads them from its registry and passes them in.

A device holds a `DeviceBinding` and hands it its works (`attach` / `detach`, both returning
futures). The pool remembers where every attached work runs, the device's home worker, and
per-queue overrides, so a device's re-plan puts its works back where they were migrated to.
`barrier()` (also on the binding) waits out every batch running at the call, on every worker:
what a device needs after removing an IOTLB mapping that no ring's own addresses use.

Migration (`migrate`) is two-phase and blocking: detach the work from its old worker (the worker
runs the detach between turns, so the current turn completes), then attach it to the new one,
which treats it as runnable at once (kicks off, a turn is run): a kick that arrived in between
is found by that first turn, nothing is served twice (one owner at a time), and the other works
of both workers keep running. Per-queue migration is safe for every work vhostx builds: a ring is
written either by exactly one work (echo's TX work is the only writer of its RX ring and moves
with it) or, when several works write it (switch RX rings; a `source` port's RX ring with echo_tx,
by its rx_fill and its TX work's echo), under the C core's per-queue lock. A work that says `migratable_alone = False` is refused a per-queue move.

Threads: every method may be called from any thread; `migrate`, `remove_worker`, `update` and
`stop` block until the workers answered (call them from a thread, e.g. asyncio.to_thread; `bind`,
`attach`, `detach` only take the pool lock briefly, but they wait while a migration holds it).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from virtio.errors import ConfigError

from .params import Param, Scope, parse_cpu_list
from .policy import POLICIES, SchedSettings
from .worker import QueueWork, Worker

__all__ = [
    "DEVICES_PER_WORKER",
    "MAX_WORKERS",
    "MODES",
    "PARAMS",
    "PLACEMENT",
    "PLACEMENTS",
    "WORKERS",
    "WORKER_CPUS",
    "DeviceBinding",
    "WorkerPool",
]

log = logging.getLogger("vhostx.control")

MODES = ("baseline", "shared")
PLACEMENTS = ("first_fit", "least_loaded", "explicit")
_TIMEOUT = 10.0


def _check_cpu_list(value: str) -> None:
    parse_cpu_list(value)


# ---- parameters (read by whoever builds the pool: the daemon passes them to WorkerPool) ------

WORKERS = Param(
    "workers", int, 1,
    "shared mode: worker threads started with the daemon (baseline ignores it: one per device)",
    unit="workers", min=1, max=1024, scope=Scope.GLOBAL,
)  # fmt: skip
WORKER_CPUS = Param(
    "worker_cpus", str, "",
    'CPUs the worker threads are pinned to, e.g. "1" or "0-1,3", handed out in order; '
    '"" = no pinning',
    check=_check_cpu_list, allowed_hint="CPU list like 0-1,3 below os.cpu_count()",
    scope=Scope.GLOBAL,
)  # fmt: skip
PLACEMENT = Param(
    "placement", str, "first_fit",
    "shared mode: how a new device picks its worker: first_fit (ELVIS: first with fewer than "
    "devices_per_worker), least_loaded, or explicit (the device's worker= key); next attach",
    choices=PLACEMENTS, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
DEVICES_PER_WORKER = Param(
    "devices_per_worker", int, 7,
    "shared mode: devices one worker serves before first_fit places the next on another "
    "worker (a new one if all are full); applies to later placements",
    unit="devices", min=1, max=1024, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
MAX_WORKERS = Param(
    "max_workers", int, 0,
    "shared mode: first_fit starts a new worker for a device only while the pool has fewer "
    "workers than this, else it places the device on the least loaded one; 0 = the number of "
    "CPUs the workers may run on (worker_cpus, else the daemon's affinity): polling workers "
    "time-sharing one core starve each other; applies to later placements",
    unit="workers", min=0, max=1024, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
PARAMS: tuple[Param, ...] = (WORKERS, WORKER_CPUS, PLACEMENT, DEVICES_PER_WORKER, MAX_WORKERS)
"""The pool's parameters (worker count, pinning, placement)."""

_QUEUE_FIELDS = ("packets", "bytes", "interrupts", "interrupts_suppressed", "ring_full", "spins",
                 "spin_found")
_WORK_FIELDS = (
    "kicks", "kicks_avoided", "poll_starts", "poll_stops", "polled_ns", "stuck_events",
    "budget_exhausted", "turns", "empty_turns", "wakes", "caught", "lingers", "widened",
    "stream_waits", "stream_found",
)  # fmt: skip


class DeviceBinding:
    """What a device holds instead of a Worker: attach/detach its works wherever they belong."""

    def __init__(self, pool: WorkerPool, device: str) -> None:
        self._pool = pool
        self.device = device

    def attach(self, work: QueueWork) -> concurrent.futures.Future[Any]:
        return self._pool._attach(self, work)

    def detach(self, work: QueueWork) -> concurrent.futures.Future[Any]:
        return self._pool._detach(self, work)

    def barrier(self) -> list[concurrent.futures.Future[Any]]:
        """A no-op command on every worker of the pool (see WorkerPool.barrier)."""
        return self._pool.barrier()

    @property
    def worker(self) -> int:
        """Index of the device's home worker."""
        return self._pool._homes[self.device]

    def __repr__(self) -> str:
        return f"<DeviceBinding {self.device} on worker {self._pool._homes.get(self.device)}>"


def _noop() -> None:
    pass


def _done(result: Any = None) -> concurrent.futures.Future[Any]:
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fut.set_result(result)
    return fut


def _work_device(work: QueueWork) -> str:
    dev = getattr(work, "device", None)
    return str(dev) if dev else work.name.rsplit(".", 1)[0]


class WorkerPool:
    """Workers plus the placement of devices and works on them (see the module docstring)."""

    def __init__(
        self,
        *,
        mode: str,
        workers: int = 1,
        cpus: Sequence[int] = (),
        placement: str = "first_fit",
        devices_per_worker: int = 7,
        settings: SchedSettings | None = None,
        policy: str = "elvis",
        max_workers: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: allowed {', '.join(MODES)}")
        self._check_placement(placement, devices_per_worker)
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r}: allowed {', '.join(POLICIES)}")
        if mode == "shared" and workers < 1:
            raise ConfigError(f"workers={workers}: at least 1 in shared mode")
        self.mode = mode
        self.cpus = tuple(cpus)
        self.placement = placement
        self.devices_per_worker = devices_per_worker
        self.max_workers = max_workers
        self.settings = settings or SchedSettings(polling=mode == "shared")
        self.policy = policy
        self._lock = threading.RLock()
        self._workers: dict[int, Worker] = {}
        self._next_index = 0
        self._retiring: set[int] = set()
        self._bindings: dict[str, DeviceBinding] = {}
        self._homes: dict[str, int] = {}
        self._where: dict[QueueWork, int] = {}  # attached work -> worker index
        self._overrides: dict[str, tuple[str, int]] = {}  # work name -> (device, worker)
        self._stopped = False
        if mode == "shared":
            for _ in range(workers):
                self._spawn(None)

    # ---- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _check_placement(placement: str, devices_per_worker: int) -> None:
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement={placement!r}: allowed {', '.join(PLACEMENTS)}")
        if devices_per_worker < 1:
            raise ConfigError(f"devices_per_worker={devices_per_worker}: allowed [1, 1024]")

    def worker_cap(self) -> int:
        """How many workers first_fit may grow the pool to (max_workers; 0: the CPU count the
        workers may run on)."""
        if self.max_workers > 0:
            return self.max_workers
        if self.cpus:
            return len(set(self.cpus))
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            return os.cpu_count() or 1

    def _worker_policy(self) -> str:
        return "vhost" if self.mode == "baseline" else self.policy

    def _spawn(self, cpu: int | None, name: str | None = None) -> int:
        idx = self._next_index
        self._next_index += 1
        if cpu is None and self.cpus:
            cpu = self.cpus[idx % len(self.cpus)]
        if cpu is not None and not 0 <= cpu < (os.cpu_count() or 1):
            raise ConfigError(f"cpu={cpu}: this host has CPUs 0-{(os.cpu_count() or 1) - 1}")
        self._workers[idx] = Worker(
            name or f"w{idx}", cpu=cpu, settings=self.settings, policy=self._worker_policy(),
            index=idx,
        )
        log.info("worker %d (%s) started%s", idx, self._workers[idx].name,
                 f" on cpu {cpu}" if cpu is not None else "")
        return idx

    def _devices_on(self, idx: int) -> int:
        return sum(1 for home in self._homes.values() if home == idx)

    def _works_on(self, idx: int) -> int:
        return sum(1 for w in self._where.values() if w == idx)

    def _candidates(self) -> list[int]:
        return [i for i in sorted(self._workers) if i not in self._retiring]

    def _least_loaded(self) -> int:
        cands = self._candidates()
        return min(cands, key=lambda i: (self._devices_on(i), self._works_on(i), i))

    def _place(self) -> int:
        if self.placement == "least_loaded":
            return self._least_loaded()
        # first_fit; also "explicit" for a device that names no worker
        for i in self._candidates():
            if self._devices_on(i) < self.devices_per_worker:
                return i
        if len(self._candidates()) >= self.worker_cap():
            return self._least_loaded()
        return self._spawn(None)

    def _known_workers(self) -> str:
        return ", ".join(str(i) for i in sorted(self._workers)) or "none"

    def _worker(self, idx: int, what: str) -> Worker:
        w = self._workers.get(idx)
        if w is None or idx in self._retiring:
            raise ConfigError(f"{what}: no worker {idx}; workers: {self._known_workers()}")
        return w

    # ---- devices ------------------------------------------------------------------------------

    def bind(self, device: str, *, worker: int | None = None) -> DeviceBinding:
        """Give `device` a home worker (explicit index, else the placement) and a binding."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the worker pool is stopped")
            if device in self._bindings:
                raise ConfigError(f"device {device!r} is bound twice")
            if self.mode == "baseline":
                cpu = self.cpus[len(self._bindings) % len(self.cpus)] if self.cpus else None
                idx = self._spawn(cpu, name=device)
            elif worker is not None and worker >= 0:
                self._worker(worker, f"device {device}: worker={worker}")
                idx = worker
            else:
                if self.placement == "explicit":
                    log.info("device %s names no worker; placement explicit falls back to "
                             "first_fit", device)
                idx = self._place()
            self._homes[device] = idx
            binding = self._bindings[device] = DeviceBinding(self, device)
            return binding

    def unbind(self, binding: DeviceBinding) -> None:
        """Forget a device (its works must be detached); baseline stops its worker."""
        with self._lock:
            dev = binding.device
            if self._bindings.get(dev) is not binding:
                return
            for work in [w for w in self._where if _work_device(w) == dev]:
                self._workers[self._where.pop(work)].detach(work)
            del self._bindings[dev]
            idx = self._homes.pop(dev)
            for name in [n for n, (d, _) in self._overrides.items() if d == dev]:
                del self._overrides[name]
            if self.mode == "baseline":
                self._workers.pop(idx).stop()

    def _attach(self, binding: DeviceBinding, work: QueueWork) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._stopped:
                return _done()
            dev = binding.device
            idx = self._homes[dev]
            over = self._overrides.get(work.name)
            if over is not None and over[0] == dev and over[1] in self._workers:
                idx = over[1]
            old = self._where.get(work)
            if old is not None and old != idx:
                self._workers[old].detach(work)
            self._where[work] = idx
            return self._workers[idx].attach(work)

    def _detach(self, binding: DeviceBinding, work: QueueWork) -> concurrent.futures.Future[Any]:
        with self._lock:
            idx = self._where.pop(work, None)
            if idx is None or idx not in self._workers:
                return _done()
            return self._workers[idx].detach(work)

    def barrier(self) -> list[concurrent.futures.Future[Any]]:
        """One no-op command on every worker: a worker runs commands between turns, so once its
        future is done no batch (of any device's work) that was running at the call is still
        running there. A stopped worker's future carries its RuntimeError (it runs nothing)."""
        with self._lock:
            workers = list(self._workers.values())
        return [w.submit(_noop) for w in workers]

    # ---- workers ------------------------------------------------------------------------------

    @property
    def workers(self) -> dict[int, Worker]:
        return dict(self._workers)

    def add_worker(self, cpu: int | None = None) -> int:
        """Start one more worker (shared mode); returns its index."""
        with self._lock:
            if self.mode != "shared":
                raise ConfigError("worker_add: workers are per device in baseline mode; "
                                  "allowed in mode=shared only")
            return self._spawn(cpu)

    def remove_worker(self, index: int) -> None:
        """Move the worker's devices and queues to the others (least loaded), then stop it.
        Refuses the last worker."""
        with self._lock:
            if self.mode != "shared":
                raise ConfigError("worker_remove: allowed in mode=shared only")
            self._worker(index, "worker_remove")
            if len(self._candidates()) <= 1:
                raise ConfigError(f"worker_remove: worker {index} is the last one; add another "
                                  "worker first")
            self._retiring.add(index)
            try:
                for dev in [d for d, home in self._homes.items() if home == index]:
                    self._migrate(dev, self._least_loaded(), None)
                for name, (dev, widx) in list(self._overrides.items()):
                    if widx == index:
                        self._migrate(dev, self._homes[dev], name)
                for work, widx in list(self._where.items()):  # anything left (defensive)
                    if widx == index:
                        self._move(work, self._least_loaded())
            finally:
                self._retiring.discard(index)
            self._workers.pop(index).stop()
            log.info("worker %d removed", index)

    # ---- migration ----------------------------------------------------------------------------

    def migrate(self, device: str, to_worker: int, *, queue: str | None = None) -> None:
        """Move a device (every queue), or one of its queues, to worker `to_worker` (blocking)."""
        with self._lock:
            if self.mode != "shared":
                raise ConfigError("migrate: allowed in mode=shared only (baseline has one "
                                  "worker per device)")
            self._migrate(device, to_worker, queue)

    def _migrate(self, device: str, to: int, queue: str | None) -> None:
        if device not in self._homes:
            raise ConfigError(f"migrate: no device {device!r}; devices: "
                              f"{', '.join(sorted(self._homes)) or 'none'}")
        self._worker(to, f"migrate {device}")
        works = [w for w in self._where if _work_device(w) == device]
        if queue is None:
            self._homes[device] = to
            for name in [n for n, (d, _) in self._overrides.items() if d == device]:
                del self._overrides[name]
            moving = works
        else:
            name = queue if queue.startswith(device + ".") else f"{device}.{queue}"
            moving = [w for w in works if w.name == name]
            if not moving:
                running = ", ".join(sorted(w.name for w in works)) or "none (not connected)"
                raise ConfigError(f"migrate: device {device} has no running queue {queue!r}; "
                                  f"running: {running}")
            if not getattr(moving[0], "migratable_alone", True):
                raise ConfigError(f"migrate: queue {name} shares a ring with another queue of "
                                  f"{device} without a lock; migrate the whole device instead")
            if to == self._homes[device]:
                self._overrides.pop(name, None)
            else:
                self._overrides[name] = (device, to)
        for work in moving:
            self._move(work, to)

    def _move(self, work: QueueWork, to: int) -> None:
        frm = self._where.get(work)
        if frm is None or frm == to:
            return
        # Phase 1: off the old worker, after its current turn. Phase 2: on the new one, which
        # serves it at once (kicks that landed in between are not lost).
        self._workers[frm].detach(work).result(_TIMEOUT)
        self._where[work] = to
        self._workers[to].attach(work).result(_TIMEOUT)

    # ---- parameters ---------------------------------------------------------------------------

    def update(self, settings: SchedSettings) -> None:
        """Live parameter change on every worker (applied between turns; blocks until done)."""
        with self._lock:
            self.settings = settings
            futs = [w.update(settings) for w in self._workers.values()]
        for f in futs:
            f.result(_TIMEOUT)

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r}: allowed {', '.join(POLICIES)}")
        with self._lock:
            self.policy = policy
            futs = [w.update(self.settings, self._worker_policy())
                    for w in self._workers.values()]
        for f in futs:
            f.result(_TIMEOUT)

    def set_placement(self, placement: str | None = None,
                      devices_per_worker: int | None = None,
                      max_workers: int | None = None) -> None:
        """For later placements (bind); nothing moves."""
        with self._lock:
            p = placement if placement is not None else self.placement
            d = devices_per_worker if devices_per_worker is not None else self.devices_per_worker
            m = max_workers if max_workers is not None else self.max_workers
            self._check_placement(p, d)
            if m < 0:
                raise ConfigError(f"max_workers={m}: allowed [0, 1024] (0: the CPU count)")
            self.placement, self.devices_per_worker, self.max_workers = p, d, m

    # ---- statistics ---------------------------------------------------------------------------

    def placement_of(self, work_name: str) -> int | None:
        with self._lock:
            for work, idx in self._where.items():
                if work.name == work_name:
                    return idx
        return None

    def stats(self) -> dict[str, Any]:
        """{"workers": [...], "queues": [...]} in the format of docs/internal-api.md."""
        with self._lock:
            workers = dict(self._workers)
            where = dict(self._where)
            homes = dict(self._homes)
        out_w = []
        for idx, w in sorted(workers.items()):
            devs = {d for d, h in homes.items() if h == idx}
            devs |= {_work_device(wk) for wk, i in where.items() if i == idx}
            st = w.stats
            out_w.append({
                "index": idx, "name": w.name, "cpu": w.cpu, "busy_ns": st.busy_ns,
                "idle_ns": st.idle_ns, "loops": st.loops, "sleeps": st.sleeps,
                "empty_polls": st.empty_polls, "rounds": st.rounds,
                "round_ns": st.round_ns, "works": sum(1 for i in where.values() if i == idx),
                "devices": sorted(devs), "polling": st.polling, "policy": w.policy.name,
            })
        out_q = []
        for work, idx in sorted(where.items(), key=lambda kv: kv[0].name):
            owner = workers.get(idx)
            ws = owner.work_stats(work) if owner is not None else work.stats.as_dict()
            counters_fn = getattr(work, "counters", None)
            counters = counters_fn() if callable(counters_fn) else {}
            row: dict[str, Any] = {
                "name": work.name, "device": _work_device(work), "worker": idx,
                "polling": bool(ws.get("polling", False)),
            }
            for f in ("packets", "bytes"):
                row[f] = int(counters.get(f, 0))
            for f in ("kicks", "kicks_avoided"):
                row[f] = int(ws.get(f, 0))
            for f in _QUEUE_FIELDS[2:]:
                row[f] = int(counters.get(f, 0))
            for f in _WORK_FIELDS[2:]:
                row[f] = int(ws.get(f, 0))
            out_q.append(row)
        return {"workers": out_w, "queues": out_q}

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            workers = list(self._workers.values())
            self._workers.clear()
            self._where.clear()
        for w in workers:
            w.stop()
