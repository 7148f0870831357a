"""virtio: guest memory, split virtqueues (device side in a C core, driver side in pure Python).

This package knows nothing of sockets or daemons. Modules state which thread may call them.
"""

__all__: list[str] = []
