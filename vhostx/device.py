"""The backend side of one vhost-user device: request dispatch, vring state, guest memory.

One dispatch table maps every request to its handler, the feature it requires and whether the
rings must be quiesced around it; the generic loop checks those once for every device. After every
message the rings' readiness is derived again (memory mapped, address, kick known, started,
enabled); only those transitions create or drop DeviceQueues and re-plan the device's works. The
device holds a `DeviceBinding` (iosched.pool), not a worker: it attaches and detaches its works and
never runs code on a worker (SET_VRING_CALL on a running ring detaches the works, swaps the fd and
re-plans).

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
from virtio.memory import GuestMemory, MemoryRegion
from virtio.ring import DeviceQueue
from virtio.vhost_user import ProtocolFeature as PF
from virtio.vhost_user import Request as R

__all__ = ["DISPATCH", "MAX_MEM_SLOTS", "MAX_QUEUE_SIZE", "Refused", "VhostUserDevice", "Vring"]

log = logging.getLogger("vhostx.control")

MAX_QUEUE_SIZE = 32768
MAX_MEM_SLOTS = 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
STATUS_NEEDS_RESET = 0x40


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


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


class Refused(Exception):
    """A handler declines a well-formed request: answer a failed ack, keep the connection."""


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
    R.SET_STATUS: Rule("set_status", feature=PF.STATUS, quiesce=True),
    R.GET_STATUS: Rule("get_status", feature=PF.STATUS),
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


class VhostUserDevice:
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
        self.vrings = [Vring(i) for i in range(self.num_queues)]
        self.broken = None

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
            "works": works,
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
        )

    async def _detach_works(self) -> None:
        works, self._works = self._works, []
        for work in works:
            await asyncio.wrap_future(self.worker.detach(work))
        self.release_works()  # idempotent; a plan may hold resources without any work

    def _start_queue(self, vr: Vring, resync: bool = True) -> None:
        assert self.memory is not None and vr.addr is not None
        try:
            vr.queue = DeviceQueue(
                self.memory,
                index=vr.index,
                size=vr.num,
                desc_uva=vr.addr.desc,
                avail_uva=vr.addr.avail,
                used_uva=vr.addr.used,
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
        if self._works:
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

    # ---- helpers for handlers ---------------------------------------------------------------

    def _vring(self, index: int, what: str) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RemoteProtocolError(
                f"{what}: vring index {index} out of range, this device has {len(self.vrings)}"
            )
        return self.vrings[index]

    def _replace_fd(self, vr: Vring, attr: str, msg: vu.Message) -> int:
        payload: vu.VringFile = msg.payload
        if payload.nofd == bool(msg.fds):
            for fd in msg.fds:
                _close(fd)
            raise RemoteProtocolError(
                f"ring {payload.index}: the no-fd bit is {int(payload.nofd)} but "
                f"{len(msg.fds)} fd(s) came with the message"
            )
        new_fd = -1 if payload.nofd else msg.fds[0]
        old = getattr(vr, attr)
        setattr(vr, attr, new_fd)
        return old

    # ---- handlers ---------------------------------------------------------------------------

    async def h_get_features(self, msg: vu.Message) -> int:
        return self.offered_features()

    async def h_set_features(self, msg: vu.Message) -> None:
        features: int = msg.payload
        extra = features & ~self.offered_features()
        if extra:
            raise RemoteProtocolError(
                f"SET_FEATURES acks {features:#x}, which has bits {extra:#x} never offered "
                f"(offered {self.offered_features():#x})"
            )
        if self.features_set and features == self.acked_features:
            self.counters.repeats += 1  # the next queue pair's vhost device says it again
            return
        running = [vr.index for vr in self.vrings if vr.started]
        if self.features_set and running:
            raise RemoteProtocolError(
                f"SET_FEATURES {features:#x} conflicts with the features {self.acked_features:#x} "
                f"that rings {running} run with (stop them with GET_VRING_BASE first)"
            )
        self.acked_features = features
        self.features_set = True
        self._features_changed()

    def _features_changed(self) -> None:
        """Hook: negotiated features changed (queues restart with new options)."""

    async def h_set_owner(self, msg: vu.Message) -> None:
        if self.owner:
            self.counters.repeats += 1
        self.owner = True

    async def h_reset_owner(self, msg: vu.Message) -> None:
        await self._reset_rings()

    async def h_reset_device(self, msg: vu.Message) -> None:
        await self._reset_rings()

    async def _reset_rings(self) -> None:
        if self.broken is not None:
            log.info("%s: reset by the frontend: NEEDS_RESET cleared", self.name)
        self._stop_all_queues()
        for vr in self.vrings:
            vr.close_fds()
        self.vrings = [Vring(i) for i in range(self.num_queues)]
        self.acked_features = 0
        self.features_set = False
        # protocol features stay in force, but after a reset the frontend may set them anew
        self.protocol_features_set = False
        self.status = 0
        self.broken = None

    async def h_get_protocol_features(self, msg: vu.Message) -> int:
        return self.protocol_features

    async def h_set_protocol_features(self, msg: vu.Message) -> None:
        features: int = msg.payload
        extra = features & ~self.protocol_features
        if extra:
            raise RemoteProtocolError(
                f"SET_PROTOCOL_FEATURES acks {features:#x} with bits {extra:#x} never offered "
                f"(offered {self.protocol_features:#x})"
            )
        if self.protocol_features_set:
            if features == self.acked_protocol_features:
                self.counters.repeats += 1
                return
            raise RemoteProtocolError(
                f"SET_PROTOCOL_FEATURES {features:#x} conflicts with {self.acked_protocol_features:#x}"
                f" set earlier on this connection"
            )
        self.acked_protocol_features = features
        self.protocol_features_set = True

    async def h_get_queue_num(self, msg: vu.Message) -> int:
        return self.num_queues

    def _remap_memory(self, new: GuestMemory) -> None:
        old = self.memory
        self.memory = new
        for vr in self.vrings:
            if vr.queue is not None:
                try:
                    vr.queue.remap(new)
                except GuestError as err:
                    self._mark_broken(f"ring {vr.index} after memory change: {err}")
        if old is not None:
            old.close()

    async def h_set_mem_table(self, msg: vu.Message) -> None:
        table: vu.MemTable = msg.payload
        regions = [MemoryRegion(r.gpa, r.size, r.uva, r.mmap_offset) for r in table.regions]
        if self.memory is not None and self.memory.same_table(regions, msg.fds):
            for fd in msg.fds:
                _close(fd)
            self.counters.repeats += 1  # keep the mappings (and the rings' pointers) as they are
            return
        try:
            new = GuestMemory.map(regions, msg.fds)
        except GuestError as err:
            raise RemoteProtocolError(f"SET_MEM_TABLE: {err}") from err
        finally:
            for fd in msg.fds:
                _close(fd)
        self._remap_memory(new)

    async def h_add_mem_reg(self, msg: vu.Message) -> None:
        r = msg.payload.region
        try:
            base = self.memory if self.memory is not None else GuestMemory.empty()
            region = MemoryRegion(r.gpa, r.size, r.uva, r.mmap_offset)
            repeat = base.index_of(region) is not None
            if len(base.regions) >= MAX_MEM_SLOTS and not repeat:
                raise GuestError(f"all {MAX_MEM_SLOTS} memory slots are in use")
            # a repeat maps nothing: the snapshot counts one more copy of the region
            new = base.with_region(region, msg.fds[0])
        except GuestError as err:
            raise RemoteProtocolError(f"ADD_MEM_REG: {err}") from err
        finally:
            _close(msg.fds[0])  # the mmap holds the file; a repeat needs no fd at all
        if repeat:
            self.counters.repeats += 1
        if self.memory is None:
            self.memory = new
        else:
            self._remap_memory(new)

    async def h_rem_mem_reg(self, msg: vu.Message) -> None:
        r = msg.payload.region
        for fd in msg.fds:
            _close(fd)
        if self.memory is None:
            raise RemoteProtocolError("REM_MEM_REG with no memory table")
        try:
            new = self.memory.without_region(MemoryRegion(r.gpa, r.size, r.uva, r.mmap_offset))
        except GuestError as err:
            raise RemoteProtocolError(f"REM_MEM_REG: {err}") from err
        self._remap_memory(new)

    async def h_get_max_mem_slots(self, msg: vu.Message) -> int:
        return MAX_MEM_SLOTS

    async def h_set_vring_num(self, msg: vu.Message) -> None:
        st: vu.VringState = msg.payload
        vr = self._vring(st.index, "SET_VRING_NUM")
        if not (0 < st.num <= MAX_QUEUE_SIZE) or st.num & (st.num - 1):
            raise RemoteProtocolError(
                f"SET_VRING_NUM: size {st.num} for ring {st.index}: expected a power of two in "
                f"[1, {MAX_QUEUE_SIZE}]"
            )
        self._stop_queue(vr)
        vr.num = st.num

    async def h_set_vring_addr(self, msg: vu.Message) -> None:
        addr: vu.VringAddr = msg.payload
        vr = self._vring(addr.index, "SET_VRING_ADDR")
        if addr.flags & 1:
            raise RemoteProtocolError("SET_VRING_ADDR asks for used-ring logging, never offered")
        self._stop_queue(vr)
        vr.addr = addr

    async def h_set_vring_base(self, msg: vu.Message) -> None:
        st: vu.VringState = msg.payload
        vr = self._vring(st.index, "SET_VRING_BASE")
        if st.num > 0xFFFF:
            raise RemoteProtocolError(f"SET_VRING_BASE: base {st.num} does not fit 16 bits")
        self._stop_queue(vr)
        vr.base = st.num

    async def h_get_vring_base(self, msg: vu.Message) -> vu.VringState:
        st: vu.VringState = msg.payload
        vr = self._vring(st.index, "GET_VRING_BASE")
        await self._detach_works()
        self._stop_queue(vr)
        vr.started = False
        vr.enabled = False if self.has_protocol_features() else vr.enabled
        _close(vr.kick_fd)
        vr.kick_fd = -1
        vr.kick_known = False
        return vu.VringState(st.index, vr.base)

    async def h_set_vring_kick(self, msg: vu.Message) -> None:
        vr = self._vring(msg.payload.index, "SET_VRING_KICK")
        old = self._replace_fd(vr, "kick_fd", msg)
        if old >= 0 and vr.queue is not None:
            await self._detach_works()  # the worker must stop polling the old fd first
        _close(old)
        vr.kick_known = True
        vr.started = True

    async def h_set_vring_call(self, msg: vu.Message) -> None:
        vr = self._vring(msg.payload.index, "SET_VRING_CALL")
        old = self._replace_fd(vr, "call_fd", msg)
        if vr.queue is not None:
            # Detach first (other devices' switch works stop writing this ring too: release_works
            # takes the port off the switch), swap the fd, and let the re-plan attach again.
            await self._detach_works()
            vr.queue.set_call_fd(vr.call_fd)
        _close(old)

    async def h_set_vring_err(self, msg: vu.Message) -> None:
        vr = self._vring(msg.payload.index, "SET_VRING_ERR")
        _close(self._replace_fd(vr, "err_fd", msg))

    async def h_set_vring_enable(self, msg: vu.Message) -> None:
        st: vu.VringState = msg.payload
        vr = self._vring(st.index, "SET_VRING_ENABLE")
        if st.num not in (0, 1):
            raise RemoteProtocolError(f"SET_VRING_ENABLE: expected 0 or 1, got {st.num}")
        vr.enabled = bool(st.num)

    async def h_send_rarp(self, msg: vu.Message) -> None:
        log.info("%s: SEND_RARP for %s (nothing to announce on this port)", self.name, msg.payload)

    async def h_net_set_mtu(self, msg: vu.Message) -> None:
        raise RemoteProtocolError(f"NET_SET_MTU is not handled by a {type(self).__name__}")

    async def h_get_config(self, msg: vu.Message) -> Any:
        cfg: vu.Config = msg.payload
        space = self.config_space()
        if cfg.offset + cfg.size > len(space):
            log.info("%s: GET_CONFIG %d+%d beyond %d bytes of config space: answering size 0",
                     self.name, cfg.offset, cfg.size, len(space))
            return vu.Config(cfg.offset, 0, cfg.flags, b"")
        return vu.Config(cfg.offset, cfg.size, cfg.flags, space[cfg.offset:cfg.offset + cfg.size])

    async def h_set_config(self, msg: vu.Message) -> None:
        raise Refused("the config space of this device is read-only")

    async def h_set_status(self, msg: vu.Message) -> None:
        status: int = msg.payload
        if status > 0xFF:
            raise RemoteProtocolError(f"SET_STATUS: {status:#x} does not fit the 8-bit status")
        if status == 0:
            # A reset by the driver: every ring stops (GET_VRING_BASE still answers its base)
            # and starts again only at its next SET_VRING_KICK, after the driver set it up
            # anew; a broken device is whole again.
            self._stop_all_queues()
            for vr in self.vrings:
                vr.started = False
            if self.broken is not None:
                log.info("%s: reset by SET_STATUS 0: NEEDS_RESET cleared", self.name)
            self.broken = None
            self.status = 0
            return
        # NEEDS_RESET belongs to the device: it stays while the device is broken, whatever the
        # driver writes back, and a driver cannot set it.
        driver_bits = status & ~STATUS_NEEDS_RESET
        old_bits = self.status & ~STATUS_NEEDS_RESET
        if driver_bits == old_bits:
            self.counters.repeats += 1
            return
        cleared = old_bits & ~driver_bits
        if cleared:
            raise Refused(
                f"SET_STATUS {status:#x} clears status bits {cleared:#x} of {self.status:#x}; "
                f"a driver clears status only by writing 0 (reset)"
            )
        self.status = driver_bits | (STATUS_NEEDS_RESET if self.broken is not None else 0)

    async def h_get_status(self, msg: vu.Message) -> int:
        return self.status

