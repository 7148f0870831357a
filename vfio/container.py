"""A VFIO container (/dev/vfio/vfio): API version, extensions, the IOMMU, DMA map/unmap.

Role: owns the container fd. ``Container()`` checks the API version; ``set_iommu()`` picks the
best IOMMU type the kernel offers (after a group is attached); ``iommu_info()`` reads page sizes
and the capability chain (IOVA ranges, DMA entries left); ``map_dma``/``unmap_dma`` are the raw
ioctls (batching and IOVA allocation live in vfio.dma).
Threads: one thread at a time per container (the kernel serialises the ioctls themselves).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from . import ioctls as V
from .errors import IoctlError, IommuError, VfioUnavailable

__all__ = ["IOMMU_TYPE_NAMES", "Container", "IommuInfo"]

#: The IOMMU types a container may be set to, best first, with their names.
IOMMU_TYPE_NAMES: dict[int, str] = {
    V.TYPE1v2_IOMMU: "type1v2",
    V.TYPE1_IOMMU: "type1",
    V.SPAPR_TCE_v2_IOMMU: "spapr-tce-v2",
    V.SPAPR_TCE_IOMMU: "spapr-tce",
    V.NOIOMMU_IOMMU: "noiommu",
}

NO_VFIO_MESSAGE = (
    "this host has no VFIO: {path} does not exist (load vfio, vfio_iommu_type1 and vfio-pci "
    "on a machine with an IOMMU)"
)


@dataclass(frozen=True)
class IommuInfo:
    """What the IOMMU reports: page sizes (a bitmap: bit n set = 2**n bytes), the usable IOVA
    ranges (inclusive ends; the whole 64-bit space when the kernel reports none) and how many
    more DMA mappings dma_entry_limit allows (None when the kernel does not say)."""

    pgsizes: int
    iova_ranges: tuple[tuple[int, int], ...] = ((0, 2**64 - 1),)
    dma_avail: int | None = None
    caps: tuple[int, ...] = field(default=())

    @property
    def min_page(self) -> int:
        return self.pgsizes & -self.pgsizes if self.pgsizes else 4096

    @property
    def page_sizes(self) -> list[int]:
        return [1 << b for b in range(64) if self.pgsizes >> b & 1]


def parse_type1_info(buf: bytes) -> IommuInfo:
    """Decode a VFIO_IOMMU_GET_INFO answer (the fixed struct plus its capability chain)."""
    info = V.IommuType1Info.from_buffer_copy(buf[: ctypes.sizeof(V.IommuType1Info)])
    pgsizes = info.iova_pgsizes if info.flags & V.IOMMU_INFO_PGSIZES else 0
    ranges: list[tuple[int, int]] = []
    avail: int | None = None
    caps: list[int] = []
    off = info.cap_offset if info.flags & V.IOMMU_INFO_CAPS else 0
    seen: set[int] = set()
    while off:
        if off in seen or off + ctypes.sizeof(V.CapHeader) > len(buf):
            raise IommuError(
                f"IOMMU info capability chain: expected an offset inside the {len(buf)}-byte "
                f"answer not seen before, got {off}"
            )
        seen.add(off)
        hdr = V.CapHeader.from_buffer_copy(buf, off)
        caps.append(hdr.id)
        if hdr.id == V.IOVA_RANGE_CAP:
            cap = V.IovaRangeCapHeader.from_buffer_copy(buf, off)
            base = off + ctypes.sizeof(V.IovaRangeCapHeader)
            for i in range(cap.nr_iovas):
                r = V.IovaRange.from_buffer_copy(buf, base + i * ctypes.sizeof(V.IovaRange))
                ranges.append((r.start, r.end))
        elif hdr.id == V.DMA_AVAIL_CAP:
            avail = V.DmaAvailCap.from_buffer_copy(buf, off).avail
        off = hdr.next
    return IommuInfo(
        pgsizes=pgsizes,
        iova_ranges=tuple(ranges) if ranges else ((0, 2**64 - 1),),
        dma_avail=avail,
        caps=tuple(caps),
    )


class Container:
    """An open /dev/vfio/vfio. Use as a context manager or call ``close()``."""

    def __init__(self, path: str = "/dev/vfio/vfio") -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise VfioUnavailable(NO_VFIO_MESSAGE.format(path=path)) from err
        except PermissionError as err:
            raise VfioUnavailable(f"cannot open {path}: permission denied (run as root)") from err
        self.iommu_type: int | None = None
        self.groups: list[object] = []
        try:
            version = V.ioctl_int(self.fd, V.GET_API_VERSION, 0, "VFIO_GET_API_VERSION", path)
        except IoctlError:
            os.close(self.fd)
            raise
        if version != V.VFIO_API_VERSION:
            os.close(self.fd)
            raise VfioUnavailable(
                f"{path}: expected VFIO API version {V.VFIO_API_VERSION}, the kernel has {version}"
            )
        self.api_version = version

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def check_extension(self, ext: int) -> bool:
        """True if the kernel supports extension ``ext`` (an IOMMU type or a feature)."""
        rc = V.ioctl_int(self.fd, V.CHECK_EXTENSION, ext, "VFIO_CHECK_EXTENSION", f"ext {ext}")
        return rc > 0

    def supported_iommu_types(self) -> list[int]:
        """The IOMMU types this kernel offers, best first (CHECK_EXTENSION per type)."""
        return [t for t in IOMMU_TYPE_NAMES if self.check_extension(t)]

    def set_iommu(self, iommu_type: int | None = None) -> int:
        """Set the IOMMU model (a group must be attached first); the best offered by default."""
        if iommu_type is None:
            offered = self.supported_iommu_types()
            if not offered:
                raise IommuError(
                    f"{self.path}: expected the kernel to offer one of "
                    f"{', '.join(IOMMU_TYPE_NAMES.values())}, it offers none "
                    "(is vfio_iommu_type1 loaded?)"
                )
            iommu_type = offered[0]
        name = IOMMU_TYPE_NAMES.get(iommu_type, str(iommu_type))
        V.ioctl_int(self.fd, V.SET_IOMMU, iommu_type, "VFIO_SET_IOMMU", f"type {name}")
        self.iommu_type = iommu_type
        return iommu_type

    def iommu_info(self) -> IommuInfo:
        """VFIO_IOMMU_GET_INFO, re-asked with the larger argsz the kernel announces for its
        capability chain."""
        if self.iommu_type in (V.SPAPR_TCE_IOMMU, V.SPAPR_TCE_v2_IOMMU):
            tce = V.SpaprTceInfo(argsz=ctypes.sizeof(V.SpaprTceInfo))
            V.ioctl(self.fd, V.IOMMU_GET_INFO, tce, "VFIO_IOMMU_SPAPR_TCE_GET_INFO", self.path)
            start, size = tce.dma32_window_start, tce.dma32_window_size
            return IommuInfo(pgsizes=tce.ddw_pgsizes or 4096, iova_ranges=((start, start + size - 1),))
        if self.iommu_type is None:
            raise IommuError(f"{self.path}: IOMMU info asked before set_iommu()")
        if self.iommu_type == V.NOIOMMU_IOMMU:
            return IommuInfo(pgsizes=4096)
        size = ctypes.sizeof(V.IommuType1Info)
        for _ in range(4):
            buf = bytearray(size)
            V.IommuType1Info.from_buffer(buf).argsz = size
            V.ioctl(self.fd, V.IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO", self.path)
            wanted = V.IommuType1Info.from_buffer(buf).argsz
            if wanted <= size:
                return parse_type1_info(bytes(buf))
            size = wanted
        raise IommuError(f"{self.path}: VFIO_IOMMU_GET_INFO kept asking for a larger argsz")

    def map_dma(self, vaddr: int, iova: int, size: int, *, read: bool = True,
                write: bool = True) -> None:
        """One VFIO_IOMMU_MAP_DMA: ``size`` bytes of this process at ``vaddr`` at ``iova``."""
        flags = (V.DMA_MAP_FLAG_READ if read else 0) | (V.DMA_MAP_FLAG_WRITE if write else 0)
        req = V.DmaMap(argsz=ctypes.sizeof(V.DmaMap), flags=flags, vaddr=vaddr, iova=iova,
                       size=size)
        V.ioctl(self.fd, V.IOMMU_MAP_DMA, req, "VFIO_IOMMU_MAP_DMA",
                f"vaddr {vaddr:#x} iova {iova:#x} size {size:#x}")

    def unmap_dma(self, iova: int, size: int, *, all_mappings: bool = False) -> int:
        """One VFIO_IOMMU_UNMAP_DMA; returns the bytes the kernel unmapped. ``all_mappings``
        unmaps everything (VFIO_UNMAP_ALL; iova and size must then be 0)."""
        flags = V.DMA_UNMAP_FLAG_ALL if all_mappings else 0
        req = V.DmaUnmap(argsz=ctypes.sizeof(V.DmaUnmap), flags=flags, iova=iova, size=size)
        V.ioctl(self.fd, V.IOMMU_UNMAP_DMA, req, "VFIO_IOMMU_UNMAP_DMA",
                f"iova {iova:#x} size {size:#x}")
        return int(req.size)
