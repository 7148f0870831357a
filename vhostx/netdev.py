"""Host network plumbing for tap ports: TAP devices and bridges (pyroute2, ioctls).

Role: ``open_tap()`` creates a TAP interface opened by this process (``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR``, non-blocking fd, vnet header length and offloads set by ioctl), optionally moves it
into a network namespace (created if absent) and gives it an address there; the fd keeps working
after the move (``IPRoute.link("set", net_ns_fd=NAME)``). ``Bridge`` creates a Linux bridge and
enslaves interfaces. Namespaces themselves (``Netns``, ``netns_exists``, ``unique_name``) live in
vhostx.netns and are re-exported here.

Threads: the daemon's main thread calls this at device setup and teardown (and ``Tap.set_offloads``
/ ``set_vnet_hdr_len`` after feature negotiation). The calls block briefly on netlink and ioctls; a
worker thread only ever reads and writes ``Tap.fd``. pyroute2 0.9's synchronous API cannot run on a
thread whose asyncio loop is running (the daemon's main thread), so netlink work is done on a
short-lived helper thread while the caller waits; work inside a namespace runs on such a thread
after ``pyroute2.netns.setns`` (which moves that thread only). ``Netns.call`` runs its callable on
a fresh thread that has entered the namespace, never on the caller's thread.

Errors: every failure raises ``virtio.errors.ConfigError`` naming the interface or namespace, what
was asked and what the kernel answered.
"""

from __future__ import annotations

import fcntl
import os
import struct
from enum import IntFlag
from types import TracebackType
from typing import Self

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from virtio.errors import ConfigError

from .netns import (
    IFNAMSIZ,
    Netns,
    call_in_netns,
    check_address,
    check_netns_name,
    configure_interface,
    create_netns,
    netlink_errmsg,
    netns_exists,
    remove_netns,
    unique_name,
)

__all__ = [
    "IFF_ATTACH_QUEUE",
    "IFF_DETACH_QUEUE",
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "TUNSETIFF",
    "TUNSETOFFLOAD",
    "TUNSETQUEUE",
    "TUNSETVNETHDRSZ",
    "Bridge",
    "Netns",
    "Offload",
    "Tap",
    "netns_exists",
    "open_tap",
    "unique_name",
]

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
TUNSETQUEUE = 0x400454D9
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, short flags, padding to 40 bytes
class Offload(IntFlag):
    """TUNSETOFFLOAD flags: which offloaded packets the reader of the TAP fd accepts (set from the
    guest's RX features: GUEST_CSUM -> CSUM, GUEST_TSO4 -> TSO4, ...)."""

    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10


def _move_to_netns(ifname: str, netns: str) -> None:
    def body() -> None:
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=ifname)
                if not idx:
                    raise ConfigError(f"tap {ifname}: vanished after TUNSETIFF")
                ipr.link("set", index=idx[0], net_ns_fd=netns)  # pyroute2 opens it by name
        except (NetlinkError, OSError) as e:
            raise ConfigError(
                f"tap {ifname}: cannot move it into netns {netns!r}: {netlink_errmsg(e)}"
            ) from e

    call_in_netns(None, body, what="move")


