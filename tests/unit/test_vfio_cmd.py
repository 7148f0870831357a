"""`vhostx vfio ...` against a fake sysfs tree (vfio.fakesys), and on a host without VFIO: one
line, exit code 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vfio.fakesys import FakeSysfs, make_config
from vhostx import vfio_cmd
from vhostx.cli import main

EDU, NET, BR_EDU, BR_NET = "0000:00:03.0", "0000:02:00.0", "0000:01:01.0", "0000:01:02.0"
COMMANDS = [["groups"], ["bind", EDU], ["unbind", EDU], ["show", EDU], ["preflight", EDU]]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    monkeypatch.setattr(vfio_cmd, "Sysfs", FakeSysfs)  # the fake kernel acts on binds
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_driver("vfio-pci")
    fs.add_device(EDU, vendor=0x1234, device=0x11E8, pci_class=0xFF0000, group=3,
                  config=make_config(0x1234, 0x11E8, 0xFF0000, caps=[(0x05, bytes(12))]),
                  resources=[(0xFEA00000, 0xFEAFFFFF, 0x40200)])
    vendor = [(0x09, bytes([16, t, 4]) + bytes(12)) for t in (1, 2, 3, 4)]
    fs.add_device(NET, vendor=0x1AF4, device=0x1041, pci_class=0x020000, group=4,
                  driver="virtio-pci", config=make_config(
                      0x1AF4, 0x1041, 0x020000, caps=[(0x11, bytes(10)), *vendor],
                      ext_caps=[(0x0F, 1, bytes(4))]))
    fs.add_device(BR_EDU, vendor=0x1234, device=0x11E8, group=5)
    fs.add_device(BR_NET, vendor=0x1AF4, device=0x1041, group=5, driver="virtio-pci")
    (tmp_path / "dev").mkdir()
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "interrupts").write_text(" 24: 5 IR-PCI-MSI 65536-edge\n")
    return fs


def vfio(fs: FakeSysfs, *argv: str) -> int:
    root = fs.root.parent
    return main(["vfio", "--sysfs", str(fs.root), "--proc", str(root / "proc"), "--dev",
                 str(root / "dev"), *argv])


def test_groups_lists_devices_drivers_and_viability(fake: FakeSysfs,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert vfio(fake, "groups") == 0
    out = capsys.readouterr().out
    assert "group 3: viable" in out
    assert f"group 5: not viable: {BR_NET} bound to virtio-pci" in out
    assert f"{NET}  1af4:1041  class 020000  driver virtio-pci" in out


def test_bind_then_unbind_gives_the_device_back(fake: FakeSysfs,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert vfio(fake, "bind", "02:00.0") == 0
    assert f"{NET}: bound to vfio-pci (was virtio-pci); group 4" in capsys.readouterr().out
    assert fake.driver(NET) == "vfio-pci"
    assert vfio(fake, "unbind", NET) == 0
    assert "given back; driver now virtio-pci" in capsys.readouterr().out
    assert fake.driver(NET) == "virtio-pci"


def test_bind_in_a_shared_group_names_what_still_blocks(
        fake: FakeSysfs, capsys: pytest.CaptureFixture[str]) -> None:
    assert vfio(fake, "bind", BR_EDU) == 0
    assert f"group not viable yet: {BR_NET} bound to virtio-pci" in capsys.readouterr().out


def test_show_prints_bars_and_capabilities(fake: FakeSysfs,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert vfio(fake, "show", NET) == 0
    out = capsys.readouterr().out
    assert "cap msi-x at 0x40" in out and out.count("cap vendor-specific") == 4
    assert "cfg_type 4" in out and "cap ats at 0x100" in out
    assert vfio(fake, "show", EDU) == 0
    assert "BAR0: mem 0xfea00000-0xfeafffff (0x100000 bytes)" in capsys.readouterr().out


def test_preflight_fails_until_bound_and_prints_qemu_args(
        fake: FakeSysfs, capsys: pytest.CaptureFixture[str]) -> None:
    assert vfio(fake, "preflight", EDU) == 1
    out = capsys.readouterr().out
    assert f"FAIL {EDU} bound to vfio-pci" in out
    assert "ok   interrupt remapping on" in out
    assert "qemu arguments: -device vfio-pci,host=00:03.0" in out
    fake.bind_vfio(EDU)
    (fake.root.parent / "dev" / "3").touch()
    assert vfio(fake, "preflight", EDU, "--memory", "64M") == 0, capsys.readouterr().out


def test_preflight_names_the_blocker_of_a_shared_group(
        fake: FakeSysfs, capsys: pytest.CaptureFixture[str]) -> None:
    fake.bind_vfio(BR_EDU)
    assert vfio(fake, "preflight", BR_EDU) == 1
    assert f"FAIL group 5 viable; {BR_NET} is bound to virtio-pci" in capsys.readouterr().out


def test_unknown_device_is_one_line(fake: FakeSysfs, capsys: pytest.CaptureFixture[str]) -> None:
    assert vfio(fake, "show", "0000:00:09.0") == 1
    err = capsys.readouterr().err
    assert "expected a PCI device 0000:00:09.0" in err and err.count("\n") == 1


def test_bad_address_is_a_usage_error(fake: FakeSysfs) -> None:
    with pytest.raises(SystemExit) as exc:
        vfio(fake, "show", "03.0")
    assert exc.value.code == 2


@pytest.mark.parametrize("argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_no_vfio_host_one_line_exit_1(tmp_path: Path, argv: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "sys"
    empty.mkdir()
    assert main(["vfio", "--sysfs", str(empty), *argv]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("vhostx vfio: this host has no VFIO: ")
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_no_vfio_host_process_has_no_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "sys"
    empty.mkdir()
    res = subprocess.run([sys.executable, "-m", "vhostx", "vfio", "--sysfs", str(empty),
                          "preflight", EDU], capture_output=True, text=True, timeout=60,
                         check=False, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
