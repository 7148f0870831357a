"""The network-namespace side of the TAP guest tests (test_qemu_net.py, test_qemu_viommu.py,
test_qemu_mq.py): a TCP receiver listening inside the namespace that takes one connection from
the guest and keeps every byte of it, and ``poke``, which connects from the namespace to the
guest and sends.

Threads: the test's thread creates and joins a ``NetnsReceiver``; its accept runs on a thread of
its own. ``poke`` runs on the caller's thread.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

__all__ = ["NetnsReceiver", "poke", "recv_all"]


def recv_all(conn: socket.socket) -> bytes:
    """Everything ``conn`` sends until it closes."""
    chunks: list[bytes] = []
    while True:
        data = conn.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class NetnsReceiver:
    """A server socket at ``host:port`` inside ``netns`` (a vhostx.netdev.Netns) that accepts
    one connection within ``timeout`` s and reads it to the end; use as a context manager
    (the socket is closed on exit). ``join(t)`` waits for the transfer; ``data`` is what came
    (None until then)."""

    def __init__(self, netns: Any, host: str, port: int, timeout: float) -> None:
        self.server: socket.socket = netns.call(socket.create_server, (host, port))
        self.server.settimeout(timeout)
        self.data: bytes | None = None
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._accept, name="netns-recv", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        try:
            conn, _ = self.server.accept()
            with conn:
                self.data = recv_all(conn)
        except OSError as err:  # timed out, or closed by __exit__
            self.error = err

    def join(self, timeout: float) -> bytes | None:
        self._thread.join(timeout)
        return self.data

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.close()


def poke(netns: Any, host: str, port: int, payload: bytes = b"", timeout: float = 60,
         connect_timeout: float = 10) -> None:
    """Connect from inside ``netns`` to host:port (retrying until it listens, for up to
    ``timeout`` s), send ``payload``, close the sending side and wait for the peer to close:
    everything was read."""
    deadline = time.monotonic() + timeout
    while True:
        s = netns.call(socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(connect_timeout)
            s.connect((host, port))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
        finally:
            s.close()
