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

Wire format (native byte order)::

    struct vhost_user_msg {
        u32 request;   /* Request / BackendRequest */
        u32 flags;     /* bits 0-1 version (== 1), bit 2 REPLY, bit 3 NEED_REPLY */
        u32 size;      /* payload bytes that follow */
        u8  payload[size];
    };
"""

from __future__ import annotations

import collections
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from virtio.errors import RemoteProtocolError

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
    "encode",
    "protocol_features_mask",
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


VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
_FLAGS_KNOWN = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
REPLY_FLAGS = VERSION | FLAG_REPLY  # exactly 0x5: DPDK 22.11 virtio-user rejects anything else
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12
MAX_MEM_REGIONS = 8  # without CONFIGURE_MEM_SLOTS; also the SCM_RIGHTS limit QEMU uses
MAX_CONFIG_SIZE = 256
# Largest defined payloads: SET_MEM_TABLE 8 + 32*8 = 264, GET/SET_CONFIG 12 + 256 = 268, crypto
# sessions a few hundred bytes. Anything larger is garbage and refused as soon as the header is in.
MAX_PAYLOAD_SIZE = 4096
VRING_IDX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR u64: bits 0-7 index
VRING_NOFD_MASK = 0x100  # bit 8: no fd (polling / no notification)
VRING_F_LOG = 0x1  # SET_VRING_ADDR flags: log used ring writes at `log`
CONFIG_TYPE_FRONTEND = 0  # Config.flags
CONFIG_TYPE_MIGRATION = 1

_U64 = struct.Struct("=Q")


def _name(req: int, enum: type[IntEnum] = Request) -> str:
    try:
        return f"{enum(req).name} ({req})"
    except ValueError:
        return f"unknown request {req}"


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class VringState:
    """``struct vhost_vring_state { u32 index; u32 num; }`` (8 bytes).

    SET_VRING_NUM, SET/GET_VRING_BASE, SET_VRING_ENABLE, SET_VRING_ENDIAN, VRING_KICK and the
    GET_VRING_BASE reply. For packed rings ``num`` bits 0-14 are the index, bit 15 the wrap counter.
    """

    index: int
    num: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")
    SIZE: ClassVar[int] = 8

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr`` (40 bytes)::

        struct { u32 index; u32 flags;      /* VRING_F_LOG */
                 u64 desc;  u64 used; u64 avail;   /* note: used before avail */
                 u64 log; }

    Addresses are frontend virtual addresses (translate through MemRegion.uva). For packed rings
    ``avail`` carries the driver area and ``used`` the device area.
    """

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    SIZE: ClassVar[int] = 40

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True)
class MemRegion:
    """``struct vhost_user_memory_region { u64 guest_phys_addr; u64 memory_size;
    u64 userspace_addr; u64 mmap_offset; }`` (32 bytes)."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")
    SIZE: ClassVar[int] = 32

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.gpa, self.size, self.uva, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> MemRegion:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True)
class MemTable:
    """``struct vhost_user_memory { u32 nregions; u32 padding; region regions[nregions]; }``.

    On the wire the payload is exactly ``8 + 32 * nregions`` bytes (QEMU and DPDK send only the
    used regions), 1 <= nregions <= 8, and the message carries one fd per region, in order.
    """

    regions: tuple[MemRegion, ...]

    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))

    def pack(self) -> bytes:
        return self.HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemTable:
        n, _pad = cls.HEAD.unpack_from(data)
        if len(data) != 8 + MemRegion.SIZE * n:
            raise ValueError(
                f"memory table of {n} regions needs {8 + 32 * n} bytes, got {len(data)}"
            )
        return cls(tuple(MemRegion.unpack(data[8 + 32 * i : 40 + 32 * i]) for i in range(n)))


@dataclass(frozen=True)
class SingleMemRegion:
    """``struct { u64 padding; struct vhost_user_memory_region region; }`` (40 bytes):
    ADD_MEM_REG (one fd) and REM_MEM_REG."""

    region: MemRegion

    SIZE: ClassVar[int] = 40

    def pack(self) -> bytes:
        return _U64.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> SingleMemRegion:
        return cls(MemRegion.unpack(data[8:40]))


@dataclass(frozen=True)
class Config:
    """``struct vhost_user_config { u32 offset; u32 size; u32 flags; u8 payload[size]; }``.

    ``size`` <= 256 and equals ``len(payload)``; the message is exactly ``12 + size`` bytes.
    GET_CONFIG requests carry ``size`` zero bytes that the reply fills in.
    """

    offset: int
    size: int
    flags: int
    payload: bytes

    HEAD: ClassVar[struct.Struct] = struct.Struct("=III")

    def __post_init__(self) -> None:
        object.__setattr__(self, "payload", bytes(self.payload))
        if self.size != len(self.payload):
            raise ValueError(
                f"Config.size is {self.size} but the payload has {len(self.payload)} bytes"
            )
        if self.size > MAX_CONFIG_SIZE:
            raise ValueError(f"Config.size must be <= {MAX_CONFIG_SIZE}, got {self.size}")

    def pack(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> Config:
        offset, size, flags = cls.HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise ValueError(f"config size field must be <= {MAX_CONFIG_SIZE}, got {size}")
        if len(data) != 12 + size:
            raise ValueError(f"config of size {size} needs {12 + size} bytes, got {len(data)}")
        return cls(offset, size, flags, data[12:])


@dataclass(frozen=True)
class Inflight:
    """``struct vhost_user_inflight { u64 mmap_size; u64 mmap_offset; u16 num_queues;
    u16 queue_size; }`` -- 24 bytes with the C tail padding, as QEMU sends it (sizeof)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")
    SIZE: ClassVar[int] = 24

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes) -> Inflight:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True)
class PostedIrq:
    """VHOSTX_SET_POSTED_IRQ (a vhostx extension, docs/interrupts.md), 64 bytes::

        struct vhostx_posted_irq {
            u64 mmap_size;    /* bytes of the notification area fd to map */
            u64 mmap_offset;  /* where the mapping starts in that fd (page aligned) */
            u64 desc_offset;  /* the domain's 64-byte descriptor inside the mapping */
            u32 domain;       /* the interrupt domain's number (a driver thread) */
            u32 flags;        /* 0 */
            u64 queues[4];    /* bit i: vring i posts to this domain, as request bit i */
        };

    Two fds travel with it: the area (a memfd) and the domain's wake eventfd.
    """

    mmap_size: int
    mmap_offset: int
    desc_offset: int
    domain: int
    flags: int
    queues: int  # the 256-bit queue bitmap as one integer

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQII4Q")
    SIZE: ClassVar[int] = 64

    def pack(self) -> bytes:
        words = [(self.queues >> (64 * i)) & (2**64 - 1) for i in range(4)]
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset, self.desc_offset, self.domain,
                                self.flags, *words)

    @classmethod
    def unpack(cls, data: bytes) -> PostedIrq:
        size, off, desc, domain, flags, *words = cls.STRUCT.unpack(data)
        queues = sum(w << (64 * i) for i, w in enumerate(words))
        return cls(size, off, desc, domain, flags, queues)

    def queue_indices(self) -> list[int]:
        return [i for i in range(256) if self.queues >> i & 1]


@dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR (8 bytes).

    Bits 0-7: queue index; bit 8 (VRING_NOFD_MASK): no fd is attached (polling mode). Other bits
    must be zero. Exactly one fd travels with the message unless ``nofd``.
    """

    index: int
    nofd: bool = False

    SIZE: ClassVar[int] = 8

    def pack(self) -> bytes:
        if not 0 <= self.index <= VRING_IDX_MASK:
            raise ValueError(f"vring index must be 0..255, got {self.index}")
        return _U64.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0))

    @classmethod
    def unpack(cls, data: bytes) -> VringFile:
        (u,) = _U64.unpack(data)
        if u & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ValueError(f"vring file u64 may only use bits 0-8, got {u:#x}")
        return cls(u & VRING_IDX_MASK, bool(u & VRING_NOFD_MASK))


@dataclass(frozen=True)
class Log:
    """``struct vhost_user_log { u64 mmap_size; u64 mmap_offset; }`` (16 bytes): SET_LOG_BASE,
    with the log shm fd when LOG_SHMFD was negotiated."""

    mmap_size: int
    mmap_offset: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> Log:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True)
class IotlbMsg:
    """``struct vhost_iotlb_msg { u64 iova; u64 size; u64 uaddr; u8 perm; u8 type; }`` (32 bytes
    with the C tail padding)."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")
    SIZE: ClassVar[int] = 32

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def unpack(cls, data: bytes) -> IotlbMsg:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True)
class VringArea:
    """``struct vhost_user_vring_area { u64 u64; u64 size; u64 offset; }`` (24 bytes):
    backend request VRING_HOST_NOTIFIER_MSG. ``u64`` holds the index and VRING_NOFD_MASK."""

    u64: int
    size: int
    offset: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQ")
    SIZE: ClassVar[int] = 24

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.u64, self.size, self.offset)

    @classmethod
    def unpack(cls, data: bytes) -> VringArea:
        return cls(*cls.STRUCT.unpack(data))


