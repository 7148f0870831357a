"""A hostile vhost-user frontend at scale, against a real daemon, while a good guest forwards.

`run()` starts one daemon (bench/process.py) with two devices: `victim` (a sink) and `good` (an
echo port). A guest model (virtio/frontend.py NetDriver) on `good` keeps sending numbered frames
of random sizes and contents and checks that every one comes back, byte for byte (with the MACs
swapped, as the echo port does). Meanwhile connection after connection to `victim` sends message
sequences with fds: valid vhost-user set-ups (memfd memory, eventfd kicks and calls, rings that
really start), random requests with legal sizes and random payloads, bogus fds (a pipe, /dev/null,
a memfd where an eventfd belongs, an eventfd where memory belongs, a socket), ring memory
scribbled on and kicked, and mutations of all of it (flipped bits, wrong sizes, cut messages, fds
added or dropped). A message the daemon refuses closes that connection; the next one starts
afresh. The daemon's RSS, open fds and mappings (/proc/PID/status, fd/, maps) are sampled
throughout.

`python -m bench.hostile --messages 1000000` (the long run, docs/reliability.md) prints the
report as JSON; tests/e2e/test_hostile.py runs a short one. `--tracemalloc DIR` runs the daemon
under bench/malloc_trace.py (tracemalloc snapshots, object census and malloc statistics in DIR). Exit status 0 when the daemon lived,
the good device lost nothing and the fd count came back to where it started.

Threads: the main thread sends the hostile traffic (and owns the daemon); one thread runs the
good guest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.process import DaemonProcess
from virtio import vhost_user as vu
from virtio.frontend import NetDriver, VhostUserFrontend

__all__ = ["HostileReport", "ProcSample", "run", "sample"]

R = vu.Request
MEM_SIZE = 4 << 20
UVA = 0x7E00_0000_0000  # the hostile guest's "address" of its memory
QUEUE_SIZE = 256


@dataclass
class ProcSample:
    t: float
    rss_kib: int
    fds: int
    maps: int
    anon_kib: int = 0  # the anonymous part of the RSS (heap, stacks): where a leak would show
    shmem_kib: int = 0  # shared memory mapped (the guests' memfds), the rest being file pages


def sample(pid: int, t0: float) -> ProcSample:
    """RSS (and its anonymous and shared-memory parts), open fds and mappings of `pid` now."""
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                status[key] = int(line.split()[1])
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return ProcSample(round(time.monotonic() - t0, 2), status.get("VmRSS", 0),
                      len(os.listdir(f"/proc/{pid}/fd")), maps, status.get("RssAnon", 0),
                      status.get("RssShmem", 0))


@dataclass
class HostileReport:
    messages: int = 0
    connections: int = 0
    closed_by_daemon: int = 0
    seconds: float = 0.0
    good_sent: int = 0
    good_received: int = 0
    good_lost: int = 0
    good_corrupt: int = 0
    daemon_alive: bool = True
    victim: dict[str, Any] = field(default_factory=dict)
    samples: list[ProcSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def start(self) -> ProcSample:
        return self.samples[0]

    @property
    def end(self) -> ProcSample:
        return self.samples[-1]

    def ok(self, rss_slack_kib: int = 64 << 10, fd_slack: int = 0) -> bool:
        return (self.daemon_alive and not self.errors and self.good_lost == 0
                and self.good_corrupt == 0 and self.good_received == self.good_sent > 0
                and self.end.fds <= self.start.fds + fd_slack
                and self.end.rss_kib <= self.start.rss_kib + rss_slack_kib)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["start"], d["end"] = asdict(self.start), asdict(self.end)
        d["max"] = {k: max(getattr(s, k) for s in self.samples)
                    for k in ("rss_kib", "anon_kib", "fds", "maps")}
        d["samples"] = [asdict(s) for s in self.samples[:: max(1, len(self.samples) // 20)]]
        d["ok"] = self.ok()
        return d


# ---------------------------------------------------------------------------------- good guest


class GoodGuest(threading.Thread):
    """Echo traffic on the good device: every frame must come back, byte for byte."""

    def __init__(self, path: str, seed: int) -> None:
        super().__init__(name="good-guest", daemon=True)
        self.path = path
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.sent = self.received = self.lost = self.corrupt = 0
        self.error: str | None = None

    def _frame(self, n: int) -> bytes:
        size = self.rng.randint(60, 1514)
        body = struct.pack("!Q", n) + self.rng.randbytes(size - 22)
        return bytes.fromhex("525400000002525400000001") + b"\x88\xb5" + body

    def run(self) -> None:
        try:
            with VhostUserFrontend(self.path) as fe:
                net = NetDriver(fe)
                n = 0
                while not self.stop.is_set():
                    batch = [self._frame(n + i) for i in range(32)]
                    n += len(batch)
                    want = {struct.unpack_from("!Q", f, 14)[0]: f[6:12] + f[0:6] + f[12:]
                            for f in batch}
                    posted = net.send(batch, timeout=5.0)
                    self.sent += posted
                    for f in batch[posted:]:
                        del want[struct.unpack_from("!Q", f, 14)[0]]
                    deadline = time.monotonic() + 10.0
                    while want and time.monotonic() < deadline:
                        for f in net.recv(timeout=0.5):
                            seq = struct.unpack_from("!Q", f, 14)[0] if len(f) >= 22 else -1
                            if want.pop(seq, None) == f:
                                self.received += 1
                            else:
                                self.corrupt += 1
                    self.lost += len(want)
        except Exception as err:  # noqa: BLE001 - reported, and the run fails
            self.error = f"good guest: {type(err).__name__}: {err}"


# ------------------------------------------------------------------------------- hostile client


class Fds:
    """The fds the hostile client sends (each send makes new fds in the daemon)."""

    def __init__(self) -> None:
        self.mem = os.memfd_create("hostile-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.mem, MEM_SIZE)
        self.map = mmap.mmap(self.mem, MEM_SIZE)
        self.events = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
        self.pipe = os.pipe()
        self.null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.bogus = [self.pipe[0], self.pipe[1], self.null, self.sock.fileno(), self.mem,
                      self.events[0]]

    def close(self) -> None:
        self.map.close()
        for fd in [self.mem, *self.events, *self.pipe, self.null]:
            os.close(fd)
        self.sock.close()


class HostileClient:
    """Message sequences for one connection: valid set-ups, random requests, mutations."""

    def __init__(self, rng: random.Random, fds: Fds, features: int, pfeatures: int) -> None:
        self.rng = rng
        self.fds = fds
        self.features = features
        self.pfeatures = pfeatures
        self.acked_pf = 0  # protocol features set on the current connection (by setup())

    def msg(self, req: R, payload: Any = None, fds: list[int] | None = None,
            need_reply: bool = False) -> tuple[bytes, list[int]]:
        body = vu.SPECS[req].payload.encode(payload)
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        return vu.encode(req, flags, body), fds or []

    def setup(self) -> list[tuple[bytes, list[int]]]:
        """A QEMU-like set-up whose rings really start (random but legal parameters)."""
        rng, f = self.rng, self.fds
        pf = self.pfeatures if rng.random() < 0.8 else self.pfeatures & rng.getrandbits(64)
        self.acked_pf = pf
        ack = bool(pf >> vu.ProtocolFeature.REPLY_ACK & 1) and rng.random() < 0.5
        out = [self.msg(R.GET_FEATURES), self.msg(R.GET_PROTOCOL_FEATURES),
               self.msg(R.SET_PROTOCOL_FEATURES, pf),
               self.msg(R.SET_OWNER, need_reply=ack),
               self.msg(R.SET_FEATURES, self.features & rng.getrandbits(64), need_reply=ack)]
        region = vu.MemRegion(0, MEM_SIZE, UVA, 0)
        out.append(self.msg(R.SET_MEM_TABLE, vu.MemTable((region,)), [f.mem], need_reply=ack))
        size = 1 << rng.randint(0, 8)
        for i in range(2):
            base = 0x10000 * (i + 1)
            out += [self.msg(R.SET_VRING_NUM, vu.VringState(i, size)),
                    self.msg(R.SET_VRING_BASE, vu.VringState(i, rng.getrandbits(16))),
                    self.msg(R.SET_VRING_ADDR, vu.VringAddr(i, 0, UVA + base, UVA + base + 0x8000,
                                                            UVA + base + 0x4000, 0)),
                    self.msg(R.SET_VRING_KICK, vu.VringFile(i), [f.events[1 + i]]),
                    self.msg(R.SET_VRING_CALL, vu.VringFile(i), [f.events[3]]),
                    self.msg(R.SET_VRING_ENABLE, vu.VringState(i, 1), need_reply=ack)]
        if pf >> vu.ProtocolFeature.STATUS & 1:
            out.append(self.msg(R.SET_STATUS, 15))
        return out

    def random_request(self) -> tuple[bytes, list[int]]:
        """Any request, a payload of a legal size (random bytes, or a plausible value), fds as
        its spec says, of a random kind."""
        rng, f = self.rng, self.fds
        req = rng.choice(list(R))
        spec = vu.SPECS[req]
        codec = spec.payload
        sizes = codec.sizes or (codec.min_size, min(codec.max_size, 300))
        n = rng.choice(sizes) if codec.sizes else rng.randint(*sizes)
        body = bytearray(rng.randbytes(n))
        if n >= 8 and rng.random() < 0.6:  # small numbers: indexes, sizes, 0/1
            struct.pack_into("=Q", body, 0, rng.choice([0, 1, 2, 3, 255, 256, 1 << 15, 1 << 16]))
        nfds = rng.randint(spec.fds[0], spec.fds[1])
        if spec.fd_count is not None:
            with contextlib.suppress(Exception):
                nfds = spec.fd_count(codec.decode(bytes(body)))
        fds = [rng.choice(f.events + f.bogus) for _ in range(min(nfds, 8))]
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if rng.random() < 0.3 else 0)
        return vu.encode(req, flags, bytes(body)), fds

    def _get_config(self, n: int) -> tuple[bytes, list[int]]:
        return self.msg(R.GET_CONFIG, vu.Config(0, n, 0, bytes(n)))

    def benign(self) -> tuple[bytes, list[int]]:
        """A request the device accepts in the state the connection is in."""
        rng, PF = self.rng, vu.ProtocolFeature
        gated = [(PF.MQ, lambda: self.msg(R.GET_QUEUE_NUM)),
                 (PF.STATUS, lambda: self.msg(R.GET_STATUS)),
                 (PF.CONFIG, lambda: self._get_config(rng.choice([6, 8, 10, 12])))]
        return rng.choice([
            *(f for bit, f in gated if self.acked_pf >> bit & 1),
            lambda: self.msg(R.GET_FEATURES),
            lambda: self.msg(R.GET_PROTOCOL_FEATURES),
            lambda: self.msg(R.SET_VRING_CALL, vu.VringFile(rng.randint(0, 1)),
                             [self.fds.events[3]]),
            lambda: self.msg(R.SET_VRING_ENABLE, vu.VringState(rng.randint(0, 1),
                                                               rng.randint(0, 1))),
            lambda: self.msg(R.GET_VRING_BASE, vu.VringState(rng.randint(0, 1), 0)),
            lambda: self.msg(R.SET_VRING_KICK, vu.VringFile(rng.randint(0, 1)),
                             [self.fds.events[1]]),
        ])()

    def mutate(self, data: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        rng = self.rng
        b = bytearray(data)
        how = rng.randrange(7)
        if how == 0 and b:  # flip bits
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif how == 1:  # a lying size
            struct.pack_into("=I", b, 8, rng.choice([0, 1, 7, 9, 4096, 4097, 1 << 31]))
        elif how == 2:  # cut short (the rest of the stream is misframed)
            b = b[: rng.randrange(len(b))]
        elif how == 3:  # fds added or dropped
            fds = fds[:-1] if fds and rng.random() < 0.5 else fds + [rng.choice(self.fds.bogus)]
        elif how == 4:  # bogus fd kinds in place of the right ones
            fds = [rng.choice(self.fds.bogus) for _ in fds]
        elif how == 5:  # unknown request or flags
            struct.pack_into("=II", b, 0, rng.choice([0, 41, 99, 1 << 31]), rng.getrandbits(32))
        else:  # junk appended
            b += rng.randbytes(rng.randint(1, 40))
        return bytes(b), fds

    def scribble(self) -> None:
        """The guest writes garbage into a ring (and its buffers), as a hostile driver would."""
        m, rng = self.fds.map, self.rng
        off = 0x10000 * rng.randint(1, 2) + rng.choice([0, 0x4000, 0x8000]) + rng.randrange(2048)
        m[off:off + 64] = rng.randbytes(64)


def _drain(sock: socket.socket) -> bool:
    """Read whatever the daemon answered; False once it closed the connection."""
    while True:
        if not select.select([sock], [], [], 0)[0]:
            return True
        try:
            data, fds, _flags, _ = socket.recv_fds(sock, 65536, 8)
        except OSError:
            return False
        for fd in fds:
            os.close(fd)
        if not data:
            return False


def _connect(path: str, timeout: float = 5.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _one_connection(path: str, cl: HostileClient, budget: int, rep: HostileReport) -> None:
    rng = cl.rng
    sock = _connect(path)
    sock.settimeout(10.0)  # a daemon that stops reading must not hang the run
    rep.connections += 1
    cl.acked_pf = 0
    script = cl.setup() if rng.random() < 0.7 else []
    length = rng.choice([5, 20, 100, 400, 2000])
    p_bad = rng.choice([0.0, 0.002, 0.01, 0.05, 0.3])
    sent = 0
    try:
        while sent < min(length, budget):
            if script:
                data, fds = script.pop(0)
            elif rng.random() < 0.03:  # most of these end the connection
                data, fds = cl.random_request()
            else:
                data, fds = cl.benign()
            if rng.random() < p_bad:
                data, fds = cl.mutate(data, fds)
            if rng.random() < 0.02:
                cl.scribble()
                os.eventfd_write(cl.fds.events[1 + rng.randint(0, 1)], 1)
            try:
                if fds:
                    socket.send_fds(sock, [data], fds)
                elif data:
                    sock.sendall(data)
            except OSError:
                rep.closed_by_daemon += 1
                return
            sent += 1
            rep.messages += 1
            if sent % 8 == 0 and not _drain(sock):
                rep.closed_by_daemon += 1
                return
        # wait a moment for the answers (or the close) of the last messages
        r, _, _ = select.select([sock], [], [], 0.01)
        if r and not _drain(sock):
            rep.closed_by_daemon += 1
    finally:
        sock.close()


def run(messages: int = 10_000, seconds: float = 60.0, seed: int = 1,
        sample_every: float = 2.0, log: Any = None, tracemalloc_dir: str | None = None,
        tracemalloc_every: float = 30.0) -> HostileReport:
    """The hostile run: stops after `messages` messages or `seconds`, whichever comes first.
    `tracemalloc_dir`: run the daemon under tracemalloc (bench/malloc_trace.py), a snapshot
    there every `tracemalloc_every` seconds."""
    rng = random.Random(seed)
    rep = HostileReport()
    launcher = ["-m", "vhostx"]
    if tracemalloc_dir is not None:
        launcher = ["-m", "bench.malloc_trace", "serve", tracemalloc_dir, str(tracemalloc_every),
                    "--"]
    d = DaemonProcess(log_level="ERROR", launcher=launcher)
    victim = d.add_device("victim", port="sink")
    good_path = d.add_device("good", port="echo")
    fds = Fds()
    good = GoodGuest(good_path, seed + 1)
    try:
        d.start()
        good.start()
        with VhostUserFrontend(victim) as probe:  # what the victim offers
            features, pfeatures = probe.offered_features, probe.offered_protocol_features
        cl = HostileClient(rng, fds, features, pfeatures)
        t0 = time.monotonic()
        time.sleep(0.5)
        rep.samples.append(sample(d.pid, t0))
        next_sample = t0 + sample_every
        while rep.messages < messages and time.monotonic() - t0 < seconds:
            if not d.alive():
                break
            _one_connection(victim, cl, messages - rep.messages, rep)
            if time.monotonic() >= next_sample:
                rep.samples.append(sample(d.pid, t0))
                next_sample += sample_every
                if log is not None:
                    s = rep.samples[-1]
                    print(f"{s.t:8.1f}s {rep.messages:>9} msgs {rep.connections:>7} conns  "
                          f"rss {s.rss_kib} KiB (anon {s.anon_kib})  fds {s.fds}  maps {s.maps}  good "
                          f"{good.received}/{good.sent}", file=log, flush=True)
        rep.seconds = round(time.monotonic() - t0, 1)
        good.stop.set()
        good.join(30)
        rep.daemon_alive = d.alive()
        if rep.daemon_alive:
            time.sleep(1.0)  # the last connection's clean-up
            # the good guest has hung up too: compare with the start, when it was connected,
            # one connection's worth of fds (socket, memfd, 4 eventfds) accounted for
            with VhostUserFrontend(good_path):
                time.sleep(0.3)
                rep.samples.append(sample(d.pid, t0))
            rep.victim = next(x for x in d.stats()["devices"] if x["name"] == "victim")["counters"]
        else:
            rep.errors.append(f"daemon died (exit {d.returncode}):\n{d.log_tail()}")
        rep.good_sent, rep.good_received = good.sent, good.received
        rep.good_lost, rep.good_corrupt = good.lost, good.corrupt
        if good.error:
            rep.errors.append(good.error)
    finally:
        good.stop.set()
        d.cleanup()
        fds.close()
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="write the JSON report here too")
    ap.add_argument("--tracemalloc", metavar="DIR",
                    help="run the daemon under tracemalloc, snapshots in DIR (bench/malloc_trace.py)")
    ap.add_argument("--tracemalloc-every", type=float, default=30.0, metavar="SECONDS")
    args = ap.parse_args(argv)
    rep = run(args.messages, args.seconds, args.seed, sample_every=10.0, log=sys.stderr,
              tracemalloc_dir=args.tracemalloc, tracemalloc_every=args.tracemalloc_every)
    text = json.dumps(rep.as_dict(), indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
