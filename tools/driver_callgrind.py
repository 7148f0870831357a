"""Instructions per packet of the guest model's TX and RX loops (NetDriver over
VhostUserFrontend, against a vhostx daemon with a sink / source port), by valgrind's callgrind.

`python tools/driver_callgrind.py` runs the loop under callgrind twice per direction (N1 and N2
batches of 32 frames) and prints (I(N2) - I(N1)) / (packets(N2) - packets(N1)): the start-up
(interpreter, imports, connection) cancels out. Only this process is measured (valgrind does not
follow the daemon). `--loop tx|rx N` is the measured body. Build time and benchmarks only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loop(mode: str, n: int) -> int:
    from bench.process import DaemonProcess
    from virtio.frontend import NetDriver, VhostUserFrontend

    d = DaemonProcess(log_level="WARNING")
    sock = d.add_device("net0", port="sink" if mode == "tx" else "source")
    d.start(timeout=120)
    try:
        with VhostUserFrontend(sock) as fe:
            net = NetDriver(fe)
            frame = bytes.fromhex("525400000001525400000002") + b"\x88\xb5" + bytes(50)
            pkts = 0
            if mode == "tx":
                for _ in range(n):
                    pkts += net.send([frame] * 32, timeout=1.0)
            else:
                while pkts < n * 32:
                    pkts += len(net.recv(timeout=1.0))
            return pkts
    finally:
        d.stop()
        d.cleanup()


def measure(mode: str, n: int) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        res = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                              sys.executable, __file__, "--loop", mode, str(n)],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        ins = int(re.search(r"^summary: (\d+)", out.read_text(), re.MULTILINE).group(1))  # type: ignore[union-attr]
        pkts = int(re.search(r"^packets (\d+)", res.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
        return ins, pkts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--loop", nargs=2, metavar=("MODE", "N"))
    ap.add_argument("--batches", nargs=2, type=int, default=(100, 600))
    a = ap.parse_args()
    if a.loop:
        print("packets", loop(a.loop[0], int(a.loop[1])))
        return 0
    for mode in ("tx", "rx"):
        (i1, p1), (i2, p2) = (measure(mode, n) for n in a.batches)
        print(f"{mode}: {(i2 - i1) / (p2 - p1):,.0f} instructions per packet "
              f"({p2 - p1} packets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
