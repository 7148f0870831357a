"""vhost-user payload layouts and codecs: one frozen dataclass per C struct, one ``Codec`` per
payload kind (size rules, decode, encode) and ``Spec``, the row type of the request tables.

``virtio.vhost_user`` re-exports the public names and holds the tables (``SPECS``,
``BACKEND_SPECS``) built from these codecs. Pure data: any thread.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from virtio.vhost_user_wire import (
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
)
from virtio.vhost_user_wire import U64_STRUCT as _U64

__all__ = [
    "ACK",
    "ADDR",
    "AREA",
    "CONFIG",
    "EMPTY_OR_U64",
    "FILE",
    "INFLIGHT",
    "IOTLB",
    "LOG",
    "MEMTABLE",
    "NONE",
    "POSTED_IRQ",
    "RAW",
    "SINGLE",
    "STATE",
    "U64",
    "Codec",
    "Config",
    "Inflight",
    "IotlbMsg",
    "Log",
    "MemRegion",
    "MemTable",
    "PostedIrq",
    "SingleMemRegion",
    "Spec",
    "VringAddr",
    "VringArea",
    "VringFile",
    "VringState",
    "memtable_check",
    "memtable_fds",
    "vring_file_fds",
]


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


class Codec:
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


NONE = Codec("empty", size=0, decode=lambda d: None, encode=lambda p: b"", pytype=type(None))
U64 = Codec("u64", size=8, decode=lambda d: _U64.unpack(d)[0], encode=_enc_u64, pytype=int)


def _struct_codec(cls: Any) -> Codec:
    return Codec(
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
MEMTABLE = Codec(
    "MemTable",
    min_size=8 + MemRegion.SIZE,
    max_size=8 + MemRegion.SIZE * MAX_MEM_REGIONS,
    decode=MemTable.unpack,
    encode=lambda p: p.pack(),
    pytype=MemTable,
)
CONFIG = Codec(
    "Config",
    min_size=12,
    max_size=12 + MAX_CONFIG_SIZE,
    decode=Config.unpack,
    encode=lambda p: p.pack(),
    pytype=Config,
)
RAW = Codec("raw bytes", decode=bytes, encode=bytes, pytype=(bytes, bytearray, memoryview))
# SET_LOG_BASE reply: DPDK replies with size 0, the spec says u64; accept both.
EMPTY_OR_U64 = Codec(
    "empty or u64",
    min_size=0,
    max_size=8,
    decode=lambda d: _U64.unpack(d)[0] if len(d) == 8 else None,
    encode=lambda p: b"" if p is None else _enc_u64(p),
    pytype=(int, type(None)),
    sizes=(0, 8),
)


def memtable_fds(p: Any) -> int:
    return len(p.regions)


def vring_file_fds(p: Any) -> int:
    return 0 if p.nofd else 1


def memtable_check(p: Any) -> str | None:
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

    payload: Codec
    fds: tuple[int, int] = (0, 0)
    reply: Codec | None = None
    reply_fds: tuple[int, int] = (0, 0)
    fd_count: Callable[[Any], int] | None = None
    discard_fds: bool = False
    check: Callable[[Any], str | None] | None = None

    @property
    def has_reply(self) -> bool:
        return self.reply is not None


ACK = U64  # REPLY_ACK answer: u64 0 = success, nonzero = failure
