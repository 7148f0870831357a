"""The posted-interrupt domains a frontend registered on one device (VHOSTX_SET_POSTED_IRQ, a
vhostx vhost-user extension; docs/interrupts.md).

Each domain is a 64-byte descriptor inside a notification area the frontend shares (a memfd)
and a wake eventfd; the request names the vrings that post to it. The device applies the
domains to its running queues whenever it (re)makes its works (`apply`): a queue in a domain
posts its interrupts there instead of writing its call eventfd.

Threads: the control thread (the vhost-user handler and the device's work planning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from virtio.errors import RemoteProtocolError
from virtio.irq import PI_MAX_BITS, PostedArea
from virtio.ring import DeviceQueue
from virtio.vhost_user import PostedIrq

__all__ = ["PostedDomain", "PostedDomains"]


@dataclass
class PostedDomain:
    number: int
    area: PostedArea
    desc: Any  # struct vx_pi_desc *
    wake_fd: int
    queues: frozenset[int]


class PostedDomains:
    """The domains of one device's connection (closed with it)."""

    def __init__(self) -> None:
        self._domains: dict[int, PostedDomain] = {}

    def set(self, req: PostedIrq, area_fd: int, wake_fd: int, num_queues: int) -> None:
        """Register (or replace) one domain; takes ownership of both fds (closed on error)."""
        try:
            if req.flags:
                raise RemoteProtocolError(f"VHOSTX_SET_POSTED_IRQ: flags must be 0, got "
                                          f"{req.flags:#x}")
            queues = frozenset(req.queue_indices())
            bad = sorted(q for q in queues if q >= min(num_queues, PI_MAX_BITS))
            if bad:
                raise RemoteProtocolError(f"VHOSTX_SET_POSTED_IRQ: domain {req.domain} names "
                                          f"vrings {bad}; the device has {num_queues}")
            for other in self._domains.values():
                if other.number != req.domain and other.queues & queues:
                    raise RemoteProtocolError(
                        f"VHOSTX_SET_POSTED_IRQ: vrings {sorted(other.queues & queues)} "
                        f"already post to domain {other.number}")
            area = PostedArea(area_fd, req.mmap_size, req.mmap_offset)
            desc = area.desc(req.desc_offset)
        except BaseException:
            os.close(wake_fd)
            os.close(area_fd)
            raise
        os.close(area_fd)  # the mapping stays
        old = self._domains.pop(req.domain, None)
        if old is not None:
            self._close_domain(old)
        self._domains[req.domain] = PostedDomain(req.domain, area, desc, wake_fd, queues)

    def apply(self, index: int, queue: DeviceQueue) -> bool:
        """Make `queue` (vring `index`) post to its domain, if it has one; True if it does."""
        for d in self._domains.values():
            if index in d.queues:
                queue.set_posted(d.desc, index, d.wake_fd, keep=(d.area, d.desc))
                return True
        queue.set_posted(None, 0, -1)
        return False

    def describe(self) -> list[dict[str, Any]]:
        return [{"domain": d.number, "queues": sorted(d.queues)} for d in self._domains.values()]

    @staticmethod
    def _close_domain(d: PostedDomain) -> None:
        d.area.close()
        try:
            os.close(d.wake_fd)
        except OSError:
            pass

    def close(self) -> None:
        """Forget every domain (their queues are detached: nothing posts any more)."""
        for d in self._domains.values():
            self._close_domain(d)
        self._domains.clear()
