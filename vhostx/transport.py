"""asyncio transport for vhost-user: UNIX stream sockets carrying bytes plus SCM_RIGHTS fds.

`listen_unix` serves a path (one frontend at a time per device: a second connection is refused),
its group and mode set between bind() and listen(), so no frontend connects before they apply;
`connect_unix` dials a listening frontend (QEMU `server=on`, DPDK `server=1`) and dials again after
every disconnect; `adopt_fd` checks an inherited, already-connected socket (`serve --fd N`, as a
management tool hands one over) and `serve_fd` serves it once. All hand each connection to
`serve(recv, send)` until it returns.

Threads: the asyncio loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from virtio.errors import ConfigError, RemoteProtocolError

__all__ = ["MAX_FDS", "Channel", "adopt_fd", "connect_unix", "listen_unix", "serve_fd"]

log = logging.getLogger("vhostx.control")

MAX_FDS = 32  # more than any vhost-user message carries (SET_MEM_TABLE: 8)
RECV_SIZE = 65536

Serve = Callable[[Callable[[], Awaitable[tuple[bytes, list[int]]]], Callable[[bytes], Awaitable[None]]], Awaitable[None]]


class Channel:
    """One connected non-blocking UNIX stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def recv(self) -> tuple[bytes, list[int]]:
        """Bytes and the fds that came with them; b"" at EOF."""
        fd = self.sock.fileno()
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, RECV_SIZE, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                fut: asyncio.Future[None] = self._loop.create_future()

                def ready(fut: asyncio.Future[None] = fut) -> None:
                    if not fut.done():
                        fut.set_result(None)

                self._loop.add_reader(fd, ready)
                try:
                    await fut
                finally:
                    self._loop.remove_reader(fd)
                continue
            except ConnectionResetError:
                return b"", []
            if flags & socket.MSG_CTRUNC:
                for f in fds:
                    os.close(f)
                raise RemoteProtocolError(
                    f"the frontend sent more than {MAX_FDS} fds in one message; fds were lost"
                )
            return data, list(fds)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


async def _run_connection(sock: socket.socket, serve: Serve) -> None:
    ch = Channel(sock)
    try:
        await serve(ch.recv, ch.send)
    except (ConnectionError, BrokenPipeError) as err:
        log.info("connection lost: %s", err)
    finally:
        ch.close()


def _group_id(group: str, path: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket {path}: socket_group={group!r}: no such group") from None


def _set_owner_mode(path: str, group: str | None, mode: int | None) -> None:
    """Give the bound socket file its group and permission bits (connecting needs write access)."""
    try:
        if group:
            os.chown(path, -1, _group_id(group, path))
        if mode is not None:
            os.chmod(path, mode)
    except OSError as err:
        what = f"group {group!r}" if group else f"mode {mode:04o}" if mode is not None else ""
        raise ConfigError(f"socket {path}: cannot set its {what}: {err.strerror}") from err


def _bind(path: str, group: str | None = None, mode: int | None = None) -> socket.socket:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"socket {path}: cannot create directory {p.parent}: {err.strerror}") from err
    if p.is_socket():
        # A stale socket from an earlier run, unless somebody still listens on it.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            p.unlink()
        else:
            raise ConfigError(f"socket {path}: another process is already listening on it")
        finally:
            probe.close()
    elif p.exists():
        raise ConfigError(f"socket {path}: exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise ConfigError(f"socket {path}: cannot bind: {err.strerror}") from err
    try:
        _set_owner_mode(path, group, mode)  # before listen(): until then every connect is refused
        sock.listen(4)
    except (OSError, ConfigError) as err:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"socket {path}: cannot listen: {err.strerror}") from err
    sock.setblocking(False)
    return sock


async def listen_unix(path: str, serve: Serve, started: asyncio.Event | None = None, *,
                      group: str | None = None, mode: int | None = None) -> None:
    """Accept frontends on `path` forever, one connection served at a time. `group` (name or
    gid) and `mode` (permission bits), when given, apply to the socket file before it listens."""
    loop = asyncio.get_running_loop()
    lsock = _bind(path, group, mode)
    busy: asyncio.Task[None] | None = None
    try:
        if started is not None:
            started.set()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            if busy is not None and not busy.done():
                # The previous frontend may have just hung up and be in its clean-up.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(busy), 1.0)
            if busy is not None and not busy.done():
                log.warning("%s: a frontend is already connected; refusing another", path)
                conn.close()
                continue
            busy = loop.create_task(_run_connection(conn, serve))
    finally:
        if busy is not None and not busy.done():
            busy.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await busy
        lsock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


async def connect_unix(path: str, serve: Serve, *, retry_s: float = 0.2, max_retry_s: float = 2.0) -> None:
    """Dial `path` (the frontend listens), serve, and dial again after every disconnect."""
    loop = asyncio.get_running_loop()
    delay = retry_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
        except OSError as err:
            sock.close()
            if err.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                log.warning("%s: connect failed: %s", path, err)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_retry_s)
            continue
        delay = retry_s
        log.info("%s: connected to the frontend", path)
        await _run_connection(sock, serve)
        await asyncio.sleep(retry_s)


def adopt_fd(fd: int) -> socket.socket:
    """The inherited socket `fd` as a socket object, after checking that it is what a vhost-user
    backend can serve: an open, connected AF_UNIX stream socket. ConfigError otherwise (the fd
    is then left as it was)."""
    where = f"--fd {fd}"
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise ConfigError(f"{where}: not an open file descriptor ({err.strerror})") from err
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a regular file" if stat.S_ISREG(st.st_mode) else "a pipe"
                if stat.S_ISFIFO(st.st_mode) else "a character device"
                if stat.S_ISCHR(st.st_mode) else "not a socket")
        raise ConfigError(f"{where}: expected a connected AF_UNIX stream socket, got {kind}")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"{where}: expected a connected AF_UNIX stream socket, got "
                              f"{sock.family.name} {sock.type.name}")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"{where}: expected a connected AF_UNIX stream socket, got a "
                              "listening one (give its path with --socket-path instead)")
        try:
            sock.getpeername()
        except OSError as err:
            raise ConfigError(f"{where}: expected a connected AF_UNIX stream socket, got an "
                              f"unconnected one ({err.strerror})") from err
    except BaseException:
        sock.detach()
        raise
    return sock


async def serve_fd(sock: socket.socket, serve: Serve) -> None:
    """Serve the one connection of an adopted socket (`adopt_fd`) until the frontend hangs up."""
    await _run_connection(sock, serve)
