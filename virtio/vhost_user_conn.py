"""The sans-IO vhost-user connection state machines, both roles (see ``virtio.vhost_user``).

``BackendConnection`` and ``FrontendConnection`` share ``_Parser``: framing, fd bookkeeping and the
failed state. Import them from ``virtio.vhost_user``. A connection object is not thread-safe: one
thread (the daemon's event loop, or the test thread driving a frontend) owns it.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import Any

from virtio.errors import RemoteProtocolError
from virtio.vhost_user import SPECS, ProtocolFeature, Request, request_name
from virtio.vhost_user_payloads import ACK as _ACK
from virtio.vhost_user_payloads import Codec, Spec
from virtio.vhost_user_wire import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION_MASK,
    FLAGS_KNOWN,
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    REPLY_FLAGS,
    VERSION,
    Message,
)
from virtio.vhost_user_wire import U64_STRUCT as _U64
from virtio.vhost_user_wire import close_all as _close_all

__all__ = ["BackendConnection", "FrontendConnection"]

_name = request_name


# --------------------------------------------------------------------------- parser core


class _Parser:
    """Framing, fd bookkeeping and failure state shared by both roles."""

    role = "peer"
    _enum: type[IntEnum] = Request  # names requests in error messages

    def __init__(self) -> None:
        self._buf = bytearray()
        self._held: list[int] = []  # fds that belong to the message in progress
        self._failed: RemoteProtocolError | None = None
        self._eof = False
        # (request, flags, size, spec) of the message whose header is in, or None
        self._cur: tuple[int, int, int, Spec] | None = None

    # -- hooks ------------------------------------------------------------
    def _check_header(self, request: int, flags: int, size: int) -> Spec:  # pragma: no cover
        raise NotImplementedError

    def _payload_codec(self, spec: Spec) -> Codec:  # pragma: no cover
        raise NotImplementedError

    def _fd_range(self, spec: Spec) -> tuple[int, int]:  # pragma: no cover
        raise NotImplementedError

    def _make(self, request: int, flags: int, payload: Any, fds: tuple[int, ...]) -> Message:
        return Message(request, flags, payload, fds)

    def _after(self, msg: Message) -> None:
        pass

    # -- public -----------------------------------------------------------
    @property
    def failed(self) -> bool:
        return self._failed is not None

    @property
    def closed(self) -> bool:
        """True once EOF was fed (``feed(b"")``) or the connection failed."""
        return self._eof or self._failed is not None

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        """Parse bytes (and the fds that came with them) into whole messages.

        ``feed(b"")`` signals EOF: it raises RemoteProtocolError if a message was cut off.
        """
        fds = list(fds)
        if self._failed is not None:
            _close_all(fds)
            raise RemoteProtocolError(f"connection already failed: {self._failed}")
        if self._eof:
            _close_all(fds)
            raise RemoteProtocolError(f"{len(data)} bytes fed after EOF")
        out: list[Message] = []
        try:
            if not data:
                self._eof = True
                if fds:
                    raise RemoteProtocolError(f"{len(fds)} fds arrived with no data at EOF")
                if self._buf or self._held:
                    self._cut_off()
                return out
            self._buf += data
            pending_fds = fds
            while True:
                msg_end = self._frame()
                if msg_end is None:
                    break
                if pending_fds and msg_end == len(self._buf):
                    # the chunk ends with this message: the fds are its own
                    self._held.extend(pending_fds)
                    pending_fds = []
                out.append(self._complete(msg_end))
            # fds not claimed belong to the message still in progress (or the next one)
            self._held.extend(pending_fds)
            pending_fds = []
            if self._held and self._cur is not None:
                _lo, hi = self._fd_range(self._cur[3])
                if len(self._held) > hi:
                    raise RemoteProtocolError(
                        f"{_name(self._cur[0], self._enum)} takes at most {hi} fds, "
                        f"got {len(self._held)}"
                    )
            return out
        except RemoteProtocolError as e:
            self._fail(e, out, fds)
            raise
        except (ValueError, struct.error) as e:  # pragma: no cover - decoders raise ValueError
            err = RemoteProtocolError(f"malformed message: {e}")
            self._fail(err, out, fds)
            raise err from e

    def close(self) -> None:
        """The transport is gone: close every fd held for the message in progress (a message
        cut off by a disconnect, or the rest of a chunk after a request the caller refused).
        Later ``feed()`` calls raise. Idempotent."""
        _close_all(self._held)
        self._held = []
        self._buf.clear()
        self._cur = None
        self._eof = True

    def _fail(self, err: RemoteProtocolError, out: list[Message], fds: list[int]) -> None:
        self._failed = err
        held = set(self._held) | set(fds)
        for m in out:
            held.update(m.fds)
        _close_all(held)
        self._held = []
        self._buf.clear()
        self._cur = None

    def _cut_off(self) -> None:
        if self._cur is None:
            raise RemoteProtocolError(
                f"connection closed in the middle of a message: expected a {HEADER_SIZE}-byte "
                f"header, got {len(self._buf)} bytes"
                + (f" and {len(self._held)} fds" if self._held else "")
            )
        request, _flags, size, _spec = self._cur
        raise RemoteProtocolError(
            f"connection closed in the middle of {_name(request, self._enum)}: expected "
            f"{size} payload bytes, got {len(self._buf) - HEADER_SIZE}"
        )

    def _frame(self) -> int | None:
        """Parse the header if it is in; return the end offset of a whole message or None."""
        if self._cur is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            request, flags, size = HEADER.unpack_from(self._buf)
            if flags & FLAG_VERSION_MASK != VERSION:
                raise RemoteProtocolError(
                    f"expected version {VERSION} in flags bits 0-1, got flags {flags:#x} "
                    f"(request {request})"
                )
            if flags & ~FLAGS_KNOWN:
                raise RemoteProtocolError(
                    f"expected only flag bits 0-3, got flags {flags:#x} (request {request})"
                )
            if size > MAX_PAYLOAD_SIZE:
                raise RemoteProtocolError(
                    f"expected a payload size <= {MAX_PAYLOAD_SIZE}, got {size} "
                    f"({_name(request, self._enum)})"
                )
            spec = self._check_header(request, flags, size)
            codec = self._payload_codec(spec)
            err = codec.check_size(size)
            if err is not None:
                raise RemoteProtocolError(f"{self._what(request, flags)} expects {err}, got {size}")
            self._cur = (request, flags, size, spec)
        end = HEADER_SIZE + self._cur[2]
        return end if len(self._buf) >= end else None

    def _what(self, request: int, flags: int) -> str:
        s = _name(request, self._enum)
        return f"reply to {s}" if flags & FLAG_REPLY else s

    def _complete(self, end: int) -> Message:
        assert self._cur is not None
        request, flags, _size, spec = self._cur
        data = bytes(self._buf[HEADER_SIZE:end])
        codec = self._payload_codec(spec)
        what = self._what(request, flags)
        try:
            payload = codec.decode(data)
        except (ValueError, struct.error) as e:
            raise RemoteProtocolError(f"malformed {what} payload: {e}") from e
        check = spec.check if not (flags & FLAG_REPLY) else None
        if check is not None:
            err = check(payload)
            if err is not None:
                raise RemoteProtocolError(f"{what} expects {err}")
        held = self._held
        lo, hi = self._fd_range(spec)
        fd_count = spec.fd_count if not (flags & FLAG_REPLY) else None
        if fd_count is not None:
            want = fd_count(payload)
            if len(held) != want:
                raise RemoteProtocolError(f"{what} expects {want} fds, got {len(held)}")
        elif not lo <= len(held) <= hi:
            want_s = str(lo) if lo == hi else f"{lo}..{hi}"
            raise RemoteProtocolError(f"{what} expects {want_s} fds, got {len(held)}")
        fds = tuple(held)
        if spec.discard_fds and not (flags & FLAG_REPLY):
            _close_all(fds)
            fds = ()
        self._held = []
        del self._buf[:end]
        self._cur = None
        msg = self._make(request, flags, payload, fds)
        self._after(msg)
        return msg


# --------------------------------------------------------------------------- backend side


class BackendConnection(_Parser):
    """The backend's side of one vhost-user connection (owned by one thread: the event loop).

    ``feed()`` yields request ``Message`` objects (request is a ``Request``); ``reply()`` builds
    the answer to a request that has its own reply; ``ack()`` the REPLY_ACK answer (b"" when none
    is due). The connection tracks SET_PROTOCOL_FEATURES itself to know whether REPLY_ACK is on.
    """

    role = "backend"
    _enum = Request

    def __init__(self) -> None:
        super().__init__()
        self._protocol_features = 0

    @property
    def protocol_features(self) -> int:
        """The protocol features the frontend last set (SET_PROTOCOL_FEATURES), 0 before."""
        return self._protocol_features

    def _check_header(self, request: int, flags: int, size: int) -> Spec:
        if flags & FLAG_REPLY:
            raise RemoteProtocolError(
                f"expected a request from the frontend, got a message with the REPLY flag "
                f"(flags {flags:#x}, {_name(request)})"
            )
        try:
            req = Request(request)
        except ValueError:
            raise RemoteProtocolError(
                f"expected a request id 1..{Request.GET_STATUS} (or a vhostx extension, "
                f"{Request.VHOSTX_SET_POSTED_IRQ:#x}), got unknown request {request} "
                f"(flags {flags:#x}, size {size})"
            ) from None
        return SPECS[req]

    def _payload_codec(self, spec: Spec) -> Codec:
        return spec.payload

    def _fd_range(self, spec: Spec) -> tuple[int, int]:
        return spec.fds

    def _make(self, request: int, flags: int, payload: Any, fds: tuple[int, ...]) -> Message:
        reply_ack = bool(self._protocol_features >> ProtocolFeature.REPLY_ACK & 1)
        req = Request(request)
        if req == Request.SET_PROTOCOL_FEATURES:
            self._protocol_features = payload
            reply_ack = bool(payload >> ProtocolFeature.REPLY_ACK & 1)
        return Message(req, flags, payload, fds, reply_ack)

    def reply(self, msg: Message, payload: Any) -> bytes:
        """The reply to ``msg`` (which must have its own reply), flags exactly VERSION|REPLY.

        Fds that go with the reply (GET_INFLIGHT_FD, POSTCOPY_ADVISE) are sent by the caller.
        """
        spec = SPECS[Request(msg.request)]
        if spec.reply is None:
            raise ValueError(f"{_name(msg.request)} has no reply of its own; use ack()")
        body = spec.reply.encode(payload)
        return HEADER.pack(msg.request, REPLY_FLAGS, len(body)) + body

    def ack(self, msg: Message, ok: bool | int = True) -> bytes:
        """REPLY_ACK answer (u64 0 = ok, 1 = failed; an int is sent as is) or b"" if none is due:
        only when REPLY_ACK was negotiated, NEED_REPLY is set and the request has no own reply."""
        if not (msg.need_reply and msg.reply_ack):
            return b""
        if SPECS[Request(msg.request)].reply is not None:
            return b""
        value = (0 if ok else 1) if isinstance(ok, bool) else int(ok)
        return HEADER.pack(msg.request, REPLY_FLAGS, 8) + _U64.pack(value)

    def needs_ack(self, msg: Message) -> bool:
        """True if ``ack()`` would return bytes for ``msg``."""
        return msg.need_reply and msg.reply_ack and SPECS[Request(msg.request)].reply is None


# --------------------------------------------------------------------------- frontend side


class FrontendConnection(_Parser):
    """The frontend's side of one vhost-user connection (owned by one thread).

    ``request()`` builds a request and remembers which replies are due (own replies, and acks for
    ``need_reply=True``); ``feed()`` parses replies and checks each matches the oldest
    outstanding request, carries flags exactly VERSION|REPLY and the right payload size.
    """

    role = "frontend"
    _enum = Request

    def __init__(self) -> None:
        super().__init__()
        # outstanding replies in order: (request, codec, fd range)
        self._due: collections.deque[tuple[Request, Codec, tuple[int, int]]] = collections.deque()

    @property
    def replies_due(self) -> int:
        return len(self._due)

    def request(
        self,
        req: Request,
        payload: Any = None,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> bytes:
        """Bytes of one request. The caller sends ``fds`` with them (SCM_RIGHTS, first byte).

        ``need_reply`` sets NEED_REPLY: only do so when REPLY_ACK was negotiated (or the request
        has its own reply anyway). Raises TypeError/ValueError on a payload or fd count the spec
        forbids.
        """
        req = Request(req)
        spec = SPECS[req]
        if spec.check is not None and isinstance(payload, spec.payload.pytype):
            err = spec.check(payload)
            if err is not None:
                raise ValueError(f"{_name(req)} expects {err}")
        body = spec.payload.encode(payload)
        n = len(fds)
        if spec.fd_count is not None:
            want = spec.fd_count(payload)
            if n != want:
                raise ValueError(f"{_name(req)} needs {want} fds, got {n}")
        elif not spec.fds[0] <= n <= spec.fds[1]:
            raise ValueError(f"{_name(req)} takes {spec.fds[0]}..{spec.fds[1]} fds, got {n}")
        if self._failed is not None:
            raise RemoteProtocolError(f"connection already failed: {self._failed}")
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        if spec.reply is not None:
            self._due.append((req, spec.reply, spec.reply_fds))
        elif need_reply:
            self._due.append((req, _ACK, (0, 0)))
        return HEADER.pack(req, flags, len(body)) + body

    def _check_header(self, request: int, flags: int, size: int) -> Spec:
        if flags != REPLY_FLAGS:
            raise RemoteProtocolError(
                f"expected reply flags exactly {REPLY_FLAGS:#x} (VERSION|REPLY), got {flags:#x} "
                f"({_name(request)})"
            )
        if not self._due:
            raise RemoteProtocolError(
                f"expected no reply (no request outstanding), got a reply to {_name(request)}"
            )
        want = self._due[0][0]
        if request != want:
            raise RemoteProtocolError(
                f"expected a reply to {_name(want)}, got a reply to {_name(request)}"
            )
        return SPECS[want]

    def _payload_codec(self, spec: Spec) -> Codec:
        return self._due[0][1]

    def _fd_range(self, spec: Spec) -> tuple[int, int]:
        return self._due[0][2]

    def _make(self, request: int, flags: int, payload: Any, fds: tuple[int, ...]) -> Message:
        self._due.popleft()
        return Message(Request(request), flags, payload, fds)
