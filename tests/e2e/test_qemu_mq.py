"""Multiqueue QEMU guests (TCG, Debian 6.1 kernel) against the daemon's tap port.

A guest with N queue pairs (`-netdev vhost-user,queues=N`, `mq=on`, `-smp N` so that Linux enables
all N pairs and maps vCPU i to TX queue i through XPS) opens N TCP connections to a network
namespace holding the TAP, each from a process pinned to another vCPU, and moves a file up and a
file down on each with matching checksums. The TAP has one queue per pair (IFF_MULTI_QUEUE): the
kernel sends each flow's packets back on the queue the flow last came from, so RX spreads too. The
daemon's per-queue counters must show packets on every RX and every TX ring.

Before the per-queue-pair repeats were accepted, such a guest never got its network up: the second
pair's ADD_MEM_REG was refused as an overlap of the first pair's identical region.

Also: a guest with fewer vCPUs than pairs (the idle pair's TAP queue must be detached, or new flows
from the namespace are steered to a queue nobody reads), and QEMU's start without the warning it
printed while the device offered PROTOCOL_F_CONFIG.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netns_peer import poke, recv_all

from bench.qemu import Guest, VhostUserNic

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

BOOT_TIMEOUT = 300.0  # TCG with -smp 4 on a loaded 2-core machine
JOB_TIMEOUT = 600.0
FILE_KIB = 1024  # per connection and direction
UP_PORT, DOWN_PORT, DONE_PORT = 5100, 5200, 7000
# QEMU prints these on start when the backend offers what it will not use.
_OFFER_WARNINGS = ("but QEMU does not", "backend supports")


def _device(name: str, sock: Path, port: str, **opts: object) -> str:
    extra = "".join(f",{k}={v}" for k, v in opts.items())
    return f"name={name},type=net,socket={sock},port={port}{extra}"


def _serve_once(server: socket.socket, send: bytes | None, box: dict[str, Any], key: str) -> None:
    """Accept one connection: read everything it sends (send is None) or send `send` and close."""
    server.settimeout(BOOT_TIMEOUT + JOB_TIMEOUT)
    try:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(JOB_TIMEOUT)
            if send is None:
                box[key] = recv_all(conn)
            else:
                conn.sendall(send)
                box[key] = True
    except OSError as err:
        box[key] = err
    finally:
        server.close()


def _job(host: str, pairs: int) -> str:
    last = pairs - 1
    return (
        "vx_result tx_queues $(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)\n"
        "vx_result rx_queues $(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)\n"
        "vx_result cpus $(nproc)\n"
        f"vx_wait_peer {host} 120 || exit 10\n"
        f"dd if=/dev/urandom of=/tmp/out bs=1024 count={FILE_KIB} 2>/dev/null\n"
        "vx_result sent_sha $(sha256sum /tmp/out | cut -d' ' -f1)\n"
        # one upload per vCPU: XPS puts the data of the connection made on vCPU i on TX queue i
        f"for i in $(seq 0 {last}); do\n"
        f"  taskset -c $i nc -w 20 {host} $(({UP_PORT}+i)) < /tmp/out &\n"
        "done\n"
        "wait\n"
        f"for i in $(seq 0 {last}); do\n"
        f"  taskset -c $i sh -c \"nc {host} $(({DOWN_PORT}+i)) < /dev/null > /tmp/in$i\" &\n"
        "done\n"
        "wait\n"
        f"for i in $(seq 0 {last}); do\n"
        "  vx_result in${i}_sha $(sha256sum /tmp/in$i | cut -d' ' -f1)\n"
        "done\n"
        "vx_result transfers_done 1\n"
        # stay up (rings running, counters readable) until the host has read the daemon's stats
        f"nc -l -p {DONE_PORT} > /dev/null\n"
    )


def _cli_stats(control: str) -> dict[str, Any]:
    """`vhostx stats --json` against the daemon's control socket."""
    out = subprocess.run(
        [sys.executable, "-m", "vhostx", "stats", "--control", control, "--json"],
        check=True, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _device_stats(stats: dict[str, Any], name: str) -> dict[str, Any]:
    devices = stats.get("devices", stats)
    if isinstance(devices, list):
        return next(d for d in devices if d.get("name") == name)
    return devices[name]  # type: ignore[no-any-return]


@pytest.mark.parametrize("pairs", [2, 4])
def test_qemu_mq_guest_spreads_traffic_over_every_queue_pair(
    pairs: int,
    guest_image: Any,
    e2e_dir: Path,
    netns: Any,
    vhostx_daemon: Callable[..., Any],
    subnet: str,
) -> None:
    host, guest_ip = f"{subnet}.1", f"{subnet}.2"
    sock = e2e_dir / "net0.sock"
    daemon = vhostx_daemon(
        [_device("net0", sock, "tap", queues=pairs, tap_netns=netns.name,
                 tap_address=f"{host}/24")]
    )  # fmt: skip
    box: dict[str, Any] = {}
    downloads = [os.urandom(FILE_KIB << 10) for _ in range(pairs)]
    threads = []
    for i in range(pairs):
        up = netns.call(socket.create_server, (host, UP_PORT + i))
        down = netns.call(socket.create_server, (host, DOWN_PORT + i))
        threads.append(threading.Thread(target=_serve_once, args=(up, None, box, f"up{i}"),
                                        daemon=True))
        threads.append(threading.Thread(target=_serve_once, args=(down, downloads[i], box,
                                                                  f"down{i}"), daemon=True))
    for t in threads:
        t.start()
    nic = VhostUserNic(sock, mac="52:54:00:cb:00:02", ip=f"{guest_ip}/24", queues=pairs)
    name = f"mq{pairs}"
    with Guest(guest_image, [nic], _job(host, pairs), name=name, cpus=pairs,
               workdir=e2e_dir) as g:  # fmt: skip
        g.wait_ready(BOOT_TIMEOUT)
        assert g.result("tx_queues", 60) == str(pairs), g.tail()
        assert g.result("rx_queues", 60) == str(pairs), g.tail()
        sent_sha = g.result("sent_sha", JOB_TIMEOUT)
        g.result("transfers_done", JOB_TIMEOUT)
        stats = _cli_stats(daemon.control)
        poke(netns, guest_ip, DONE_PORT)
        try:
            g.wait_done(120)
        finally:
            print(f"\n--- {g.name} console ---\n{g.tail(40)}")
        for t in threads:
            t.join(30)
        for i in range(pairs):
            assert isinstance(box.get(f"up{i}"), bytes), box.get(f"up{i}")
            assert len(box[f"up{i}"]) == FILE_KIB << 10, f"upload {i}"
            assert hashlib.sha256(box[f"up{i}"]).hexdigest() == sent_sha, f"upload {i}"
            assert g.results[f"in{i}_sha"] == hashlib.sha256(downloads[i]).hexdigest(), i
        warnings = [ln for ln in g.console.splitlines() if any(w in ln for w in _OFFER_WARNINGS)]
        assert not warnings, "\n".join(warnings)
    dev = _device_stats(stats, "net0")
    queues = dev["queues"]
    packets = {int(q): s["packets"] for q, s in queues.items()}
    print(f"acked features {dev['features']}, protocol features {dev['protocol_features']}")
    print(f"packets per ring (2i = RX of pair i, 2i+1 = TX): {dict(sorted(packets.items()))}")
    assert sorted(packets) == list(range(2 * pairs)), queues.keys()
    idle = [q for q, n in packets.items() if n == 0]
    assert not idle, f"rings {idle} carried no packet: {packets}"
    assert dev["counters"]["protocol_errors"] == 0
    assert dev["counters"]["repeats"] > 0  # the other pairs' vhost devices did repeat


def _send_once(netns: Any, host: str, port: int, data: bytes) -> None:
    """One connection from the namespace (no retry: a SYN steered to a TAP queue nobody reads
    would be lost for good, and a retry from another port could hide that), send, close."""
    s = netns.call(socket.socket, socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(60)
        s.connect((host, port))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the guest closes once it has read everything


def test_qemu_mq_guest_using_fewer_pairs_than_offered(
    guest_image: Any,
    e2e_dir: Path,
    netns: Any,
    vhostx_daemon: Callable[..., Any],
    subnet: str,
) -> None:
    """One vCPU: Linux enables one of the two pairs and QEMU disables the other's rings. The TAP
    queue of the idle pair must be detached, or the kernel steers new flows from the namespace to
    a queue nobody reads: connections the namespace opens to the guest all succeed, files move
    both ways, and QEMU starts without an offer warning."""
    host, guest_ip = f"{subnet}.1", f"{subnet}.2"
    flows = 6  # with both TAP queues attached, each new flow's SYN has an even chance of loss
    sock = e2e_dir / "net0.sock"
    daemon = vhostx_daemon(
        [_device("net0", sock, "tap", queues=2, tap_netns=netns.name, tap_address=f"{host}/24")]
    )
    box: dict[str, Any] = {}
    up = netns.call(socket.create_server, (host, UP_PORT))
    uploader = threading.Thread(target=_serve_once, args=(up, None, box, "up"), daemon=True)
    uploader.start()
    downloads = [os.urandom(256 << 10) for _ in range(flows)]
    job = (
        "vx_result tx_queues $(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)\n"
        f"for i in $(seq 0 {flows - 1}); do nc -l -p $(({DOWN_PORT}+i)) > /tmp/in$i & done\n"
        "sleep 1\n"
        "vx_result listening 1\n"
        "wait\n"
        f"for i in $(seq 0 {flows - 1}); do\n"
        "  vx_result in${i}_sha $(sha256sum /tmp/in$i | cut -d' ' -f1)\n"
        "done\n"
        f"dd if=/dev/urandom of=/tmp/out bs=1024 count={FILE_KIB} 2>/dev/null\n"
        "vx_result sent_sha $(sha256sum /tmp/out | cut -d' ' -f1)\n"
        f"vx_send /tmp/out {host} {UP_PORT} || exit 11\n"
    )
    nic = VhostUserNic(sock, mac="52:54:00:cb:00:03", ip=f"{guest_ip}/24", queues=2)
    with Guest(guest_image, [nic], job, name="mq2cpu1", cpus=1, workdir=e2e_dir) as g:
        g.wait_ready(BOOT_TIMEOUT)
        assert g.result("tx_queues", 60) == "1", g.tail()
        g.result("listening", JOB_TIMEOUT)
        stats = _cli_stats(daemon.control)
        for i, data in enumerate(downloads):
            _send_once(netns, guest_ip, DOWN_PORT + i, data)
        sent_sha = g.result("sent_sha", JOB_TIMEOUT)
        try:
            g.wait_done(JOB_TIMEOUT)
        finally:
            print(f"\n--- {g.name} console ---\n{g.tail(30)}")
        uploader.join(30)
        for i, data in enumerate(downloads):
            assert g.results[f"in{i}_sha"] == hashlib.sha256(data).hexdigest(), i
        assert isinstance(box.get("up"), bytes), box.get("up")
        assert hashlib.sha256(box["up"]).hexdigest() == sent_sha
        warnings = [ln for ln in g.console.splitlines() if any(w in ln for w in _OFFER_WARNINGS)]
        assert not warnings, "\n".join(warnings)
    queues = _device_stats(stats, "net0")["queues"]
    assert sorted(int(q) for q in queues) == [0, 1], queues  # pair 1 never ran


@pytest.mark.parametrize("queues", [1, 2])
def test_qemu_start_prints_no_offer_warning(
    queues: int, guest_image: Any, e2e_dir: Path, vhostx_daemon: Callable[..., Any]
) -> None:
    """QEMU 7.2 printed "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does
    not" (once per queue pair) on every start while the net device offered CONFIG."""
    sock = e2e_dir / "net0.sock"
    vhostx_daemon([_device("net0", sock, "sink", queues=queues)])
    nic = VhostUserNic(sock, queues=queues)
    with Guest(guest_image, [nic], "true\n", name=f"warn{queues}", cpus=queues,
               workdir=e2e_dir) as g:  # fmt: skip
        g.wait_ready(BOOT_TIMEOUT)
        g.wait_done(JOB_TIMEOUT)
        assert g.stop() == 0
    qemu_lines = [ln for ln in g.console.splitlines() if ln.startswith("qemu-system")]
    warnings = [ln for ln in qemu_lines if any(w in ln for w in _OFFER_WARNINGS)]
    assert not warnings, "\n".join(warnings)


def test_qemu_mq_two_guests_on_the_switch_use_every_pair(
    guest_image: Any, e2e_dir: Path, vhostx_daemon: Callable[..., Any], subnet: str
) -> None:
    """Two guests with two pairs each on the daemon's switch: connections from processes pinned
    to each vCPU of the sender to listeners pinned likewise on the receiver; the switch hashes each
    flow to one of the receiver's RX rings (eight flows: all on one ring has a chance of 1/128).
    Files arrive intact and every ring of both devices carries packets."""
    pairs, flows, kib = 2, 8, 256
    a_sock, b_sock = e2e_dir / "a.sock", e2e_dir / "b.sock"
    sw = f"mqsw{os.getpid()}"
    daemon = vhostx_daemon([
        _device("a", a_sock, "switch", switch=sw, queues=pairs),
        _device("b", b_sock, "switch", switch=sw, queues=pairs),
    ])  # fmt: skip
    a_ip, b_ip = f"{subnet}.10", f"{subnet}.11"
    job_b = (
        # busybox nc quits when the peer's side closes: a listener whose stdin is at EOF (that of
        # a background job) would close its side at once and cut the sender short, so stdin is a
        # pipe that stays open
        f"for i in $(seq 0 {flows - 1}); do\n"
        f"  (sleep 900 | taskset -c $((i % {pairs})) nc -l -p $(({UP_PORT}+i)) > /tmp/in$i) &\n"
        "done\n"
        "sleep 1\n"
        "while pidof nc > /dev/null; do sleep 1; done\n"
        f"for i in $(seq 0 {flows - 1}); do\n"
        "  vx_result in${i}_sha $(sha256sum /tmp/in$i | cut -d' ' -f1)\n"
        "  vx_result in${i}_size $(stat -c %s /tmp/in$i)\n"
        "done\n"
        "sleep 600\n"
    )
    job_a = (
        f"dd if=/dev/urandom of=/tmp/out bs=1024 count={kib} 2>/dev/null\n"
        "vx_result sent_sha $(sha256sum /tmp/out | cut -d' ' -f1)\n"
        f"vx_wait_peer {b_ip} 120 || exit 10\n"
        f"for i in $(seq 0 {flows - 1}); do\n"
        # helpers of vx-lib.sh do not reach a `sh -c`: the retry loop is spelled out
        f"  taskset -c $((i % {pairs})) sh -c \"for t in \\$(seq 30); do"
        f" nc -w 20 {b_ip} $(({UP_PORT}+i)) < /tmp/out && exit 0;"
        " echo VX-RETRY $i \\$t; sleep 1; done; exit 1\" &\n"
        "done\n"
        "wait\n"
        "vx_result transfers_done 1\n"
        "sleep 600\n"  # rings stay up until the host has read the counters, then QEMU is stopped
    )
    nic_a = VhostUserNic(a_sock, mac="52:54:00:cc:00:0a", ip=f"{a_ip}/24", queues=pairs)
    nic_b = VhostUserNic(b_sock, mac="52:54:00:cc:00:0b", ip=f"{b_ip}/24", queues=pairs)
    with (
        Guest(guest_image, [nic_b], job_b, name="mqswb", cpus=pairs, workdir=e2e_dir) as gb,
        Guest(guest_image, [nic_a], job_a, name="mqswa", cpus=pairs, workdir=e2e_dir) as ga,
    ):
        gb.wait_ready(BOOT_TIMEOUT)
        ga.wait_ready(BOOT_TIMEOUT)
        sent_sha = ga.result("sent_sha", JOB_TIMEOUT)
        try:
            ga.result("transfers_done", JOB_TIMEOUT)
            for i in range(flows):
                got = gb.result(f"in{i}_sha", JOB_TIMEOUT)
                assert got == sent_sha, (i, gb.result(f"in{i}_size", 30), ga.tail(), gb.tail())
            stats = _cli_stats(daemon.control)
        finally:
            print(f"\n--- {ga.name} ---\n{ga.tail(12)}\n--- {gb.name} ---\n{gb.tail(12)}")
    for name in ("a", "b"):
        packets = {int(q): s["packets"] for q, s in _device_stats(stats, name)["queues"].items()}
        print(f"{name}: packets per ring {dict(sorted(packets.items()))}")
        assert sorted(packets) == list(range(2 * pairs)), packets
        assert all(packets.values()), f"device {name}: a ring carried no packet: {packets}"
