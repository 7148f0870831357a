"""The driver side of para-virtual posted interrupts (the vhostx extension VHOSTX_POSTED_IRQ;
docs/interrupts.md): one interrupt domain's descriptor in a shared notification area, its wake
eventfd, and the driver's protocol around them.

A driver thread (one domain) runs with SN set: the backend only sets request bits, and the
driver learns which queues have completions by taking the bitmap (`take`: one atomic exchange
per non-empty 64-bit word; no syscall). Before it sleeps it calls `prepare_sleep` (ON cleared:
the exitless EOI, SN cleared, full fence, bitmap re-read) and sleeps only if nothing is
pending; a wake-up (`sleep`) is the only syscall pair: a poll and the eventfd drain.

`PostedArea` is the memfd holding the descriptors of one or more domains; `register` tells the
backend about one domain over a VhostUserFrontend (two fds: the area and the wake eventfd).

Threads: one domain belongs to one driver thread; the area may be shared by several domains.
"""

from __future__ import annotations

import mmap
import os
import select
from collections.abc import Iterable
from typing import Any

from virtio._vx_core import ffi, lib
from virtio.errors import ConfigError
from virtio.vhost_user import PostedIrq, Request

__all__ = ["PostedArea", "PostedDomain", "register"]

DESC_SIZE = int(lib.VX_PI_DESC_SIZE)
MAX_BITS = int(lib.VX_PI_MAX_BITS)


class PostedArea:
    """A memfd of `domains` 64-byte descriptors (zeroed), mapped here."""

    def __init__(self, domains: int = 1) -> None:
        if not 1 <= domains <= mmap.PAGESIZE // DESC_SIZE:
            raise ConfigError(f"posted-interrupt area: 1..{mmap.PAGESIZE // DESC_SIZE} domains "
                              f"per page, got {domains}")
        self.size = mmap.PAGESIZE
        self.fd = os.memfd_create("vhostx-posted-irq", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = ffi.from_buffer(self._map)
        self.domains = domains

    def desc(self, domain: int) -> Any:
        if not 0 <= domain < self.domains:
            raise ConfigError(f"posted-interrupt area: domain 0..{self.domains - 1}, got {domain}")
        return ffi.cast("struct vx_pi_desc *", self._buf + domain * DESC_SIZE)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PostedDomain:
    """One interrupt domain (a driver thread): descriptor, wake eventfd, counters."""

    def __init__(self, area: PostedArea, number: int, queues: Iterable[int]) -> None:
        self.area = area
        self.number = number
        self.queues = sorted(set(queues))
        if any(not 0 <= q < MAX_BITS for q in self.queues):
            raise ConfigError(f"posted-interrupt domain: vrings 0..{MAX_BITS - 1}, got "
                              f"{self.queues}")
        self.desc = area.desc(number)
        self.desc.domain = number
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._out = ffi.new("uint64_t[4]")
        self.wakeups = 0  # sleeps ended by the wake eventfd (each: one poll, one read)
        self.sleeps = 0  # times the driver went to sleep
        self.taken = 0  # request bits taken
        lib.vx_pi_running(self.desc)

    @property
    def control(self) -> int:
        return int(self.desc.control)

    def running(self) -> None:
        """SN = 1: the driver runs and will look (no notification needed)."""
        lib.vx_pi_running(self.desc)

    def take(self) -> list[int]:
        """The vrings whose request bits were set, cleared as they are taken."""
        n = lib.vx_pi_take(self.desc, self._out)
        if not n:
            return []
        self.taken += n
        out = self._out
        return [64 * w + b for w in range(4) if out[w] for b in range(64) if out[w] >> b & 1]

    def prepare_sleep(self) -> bool:
        """The sleep transition: EOI (ON = 0), SN = 0, full fence, bitmap re-read. False: the
        driver may sleep; True: bits are pending (SN is set again, take them)."""
        return bool(lib.vx_pi_prepare_sleep(self.desc))

    def sleep(self, timeout: float) -> bool:
        """Sleep on the wake eventfd (after prepare_sleep said so); True if woken (drained).
        SN is set again either way."""
        self.sleeps += 1
        r, _, _ = select.select([self.wake_fd], [], [], max(0.0, timeout))
        woke = bool(r)
        if woke:
            try:
                os.eventfd_read(self.wake_fd)
            except BlockingIOError:
                pass
            self.wakeups += 1
        lib.vx_pi_running(self.desc)
        return woke

    def wait(self, timeout: float) -> list[int]:
        """take(), or when nothing is pending the whole sleep protocol, then take()."""
        got = self.take()
        if got:
            return got
        if not self.prepare_sleep():
            self.sleep(timeout)
        return self.take()

    def request(self) -> PostedIrq:
        queues = sum(1 << q for q in self.queues)
        return PostedIrq(self.area.size, 0, self.number * DESC_SIZE, self.number, 0, queues)

    def close(self) -> None:
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1


def register(frontend: Any, domain: PostedDomain) -> None:
    """Send VHOSTX_SET_POSTED_IRQ for `domain` over a connected VhostUserFrontend (which must
    have negotiated VHOSTX_POSTED_IRQ)."""
    from virtio.vhost_user import ProtocolFeature as PF

    if not frontend.has_pf(PF.VHOSTX_POSTED_IRQ):
        raise ConfigError("posted interrupts: the backend did not negotiate VHOSTX_POSTED_IRQ "
                          "(protocol feature bit 63)")
    # the socket layer sends duplicates of both fds: ours stay open
    frontend.call(Request.VHOSTX_SET_POSTED_IRQ, domain.request(),
                  [domain.area.fd, domain.wake_fd])
