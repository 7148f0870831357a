"""Real QEMU guests (TCG, Debian 6.1 kernel, virtio-net over vhost-user) against the vhostx daemon.

- tap port: the guest and a network namespace holding the TAP interface ping each other and move
  several megabytes over TCP both ways with matching checksums (offloads negotiated by the guest
  go through the TAP's vnet header);
- switch port: two guests on the daemon's learning switch ping each other, and one sends a file
  to the other with a matching checksum.

Each test starts its own daemon and guests with sockets in a fresh directory and names holding the
pid; the fixtures stop QEMU and the daemon and delete the namespace. Two TCG guests on two cores
are slow: jobs are short and timeouts generous.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netns_peer import NetnsReceiver, poke

from bench.qemu import Guest, VhostUserNic

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 180.0  # per guest, to VX-READY; measured 10-50 s here depending on load
JOB_TIMEOUT = 240.0
FILE_MIB = 6


def _device(name: str, sock: Path, port: str, **opts: str) -> str:
    extra = "".join(f",{k}={v}" for k, v in opts.items())
    return f"name={name},type=net,socket={sock},port={port}{extra}"


def _guest_done(g: Guest) -> None:
    try:
        g.wait_done(JOB_TIMEOUT)
    finally:
        print(f"\n--- {g.name} console ---\n{g.tail(30)}")


# ---------------------------------------------------------------------------------- tap port


@pytest.mark.netns
def test_tap_guest_and_netns_ping_each_other(
    guest_image: Any, e2e_dir: Path, netns: Any, vhostx_daemon: Callable[..., Any], subnet: str
) -> None:
    sock = e2e_dir / "net0.sock"
    vhostx_daemon(
        [_device("net0", sock, "tap", tap_netns=netns.name, tap_address=f"{subnet}.1/24")]
    )
    assert any(name.startswith("tap") for name in netns.links()), netns.links()
    job = (
        f"vx_wait_peer {subnet}.1 60 || exit 10\n"
        f"vx_ping {subnet}.1 5 || exit 11\n"
        # keep the guest up until the namespace has pinged it back (it connects to say so)
        "nc -l -p 7000 > /dev/null\n"
    )
    nic = VhostUserNic(sock, mac="52:54:00:c8:00:02", ip=f"{subnet}.2/24")
    with Guest(guest_image, [nic], job, name="tapguest", workdir=e2e_dir) as g:
        t_boot = g.wait_ready(BOOT_TIMEOUT)
        assert g.result("ping_received", JOB_TIMEOUT) == "5", g.tail()
        out = netns.run(["busybox", "ping", "-c", "3", "-W", "3", f"{subnet}.2"], check=False)
        assert "3 packets received" in out.stdout, out.stdout + out.stderr
        poke(netns, f"{subnet}.2", 7000)
        _guest_done(g)
    print(f"boot to VX-READY {t_boot:.1f} s")


@pytest.mark.netns
def test_tap_file_both_ways(
    guest_image: Any, e2e_dir: Path, netns: Any, vhostx_daemon: Callable[..., Any], subnet: str
) -> None:
    sock = e2e_dir / "net0.sock"
    vhostx_daemon(
        [_device("net0", sock, "tap", tap_netns=netns.name, tap_address=f"{subnet}.1/24")]
    )
    receiver = NetnsReceiver(netns, f"{subnet}.1", 5001, JOB_TIMEOUT + BOOT_TIMEOUT)
    job = (
        f"vx_wait_peer {subnet}.1 60 || exit 10\n"
        f"vx_gen_file /tmp/out {FILE_MIB}\n"
        "vx_result sent_md5 $(vx_md5 /tmp/out)\n"
        f"vx_send /tmp/out {subnet}.1 5001 || exit 11\n"
        "vx_recv /tmp/in 5002 || exit 12\n"
        "vx_result recv_size $(stat -c %s /tmp/in)\n"
        "vx_result recv_md5 $(vx_md5 /tmp/in)\n"
    )
    nic = VhostUserNic(sock, mac="52:54:00:c8:00:02", ip=f"{subnet}.2/24")
    to_guest = os.urandom(FILE_MIB << 20)
    with receiver, Guest(guest_image, [nic], job, name="tapfile", workdir=e2e_dir) as g:
        g.wait_ready(BOOT_TIMEOUT)
        sent_md5 = g.result("sent_md5", JOB_TIMEOUT)
        t0 = time.monotonic()
        data = receiver.join(JOB_TIMEOUT)
        t_up = time.monotonic() - t0
        assert data is not None, f"nothing arrived from the guest ({receiver.error})\n{g.tail()}"
        assert len(data) == FILE_MIB << 20
        assert hashlib.md5(data).hexdigest() == sent_md5
        t0 = time.monotonic()
        poke(netns, f"{subnet}.2", 5002, to_guest)
        t_down = time.monotonic() - t0
        _guest_done(g)
        assert g.results["recv_size"] == str(len(to_guest))
        assert g.results["recv_md5"] == hashlib.md5(to_guest).hexdigest()
    print(f"{FILE_MIB} MiB guest->netns {t_up:.1f} s, netns->guest {t_down:.1f} s")


# ---------------------------------------------------------------------------------- switch port


def _two_switch_guests(
    e2e_dir: Path, vhostx_daemon: Callable[..., Any], subnet: str
) -> tuple[VhostUserNic, VhostUserNic]:
    a, b = e2e_dir / "a.sock", e2e_dir / "b.sock"
    sw = f"sw{os.getpid()}"
    vhostx_daemon([_device("a", a, "switch", switch=sw), _device("b", b, "switch", switch=sw)])
    return (
        VhostUserNic(a, mac="52:54:00:c9:00:0a", ip=f"{subnet}.10/24"),
        VhostUserNic(b, mac="52:54:00:c9:00:0b", ip=f"{subnet}.11/24"),
    )


def test_switch_two_guests_ping_each_other(
    guest_image: Any, e2e_dir: Path, vhostx_daemon: Callable[..., Any], subnet: str
) -> None:
    nic_a, nic_b = _two_switch_guests(e2e_dir, vhostx_daemon, subnet)
    job_a = f"vx_wait_peer {subnet}.11 120 || exit 10\nvx_ping {subnet}.11 3\n"
    job_b = f"vx_wait_peer {subnet}.10 120 || exit 10\nvx_ping {subnet}.10 3\n"
    with (
        Guest(guest_image, [nic_a], job_a, name="swa", workdir=e2e_dir) as ga,
        Guest(guest_image, [nic_b], job_b, name="swb", workdir=e2e_dir) as gb,
    ):
        ta = ga.wait_ready(BOOT_TIMEOUT)
        tb = gb.wait_ready(BOOT_TIMEOUT)
        _guest_done(ga)
        _guest_done(gb)
        assert ga.results["ping_received"] == "3"
        assert gb.results["ping_received"] == "3"
    print(f"boot to VX-READY (two guests at once) {ta:.1f} s and {tb:.1f} s")


def test_switch_file_between_guests(
    guest_image: Any, e2e_dir: Path, vhostx_daemon: Callable[..., Any], subnet: str
) -> None:
    nic_a, nic_b = _two_switch_guests(e2e_dir, vhostx_daemon, subnet)
    job_a = (
        f"vx_gen_file /tmp/out {FILE_MIB}\n"
        "vx_result sent_md5 $(vx_md5 /tmp/out)\n"
        f"vx_wait_peer {subnet}.11 120 || exit 10\n"
        f"vx_send /tmp/out {subnet}.11 5000 60 || exit 11\n"
    )
    job_b = (
        "vx_recv /tmp/in 5000 || exit 12\n"
        "vx_result recv_size $(stat -c %s /tmp/in)\n"
        "vx_result recv_md5 $(vx_md5 /tmp/in)\n"
    )
    with (
        Guest(guest_image, [nic_b], job_b, name="swrecv", workdir=e2e_dir) as gb,
        Guest(guest_image, [nic_a], job_a, name="swsend", workdir=e2e_dir) as ga,
    ):
        gb.wait_ready(BOOT_TIMEOUT)
        ga.wait_ready(BOOT_TIMEOUT)
        sent = ga.result("sent_md5", JOB_TIMEOUT)
        t0 = time.monotonic()
        _guest_done(gb)
        elapsed = time.monotonic() - t0
        _guest_done(ga)
        assert gb.results["recv_size"] == str(FILE_MIB << 20)
        assert gb.results["recv_md5"] == sent
    print(f"{FILE_MIB} MiB guest->guest through the switch in about {elapsed:.1f} s")


_UNCLEAN_STOP = ("ring restore failed", "Failed to read msg header")


@pytest.mark.netns
@pytest.mark.parametrize("port", ["switch", "tap"])
def test_guest_poweroff_answers_get_vring_base(
    guest_image: Any,
    e2e_dir: Path,
    netns: Any,
    vhostx_daemon: Callable[..., Any],
    subnet: str,
    port: str,
) -> None:
    """At poweroff QEMU stops each ring with GET_VRING_BASE; the daemon must answer every one.

    Pins the bug fixed in 3868f2e: stopping the RX ring of a switch device first made the daemon
    replan with TX only, Switch.add_port([]) raised, and QEMU's GET_VRING_BASE went unanswered
    ('Failed to read msg header ... Original request 11', 'vhost VQ 0 ring restore failed')."""
    sock = e2e_dir / "net0.sock"
    opts = {"tap_netns": netns.name, "tap_address": f"{subnet}.1/24"} if port == "tap" else {}
    vhostx_daemon([_device("net0", sock, port, **opts)])
    nic = VhostUserNic(sock, mac="52:54:00:ca:00:02", ip=f"{subnet}.2/24")
    with Guest(guest_image, [nic], "true\n", name=f"off{port}", workdir=e2e_dir) as g:
        g.wait_ready(BOOT_TIMEOUT)
        g.wait_done(JOB_TIMEOUT)
        assert g.stop() == 0
    bad = [ln for ln in g.console.splitlines() if any(s in ln for s in _UNCLEAN_STOP)]
    assert not bad, "\n".join(bad)
