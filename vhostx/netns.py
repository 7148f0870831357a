"""Network namespaces for tap ports and tests (pyroute2), and the netlink helpers both use.

Role: ``Netns`` creates and deletes a namespace and runs commands (``ip netns exec``, which also
gives the command the namespace's /sys and /etc/netns files) or Python callables inside it;
``netns_exists`` and ``unique_name`` (interface and namespace names unique to this process). The
helpers run netlink work on a short-lived thread (``call_in_netns``), create, enter and
remove namespaces and configure an interface's address, MTU and state; vhostx.netdev (TAP devices,
bridges) builds on them and re-exports the public names.

Namespaces through pyroute2: ``pyroute2.netns.create`` / ``remove`` / ``listnetns`` make, delete and
find them, ``pyroute2.netns.setns`` enters one on a helper thread.

Threads: the daemon's main thread (device setup and teardown) or a test's. pyroute2 0.9's
synchronous API cannot run on a thread whose asyncio loop is running (the daemon's main thread), so
netlink work is done on a short-lived helper thread while the caller waits; work inside a
namespace runs on such a thread after ``pyroute2.netns.setns`` (which moves that thread only).
``Netns.call`` runs its callable on a fresh thread that has entered the namespace, never on the
caller's thread.

Errors: every failure raises ``virtio.errors.ConfigError`` naming the interface or namespace, what
was asked and what the kernel answered.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from pyroute2 import IPRoute
from pyroute2 import config as pyroute2_config
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from virtio.errors import ConfigError

__all__ = [
    "IFNAMSIZ",
    "Netns",
    "call_in_netns",
    "check_address",
    "check_netns_name",
    "configure_interface",
    "create_netns",
    "netlink_errmsg",
    "netns_exists",
    "remove_netns",
    "unique_name",
]

IFNAMSIZ = 16  # <linux/if.h>: an interface name is at most 15 characters and a NUL
_NETNS_DIR = pyroute2_netns.NETNS_RUN_DIR
# pyroute2.netns.create forks a helper that must answer within the library's communicate timeout
# (2 s by default); a loaded 2-core machine needs longer.
_CREATE_TIMEOUT_S = 15
pyroute2_config.default_communicate_timeout = max(pyroute2_config.default_communicate_timeout,
                                                  _CREATE_TIMEOUT_S)


T = TypeVar("T")


def call_in_netns(
    netns: str | None, fn: Callable[[], T], *, timeout: float | None = None, what: str = "netlink"
) -> T:
    """Run ``fn()`` on a fresh short-lived thread, inside network namespace ``netns`` (setns on
    that thread only) or in this process's namespace, and return its result or raise its error.

    Why a thread: pyroute2 0.9's synchronous IPRoute drives an event loop of its own and fails
    with "this event loop is already running" on a thread whose loop runs (the daemon's main
    thread); and entering a namespace must not move the caller's thread. IPRoute(netns=...) and
    NetNS are not used: they fork a helper process per socket with a short timeout and retries,
    which proved fragile on a loaded 2-core machine (interfaces configured in the wrong
    namespace); `pyroute2.netns.setns` on a thread of our own needs no helper process."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            if netns is not None:
                try:
                    pyroute2_netns.setns(netns, flags=0)  # 0: never create it
                except FileNotFoundError as e:
                    raise ConfigError(
                        f"netns={netns!r}: no such namespace ({_NETNS_DIR}/{netns} does not exist)"
                    ) from e
                except OSError as e:
                    raise ConfigError(f"netns={netns!r}: cannot enter it: {netlink_errmsg(e)}") from e
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=body, name=f"{what}-{netns or 'host'}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"netns {netns}: {what} still running after {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


_counter = itertools.count(1)


def unique_name(prefix: str = "vx") -> str:
    """A name unique in this host for this process: ``prefix`` + pid + counter, at most 15
    characters (the interface name limit)."""
    name = f"{prefix}{os.getpid()}x{next(_counter)}"
    if len(name) > IFNAMSIZ - 1:
        raise ConfigError(
            f"generated name {name!r} is longer than 15 characters; "
            f"use a shorter prefix than {prefix!r}"
        )
    return name


def netlink_errmsg(err: BaseException) -> str:
    if isinstance(err, NetlinkError):
        return f"netlink error {err.code} ({os.strerror(err.code)})"
    if isinstance(err, OSError) and err.errno is not None:
        return f"{errno.errorcode.get(err.errno, err.errno)} ({err.strerror})"
    return str(err)


def check_address(address: str, where: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        iface = ipaddress.ip_interface(address)
    except ValueError as e:
        raise ConfigError(
            f"{where}: address={address!r}: expected ADDRESS/PREFIX such as 10.200.1.1/24 ({e})"
        ) from e
    if "/" not in address:
        raise ConfigError(
            f"{where}: address={address!r}: expected ADDRESS/PREFIX with an explicit "
            "prefix length, such as 10.200.1.1/24"
        )
    return iface


def netns_exists(name: str) -> bool:
    return name in pyroute2_netns.listnetns()


def check_netns_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or len(name) > 64:
        raise ConfigError(
            f"netns={name!r}: expected a namespace name of 1-64 characters without '/'"
        )


def create_netns(name: str) -> None:
    check_netns_name(name)
    try:
        pyroute2_netns.create(name)
    except (OSError, RuntimeError, TimeoutError) as e:
        raise ConfigError(f"netns={name!r}: cannot add it: {netlink_errmsg(e)}") from e


def remove_netns(name: str) -> None:
    if netns_exists(name):
        try:
            pyroute2_netns.remove(name)
        except OSError as e:
            raise ConfigError(f"netns={name!r}: cannot delete it: {netlink_errmsg(e)}") from e


def configure_interface(
    netns: str | None, ifname: str, address: str | None, up: bool, mtu: int | None = None
) -> None:
    """Give ``ifname`` (in ``netns`` or this process's namespace) an address and bring it up."""
    where = f"interface {ifname}" + (f" in netns {netns}" if netns else "")
    iface = check_address(address, where) if address else None

    def body() -> None:
        with IPRoute() as ipr:
            try:
                idx = ipr.link_lookup(ifname=ifname)
                if not idx:
                    raise ConfigError(f"{where}: no such interface")
                if mtu is not None:
                    ipr.link("set", index=idx[0], mtu=mtu)
                if iface is not None:
                    ipr.addr(
                        "add",
                        index=idx[0],
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                    )
                if up:
                    ipr.link("set", index=idx[0], state="up")
                    if netns:
                        lo = ipr.link_lookup(ifname="lo")
                        if lo:
                            ipr.link("set", index=lo[0], state="up")
            except NetlinkError as e:
                raise ConfigError(
                    f"{where}: cannot configure (address={address!r}, up={up}, "
                    f"mtu={mtu}): {netlink_errmsg(e)}"
                ) from e

    call_in_netns(netns, body, what="configure")


class Netns:
    """A network namespace: created on ``create()``/``__enter__``, deleted on ``delete()``/
    ``__exit__`` (only if this object created it). Processes started with ``popen`` are killed
    on delete."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name("vxns")
        check_netns_name(self.name)
        self._created = False
        self._procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"<Netns {self.name}{' (owned)' if self._created else ''}>"

    @property
    def path(self) -> str:
        return os.path.join(_NETNS_DIR, self.name)

    def create(self) -> Self:
        if netns_exists(self.name):
            raise ConfigError(f"netns={self.name!r}: already exists")
        create_netns(self.name)
        self._created = True
        configure_interface(self.name, "lo", None, True)
        return self

    def delete(self) -> None:
        """Kill processes started by ``popen``, then delete the namespace. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._procs.clear()
        if self._created:
            self._created = False
            remove_netns(self.name)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float | None = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` inside the namespace (``ip netns exec``) and wait for it."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        try:
            return subprocess.run(
                self.exec_prefix() + list(cmd), check=check, timeout=timeout, **kwargs
            )
        except subprocess.CalledProcessError as e:
            raise ConfigError(
                f"netns {self.name}: {' '.join(cmd)} exited {e.returncode}: "
                f"{(e.stderr or '').strip()[-300:]}"
            ) from e

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside the namespace; it is killed by ``delete()``."""
        proc = subprocess.Popen(self.exec_prefix() + list(cmd), **kwargs)
        self._procs.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Run ``fn(*args)`` on a fresh thread that has entered the namespace and return its
        result (or raise its exception). Sockets it creates stay in the namespace after it
        returns, so ``ns.call(socket.create_server, ("10.200.1.1", 5000))`` gives a listening
        socket inside the namespace to use from any thread."""
        return call_in_netns(self.name, lambda: fn(*args), timeout=timeout, what="call")

    def links(self) -> list[str]:
        """Interface names in the namespace."""

        def body() -> list[str]:
            with IPRoute() as ipr:
                return [str(link.get("ifname")) for link in ipr.get_links()]

        return call_in_netns(self.name, body, what="links")

    def configure(
        self, ifname: str, address: str | None = None, *, up: bool = True, mtu: int | None = None
    ) -> None:
        """Give ``ifname`` inside the namespace an address and bring it up."""
        configure_interface(self.name, ifname, address, up, mtu)
