"""virtio-net over vhost-user: features, config space, and the works that connect rings to ports.

Ports (what the guest's queues are connected to):
  sink    copy each TX packet out of guest memory, count it, drop it
  echo    return each TX packet to the same guest's RX queue with the MACs swapped
  source  fill the guest's RX queues with generated frames at full rate, or paced (rate_pps), and
          sink its TX; with echo_tx its TX frames come back on the pair's RX queue, MACs swapped
          (that RX ring then has two writers, the TX and RX works, which lock it)
  switch  an L2 learning switch between the daemon's devices, guest to guest in one copy
  tap     a TAP device (optionally in a network namespace), net header passed through

Queue 2i is RX of pair i (guest receives), 2i+1 is TX (guest sends).
Threads: construction, feature changes and `make_works` run on the asyncio thread; the works'
methods run on the worker that owns them.
"""

from __future__ import annotations

import logging
import select
import struct
from collections.abc import Callable
from typing import Any

from iosched.params import Param, ParamHandle, Registry, Scope
from iosched.pool import DeviceBinding
from iosched.work import QueueWork, WorkStats
from virtio import features as vf
from virtio import net as vnet
from virtio.errors import ConfigError, GuestError
from virtio.kick import KickQueue, SpinWindow
from virtio.ring import STATS_FIELDS, DeviceQueue
from virtio.vhost_user import ProtocolFeature as PF

from . import irq
from .config import DeviceConfig
from .device import Refused, VhostUserDevice

__all__ = [
    "BUSY_POLL_MAX_US",
    "BUSY_POLL_US",
    "COUNTER_FIELDS",
    "PARAMS",
    "BusyPoll",
    "NetDevice",
    "QueueWorkItem",
    "SwitchRegistry",
    "make_udp_frame",
]

log = logging.getLogger("vhostx.control")

# What a net device offers, bit by bit against QEMU 7.2 and DPDK 22.11 virtio-user: see
# docs/features.md (tests/unit/test_features_doc.py keeps the table and these masks in step).
# Not offered because neither peer can take them from a vhost-user backend: MAC and STATUS (QEMU
# emulates both itself and forwards neither; DPDK strips both from SET_FEATURES), protocol CONFIG
# (QEMU 7.2 masks it for net with a warning on every start, DPDK does not know it) and RARP
# (only sent after a migration, and QEMU blocks migration without LOG_SHMFD).
_BASE_FEATURES = (
    (1 << vf.VIRTIO_F_VERSION_1)
    | (1 << vf.VIRTIO_RING_F_EVENT_IDX)
    | (1 << vf.VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << vf.VIRTIO_NET_F_MRG_RXBUF)
    | (1 << vf.VIRTIO_NET_F_MTU)
)
# Offloads only make sense where a real stack sits behind the port.
_TAP_OFFLOADS = (
    (1 << vf.VIRTIO_NET_F_CSUM)
    | (1 << vf.VIRTIO_NET_F_GUEST_CSUM)
    | (1 << vf.VIRTIO_NET_F_GUEST_TSO4)
    | (1 << vf.VIRTIO_NET_F_GUEST_TSO6)
    | (1 << vf.VIRTIO_NET_F_GUEST_ECN)
    | (1 << vf.VIRTIO_NET_F_HOST_TSO4)
    | (1 << vf.VIRTIO_NET_F_HOST_TSO6)
    | (1 << vf.VIRTIO_NET_F_HOST_ECN)
)
_PROTOCOL_FEATURES = (
    (1 << PF.MQ)
    | (1 << PF.REPLY_ACK)
    | (1 << PF.MTU)
    | (1 << PF.RESET_DEVICE)
    | (1 << PF.CONFIGURE_MEM_SLOTS)
    | (1 << PF.STATUS)
    | (1 << PF.VHOSTX_POSTED_IRQ)  # masked out by QEMU and DPDK, which do not know it
)
# device key iommu = true: the vIOMMU (device IOTLB) path, vhostx/device_iotlb.py
_IOMMU_FEATURES = 1 << vf.VIRTIO_F_ACCESS_PLATFORM
_IOMMU_PROTOCOL_FEATURES = 1 << PF.BACKEND_REQ
# TUNSETOFFLOAD flags
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08


