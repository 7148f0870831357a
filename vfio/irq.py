"""Interrupt eventfds: one per vector, usable with asyncio or by blocking.

Role: ``IrqEventfd`` wraps an eventfd the kernel signals when the device raises the interrupt.
``fileno()`` lets the caller ``loop.add_reader(e.fileno(), ...)``; ``wait(timeout)`` blocks;
``consume()`` reads the count without blocking. vfio.device.Device.enable_irq creates them.
Threads: any thread may wait on its own eventfd; close from the owner.
"""

from __future__ import annotations

import os
import select
from types import TracebackType
from typing import Self

__all__ = ["IrqEventfd"]


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
