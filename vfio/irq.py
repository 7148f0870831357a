"""Interrupt eventfds: one per vector, usable with asyncio or by blocking.

Role: ``IrqEventfd`` wraps an eventfd the kernel signals when the device raises the interrupt.
``fileno()`` lets the caller ``loop.add_reader(e.fileno(), ...)``; ``wait(timeout)`` blocks;
``consume()`` reads the count without blocking; ``wait_async()`` awaits it on a loop. vfio.device.Device.enable_irq creates them.
Threads: any thread may wait on its own eventfd; close from the owner.
"""

from __future__ import annotations

import asyncio
import os
import select
from types import TracebackType
from typing import Self

__all__ = ["IrqEventfd"]


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class IrqEventfd:
    """A non-blocking eventfd; a read returns how many interrupts came since the last read."""

    def __init__(self, index: int, vector: int) -> None:
        self.index = index  # VFIO IRQ index (INTx 0, MSI 1, MSI-X 2, ...)
        self.vector = vector
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def consume(self) -> int:
        """Interrupts counted since the last read (0 if none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None = None) -> int:
        """Block until at least one interrupt came (or ``timeout`` seconds); returns the count,
        0 on timeout."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return self.consume() if ready else 0

    async def wait_async(self) -> int:
        """Wait on the running asyncio loop (through ``loop.add_reader``) until at least one
        interrupt came; returns the count."""
        loop = asyncio.get_running_loop()
        while True:
            n = self.consume()
            if n:
                return n
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.fd, _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
