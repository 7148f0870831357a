"""The vhostx daemon: devices, their sockets, their workers, a control socket, a clean stop.

Mode `baseline` (the only one in this version): one worker thread per device, driven by kicks,
the way stock vhost works. The control socket speaks JSON lines: {"cmd": "stats"} and
{"cmd": "ping"}; every answer is one JSON object with "ok".

Threads: `Daemon` lives on the asyncio thread (uvloop when available); workers are threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from typing import Any

from iosched import params as P
from iosched.worker import TurnBudget, Worker
from virtio.errors import ConfigError

from .config import DaemonConfig
from .net import NetDevice, SwitchRegistry
from .transport import connect_unix, listen_unix

__all__ = ["Daemon", "run_daemon"]

log = logging.getLogger("vhostx.control")


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.devices: list[NetDevice] = []
        self.workers: list[Worker] = []
        self.switches = SwitchRegistry()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._control_server: asyncio.AbstractServer | None = None
        self._unsubscribe: list[Any] = []
        self.started_at = time.time()

    def _load_params(self) -> None:
        reg = P.REGISTRY
        if self.cfg.param_table:
            reg.load_config(self.cfg.param_table, where=f"{self.cfg.path} [params]")
        reg.load_cmdline(self.cfg.param_items)
        if P.MODE.get() != "baseline":
            raise ConfigError(
                f"mode={P.MODE.get()!r}: shared workers are not available in this version; "
                "allowed: baseline"
            )

    def _budget(self) -> TurnBudget:
        return TurnBudget(packets=P.TURN_MAX_PACKETS.get(), bytes=P.TURN_MAX_BYTES.get())

    def _budget_changed(self, name: str, old: Any, new: Any) -> None:
        for worker in self.workers:
            budget = self._budget()
            worker.submit(lambda w=worker, b=budget: setattr(w, "budget", b)).result(5)

    async def start(self) -> None:
        """Create every device and start serving; ConfigError if any cannot be set up."""
        try:
            self._load_params()
            cpus = P.parse_cpu_list(P.WORKER_CPUS.get()) if P.WORKER_CPUS.get() else ()
            for handle in (P.TURN_MAX_PACKETS, P.TURN_MAX_BYTES):
                self._unsubscribe.append(handle.subscribe(self._budget_changed))
            for i, dcfg in enumerate(self.cfg.devices):
                cpu = cpus[i % len(cpus)] if cpus else None
                worker = Worker(f"{dcfg.name}", cpu=cpu, budget=self._budget())
                self.workers.append(worker)
                dev = NetDevice(dcfg, worker, self.switches)
                self.devices.append(dev)
            for dev in self.devices:
                started = asyncio.Event()
                if dev.cfg.client:
                    task = asyncio.create_task(connect_unix(dev.cfg.socket, dev.serve))
                    started.set()
                else:
                    task = asyncio.create_task(listen_unix(dev.cfg.socket, dev.serve, started))
                self._tasks.append(task)
                # Surface bind errors now, not later in a forgotten task.
                waiter = asyncio.create_task(started.wait())
                done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    waiter.cancel()
                    task.result()
            if self.cfg.control:
                await self._start_control(self.cfg.control)
        except BaseException:
            await self.stop()
            raise
        log.info("serving %d device(s)", len(self.devices))

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
                        raise ValueError("expected a JSON object")
                    answer = self.control(req)
                except (ValueError, KeyError, TypeError, ConfigError) as err:
                    answer = {"ok": False, "error": str(err)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True}
        if cmd == "stats":
            return {"ok": True, **self.stats()}
        if cmd == "params":
            return {"ok": True, "params": [row.as_dict() for row in P.REGISTRY.describe()]}
        if cmd == "param_get":
            name = str(req["name"])
            return {"ok": True, "name": name, "value": P.REGISTRY.get(name),
                    "source": P.REGISTRY.source(name).label}
        if cmd == "param_set":
            name = str(req["name"])
            P.REGISTRY.set(name, req["value"], where="control socket")
            return {"ok": True, "name": name, "value": P.REGISTRY.get(name)}
        raise ValueError(
            f"unknown command {cmd!r}; known: ping, stats, params, param_get, param_set"
        )

    def stats(self) -> dict[str, Any]:
        return {
            "mode": "baseline",
            "uptime_s": round(time.time() - self.started_at, 3),
            "time": time.time(),
            "devices": [dev.stats() for dev in self.devices],
            "workers": [
                {"name": w.name, **vars(w.stats)}
                for w in self.workers
            ],
        }

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for dev in self.devices:
            with contextlib.suppress(Exception):
                await dev.close()
        for worker in self.workers:
            worker.stop()
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
        with open(ready_file, "w") as f:
            f.write(str(os.getpid()))
    try:
        await daemon.wait()
    finally:
        final = daemon.stats()
        await daemon.stop()
        if stats_file:
            tmp = stats_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(final, f, indent=1)
            os.replace(tmp, stats_file)
    log.info("stopped")
    return 0


def run_daemon(cfg: DaemonConfig, *, stats_file: str | None = None, ready_file: str | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(_amain(cfg, stats_file, ready_file))
    return uvloop.run(_amain(cfg, stats_file, ready_file))