def make_udp_frame(dst: bytes, src: bytes, size: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of `size` bytes (checksums filled), for the source port."""
    size = max(size, 60)
    payload_len = size - 14 - 20 - 8
    ip_len = 20 + 8 + payload_len
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            ip_len,
            0,
            0x4000,
            64,
            17,
            0,
            bytes([198, 18, 0, 1]),
            bytes([198, 18, 0, 2]),
        )
    )
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = (csum & 0xFFFF) + (csum >> 16)
    struct.pack_into("!H", ip, 10, ~csum & 0xFFFF)
    udp = struct.pack("!HHHH", 9, 9, 8 + payload_len, 0)  # checksum 0: none (IPv4)
    body = bytes((i & 0xFF) for i in range(payload_len))
    return dst + src + b"\x08\x00" + bytes(ip) + udp + body


# The C queue counters counters() reports (internal-api.md, "QueueWork"); all of vx_stats.
COUNTER_FIELDS: tuple[str, ...] = STATS_FIELDS


BUSY_POLL_US = Param(
    "busy_poll_us", int, 50,
    "inside one C batch that has found work, keep re-reading the ring once it runs empty, for "
    "up to this long in total per batch, before returning to the worker loop (like vhost-net's "
    "busyloop_timeout); completions are published first; an idle ring never spins; bounds one "
    "batch's extra latency for other queues on the same worker; a queue whose batch caught "
    "buffers this way waits one more window, kicks off, before going back to kicks (the "
    "linger: a ping-pong driver within the window never kicks); 0 = return at once",
    unit="us", min=0, max=1000, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
BUSY_POLL_MAX_US = Param(
    "busy_poll_max_us", int, 500,
    "the adaptive busy-poll window of a kicked queue: a driver that comes back less than this "
    "long after its queue went back to kicks doubles the window, up to this (a kick and a "
    "wake-up of a sleeping virtual CPU cost far more than the spin); one that comes later puts "
    "it back to busy_poll_us (KVM's halt-polling rule); <= busy_poll_us = a fixed window",
    unit="us", min=0, max=10000, runtime=True, scope=Scope.DEVICE,
)  # fmt: skip
PARAMS: tuple[Param, ...] = (BUSY_POLL_US, BUSY_POLL_MAX_US)
"""The parameters this module reads."""


class BusyPoll:
    """The busy-poll window of the C batches (busy_poll_us, in ns) and the cap of its adaptive
    growth (busy_poll_max_us) shared by one device's works.

    Follows the values the device uses (`param`, `cap_param`: handles such as
    `registry.handle("busy_poll_us", device="net0")`; None: the default, fixed) through one
    subscription each (made here, dropped by close()): the values live in C cells (`window`, a
    virtio.kick.SpinWindow) that the kick queues' C batches read, and Python turns read `ns`;
    never the registry.
    Threads: the subscription callbacks run on whichever thread sets the parameter; a batch sees
    the new value from its next call on (one aligned 8-byte store).
    """

    def __init__(self, param: ParamHandle | Any = None, cap_param: ParamHandle | Any = None
                 ) -> None:  # fmt: skip
        own = Registry(PARAMS)
        self._param = own.handle(BUSY_POLL_US.name) if param is None else param
        self._cap = own.handle(BUSY_POLL_MAX_US.name) if cap_param is None else cap_param
        self.window = SpinWindow(int(self._param.get()) * 1000, int(self._cap.get()) * 1000)
        self._unsubscribe = [self._param.subscribe(self._changed),
                             self._cap.subscribe(self._cap_changed)]

    @property
    def ns(self) -> int:
        return self.window.ns

    def _changed(self, name: str, old: Any, new: Any) -> None:
        self.window.ns = int(new) * 1000

    def _cap_changed(self, name: str, old: Any, new: Any) -> None:
        self.window.cap_ns = int(new) * 1000

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []


class QueueWorkItem:
    """A QueueWork made of a queue and the port operation that serves it.

    Given a virtio.net.Op (every port vhostx builds), it also carries the op as `op` (served in
    a worker's C poll rounds) and a `kick_queue` over the op and the kick fd: the worker then
    serves its kicks inside its C wait, and `stats` count with the kick queue's C counters.
    With a data fd (TAP RX) the C re-check also asks the fd, like `pending`.
    """

    def __init__(
        self,
        name: str,
        queue: DeviceQueue,
        run: Callable[..., int] | vnet.Op,
        *,
        kick_fd: int,
        device: str = "",
        busy_poll: BusyPoll | None = None,
        data_fds: tuple[int, ...] = (),
        pending: Callable[[], bool] | None = None,
        on_broken: Callable[[QueueWork, GuestError], None] | None = None,
    ) -> None:
        self.name = name
        # "net0" for "net0.tx0" unless given
        self.device = device or name.rsplit(".", 1)[0]
        self._on_broken = on_broken
        self.queue = queue
        # A C operation (virtio.net.Op) can also be served in a worker's C poll round (`op`)
        # and on kicks inside the worker's C wait (`kick_queue`); a plain callable only one
        # batch at a time through run().
        self.op: vnet.Op | None = run if isinstance(run, vnet.Op) else None
        self._run: Callable[..., int] = run.run if isinstance(run, vnet.Op) else run
        self.kick_queue: KickQueue | None = None
        if self.op is not None and kick_fd >= 0 and len(data_fds) <= 1:
            self.kick_queue = KickQueue(
                self.op, kick_fd, data_fd=data_fds[0] if data_fds else -1,
                spin=busy_poll.window if busy_poll is not None else None,
            )  # fmt: skip
        self.stats = WorkStats(self.kick_queue.counters if self.kick_queue is not None else None)
        # With busy_poll, `run` takes a third argument: the spin window of this C batch. The
        # worker clears `solo` while other queues wait for it: spinning on one ring then only
        # delays them (the client refills the others meanwhile).
        self._busy_poll = busy_poll
        self.solo = True
        self._kick_fd = kick_fd
        self._data_fds = data_fds
        self._pending = pending or (lambda: queue.pending() > 0)
        # "No fd" kick (polling mode frontends): nothing will ever wake us, so never stop polling.
        self.poll_only = kick_fd < 0

    def kick_fds(self) -> list[int]:
        return [self._kick_fd] if self._kick_fd >= 0 else []

    def data_fds(self) -> list[int]:
        return list(self._data_fds)

    def run(self, budget_pkts: int, budget_bytes: int) -> int:
        bp = self._busy_poll
        if bp is None:
            return self._run(budget_pkts, budget_bytes)
        return self._run(budget_pkts, budget_bytes, bp.ns if self.solo else 0)

    def pending(self) -> bool:
        return self._pending()

    def set_notify(self, enable: bool) -> None:
        self.queue.set_notify(enable)

    def counters(self) -> dict[str, int]:
        """The C queue counters (packets, bytes, interrupts, interrupts_suppressed, ring_full,
        ring_empty, batches, ...); any thread may read them (benign races, monotonic)."""
        return self.queue.stats()

    def broken(self, err: GuestError) -> None:
        if self._on_broken is not None:
            self._on_broken(self, err)


class SwitchRegistry:
    """Named L2 switches shared by the daemon's switch-port devices."""

    def __init__(self) -> None:
        self._switches: dict[str, vnet.Switch] = {}

    def get(self, name: str) -> vnet.Switch:
        sw = self._switches.get(name)
        if sw is None:
            sw = self._switches[name] = vnet.Switch()
        return sw


def _fd_readable(fd: int) -> bool:
    r, _, _ = select.select([fd], [], [], 0)
    return bool(r)


class NetDevice(VhostUserDevice):
    """A virtio-net device whose queues are served by one port."""

    def __init__(self, cfg: DeviceConfig, worker: DeviceBinding, switches: SwitchRegistry,
                 params: Registry | None = None) -> None:
        """`params`: the daemon's registry, which knows this device (its per-device values);
        None: parameters at their defaults."""
        self.cfg = cfg
        self.num_queues = 2 * cfg.queues
        self.mac = cfg.effective_mac()
        self.mtu = cfg.mtu
        feats = _BASE_FEATURES
        if cfg.queues > 1:
            feats |= 1 << vf.VIRTIO_NET_F_MQ
        if cfg.in_order:
            # every port op completes chains in the order the driver made them available (the C
            # core pushes used entries as it walks the avail ring, drops and errors included),
            # which is all IN_ORDER asks of a split-ring device; drivers then skip reading used
            # ids (DPDK's virtio PMD frees TX mbufs from used->idx alone)
            feats |= 1 << vf.VIRTIO_F_IN_ORDER
        self.tap: Any = None
        if cfg.port == "tap":
            feats |= _TAP_OFFLOADS
        protocol = _PROTOCOL_FEATURES
        if cfg.iommu:
            # QEMU 7.2 refuses a backend offering ACCESS_PLATFORM without BACKEND_REQ and
            # REPLY_ACK; a frontend whose device has no iommu_platform=on never acks the bit
            feats |= _IOMMU_FEATURES
            protocol |= _IOMMU_PROTOCOL_FEATURES
        self.device_features = feats
        self.protocol_features = protocol
        self._switch = switches.get(cfg.switch) if cfg.port == "switch" else None
        self._switch_port: int | None = None
        self._frame = make_udp_frame(self.mac, b"\x02\x00\x00\x00\x00\x01", cfg.frame_size)
        self.busy_poll = BusyPoll(
            params.handle(BUSY_POLL_US.name, device=cfg.name) if params is not None else None,
            params.handle(BUSY_POLL_MAX_US.name, device=cfg.name) if params is not None else None,
        )
        self.irq = irq.IrqModeration(params, cfg.name if params is not None else None)
        super().__init__(cfg.name, worker)
        if cfg.port == "tap":
            self._open_tap()

    def _open_tap(self) -> None:
        try:
            from . import netdev  # pyroute2 is only needed for tap ports
        except ImportError as err:
            raise ConfigError(f"device {self.name}: port = \"tap\" needs pyroute2, which does "
                              f"not import here ({err}); pip install pyroute2") from err
        try:
            self.tap = netdev.open_tap(
                self.cfg.tap_name or None,
                vnet_hdr_len=12,
                netns=self.cfg.tap_netns or None,
                address=self.cfg.tap_address or None,
                queues=self.cfg.queues,  # one TAP queue per pair: the kernel spreads RX flows
            )
        except OSError as err:
            raise ConfigError(f"device {self.name}: cannot create its TAP device: {err}") from err

    # ---- negotiation ------------------------------------------------------------------------

    def hdr_len(self) -> int:
        if self.has_feature(vf.VIRTIO_F_VERSION_1) or self.has_feature(vf.VIRTIO_NET_F_MRG_RXBUF):
            return 12
        return 10

    def queue_options(self, index: int) -> dict[str, Any]:
        return {"hdr_len": self.hdr_len(), "mrg_rxbuf": self.has_feature(vf.VIRTIO_NET_F_MRG_RXBUF)}

    def _features_changed(self) -> None:
        if self.tap is None:
            return
        offload = 0
        if self.has_feature(vf.VIRTIO_NET_F_GUEST_CSUM):
            offload |= TUN_F_CSUM
            if self.has_feature(vf.VIRTIO_NET_F_GUEST_TSO4):
                offload |= TUN_F_TSO4
            if self.has_feature(vf.VIRTIO_NET_F_GUEST_TSO6):
                offload |= TUN_F_TSO6
            if self.has_feature(vf.VIRTIO_NET_F_GUEST_ECN):
                offload |= TUN_F_TSO_ECN
        self.tap.set_vnet_hdr_len(self.hdr_len())
        self.tap.set_offloads(offload)

    def config_space(self) -> bytes:
        # struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; }
        return self.mac + struct.pack("<HHH", 1, self.cfg.queues, self.mtu)

    async def h_get_queue_num(self, msg: Any) -> int:
        # QEMU 7.2 and DPDK read the answer as queue *pairs* for net.
        return self.cfg.queues

    async def h_net_set_mtu(self, msg: Any) -> None:
        mtu: int = msg.payload
        if not 68 <= mtu <= 65535:
            raise Refused(f"MTU {mtu} outside [68, 65535]")
        self.mtu = mtu

    # ---- works ------------------------------------------------------------------------------

    def release_works(self) -> None:
        if self._switch is not None and self._switch_port is not None:
            self._switch.remove_port(self._switch_port)
            self._switch_port = None

    def make_works(self, running: dict[int, DeviceQueue]) -> list[QueueWork]:
        works: list[QueueWork] = []
        port = self.cfg.port
        for index, q in running.items():  # the device's interrupt policy, its posted domains
            q.set_irq(self.irq.cell)
            self.apply_posted(index, q)
        rx_all = [running[i] for i in range(0, self.num_queues, 2) if i in running]
        if port not in ("source", "tap"):
            # No work listens to these RX rings' kicks (echo and switch fill them from TX
            # works, sink never does): ask the driver not to kick on every refill (a syscall
            # for virtio-user, a VM exit for a guest). Nobody else writes them yet.
            for rxq in rx_all:
                rxq.set_notify(False)
        if self._switch is not None and rx_all:
            self._switch_port = self._switch.add_port(rx_all)
        if port == "tap":
            # No flow may be steered to a TAP queue whose RX ring nobody serves (queue 0 stays:
            # a TAP without queues loses its carrier).
            for pair in range(1, self.cfg.queues):
                self.tap.set_queue_enabled(pair, 2 * pair in running)
        for pair in range(self.cfg.queues):
            rx = running.get(2 * pair)
            tx = running.get(2 * pair + 1)
            rx_kick = self.vrings[2 * pair].kick_fd
            tx_kick = self.vrings[2 * pair + 1].kick_fd
            echoes = port == "echo" or (port == "source" and self.cfg.echo_tx)
            if tx is not None and not ((port == "switch" or echoes) and not rx_all):
                # A switch or echo port without any RX ring yet leaves TX frames in the ring
                # (nothing lost): they are served once an RX ring starts and the plan is remade.
                works.append(self._tx_work(pair, tx, rx, tx_kick))
            if rx is not None:
                if port == "source":
                    works.append(self._source_work(pair, rx, rx_kick))
                elif port == "tap":
                    works.append(self._tap_rx_work(pair, rx, rx_kick))
        return works

    def _tx_work(self, pair: int, tx: DeviceQueue, rx: DeviceQueue | None, kick: int) -> QueueWork:
        port = self.cfg.port
        if port == "echo" and rx is not None:
            op = vnet.Op.echo(tx, rx)
        elif port == "source" and self.cfg.echo_tx and rx is not None:
            # into the RX ring the source's rx_fill writes too (maybe from another worker)
            op = vnet.Op.echo(tx, rx, shared=True)
        elif port == "switch" and self._switch is not None and self._switch_port is not None:
            op = vnet.Op.switch_tx(self._switch, self._switch_port, tx)
        elif port == "tap":
            op = vnet.Op.tx_to_fd(tx, self.tap.queue_fd(pair))
        else:  # sink, source (its TX is drained), echo (or echo_tx) whose RX is not running yet
            op = vnet.Op.tx_sink(tx)
        return QueueWorkItem(
            f"{self.name}.tx{pair}", tx, op, kick_fd=kick, device=self.name,
            on_broken=self.guest_error, busy_poll=self.busy_poll,
        )  # fmt: skip

    def _source_work(self, pair: int, rx: DeviceQueue, kick: int) -> QueueWork:
        rate = self.cfg.rate_pps
        # paced (rate_pps): frames are due by the clock, not by the guest's refills, so the
        # work is polled for as long as it is attached (no kick fd), like a NIC's TX timer
        return QueueWorkItem(
            f"{self.name}.rx{pair}", rx,
            vnet.Op.rx_fill(rx, self._frame, rate, shared=self.cfg.echo_tx),
            kick_fd=-1 if rate else kick, device=self.name, busy_poll=self.busy_poll,
            on_broken=self.guest_error,
        )  # fmt: skip

    def _tap_rx_work(self, pair: int, rx: DeviceQueue, kick: int) -> QueueWork:
        fd = self.tap.queue_fd(pair)

        def pending() -> bool:
            return rx.pending() > 0 and _fd_readable(fd)

        return QueueWorkItem(
            f"{self.name}.rx{pair}", rx, vnet.Op.rx_from_fd(rx, fd), kick_fd=kick,
            device=self.name, data_fds=(fd,), pending=pending, on_broken=self.guest_error,
            busy_poll=self.busy_poll,
        )  # fmt: skip

    async def close(self) -> None:
        await super().close()
        self.busy_poll.close()
        self.irq.close()
        if self.tap is not None:
            self.tap.close()
            self.tap = None
