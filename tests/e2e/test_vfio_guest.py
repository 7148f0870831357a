"""vfio/ inside a TCG guest with an emulated VT-d IOMMU (bench/vfio_guest.py).

One guest boots per module and runs every in-guest check in one invocation of
tests/e2e/vfio_guest_checks.py (the project's Python, from the host's root shared read-only over
9p); each check's result comes back as a ``VX-RESULT vfio.<check>`` console line and is one test
here. The whole module takes about 15-60 s here (boot ~3-7 s, Python start, edu's 100 ms DMA
timer per transfer, 16384 page-by-page MAP_DMAs).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.qemu import Guest
from bench.vfio_guest import (
    VFIO_APPEND,
    VFIO_MODULES,
    build_vfio_image,
    chroot_job,
    vfio_guest_args,
)

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
CHECKS = ["container", "group", "device", "bar", "msi", "dma", "isolation", "unmap_revokes",
          "intx", "batching", "not_viable", "virtio_net", "virtio_pci_transport", "tooling"]


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], str]]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not found (install the Debian package qemu-system-x86)")
    image = build_vfio_image()
    command = (f"cd {REPO} && PYTHONPATH={REPO} {sys.executable} "
               f"tests/e2e/vfio_guest_checks.py")
    workdir = tmp_path_factory.mktemp("vfio-guest")
    with Guest(image, job=chroot_job(command), name="vfio", memory_mb=1024, append=VFIO_APPEND,
               extra_args=vfio_guest_args(), workdir=workdir) as g:
        g.wait_done(timeout=240, check=False)
        yield g.results, g.console


def test_image_loads_vfio_modules_in_dependency_order() -> None:
    mods = list(build_vfio_image().modules)
    for m in VFIO_MODULES:
        assert m in mods
    order = ["irqbypass", "vfio", "vfio_virqfd", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci"]
    assert [mods.index(m) for m in order] == sorted(mods.index(m) for m in order)
    assert mods.index("9pnet") < mods.index("9pnet_virtio") < mods.index("9p")


@pytest.mark.parametrize("name", CHECKS)
def test_in_guest(guest_run: tuple[dict[str, str], str], name: str) -> None:
    results, console = guest_run
    got = results.get(f"vfio.{name}")
    assert got == "ok", f"vfio.{name}: {got or 'no result'}\n" + "\n".join(console.splitlines()[-60:])


def test_batching_figures(guest_run: tuple[dict[str, str], str]) -> None:
    """One MAP_DMA per contiguous buffer, one per page unbatched, the figures docs/vfio.md uses."""
    results, _ = guest_run
    assert int(results["fig.batched_map_ioctls"]) == 1
    assert int(results["fig.per_page_map_ioctls"]) == int(results["fig.per_page_mib"]) * 256
    assert int(results["fig.coalesced_map_ioctls"]) == 1
    assert float(results["fig.per_page_map_s_per_gib"]) > float(results["fig.batched_map_s_per_gib"])


def test_guest_job_finished(guest_run: tuple[dict[str, str], str]) -> None:
    results, console = guest_run
    assert results.get("chroot_status") == "0", console[-3000:]
