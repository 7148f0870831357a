"""The request handlers of a vhost-user device (``h_<name>`` methods the dispatch table names).

``RequestHandlers`` is a mixin of ``vhostx.device.VhostUserDevice``: the device keeps the
dispatch table, the connection loop, ring readiness and the queue lifecycle; the handlers here
change the negotiated state (features, memory, vring parameters, status) and leave readiness to
the re-plan the loop runs after every message. A handler raises ``RemoteProtocolError`` for a
request that breaks the protocol and ``Refused`` for a well-formed one it declines.

Threads: the daemon's asyncio thread only (the device's lock is held around every handler).
"""

from __future__ import annotations

import logging
import os
import select
import stat
from typing import TYPE_CHECKING, Any

from virtio import vhost_user as vu
from virtio.errors import GuestError, RemoteProtocolError
from virtio.memory import GuestMemory, MemoryRegion, check_backing

if TYPE_CHECKING:
    from vhostx.device import DeviceCounters, Vring
    from vhostx.posted import PostedDomains
    from virtio.ring import DeviceQueue

__all__ = ["MAX_MEM_SLOTS", "MAX_QUEUE_SIZE", "STATUS_NEEDS_RESET", "Refused", "RequestHandlers"]

log = logging.getLogger("vhostx.control")

MAX_QUEUE_SIZE = 32768
MAX_MEM_SLOTS = 32
STATUS_NEEDS_RESET = 0x40


def _check_pollable(fds: tuple[int, ...], what: str) -> None:
    """Refuse a kick fd that epoll cannot watch (a regular file such as a memfd, /dev/null): a
    worker waits on kick fds with epoll, and would fail when the ring starts. `fds` (the
    message's) are closed first."""
    ep = select.epoll()
    try:
        ep.register(fds[0], select.EPOLLIN)
    except OSError as err:
        try:
            mode = os.fstat(fds[0]).st_mode
            kind = ("a regular file" if stat.S_ISREG(mode) else "a character device"
                    if stat.S_ISCHR(mode) else f"file type {stat.S_IFMT(mode):#o}")
        except OSError:
            kind = "an fd that cannot be inspected"
        for fd in fds:
            _close(fd)
        raise RemoteProtocolError(
            f"{what}: expected a pollable kick fd (an eventfd), got {kind} that epoll cannot "
            f"watch ({err.strerror})"
        ) from err
    finally:
        ep.close()


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class Refused(Exception):
    """A handler declines a well-formed request: answer a failed ack, keep the connection."""


class RequestHandlers:
    """The ``h_*`` handlers; the state they change is the device's (declared here for typing)."""

    name: str
    counters: DeviceCounters
    memory: GuestMemory | None
    vrings: list[Vring]
    num_queues: int
    protocol_features: int
    acked_features: int
    acked_protocol_features: int
    protocol_features_set: bool
    features_set: bool
    owner: bool
    status: int
    broken: str | None
    posted: PostedDomains

    if TYPE_CHECKING:  # provided by VhostUserDevice

        def offered_features(self) -> int: ...
        def has_protocol_features(self) -> bool: ...
        def config_space(self) -> bytes: ...
        def _fresh_vrings(self) -> list[Vring]: ...
        async def _detach_works(self) -> None: ...
        def _stop_queue(self, vr: Vring) -> None: ...
        def _stop_all_queues(self) -> None: ...
        def _mark_broken(self, why: str) -> None: ...
        def _iotlb_forget(self) -> None: ...
        def _iotlb_rehost(self) -> None: ...

    # ---- helpers for handlers ---------------------------------------------------------------

    def _vring(self, index: int, what: str, fds: tuple[int, ...] = ()) -> Vring:
        """The ring `index`; RemoteProtocolError if there is none (the message's `fds`, which no
        ring will own, are closed first)."""
        if not 0 <= index < len(self.vrings):
            for fd in fds:
                _close(fd)
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
        self.vrings = self._fresh_vrings()
        self._iotlb_forget()
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
        self._iotlb_rehost()
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
            check_backing(regions, msg.fds)
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
            check_backing([region], msg.fds)
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
        self._iotlb_forget()  # a restarted driver maps anew
        vr.started = False
        vr.enabled = False if self.has_protocol_features() else vr.enabled
        _close(vr.kick_fd)
        vr.kick_fd = -1
        vr.kick_known = False
        return vu.VringState(st.index, vr.base)

    async def h_set_vring_kick(self, msg: vu.Message) -> None:
        vr = self._vring(msg.payload.index, "SET_VRING_KICK", msg.fds)
        if msg.fds and not msg.payload.nofd:
            _check_pollable(msg.fds, f"SET_VRING_KICK: ring {msg.payload.index}")
        old = self._replace_fd(vr, "kick_fd", msg)
        if old >= 0 and vr.queue is not None:
            await self._detach_works()  # the worker must stop polling the old fd first
        _close(old)
        vr.kick_known = True
        vr.started = True

    async def h_set_vring_call(self, msg: vu.Message) -> None:
        vr = self._vring(msg.payload.index, "SET_VRING_CALL", msg.fds)
        old = self._replace_fd(vr, "call_fd", msg)
        if vr.queue is not None:
            # Detach first (other devices' switch works stop writing this ring too: release_works
            # takes the port off the switch), swap the fd, and let the re-plan attach again.
            await self._detach_works()
            vr.queue.set_call_fd(vr.call_fd)
        _close(old)

    async def h_set_vring_err(self, msg: vu.Message) -> None:
        vr = self._vring(msg.payload.index, "SET_VRING_ERR", msg.fds)
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

    # ---- vhostx extensions -----------------------------------------------------------------

    async def h_vhostx_set_posted_irq(self, msg: vu.Message) -> None:
        """One posted-interrupt domain (docs/interrupts.md); the re-plan applies it."""
        area_fd, wake_fd = msg.fds
        self.posted.set(msg.payload, area_fd, wake_fd, self.num_queues)

    def apply_posted(self, index: int, queue: DeviceQueue) -> bool:
        """Make a running queue post to its domain, if the frontend gave it one."""
        return bool(self.posted.apply(index, queue))
