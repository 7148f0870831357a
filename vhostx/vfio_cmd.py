"""`vhostx vfio ...`: IOMMU groups, binding devices to vfio-pci, device details, and a preflight
for assigning a device to a QEMU guest.

Subcommands: ``groups`` (every group, its devices, their drivers, viability), ``bind BDF`` (to
vfio-pci through driver_override, unbind, drivers_probe), ``unbind BDF`` (give it back to its
own driver), ``show BDF`` (ids, driver, group, BARs and capabilities from sysfs; regions and IRQs
through VFIO when the device is bound to vfio-pci), ``preflight BDF`` (IOMMU on, vfio-pci
loaded, group viable, memlock sufficient for the guest's memory, interrupt remapping; prints
the QEMU ``-device vfio-pci,host=...`` arguments).
On a host without VFIO every subcommand says so in one line and exits 1; any VfioError is one
line on stderr and exit 1, never a traceback. ``--sysfs``/``--proc``/``--dev`` point at other
roots (tests use a fake sysfs tree).
Threads: the main thread only.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any

from vfio import Container, Group, Sysfs, VfioError, VfioUnavailable
from vfio.device import IRQ_NAMES
from vfio.dma import check_memlock
from vfio.pcicaps import walk_capabilities

__all__ = ["NO_VFIO", "add_parser", "parse_size", "run"]

NO_VFIO = "vhostx vfio: this host has no VFIO: {why}"
_BDF = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``4096`` -> bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 1G or 512M, got {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


def _bdf(text: str) -> str:
    if not _BDF.match(text):
        raise argparse.ArgumentTypeError(f"expected a PCI address like 0000:00:03.0, got {text!r}")
    return text.lower() if text.count(":") == 2 else "0000:" + text.lower()


def _require_iommu(sysfs: Sysfs) -> None:
    if not sysfs.has_iommu():
        raise VfioUnavailable(
            f"{sysfs.iommu_groups_dir} is empty or missing (no IOMMU enabled: boot with "
            "intel_iommu=on or amd_iommu=on, on hardware with VT-d/AMD-Vi)"
        )


def _fmt_dev(d: Any) -> str:
    return (f"{d.bdf}  {d.vendor:04x}:{d.device:04x}  class {d.pci_class:06x}  "
            f"driver {d.driver or '(none)'}")


def _cmd_groups(args: argparse.Namespace, sysfs: Sysfs) -> int:
    _require_iommu(sysfs)
    for number, devices in sysfs.groups().items():
        blockers = [d for d in devices if d.blocks_viability]
        viable = "viable" if not blockers else (
            "not viable: " + ", ".join(f"{d.bdf} bound to {d.driver}" for d in blockers))
        print(f"group {number}: {viable}")
        for d in devices:
            print(f"  {_fmt_dev(d)}")
    return 0


def _cmd_bind(args: argparse.Namespace, sysfs: Sysfs) -> int:
    _require_iommu(sysfs)
    if not sysfs.has_vfio_pci():
        raise VfioUnavailable("the vfio-pci driver is not loaded (modprobe vfio-pci)")
    previous = sysfs.bind_vfio(args.bdf)
    group = sysfs.group_of(args.bdf)
    print(f"{args.bdf}: bound to vfio-pci (was {previous or 'unbound'}); group {group}")
    blockers = sysfs.blockers(group) if group is not None else []
    if blockers:
        print("  group not viable yet: " + ", ".join(f"{b} bound to {d}" for b, d in blockers))
    return 0


def _cmd_unbind(args: argparse.Namespace, sysfs: Sysfs) -> int:
    _require_iommu(sysfs)
    if sysfs.driver(args.bdf) != "vfio-pci":
        print(f"{args.bdf}: not bound to vfio-pci (driver {sysfs.driver(args.bdf)}), "
              "nothing to give back")
        return 0
    now = sysfs.unbind_vfio(args.bdf)
    print(f"{args.bdf}: given back; driver now {now or '(none)'}")
    return 0


def _cmd_show(args: argparse.Namespace, sysfs: Sysfs) -> int:
    _require_iommu(sysfs)
    d = sysfs.device(args.bdf)
    print(_fmt_dev(d) + f"  group {d.group}")
    for i, (start, end, flags) in enumerate(sysfs.resources(args.bdf)):
        if end > start:
            kind = "io" if flags & 0x100 else "mem"
            name = f"BAR{i}" if i < 6 else "ROM"
            print(f"  {name}: {kind} {start:#x}-{end:#x} ({end - start + 1:#x} bytes)")
    cfg = sysfs.config_space(args.bdf)
    for cap in walk_capabilities(lambda off, n: cfg[off : off + n], len(cfg)):
        extra = f" cfg_type {cap.vendor_byte3}" if cap.vendor_byte3 is not None else ""
        print(f"  cap {cap.name} at {cap.offset:#x}{extra}")
    if d.driver != "vfio-pci":
        print(f"  (regions and IRQs through VFIO: bind to vfio-pci first; driver {d.driver})")
        return 0
    with Container(os.path.join(args.dev, "vfio")) as c, \
            Group.of_device(args.bdf, sysfs=sysfs, dev_root=args.dev) as g:
        g.set_container(c)
        c.set_iommu()
        with g.open_device(args.bdf) as dev:
            for r in dev.regions():
                if r.size:
                    rights = "".join(ch for ch, ok in (("r", r.readable), ("w", r.writable),
                                                        ("m", r.mappable)) if ok)
                    print(f"  region {r.name}: {r.size:#x} bytes at fd offset {r.offset:#x} "
                          f"[{rights}]")
            for index in range(dev.num_irqs):
                info = dev.irq_info(index)
                if info.count:
                    print(f"  irq {IRQ_NAMES.get(index, index)}: {info.count} vector(s)"
                          f"{' maskable' if info.maskable else ''}"
                          f"{' automasked' if info.automasked else ''}")
        g.unset_container()
    return 0


def _cmd_preflight(args: argparse.Namespace, sysfs: Sysfs) -> int:
    _require_iommu(sysfs)
    problems = 0

    def report(ok: bool, what: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}")

    d = sysfs.device(args.bdf)
    report(True, f"IOMMU on ({len(list(sysfs.iommu_groups_dir.iterdir()))} groups)")
    report(sysfs.has_vfio_pci(), "vfio-pci driver loaded")
    report(d.group is not None, f"{args.bdf} is in IOMMU group {d.group}")
    report(d.driver == "vfio-pci",
           f"{args.bdf} bound to vfio-pci" + ("" if d.driver == "vfio-pci" else
                                              f" (it is bound to {d.driver}: vhostx vfio bind)"))
    if d.group is not None:
        blockers = sysfs.blockers(d.group)
        report(not blockers, f"group {d.group} viable" + "".join(
            f"; {b} is bound to {drv}" for b, drv in blockers))
        node = Path(args.dev) / str(d.group)
        report(node.exists(), f"group node {node} exists")
    try:
        status = Path(args.proc) / "self" / "status"
        check_memlock(args.memory, status_text=status.read_text() if status.exists() else None)
        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
        report(True, f"memlock covers {args.memory} bytes of guest memory (RLIMIT_MEMLOCK "
                     f"{limit} or CAP_IPC_LOCK)")
    except VfioError as err:
        report(False, str(err))
    ir = sysfs.interrupt_remapping(args.proc)
    unsafe = sysfs.module_param("vfio_iommu_type1", "allow_unsafe_interrupts")
    report(bool(ir) or unsafe == "Y",
           "interrupt remapping " + ("on" if ir else "not detected" + (
               " but allow_unsafe_interrupts=Y" if unsafe == "Y" else
               " (MSI from the device is not isolated; vfio_iommu_type1 refuses the group "
               "unless allow_unsafe_interrupts=1)")))
    host = args.bdf.removeprefix("0000:")
    print(f"qemu arguments: -device vfio-pci,host={host}")
    return 1 if problems else 0


_COMMANDS = {"groups": _cmd_groups, "bind": _cmd_bind, "unbind": _cmd_unbind,
             "show": _cmd_show, "preflight": _cmd_preflight}


def run(args: argparse.Namespace) -> int:
    """Run one ``vhostx vfio`` subcommand; VfioError and OSError become one line, exit 1."""
    sysfs = Sysfs(args.sysfs)
    try:
        return _COMMANDS[args.vfio_command](args, sysfs)
    except VfioUnavailable as err:
        print(NO_VFIO.format(why=err), file=sys.stderr)
    except VfioError as err:
        print(f"vhostx vfio {args.vfio_command}: {err}", file=sys.stderr)
    except OSError as err:
        print(f"vhostx vfio {args.vfio_command}: {err}", file=sys.stderr)
    return 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``vfio`` and its subcommands on the ``vhostx`` subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "vfio", help="IOMMU groups, vfio-pci binding, device details, QEMU assignment preflight")
    p.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    p.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
    p.add_argument("--dev", default="/dev/vfio", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="vfio_command", required=True)
    sub.add_parser("groups", help="list IOMMU groups with their devices, drivers and viability")
    for name, text in (("bind", "bind a device to vfio-pci"),
                       ("unbind", "give a device back to its own driver"),
                       ("show", "a device's BARs, capabilities, regions and IRQs")):
        sub.add_parser(name, help=text).add_argument("bdf", type=_bdf)
    pf = sub.add_parser("preflight", help="check a device can be given to a QEMU guest")
    pf.add_argument("bdf", type=_bdf)
    pf.add_argument("--memory", type=parse_size, default=1 << 30,
                    help="guest memory QEMU will pin (default 1G)")
    p.set_defaults(func=run)
    return p
