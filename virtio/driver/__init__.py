"""The driver side of virtio (the guest's side): split rings (split.py; bookkeeping and batches
in the C core's vx_drvq.c) and the net client over any transport (net.py). Used by tests, the
guest model, the benchmarks and the user-space driver over VFIO (virtio.transport.pci).

Any thread may use a DriverQueue, but one queue must only be used by one thread at a time.
"""

from virtio.driver.split import DriverQueue

__all__ = ["DriverQueue"]
