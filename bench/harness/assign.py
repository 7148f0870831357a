"""Device assignment for KVM hosts: a QEMU guest whose NIC is a host PCI function given to it
with ``-device vfio-pci,host=BDF`` (an SR-IOV VF, say), to compare vhostx against real
assignment with the same workload.

Role: policy around the project's VFIO tooling (``vhostx vfio preflight`` / ``bind``, run as
child processes so that what the harness checks is exactly what an operator would type):
- ``prepare_assignment(bdf)``: preflight; when the only failure is that the function is not on
  vfio-pci yet, bind it and run the preflight again; anything else raises ``AssignmentRefused``
  with the preflight's own lines (no IOMMU, group not viable, memlock too low, no interrupt
  remapping), and nothing is bound;
- ``assigned_qemu_args(...)``: the QEMU command line (``-accel kvm -cpu host``, no vhost-user,
  no shared memory needed, the function as ``vfio-pci,host=...``); ``AssignedGuest`` is a
  bench.qemu.Guest started with it.
Here (no VFIO, no IOMMU, a KVM that cannot boot a stock kernel) the path stops at the preflight,
which refuses. Threads: the caller's (one thread per guest, as bench.qemu).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.qemu import Guest

__all__ = ["AssignedGuest", "AssignmentRefused", "Preflight", "assigned_qemu_args",
           "prepare_assignment", "run_preflight"]

_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class AssignmentRefused(RuntimeError):
    """The host cannot assign the function; the message carries the preflight's findings."""


@dataclass(frozen=True)
class Preflight:
    returncode: int
    output: str

    @property
    def failures(self) -> list[str]:
        return [ln[5:] for ln in self.output.splitlines() if ln.startswith("FAIL ")]

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _check_bdf(bdf: str) -> str:
    full = bdf.lower() if bdf.count(":") == 2 else "0000:" + bdf.lower()
    if not _BDF.match(full):
        raise ValueError(f"expected a PCI address like 0000:3b:00.1, got {bdf!r}")
    return full


def _vfio(*argv: str, python: str = sys.executable) -> Preflight:
    out = subprocess.run([python, "-m", "vhostx", "vfio", *argv], capture_output=True,
                         text=True, check=False, timeout=60)
    return Preflight(out.returncode, (out.stdout + out.stderr).strip())


def run_preflight(bdf: str, memory_mb: int, *, python: str = sys.executable) -> Preflight:
    """``vhostx vfio preflight BDF --memory NM``."""
    return _vfio("preflight", _check_bdf(bdf), "--memory", f"{memory_mb}M", python=python)


def prepare_assignment(bdf: str, memory_mb: int, *, python: str = sys.executable) -> Preflight:
    """Preflight (and bind, when that is all that is missing); AssignmentRefused otherwise."""
    bdf = _check_bdf(bdf)
    pf = run_preflight(bdf, memory_mb, python=python)
    if pf.ok:
        return pf
    only_unbound = pf.failures and all("bound to vfio-pci" in f for f in pf.failures)
    if not only_unbound:
        raise AssignmentRefused(f"cannot assign {bdf} to a guest; vhostx vfio preflight "
                                f"said:\n{pf.output}")
    bound = _vfio("bind", bdf, python=python)
    if not bound.ok:
        raise AssignmentRefused(f"vhostx vfio bind {bdf} failed:\n{bound.output}")
    pf = run_preflight(bdf, memory_mb, python=python)
    if not pf.ok:
        _vfio("unbind", bdf, python=python)
        raise AssignmentRefused(f"{bdf} bound to vfio-pci but the preflight still fails "
                                f"(given back):\n{pf.output}")
    return pf


def assigned_qemu_args(bdf: str, *, kernel: str | Path, initrd: str | Path, memory_mb: int = 1024,
                       cpus: int = 1, append: str = "", qemu: str = "qemu-system-x86_64",
                       name: str = "assigned", extra: Sequence[str] = ()) -> list[str]:
    """The QEMU command line of a KVM guest with host function ``bdf`` as its NIC."""
    host = _check_bdf(bdf).removeprefix("0000:")
    cmdline = " ".join(x for x in ("console=ttyS0 quiet loglevel=3 panic=-1", append) if x)
    return [qemu, "-name", name, "-machine", "q35,accel=kvm", "-cpu", "host",
            "-m", str(memory_mb), "-smp", str(cpus), "-nographic", "-no-reboot", "-nic", "none",
            "-device", f"vfio-pci,host={host},id=assigned0",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline, *extra]


class AssignedGuest(Guest):
    """A bench.qemu.Guest whose only NIC is an assigned host function (KVM)."""

    def __init__(self, bdf: str, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.bdf = _check_bdf(bdf)

    def command(self, initrd: Path) -> list[str]:
        return assigned_qemu_args(self.bdf, kernel=self.image.kernel, initrd=initrd,
                                  memory_mb=self.memory_mb, cpus=self.cpus, append=self.append,
                                  qemu=self.qemu, name=self.name, extra=self.extra_args)
