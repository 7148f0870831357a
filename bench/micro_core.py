"""Micro-benchmark of the C core alone: each TX action and rx_fill on one core, no guest.

A C "guest" (virtio.testing.RecyclingDriver, driver-side test support) keeps every ring full, so
the figures are the device side plus a cheap refill, both on the calling thread, no interrupts.
Cases: tx_sink, echo, fwd, tx_to_fd (writev to /dev/null), switch (unicast to a learned port),
rx_fill, rx_fill_mrg, and round: a C poll round (virtio.net.Round, what a shared worker runs) over
--rings N tx_sink rings, --busy of them kept full (the rest empty), ROUND_PASSES passes per call.

Two modes:
- `python bench/micro_core.py [--seconds S]`: packets per second of each case (wall clock).
- `python bench/micro_core.py --count N --case NAME`: exactly N calls of one case, for an
  instruction count that does not depend on the machine's load:
  `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='vx_*' ...` (see --callgrind,
  which runs that for every case and prints instructions per packet).
Single-threaded; prints one line per case with its dimensions.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from virtio import net
from virtio.driver.split import VRING_DESC_F_WRITE, DriverQueue
from virtio.memory import GuestMemory, MemoryRegion
from virtio.ring import DeviceQueue

try:
    from virtio.testing import RecyclingDriver
except ImportError:  # commits before virtio.testing: instruction counts to compare with
    from virtio.ring import RecyclingDriver  # type: ignore[attr-defined,no-redef]

__all__ = ["CASES", "main"]

HDR_LEN = 12
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
# the C entry point each case times (callgrind collects inside it only)
CASES: dict[str, str] = {
    "tx_sink": "vx_net_tx_sink",
    "echo": "vx_net_echo",
    "fwd": "vx_net_fwd",
    "tx_to_fd": "vx_net_tx_to_fd",
    "switch": "vx_switch_tx",
    "rx_fill": "vx_net_rx_fill",
    "rx_fill_mrg": "vx_net_rx_fill",
    "round": "vx_round",
}
ROUND_PASSES = 4  # passes of one `round` call: with ring 256 and batch 64, full rings stay busy


class _Space:
    """One memfd of guest memory, handed out ring by ring."""

    def __init__(self, size: int = 64 << 20) -> None:
        self.fd = os.memfd_create("vx-bench")
        os.ftruncate(self.fd, size)
        self.gpa, self.uva = 0x100000, 0x7F00_0000_0000
        self.mem = GuestMemory.map([MemoryRegion(self.gpa, size, self.uva, 0)], [self.fd])
        self.next = self.gpa
        self.end = self.gpa + size

    def take(self, n: int) -> int:
        gpa = self.next
        self.next = (gpa + n + 4095) & ~4095
        if self.next > self.end:
            raise MemoryError("bench guest memory exhausted")
        return gpa

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


def _ring(
    sp: _Space, size: int, buf_len: int, *, rx: bool, frame: bytes = b"", mrg: bool = False
) -> tuple[RecyclingDriver, DeviceQueue]:
    """A full ring: RX (writable buffers) or TX (each buffer a net header + `frame`)."""
    total = DriverQueue.layout(size)[3]
    gpa = sp.take(total)
    DriverQueue(sp.mem.view(gpa, total), gpa, size)  # lays out and zeroes the ring
    d_off, a_off, u_off, _ = DriverQueue.layout(size)
    drv = RecyclingDriver(sp.mem, gpa + d_off, gpa + a_off, gpa + u_off, size)
    stride = (buf_len + 63) & ~63
    bufs = sp.take(stride * size)
    drv.fill_descs(bufs, stride, buf_len, VRING_DESC_F_WRITE if rx else 0)
    if not rx:
        payload = bytes(HDR_LEN) + frame
        for i in range(size):
            sp.mem.view(bufs + i * stride, buf_len)[:] = payload
    off = gpa - sp.gpa
    dq = DeviceQueue(
        sp.mem,
        index=0,
        size=size,
        desc_uva=sp.uva + off + d_off,
        avail_uva=sp.uva + off + a_off,
        used_uva=sp.uva + off + u_off,
        hdr_len=HDR_LEN,
        mrg_rxbuf=mrg,
    )
    drv.post_all()
    return drv, dq


def _frame(pkt: int, dst: bytes = MAC_B, src: bytes = MAC_A) -> bytes:
    body = bytes(range(256)) * (pkt // 256 + 1)
    return (dst + src + b"\x08\x00" + body)[:pkt]


_Case = tuple[Callable[[], int], Callable[[], None], Callable[[], dict[str, int]], Callable[[], None]]


def build_case(
    name: str, size: int, pkt: int, batch: int, rings: int = 1, busy: int | None = None
) -> _Case:
    """(one call -> packets, refill, counters, close) of case `name`.

    counters: the served queue's, plus `peer_*` of the RX queue written and `switch_*`.
    rings, busy: the `round` case's ring count and how many of them are kept full."""
    sp = _Space()
    keep: list[object] = []
    tx_len = HDR_LEN + pkt
    rx_len = max(2048, HDR_LEN + pkt)
    frame = _frame(pkt)
    big = 1 << 40
    peer: DeviceQueue | None = None
    sw: net.Switch | None = None
    if name in ("rx_fill", "rx_fill_mrg"):
        drv, dq = _ring(sp, size, rx_len, rx=True, mrg=name == "rx_fill_mrg")
        refills = [drv.recycle]

        def call() -> int:
            return net.rx_fill(dq, frame, batch)
    elif name == "tx_sink":
        drv, dq = _ring(sp, size, tx_len, rx=False, frame=frame)
        refills = [drv.recycle]

        def call() -> int:
            return net.tx_sink(dq, batch, big)
    elif name in ("echo", "fwd"):
        drv, dq = _ring(sp, size, tx_len, rx=False, frame=frame)
        rdrv, rq = _ring(sp, size, rx_len, rx=True)
        refills = [drv.recycle, rdrv.recycle]
        peer = rq
        op = net.echo if name == "echo" else net.fwd

        def call() -> int:
            return op(dq, rq, batch, big)
    elif name == "tx_to_fd":
        drv, dq = _ring(sp, size, tx_len, rx=False, frame=frame)
        fd = os.open("/dev/null", os.O_WRONLY)
        keep.append(fd)
        refills = [drv.recycle]

        def call() -> int:
            return net.tx_to_fd(dq, fd, batch, big)
    elif name == "switch":
        sw = net.Switch()
        ra_drv, rxa = _ring(sp, size, rx_len, rx=True)
        rb_drv, rxb = _ring(sp, size, rx_len, rx=True)
        pa, pb = sw.add_port([rxa]), sw.add_port([rxb])
        # port B speaks once (broadcast, so A receives it): the switch learns MAC_B on B
        lb_drv, lb = _ring(sp, 2, tx_len, rx=False, frame=_frame(pkt, b"\xff" * 6, MAC_B))
        sw.tx(pb, lb, 1, big)
        drv, dq = _ring(sp, size, tx_len, rx=False, frame=frame)
        keep += [sw, rxa, lb, lb_drv, ra_drv]
        refills = [drv.recycle, rb_drv.recycle]
        peer = rxb

        def call() -> int:
            return sw.tx(pa, dq, batch, big)
    elif name == "round":
        nbusy = rings if busy is None else busy
        if not 0 < nbusy <= rings:
            raise SystemExit(f"round: --busy must be 1..--rings ({rings}), got {nbusy}")
        drvs: list[Any] = []
        qs: list[DeviceQueue] = []
        ops: list[net.Op] = []
        for i in range(rings):
            d, q = _ring(sp, size, tx_len, rx=False, frame=frame)
            if i >= nbusy:  # an idle ring: everything it held served once, never refilled
                net.tx_sink(q, size, big)
            else:
                drvs.append(d)
            qs.append(q)
            rop = net.Op.tx_sink(q)
            rop.set_budget(batch, big)
            ops.append(rop)
        dq = qs[0]
        rnd = net.Round(ops)
        keep += [qs, ops]
        refills = [d.recycle for d in drvs]

        def call() -> int:
            rnd.run(ROUND_PASSES, big)
            return sum(o.results()[3] for o in ops)
    else:
        raise SystemExit(f"unknown case {name!r}: want one of {', '.join(CASES)}")

    def refill() -> None:
        for r in refills:
            r()

    def counters() -> dict[str, int]:
        c = dict(dq.stats())
        if peer is not None:
            c.update({f"peer_{k}": v for k, v in peer.stats().items()})
        if sw is not None:
            c.update({f"switch_{k}": v for k, v in sw.stats().items()})
        return c

    def close() -> None:
        for k in keep:
            if isinstance(k, int):
                os.close(k)
        keep.clear()
        sp.close()

    return call, refill, counters, close


