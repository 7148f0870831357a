"""Driver side of virtio rings in pure Python: the mock guest used by tests and benchmarks.

Any thread may use a DriverQueue, but one queue must only be used by one thread at a time.
"""

from virtio.driver.split import DriverQueue

__all__ = ["DriverQueue"]
