"""Driver side over a real socket: a vhost-user frontend playing the guest (tests, benchmarks).

``VhostUserFrontend`` connects to a backend's AF_UNIX socket (blocking I/O, SCM_RIGHTS via
``socket.send_fds`` / ``socket.recv_fds``), shares memfd-backed memory with it (one region, gpa 0,
uva = this process's address of the mapping), negotiates features like QEMU 7.2 (or DPDK 22.11
virtio-user with ``style="dpdk"``), sets up split rings (``virtio.driver.split.DriverQueue``),
kick and call eventfds, enables the rings and sets DRIVER_OK. It speaks the protocol through the
sans-IO ``FrontendConnection``, so every reply is checked (right request, flags exactly 0x5).

It implements virtio.transport.Transport: ``NetDriver`` (virtio.driver.net, re-exported here)
runs on top of it as on the virtio-pci transport.

Threads: one thread owns a frontend and its NetDriver (no locks). Nothing here is asyncio.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import time
from collections.abc import Sequence
from typing import Any, Self

from virtio import features as vf
from virtio.driver.net import NetDriver
from virtio.driver.split import DriverQueue
from virtio.errors import RemoteProtocolError, VhostError
from virtio.vhost_user import (
    SPECS,
    FrontendConnection,
    MemRegion,
    MemTable,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
)

__all__ = [
    "DEFAULT_FEATURES",
    "DEFAULT_PROTOCOL_FEATURES",
    "NetDriver",
    "VhostUserFrontend",
]

PF = ProtocolFeature

# What this driver implements (split rings only). Under IN_ORDER it takes descriptors in ring
# order and refuses a used entry that does not name the oldest chain in flight (DriverQueue); it
# still reads every used entry (no batched completions).
DEFAULT_FEATURES = vf.mask(
    [
        vf.VIRTIO_F_VERSION_1,
        vf.VIRTIO_F_IN_ORDER,
        vf.VHOST_USER_F_PROTOCOL_FEATURES,
        vf.VIRTIO_RING_F_EVENT_IDX,
        vf.VIRTIO_RING_F_INDIRECT_DESC,
        vf.VIRTIO_NET_F_MRG_RXBUF,
        vf.VIRTIO_NET_F_MQ,
        vf.VIRTIO_NET_F_MTU,
        vf.VIRTIO_NET_F_MAC,
        vf.VIRTIO_NET_F_STATUS,
    ]
)
DEFAULT_PROTOCOL_FEATURES = vf.mask([PF.MQ, PF.REPLY_ACK, PF.STATUS])

_PAGE = mmap.PAGESIZE
_RECV_BUF = 4096
_MAX_RECV_FDS = 16


class VhostUserFrontend:
    """A vhost-user frontend (the guest's side) over a blocking AF_UNIX socket.

    ``queues`` counts virtqueues (net: 2 per queue pair). ``features`` / ``protocol_features``
    are what the driver wants (default: DEFAULT_FEATURES / DEFAULT_PROTOCOL_FEATURES); the
    negotiated words are the intersection with what the backend offers. ``style`` picks the
    request order of a real peer: "qemu" (QEMU 7.2) or "dpdk" (DPDK 22.11 virtio-user).
    """

    def __init__(
        self,
        path: str,
        *,
        mem_size: int = 64 << 20,
        queues: int = 2,
        queue_size: int = 256,
        features: int | None = None,
        protocol_features: int | None = None,
        style: str = "qemu",
    ) -> None:
        if style not in ("qemu", "dpdk"):
            raise ValueError(f"style must be 'qemu' or 'dpdk', got {style!r}")
        if queues < 1 or queues > 256:
            raise ValueError(f"queues must be 1..256, got {queues}")
        self.path = path
        self.mem_size = (mem_size + _PAGE - 1) & ~(_PAGE - 1)
        self.num_queues = queues
        self.queue_size = queue_size
        self.wanted_features = DEFAULT_FEATURES if features is None else features
        self.wanted_protocol_features = (
            DEFAULT_PROTOCOL_FEATURES if protocol_features is None else protocol_features
        )
        self.style = style
        # negotiated state
        self.offered_features = 0
        self.features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None  # GET_QUEUE_NUM answer (queue pairs for net)
        self.status = 0
        self.last_bases: dict[int, int] = {}  # GET_VRING_BASE answers at close
        # resources
        self.sock: socket.socket | None = None
        self.conn = FrontendConnection()
        self.mem_fd = -1
        self._mm: mmap.mmap | None = None
        self.mem: memoryview = memoryview(b"")
        self.uva = 0
        self.queues: list[DriverQueue] = []
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        self._brk = 0  # bump allocator over guest memory
        self._replies: list[Message] = []
        self.timeout = 10.0
        self.sent: list[Request] = []  # every request sent, in order (tests read it)
        self.dma_base = 0  # byte 0 of `mem` is guest physical address 0 (Transport)
        self.kicks = 0  # eventfd kicks written

    # ------------------------------------------------------------------ negotiated facts
    def has_feature(self, bit: int) -> bool:
        return vf.has(self.features, bit)

    def has_pf(self, bit: int) -> bool:
        return vf.has(self.protocol_features, bit)

    @property
    def connected(self) -> bool:
        """True while the socket is up and the rings are set up (Transport)."""
        return self.sock is not None and bool(self.queues)

    @property
    def reply_ack(self) -> bool:
        return self.has_pf(PF.REPLY_ACK)

    # ------------------------------------------------------------------ life cycle
    def connect(self, timeout: float = 10.0) -> None:
        """Connect (retrying until the socket appears), negotiate, share memory, start rings."""
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() >= deadline:
                    sock.close()
                    raise VhostError(
                        f"could not connect to {self.path} within {timeout} s: {e}"
                    ) from e
                time.sleep(0.02)
        self._setup(sock)

    def accept(self, listener: socket.socket, timeout: float = 10.0) -> None:
        """Server mode (QEMU `server=on`, DPDK `server=1`): wait for the backend to dial
        `listener`, then negotiate, share memory and start rings as `connect` does."""
        self.timeout = timeout
        listener.settimeout(timeout)
        try:
            sock, _ = listener.accept()
        except TimeoutError as e:
            raise VhostError(f"no backend connected within {timeout} s") from e
        sock.settimeout(None)
        self._setup(sock)

    def adopt(self, sock: socket.socket, timeout: float = 10.0) -> None:
        """Use an already-connected socket (e.g. one end of a socketpair whose other end was
        handed to a backend with `--fd`), then negotiate, share memory and start rings."""
        self.timeout = timeout
        self._setup(sock)

    def _setup(self, sock: socket.socket) -> None:
        self.sock = sock
        try:
            self._setup_memory()
            self._negotiate()
            self._start_rings()
        except BaseException:
            self.close(graceful=False)
            raise

    def close(self, graceful: bool = True) -> None:
        """Stop the rings (GET_VRING_BASE each; SET_STATUS 0), close the socket, fds and memory.

        Idempotent. With ``graceful`` the stop requests are sent (errors are swallowed: the backend
        may be gone); the answers land in ``last_bases``.
        """
        if self.sock is not None:
            if graceful and self.queues and not self.conn.failed:
                try:
                    self._stop_rings()
                except (OSError, VhostError):
                    pass
            try:
                self.sock.close()
            finally:
                self.sock = None
        for fd in self.kick_fds + self.call_fds:
            _close(fd)
        self.kick_fds = []
        self.call_fds = []
        self.queues = []
        self.mem.release()
        self.mem = memoryview(b"")
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes when it is collected
            self._mm = None
        _close(self.mem_fd)
        self.mem_fd = -1

    def __enter__(self) -> Self:
        if self.sock is None:
            self.connect(self.timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ memory
    def _setup_memory(self) -> None:
        fd = os.memfd_create("vhostx-guest", os.MFD_CLOEXEC)
        self.mem_fd = fd
        os.ftruncate(fd, self.mem_size)
        self._mm = mmap.mmap(
            fd, self.mem_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        c = ctypes.c_char.from_buffer(self._mm)
        self.uva = ctypes.addressof(c)
        del c  # the ctypes export would keep the mmap from closing
        self.mem = memoryview(self._mm)
        self._brk = 0

    def alloc(self, size: int, align: int = 64) -> int:
        """Reserve ``size`` bytes of guest memory; returns the guest physical address."""
        gpa = (self._brk + align - 1) & ~(align - 1)
        if gpa + size > self.mem_size:
            raise VhostError(
                f"guest memory exhausted: need {size} bytes at {gpa:#x}, have {self.mem_size:#x}"
            )
        self._brk = gpa + size
        return gpa

    def gpa_to_uva(self, gpa: int) -> int:
        return self.uva + gpa

    # ------------------------------------------------------------------ messaging
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes (and fds on the first byte) as they are: hostile tests."""
        assert self.sock is not None, "not connected"
        if fds:
            n = socket.send_fds(self.sock, [data], list(fds))
            if n < len(data):
                self.sock.sendall(data[n:])
        else:
            self.sock.sendall(data)

    def _recv_reply(self, what: str) -> Message:
        assert self.sock is not None, "not connected"
        deadline = time.monotonic() + self.timeout
        while not self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VhostError(
                    f"timed out after {self.timeout} s waiting for the reply to {what}"
                )
            self.sock.settimeout(left)
            try:
                data, fds, flags, _addr = socket.recv_fds(self.sock, _RECV_BUF, _MAX_RECV_FDS)
            except TimeoutError:
                continue
            finally:
                self.sock.settimeout(None)
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    _close(fd)
                raise RemoteProtocolError(f"too many fds with the reply to {what} (truncated)")
            if not data:
                self.conn.feed(b"")  # raises if a reply was cut off
                raise RemoteProtocolError(
                    f"backend closed the connection; expected the reply to {what}"
                )
            self._replies.extend(self.conn.feed(data, fds))
        return self._replies.pop(0)

    def call(
        self,
        req: Request,
        payload: Any = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> Any:
        """Send one request and wait for what is due: the own reply's payload, or (REPLY_ACK) the
        ack, which must be 0. ``need_reply`` defaults to "REPLY_ACK negotiated". Fds that come
        with a reply (GET_INFLIGHT_FD) are closed; use ``call_msg`` to keep them."""
        msg = self.call_msg(req, payload, fds, need_reply=need_reply)
        if msg is None:
            return None
        if SPECS[req].reply is None:
            return None
        msg.close_fds()
        return msg.payload

    def call_msg(
        self,
        req: Request,
        payload: Any = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> Message | None:
        """Like ``call`` but returns the whole reply Message (None when none was due)."""
        req = Request(req)
        spec = SPECS[req]
        if need_reply is None:
            need_reply = self.reply_ack and spec.reply is None
        data = self.conn.request(req, payload, fds, need_reply=need_reply)
        self.send_raw(data, fds)
        self.sent.append(req)
        if spec.reply is None and not need_reply:
            return None
        msg = self._recv_reply(req.name)
        if spec.reply is None and msg.payload != 0:
            raise VhostError(f"backend refused {req.name}: REPLY_ACK status {msg.payload}")
        return msg

    # ------------------------------------------------------------------ negotiation
    def _negotiate(self) -> None:
        if self.style == "dpdk":
            self.call(Request.SET_OWNER)
        self.offered_features = self.call(Request.GET_FEATURES)
        self.features = self.wanted_features & self.offered_features
        if self.has_feature(vf.VHOST_USER_F_PROTOCOL_FEATURES):
            self.offered_protocol_features = self.call(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = self.wanted_protocol_features & self.offered_protocol_features
            # sent before REPLY_ACK is in force: never with NEED_REPLY
            self.call(Request.SET_PROTOCOL_FEATURES, self.protocol_features, need_reply=False)
            if self.has_pf(PF.MQ):
                self.queue_num = self.call(Request.GET_QUEUE_NUM)
                pairs = (self.num_queues + 1) // 2
                if self.queue_num < pairs:
                    raise VhostError(
                        f"backend supports {self.queue_num} queue pairs, {pairs} wanted"
                    )
        else:
            self.protocol_features = 0
        if self.num_queues > 2 and not self.has_feature(vf.VIRTIO_NET_F_MQ):
            raise VhostError(f"{self.num_queues} queues need VIRTIO_NET_F_MQ, not offered/wanted")
        if self.style == "qemu":
            self.call(Request.SET_OWNER)
        self.call(Request.SET_FEATURES, self.features)
        if self.has_pf(PF.STATUS):
            if self.style == "qemu":
                self._add_status(vf.STATUS_FEATURES_OK)
            else:
                self._set_status(vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER | vf.STATUS_FEATURES_OK)
        region = MemRegion(gpa=0, size=self.mem_size, uva=self.uva, mmap_offset=0)
        self.call(Request.SET_MEM_TABLE, MemTable((region,)), [self.mem_fd])

    def _set_status(self, status: int) -> None:
        self.call(Request.SET_STATUS, status)
        self.status = status

    def _add_status(self, bits: int) -> None:
        """QEMU 7.2 vhost_user_add_status: GET_STATUS, then SET_STATUS(old | bits) if needed."""
        cur = self.call(Request.GET_STATUS)
        if cur & bits != bits:
            self._set_status(cur | bits)
        else:
            self.status = cur

    def _start_rings(self) -> None:
        event_idx = self.has_feature(vf.VIRTIO_RING_F_EVENT_IDX)
        in_order = self.has_feature(vf.VIRTIO_F_IN_ORDER)
        for i in range(self.num_queues):
            _, _, _, total = DriverQueue.layout(self.queue_size)
            gpa = self.alloc(total, _PAGE)
            q = DriverQueue(self.mem[gpa : gpa + total], gpa, self.queue_size, event_idx=event_idx,
                            in_order=in_order)
            self.queues.append(q)
            self.kick_fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.call_fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        if self.style == "dpdk":
            # DPDK sends every SET_VRING_CALL before any ring is started
            for i in range(self.num_queues):
                self.call(Request.SET_VRING_CALL, VringFile(i), [self.call_fds[i]])
        for i, q in enumerate(self.queues):
            self.call(Request.SET_VRING_NUM, VringState(i, self.queue_size))
            self.call(Request.SET_VRING_BASE, VringState(i, 0))
            self.call(
                Request.SET_VRING_ADDR,
                VringAddr(
                    index=i,
                    flags=0,
                    desc=self.gpa_to_uva(q.desc_gpa),
                    used=self.gpa_to_uva(q.used_gpa),
                    avail=self.gpa_to_uva(q.avail_gpa),
                    log=0,
                ),
            )
            self.call(Request.SET_VRING_KICK, VringFile(i), [self.kick_fds[i]])
            if self.style == "qemu":
                self.call(Request.SET_VRING_CALL, VringFile(i), [self.call_fds[i]])
        if self.has_feature(vf.VHOST_USER_F_PROTOCOL_FEATURES):
            for i in range(self.num_queues):
                self.call(Request.SET_VRING_ENABLE, VringState(i, 1))
        if self.has_pf(PF.STATUS):
            ok = vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER | vf.STATUS_FEATURES_OK
            if self.style == "qemu":
                self._add_status(ok | vf.STATUS_DRIVER_OK)
            else:
                self._set_status(ok | vf.STATUS_DRIVER_OK)
        if not self.reply_ack:
            # no acks: GET_FEATURES is the barrier QEMU uses to know the backend caught up
            self.call(Request.GET_FEATURES)

    def _stop_rings(self) -> None:
        if self.has_pf(PF.STATUS):
            self.call(Request.SET_STATUS, 0)
            self.status = 0
        for i in range(len(self.queues)):
            st = self.call(Request.GET_VRING_BASE, VringState(i, 0))
            self.last_bases[i] = st.num

    # ------------------------------------------------------------------ data path helpers
    def kick(self, index: int) -> None:
        os.eventfd_write(self.kick_fds[index], 1)
        self.kicks += 1

    def wait_call(self, index: int, timeout: float) -> bool:
        """Wait for an interrupt on queue ``index``; True if one came (the eventfd is drained)."""
        fd = self.call_fds[index]
        if _drain(fd):
            return True
        r, _, _ = select.select([fd], [], [], max(0.0, timeout))
        return bool(r) and _drain(fd)


def _drain(fd: int) -> bool:
    try:
        os.eventfd_read(fd)
        return True
    except BlockingIOError:
        return False


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
