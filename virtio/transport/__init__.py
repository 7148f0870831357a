"""Transports of the driver side: what a virtio driver needs from the way it reaches a device.

Role: ``Transport`` is the seam between the drivers (virtio.driver.split.DriverQueue rings,
virtio.driver.net.NetDriver) and how the device is reached. Two implement it:
- virtio.frontend.VhostUserFrontend: the device is a vhost-user backend; driver memory is a
  shared memfd whose byte 0 is guest physical address 0, notifications are eventfds;
- virtio.transport.pci.VirtioPciTransport: a modern virtio-pci function owned through VFIO;
  driver memory is IOMMU-mapped DMA memory, kicks are notify-BAR writes and interrupts MSI-X
  (or MSI / INTx) eventfds.
Threads: one thread owns a transport and its drivers (no locks).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from virtio.driver.split import DriverQueue

__all__ = ["Transport"]


@runtime_checkable
class Transport(Protocol):
    """What a driver uses of a started transport (features negotiated, queues live)."""

    features: int  # the negotiated feature word
    num_queues: int
    queue_size: int
    queues: list[DriverQueue]  # queue i, ready to use
    mem: memoryview  # driver memory the device reaches ...
    dma_base: int  # ... whose byte 0 is at this device (bus) address

    @property
    def connected(self) -> bool:
        """True while the device can be driven (queues set up, DRIVER_OK)."""
        ...

    def has_feature(self, bit: int) -> bool: ...

    def alloc(self, size: int, align: int = 64) -> int:
        """Reserve ``size`` bytes of driver memory; returns their device address."""
        ...

    def kick(self, index: int) -> None:
        """Notify the device that queue ``index`` has new buffers."""
        ...

    def wait_call(self, index: int, timeout: float) -> bool:
        """Wait up to ``timeout`` s for an interrupt of queue ``index``; True if one came."""
        ...
