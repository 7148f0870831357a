"""vfio.device regions and vfio.irq eventfds on the host: a regular file stands in for the device
fd (pread/pwrite/mmap at a region's offset), and eventfds are signalled by hand the way the
kernel signals them on an interrupt."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from vfio import ioctls as V
from vfio.device import Region
from vfio.errors import DeviceError
from vfio.irq import IrqEventfd


class _FileDevice:
    def __init__(self, path: Path, size: int) -> None:
        path.write_bytes(bytes(size))
        self.fd = os.open(path, os.O_RDWR)
        self.name = "fake"


def region(tmp_path: Path, flags: int, offset: int = 0x10000, size: int = 0x1000) -> Region:
    dev = _FileDevice(tmp_path / "dev", offset + size)
    info = V.RegionInfo(index=0, flags=flags, size=size, offset=offset)
    return Region(dev, info)  # type: ignore[arg-type]


RW = V.REGION_INFO_FLAG_READ | V.REGION_INFO_FLAG_WRITE


def test_pread_pwrite_region_at_its_offset(tmp_path: Path) -> None:
    r = region(tmp_path, RW)
    r.write32(0x10, 0x010000ED)
    r.write64(0x80, 0x1122334455667788)
    assert r.read32(0x10) == 0x010000ED and r.read64(0x80) == 0x1122334455667788
    raw = os.pread(r.device.fd, 4, 0x10010)
    assert struct.unpack("<I", raw)[0] == 0x010000ED  # at region offset + register offset


def test_mmap_region_registers(tmp_path: Path) -> None:
    r = region(tmp_path, RW | V.REGION_INFO_FLAG_MMAP)
    r.write32(0x4, 0xDEADBEEF)
    assert r.read(0x4, 4) == struct.pack("<I", 0xDEADBEEF)  # visible through pread too
    r.close()


def test_region_bounds_alignment_and_mmap_refusal(tmp_path: Path) -> None:
    r = region(tmp_path, RW)
    with pytest.raises(DeviceError, match=r"expected an access inside 0-0x1000, got 4 bytes at 0x1000"):
        r.read32(0x1000)
    with pytest.raises(DeviceError, match="4-byte aligned"):
        r.read32(0x2)
    with pytest.raises(DeviceError, match="expected a region with the MMAP flag"):
        r.map()


def test_eventfd_wait_and_consume() -> None:
    with IrqEventfd(1, 0) as e:
        assert e.consume() == 0 and e.wait(0.01) == 0
        os.eventfd_write(e.fd, 1)
        os.eventfd_write(e.fd, 1)
        assert e.wait(1.0) == 2


async def test_eventfd_on_an_asyncio_loop() -> None:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[int] = loop.create_future()
    with IrqEventfd(2, 3) as e:
        def on_readable() -> None:
            if not got.done():
                got.set_result(e.consume())

        loop.add_reader(e.fileno(), on_readable)
        loop.call_later(0.01, os.eventfd_write, e.fd, 1)
        assert await asyncio.wait_for(got, 2.0) == 1
        loop.remove_reader(e.fileno())


async def test_eventfd_wait_async_returns_the_count() -> None:
    with IrqEventfd(1, 0) as e:
        asyncio.get_running_loop().call_later(0.01, os.eventfd_write, e.fd, 3)
        assert await asyncio.wait_for(e.wait_async(), 2.0) == 3
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(e.wait_async(), 0.05)


def test_regions_leave_out_the_vga_index_vfio_pci_refuses_with_einval() -> None:
    """vfio-pci answers GET_REGION_INFO for index 8 (VGA) with EINVAL on a device that is not a
    VGA device; `vhostx vfio show` failed on virtio-net-pci until regions() left it out."""
    import errno

    from vfio.device import Device
    from vfio.errors import IoctlError

    refuse = {8: errno.EINVAL}

    class _Dev(Device):
        def __init__(self) -> None:
            self.num_regions = 9

        def region(self, index: int) -> Region:
            if index in refuse:
                raise IoctlError("VFIO_DEVICE_GET_REGION_INFO", refuse[index], f"region {index}")
            return Region(self, V.RegionInfo(index=index, size=0x1000))

    assert [r.index for r in _Dev().regions()] == list(range(8))
    refuse[6] = errno.EIO  # any other error still surfaces
    with pytest.raises(IoctlError, match="region 6"):
        _Dev().regions()
