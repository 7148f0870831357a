"""The backend side of one vhost-user device: request dispatch, vring state, guest memory.

One dispatch table maps every request to its handler, the feature it requires and whether the
rings must be quiesced around it; the generic loop checks those once for every device. After every
message the rings' readiness is derived again (memory mapped, address, kick known, started,
enabled); only those transitions create or drop DeviceQueues and re-plan the device's works. The
device holds a `DeviceBinding` (iosched.pool), not a worker: it attaches and detaches its works and
never runs code on a worker (SET_VRING_CALL on a running ring detaches the works, swaps the fd and
re-plans). The handlers themselves (``h_<name>``) are in ``vhostx.device_handlers``, a mixin.

Repeats: QEMU keeps one vhost device per queue pair on one connection, and each of them sends
SET_OWNER, SET_PROTOCOL_FEATURES, SET_FEATURES, the memory table (SET_MEM_TABLE or one ADD_MEM_REG
per region) and GET_QUEUE_NUM again. A repeat that agrees with what is in force is accepted (and
counted in `counters.repeats`); one that conflicts (other features while rings run, other protocol
features, a driver clearing status bits) gets an error that names both values.

Threads: everything here runs on the daemon's asyncio thread, except `guest_error`, which a worker
calls and which hops to the loop at once. Queues are touched by the worker only once attached.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from iosched.pool import DeviceBinding
from iosched.worker import QueueWork
from virtio import vhost_user as vu
from virtio.errors import GuestError, RemoteProtocolError
from virtio.memory import GuestMemory
from virtio.ring import DeviceQueue
from virtio.vhost_user import ProtocolFeature as PF
from virtio.vhost_user import Request as R

from .device_handlers import (
    MAX_MEM_SLOTS,
    MAX_QUEUE_SIZE,
    STATUS_NEEDS_RESET,
    Refused,
    RequestHandlers,
    _close,
)
from .device_iotlb import IotlbSupport
from .posted import PostedDomains

__all__ = ["DISPATCH", "MAX_MEM_SLOTS", "MAX_QUEUE_SIZE", "Refused", "VhostUserDevice", "Vring"]

log = logging.getLogger("vhostx.control")

VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30


@dataclass
class Vring:
    """What the frontend told us about one virtqueue."""

    index: int
    num: int = 0
    addr: Any = None  # vu.VringAddr
    base: int = 0
    kick_fd: int = -1
    kick_known: bool = False  # SET_VRING_KICK received (with an fd or "no fd": polling)
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    started: bool = False
    queue: DeviceQueue | None = None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close(getattr(self, name))
            setattr(self, name, -1)


@dataclass(frozen=True)
class Rule:
    """Dispatch-table entry: the handler's policy flags (the payload rules live in vu.SPECS)."""

    handler: str
    feature: PF | None = None  # protocol feature the request requires
    quiesce: bool = False  # rings stopped (works detached) while it runs


