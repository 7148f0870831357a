"""virtio-net data-path operations over DeviceQueues, each one C call per batch.

rx/tx are named from the guest's side: the device consumes TX chains and fills RX chains. Every
operation returns the packets (TX chains or RX frames) it handled, >= 0, and raises GuestError
when the queue it serves breaks. RX queues written here are completed inside the call (used
entries published, interrupt decided).

spin_ns (every operation, keyword, default 0): bounded busy-poll inside the one C call. When the
ring the call serves runs empty before the budget is used up, and the call has already done some
work, the call publishes its used entries and decides its interrupts, then keeps re-reading
avail->idx; the time it waits on an empty ring is at most spin_ns in total per call. A call that
finds its ring empty at the start returns at once (idle queues cost no CPU). The GIL is released
for the whole call (cffi).

Threads: the worker that owns the TX queue calls tx_sink/echo/fwd/tx_to_fd/Switch.tx; the worker
that owns the RX queue calls rx_fill/rx_from_fd. fwd and Switch write other devices' RX queues
under the C queue lock, so several workers may feed one RX queue; so do the two Ops of a shared
RX ring (Op.rx_fill and Op.echo with shared=True: a `source` port's echo_tx).
"""

from __future__ import annotations

from collections.abc import Sequence

from virtio._vx_core import ffi, lib
from virtio.errors import ConfigError, GuestError
from virtio.kick import Round, RoundBroken, now_ns
from virtio.ring import DeviceQueue

__all__ = [
    "Op",
    "Round",
    "RoundBroken",
    "Switch",
    "echo",
    "fwd",
    "now_ns",
    "rx_fill",
    "rx_from_fd",
    "tx_sink",
    "tx_to_fd",
]

_U64_MAX = 2**64 - 1


def _check(r: int, q: DeviceQueue, op: str) -> int:
    if r < 0:
        raise GuestError(f"{op} on queue {q.index}: {q.broken or 'queue broken'}")
    return r


def _budget(max_pkts: int, max_bytes: int) -> tuple[int, int]:
    if max_pkts < 0 or max_bytes < 0:
        raise ConfigError(f"budgets must be >= 0, got max_pkts={max_pkts} max_bytes={max_bytes}")
    return min(max_pkts, 0xFFFFFFFF), min(max_bytes, _U64_MAX)


def _spin(spin_ns: int) -> int:
    if spin_ns < 0:
        raise ConfigError(f"spin_ns must be >= 0, got {spin_ns}")
    return min(spin_ns, _U64_MAX)


def tx_sink(tx: DeviceQueue, max_pkts: int, max_bytes: int, *, spin_ns: int = 0) -> int:
    """Copy each TX packet (header excluded) out of the guest, count it, drop it.

    The copy goes to a rotating set of 64 x 2 KiB buffers per thread, like the mbufs a DPDK
    backend's mempool cache hands out again burst after burst.
    """
    p, b = _budget(max_pkts, max_bytes)
    return _check(lib.vx_net_tx_sink(tx.c_queue, p, b, _spin(spin_ns)), tx, "tx_sink")


def rx_fill(rx: DeviceQueue, frame: bytes, max_pkts: int, *, spin_ns: int = 0) -> int:
    """Write `frame` (a zero net header is prepended) into RX buffers up to max_pkts times."""
    p, _ = _budget(max_pkts, 0)
    buf = ffi.from_buffer("uint8_t[]", frame)
    return _check(lib.vx_net_rx_fill(rx.c_queue, buf, len(frame), p, _spin(spin_ns)), rx, "rx_fill")


def echo(
    tx: DeviceQueue, rx: DeviceQueue, max_pkts: int, max_bytes: int, *, spin_ns: int = 0
) -> int:
    """TX packets back into RX of the same device with destination and source MACs swapped."""
    p, b = _budget(max_pkts, max_bytes)
    r = lib.vx_net_echo(tx.c_queue, rx.c_queue, p, b, _spin(spin_ns))
    if r < 0:
        q = tx if tx.broken else rx
        raise GuestError(f"echo on queue {q.index}: {q.broken or 'queue broken'}")
    return int(r)


def fwd(
    tx: DeviceQueue, rx: DeviceQueue, max_pkts: int, max_bytes: int, *, spin_ns: int = 0
) -> int:
    """Guest-to-guest copy from TX chains straight into another guest's RX chains.

    No RX buffer: the packet is dropped (rx ring_full, tx dropped), so a slow receiver never
    stalls the sender. A broken RX queue drops packets; only a broken TX queue raises.
    """
    p, b = _budget(max_pkts, max_bytes)
    return _check(lib.vx_net_fwd(tx.c_queue, rx.c_queue, p, b, _spin(spin_ns)), tx, "fwd")