class Tap:
    """An open TAP device. ``fd`` is non-blocking; frames carry a virtio-net header of
    ``vnet_hdr_len`` bytes. Closing the fd destroys the interface (it is not persistent)."""

    def __init__(
        self,
        fd: int,
        name: str,
        *,
        vnet_hdr_len: int,
        offloads: int,
        netns: str | None,
        owns_netns: bool,
    ) -> None:
        self.fd = fd
        #: one fd per queue with ``open_tap(queues=N)`` (IFF_MULTI_QUEUE); fds[0] is ``fd``. The
        #: kernel steers each flow to the queue that last sent a packet of it.
        self.fds: tuple[int, ...] = (fd,)
        self._detached: set[int] = set()
        self.name = name
        self.vnet_hdr_len = vnet_hdr_len
        self.offloads = Offload(offloads)
        self.netns = netns
        self._owns_netns = owns_netns

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return f"<Tap {self.name} fd={self.fd}{where} hdr={self.vnet_hdr_len} {self.offloads!r}>"

    def set_vnet_hdr_len(self, length: int) -> None:
        """TUNSETVNETHDRSZ: 10 (legacy), 12 (VERSION_1 / MRG_RXBUF) or 20 (hash report)."""
        if length not in (10, 12, 20):
            raise ConfigError(f"tap {self.name}: vnet_hdr_len={length}: expected 10, 12 or 20")
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", length))
        except OSError as e:
            raise ConfigError(
                f"tap {self.name}: TUNSETVNETHDRSZ {length} failed: {netlink_errmsg(e)}"
            ) from e
        self.vnet_hdr_len = length

    def set_offloads(self, offloads: int) -> None:
        """TUNSETOFFLOAD: the offloaded packets (``Offload`` flags) this fd's reader accepts."""
        flags = Offload(offloads)
        if flags & (Offload.TSO4 | Offload.TSO6 | Offload.TSO_ECN | Offload.UFO) and not (
            flags & Offload.CSUM
        ):
            raise ConfigError(f"tap {self.name}: offloads={flags!r}: TSO/UFO need CSUM as well")
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, int(flags))
        except OSError as e:
            raise ConfigError(
                f"tap {self.name}: TUNSETOFFLOAD {flags!r} failed: {netlink_errmsg(e)}"
            ) from e
        self.offloads = flags

    def queue_fd(self, queue: int) -> int:
        """The fd of queue ``queue`` while it is attached (writing on it steers the flow's
        packets from the stack back to that queue), else the fd of queue 0."""
        if 0 <= queue < len(self.fds) and queue not in self._detached:
            return self.fds[queue]
        return self.fd

    def set_queue_enabled(self, queue: int, enabled: bool) -> None:
        """TUNSETQUEUE: attach or detach queue ``queue`` (a multiqueue TAP), so that the kernel
        steers no flow to a queue nobody reads. Idempotent."""
        if not 0 <= queue < len(self.fds):
            raise ConfigError(f"tap {self.name}: queue {queue}: it has {len(self.fds)} queues")
        if enabled == (queue not in self._detached):
            return
        flags = IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fds[queue], TUNSETQUEUE, _IFREQ.pack(b"", flags))
        except OSError as e:
            raise ConfigError(
                f"tap {self.name}: TUNSETQUEUE {'attach' if enabled else 'detach'} of queue "
                f"{queue} failed: {netlink_errmsg(e)}"
            ) from e
        if enabled:
            self._detached.discard(queue)
        else:
            self._detached.add(queue)

    def close(self) -> None:
        """Close the fd (the kernel deletes the interface) and delete the namespace if
        ``open_tap`` created it. Idempotent."""
        for extra in self.fds[1:]:
            os.close(extra)
        self.fds = ()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._owns_netns and self.netns:
            self._owns_netns = False
            remove_netns(self.netns)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_tap(
    name: str | None = None,
    *,
    vnet_hdr_len: int = 12,
    offloads: int = 0,
    netns: str | None = None,
    address: str | None = None,
    mtu: int | None = None,
    up: bool = True,
    queues: int = 1,
) -> Tap:
    """Create a TAP interface (``name``, or ``tapN`` chosen by the kernel) opened by this process.

    With ``netns`` the interface is moved into that namespace (created if absent, and then deleted
    again by ``Tap.close``); ``address`` (``10.200.1.1/24``) and ``up`` apply where the interface
    ends up. ``queues`` > 1 makes a multiqueue TAP (IFF_MULTI_QUEUE) with one fd per queue in
    ``Tap.fds``."""
    if name is not None and (not name or len(name) > IFNAMSIZ - 1 or "/" in name or " " in name):
        raise ConfigError(f"tap name={name!r}: expected 1-15 characters without '/' or spaces")
    if address is not None:
        check_address(address, f"tap {name or '(new)'}")
    if netns is not None:
        check_netns_name(netns)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"tap {name or '(new)'}: cannot open /dev/net/tun: {netlink_errmsg(e)}") from e
    created_netns = False
    tap: Tap | None = None
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        ifr = _IFREQ.pack((name or "").encode(), flags)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            raise ConfigError(f"tap {name or '(new)'}: TUNSETIFF failed: {netlink_errmsg(e)}") from e
        actual = _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
        tap = Tap(fd, actual, vnet_hdr_len=vnet_hdr_len, offloads=0, netns=None, owns_netns=False)
        for _ in range(queues - 1):  # more queues: attach by name, before the move to netns
            qfd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            tap.fds += (qfd,)
            try:
                fcntl.ioctl(qfd, TUNSETIFF, _IFREQ.pack(actual.encode(), flags))
            except OSError as e:
                raise ConfigError(
                    f"tap {actual}: TUNSETIFF of queue {len(tap.fds) - 1} failed: {netlink_errmsg(e)}"
                ) from e
        tap.set_vnet_hdr_len(vnet_hdr_len)
        tap.set_offloads(offloads)
        if netns is not None:
            if not netns_exists(netns):
                create_netns(netns)
                created_netns = True
            _move_to_netns(actual, netns)
            tap.netns = netns
            tap._owns_netns = created_netns
        configure_interface(netns, actual, address, up, mtu)
        return tap
    except BaseException:
        if tap is not None:
            tap._owns_netns = created_netns
            tap.close()
        else:
            os.close(fd)
            if created_netns:
                remove_netns(netns)  # type: ignore[arg-type]
        raise


