"""The vhostx daemon: devices, their sockets, the worker pool, a control socket, a clean stop.

The parameter `mode` picks the scheduling, nothing else (same devices, same ports):
`shared` (the default) = ELVIS-style worker pool (iosched.pool) whose workers serve the queues of
many devices, with adaptive polling and fine-grained scheduling; `baseline` = one worker thread
per device driven by kicks (stock vhost). Every scheduling parameter applies to running workers
when it changes (the daemon subscribes and calls `pool.update`).

Parameters: each daemon has its own registry (`new_registry()`: the specs of every module it
uses, `PARAM_SPECS`), with its devices known to it so that device-scope parameters can have a
value per device ([device.params], `--param name@device=value`, `param_set` with "device").

The control socket speaks JSON lines; every answer is one JSON object with "ok" (errors:
{"ok": false, "error": ...}). Commands: ping, stats, params, param_get {"name", "device"?},
param_set {"name", "value", "device"?}, param_reset {"name", "device"?}, workers,
worker_add {"cpu"?}, worker_remove {"worker"}, migrate {"device", "worker", "queue"?}.

Threads: `Daemon` lives on the asyncio thread (uvloop when available); workers are threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Iterable
from typing import Any

from iosched import policy as iopolicy
from iosched import pool as iopool
from iosched.params import Param, Registry, Scope, parse_cpu_list
from iosched.policy import SchedSettings
from iosched.pool import WorkerPool
from virtio.errors import ConfigError

from . import heap as vxheap
from . import irq as vxirq
from . import net as vxnet
from .config import DaemonConfig
from .net import NetDevice, SwitchRegistry
from .transport import adopt_fd, connect_unix, listen_unix, serve_fd

__all__ = ["MODE", "PARAMS", "PARAM_SPECS", "Daemon", "new_registry", "run_daemon"]

log = logging.getLogger("vhostx.control")

MODE = Param(
    "mode", str, "shared",
    "shared: ELVIS-style workers each serving the queues of many devices (the default); "
    "baseline: one worker thread per device driven by kicks (the vhost model)",
    choices=iopool.MODES, scope=Scope.GLOBAL,
)  # fmt: skip
PARAMS: tuple[Param, ...] = (MODE,)
"""The parameters this module reads."""
PARAM_SPECS: tuple[Param, ...] = (
    *PARAMS, *iopool.PARAMS, *iopolicy.PARAMS, *vxnet.PARAMS, *vxirq.PARAMS, *vxheap.PARAMS,
)  # fmt: skip
"""Every parameter of every module the daemon uses (what `vhostx params` lists)."""


def new_registry(devices: Iterable[str] = ()) -> Registry:
    """A registry of PARAM_SPECS at their defaults, knowing `devices`."""
    reg = Registry(PARAM_SPECS)
    for name in devices:
        reg.add_device(name)
    return reg


# Parameters that change the workers' settings (SchedSettings) and are pushed to them live.
_SETTINGS_PARAMS = tuple(p.name for p in iopolicy.SETTINGS_PARAMS)
_PLACEMENT_PARAMS = (iopool.PLACEMENT.name, iopool.DEVICES_PER_WORKER.name,
                     iopool.MAX_WORKERS.name)
_COMMANDS = ("ping", "stats", "params", "param_get", "param_set", "param_reset", "workers",
             "worker_add", "worker_remove", "migrate")


class Daemon:
    def __init__(self, cfg: DaemonConfig, params: Registry | None = None) -> None:
        """`params`: the registry to use (its specs must include PARAM_SPECS'); None: a new one
        of its own."""
        self.cfg = cfg
        self.params = params if params is not None else new_registry()
        self.devices: list[NetDevice] = []
        self.pool: WorkerPool | None = None
        self.switches = SwitchRegistry()
        self.mode = MODE.default
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._control_server: asyncio.AbstractServer | None = None
        self._metrics_server: Any = None  # metrics.MetricsServer (close, wait_closed)
        self._unsubscribe: list[Any] = []
        self.started_at = time.time()
        self.heap = vxheap.HeapTrimmer(self.params)
        self._heap_task: asyncio.Task[None] | None = None

    def _load_params(self) -> None:
        reg = self.params
        for dcfg in self.cfg.devices:
            reg.add_device(dcfg.name)
        if self.cfg.param_table:
            reg.load_config(self.cfg.param_table, where=f"{self.cfg.path} [params]")
        for dcfg in self.cfg.devices:
            if dcfg.params:
                reg.load_config(dict(dcfg.params), device=dcfg.name,
                                where=f"{self.cfg.path}: device {dcfg.name} [device.params]")
        reg.load_cmdline(self.cfg.param_items)
        self.mode = reg.get(MODE.name)

    @property
    def workers(self) -> list[Any]:
        """The pool's workers (compatibility with the earlier list of Worker)."""
        return list(self.pool.workers.values()) if self.pool is not None else []

    def _settings(self) -> SchedSettings:
        return SchedSettings.from_registry(self.params, mode=self.mode)

    def _settings_changed(self, name: str, old: Any, new: Any) -> None:
        if self.pool is not None:
            self.pool.update(self._settings())

    def _device_settings_changed(self, device: str, name: str, old: Any, new: Any) -> None:
        self._settings_changed(name, old, new)

    def _placement_changed(self, name: str, old: Any, new: Any) -> None:
        if self.pool is not None:
            self.pool.set_placement(*(self.params.get(n) for n in _PLACEMENT_PARAMS))

    def _policy_changed(self, name: str, old: Any, new: Any) -> None:
        if self.pool is not None:
            self.pool.set_policy(new)

    async def start(self) -> None:
        """Create every device and start serving; ConfigError if any cannot be set up."""
        try:
            self._load_params()
            reg = self.params
            cpu_list = reg.get(iopool.WORKER_CPUS.name)
            self.pool = WorkerPool(
                mode=self.mode,
                workers=reg.get(iopool.WORKERS.name),
                cpus=parse_cpu_list(cpu_list) if cpu_list else (),
                placement=reg.get(iopool.PLACEMENT.name),
                devices_per_worker=reg.get(iopool.DEVICES_PER_WORKER.name),
                settings=self._settings(),
                policy=reg.get(iopolicy.POLICY.name),
                max_workers=reg.get(iopool.MAX_WORKERS.name),
            )
            for name in _SETTINGS_PARAMS:
                self._unsubscribe.append(reg.subscribe(self._settings_changed, name))
                self._unsubscribe.append(
                    reg.subscribe_overrides(self._device_settings_changed, name))
            for name in _PLACEMENT_PARAMS:
                self._unsubscribe.append(reg.subscribe(self._placement_changed, name))
            self._unsubscribe.append(reg.subscribe(self._policy_changed, iopolicy.POLICY.name))
            for dcfg in self.cfg.devices:
                explicit = dcfg.worker if dcfg.worker >= 0 else None
                binding = self.pool.bind(dcfg.name, worker=explicit)
                dev = NetDevice(dcfg, binding, self.switches, reg)  # type: ignore[arg-type]
                self.devices.append(dev)
            for dev in self.devices:
                started = asyncio.Event()
                if dev.cfg.fd >= 0:
                    task = asyncio.create_task(serve_fd(adopt_fd(dev.cfg.fd), dev.serve))
                    # an inherited connection cannot come back: when it ends, so does the daemon
                    task.add_done_callback(functools.partial(self._fd_closed, dev))
                    started.set()
                elif dev.cfg.client:
                    task = asyncio.create_task(connect_unix(dev.cfg.socket, dev.serve))
                    started.set()
                else:
                    mode = dev.cfg.socket_mode if dev.cfg.socket_mode >= 0 else None
                    task = asyncio.create_task(listen_unix(
                        dev.cfg.socket, dev.serve, started,
                        group=dev.cfg.socket_group or None, mode=mode))
                self._tasks.append(task)
                # Surface bind errors now, not later in a forgotten task.
                waiter = asyncio.create_task(started.wait())
                done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    waiter.cancel()
                    task.result()
            if self.cfg.control:
                await self._start_control(self.cfg.control)
            self._heap_task = asyncio.create_task(self.heap.run())
            metrics_addr = getattr(self.cfg, "metrics", None)
            if metrics_addr:
                from . import metrics

                self._metrics_server = await metrics.serve(metrics_addr, self.stats)
        except BaseException:
            await self.stop()
            raise
        log.info("serving %d device(s) in %s mode", len(self.devices), self.mode)

    def _fd_closed(self, dev: NetDevice, _task: asyncio.Task[None]) -> None:
        if not self._stop.is_set():
            log.info("%s: the frontend on --fd %d hung up; stopping", dev.name, dev.cfg.fd)
            self._stop.set()

    async def _start_control(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            self._control_server = await asyncio.start_unix_server(self._control_client, path)
        except OSError as err:
            raise ConfigError(f"control socket {path}: {err.strerror}") from err

    async def _control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("expected a JSON object")  # noqa: TRY004 - a bad request
                    answer = await self.control_async(req)
                except (ValueError, KeyError, TypeError, ConfigError, RuntimeError) as err:
                    if isinstance(err, KeyError):
                        err = ValueError(f"missing key {err}")
                    answer = {"ok": False, "error": str(err)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def control_async(self, req: dict[str, Any]) -> dict[str, Any]:
        """Like `control`, with the blocking pool commands run off the event loop."""
        cmd = req.get("cmd")
        pool = self._pool()
        if cmd == "migrate":
            device = str(req["device"])
            worker = _int_arg(req, "worker")
            queue = req.get("queue")
            await asyncio.to_thread(pool.migrate, device, worker,
                                    queue=str(queue) if queue else None)
            return {"ok": True, "device": device, "worker": worker,
                    **({"queue": str(queue)} if queue else {})}
        if cmd == "worker_remove":
            index = _int_arg(req, "worker")
            await asyncio.to_thread(pool.remove_worker, index)
            return {"ok": True, "worker": index}
        if cmd in ("param_set", "param_reset"):  # subscribers may block on the workers
            return await asyncio.to_thread(self.control, req)
        return self.control(req)

    def _pool(self) -> WorkerPool:
        if self.pool is None:
            raise RuntimeError("the daemon is not running")
        return self.pool

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True}
        if cmd == "stats":
            return {"ok": True, **self.stats()}
        if cmd == "params":
            return {"ok": True, "params": [row.as_dict() for row in self.params.describe()]}
        if cmd in ("param_get", "param_set", "param_reset"):
            return self._param_command(cmd, req)
        if cmd == "workers":
            return {"ok": True, "mode": self.mode, "workers": self._pool().stats()["workers"]}
        if cmd == "worker_add":
            cpu = req.get("cpu")
            if cpu is not None:
                cpu = _int_arg(req, "cpu")
            return {"ok": True, "worker": self._pool().add_worker(cpu)}
        if cmd in ("migrate", "worker_remove"):
            pool = self._pool()
            if cmd == "migrate":
                queue = req.get("queue")
                pool.migrate(str(req["device"]), _int_arg(req, "worker"),
                             queue=str(queue) if queue else None)
            else:
                pool.remove_worker(_int_arg(req, "worker"))
            return {"ok": True}
        raise ValueError(f"unknown command {cmd!r}; known: {', '.join(_COMMANDS)}")

    def stats(self) -> dict[str, Any]:
        pool = self.pool.stats() if self.pool is not None else {"workers": [], "queues": []}
        return {
            "mode": self.mode,
            "uptime_s": round(time.time() - self.started_at, 3),
            "time": time.time(),
            "devices": [dev.stats() for dev in self.devices],
            "workers": pool["workers"],
            "queues": pool["queues"],
            "params": self.params.snapshot(),
            "device_params": self.params.device_snapshot(),
            "heap": self.heap.stats(),
        }

    def _param_command(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        """param_get / param_set / param_reset, of the global value or of one device's
        ("device"); the answer says which value is in force and where it came from."""
        reg = self.params
        name = str(req["name"])
        device = req.get("device")
        device = str(device) if device not in (None, "") else None
        if cmd == "param_set":
            reg.set(name, req["value"], device=device, where="control socket")
        elif cmd == "param_reset":
            reg.reset(name, device=device, where="control socket")
        cur = reg.current(name, device)
        answer: dict[str, Any] = {"ok": True, "name": name, "value": cur.value,
                                  "source": cur.source.label}
        if device is not None:
            answer["device"] = device
            answer["own"] = reg.has_own(name, device)  # False: it follows the global value
        return answer

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def quiesce(self) -> None:
        """Stop serving every ring (works detached, each ring's last batch published); the
        connections, rings and counters stay until `stop`."""
        for dev in self.devices:
            with contextlib.suppress(Exception):
                await dev.quiesce()

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self._heap_task is not None:
            self._heap_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heap_task
            self._heap_task = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for dev in self.devices:
            with contextlib.suppress(Exception):
                await dev.close()
        if self.pool is not None:
            await asyncio.to_thread(self.pool.stop)
        if self._metrics_server is not None:
            self._metrics_server.close()
            with contextlib.suppress(Exception):
                await self._metrics_server.wait_closed()
            self._metrics_server = None
        if self._control_server is not None:
            self._control_server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.control)
            self._control_server = None


async def _amain(cfg: DaemonConfig, stats_file: str | None, ready_file: str | None) -> int:
    daemon = Daemon(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.request_stop)
    await daemon.start()
    if ready_file:
        with open(ready_file, "w") as f:  # noqa: ASYNC230 - once at start, a few bytes
            f.write(str(os.getpid()))
    try:
        await daemon.wait()
    finally:
        # every ring stops where it is before the counters are read: what the final statistics
        # count is what the rings' used indexes in guest memory say was taken
        await daemon.quiesce()
        final = daemon.stats()
        await daemon.stop()
        if stats_file:
            tmp = stats_file + ".tmp"
            with open(tmp, "w") as f:  # noqa: ASYNC230 - once at exit, the loop has no work left
                json.dump(final, f, indent=1)
            os.replace(tmp, stats_file)
    log.info("stopped")
    return 0


def _int_arg(req: dict[str, Any], key: str) -> int:
    value = req[key]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{key}={value!r}: expected an integer")  # noqa: TRY004 - a bad request
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: expected an integer") from None


def run_daemon(cfg: DaemonConfig, *, stats_file: str | None = None, ready_file: str | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(_amain(cfg, stats_file, ready_file))
    return uvloop.run(_amain(cfg, stats_file, ready_file))
