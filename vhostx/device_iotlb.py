"""vIOMMU support of a vhost-user device: VIRTIO_F_ACCESS_PLATFORM with the device IOTLB.

With ACCESS_PLATFORM negotiated, ring addresses (SET_VRING_ADDR) and descriptor addresses are
IOVAs of the guest's vIOMMU. The frontend sends IOTLB_MSG UPDATE (iova -> its uaddr, with a
permission) and INVALIDATE; the device asks for missing translations with a MISS on the backend
channel (SET_BACKEND_REQ_FD). ``IotlbSupport`` is the mixin of ``VhostUserDevice`` that keeps the
device's ``virtio.iotlb.DeviceIotlb``:

- UPDATE inserts (no quiescing: walks read the C table under its seqlock). An UPDATE that
  overlaps another mapping, and every INVALIDATE that meets a mapping, remove it so that no
  batch, running or future, uses it: a range that meets a running ring's own addresses first
  detaches the device's works (the worker finishes its batch and lets go; the re-plan after
  the message translates the rings again and attaches them); any other range is removed at
  once and a barrier on every worker waits out the batches running at that moment. The ack
  (REPLY_ACK) is sent after that: once the frontend has it, the mapping is gone.
- The table is a cache of the guest's mappings: an UPDATE that finds it full (16384 mappings;
  an identity-mapped guest gets one per 4 KiB page) first evicts every mapping but the running
  rings' (works detached), like DPDK's vhost, instead of refusing and stalling the ring that
  asked; walks ask for evicted pages again.
- A ring whose addresses are not mapped is not ready: a MISS is sent for the first unmapped page
  (once until an UPDATE comes) and the ring starts at the re-plan after the UPDATE.
- A walk that misses (vx_iotlb.c) leaves the chain in the ring and writes the table's miss
  eventfd; the loop reads the misses and sends one MISS per page until an UPDATE covers it
  (a frontend that reads the backend channel slowly gets them queued, never cut short). After an UPDATE the running
  rings' kick eventfds are written so that their works resume the stalled chains.
- GET_VRING_BASE (ring stop) forgets every mapping: a restarted driver maps anew, and a
  translation of the previous one is never used. A memory-table change re-derives host
  pointers (mappings that left guest memory are dropped).

Threads: the daemon's asyncio thread only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from virtio import features as vf
from virtio import vhost_user as vu
from virtio.errors import GuestError, RemoteProtocolError
from virtio.iotlb import DeviceIotlb, IotlbFull, IotlbPerm, IotlbType
from virtio.memory import GuestMemory

from .device_handlers import Refused, _close

if TYPE_CHECKING:
    from iosched.pool import DeviceBinding
    from vhostx.device import Vring

__all__ = ["IotlbSupport"]

log = logging.getLogger("vhostx.control")

_PAGE = 4096
_SENT_MAX = 4096  # pages asked for and not answered yet
_BACKLOG_MAX = 1 << 20  # bytes of MISS messages waiting for a frontend that reads slowly


class IotlbSupport:
    """ACCESS_PLATFORM: the IOTLB, the backend channel and the IOVA view of the rings."""

    name: str
    memory: GuestMemory | None
    vrings: list[Vring]
    iotlb: DeviceIotlb | None
    backend_fd: int
    _loop: asyncio.AbstractEventLoop | None
    _misses_sent: set[int]
    _backend_out: bytearray  # MISS bytes the backend channel did not take yet
    iotlb_counters: dict[str, int]
    worker: DeviceBinding

    if TYPE_CHECKING:  # provided by VhostUserDevice

        def has_feature(self, bit: int) -> bool: ...
        async def _detach_works(self) -> None: ...
        def _mark_broken(self, why: str) -> None: ...

    def _iotlb_reset(self) -> None:
        """Forget the IOTLB and the backend channel (disconnect; nothing runs)."""
        t = getattr(self, "iotlb", None)
        if t is not None:
            if self._loop is not None and t.miss_fd >= 0:
                self._loop.remove_reader(t.miss_fd)
            t.close()
        self.iotlb = None
        self._close_backend_channel()
        self._misses_sent = set()
        self.iotlb_counters = {"miss_sent": 0, "miss_send_failed": 0, "resumes": 0,
                               "quiesced": 0, "barriers": 0, "refused": 0, "evictions": 0,
                               "evicted": 0}

    def iommu_active(self) -> bool:
        return self.has_feature(vf.VIRTIO_F_ACCESS_PLATFORM)

    def _iotlb_table(self) -> DeviceIotlb:
        if self.iotlb is None:
            self.iotlb = DeviceIotlb()
            if self._loop is not None:
                self._loop.add_reader(self.iotlb.miss_fd, self._on_walk_miss)
        return self.iotlb

    def iotlb_stats(self) -> dict[str, int] | None:
        if self.iotlb is None:
            return None
        return {**self.iotlb.stats(), **self.iotlb_counters}

    # ---- handlers ---------------------------------------------------------------------------

    async def h_set_backend_req_fd(self, msg: vu.Message) -> None:
        self._close_backend_channel()
        self.backend_fd = msg.fds[0]
        os.set_blocking(self.backend_fd, False)

    def _close_backend_channel(self) -> None:
        fd = getattr(self, "backend_fd", -1)
        if fd >= 0 and getattr(self, "_backend_out", None) and self._loop is not None:
            self._loop.remove_writer(fd)
        _close(fd)
        self.backend_fd = -1
        self._backend_out = bytearray()

    async def h_iotlb_msg(self, msg: vu.Message) -> None:
        m: vu.IotlbMsg = msg.payload
        if not self.iommu_active():
            raise RemoteProtocolError(
                "IOTLB_MSG needs VIRTIO_F_ACCESS_PLATFORM, which was not negotiated"
            )
        t = self._iotlb_table()
        if m.type == IotlbType.UPDATE:
            DeviceIotlb.check(m.iova, m.size, m.perm, "update")
            if t.overlaps(m.iova, m.size):
                # a remap of a mapped range: the old translation goes first
                await self._remove_mappings(t, m.iova, m.size)
            try:
                try:
                    t.update(self.memory, m.iova, m.size, m.uaddr, m.perm)
                except IotlbFull:
                    # a cache of the guest's page tables, not a copy: make room and go on
                    await self._quiesce_for_iotlb()
                    self._iotlb_evict(t)
                    t.update(self.memory, m.iova, m.size, m.uaddr, m.perm)
            except (IotlbFull, GuestError) as err:
                self.iotlb_counters["refused"] += 1
                raise Refused(str(err)) from err
            self._misses_sent = {p for p in self._misses_sent if not m.iova <= p < m.iova + m.size}
            self._resume_rings()
        elif m.type == IotlbType.INVALIDATE:
            DeviceIotlb.check(m.iova, m.size, m.perm, "invalidate")
            if t.overlaps(m.iova, m.size):
                await self._remove_mappings(t, m.iova, m.size)
        elif m.type == IotlbType.ACCESS_FAIL:
            log.warning("%s: frontend reports an IOTLB access failure at iova %#x", self.name,
                        m.iova)
        else:
            raise RemoteProtocolError(
                f"IOTLB_MSG from the frontend: expected type 2 (UPDATE), 3 (INVALIDATE) or "
                f"4 (ACCESS_FAIL), got {m.type}"
                + (" (MISS goes from the backend to the frontend)" if m.type == 1 else "")
            )

    async def _quiesce_for_iotlb(self) -> None:
        self.iotlb_counters["quiesced"] += 1
        await self._detach_works()

    async def _remove_mappings(self, t: DeviceIotlb, iova: int, size: int) -> None:
        """Remove [iova, iova+size); once this returns nothing uses it. A range that meets a
        running ring's own addresses (its DeviceQueue holds their host pointers) detaches the
        works first, and the re-plan after the message translates the rings again. Any other
        range goes at once (a walk that starts afterwards misses) and a barrier on every worker
        waits out the batches that may have translated through it before (this device's works
        and the switch works of other devices that write into its RX rings)."""
        if self._meets_a_running_ring(iova, size):
            await self._quiesce_for_iotlb()
            t.invalidate(iova, size)
            return
        t.invalidate(iova, size)
        self.iotlb_counters["barriers"] += 1
        for fut in self.worker.barrier():
            try:
                await asyncio.wrap_future(fut)
            except RuntimeError:  # a stopped worker runs no batch
                pass

    def _meets_a_running_ring(self, iova: int, size: int) -> bool:
        end = iova + size
        for vr in self.vrings:
            if vr.queue is None or vr.addr is None:
                continue
            for r_iova, r_len, _perm in self._ring_ranges(vr):
                if r_iova < end and iova < r_iova + r_len:
                    return True
        return False

    def _iotlb_evict(self, t: DeviceIotlb) -> None:
        """The table is full (works detached): forget every mapping but the running rings'
        (put back with the access each ring needs, so no ring stops); a walk that needs any
        other page asks the frontend again (the sent set is forgotten too)."""
        keep: list[tuple[int, int, int, int]] = []
        for vr in self.vrings:
            if vr.queue is None or vr.addr is None:
                continue
            for iova, length, perm in self._ring_ranges(vr):
                at, end = iova, iova + length
                while at < end:  # piece by piece: a ring may span several mappings
                    try:
                        tr = t.translate(at, end - at, perm)
                    except GuestError:
                        break
                    if tr is None:
                        break
                    piece = min(tr.length, end - at)
                    keep.append((at, piece, tr.uaddr, perm))
                    at += piece
        evicted = len(t)
        t.clear()
        self._misses_sent = set()
        for iova, length, uaddr, perm in keep:
            try:
                t.update(self.memory, iova, length, uaddr, perm)
            except GuestError:  # rings that overlap each other: that ring asks again
                pass
        self.iotlb_counters["evictions"] += 1
        self.iotlb_counters["evicted"] += evicted
        log.info("%s: IOTLB full: %d mappings evicted, %d ring ranges put back", self.name,
                 evicted, len(t))

    def _iotlb_forget(self) -> None:
        """A ring stops (works detached): every mapping goes."""
        if self.iotlb is not None:
            self.iotlb.clear()
            self._misses_sent = set()

    def _iotlb_rehost(self) -> None:
        """The memory table changed (works detached): host pointers from the new one."""
        if self.iotlb is not None:
            dropped = self.iotlb.rehost(self.memory)
            if dropped:
                log.info("%s: %d IOTLB mappings left guest memory", self.name, dropped)

    # ---- rings -------------------------------------------------------------------------------

    def ring_uvas(self, vr: Vring) -> tuple[int, int, int] | None:
        """The rings' frontend addresses: SET_VRING_ADDR's without ACCESS_PLATFORM, else their
        IOVAs translated (None, and a MISS sent, while a part is unmapped)."""
        addr = vr.addr
        if not self.iommu_active():
            return (addr.desc, addr.avail, addr.used)
        t = self._iotlb_table()
        out = []
        for iova, length, perm in self._ring_ranges(vr):
            try:
                uaddr = t.ring_uaddr(iova, length, perm)
                if uaddr is None:
                    missing = t.first_unmapped(iova, length, perm)
                    self._send_miss(missing if missing is not None else iova, perm)
                    return None
            except GuestError as err:
                self._mark_broken(f"ring {vr.index}: {err}")
                return None
            out.append(uaddr)
        return (out[0], out[1], out[2])

    @staticmethod
    def _ring_ranges(vr: Vring) -> tuple[tuple[int, int, int], ...]:
        """(iova, length, access) of the ring's descriptor table, avail and used rings."""
        addr, n = vr.addr, vr.num
        assert addr is not None
        return (
            (addr.desc, 16 * n, IotlbPerm.RO),
            (addr.avail, 6 + 2 * n, IotlbPerm.RO),
            (addr.used, 6 + 8 * n, IotlbPerm.WO),
        )

    def _resume_rings(self) -> None:
        """After an UPDATE: wake the running rings (a walk may have stopped at a miss)."""
        woke = False
        for vr in self.vrings:
            if vr.queue is not None and vr.kick_fd >= 0:
                try:
                    os.eventfd_write(vr.kick_fd, 1)
                    woke = True
                except OSError:
                    pass
        if woke:
            self.iotlb_counters["resumes"] += 1

    # ---- misses ------------------------------------------------------------------------------

    def _on_walk_miss(self) -> None:
        t = self.iotlb
        if t is None:
            return
        t.drain_miss_fd()
        for iova, perm in t.take_misses():
            self._send_miss(iova, perm or IotlbPerm.RO)

    def _send_miss(self, iova: int, perm: int) -> None:
        """One MISS per page until an UPDATE covers it (the walks report a page again whenever
        the C slots were full; the frontend is asked once)."""
        page = iova & ~(_PAGE - 1)
        if page in self._misses_sent:
            return
        if len(self._misses_sent) >= _SENT_MAX:
            self._misses_sent.clear()  # pages the frontend never answered: ask again, later
        self._misses_sent.add(page)
        if self.backend_fd < 0:
            self.iotlb_counters["miss_send_failed"] += 1
            log.warning("%s: IOTLB miss at iova %#x but no backend channel", self.name, iova)
            return
        if len(self._backend_out) >= _BACKLOG_MAX:
            self.iotlb_counters["miss_send_failed"] += 1
            self._misses_sent.discard(page)
            log.warning("%s: IOTLB miss at iova %#x dropped: the frontend reads none", self.name,
                        iova)
            return
        self._backend_out += vu.backend_request(
            vu.BackendRequest.IOTLB_MSG, vu.IotlbMsg(iova, 0, 0, perm, IotlbType.MISS)
        )
        self.iotlb_counters["miss_sent"] += 1
        self._flush_backend()

    def _flush_backend(self) -> None:
        """Write what the channel takes; the rest waits for it to be writable (a stream: a
        message is never cut short, its tail follows)."""
        fd = self.backend_fd
        if fd < 0:
            return
        had = bool(self._backend_out)
        try:
            while self._backend_out:
                n = os.write(fd, self._backend_out)
                del self._backend_out[:n]
        except BlockingIOError:
            pass
        except OSError as err:
            self.iotlb_counters["miss_send_failed"] += 1
            log.warning("%s: backend channel failed: %s", self.name, err)
            self._backend_out.clear()
        if self._loop is None:
            return
        if self._backend_out:
            self._loop.add_writer(fd, self._flush_backend)
        elif had:
            self._loop.remove_writer(fd)
