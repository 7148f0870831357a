"""bench.harness.assign: the command line of a guest with an assigned host function, and the
preflight that must refuse on a host without VFIO (this one) before anything is bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.guest import GuestImage
from bench.harness import assign
from bench.harness.assign import (
    AssignedGuest,
    AssignmentRefused,
    Preflight,
    assigned_qemu_args,
    prepare_assignment,
)


def test_command_line_assigns_the_function_under_kvm():
    args = assigned_qemu_args("0000:3b:00.1", kernel="/k", initrd="/i", memory_mb=2048, cpus=2,
                              append="vx.ip=10.0.0.2/24")
    assert args[args.index("-device") + 1] == "vfio-pci,host=3b:00.1,id=assigned0"
    assert args[args.index("-machine") + 1] == "q35,accel=kvm"
    assert args[args.index("-cpu") + 1] == "host"
    assert args[args.index("-m") + 1] == "2048" and args[args.index("-smp") + 1] == "2"
    assert "tcg" not in " ".join(args) and "vhost-user" not in " ".join(args)
    assert args[args.index("-append") + 1].endswith("vx.ip=10.0.0.2/24")
    assert args[args.index("-nic") + 1] == "none"  # no emulated NIC beside the assigned one


def test_short_bdf_gets_the_domain_and_bad_ones_are_refused():
    args = assigned_qemu_args("3b:00.1", kernel="/k", initrd="/i")
    assert "vfio-pci,host=3b:00.1,id=assigned0" in args
    with pytest.raises(ValueError, match="expected a PCI address"):
        assigned_qemu_args("3b:00", kernel="/k", initrd="/i")


def test_assigned_guest_uses_that_command_line(tmp_path: Path):
    image = GuestImage(kernel=tmp_path / "vmlinuz", initramfs=tmp_path / "initrd",
                       kernel_release="6.1.0-1-amd64", package="linux-image-6.1.0-1-amd64",
                       package_version="6.1-1", modules=())
    g = AssignedGuest("0000:3b:00.1", image, name="kvm1", memory_mb=512)
    cmd = g.command(tmp_path / "job.initrd")
    assert "vfio-pci,host=3b:00.1,id=assigned0" in cmd and str(tmp_path / "job.initrd") in cmd


def test_preflight_refuses_clearly_on_a_host_without_vfio():
    """This host has no VFIO and no IOMMU: the real tooling's preflight refuses, nothing bound."""
    with pytest.raises(AssignmentRefused) as ei:
        prepare_assignment("0000:00:03.0", 512, python=sys.executable)
    msg = str(ei.value)
    assert "cannot assign 0000:00:03.0" in msg and "no VFIO" in msg and "IOMMU" in msg


def test_unbound_function_is_bound_then_checked_again(monkeypatch):
    calls: list[tuple[str, ...]] = []
    answers = iter([Preflight(1, "ok   IOMMU on\nFAIL 0000:3b:00.1 bound to vfio-pci (it is "
                                 "bound to ixgbevf: vhostx vfio bind)"),
                    Preflight(0, "bound"), Preflight(0, "ok   all")])

    def fake(*argv: str, python: str = "") -> Preflight:
        calls.append(argv)
        return next(answers)

    monkeypatch.setattr(assign, "_vfio", fake)
    assert prepare_assignment("3b:00.1", 1024).ok
    assert [c[0] for c in calls] == ["preflight", "bind", "preflight"]
    assert calls[0][1:] == ("0000:3b:00.1", "--memory", "1024M")


def test_other_preflight_failures_refuse_without_binding(monkeypatch):
    calls: list[str] = []

    def fake(*argv: str, python: str = "") -> Preflight:
        calls.append(argv[0])
        return Preflight(1, "FAIL group 12 viable; 0000:3b:00.0 is bound to ixgbe\n"
                            "FAIL 0000:3b:00.1 bound to vfio-pci")

    monkeypatch.setattr(assign, "_vfio", fake)
    with pytest.raises(AssignmentRefused, match="group 12 viable"):
        prepare_assignment("0000:3b:00.1", 1024)
    assert calls == ["preflight"]
