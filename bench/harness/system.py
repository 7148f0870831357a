"""What a result depends on, and CPU time per thread and per core, read from the system.

- `dimensions(...)`: git commit and dirty flag, machine (cpu model, nproc, memory), kernel,
  Python, QEMU and DPDK versions, time; the per-backend parameters are added by the runner.
- `thread_times(pid)`: {tid: ThreadTime(name, cpu seconds, last cpu)} from /proc/PID/task/*/stat.
- `alive(pid)`: the process exists and is not a zombie.
- `cpu_usage(before, after, window)`: per-thread and per-core shares of a core over a window; a
  thread's time is attributed to the core it last ran on (exact for pinned threads, which is how
  every benchmark here places them).
- `git_commit(repo)`, `cpu_model()`: the commit string ("-dirty" appended for a modified tree)
  and the CPU's model name.
- `idle_cores(sample_s)`, `wait_quiet(max_wait, need_idle)`: idle cores from /proc/stat, and
  the wait for a quiet machine before a run.

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

from bench.testpmd import dpdk_version

__all__ = ["ThreadTime", "alive", "cpu_model", "cpu_usage", "dimensions", "git_commit",
           "idle_cores", "qemu_version", "thread_times", "wait_quiet"]

_CLK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent.parent


def git_commit(repo: Path) -> str:
    """HEAD of the checkout at `repo`, with "-dirty" when tracked files are modified;
    "unknown" without git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def idle_cores(sample_s: float = 1.0) -> float:
    """Idle cores (idle + iowait) over `sample_s`, from /proc/stat."""
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])

    i0, t0 = read()
    time.sleep(sample_s)
    i1, t1 = read()
    cpus = os.cpu_count() or 1
    return cpus * (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, need_idle: float) -> float:
    """Wait up to `max_wait` s until at least `need_idle` cores are idle; returns the last idle
    figure (the run goes ahead anyway: its CPU shares tell whether it was disturbed)."""
    deadline = time.monotonic() + max_wait
    idle = idle_cores()
    while idle < need_idle and time.monotonic() < deadline:
        idle = idle_cores()
    return idle


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
    commit = git_commit(REPO)
    return {
        "commit": commit.removesuffix("-dirty"),
        "dirty": commit.endswith("-dirty"),
        "machine": {
            "cpu": cpu_model(),
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