class Bridge:
    """A Linux bridge (in ``netns`` or the current namespace); ``close`` deletes it."""

    def __init__(
        self, name: str, *, netns: str | None = None, address: str | None = None, up: bool = True
    ) -> None:
        if not name or len(name) > IFNAMSIZ - 1:
            raise ConfigError(f"bridge name={name!r}: expected 1-15 characters")
        self.name = name
        self.netns = netns
        self._closed = False
        self._create(address, up)

    def _create(self, address: str | None, up: bool) -> None:
        name, netns = self.name, self.netns

        def body() -> None:
            with IPRoute() as ipr:
                try:
                    ipr.link("add", ifname=name, kind="bridge")
                except NetlinkError as e:
                    raise ConfigError(
                        f"bridge {name}: cannot create it"
                        f"{' in netns ' + netns if netns else ''}: "
                        f"{netlink_errmsg(e)}"
                    ) from e

        call_in_netns(netns, body, what="bridge")
        try:
            configure_interface(netns, name, address, up)
        except ConfigError:
            self.close()
            raise

    def add_port(self, ifname: str) -> None:
        """Enslave ``ifname`` (in the bridge's namespace) to the bridge and bring it up."""

        def body() -> None:
            with IPRoute() as ipr:
                try:
                    br = ipr.link_lookup(ifname=self.name)
                    idx = ipr.link_lookup(ifname=ifname)
                    if not br or not idx:
                        raise ConfigError(
                            f"bridge {self.name}: cannot add {ifname}: "
                            f"{'bridge' if not br else 'interface'} not found"
                        )
                    ipr.link("set", index=idx[0], master=br[0], state="up")
                except NetlinkError as e:
                    raise ConfigError(
                        f"bridge {self.name}: cannot add {ifname}: {netlink_errmsg(e)}"
                    ) from e

        call_in_netns(self.netns, body, what="bridge")

    def close(self) -> None:
        """Delete the bridge (its ports are released, not deleted). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.netns and not netns_exists(self.netns):
            return

        def body() -> None:
            with IPRoute() as ipr:
                try:
                    idx = ipr.link_lookup(ifname=self.name)
                    if idx:
                        ipr.link("del", index=idx[0])
                except NetlinkError as e:
                    raise ConfigError(f"bridge {self.name}: cannot delete it: {netlink_errmsg(e)}") from e

        call_in_netns(self.netns, body, what="bridge")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
