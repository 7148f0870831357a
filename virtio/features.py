"""Virtio feature bit numbers shared by the device side, the driver side and the vhost-user protocol.

Plain data: bit *numbers* (not masks) as module constants, plus ``bit()`` / ``mask()`` helpers and
``names()`` for printing a feature word. Any thread may use it; nothing here has state.

Sources: OASIS virtio 1.2 (sections 6 and 5.1.3) and QEMU ``docs/interop/vhost-user.rst``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "NET_HDR_LEN",
    "NET_HDR_LEN_LEGACY",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FAILED",
    "STATUS_FEATURES_OK",
    "STATUS_NEEDS_RESET",
    "VHOST_F_LOG_ALL",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_DISCARD",
    "VIRTIO_BLK_F_FLUSH",
    "VIRTIO_BLK_F_SEG_MAX",
    "VIRTIO_BLK_F_SIZE_MAX",
    "VIRTIO_BLK_F_WRITE_ZEROES",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_F_IN_ORDER",
    "VIRTIO_F_LOG_ALL",
    "VIRTIO_F_NOTIFICATION_DATA",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_ORDER_PLATFORM",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_SR_IOV",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_NET_F_CSUM",
    "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
    "VIRTIO_NET_F_CTRL_MAC_ADDR",
    "VIRTIO_NET_F_CTRL_RX",
    "VIRTIO_NET_F_CTRL_VLAN",
    "VIRTIO_NET_F_CTRL_VQ",
    "VIRTIO_NET_F_GUEST_ANNOUNCE",
    "VIRTIO_NET_F_GUEST_CSUM",
    "VIRTIO_NET_F_GUEST_ECN",
    "VIRTIO_NET_F_GUEST_TSO4",
    "VIRTIO_NET_F_GUEST_TSO6",
    "VIRTIO_NET_F_GUEST_UFO",
    "VIRTIO_NET_F_HOST_ECN",
    "VIRTIO_NET_F_HOST_TSO4",
    "VIRTIO_NET_F_HOST_TSO6",
    "VIRTIO_NET_F_HOST_UFO",
    "VIRTIO_NET_F_MAC",
    "VIRTIO_NET_F_MQ",
    "VIRTIO_NET_F_MRG_RXBUF",
    "VIRTIO_NET_F_MTU",
    "VIRTIO_NET_F_STATUS",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "bit",
    "has",
    "mask",
    "names",
    "net_hdr_len",
]

# --- transport and ring features (bit numbers) ---
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_LOG_ALL = 26  # vhost's VHOST_F_LOG_ALL: dirty-page logging for migration
VHOST_F_LOG_ALL = VIRTIO_F_LOG_ALL
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30  # gate for GET/SET_PROTOCOL_FEATURES
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38

# --- virtio-net (device type 1) ---
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

# --- virtio-blk (device type 2) ---
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# --- device status (a bit mask, not bit numbers) ---
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

# --- virtio-net header sizes ---
# {u8 flags, u8 gso_type, u16 hdr_len, u16 gso_size, u16 csum_start, u16 csum_offset}
NET_HDR_LEN_LEGACY = 10
NET_HDR_LEN = 12  # + u16 num_buffers, with VERSION_1 or MRG_RXBUF


def bit(n: int) -> int:
    """Mask of feature bit number ``n``."""
    return 1 << n


def mask(bits: Iterable[int]) -> int:
    """Mask with every bit number in ``bits`` set."""
    m = 0
    for n in bits:
        m |= 1 << n
    return m


def has(features: int, n: int) -> bool:
    """True if feature bit number ``n`` is set in the word ``features``."""
    return bool((features >> n) & 1)


def net_hdr_len(features: int) -> int:
    """Length of the virtio-net header for negotiated ``features`` (12 with VERSION_1 or MRG_RXBUF)."""
    if has(features, VIRTIO_F_VERSION_1) or has(features, VIRTIO_NET_F_MRG_RXBUF):
        return NET_HDR_LEN
    return NET_HDR_LEN_LEGACY


_GENERIC = {
    VIRTIO_F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    VIRTIO_F_LOG_ALL: "LOG_ALL",
    VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    VIRTIO_RING_F_INDIRECT_DESC: "INDIRECT_DESC",
    VIRTIO_RING_F_EVENT_IDX: "EVENT_IDX",
    VHOST_USER_F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES",
    VIRTIO_F_VERSION_1: "VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    VIRTIO_F_RING_PACKED: "RING_PACKED",
    VIRTIO_F_IN_ORDER: "IN_ORDER",
    VIRTIO_F_ORDER_PLATFORM: "ORDER_PLATFORM",
    VIRTIO_F_SR_IOV: "SR_IOV",
    VIRTIO_F_NOTIFICATION_DATA: "NOTIFICATION_DATA",
}
_NET = {
    VIRTIO_NET_F_CSUM: "CSUM",
    VIRTIO_NET_F_GUEST_CSUM: "GUEST_CSUM",
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS",
    VIRTIO_NET_F_MTU: "MTU",
    VIRTIO_NET_F_MAC: "MAC",
    VIRTIO_NET_F_GUEST_TSO4: "GUEST_TSO4",
    VIRTIO_NET_F_GUEST_TSO6: "GUEST_TSO6",
    VIRTIO_NET_F_GUEST_ECN: "GUEST_ECN",
    VIRTIO_NET_F_GUEST_UFO: "GUEST_UFO",
    VIRTIO_NET_F_HOST_TSO4: "HOST_TSO4",
    VIRTIO_NET_F_HOST_TSO6: "HOST_TSO6",
    VIRTIO_NET_F_HOST_ECN: "HOST_ECN",
    VIRTIO_NET_F_HOST_UFO: "HOST_UFO",
    VIRTIO_NET_F_MRG_RXBUF: "MRG_RXBUF",
    VIRTIO_NET_F_STATUS: "STATUS",
    VIRTIO_NET_F_CTRL_VQ: "CTRL_VQ",
    VIRTIO_NET_F_CTRL_RX: "CTRL_RX",
    VIRTIO_NET_F_CTRL_VLAN: "CTRL_VLAN",
    VIRTIO_NET_F_GUEST_ANNOUNCE: "GUEST_ANNOUNCE",
    VIRTIO_NET_F_MQ: "MQ",
    VIRTIO_NET_F_CTRL_MAC_ADDR: "CTRL_MAC_ADDR",
}
_BLK = {
    VIRTIO_BLK_F_SIZE_MAX: "SIZE_MAX",
    VIRTIO_BLK_F_SEG_MAX: "SEG_MAX",
    VIRTIO_BLK_F_BLK_SIZE: "BLK_SIZE",
    VIRTIO_BLK_F_FLUSH: "FLUSH",
    VIRTIO_BLK_F_DISCARD: "DISCARD",
    VIRTIO_BLK_F_WRITE_ZEROES: "WRITE_ZEROES",
}


def names(features: int, device: str = "net") -> list[str]:
    """Names of the bits set in ``features`` ("net" or "blk" for bits 0-23); unknown bits as ``bitN``."""
    dev = _NET if device == "net" else _BLK if device == "blk" else {}
    out = []
    n = 0
    f = features
    while f:
        if f & 1:
            out.append((dev.get(n) if n < 24 else None) or _GENERIC.get(n) or f"bit{n}")
        f >>= 1
        n += 1
    return out
