"""A hostile frontend against the real daemon (bench/hostile.py): a short run of the long one,
and the bugs it found, each pinned by a test named after it."""

from __future__ import annotations

import os
import socket
import time

from bench import hostile
from bench.process import DaemonProcess
from virtio import vhost_user as vu
from virtio.frontend import NetDriver, VhostUserFrontend

R = vu.Request


def _fds(d: DaemonProcess) -> int:
    return len(os.listdir(f"/proc/{d.pid}/fd"))


def _send_and_wait_close(path: str, data: bytes, fds: list[int]) -> None:
    s = hostile._connect(path)  # retries while the daemon cleans up the previous connection
    s.settimeout(5)
    socket.send_fds(s, [data], fds) if fds else s.sendall(data)
    s.shutdown(socket.SHUT_WR)  # EOF after the message
    try:
        assert s.recv(100) == b""  # the daemon closed its end: done with this connection
    finally:
        s.close()


def test_bad_ring_index_with_an_fd_does_not_leak_it(daemon_factory) -> None:
    """SET_VRING_KICK/CALL/ERR naming a ring the device does not have closed the connection but
    kept the fd that came with it: one fd leaked per message."""
    d = daemon_factory()
    path = d.add_device("net0", port="sink")
    d.start()
    ev = os.eventfd(0)
    try:
        _send_and_wait_close(path, vu.encode(R.GET_FEATURES, vu.VERSION, b""), [ev])  # warm up
        time.sleep(0.2)
        before = _fds(d)
        for req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            for _ in range(5):
                _send_and_wait_close(path, vu.encode(req, vu.VERSION, vu.VringFile(7).pack()),
                                     [ev])
        time.sleep(0.3)
        assert _fds(d) == before
        assert d.alive()
    finally:
        os.close(ev)


def test_fds_of_a_message_cut_off_by_a_disconnect_are_closed(daemon_factory) -> None:
    """The fds of a message whose bytes never all came (the frontend hung up mid-message, or sent
    them behind a request that closed the connection) stayed with the parser: leaked."""
    d = daemon_factory()
    path = d.add_device("net0", port="sink")
    d.start()
    ev = os.eventfd(0)
    try:
        kick = vu.encode(R.SET_VRING_KICK, vu.VERSION, vu.VringFile(0).pack())
        _send_and_wait_close(path, vu.encode(R.GET_FEATURES, vu.VERSION, b""), [ev])  # warm up
        time.sleep(0.2)
        before = _fds(d)
        for _ in range(5):  # cut off, then EOF
            _send_and_wait_close(path, kick[:15], [ev])
        for _ in range(5):  # behind a request that closes the connection, in the same chunk
            bad = vu.encode(R.SET_VRING_NUM, vu.VERSION, vu.VringState(0, 3).pack())  # refused
            _send_and_wait_close(path, bad + kick[:15], [ev])
        time.sleep(0.5)
        assert _fds(d) == before
    finally:
        os.close(ev)


def test_memory_region_larger_than_its_file_is_refused_not_a_sigbus(daemon_factory) -> None:
    """A SET_MEM_TABLE region reaching past the end of its memfd was mapped as given; the first
    touch of a ring there (the device starting it) killed the daemon with SIGBUS."""
    d = daemon_factory()
    bad = d.add_device("bad", port="sink")
    good = d.add_device("good", port="sink")
    d.start()
    mem = os.memfd_create("short")
    os.ftruncate(mem, 1 << 20)
    uva = 0x7E00_0000_0000
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(bad)
        conn = vu.FrontendConnection()
        table = vu.MemTable((vu.MemRegion(0, 8 << 20, uva, 0),))  # 8 MiB from a 1 MiB file
        msgs: list[tuple[bytes, list[int]]] = [
            (conn.request(R.SET_FEATURES, 1 << 32), []),
            (conn.request(R.SET_MEM_TABLE, table, [mem]), [mem]),
        ]
        ring = uva + (6 << 20)
        ev = os.eventfd(0)
        for i in range(2):
            msgs += [
                (conn.request(R.SET_VRING_NUM, vu.VringState(i, 256)), []),
                (conn.request(R.SET_VRING_ADDR, vu.VringAddr(i, 0, ring, ring + 8192,
                                                              ring + 4096, 0)), []),
                (conn.request(R.SET_VRING_KICK, vu.VringFile(i), [ev]), [ev]),
            ]
        for data, fds in msgs:
            try:
                socket.send_fds(s, [data], fds) if fds else s.sendall(data)
            except OSError:
                break  # refused: the connection is closed
        os.close(ev)
        time.sleep(0.5)
        s.close()
        assert d.alive(), f"daemon died ({d.returncode}):\n{d.log_tail()}"
        with VhostUserFrontend(good) as fe:
            NetDriver(fe).send([bytes(60)])
    finally:
        os.close(mem)


def test_hostile_frontend_short_run() -> None:
    """~20 s of bench.hostile: the daemon lives, the echo device loses nothing, fds stay flat."""
    rep = hostile.run(messages=150_000, seconds=20.0, seed=7)
    d = rep.as_dict()
    assert rep.daemon_alive, rep.errors
    assert not rep.errors, rep.errors
    assert rep.messages > 5_000 and rep.connections > 100, d
    assert rep.good_sent > 0 and rep.good_received == rep.good_sent, d
    assert rep.good_lost == 0 and rep.good_corrupt == 0, d
    assert rep.end.fds <= rep.start.fds, d
    assert rep.end.maps <= rep.start.maps + 4, d
    assert rep.end.rss_kib <= rep.start.rss_kib + (32 << 10), d
