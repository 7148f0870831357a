"""Write the committed seed corpora of the C-core fuzz targets (fuzz/corpus/TARGET/seed-*; the
inputs of crashes found are seed-crash-*).

Each seed is a well-formed guest in the input layout of fuzz/fuzz_common.h: one region (gpa
0x10000 onwards maps the arena), rings at fixed offsets, valid chains (direct, indirect,
scattered, header in its own buffer, mergeable RX buffers) and a few steps. The fuzzer mutates
from there. Run: python fuzz/make_seeds.py (deterministic; rewrites the seed-* files).
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["Seed", "main"]

HERE = Path(__file__).resolve().parent
HDR = 96
GPA = 0x10000  # region 0: gpa field 0x1000 << 4
NEXT, WRITE, INDIRECT = 1, 2, 4
RING = {"desc": 0x000, "avail": 0x100, "used": 0x200}  # queue q adds q * 0x400
BUF = 0x1000  # buffers from here


class Seed:
    def __init__(self, nq: int, size: int = 8, flags: int = 0, hdr_sel: int = 0,
                 last: int = 0) -> None:
        self.nq = nq
        self.size = size
        self.arena = bytearray(BUF)
        self.head = bytearray([0])  # one region
        self.head += struct.pack("<HHBQ", 0, 0, 0, GPA >> 4)
        for q in range(nq):
            self.head += struct.pack("<BHHHHBB", size.bit_length() - 1,
                                     RING["desc"] + q * 0x400, RING["avail"] + q * 0x400,
                                     RING["used"] + q * 0x400, last, flags, hdr_sel)
        self.avail_n = [last] * nq
        self.brk = BUF
        self.steps = bytearray()

    def buf(self, data: bytes | int) -> int:
        """A buffer with `data` (or that many zero bytes); returns its gpa."""
        raw = bytes(data) if isinstance(data, int) else data
        off = self.brk
        self.brk = (off + len(raw) + 15) & ~15
        if len(self.arena) < self.brk:
            self.arena += bytes(self.brk - len(self.arena))
        self.arena[off:off + len(raw)] = raw
        return GPA + off

    def desc(self, q: int, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.arena, RING["desc"] + q * 0x400 + 16 * i, addr, length,
                         flags, nxt)

    def post(self, q: int, head: int) -> None:
        slot = self.avail_n[q] % self.size
        struct.pack_into("<H", self.arena, RING["avail"] + q * 0x400 + 4 + 2 * slot, head)
        self.avail_n[q] = (self.avail_n[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.arena, RING["avail"] + q * 0x400 + 2, self.avail_n[q])

    def step(self, *b: int) -> Seed:
        self.steps += bytes(b)
        return self

    def tx_frames(self, q: int = 0, hdr: int = 12) -> None:
        """TX chains of every shape on queue q: one buffer, header apart, scattered, indirect."""
        frame = bytes.fromhex("525400000002525400000001") + b"\x08\x00" + bytes(range(46))
        self.desc(q, 0, self.buf(bytes(hdr) + frame), hdr + len(frame))
        self.post(q, 0)
        self.desc(q, 1, self.buf(bytes(hdr)), hdr, NEXT, 2)
        self.desc(q, 2, self.buf(frame), len(frame))
        self.post(q, 1)
        data = bytes(hdr) + frame
        self.desc(q, 3, self.buf(data[:5]), 5, NEXT, 4)
        self.desc(q, 4, self.buf(data[5:20]), 15, NEXT, 5)
        self.desc(q, 5, self.buf(data[20:]), len(data) - 20)
        self.post(q, 3)
        table = struct.pack("<QIHH", self.buf(bytes(hdr)), hdr, NEXT, 1)
        table += struct.pack("<QIHH", self.buf(frame), len(frame), 0, 0)
        self.desc(q, 6, self.buf(table), len(table), INDIRECT)
        self.post(q, 6)

    def rx_buffers(self, q: int, n: int, length: int) -> None:
        for i in range(n):
            self.desc(q, i, self.buf(length), length, WRITE)
            self.post(q, i)

    def bytes(self) -> bytes:
        head = (self.head + self.steps)[:HDR]
        return bytes(head + bytes(HDR - len(head)) + self.arena[:self.brk])


def seeds() -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {"chain": {}, "tx": {}, "rx": {}, "round": {}}
    # chain: every chain shape, then sink / pending / notify / signal steps
    for name, flags, hdr_sel in (("plain", 0, 0), ("event-idx", 1, 0), ("hdr10", 0, 1),
                                 ("nohdr", 0, 2)):
        s = Seed(1, flags=flags | 4, hdr_sel=hdr_sel)
        s.tx_frames(hdr=(12, 10, 0)[hdr_sel])
        s.step(2, 0, 0, 0, 4, 0, 3, 1, 5, 2, 0, 0)
        out["chain"][name] = s.bytes()
    s = Seed(1, size=4)  # a loop: 0 -> 1 -> 0
    s.desc(0, 0, s.buf(64), 64, NEXT, 1)
    s.desc(0, 1, s.buf(64), 64, NEXT, 0)
    s.post(0, 0)
    out["chain"]["loop"] = s.step(0, 0).bytes()
    # tx: the same chains through every TX operation (queue 1..3: RX buffers)
    for op in range(9):
        s = Seed(4, flags=4)
        s.tx_frames()
        for q in (1, 2, 3):
            s.rx_buffers(q, 8, 128)
        s.step(op, 0x40 if op == 3 else 0, 0, 0, op, 0)
        out["tx"][f"op{op}"] = s.bytes()
    s = Seed(4, flags=2 | 4)  # mergeable RX, small buffers: frames over several chains
    s.tx_frames()
    for q in (1, 2, 3):
        s.rx_buffers(q, 8, 40)
    out["tx"]["mrg"] = s.step(1, 0, 5, 0, 2, 0).bytes()
    # the input of a crash found (fuzz_tx, memcpy-param-overlap in cur_copy): the RX buffer of
    # the echo overlaps the TX buffer it copies from (test_core_regressions.py pins the fix)
    s = Seed(4, flags=4)
    frame = bytes.fromhex("525400000002525400000001") + b"\x08\x00" + bytes(range(200))
    tx_buf = s.buf(bytes(64) + bytes(12) + frame) + 64
    s.desc(0, 0, tx_buf, 12 + len(frame))
    s.post(0, 0)
    s.desc(1, 0, tx_buf - 6, 12 + len(frame), WRITE)
    s.post(1, 0)
    out["tx"]["crash-memcpy-overlap"] = s.step(1, 0).bytes()
    # rx: rx_fill and rx_from_fd, with and without MRG_RXBUF, buffers short and long
    for name, flags, length, op in (("fill", 0, 256, 0), ("fill-mrg", 2, 32, 0),
                                    ("fill-mrg-eidx", 3, 64, 5), ("fd", 0, 256, 2),
                                    ("fd-mrg", 2, 48, 2), ("big", 2, 2048, 1)):
        s = Seed(1, flags=flags | 4)
        s.rx_buffers(0, 8, length)
        s.step(op, 3, 100, 0, op, 0, 60, 0)
        out["rx"][name] = s.bytes()
    # round: TX chains on queue 0, RX buffers on 1 and 2; ops of every kind
    for name, kinds in (("sink-fill", (1, 2)), ("echo-fwd", (3, 4)), ("fd", (5, 6)),
                        ("switch", (7, 1)), ("all", (1, 2, 3, 4, 5, 7))):
        s = Seed(3, flags=4)
        s.tx_frames()
        s.rx_buffers(1, 8, 128)
        s.rx_buffers(2, 8, 128)
        s.step(len(kinds) - 1)
        for k in kinds:
            s.step(k, 0x04 if k in (3, 4) else 0x01 if k in (2, 6) else 0, 8)
        s.step(0, 4, 1, 2, 2, 0, 0, 1)
        out["round"][name] = s.bytes()
    return out


def main() -> None:
    for target, files in seeds().items():
        d = HERE / "corpus" / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(files)} seeds")


if __name__ == "__main__":
    main()
