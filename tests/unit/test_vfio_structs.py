"""vfio.ioctls against the kernel's header: every struct's size and field offsets, and every
ioctl number, as a C program compiled against <linux/vfio.h> prints them."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from vfio import ioctls as V

HEADER = Path("/usr/include/linux/vfio.h")

# (our struct, C type, [(our field, C member)])
STRUCTS = [
    (V.CapHeader, "struct vfio_info_cap_header", [("id", "id"), ("version", "version"),
                                                  ("next", "next")]),
    (V.GroupStatus, "struct vfio_group_status", [("argsz", "argsz"), ("flags", "flags")]),
    (V.DeviceInfo, "struct vfio_device_info", [("num_regions", "num_regions"),
                                               ("num_irqs", "num_irqs"),
                                               ("cap_offset", "cap_offset")]),
    (V.RegionInfo, "struct vfio_region_info", [("index", "index"), ("cap_offset", "cap_offset"),
                                               ("size", "size"), ("offset", "offset")]),
    (V.IrqInfo, "struct vfio_irq_info", [("index", "index"), ("count", "count")]),
    (V.IrqSet, "struct vfio_irq_set", [("index", "index"), ("start", "start"),
                                       ("count", "count")]),
    (V.IommuType1Info, "struct vfio_iommu_type1_info", [("iova_pgsizes", "iova_pgsizes"),
                                                        ("cap_offset", "cap_offset")]),
    (V.IovaRangeCapHeader, "struct vfio_iommu_type1_info_cap_iova_range",
     [("header", "header"), ("nr_iovas", "nr_iovas"), ("reserved", "reserved")]),
    (V.IovaRange, "struct vfio_iova_range", [("start", "start"), ("end", "end")]),
    (V.DmaAvailCap, "struct vfio_iommu_type1_info_dma_avail", [("avail", "avail")]),
    (V.DmaMap, "struct vfio_iommu_type1_dma_map", [("flags", "flags"), ("vaddr", "vaddr"),
                                                   ("iova", "iova"), ("size", "size")]),
    (V.DmaUnmap, "struct vfio_iommu_type1_dma_unmap", [("iova", "iova"), ("size", "size")]),
    (V.SpaprTceInfo, "struct vfio_iommu_spapr_tce_info",
     [("dma32_window_start", "dma32_window_start"), ("dma32_window_size", "dma32_window_size"),
      ("ddw_pgsizes", "ddw.pgsizes"), ("ddw_levels", "ddw.levels")]),
]

IOCTLS = ["GET_API_VERSION", "CHECK_EXTENSION", "SET_IOMMU", "GROUP_GET_STATUS",
          "GROUP_SET_CONTAINER", "GROUP_UNSET_CONTAINER", "GROUP_GET_DEVICE_FD",
          "DEVICE_GET_INFO", "DEVICE_GET_REGION_INFO", "DEVICE_GET_IRQ_INFO", "DEVICE_SET_IRQS",
          "DEVICE_RESET", "IOMMU_GET_INFO", "IOMMU_MAP_DMA", "IOMMU_UNMAP_DMA"]
CONSTANTS = ["TYPE1_IOMMU", "TYPE1v2_IOMMU", "SPAPR_TCE_IOMMU", "SPAPR_TCE_v2_IOMMU",
             "NOIOMMU_IOMMU", "UNMAP_ALL", "IRQ_SET_DATA_EVENTFD", "IRQ_SET_ACTION_TRIGGER",
             "IRQ_SET_ACTION_UNMASK", "REGION_INFO_FLAG_MMAP", "PCI_CONFIG_REGION_INDEX",
             "PCI_MSIX_IRQ_INDEX", "DMA_UNMAP_FLAG_ALL"]


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not HEADER.exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and linux-libc-dev (/usr/include/linux/vfio.h)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vfio.h>",
             "int main(void) {"]
    for _, ctype, fields in STRUCTS:
        lines.append(f'printf("sizeof {ctype} %zu\\n", sizeof({ctype}));')
        for _, member in fields:
            lines.append(f'printf("offsetof {ctype} {member} %zu\\n", offsetof({ctype}, {member}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'printf("value {name} %lu\\n", (unsigned long)(VFIO_{name}));')
    lines += ["return 0;", "}"]
    d = tmp_path_factory.mktemp("vfio_layout")
    (d / "layout.c").write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-o", str(d / "layout"), str(d / "layout.c")], check=True)
    out: dict[str, int] = {}
    for line in subprocess.run([str(d / "layout")], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        key, _, value = line.rpartition(" ")
        out[key] = int(value)
    return out


@pytest.mark.parametrize(("ours", "ctype", "fields"), STRUCTS, ids=[s[1] for s in STRUCTS])
def test_struct_layout_matches_header(c_layout: dict[str, int], ours: type[ctypes.Structure],
                                      ctype: str, fields: list[tuple[str, str]]) -> None:
    # DeviceInfo: newer headers append u32 pad (24); the kernel takes either by argsz.
    assert ctypes.sizeof(ours) in (c_layout[f"sizeof {ctype}"], c_layout[f"sizeof {ctype}"] - 4) \
        if ours is V.DeviceInfo else ctypes.sizeof(ours) == c_layout[f"sizeof {ctype}"]
    for ours_name, member in fields:
        assert getattr(ours, ours_name).offset == c_layout[f"offsetof {ctype} {member}"], member


@pytest.mark.parametrize("name", IOCTLS + CONSTANTS)
def test_constant_matches_header(c_layout: dict[str, int], name: str) -> None:
    assert getattr(V, name) == c_layout[f"value {name}"]


def test_ioctl_numbers_from_reference() -> None:
    assert V.GET_API_VERSION == 0x3B64
    assert V.IOMMU_MAP_DMA == 0x3B71
    assert V.GROUP_GET_DEVICE_FD == 0x3B6A
