"""What a result depends on, and CPU time per thread and per core, read from the system.

- `dimensions(...)`: git commit and dirty flag, machine (cpu model, nproc, memory), kernel,
  Python, QEMU and DPDK versions, time; the per-backend parameters are added by the runner.
- `thread_times(pid)`: {tid: ThreadTime(name, cpu seconds, last cpu)} from /proc/PID/task/*/stat.
- `alive(pid)`: the process exists and is not a zombie.
- `cpu_usage(before, after, window)`: per-thread and per-core shares of a core over a window; a
  thread's time is attributed to the core it last ran on (exact for pinned threads, which is how
  every benchmark here places them).

Reuses `bench.dpdk_compare` for the commit string, the CPU model and the DPDK version.
Any thread.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.dpdk_compare import _cpu_model, _git_commit
from bench.testpmd import dpdk_version

__all__ = ["ThreadTime", "alive", "cpu_usage", "dimensions", "qemu_version", "thread_times"]

_CLK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent.parent


def qemu_version() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return "absent"
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"version\s+(\S+)", out)
    return m.group(1) if m else "unknown"


def alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (tests check that runs stop every
    process they started)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _mem_total_kb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def dimensions() -> dict[str, Any]:
    commit = _git_commit(REPO)
    return {
        "commit": commit.removesuffix("-dirty"),
        "dirty": commit.endswith("-dirty"),
        "machine": {
            "cpu": _cpu_model(),
            "nproc": os.cpu_count(),
            "memory_kb": _mem_total_kb(),
            "hostname": platform.node(),
        },
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "qemu": qemu_version(),
        "dpdk": dpdk_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": os.getloadavg(),
    }


@dataclass(frozen=True)
class ThreadTime:
    name: str
    cpu_s: float  # user + system seconds since the thread started
    last_cpu: int  # the core it last ran on (field 39 of stat)


def _parse_stat(text: str) -> tuple[str, float, int]:
    head, _, rest = text.rpartition(")")
    name = head.split("(", 1)[1] if "(" in head else "?"
    f = rest.split()
    # rest starts at field 3 (state): utime is field 14 -> f[11], stime f[12], processor f[36]
    return name, (int(f[11]) + int(f[12])) / _CLK, int(f[36])


def thread_times(pid: int | None) -> dict[int, ThreadTime]:
    """Every thread of a live process; {} if the process is gone or unreadable."""
    if pid is None:
        return {}
    out: dict[int, ThreadTime] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            name, cpu, last = _parse_stat(Path(f"/proc/{pid}/task/{tid}/stat").read_text())
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
        out[int(tid)] = ThreadTime(name, cpu, last)
    return out


def cpu_usage(before: dict[int, ThreadTime], after: dict[int, ThreadTime],
              window_s: float) -> dict[str, Any]:
    """{"total": cores, "threads": [{tid, name, cores, cpu}], "cores": {cpu: cores}} over a window
    (cores = CPU seconds / window seconds; 1.0 is one core busy all the time)."""
    threads = []
    per_core: dict[str, float] = {}
    total = 0.0
    for tid, now in sorted(after.items()):
        then = before.get(tid)
        used = now.cpu_s - (then.cpu_s if then is not None else 0.0)
        if then is None and used > window_s * 1.5:
            used = 0.0  # a reused tid or a thread older than the window we cannot split
        share = used / window_s if window_s > 0 else 0.0
        threads.append({"tid": tid, "name": now.name, "cores": round(share, 4),
                        "cpu": now.last_cpu})
        per_core[str(now.last_cpu)] = per_core.get(str(now.last_cpu), 0.0) + share
        total += share
    return {"total": round(total, 4), "threads": threads,
            "cores": {k: round(v, 4) for k, v in sorted(per_core.items())}}