def run_count(
    name: str, count: int, size: int, pkt: int, batch: int, rings: int = 1,
    busy: int | None = None,
) -> int:
    """Exactly `count` calls of case `name` (each followed by a refill); returns the packets."""
    call, refill, _, close = build_case(name, size, pkt, batch, rings, busy)
    n = 0
    for _ in range(count):
        n += call()
        refill()
    close()
    return n


def run_timed(
    name: str, seconds: float, size: int, pkt: int, batch: int, rings: int = 1,
    busy: int | None = None,
) -> float:
    call, refill, _, close = build_case(name, size, pkt, batch, rings, busy)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(64):
            n += call()
            refill()
        if time.perf_counter() >= deadline:
            break
    pps = n / (time.perf_counter() - t0)
    print(
        f"{_label(name, rings, busy):12s} pkt={pkt:5d}B ring={size:5d} batch={batch:4d}  {pps / 1e6:7.2f} Mpps  "
        f"{pps * pkt * 8 / 1e9:7.2f} Gbit/s  (pkts={n})"
    )
    close()
    return pps


def _label(name: str, rings: int, busy: int | None) -> str:
    if name != "round":
        return name
    return f"round{rings}" + ("" if busy is None or busy == rings else f"/{busy}")


def callgrind(
    name: str, count: int, size: int, pkt: int, batch: int, rings: int = 1,
    busy: int | None = None,
) -> tuple[int, int]:
    """(instructions inside the case's C entry point, packets) of `count` calls, by callgrind."""
    with tempfile.TemporaryDirectory(prefix="vx-cg-") as tmp:
        out = Path(tmp) / "cg.out"
        cmd = [
            "valgrind", "--tool=callgrind", "--collect-atstart=no",
            f"--toggle-collect={CASES[name]}", f"--callgrind-out-file={out}",
            sys.executable, __file__, "--case", name, "--count", str(count),
            "--size", str(size), "--pkt", str(pkt), "--batch", str(batch),
            "--rings", str(rings),
        ] + (["--busy", str(busy)] if busy is not None else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        pkts = int(re.search(r"packets=(\d+)", res.stdout).group(1))  # type: ignore[union-attr]
        summary = re.search(r"^summary: (\d+)", out.read_text(), re.MULTILINE)
        return int(summary.group(1)) if summary else 0, pkts


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=256, help="ring size")
    ap.add_argument("--pkt", type=int, nargs="*", default=[64, 1500])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--case", choices=list(CASES), action="append",
                    help="only these cases (repeatable)")
    ap.add_argument("--rings", type=int, nargs="*", default=[2, 8, 32],
                    help="the round case's ring counts")
    ap.add_argument("--busy", type=int, default=None,
                    help="the round case: rings kept full (default all)")
    ap.add_argument("--count", type=int, default=0, help="fixed number of calls (one case)")
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions per packet of each case under valgrind's callgrind")
    a = ap.parse_args(argv)
    cases = a.case or list(CASES)
    runs = [(n, r) for n in cases for r in (a.rings if n == "round" else [1])]
    if a.count and not a.callgrind:
        for pkt in a.pkt:
            for name, rings in runs:
                n = run_count(name, a.count, a.size, pkt, a.batch, rings, a.busy)
                print(f"case={name} rings={rings} pkt={pkt} packets={n}")
        return
    print(f"# micro_core commit={_commit()} cpu={os.cpu_count()} ring={a.size} batch={a.batch}")
    for pkt in a.pkt:
        for name, rings in runs:
            if a.callgrind:
                ir, pkts = callgrind(name, a.count or 200, a.size, pkt, a.batch, rings, a.busy)
                print(f"{_label(name, rings, a.busy):12s} pkt={pkt:5d}B  "
                      f"{ir / max(1, pkts):8.1f} instr/pkt  (instr={ir} pkts={pkts})")
            else:
                run_timed(name, a.seconds, a.size, pkt, a.batch, rings, a.busy)


if __name__ == "__main__":
    main()
