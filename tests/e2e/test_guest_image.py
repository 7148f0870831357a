"""The test guest image works: it boots under TCG, runs a job, reports results, powers off, and its
virtio-net driver talks to a vhost-user backend (DPDK's own, in testpmd's icmpecho mode), which
validates the image independently of vhostx.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench.guest import DEFAULT_MODULES, build_image
from bench.qemu import Guest, GuestFailure, VhostUserNic


def test_initramfs_contents(tmp_path: Path) -> None:
    """The cpio archive unpacks with the host's cpio and holds init, busybox, modules, helpers;
    a job segment appended by initrd_with_job is a separate gzip member carrying /job.sh."""
    if not Path("/usr/bin/cpio").exists():
        pytest.skip("cpio not installed on the host")
    img = build_image()
    assert build_image() == img, "a second build must return the same image"
    t0 = time.monotonic()
    build_image()
    assert time.monotonic() - t0 < 2.0, "a cached build must be fast"
    initrd = img.initrd_with_job(tmp_path / "initrd.gz", "echo hi\n", {"etc/extra": b"x" * 5})
    root = tmp_path / "root"
    root.mkdir()
    data = initrd.read_bytes()
    # two gzip segments with zero padding in between (the kernel skips it); unpack each
    base = img.initramfs.read_bytes()
    job_segment = data[len(base) :].lstrip(b"\0")
    for segment in (base, job_segment):
        subprocess.run(
            ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
            cwd=root,
            input=gzip.decompress(segment),
            check=True,
        )
    init = root / "init"
    assert init.stat().st_mode & 0o111 and init.read_text().startswith("#!/bin/busybox sh")
    assert (root / "bin" / "busybox").stat().st_size > 500_000
    assert os.readlink(root / "bin" / "sh") == "/bin/busybox"
    assert (root / "dev" / "console").is_char_device()
    mods = (root / "etc" / "vx-modules").read_text().split()
    assert mods == list(img.modules)
    for m in DEFAULT_MODULES:
        assert m in mods
        ko = root / "lib" / "modules" / f"{m}.ko"
        assert ko.read_bytes()[:4] == b"\x7fELF", f"{m}.ko is not an uncompressed ELF module"
    assert mods.index("virtio_ring") < mods.index("virtio") < mods.index("virtio_net")
    assert (root / "job.sh").read_text() == "echo hi\n"
    assert (root / "etc" / "extra").read_bytes() == b"x" * 5
    assert re.fullmatch(r"6\.1\.\d+-\d+-amd64", img.kernel_release), img.kernel_release
    # Debian's 6.1 kernel has CONFIG_PVH: QEMU boots the extracted ELF directly (much faster
    # under TCG than decompressing the bzImage)
    assert img.bzimage is not None and img.bzimage.name == f"vmlinuz-{img.kernel_release}"
    assert img.kernel != img.bzimage
    with open(img.kernel, "rb") as f:
        assert f.read(4) == b"\x7fELF"


@pytest.mark.qemu
def test_guest_boots_runs_job_and_powers_off(guest_image: Any, e2e_dir: Path) -> None:
    job = (
        "vx_result kernel $(uname -r)\n"
        "vx_gen_file /tmp/f 4\n"
        "vx_result size $(stat -c %s /tmp/f)\n"
        "vx_result md5 $(vx_md5 /tmp/f)\n"
        "exit 3\n"
    )
    t0 = time.monotonic()
    with Guest(guest_image, [], job, name="plain", workdir=e2e_dir) as g:
        boot = g.wait_ready(120)
        status = g.wait_done(120, check=False)
        assert g.stop() == 0, "QEMU should exit by itself after poweroff -f"
    wall = time.monotonic() - t0
    print(f"\nboot to VX-READY {boot:.1f} s wall, whole run {wall:.1f} s")
    assert status == 3
    assert g.results["kernel"] == guest_image.kernel_release
    assert g.results["size"] == str(4 << 20)
    assert re.fullmatch(r"[0-9a-f]{32}", g.results["md5"])
    assert "VX-ERROR" not in g.console
    with pytest.raises(GuestFailure, match="job exited with status 3"):
        g.wait_done(1)


@pytest.mark.qemu
@pytest.mark.dpdk
def test_guest_pings_dpdk_icmpecho(guest_image: Any, e2e_dir: Path, subnet: str) -> None:
    """The guest's virtio-net works over vhost-user against DPDK's backend: icmpecho answers ARP
    and ping for any address."""
    from bench.testpmd import Testpmd, VhostVdev, find_testpmd

    if find_testpmd() is None:
        pytest.skip("dpdk-testpmd not found (install the Debian package dpdk-dev)")
    sock = str(e2e_dir / "vhost0.sock")
    with Testpmd(
        [VhostVdev(sock)],
        forward_mode="icmpecho",
        forward_lcores=(1,),
        main_lcore=0,
        log_dir=e2e_dir,
        name="icmpecho",
    ) as peer:
        peer.start_forwarding()
        job = f"vx_wait_peer {subnet}.1 30 && vx_ping {subnet}.1 5\n"
        nic = VhostUserNic(sock, mac="52:54:00:0a:00:02", ip=f"{subnet}.2/24")
        with Guest(guest_image, [nic], job, name="pinger", workdir=e2e_dir) as g:
            boot = g.wait_ready(120)
            g.wait_done(120)
        print(f"\nboot to VX-READY {boot:.1f} s wall (testpmd polling the other core)")
        assert f"VX-NET eth0 52:54:00:0a:00:02 {subnet}.2/24" in g.console
        assert int(g.results["ping_received"]) == 5
        stats = peer.stop_forwarding()
    port = stats.ports[0]
    assert port.rx_packets >= 6 and port.tx_packets >= 6, port  # ARP + 1 + 5 pings, answered