def tx_to_fd(tx: DeviceQueue, fd: int, max_pkts: int, max_bytes: int, *, spin_ns: int = 0) -> int:
    """writev each TX packet, net header included, to a non-blocking (TAP) fd; EAGAIN stops
    (and is never waited on: spin_ns only waits for the TX ring)."""
    p, b = _budget(max_pkts, max_bytes)
    return _check(lib.vx_net_tx_to_fd(tx.c_queue, fd, p, b, _spin(spin_ns)), tx, "tx_to_fd")


def rx_from_fd(rx: DeviceQueue, fd: int, max_pkts: int, *, spin_ns: int = 0) -> int:
    """Read packets (net header included) from a non-blocking fd into RX buffers; EAGAIN stops.

    spin_ns waits only for RX buffers (the driver's refill), never for the fd.
    """
    p, _ = _budget(max_pkts, 0)
    return _check(lib.vx_net_rx_from_fd(rx.c_queue, fd, p, _spin(spin_ns)), rx, "rx_from_fd")


_OP_KINDS = frozenset(
    int(getattr(lib, k)) for k in dir(lib) if k.startswith("VX_OP_")
)


class Op:
    """One of the operations above as data (a C `struct vx_op`): the same C call, made either
    alone (`run`, like the functions above), as the batch of a kicked queue (virtio.kick
    .KickQueue) or as one of many in a worker's C poll round (virtio.kick.Round, re-exported
    here with RoundBroken and now_ns). Build it with the class methods; it keeps alive
    everything its C struct points to (queues, frame buffer, switch).

    Threads: like the function it stands for (the worker owning the served ring runs it).
    """

    __slots__ = ("_c", "_keep", "kind", "name", "peer", "queue")

    def __init__(self, kind: int, name: str, queue: DeviceQueue, *, peer: DeviceQueue | None = None,
                 fd: int = -1, frame: bytes | None = None, switch: Switch | None = None,
                 port: int = -1) -> None:  # fmt: skip
        if kind not in _OP_KINDS:
            raise ConfigError(f"unknown operation kind {kind}; allowed: {sorted(_OP_KINDS)}")
        c = ffi.new("struct vx_op *")
        c.kind = kind
        c.vq = queue.c_queue
        c.fd = fd
        c.port = port
        keep: list[object] = [queue]
        if peer is not None:
            c.peer = peer.c_queue
            keep.append(peer)
        if frame is not None:
            buf = ffi.new("uint8_t[]", max(len(frame), 1))
            ffi.memmove(buf, frame, len(frame))
            c.frame = buf
            c.frame_len = len(frame)
            keep.append(buf)
        if switch is not None:
            c.sw = switch._sw
            keep.append(switch)
        c.max_pkts, c.max_bytes = 256, 524288
        self._c = c
        self._keep = keep
        self.kind = kind
        self.name = name
        self.queue = queue
        self.peer = peer

    @classmethod
    def tx_sink(cls, tx: DeviceQueue) -> Op:
        return cls(lib.VX_OP_TX_SINK, "tx_sink", tx)

    @classmethod
    def rx_fill(cls, rx: DeviceQueue, frame: bytes, rate_pps: int = 0, *,
                shared: bool = False) -> Op:  # fmt: skip
        """`rate_pps` > 0: paced, at most that many frames per second (struct vx_op).
        `shared`: an echo op (echo(..., shared=True)) writes `rx` too, from another thread."""
        op = cls(lib.VX_OP_RX_FILL, "rx_fill", rx, frame=frame)
        if not 0 <= rate_pps < 2**64:
            raise ConfigError(f"rx_fill rate_pps: allowed 0..2**64-1, got {rate_pps}")
        op._c.rate_pps = rate_pps
        if shared:
            op._share_rx(rx)
        return op

    @classmethod
    def echo(cls, tx: DeviceQueue, rx: DeviceQueue, *, shared: bool = False) -> Op:
        """`shared`: an rx_fill op (rx_fill(..., shared=True)) writes `rx` too, from another
        thread (a `source` port's echo_tx)."""
        op = cls(lib.VX_OP_ECHO, "echo", tx, peer=rx)
        if shared:
            op._share_rx(rx)
        return op

    def _share_rx(self, rx: DeviceQueue) -> None:
        # Every write of the RX ring by this op, and its owner's pending / set_notify / signal /
        # busy-poll, take the ring's lock from now on (vx_vq_set_shared): set before either op
        # runs (the control thread builds the works before attaching them).
        lib.vx_vq_set_shared(rx.c_queue, 1)
        self._c.shared_rx = 1

    @classmethod
    def fwd(cls, tx: DeviceQueue, rx: DeviceQueue) -> Op:
        return cls(lib.VX_OP_FWD, "fwd", tx, peer=rx)

    @classmethod
    def tx_to_fd(cls, tx: DeviceQueue, fd: int) -> Op:
        return cls(lib.VX_OP_TX_TO_FD, "tx_to_fd", tx, fd=fd)

    @classmethod
    def rx_from_fd(cls, rx: DeviceQueue, fd: int) -> Op:
        return cls(lib.VX_OP_RX_FROM_FD, "rx_from_fd", rx, fd=fd)

    @classmethod
    def switch_tx(cls, switch: Switch, port: int, tx: DeviceQueue) -> Op:
        if port not in switch._ports:
            raise ConfigError(f"switch port {port} is not attached (ports: {switch.ports})")
        return cls(lib.VX_OP_SWITCH_TX, "switch tx", tx, switch=switch, port=port)

    @property
    def c_op(self) -> object:
        """The cffi `struct vx_op *` (for Round)."""
        return self._c

    def set_budget(self, max_pkts: int, max_bytes: int) -> None:
        """The batch budget this op gets in each pass of a Round."""
        self._c.max_pkts, self._c.max_bytes = _budget(max_pkts, max_bytes)

    def run(self, max_pkts: int, max_bytes: int, spin_ns: int = 0) -> int:
        """One batch, exactly like the function of the same name; GuestError if a ring broke."""
        p, b = _budget(max_pkts, max_bytes)
        r = lib.vx_op_run(self._c, p, b, _spin(spin_ns))
        if r < 0:
            raise self.error() if r == -1 else GuestError(f"{self.name}: operation failed ({r})")
        return int(r)

    def error(self) -> GuestError:
        """The GuestError of a failed batch: which of its rings broke (the served one first)."""
        q = self.queue
        if not q.broken and self.peer is not None and self.peer.broken:
            q = self.peer
        return GuestError(f"{self.name} on queue {q.index}: {q.broken or 'queue broken'}")

    def results(self) -> tuple[int, int, int, int, int]:
        """What the last Round did with this op: (batches, found, full, packets, last_work_ns)."""
        c = self._c
        return int(c.batches), int(c.found), int(c.full), int(c.pkts), int(c.last_work_ns)


