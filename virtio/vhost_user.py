"""Sans-IO vhost-user protocol, both roles (h11 style: bytes and fds in, messages out).

``BackendConnection`` is the backend's side of one vhost-user socket: ``feed()`` the bytes and
fds the transport received and get whole, validated ``Message`` objects back; ``reply()`` and
``ack()`` build the answers. ``FrontendConnection`` is the frontend's (driver's) side: ``request()``
builds requests, ``feed()`` parses and checks the backend's replies. Neither does any I/O and
neither imports asyncio or socket: the transport sends the bytes (and the fds, as SCM_RIGHTS)
itself.

Request ids, flags, feature bits and payload layouts are data (``Request``, ``ProtocolFeature``,
frozen payload dataclasses with ``pack``/``unpack``, the ``SPECS`` table). A connection object is
not thread-safe: one thread (the daemon's event loop, or the test thread driving a frontend) owns
it.

Errors: anything the peer sent that breaks the protocol raises ``RemoteProtocolError`` whose
message names what was expected and what came. After raising, the connection is failed: it has
closed every fd it held that was not yet handed out in a returned ``Message`` and every later
``feed()`` raises again. Misuse by the local caller (a payload of the wrong type, the wrong number
of fds for a request) raises ``ValueError`` / ``TypeError``.

Fds: the fds passed to one ``feed()`` belong to the last message that has bytes in that chunk
(with SOCK_STREAM + SCM_RIGHTS the kernel ends a ``recvmsg`` right after the segment that carried
fds, and a sender attaches fds to the first byte of the message they travel with). A returned
``Message`` owns its fds: the caller must close them.

This module holds the protocol's tables: the request enums, the protocol feature bits and
``SPECS`` / ``BACKEND_SPECS`` (how each request travels), and re-exports the rest, so that
``from virtio.vhost_user import X`` is the one import path. The layers below it:
``vhost_user_wire`` (header, flags, limits, ``Message``), ``vhost_user_payloads`` (payload
dataclasses, codecs, ``Spec``) and above it ``vhost_user_conn`` (the connection state machines,
imported lazily here so that either module may be imported first).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from virtio.vhost_user_payloads import (
    ADDR,
    AREA,
    CONFIG,
    EMPTY_OR_U64,
    FILE,
    INFLIGHT,
    IOTLB,
    LOG,
    MEMTABLE,
    NONE,
    POSTED_IRQ,
    RAW,
    SINGLE,
    STATE,
    U64,
    Config,
    Inflight,
    IotlbMsg,
    Log,
    MemRegion,
    MemTable,
    PostedIrq,
    SingleMemRegion,
    Spec,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)
from virtio.vhost_user_payloads import memtable_check as _memtable_check
from virtio.vhost_user_payloads import memtable_fds as _memtable_fds
from virtio.vhost_user_payloads import vring_file_fds as _vring_file_fds
from virtio.vhost_user_wire import (
    CONFIG_TYPE_FRONTEND,
    CONFIG_TYPE_MIGRATION,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION_MASK,
    HEADER,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    REPLY_FLAGS,
    VERSION,
    VRING_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    Message,
    encode,
)

if TYPE_CHECKING:
    from virtio.vhost_user_conn import BackendConnection, FrontendConnection

__all__ = [
    "BACKEND_SPECS",
    "CONFIG_TYPE_FRONTEND",
    "CONFIG_TYPE_MIGRATION",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FLAG_VERSION_MASK",
    "HEADER",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "REPLY_FLAGS",
    "SPECS",
    "VERSION",
    "VRING_F_LOG",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendConnection",
    "BackendRequest",
    "Config",
    "FrontendConnection",
    "Inflight",
    "IotlbMsg",
    "Log",
    "MemRegion",
    "MemTable",
    "Message",
    "PostedIrq",
    "ProtocolFeature",
    "Request",
    "SingleMemRegion",
    "Spec",
    "VringAddr",
    "VringArea",
    "VringFile",
    "VringState",
    "backend_request",
    "encode",
    "protocol_features_mask",
    "request_name",
]


class Request(IntEnum):
    """Frontend-to-backend requests (``vhost-user.rst``, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    # vhostx extensions (docs/interrupts.md), far above the spec's numbering
    VHOSTX_SET_POSTED_IRQ = 0x10001


class BackendRequest(IntEnum):
    """Backend-to-frontend requests, sent on the socket given by SET_BACKEND_REQ_FD."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(IntEnum):
    """Protocol feature bit numbers (GET/SET_PROTOCOL_FEATURES). Bits 17+ are newer than QEMU 7.2.

    Never offer INBAND_NOTIFICATIONS (14) to QEMU 7.2: it acks the bit and never implements it;
    nor CONFIG (9) on a net device: QEMU 7.2 masks it with a warning on every start.
    DPDK 22.11 virtio-user accepts only MQ, REPLY_ACK and STATUS. docs/features.md has the table.
    """

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    # vhostx extensions (docs/interrupts.md), from the high unassigned end
    VHOSTX_POSTED_IRQ = 63


def protocol_features_mask(bits: Iterable[ProtocolFeature | int]) -> int:
    """Mask with every protocol feature bit number in ``bits`` set."""
    m = 0
    for b in bits:
        m |= 1 << int(b)
    return m


def request_name(req: int, enum: type[IntEnum] = Request) -> str:
    """``NAME (id)`` of a request id, or ``unknown request id`` (for error messages)."""
    try:
        return f"{enum(req).name} ({req})"
    except ValueError:
        return f"unknown request {req}"


# --------------------------------------------------------------------------- dispatch tables

R = Request
SPECS: dict[Request, Spec] = {
    R.GET_FEATURES: Spec(NONE, reply=U64),
    R.SET_FEATURES: Spec(U64),
    R.SET_OWNER: Spec(NONE),
    R.RESET_OWNER: Spec(NONE),
    R.SET_MEM_TABLE: Spec(
        MEMTABLE, fds=(1, MAX_MEM_REGIONS), fd_count=_memtable_fds, check=_memtable_check
    ),
    # SET_LOG_BASE: QEMU waits for a reply (DPDK sends it with size 0) when LOG_SHMFD is negotiated,
    # and LOG_SHMFD is the only way QEMU migrates with vhost-user; treat it as having its own reply.
    R.SET_LOG_BASE: Spec(LOG, fds=(0, 1), reply=EMPTY_OR_U64),
    R.SET_LOG_FD: Spec(NONE, fds=(1, 1)),
    R.SET_VRING_NUM: Spec(STATE),
    R.SET_VRING_ADDR: Spec(ADDR),
    R.SET_VRING_BASE: Spec(STATE),
    R.GET_VRING_BASE: Spec(STATE, reply=STATE),
    R.SET_VRING_KICK: Spec(FILE, fds=(0, 1), fd_count=_vring_file_fds),
    R.SET_VRING_CALL: Spec(FILE, fds=(0, 1), fd_count=_vring_file_fds),
    R.SET_VRING_ERR: Spec(FILE, fds=(0, 1), fd_count=_vring_file_fds),
    R.GET_PROTOCOL_FEATURES: Spec(NONE, reply=U64),
    R.SET_PROTOCOL_FEATURES: Spec(U64),
    R.GET_QUEUE_NUM: Spec(NONE, reply=U64),
    R.SET_VRING_ENABLE: Spec(STATE),
    R.SEND_RARP: Spec(U64),  # MAC in the low 6 bytes
    R.NET_SET_MTU: Spec(U64),
    R.SET_BACKEND_REQ_FD: Spec(NONE, fds=(1, 1)),
    R.IOTLB_MSG: Spec(IOTLB),
    R.SET_VRING_ENDIAN: Spec(STATE),
    R.GET_CONFIG: Spec(CONFIG, reply=CONFIG),
    R.SET_CONFIG: Spec(CONFIG),
    R.CREATE_CRYPTO_SESSION: Spec(RAW, reply=RAW),
    R.CLOSE_CRYPTO_SESSION: Spec(U64),
    R.POSTCOPY_ADVISE: Spec(NONE, reply=NONE, reply_fds=(1, 1)),  # reply carries the userfaultfd
    R.POSTCOPY_LISTEN: Spec(NONE),
    R.POSTCOPY_END: Spec(NONE),
    R.GET_INFLIGHT_FD: Spec(INFLIGHT, reply=INFLIGHT, reply_fds=(1, 1)),
    R.SET_INFLIGHT_FD: Spec(INFLIGHT, fds=(1, 1)),
    R.GPU_SET_SOCKET: Spec(NONE, fds=(1, 1)),
    R.RESET_DEVICE: Spec(NONE),
    R.VRING_KICK: Spec(STATE),
    R.GET_MAX_MEM_SLOTS: Spec(NONE, reply=U64),
    R.ADD_MEM_REG: Spec(SINGLE, fds=(1, 1)),
    R.REM_MEM_REG: Spec(SINGLE, fds=(0, 1), discard_fds=True),
    R.SET_STATUS: Spec(U64),
    R.GET_STATUS: Spec(NONE, reply=U64),
    R.VHOSTX_SET_POSTED_IRQ: Spec(POSTED_IRQ, fds=(2, 2)),
}
del R

B = BackendRequest
BACKEND_SPECS: dict[BackendRequest, Spec] = {
    B.IOTLB_MSG: Spec(IOTLB),
    B.CONFIG_CHANGE_MSG: Spec(NONE),
    B.VRING_HOST_NOTIFIER_MSG: Spec(
        AREA, fds=(0, 1), fd_count=lambda p: 0 if p.u64 & VRING_NOFD_MASK else 1
    ),
    B.VRING_CALL: Spec(STATE),
    B.VRING_ERR: Spec(STATE),
}
del B


def backend_request(req: BackendRequest, payload: Any, need_reply: bool = False) -> bytes:
    """Bytes of one backend-to-frontend request (the SET_BACKEND_REQ_FD channel), checked
    against BACKEND_SPECS (TypeError / ValueError on a payload the spec forbids)."""
    req = BackendRequest(req)
    body = BACKEND_SPECS[req].payload.encode(payload)
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(req, flags, len(body)) + body


def __getattr__(name: str) -> Any:
    # The connection classes live above this module (they use its tables): import them on first
    # use so that virtio.vhost_user_conn may be imported on its own too.
    if name in ("BackendConnection", "FrontendConnection"):
        from virtio import vhost_user_conn

        return getattr(vhost_user_conn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
