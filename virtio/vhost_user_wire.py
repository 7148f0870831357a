"""vhost-user wire format: the message header, flag bits, size limits and ``Message``.

The lowest layer of the sans-IO protocol (``virtio.vhost_user`` re-exports everything here):
no enums of requests, no payload layouts, no state. Pure data and functions: any thread.

Wire format (native byte order)::

    struct vhost_user_msg {
        u32 request;   /* Request / BackendRequest */
        u32 flags;     /* bits 0-1 version (== 1), bit 2 REPLY, bit 3 NEED_REPLY */
        u32 size;      /* payload bytes that follow */
        u8  payload[size];
    };
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONFIG_TYPE_FRONTEND",
    "CONFIG_TYPE_MIGRATION",
    "FLAGS_KNOWN",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FLAG_VERSION_MASK",
    "HEADER",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "REPLY_FLAGS",
    "U64_STRUCT",
    "VERSION",
    "VRING_F_LOG",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "Message",
    "close_all",
    "encode",
]

VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
FLAGS_KNOWN = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
REPLY_FLAGS = VERSION | FLAG_REPLY  # exactly 0x5: DPDK 22.11 virtio-user rejects anything else
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12
MAX_MEM_REGIONS = 8  # without CONFIGURE_MEM_SLOTS; also the SCM_RIGHTS limit QEMU uses
MAX_CONFIG_SIZE = 256
# Largest defined payloads: SET_MEM_TABLE 8 + 32*8 = 264, GET/SET_CONFIG 12 + 256 = 268, the
# crypto session requests a few hundred bytes. Anything larger is garbage and refused as soon as
# the header is in.
MAX_PAYLOAD_SIZE = 4096
VRING_IDX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR u64: bits 0-7 index
VRING_NOFD_MASK = 0x100  # bit 8: no fd (polling / no notification)
VRING_F_LOG = 0x1  # SET_VRING_ADDR flags: log used ring writes at `log`
CONFIG_TYPE_FRONTEND = 0  # Config.flags
CONFIG_TYPE_MIGRATION = 1

U64_STRUCT = struct.Struct("=Q")


@dataclass(frozen=True)
class Message:
    """One whole request or reply. Owns ``fds`` once handed out: the receiver closes them.

    ``request`` is a ``Request`` (or ``BackendRequest``) member; ``payload`` is the decoded
    payload (a dataclass above, an ``int`` for u64 payloads, ``None`` when empty, ``bytes`` for
    crypto sessions). ``reply_ack`` (backend side) is True if REPLY_ACK had been negotiated on the
    connection when this message was parsed; ``ack()`` uses it.
    """

    request: int
    flags: int
    payload: Any
    fds: tuple[int, ...] = ()
    reply_ack: bool = field(default=False, compare=False)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def close_fds(self) -> None:
        """Close every fd this message carries (for handlers that do not keep them)."""
        close_all(self.fds)


def encode(request: int, flags: int, payload: bytes) -> bytes:
    """Raw message bytes with no checks at all (hostile tests build malformed input with it)."""
    return HEADER.pack(request, flags, len(payload)) + payload


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

