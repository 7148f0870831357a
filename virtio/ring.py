"""DeviceQueue: the Python face of one device-side split virtqueue held by the C core.

The ring addresses are translated and checked once here (at construction or remap); the C core
then walks descriptors, checks every guest value, and publishes used entries in batches.

Threads: the control thread constructs, remaps and closes a queue while it is stopped; after that
only the worker thread that owns the queue calls it (RX queues fed by a Switch or by fwd are also
written by other workers, under the queue's lock inside the C core). cffi releases the GIL around
every C call.
"""

from __future__ import annotations

import enum
from typing import Any

from virtio._vx_core import ffi, lib
from virtio.errors import GuestError
from virtio.memory import GuestMemory

__all__ = ["STATS_FIELDS", "DeviceQueue", "NotifyOutcome", "make_mem_table"]

STATS_FIELDS: tuple[str, ...] = tuple(name for name, _ in ffi.typeof("struct vx_stats").fields)


class NotifyOutcome(enum.IntEnum):
    """What one interrupt decision (vx_vq_notify_decide) did; each but NONE has a stats counter."""

    NONE = lib.VX_NOTIFY_NONE  # nothing published since the last decision
    SENT = lib.VX_NOTIFY_SENT  # call eventfd written ("interrupts")
    SUPPRESSED = lib.VX_NOTIFY_SUPPRESSED  # the driver wants none ("interrupts_suppressed")
    NO_FD = lib.VX_NOTIFY_NO_FD  # wanted, but no call fd ("interrupts_no_fd")
    DEFERRED = lib.VX_NOTIFY_DEFERRED  # held back by moderation ("interrupts_deferred")
    POSTED = lib.VX_NOTIFY_POSTED  # posted bit set, no notification ("interrupts_posted")
    POSTED_WAKE = lib.VX_NOTIFY_POSTED_WAKE  # posted and wake eventfd written ("pi_notifications")


def make_mem_table(mem: GuestMemory) -> Any:
    """Build the cffi `struct vx_mem *` of a snapshot (called by GuestMemory.c_table)."""
    regs = mem.host_regions()
    arr = ffi.new("struct vx_region[]", max(1, len(regs)))
    for i, (gpa, size, uva, host) in enumerate(regs):
        arr[i].gpa, arr[i].size, arr[i].uva, arr[i].host = gpa, size, uva, host
    table = ffi.new("struct vx_mem *")
    table.nregions = len(regs)
    table.regions = arr
    mem._c_regions = arr  # type: ignore[attr-defined]  # keeps the array alive with the table
    return table


def _err(vq: Any, what: str) -> GuestError:
    msg = lib.vx_vq_error(vq)
    text = ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else "unknown error"
    return GuestError(f"{what}: {text}")


