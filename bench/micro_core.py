"""Micro-benchmark of the C core alone: tx_sink and rx_fill packets per second on one core.

A C "guest" (virtio.ring.RecyclingDriver, driver-side test support) keeps the ring full, so the
figures are the device side plus a cheap refill, both on the calling thread, no interrupts.
Run: python bench/micro_core.py [--seconds S] [--size N] [--pkt BYTES] [--batch B]
Single-threaded; prints one line per case with its dimensions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from virtio import net
from virtio.driver.split import VRING_DESC_F_WRITE, DriverQueue
from virtio.memory import GuestMemory, MemoryRegion
from virtio.ring import DeviceQueue, RecyclingDriver

__all__ = ["main"]


def _setup(size: int, buf_len: int, *, rx: bool, mrg: bool, hdr_len: int):
    mem_size = 64 << 20
    fd = os.memfd_create("vx-bench")
    os.ftruncate(fd, mem_size)
    gpa, uva = 0x100000, 0x7F00_0000_0000
    mem = GuestMemory.map([MemoryRegion(gpa, mem_size, uva, 0)], [fd])
    total = DriverQueue.layout(size)[3]
    DriverQueue(mem.view(gpa, total), gpa, size)  # lays out and zeroes the ring
    d_off, a_off, u_off, _ = DriverQueue.layout(size)
    drv = RecyclingDriver(mem, gpa + d_off, gpa + a_off, gpa + u_off, size)
    bufs = gpa + ((total + 4095) & ~4095)
    stride = (buf_len + 63) & ~63
    drv.fill_descs(bufs, stride, buf_len, VRING_DESC_F_WRITE if rx else 0)
    if not rx:  # TX payload: header + bytes, written once
        for i in range(size):
            mem.view(bufs + i * stride, buf_len)[:] = bytes(hdr_len) + bytes([i & 0xFF]) * (
                buf_len - hdr_len
            )
    dq = DeviceQueue(
        mem,
        index=0,
        size=size,
        desc_uva=uva + d_off,
        avail_uva=uva + a_off,
        used_uva=uva + u_off,
        hdr_len=hdr_len,
        mrg_rxbuf=mrg,
    )
    drv.post_all()
    return mem, fd, drv, dq


def run_case(
    name: str, seconds: float, size: int, pkt: int, batch: int, *, rx: bool, mrg: bool = False
) -> float:
    hdr_len = 12
    buf_len = hdr_len + pkt if not rx else max(2048, hdr_len + pkt)
    mem, fd, drv, dq = _setup(size, buf_len, rx=rx, mrg=mrg, hdr_len=hdr_len)
    frame = bytes(range(256)) * (pkt // 256 + 1)
    frame = frame[:pkt]
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    tx_sink, rx_fill, recycle = net.tx_sink, net.rx_fill, drv.recycle
    while True:
        for _ in range(64):
            if rx:
                n += rx_fill(dq, frame, batch)
            else:
                n += tx_sink(dq, batch, 1 << 40)
            recycle()
        if time.perf_counter() >= deadline:
            break
    dt = time.perf_counter() - t0
    pps = n / dt
    st = dq.stats()
    print(
        f"{name:10s} pkt={pkt:5d}B ring={size:5d} batch={batch:4d} mrg={int(mrg)}  "
        f"{pps / 1e6:7.2f} Mpps  {pps * pkt * 8 / 1e9:7.2f} Gbit/s  "
        f"(pkts={n} batches={st['batches']} drops={st['dropped'] + st['too_big'] + st['ring_full']})"
    )
    del dq
    mem.close()
    os.close(fd)
    return pps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=1024, help="ring size")
    ap.add_argument("--pkt", type=int, nargs="*", default=[64, 1500])
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args(argv)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = "?"
    print(
        f"# micro_core commit={commit} cpu={os.cpu_count()} seconds={a.seconds} (one thread, "
        f"C refill helper)"
    )
    for pkt in a.pkt:
        run_case("tx_sink", a.seconds, a.size, pkt, a.batch, rx=False)
        run_case("rx_fill", a.seconds, a.size, pkt, a.batch, rx=True)
        run_case("rx_fill", a.seconds, a.size, pkt, a.batch, rx=True, mrg=True)


if __name__ == "__main__":
    main()
