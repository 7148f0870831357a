"""vhostx: a user-space vhost-user backend daemon with ELVIS-style scheduling.

The daemon (CLI, config, control socket, transport, devices and ports) lives here; the ring and
memory layer is `virtio`, the worker threads are `iosched`. Import-time side effects: none.
"""

__all__: list[str] = []
__version__ = "0.1.0"