# --------------------------------------------------------------------------- codecs


class _Codec:
    """How one payload kind maps between bytes and a Python value, and which sizes are legal."""

    def __init__(
        self,
        name: str,
        *,
        size: int | None = None,
        min_size: int = 0,
        max_size: int = MAX_PAYLOAD_SIZE,
        decode: Callable[[bytes], Any],
        encode: Callable[[Any], bytes],
        pytype: type | tuple[type, ...],
        sizes: tuple[int, ...] | None = None,
    ) -> None:
        self.name = name
        self.sizes = sizes  # if set: the only legal sizes
        self.size = size  # exact size, or None: variable in [min_size, max_size]
        self.min_size = size if size is not None else min_size
        self.max_size = size if size is not None else max_size
        self._decode = decode
        self._encode = encode
        self.pytype = pytype

    def size_rule(self) -> str:
        if self.sizes is not None:
            return " or ".join(str(n) for n in self.sizes) + " bytes"
        if self.size is not None:
            return f"exactly {self.size} bytes"
        return f"{self.min_size}..{self.max_size} bytes"

    def check_size(self, size: int) -> str | None:
        """None if ``size`` may be legal for this payload, else the expectation."""
        if self.sizes is not None:
            ok = size in self.sizes
        else:
            ok = self.min_size <= size <= self.max_size
        if ok:
            return None
        return f"a {self.name} payload of {self.size_rule()}"

    def decode(self, data: bytes) -> Any:
        return self._decode(data)

    def encode(self, payload: Any) -> bytes:
        if not isinstance(payload, self.pytype) or (
            isinstance(payload, bool) and self.pytype is int
        ):
            raise TypeError(f"expected a {self.name} payload, got {type(payload).__name__}")
        data = self._encode(payload)
        err = self.check_size(len(data))
        if err is not None:
            raise ValueError(f"payload encodes to {len(data)} bytes; expected {err}")
        return data


def _enc_u64(v: int) -> bytes:
    if not 0 <= v < 1 << 64:
        raise ValueError(f"u64 payload out of range: {v}")
    return _U64.pack(v)


NONE = _Codec("empty", size=0, decode=lambda d: None, encode=lambda p: b"", pytype=type(None))
U64 = _Codec("u64", size=8, decode=lambda d: _U64.unpack(d)[0], encode=_enc_u64, pytype=int)


def _struct_codec(cls: Any) -> _Codec:
    return _Codec(
        cls.__name__, size=cls.SIZE, decode=cls.unpack, encode=lambda p: p.pack(), pytype=cls
    )


