"""Fuzz target of the sans-IO vhost-user parser (virtio/vhost_user.py) under atheris (libFuzzer
for Python, coverage of the instrumented module).

Input: byte 0 picks the role (bit 0: FrontendConnection, which first issues the requests named
by the next byte's count of request-selector bytes; else BackendConnection) and the end (bit 1:
``close()``, else ``feed(b"")``); the rest is a list
of chunks, each ``u16 length, u8 fd count (% 9), bytes``: one ``feed(bytes, fds)`` per chunk, then
EOF. Fds are dups of /dev/null made before the first feed (so no fd number is
reused while the parser works).

Invariants (a violation raises, which atheris reports as a crash):
  - feed raises nothing but RemoteProtocolError;
  - every fd given to the parser ends up exactly once either in a returned Message (the caller
    owns it: open) or closed by the parser; none is left open and unowned, none is closed twice;
  - after a failure, every later feed raises and closes the fds it was given;
  - a returned backend Message names a Request, carries flags with version 1 and no REPLY bit.

Run with scripts/fuzz.sh vhost_user SECONDS (seeds: fuzz/corpus/vhost_user; write them again
with ``python fuzz/fuzz_vhost_user.py --make-seeds``).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from virtio import vhost_user as vu
    from virtio.errors import RemoteProtocolError

__all__ = ["one_input"]

_NULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
_FRONTEND_ASKS = [
    (vu.Request.GET_FEATURES, None, False),
    (vu.Request.GET_PROTOCOL_FEATURES, None, False),
    (vu.Request.GET_QUEUE_NUM, None, False),
    (vu.Request.GET_STATUS, None, False),
    (vu.Request.GET_VRING_BASE, vu.VringState(0, 0), False),
    (vu.Request.GET_CONFIG, vu.Config(0, 8, 0, bytes(8)), False),
    (vu.Request.GET_INFLIGHT_FD, vu.Inflight(0, 0, 2, 256), False),
    (vu.Request.POSTCOPY_ADVISE, None, False),
    (vu.Request.SET_FEATURES, 1 << 32, True),
    (vu.Request.SET_LOG_BASE, vu.Log(4096, 0), False),
]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _chunks(data: bytes, pos: int) -> list[tuple[bytes, int]]:
    out = []
    while pos + 3 <= len(data) and len(out) < 64:
        n, nfds = struct.unpack_from("<HB", data, pos)
        pos += 3
        out.append((data[pos:pos + n], nfds % 9))
        pos += n
    return out


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    frontend = data[0] & 1
    pos = 1
    if frontend:
        conn: vu._Parser = vu.FrontendConnection()
        n = data[1] % 8
        for sel in data[2:2 + n]:
            req, payload, need = _FRONTEND_ASKS[sel % len(_FRONTEND_ASKS)]
            conn.request(req, payload, need_reply=need)  # type: ignore[attr-defined]
        pos = 2 + n
    else:
        conn = vu.BackendConnection()
    chunks = _chunks(data, pos)
    given = [[os.dup(_NULL) for _ in range(nfds)] for _, nfds in chunks]
    owned: list[int] = []
    failed = False
    try:
        for (chunk, _), fds in zip(chunks, given, strict=True):
            was_failed = conn.failed
            try:
                msgs = conn.feed(chunk, fds)
            except RemoteProtocolError:
                failed = True
                continue
            if was_failed:
                raise AssertionError("feed succeeded on a failed connection")
            for m in msgs:
                owned.extend(m.fds)
                if not frontend:
                    assert isinstance(m.request, vu.Request), m
                    assert m.flags & vu.FLAG_VERSION_MASK == vu.VERSION, m
                    assert not m.flags & vu.FLAG_REPLY, m
        if data[0] & 2:
            conn.close()  # the transport went away (idempotent, closes held fds)
            conn.close()
        elif not conn.closed:
            try:
                conn.feed(b"")
            except RemoteProtocolError:
                failed = True
        assert len(owned) == len(set(owned)), f"an fd handed out twice: {owned}"
        for fd in (fd for fds in given for fd in fds):
            if fd in owned:
                assert _is_open(fd), f"fd {fd} in a returned message was closed by the parser"
            else:
                assert not _is_open(fd), (
                    f"fd {fd} neither handed out nor closed (failed={failed})")
    finally:
        for fds in given:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _seed(frontend: bool, asks: bytes, chunks: list[tuple[bytes, int]]) -> bytes:
    out = bytes([1 if frontend else 0])
    if frontend:
        out += bytes([len(asks)]) + asks
    for b, nfds in chunks:
        out += struct.pack("<HB", len(b), nfds) + b
    return out


def make_seeds(dest: Path) -> int:
    fc = vu.FrontendConnection()
    R = vu.Request
    msgs = [
        (fc.request(R.GET_FEATURES), 0),
        (fc.request(R.SET_PROTOCOL_FEATURES, 0x10009), 0),
        (fc.request(R.SET_OWNER), 0),
        (fc.request(R.SET_FEATURES, 1 << 32 | 1 << 30), 0),
        (fc.request(R.SET_MEM_TABLE, vu.MemTable((vu.MemRegion(0, 1 << 20, 1 << 40, 0),)),
                    [0]), 1),
        (fc.request(R.SET_VRING_NUM, vu.VringState(0, 256)), 0),
        (fc.request(R.SET_VRING_ADDR, vu.VringAddr(0, 0, 1 << 40, 1 << 40 | 8192,
                                                    1 << 40 | 4096, 0)), 0),
        (fc.request(R.SET_VRING_BASE, vu.VringState(0, 0)), 0),
        (fc.request(R.SET_VRING_KICK, vu.VringFile(0), [0]), 1),
        (fc.request(R.SET_VRING_CALL, vu.VringFile(1, nofd=True)), 0),
        (fc.request(R.SET_VRING_ENABLE, vu.VringState(0, 1), need_reply=True), 0),
        (fc.request(R.GET_CONFIG, vu.Config(0, 10, 0, bytes(10))), 0),
        (fc.request(R.ADD_MEM_REG, vu.SingleMemRegion(vu.MemRegion(1 << 30, 4096, 1, 0)), [0]), 1),
        (fc.request(R.REM_MEM_REG, vu.SingleMemRegion(vu.MemRegion(1 << 30, 4096, 1, 0)), [0]), 1),
        (fc.request(R.SET_STATUS, 15), 0),
        (fc.request(R.GET_VRING_BASE, vu.VringState(0, 0)), 0),
    ]
    seeds = {
        "qemu-setup": _seed(False, b"", msgs),
        "one-chunk": _seed(False, b"", [(b"".join(m for m, _ in msgs[:4]), 0)]),
        "split-bytes": _seed(False, b"", [(msgs[4][0][:5], 0), (msgs[4][0][5:], 1)]),
        "bad-size": _seed(False, b"", [(struct.pack("=III", 8, 1, 3) + b"abc", 0)]),
        "unknown": _seed(False, b"", [(struct.pack("=III", 1000, 1, 0), 2)]),
        "eof-mid": _seed(False, b"", [(msgs[5][0][:14], 0)]),
    }
    bc = vu.BackendConnection()
    replies = []
    for req, payload in ((R.GET_FEATURES, 1 << 32), (R.GET_PROTOCOL_FEATURES, 0x8009),
                         (R.GET_QUEUE_NUM, 1), (R.GET_STATUS, 15)):
        m = vu.Message(req, vu.VERSION, None)
        replies.append((bc.reply(m, payload), 0))
    seeds["frontend-replies"] = _seed(True, bytes([0, 1, 2, 3]), replies)
    seeds["frontend-inflight"] = _seed(
        True, bytes([6]), [(bc.reply(vu.Message(R.GET_INFLIGHT_FD, 1, None),
                                     vu.Inflight(4096, 0, 2, 256)), 1)])
    seeds["frontend-ack"] = _seed(True, bytes([8]), [(struct.pack("=IIIQ", 2, 5, 8, 0), 0)])
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (dest / f"seed-{name}").write_bytes(data)
    return len(seeds)


def main() -> None:
    if sys.argv[1:] == ["--make-seeds"]:
        n = make_seeds(Path(__file__).resolve().parent / "corpus" / "vhost_user")
        print(f"vhost_user: {n} seeds")
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