DISPATCH: dict[R, Rule] = {
    R.GET_FEATURES: Rule("get_features"),
    R.SET_FEATURES: Rule("set_features", quiesce=True),
    R.SET_OWNER: Rule("set_owner"),
    R.RESET_OWNER: Rule("reset_owner", quiesce=True),
    R.SET_MEM_TABLE: Rule("set_mem_table", quiesce=True),
    R.SET_VRING_NUM: Rule("set_vring_num"),
    R.SET_VRING_ADDR: Rule("set_vring_addr"),
    R.SET_VRING_BASE: Rule("set_vring_base"),
    R.GET_VRING_BASE: Rule("get_vring_base"),
    R.SET_VRING_KICK: Rule("set_vring_kick"),
    R.SET_VRING_CALL: Rule("set_vring_call"),
    R.SET_VRING_ERR: Rule("set_vring_err"),
    R.GET_PROTOCOL_FEATURES: Rule("get_protocol_features"),
    R.SET_PROTOCOL_FEATURES: Rule("set_protocol_features"),
    R.GET_QUEUE_NUM: Rule("get_queue_num", feature=PF.MQ),
    R.SET_VRING_ENABLE: Rule("set_vring_enable"),
    R.SEND_RARP: Rule("send_rarp", feature=PF.RARP),
    R.NET_SET_MTU: Rule("net_set_mtu", feature=PF.MTU),
    R.GET_CONFIG: Rule("get_config", feature=PF.CONFIG),
    R.SET_CONFIG: Rule("set_config", feature=PF.CONFIG),
    R.RESET_DEVICE: Rule("reset_device", feature=PF.RESET_DEVICE, quiesce=True),
    R.GET_MAX_MEM_SLOTS: Rule("get_max_mem_slots", feature=PF.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: Rule("add_mem_reg", feature=PF.CONFIGURE_MEM_SLOTS, quiesce=True),
    R.REM_MEM_REG: Rule("rem_mem_reg", feature=PF.CONFIGURE_MEM_SLOTS, quiesce=True),
    R.SET_BACKEND_REQ_FD: Rule("set_backend_req_fd", feature=PF.BACKEND_REQ),
    R.IOTLB_MSG: Rule("iotlb_msg"),  # quiesces itself when it removes a mapping
    R.SET_STATUS: Rule("set_status", feature=PF.STATUS, quiesce=True),
    R.GET_STATUS: Rule("get_status", feature=PF.STATUS),
    R.VHOSTX_SET_POSTED_IRQ: Rule("vhostx_set_posted_irq", feature=PF.VHOSTX_POSTED_IRQ,
                                  quiesce=True),
}


@dataclass
class DeviceCounters:
    connections: int = 0
    protocol_errors: int = 0
    guest_errors: int = 0
    messages: int = 0
    replans: int = 0
    repeats: int = 0  # per-queue-pair repeats that agreed with the state in force
    resumed_from_used: int = 0  # rings started at used->idx, not at a stale SET_VRING_BASE


class VhostUserDevice(RequestHandlers, IotlbSupport):
    """A device type subclasses this: features, config space, and the works for its rings."""

    #: virtio features this device offers (bit 30 is added when protocol features are on)
    device_features: int = 0
    #: protocol features this device offers
    protocol_features: int = 0
    #: number of virtqueues the frontend may use
    num_queues: int = 2
    #: every chain taken is used, in order, before a ring stops (net): used->idx in guest memory
    #: is where a ring stopped, and a SET_VRING_BASE that disagrees with it is stale (DPDK
    #: virtio-user always sends 0, also on reconnect): the ring resumes from used->idx
    resume_from_used_idx: bool = True

    def __init__(self, name: str, worker: DeviceBinding) -> None:
        self.name = name
        self.worker = worker  # the DeviceBinding: where this device's works run
        self.counters = DeviceCounters()
        self.broken: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._works: list[QueueWork] = []
        self._lock = asyncio.Lock()
        self._connected = False
        self._reset_state()

    # ---- state ------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.protocol_features_set = False
        self.features_set = False
        self.owner = False
        self.status = 0
        self.memory: GuestMemory | None = None
        self.vrings = self._fresh_vrings()
        self.broken = None
        self._iotlb_reset()
        old_posted = getattr(self, "posted", None)
        if old_posted is not None:
            old_posted.close()
        self.posted = PostedDomains()

    def _fresh_vrings(self) -> list[Vring]:
        return [Vring(i) for i in range(self.num_queues)]

    def offered_features(self) -> int:
        return self.device_features | VHOST_USER_F_PROTOCOL_FEATURES

    def has_protocol_features(self) -> bool:
        return bool(self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES)

    def has_pf(self, bit: PF) -> bool:
        # Protocol features are negotiated when bit 30 is *offered* (always, here), and QEMU does
        # it before SET_FEATURES: they are in force from SET_PROTOCOL_FEATURES on.
        return bool(self.acked_protocol_features & (1 << bit))

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features & (1 << bit))

    # ---- hooks for device types ------------------------------------------------------------

    def make_works(self, running: dict[int, DeviceQueue]) -> list[QueueWork]:
        """The works that serve the running queues (called whenever that set changes)."""
        raise NotImplementedError

    def release_works(self) -> None:
        """Called after the current works were detached and before new ones are made."""

    def queue_options(self, index: int) -> dict[str, Any]:
        """Extra DeviceQueue keyword arguments (header length, MRG_RXBUF...)."""
        return {}

    def config_space(self) -> bytes:
        return b""

    def stats(self) -> dict[str, Any]:
        queues = {}
        for vr in self.vrings:
            if vr.queue is not None:
                queues[str(vr.index)] = vr.queue.stats()
        works = {w.name: w.stats.as_dict() for w in self._works}
        return {
            "name": self.name,
            "broken": self.broken,
            # NEEDS_RESET (virtio status 0x40): a ring was broken by bad guest data; the frontend
            # gets a working device back with RESET_DEVICE, SET_STATUS 0 or a reconnect
            "needs_reset": self.broken is not None,
            "connected": self._connected,
            "status": self.status,
            "features": hex(self.acked_features),
            "protocol_features": hex(self.acked_protocol_features),
            "queues": queues,
            "posted_irq": self.posted.describe(),
            "works": works,
            "iotlb": self.iotlb_stats(),
            "counters": dict(vars(self.counters)),
        }

    # ---- connection -------------------------------------------------------------------------

    async def serve(self, recv: Callable[[], Awaitable[tuple[bytes, list[int]]]],
                    send: Callable[[bytes], Awaitable[None]]) -> None:
        """Serve one frontend connection until EOF or a protocol error, then reset."""
        self._loop = asyncio.get_running_loop()
        self.counters.connections += 1
        self._connected = True
        conn = vu.BackendConnection()
        pending: list[vu.Message] = []
        try:
            while True:
                data, fds = await recv()
                if not data:
                    for fd in fds:
                        _close(fd)
                    log.info("%s: frontend closed the connection", self.name)
                    return
                pending = list(conn.feed(data, fds))
                while pending:
                    msg = pending.pop(0)
                    reply = await self.handle(conn, msg)
                    if reply:
                        await send(reply)
        except RemoteProtocolError as err:
            self.counters.protocol_errors += 1
            log.warning("%s: closing connection: %s", self.name, err)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # a bug here must cost one connection, not the daemon
            self.counters.protocol_errors += 1
            log.exception("%s: internal error while serving the frontend; closing it", self.name)
        finally:
            for msg in pending:
                for fd in msg.fds:
                    _close(fd)
            self._connected = False
            conn.close()  # fds of a message cut off by the disconnect or left after an error
            await self.disconnect()

    async def handle(self, conn: vu.BackendConnection, msg: vu.Message) -> bytes:
        """Check one request against the dispatch table and run its handler; return the reply."""
        self.counters.messages += 1
        try:
            req = R(msg.request)
            rule = DISPATCH[req]
        except (ValueError, KeyError):
            for fd in msg.fds:
                _close(fd)
            raise RemoteProtocolError(
                f"request {msg.request} is not supported by a {type(self).__name__}"
            ) from None
        try:
            if rule.feature is not None and not self.has_pf(rule.feature):
                raise RemoteProtocolError(
                    f"{req.name} needs protocol feature {rule.feature.name}, which was not negotiated"
                )
        except RemoteProtocolError:
            for fd in msg.fds:
                _close(fd)
            raise
        handler: Callable[[vu.Message], Awaitable[Any]] = getattr(self, "h_" + rule.handler)
        async with self._lock:
            if rule.quiesce:
                await self._detach_works()
            try:
                result = await handler(msg)
            except Refused as why:
                log.info("%s: %s refused: %s", self.name, req.name, why)
                return conn.ack(msg, False)
            finally:
                await self._replan()
        if result is not None:
            return conn.reply(msg, result)
        return conn.ack(msg, True)

    async def disconnect(self) -> None:
        """The frontend went away: stop every ring, free memory, forget negotiation."""
        async with self._lock:
            await self._detach_works()
            self._stop_all_queues()
            for vr in self.vrings:
                vr.close_fds()
            if self.memory is not None:
                self.memory.close()
            self._reset_state()
            self.release_works()

    async def close(self) -> None:
        await self.disconnect()

    # ---- readiness and works ----------------------------------------------------------------

    def _ring_ready(self, vr: Vring) -> bool:
        return (
            self.memory is not None
            and vr.addr is not None
            and vr.num > 0
            and vr.kick_known
            and vr.started
            and (vr.enabled or not self.has_protocol_features())
            and self.broken is None
            and self.ring_uvas(vr) is not None  # with ACCESS_PLATFORM: the IOVAs are mapped
        )

    async def _detach_works(self) -> None:
        works, self._works = self._works, []
        for work in works:
            await asyncio.wrap_future(self.worker.detach(work))
        self.release_works()  # idempotent; a plan may hold resources without any work

    def _start_queue(self, vr: Vring, resync: bool = True) -> None:
        assert self.memory is not None and vr.addr is not None
        uvas = self.ring_uvas(vr)
        assert uvas is not None  # _ring_ready checked it
        try:
            vr.queue = DeviceQueue(
                self.memory,
                index=vr.index,
                size=vr.num,
                desc_uva=uvas[0],
                avail_uva=uvas[1],
                used_uva=uvas[2],
                iotlb=self.iotlb if self.iommu_active() else None,
                last_avail_idx=vr.base,
                event_idx=self.has_feature(29),
                call_fd=vr.call_fd,
                **self.queue_options(vr.index),
            )
        except GuestError as err:
            self._mark_broken(f"ring {vr.index}: {err}")
            return
        used = vr.queue.used_idx
        if resync and self.resume_from_used_idx and used != vr.base:
            log.info("%s: ring %d: SET_VRING_BASE %d but used->idx is %d: resuming from "
                     "used->idx", self.name, vr.index, vr.base, used)
            self.counters.resumed_from_used += 1
            vr.base = used
            self._start_queue(vr, resync=False)  # once: the guest may move used->idx meanwhile

    def _stop_queue(self, vr: Vring) -> None:
        if vr.queue is not None:
            vr.base = vr.queue.last_avail_idx
            vr.queue = None

    def _stop_all_queues(self) -> None:
        for vr in self.vrings:
            self._stop_queue(vr)

    async def _replan(self) -> None:
        """Derive ring readiness; on any change re-plan the works on the worker."""
        changed = False
        for vr in self.vrings:
            ready = self._ring_ready(vr)
            if ready and vr.queue is None:
                if not changed:
                    await self._detach_works()
                changed = True
                self._start_queue(vr)
            elif not ready and vr.queue is not None:
                if not changed:
                    await self._detach_works()
                changed = True
                self._stop_queue(vr)
        if not changed and (self._works or self.broken is not None):
            return
        # Also when the last plan had no work: it may still hold resources (a switch port for
        # an RX ring whose TX ring is not running yet), which the next plan would take again.
        await self._detach_works()
        running = {vr.index: vr.queue for vr in self.vrings if vr.queue is not None}
        if not running or self.broken is not None:
            return
        self.counters.replans += 1
        self._works = self.make_works(running)
        for work in self._works:
            await asyncio.wrap_future(self.worker.attach(work))

    def guest_error(self, work: QueueWork, err: GuestError) -> None:
        """Worker thread: a ring broke. Hop to the loop and break the whole device."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._work_broken, work, f"{work.name}: {err}")

    def _work_broken(self, work: QueueWork, why: str) -> None:
        # A report that arrives after the works were replaced (the device was reset meanwhile)
        # is about rings that no longer exist: it must not break the new ones.
        if work in self._works:
            self._mark_broken(why)
        else:
            log.info("%s: late report from a retired work ignored: %s", self.name, why)

    def _mark_broken(self, why: str) -> None:
        if self.broken is not None:
            return
        self.counters.guest_errors += 1
        self.broken = why
        self.status |= STATUS_NEEDS_RESET
        log.error("%s: device broken (NEEDS_RESET): %s", self.name, why)
        for vr in self.vrings:
            if vr.err_fd >= 0:
                try:
                    os.eventfd_write(vr.err_fd, 1)
                except OSError:
                    pass
        if self._loop is not None:
            self._loop.create_task(self._stop_serving())

    async def _stop_serving(self) -> None:
        async with self._lock:
            await self._detach_works()

    async def quiesce(self) -> None:
        """The daemon is stopping: no worker serves these rings any more (their last batches
        are published); rings, fds and counters stay until `close`."""
        await self._stop_serving()
