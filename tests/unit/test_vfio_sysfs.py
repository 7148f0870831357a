"""vfio.sysfs, vfio.mdev, vfio.pcicaps and the no-VFIO errors, against a fake sysfs tree
(vfio.fakesys): this host has no IOMMU and no mdev driver, so the kernel's side is imitated."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vfio import Container, Group, VfioUnavailable
from vfio.errors import MdevError, SysfsError
from vfio.fakesys import FakeSysfs, make_config
from vfio.mdev import create_mdev, list_mdevs, mdev_group, mdev_types, remove_mdev
from vfio.pcicaps import walk_capabilities

EDU = "0000:00:03.0"
NET = "0000:00:04.0"
BR_EDU = "0000:01:01.0"
BR_NET = "0000:01:02.0"


def virtio_net_config() -> bytes:
    vendor = [(0x09, bytes([16, t, 4]) + bytes(12)) for t in (1, 2, 3, 4)]
    return make_config(0x1AF4, 0x1041, 0x020000,
                       caps=[(0x11, bytes(10)), *vendor, (0x10, bytes(58))],
                       ext_caps=[(0x0F, 1, bytes(4))])


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_driver("vfio-pci")
    fs.add_device(EDU, vendor=0x1234, device=0x11E8, pci_class=0xFF0000, group=3,
                  resources=[(0xFEA00000, 0xFEAFFFFF, 0x40200)])
    fs.add_device(NET, vendor=0x1AF4, device=0x1041, pci_class=0x020000, group=4,
                  driver="virtio-pci", config=virtio_net_config())
    fs.add_device(BR_EDU, vendor=0x1234, device=0x11E8, group=5, driver="vfio-pci")
    fs.add_device(BR_NET, vendor=0x1AF4, device=0x1041, group=5, driver="virtio-pci")
    return fs


def test_groups_list_devices_and_drivers(sysfs: FakeSysfs) -> None:
    groups = sysfs.groups()
    assert sorted(groups) == [3, 4, 5]
    assert [(d.bdf, d.driver) for d in groups[5]] == [(BR_EDU, "vfio-pci"),
                                                     (BR_NET, "virtio-pci")]
    assert groups[3][0].vendor == 0x1234 and groups[3][0].device == 0x11E8


def test_blockers_name_the_device_bound_to_a_host_driver(sysfs: FakeSysfs) -> None:
    assert sysfs.blockers(5) == [(BR_NET, "virtio-pci")]
    assert sysfs.blockers(3) == []


def test_bind_and_give_back(sysfs: FakeSysfs) -> None:
    assert sysfs.bind_vfio(NET) == "virtio-pci"
    assert sysfs.driver(NET) == "vfio-pci"
    assert (sysfs.pci_devices / NET / "driver_override").read_text() == "vfio-pci"
    assert sysfs.unbind_vfio(NET) == "virtio-pci"


def test_bind_without_vfio_pci_driver_says_so(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_device(EDU, vendor=0x1234, device=0x11E8, group=3)
    with pytest.raises(SysfsError, match="expected the vfio-pci driver"):
        fs.bind_vfio(EDU)


def test_unknown_device_is_named(sysfs: FakeSysfs) -> None:
    with pytest.raises(SysfsError, match="expected a PCI device 0000:00:09.0"):
        sysfs.device("0000:00:09.0")


def test_capabilities_standard_and_extended_from_config() -> None:
    cfg = virtio_net_config()
    caps = walk_capabilities(lambda off, n: cfg[off : off + n], len(cfg))
    assert [c.name for c in caps] == ["msi-x"] + ["vendor-specific"] * 4 + ["pci-express", "ats"]
    assert [c.vendor_byte3 for c in caps if c.cap_id == 9] == [1, 2, 3, 4]
    assert caps[-1].extended and caps[-1].offset == 0x100


def test_capability_loop_is_refused() -> None:
    cfg = bytearray(make_config(1, 2, 0, caps=[(0x05, bytes(2)), (0x11, bytes(2))]))
    cfg[0x45] = 0x40  # the second points back at the first
    from vfio.errors import DeviceError
    with pytest.raises(DeviceError, match="not seen before"):
        walk_capabilities(lambda off, n: bytes(cfg[off : off + n]))


def test_interrupt_remapping_from_ecap(sysfs: FakeSysfs, tmp_path: Path) -> None:
    assert sysfs.interrupt_remapping(tmp_path) is None
    ecap = sysfs.root / "class/iommu/dmar0/intel-iommu"
    ecap.mkdir(parents=True)
    (ecap / "ecap").write_text("f00f5e\n")
    assert sysfs.interrupt_remapping(tmp_path) is True
    (tmp_path / "interrupts").write_text(" 24: 1 IR-PCI-MSI 65536-edge virtio0\n")
    (ecap / "ecap").write_text("0\n")
    assert sysfs.interrupt_remapping(tmp_path) is True


def test_mdev_types_create_open_group_remove(sysfs: FakeSysfs) -> None:
    sysfs.add_mdev_parent(EDU, {"fake-1": ("Fake small", 2), "fake-2": ("Fake big", 0)})
    types = mdev_types(EDU, sysfs)
    assert [(t.type_id, t.name, t.available_instances, t.device_api) for t in types] == [
        ("fake-1", "Fake small", 2, "vfio-pci"), ("fake-2", "Fake big", 0, "vfio-pci")]
    uid = create_mdev(EDU, "fake-1", "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", sysfs)
    assert mdev_types(EDU, sysfs)[0].available_instances == 1
    [m] = list_mdevs(sysfs)
    assert (m.uuid, m.type_id, m.parent) == (uid, "fake-1", EDU)
    assert mdev_group(uid, sysfs) == m.group == 6
    remove_mdev(uid, sysfs)
    assert list_mdevs(sysfs) == [] and mdev_types(EDU, sysfs)[0].available_instances == 2


def test_mdev_errors_name_what_was_expected(sysfs: FakeSysfs) -> None:
    sysfs.add_mdev_parent(EDU, {"fake-2": ("Fake big", 0)})
    with pytest.raises(MdevError, match=r"expected one of the mdev types \['fake-2'\]"):
        create_mdev(EDU, "nope", sysfs=sysfs)
    with pytest.raises(MdevError, match="no instance left"):
        create_mdev(EDU, "fake-2", sysfs=sysfs)
    with pytest.raises(MdevError, match="to be an mdev parent"):
        mdev_types(NET, sysfs)
    with pytest.raises(MdevError, match="expected an mdev"):
        remove_mdev("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", sysfs)


def test_no_vfio_container_says_so_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(VfioUnavailable) as err:
        Container(str(tmp_path / "vfio"))
    assert "this host has no VFIO" in str(err.value) and "\n" not in str(err.value)


def test_no_vfio_group_says_so(tmp_path: Path) -> None:
    with pytest.raises(VfioUnavailable, match="this host has no VFIO"):
        Group(3, dev_root=str(tmp_path))


def test_fake_config_file_has_ids(sysfs: FakeSysfs) -> None:
    cfg = sysfs.config_space(NET)
    assert struct.unpack_from("<HH", cfg) == (0x1AF4, 0x1041) and len(cfg) == 4096