STATE = _struct_codec(VringState)
ADDR = _struct_codec(VringAddr)
FILE = _struct_codec(VringFile)
SINGLE = _struct_codec(SingleMemRegion)
INFLIGHT = _struct_codec(Inflight)
POSTED_IRQ = _struct_codec(PostedIrq)
LOG = _struct_codec(Log)
IOTLB = _struct_codec(IotlbMsg)
AREA = _struct_codec(VringArea)
MEMTABLE = _Codec(
    "MemTable",
    min_size=8 + MemRegion.SIZE,
    max_size=8 + MemRegion.SIZE * MAX_MEM_REGIONS,
    decode=MemTable.unpack,
    encode=lambda p: p.pack(),
    pytype=MemTable,
)
CONFIG = _Codec(
    "Config",
    min_size=12,
    max_size=12 + MAX_CONFIG_SIZE,
    decode=Config.unpack,
    encode=lambda p: p.pack(),
    pytype=Config,
)
RAW = _Codec("raw bytes", decode=bytes, encode=bytes, pytype=(bytes, bytearray, memoryview))
# SET_LOG_BASE reply: DPDK replies with size 0, the spec says u64; accept both.
EMPTY_OR_U64 = _Codec(
    "empty or u64",
    min_size=0,
    max_size=8,
    decode=lambda d: _U64.unpack(d)[0] if len(d) == 8 else None,
    encode=lambda p: b"" if p is None else _enc_u64(p),
    pytype=(int, type(None)),
    sizes=(0, 8),
)


def _memtable_fds(p: Any) -> int:
    return len(p.regions)


def _vring_file_fds(p: Any) -> int:
    return 0 if p.nofd else 1


def _memtable_check(p: Any) -> str | None:
    n = len(p.regions)
    if not 1 <= n <= MAX_MEM_REGIONS:
        return f"1..{MAX_MEM_REGIONS} memory regions, got {n}"
    return None


@dataclass(frozen=True)
class Spec:
    """How one request travels.

    payload: codec of the request payload (its size rule: ``payload.size_rule()``).
    fds: (min, max) fds that may come with the request; ``fd_count`` (if set) gives the exact
        number from the decoded payload (SET_MEM_TABLE: nregions; KICK/CALL/ERR: 0 if NOFD else 1).
    reply: codec of the request's own reply, or None (then NEED_REPLY + REPLY_ACK gives a u64 ack).
    reply_fds: (min, max) fds that come with the own reply.
    discard_fds: the spec says to close fds that come with this request unused (REM_MEM_REG);
        the connection closes them and hands out the message with ``fds == ()``.
    check: extra payload validation; returns None or what was expected.
    """

    payload: _Codec
    fds: tuple[int, int] = (0, 0)
    reply: _Codec | None = None
    reply_fds: tuple[int, int] = (0, 0)
    fd_count: Callable[[Any], int] | None = None
    discard_fds: bool = False
    check: Callable[[Any], str | None] | None = None

    @property
    def has_reply(self) -> bool:
        return self.reply is not None


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

_ACK = U64  # REPLY_ACK answer: u64 0 = success, nonzero = failure


# --------------------------------------------------------------------------- messages


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
        _close_all(self.fds)


def encode(request: int, flags: int, payload: bytes) -> bytes:
    """Raw message bytes with no checks at all (hostile tests build malformed input with it)."""
    return HEADER.pack(request, flags, len(payload)) + payload


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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

    def _payload_codec(self, spec: Spec) -> _Codec:  # pragma: no cover
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
            if flags & ~_FLAGS_KNOWN:
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

    def _payload_codec(self, spec: Spec) -> _Codec:
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
        self._due: collections.deque[tuple[Request, _Codec, tuple[int, int]]] = collections.deque()

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

    def _payload_codec(self, spec: Spec) -> _Codec:
        return self._due[0][1]

    def _fd_range(self, spec: Spec) -> tuple[int, int]:
        return self._due[0][2]

    def _make(self, request: int, flags: int, payload: Any, fds: tuple[int, ...]) -> Message:
        self._due.popleft()
        return Message(Request(request), flags, payload, fds)