class DeviceQueue:
    """Device side of one split virtqueue. After start, only its owning worker thread calls it."""

    def __init__(
        self,
        mem: GuestMemory,
        *,
        index: int,
        size: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        last_avail_idx: int = 0,
        event_idx: bool = False,
        hdr_len: int = 12,
        mrg_rxbuf: bool = False,
        call_fd: int = -1,
        log_used: bool = False,
        iotlb: Any = None,
    ) -> None:
        """``*_uva`` are frontend addresses of the rings. ``iotlb`` (a virtio.iotlb.DeviceIotlb):
        the descriptors hold IOVAs translated through it (ACCESS_PLATFORM); None: GPAs."""
        if not isinstance(size, int) or size <= 0 or size > 32768 or size & (size - 1):
            raise GuestError(f"queue {index}: size must be a power of two in 1..32768, got {size}")
        if hdr_len not in (0, 10, 12, 20):
            raise GuestError(
                f"queue {index}: net header length must be 0, 10, 12 or 20, got {hdr_len}"
            )
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.mrg_rxbuf = mrg_rxbuf
        self.hdr_len = hdr_len
        self.log_used = log_used  # dirty logging is not implemented by the C core yet
        self._addrs = (desc_uva, avail_uva, used_uva)
        vq = lib.vx_vq_new(size)
        if vq == ffi.NULL:
            raise MemoryError(f"queue {index}: cannot allocate a C queue of size {size}")
        self._vq = ffi.gc(vq, lib.vx_vq_free)
        self._stats = lib.vx_vq_stats(self._vq)
        self._call_fd = call_fd
        self.mem = mem
        self.iotlb = iotlb  # keeps the C table alive as long as the queue
        if iotlb is not None and lib.vx_vq_set_iotlb(self._vq, iotlb.c_table) < 0:
            raise _err(self._vq, f"queue {index}: IOTLB")
        desc, avail, used = self._translate(mem)
        flags = (lib.VX_F_EVENT_IDX if event_idx else 0) | (lib.VX_F_MRG_RXBUF if mrg_rxbuf else 0)
        if (
            lib.vx_vq_start(
                self._vq,
                mem.c_table,
                desc,
                avail,
                used,
                last_avail_idx & 0xFFFF,
                flags,
                hdr_len,
                call_fd,
            )
            < 0
        ):
            raise _err(self._vq, f"queue {index}: start")

    def _translate(self, mem: GuestMemory) -> tuple[Any, Any, Any]:
        desc_uva, avail_uva, used_uva = self._addrs
        n = self.size
        try:
            desc = mem.uva_to_host(desc_uva, 16 * n)
            avail = mem.uva_to_host(avail_uva, 6 + 2 * n)
            used = mem.uva_to_host(used_uva, 6 + 8 * n)
        except GuestError as e:
            raise GuestError(f"queue {self.index}: ring address not in guest memory: {e}") from e
        for name, host, align in (("desc", desc, 16), ("avail", avail, 2), ("used", used, 4)):
            if host % align:
                raise GuestError(
                    f"queue {self.index}: {name} ring at host {host:#x} not {align}-byte aligned"
                )
        return ffi.cast("void *", desc), ffi.cast("void *", avail), ffi.cast("void *", used)

    # ---- state -------------------------------------------------------------------------------
    @property
    def c_queue(self) -> Any:
        """The cffi `struct vx_vq *` (for virtio.net only)."""
        return self._vq

    @property
    def last_avail_idx(self) -> int:
        """What GET_VRING_BASE returns."""
        return int(lib.vx_vq_last_avail_idx(self._vq))

    @property
    def used_idx(self) -> int:
        return int(lib.vx_vq_used_idx(self._vq))

    @property
    def broken(self) -> str | None:
        msg = lib.vx_vq_error(self._vq)
        return None if msg == ffi.NULL else ffi.string(msg).decode(errors="replace")

    @property
    def call_fd(self) -> int:
        return self._call_fd

    # ---- data-path control ---------------------------------------------------------------------
    def pending(self) -> int:
        """Avail entries not yet consumed; GuestError if avail->idx is bogus."""
        n = lib.vx_vq_pending(self._vq)
        if n < 0:
            raise _err(self._vq, f"queue {self.index}")
        return int(n)

    def set_notify(self, enable: bool) -> None:
        """Kicks on/off; on enable a full barrier follows, the caller then re-checks pending()."""
        if lib.vx_vq_set_notify(self._vq, 1 if enable else 0) < 0:
            raise _err(self._vq, f"queue {self.index}")

    def signal(self) -> bool:
        """Publish pending used entries, interrupt the driver if it wants; True if call_fd written."""
        r = lib.vx_vq_signal(self._vq)
        if r < 0:
            raise _err(self._vq, f"queue {self.index}")
        return bool(r)

    def notify_decide(self) -> NotifyOutcome:
        """signal() with its outcome: publish, ask the driver, apply the policy, send, count."""
        r = lib.vx_vq_notify_decide(self._vq)
        if r < 0:
            raise _err(self._vq, f"queue {self.index}")
        return NotifyOutcome(r)

    # ---- the interrupt policy (virtio.irq) ----------------------------------------------------
    def set_irq(self, cell: Any) -> None:
        """Follow an interrupt policy cell (a virtio.irq.IrqConfig; None: immediate). The cell
        must outlive the queue's use of it: the queue keeps a reference."""
        self._irq_cell = cell
        lib.vx_vq_set_irq(self._vq, ffi.NULL if cell is None else cell.c_cell)

    def irq_flush(self, now_ns: int | None = None) -> int:
        """Send a held interrupt if due at `now_ns` (None: now, whatever its deadline); returns
        the deadline still pending (0: none)."""
        return int(lib.vx_vq_irq_flush(self._vq, 2**64 - 1 if now_ns is None else now_ns))

    def irq_flush_timed(self, now_ns: int) -> int:
        """irq_flush for a worker sleeping until the returned time (the C wait's call): returns
        the deadline less the learnt wake-up lateness (0: none); looked at within that advance,
        it spins to the deadline and sends."""
        return int(lib.vx_vq_irq_flush_timed(self._vq, now_ns))

    @property
    def irq_deadline(self) -> int:
        """CLOCK_MONOTONIC ns at which a held interrupt is due (0: none held)."""
        return int(lib.vx_vq_irq_deadline(self._vq))

    def set_posted(self, desc: Any, bit: int, wake_fd: int, keep: Any = None) -> None:
        """Post this queue's interrupts to a posted-interrupt descriptor (a cffi `struct
        vx_pi_desc *`) as request bit `bit`, waking `wake_fd`; desc None: back to the call
        eventfd. `keep`: what keeps the descriptor's memory mapped (held while it is used)."""
        ptr = ffi.NULL if desc is None else desc
        if lib.vx_vq_set_posted(self._vq, ptr, bit, wake_fd) < 0:
            raise GuestError(f"queue {self.index}: posted-interrupt bit {bit} not below "
                             f"{lib.VX_PI_MAX_BITS}, or descriptor not 64-byte aligned")
        self._pi_keep = keep if desc is not None else None

    def set_call_fd(self, fd: int) -> None:
        self._call_fd = fd
        lib.vx_vq_set_call_fd(self._vq, fd)

    def stats(self) -> dict[str, int]:
        s = self._stats
        return {name: int(getattr(s, name)) for name in STATS_FIELDS}

    def remap(self, mem: GuestMemory) -> None:
        """Memory table replaced while stopped: re-translate the ring addresses."""
        desc, avail, used = self._translate(mem)
        if lib.vx_vq_remap(self._vq, mem.c_table, desc, avail, used) < 0:
            raise _err(self._vq, f"queue {self.index}: remap")
        self.mem = mem

    def iotlb_last_miss(self) -> int:
        """IOVA of the last IOTLB miss that stopped this queue's walk (0: none)."""
        return int(lib.vx_vq_iotlb_last_miss(self._vq))

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else f"last_avail={self.last_avail_idx}"
        return f"DeviceQueue(index={self.index}, size={self.size}, {state})"
