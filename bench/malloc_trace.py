"""Run the daemon under tracemalloc and compare its snapshots: a leak-hunting aid for bench runs.

`python -m bench.malloc_trace serve DIR SECONDS -- VHOSTX-ARGS...` runs `vhostx VHOSTX-ARGS` with
tracemalloc on (tracebacks of `VHOSTX_TRACEMALLOC_FRAMES` frames, 10 by default) and, every
SECONDS, writes DIR/snap-NNN.tracemalloc (tracemalloc's own format) and DIR/snap-NNN.json (RSS,
glibc's malloc statistics, the live object count and the 40 most common object types, after a
full collection). `VHOSTX_TRACEMALLOC_FRAMES=0` leaves tracemalloc off (only the JSON files);
`VHOSTX_MALLOC_TRIM=1` calls malloc_trim(0) after each snapshot and records the RSS after it
(what the RSS would be without the free memory the allocator keeps).
DaemonProcess(module="bench.malloc_trace", ...) starts the daemon this way (bench/hostile.py
`--tracemalloc DIR`).

`python -m bench.malloc_trace compare A B [--top N]` prints the N allocation sites (by traceback)
that grew most from snapshot A to snapshot B, then the object types whose count changed.

Threads: `serve` adds one daemon thread that takes the snapshots; `compare` is single-threaded.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path

from vhostx.heap import malloc_trim

__all__ = ["compare", "main", "snapshot_to"]

_SKIP = (tracemalloc.Filter(False, tracemalloc.__file__),
         tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
         tracemalloc.Filter(False, "<unknown>"))


def _rss_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1])
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def _mallinfo() -> dict[str, int]:
    """glibc's malloc statistics (all arenas): `uordblks` bytes in use, `fordblks` free in the
    arenas, `arena` taken from the system by brk/arena growth, `hblkhd` in mmapped chunks."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return {}
    fn.restype = _Mallinfo2
    info = fn()
    return {str(f[0]): int(getattr(info, f[0])) for f in _Mallinfo2._fields_}


def snapshot_to(directory: Path, n: int) -> None:
    """Write snapshot number `n` (traces, if tracing, and an object census) into `directory`."""
    gc.collect()
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces(_SKIP)
        snap.dump(str(directory / f"snap-{n:03d}.tracemalloc"))
    objects = gc.get_objects()
    census = collections.Counter(type(o).__qualname__ for o in objects)
    traced, peak = tracemalloc.get_traced_memory()
    info = {"n": n, "t": time.monotonic(), "rss_kib": _rss_kib(), "objects": len(objects),
            "traced": traced, "traced_peak": peak, "threads": threading.active_count(),
            "malloc": _mallinfo(), "types": dict(census.most_common(40))}
    if os.environ.get("VHOSTX_MALLOC_TRIM", "") not in ("", "0"):
        info["trimmed"] = malloc_trim()
        info["rss_kib_after_trim"] = _rss_kib()
    (directory / f"snap-{n:03d}.json").write_text(json.dumps(info, indent=1) + "\n")


def _snapshot_loop(directory: Path, every: float) -> None:
    n = 0
    while True:
        snapshot_to(directory, n)
        n += 1
        time.sleep(every)


def serve(directory: str, every: float, argv: list[str]) -> None:
    """Run `vhostx argv` (in this process, as `python -m vhostx` would) with tracemalloc on."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    frames = int(os.environ.get("VHOSTX_TRACEMALLOC_FRAMES", "10"))
    if frames > 0:  # 0: only the census and malloc statistics (the daemon at full speed)
        tracemalloc.start(frames)
    threading.Thread(target=_snapshot_loop, args=(path, every), name="tracemalloc",
                     daemon=True).start()
    sys.argv = ["vhostx", *argv]
    runpy.run_module("vhostx", run_name="__main__", alter_sys=True)


def compare(a: str, b: str, top: int = 25) -> str:
    """The allocation sites that grew most from snapshot `a` to `b`, and the object census."""
    old, new = tracemalloc.Snapshot.load(a), tracemalloc.Snapshot.load(b)
    lines = []
    stats = new.compare_to(old, "traceback")
    total = sum(s.size_diff for s in stats)
    lines.append(f"traced: {sum(s.size for s in stats)} bytes, {total:+d} bytes from {a} to {b}")
    for s in stats[:top]:
        lines.append(f"{s.size_diff:+9d} B {s.count_diff:+6d} blocks  (now {s.size} B, {s.count})")
        lines.extend(f"      {line}" for line in s.traceback.format(most_recent_first=True))
    ja, jb = (Path(x).with_suffix(".json") for x in (a, b))
    if ja.exists() and jb.exists():
        ia, ib = json.loads(ja.read_text()), json.loads(jb.read_text())
        lines.append(f"rss {ia['rss_kib']} -> {ib['rss_kib']}; objects {ia['objects']} -> "
                     f"{ib['objects']}; malloc {ia.get('malloc')} -> {ib.get('malloc')}")
        for name in sorted(set(ia["types"]) | set(ib["types"])):
            ca, cb = ia["types"].get(name, 0), ib["types"].get(name, 0)
            if ca != cb:
                lines.append(f"   {name}: {ca} -> {cb}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        if "--" not in args:
            raise SystemExit("usage: python -m bench.malloc_trace serve DIR SECONDS -- ARGS...")
        cut = args.index("--")
        directory, every = args[1:cut]
        serve(directory, float(every), args[cut + 1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    cmp = sub.add_parser("compare", help="the growth from snapshot A to snapshot B")
    cmp.add_argument("a")
    cmp.add_argument("b")
    cmp.add_argument("--top", type=int, default=25)
    ns = ap.parse_args(args)
    print(compare(ns.a, ns.b, ns.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
