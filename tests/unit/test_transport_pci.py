"""virtio.transport.pci without a device: the virtio capability parser, the pagemap reader, and
the bring-up sequence against a register model of a modern virtio-net-pci function."""

from __future__ import annotations

import struct

import pytest

from vfio.errors import DeviceError
from virtio.transport import Transport
from virtio.transport.pci import (
    CAP_COMMON,
    CAP_DEVICE,
    CAP_ISR,
    CAP_NOTIFY,
    VirtioPciTransport,
    parse_virtio_caps,
    physical_address,
)


def _config(caps: list[tuple[int, int, int, int, int]]) -> bytearray:
    """Config space with vendor capabilities (cfg_type, bar, offset, length, multiplier)."""
    cfg = bytearray(256)
    cfg[6] = 0x10  # status: capability list
    ptr = 0x40
    cfg[0x34] = ptr
    for i, (cfg_type, bar, offset, length, mult) in enumerate(caps):
        nxt = ptr + 20 if i + 1 < len(caps) else 0
        cap_len = 20 if cfg_type == CAP_NOTIFY else 16
        cfg[ptr : ptr + 16] = bytes([0x09, nxt, cap_len, cfg_type, bar, 0, 0, 0]) + struct.pack(
            "<II", offset, length)
        if cfg_type == CAP_NOTIFY:
            cfg[ptr + 16 : ptr + 20] = struct.pack("<I", mult)
        ptr = nxt
    return cfg


QEMU_LAYOUT = [(CAP_COMMON, 4, 0x0, 0x1000, 0), (CAP_ISR, 4, 0x1000, 0x1000, 0),
               (CAP_DEVICE, 4, 0x2000, 0x1000, 0), (CAP_NOTIFY, 4, 0x3000, 0x1000, 4)]


def _reader(cfg: bytearray):
    return lambda off, n: bytes(cfg[off : off + n])


def test_parse_finds_each_structure_and_the_notify_multiplier():
    cfg = _config(QEMU_LAYOUT)
    caps = parse_virtio_caps(_reader(cfg), [0x40, 0x54, 0x68, 0x7C])
    assert caps[CAP_COMMON].bar == 4 and caps[CAP_COMMON].offset == 0
    assert caps[CAP_NOTIFY].notify_off_multiplier == 4 and caps[CAP_NOTIFY].offset == 0x3000
    assert caps[CAP_DEVICE].offset == 0x2000


def test_parse_keeps_the_first_capability_of_a_type():
    cfg = _config([*QEMU_LAYOUT, (CAP_COMMON, 2, 0x8000, 0x100, 0)])
    caps = parse_virtio_caps(_reader(cfg), [0x40, 0x54, 0x68, 0x7C, 0x90])
    assert caps[CAP_COMMON].bar == 4


def test_parse_refuses_a_device_without_modern_structures():
    cfg = _config([(CAP_DEVICE, 4, 0x2000, 0x1000, 0)])
    with pytest.raises(DeviceError, match="missing common, notify, isr"):
        parse_virtio_caps(_reader(cfg), [0x40])


def test_parse_refuses_a_short_notify_capability():
    cfg = _config(QEMU_LAYOUT)
    cfg[0x7C + 2] = 16
    with pytest.raises(DeviceError, match="notify capability at 0x7c"):
        parse_virtio_caps(_reader(cfg), [0x40, 0x54, 0x68, 0x7C])


def test_physical_address_reads_the_pfn(tmp_path):
    pagemap = tmp_path / "pagemap"
    entry = (1 << 63) | 0x1234
    pagemap.write_bytes(bytes(8 * 5) + struct.pack("<Q", entry))
    assert physical_address(5 * 4096 + 0x10, str(pagemap)) == 0x1234 * 4096 + 0x10


def test_physical_address_refuses_an_absent_page(tmp_path):
    pagemap = tmp_path / "pagemap"
    pagemap.write_bytes(bytes(8))
    with pytest.raises(DeviceError, match="present page"):
        physical_address(0, str(pagemap))


def test_pci_transport_implements_the_transport_protocol():
    for name in ("connected", "has_feature", "alloc", "kick", "wait_call"):
        assert hasattr(VirtioPciTransport, name)
    assert isinstance(Transport, type)


class FakeContainer:
    def __init__(self) -> None:
        self.maps: list[tuple[int, int, int]] = []
        self.unmaps: list[tuple[int, int]] = []

    def iommu_info(self):
        from vfio import IommuInfo

        return IommuInfo(pgsizes=0x40201000, iova_ranges=((0, 0xFEDFFFFF), (0xFEF00000, 2**39 - 1)))

    def map_dma(self, vaddr: int, iova: int, size: int, *, read: bool = True,
                write: bool = True) -> None:
        self.maps.append((vaddr, iova, size))

    def unmap_dma(self, iova: int, size: int, *, all_mappings: bool = False) -> int:
        self.unmaps.append((iova, size))
        return size


def test_no_ring_at_iova_zero():
    """QEMU does not start a vhost ring whose descriptor address is 0: the first queue's ring
    at IOVA 0 left that queue dead behind DPDK's vhost with iommu_platform=on."""
    from virtio.transport.pci import IOVA_RESERVED_LOW, _DmaArea

    c = FakeContainer()
    area = _DmaArea(c, 2 << 20, "va")  # type: ignore[arg-type]
    try:
        assert area.iova >= IOVA_RESERVED_LOW and area.alloc(4096, 4096) >= IOVA_RESERVED_LOW
        assert len(c.maps) == 1 and area.map_ops == 1  # the whole area in one MAP_DMA
    finally:
        area.close()
    assert c.unmaps == [(area.iova, area.size)]