class Switch:
    """L2 learning switch: FDB in C, flooding of broadcast/multicast/unknown, per-RX-queue locks.

    add_port/remove_port are called by the control thread; tx by the worker owning that TX queue.
    The switch keeps every RX DeviceQueue it was given alive until it is closed.
    """

    MAX_PORTS = int(lib.VX_SWITCH_MAX_PORTS)
    MAX_RXQ = int(lib.VX_SWITCH_MAX_RXQ)

    def __init__(self) -> None:
        sw = lib.vx_switch_new()
        if sw == ffi.NULL:
            raise MemoryError("cannot allocate the switch")
        self._sw = ffi.gc(sw, lib.vx_switch_free)
        self._stats = lib.vx_switch_stats(self._sw)
        self._ports: dict[int, list[DeviceQueue]] = {}
        self._retired: list[list[DeviceQueue]] = []  # C may have held pointers to these

    def add_port(self, rx: list[DeviceQueue]) -> int:
        """Attach a port delivering into the given RX queues (flow hash picks one); its id."""
        if not 1 <= len(rx) <= self.MAX_RXQ:
            raise ConfigError(f"switch port rx queues: want 1..{self.MAX_RXQ}, got {len(rx)}")
        arr = ffi.new("struct vx_vq *[]", [q.c_queue for q in rx])
        port = lib.vx_switch_add_port(self._sw, arr, len(rx))
        if port < 0:
            raise ConfigError(f"switch ports: at most {self.MAX_PORTS}, all in use")
        self._ports[port] = list(rx)
        return int(port)

    def remove_port(self, port: int) -> None:
        """Detach a port; after return no sender writes into its RX queues."""
        if port not in self._ports or lib.vx_switch_remove_port(self._sw, port) < 0:
            raise ConfigError(f"switch port {port} is not attached (ports: {sorted(self._ports)})")
        self._retired.append(self._ports.pop(port))

    def tx(
        self, port: int, tx: DeviceQueue, max_pkts: int, max_bytes: int, *, spin_ns: int = 0
    ) -> int:
        """Switch up to max_pkts TX packets of `port`; TX chains consumed."""
        if port not in self._ports:
            raise ConfigError(f"switch port {port} is not attached (ports: {sorted(self._ports)})")
        p, b = _budget(max_pkts, max_bytes)
        r = lib.vx_switch_tx(self._sw, port, tx.c_queue, p, b, _spin(spin_ns))
        return _check(r, tx, "switch tx")

    def lookup(self, mac: bytes) -> int | None:
        """The port the FDB has learned for `mac`, or None."""
        if len(mac) != 6:
            raise ConfigError(f"a MAC address has 6 bytes, got {len(mac)}")
        r = lib.vx_switch_lookup(self._sw, ffi.from_buffer("uint8_t[]", mac))
        return None if r < 0 else int(r)

    @property
    def ports(self) -> Sequence[int]:
        return sorted(self._ports)

    def stats(self) -> dict[str, int]:
        s = self._stats
        return {
            name: int(getattr(s, name)) for name, _ in ffi.typeof("struct vx_switch_stats").fields
        }
