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
under the C queue lock, so several workers may feed one RX queue.
"""

from __future__ import annotations

from collections.abc import Sequence

from virtio._vx_core import ffi, lib
from virtio.errors import ConfigError, GuestError
from virtio.ring import DeviceQueue

__all__ = ["Switch", "echo", "fwd", "rx_fill", "rx_from_fd", "tx_sink", "tx_to_fd"]

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
    return r


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
