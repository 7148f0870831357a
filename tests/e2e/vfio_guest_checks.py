"""The in-guest half of tests/e2e/test_vfio_guest.py: runs inside the VFIO test guest
(bench/vfio_guest.py) as root, chrooted into the host's root, and prints one
``VX-RESULT vfio.<check> ok`` or ``VX-RESULT vfio.<check> FAIL <reason>`` line per check and
``VX-RESULT fig.<name> <value>`` lines with the batching figures. Not collected by pytest.

Devices: edu at 00:03.0 (own group), virtio-net-pci at 02:00.0 behind a PCIe root port (bound
to virtio-pci at boot), edu 01:01.0 + virtio-net-pci 01:02.0 behind a PCI bridge (one group with
the bridge).
Threads: the main thread only.
"""

from __future__ import annotations

import asyncio
import mmap
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vfio import (
    Container,
    Device,
    DeviceError,
    DmaBuffer,
    DmaMapper,
    Group,
    GroupNotViable,
    IommuInfo,
    Region,
    Sysfs,
    VfioError,
)
from vfio import ioctls as V

EDU, NET, BR_EDU, BR_NET = "0000:00:03.0", "0000:02:00.0", "0000:01:01.0", "0000:01:02.0"
EDU_ID, EDU_LIVE, EDU_STATUS, EDU_IRQ_STATUS, EDU_IRQ_RAISE, EDU_IRQ_ACK = 0, 4, 0x20, 0x24, 0x60, 0x64
EDU_DMA_SRC, EDU_DMA_DST, EDU_DMA_CNT, EDU_DMA_CMD = 0x80, 0x88, 0x90, 0x98
EDU_BUF = 0x40000  # the device's 4 KiB DMA buffer; never DMA outside 0x40000-0x40fff
# QEMU 7.2's edu refuses (aborts QEMU with "hardware error") a transfer that ends exactly at the
# end of its buffer, so transfers stay below 4 KiB.
XFER = 2048
DMA_START, DMA_TO_RAM, DMA_IRQ = 1, 2, 4
PAGE = mmap.PAGESIZE

sysfs = Sysfs()


@dataclass
class State:
    """What one check sets up for the next (a check that finds its input missing fails)."""

    container: Container | None = None
    group: Group | None = None
    info: IommuInfo | None = None
    dev: Device | None = None
    mapper: DmaMapper | None = None
    bufs: tuple[DmaBuffer, DmaBuffer] | None = None

    def need(self, *names: str) -> Any:
        values = [getattr(self, n) for n in names]
        missing = [n for n, v in zip(names, values, strict=True) if v is None]
        if missing:
            raise AssertionError(f"an earlier check did not set up {', '.join(missing)}")
        return values[0] if len(values) == 1 else values


state = State()


def result(name: str, value: object) -> None:
    print(f"VX-RESULT {name} {value}", flush=True)


def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - every failure is reported, the rest run
                traceback.print_exc(file=sys.stdout)
                result(f"vfio.{name}", f"FAIL {type(err).__name__}: {err}".replace("\n", " "))
            else:
                result(f"vfio.{name}", "ok")
        CHECKS.append(run)
        return run
    return wrap


CHECKS: list[Callable[[], None]] = []


def dmar_faults() -> int:
    log = subprocess.run(["dmesg"], check=False, capture_output=True, text=True).stdout
    return sum("DMAR: [DMA Write" in ln or "DMAR: [DMA Read" in ln for ln in log.splitlines())


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


@check("container")
def _container() -> None:
    sysfs.bind_vfio(EDU)
    c = Container()
    expect(c.api_version == 0, f"API version 0, got {c.api_version}")
    types = c.supported_iommu_types()
    expect(V.TYPE1v2_IOMMU in types and V.TYPE1_IOMMU in types, f"type1 and type1v2, got {types}")
    expect(not c.check_extension(V.NOIOMMU_IOMMU), "no noiommu in Debian's kernel")
    state.container = c


@check("group")
def _group() -> None:
    c = state.need("container")
    g = Group.of_device(EDU)
    st = g.status()
    expect(st.viable and not st.container_set, f"viable, no container: got {st}")
    g.set_container(c)
    expect(g.status().container_set, "CONTAINER_SET after set_container")
    expect(c.set_iommu() == V.TYPE1v2_IOMMU, "type1v2 chosen")
    info = c.iommu_info()
    expect(info.pgsizes & 4096 != 0, f"4 KiB pages, got {info.pgsizes:#x}")
    expect(len(info.iova_ranges) >= 2 and not any(s <= 0xFEE00000 <= e for s, e in
                                                  info.iova_ranges),
           f"the MSI window 0xfee00000 reserved, ranges {info.iova_ranges}")
    expect(info.dma_avail is not None and info.dma_avail > 0, f"dma_avail, got {info.dma_avail}")
    result("fig.iommu_pgsizes", f"{info.pgsizes:#x}")
    result("fig.iova_ranges", ",".join(f"{s:#x}-{e:#x}" for s, e in info.iova_ranges))
    result("fig.dma_avail", info.dma_avail)
    state.group, state.info = g, info


@check("device")
def _device() -> None:
    g = state.need("group")
    dev = g.open_device(EDU)
    expect(dev.is_pci and dev.num_regions >= 9 and dev.num_irqs >= 2,
           f"a PCI device with 9 regions, got flags {dev.flags:#x} {dev.num_regions} regions")
    bar0 = dev.bar(0)
    expect(bar0.size == 1 << 20 and bar0.mappable, f"BAR0 1 MiB mappable, got {bar0.size:#x} "
           f"flags {bar0.flags:#x}")
    expect((dev.config_read(0, 2), dev.config_read(2, 2)) == (0x1234, 0x11E8), "edu ids")
    expect(not dev.can_reset, "edu offers no reset")
    try:
        dev.reset()
        raise AssertionError("reset of edu accepted")
    except DeviceError as err:
        expect("RESET" in str(err), f"the reset error names the flag: {err}")
    cmd = dev.enable_dma()
    expect(cmd & 0x6 == 0x6, f"memory space and bus master set, command {cmd:#x}")
    state.dev = dev


@check("bar")
def _bar() -> None:
    dev = state.need("dev")
    bar0 = dev.bar(0)
    expect(bar0.read32(EDU_ID) == 0x010000ED, f"edu id 0x010000ed, got {bar0.read32(EDU_ID):#x}")
    bar0.write32(EDU_LIVE, 0x12345678)
    expect(bar0.read32(EDU_LIVE) == 0xEDCBA987, "liveness returns the inverse")
    # the same register through pread/pwrite on the device fd (the non-mmap path)
    raw = struct.unpack("<I", bar0.read(EDU_ID, 4))[0]
    expect(raw == 0x010000ED, f"pread id, got {raw:#x}")


@check("msi")
def _msi() -> None:
    dev = state.need("dev")
    [efd] = dev.enable_irq(V.PCI_MSI_IRQ_INDEX)
    bar0 = dev.bar(0)
    t0 = time.monotonic()
    bar0.write32(EDU_IRQ_RAISE, 0x1)
    n = efd.wait(5.0)
    rtt = time.monotonic() - t0
    expect(n == 1, f"one MSI on the eventfd within 5 s, got {n}")
    expect(bar0.read32(EDU_IRQ_STATUS) == 1, "irq status 1")
    bar0.write32(EDU_IRQ_ACK, 0x1)
    dev.trigger(V.PCI_MSI_IRQ_INDEX)
    expect(efd.wait(2.0) == 1, "the kernel's loopback trigger arrives")

    async def on_loop() -> int:  # the same interrupt, awaited on an asyncio loop
        asyncio.get_running_loop().call_soon(bar0.write32, EDU_IRQ_RAISE, 0x4)
        return await asyncio.wait_for(efd.wait_async(), 5.0)

    expect(asyncio.run(on_loop()) == 1, "MSI awaited on an asyncio loop")
    bar0.write32(EDU_IRQ_ACK, 0x4)
    result("fig.msi_rtt_us", f"{rtt * 1e6:.0f}")


def edu_dma(b: Region, src: int, dst: int, count: int, to_ram: bool) -> None:
    b.write64(EDU_DMA_SRC, src)
    b.write64(EDU_DMA_DST, dst)
    b.write64(EDU_DMA_CNT, count)
    b.write64(EDU_DMA_CMD, DMA_START | (DMA_TO_RAM if to_ram else 0))
    deadline = time.monotonic() + 10
    while b.read64(EDU_DMA_CMD) & DMA_START:
        if time.monotonic() > deadline:
            raise AssertionError("edu DMA did not complete within 10 s")
        time.sleep(0.01)


@check("dma")
def _dma() -> None:
    c, dev, info = state.need("container", "dev", "info")
    mapper = DmaMapper(c, info, dma_mask_bits=28, reserve_low=0x100000)
    src, dst = DmaBuffer(PAGE), DmaBuffer(PAGE)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(PAGE))
    src.view()[:] = pattern
    src_iova, dst_iova = mapper.map_buffer(src), mapper.map_buffer(dst)
    bar0 = dev.bar(0)
    edu_dma(bar0, src_iova, EDU_BUF, XFER, to_ram=False)
    edu_dma(bar0, EDU_BUF, dst_iova, XFER, to_ram=True)
    expect(bytes(dst.view()[:XFER]) == pattern[:XFER], "RAM -> edu -> RAM returns the pattern")
    expect(bytes(dst.view()[XFER:]) == bytes(PAGE - XFER), "nothing written past the transfer")
    state.mapper, state.bufs = mapper, (src, dst)


@check("isolation")
def _isolation() -> None:
    dev, mapper = state.need("dev", "mapper")
    before = dmar_faults()
    iova = mapper.allocator.alloc(PAGE)  # allocated IOVA space, never mapped
    edu_dma(dev.bar(0), EDU_BUF, iova, XFER, to_ram=True)
    time.sleep(0.2)
    after = dmar_faults()
    expect(after > before, f"a DMAR fault for the unmapped IOVA {iova:#x} (faults {before} -> "
           f"{after})")
    mapper.allocator.free(iova, PAGE)


@check("unmap_revokes")
def _unmap_revokes() -> None:
    dev, mapper = state.need("dev", "mapper")
    src, _ = state.need("bufs")
    bar0 = dev.bar(0)
    target = DmaBuffer(PAGE)
    iova = mapper.map_buffer(target)
    edu_dma(bar0, EDU_BUF, iova, XFER, to_ram=True)
    expect(bytes(target.view()[:XFER]) == bytes(src.view()[:XFER]),
           "the mapped buffer receives the DMA")
    target.view()[:] = bytes(PAGE)
    expect(mapper.unmap(iova) == PAGE, "UNMAP_DMA reports the page unmapped")
    before = dmar_faults()
    edu_dma(bar0, EDU_BUF, iova, XFER, to_ram=True)
    time.sleep(0.2)
    expect(bytes(target.view()) == bytes(PAGE), "after unmap the device cannot write the buffer")
    expect(dmar_faults() > before, "the DMA to the unmapped IOVA faulted")


@check("intx")
def _intx() -> None:
    dev = state.need("dev")
    dev.disable_irq(V.PCI_MSI_IRQ_INDEX)
    info = dev.irq_info(V.PCI_INTX_IRQ_INDEX)
    expect(info.count == 1 and info.automasked, f"one automasked INTx, got {info}")
    [efd] = dev.enable_irq(V.PCI_INTX_IRQ_INDEX)
    bar0 = dev.bar(0)
    for _ in range(2):  # the second only arrives if unmask works
        bar0.write32(EDU_IRQ_RAISE, 0x2)
        expect(efd.wait(5.0) >= 1, "INTx on the eventfd")
        bar0.write32(EDU_IRQ_ACK, 0x2)
        dev.unmask_intx()
    dev.disable_irq(V.PCI_INTX_IRQ_INDEX)


@check("batching")
def _batching() -> None:
    c, info = state.need("container", "info")
    mapper = DmaMapper(c, info, reserve_low=1 << 32)
    for label, mib, per_page in (("batched", 256, False), ("per_page", 64, True)):
        buf = DmaBuffer(mib << 20)
        n0 = mapper.ioctls
        t0 = time.perf_counter()
        iova = mapper.map([(buf.vaddr, buf.size)], per_page=per_page)
        t_map = time.perf_counter() - t0
        maps = mapper.ioctls - n0
        t0 = time.perf_counter()
        mapper.unmap(iova)
        t_unmap = time.perf_counter() - t0
        scale = 1024 / mib
        result(f"fig.{label}_mib", mib)
        result(f"fig.{label}_map_ioctls", maps)
        result(f"fig.{label}_map_s", f"{t_map:.3f}")
        result(f"fig.{label}_unmap_s", f"{t_unmap:.3f}")
        result(f"fig.{label}_ioctls_per_gib", f"{maps * scale:.0f}")
        result(f"fig.{label}_map_s_per_gib", f"{t_map * scale:.2f}")
        buf.close()
    # many small buffers adjacent in memory: coalesced into one MAP_DMA
    buf = DmaBuffer(16 << 20)
    pages = [(buf.vaddr + i * PAGE, PAGE) for i in range(buf.size // PAGE)]
    n0 = mapper.ioctls
    iova = mapper.map(pages)
    result("fig.coalesced_buffers", len(pages))
    result("fig.coalesced_map_ioctls", mapper.ioctls - n0)
    expect(mapper.ioctls - n0 == 1, "adjacent buffers coalesced into one MAP_DMA")
    mapper.unmap(iova)


@check("not_viable")
def _not_viable() -> None:
    sysfs.bind_vfio(BR_EDU)
    number = sysfs.group_of(BR_EDU)
    expect(number is not None and number == sysfs.group_of(BR_NET),
           "both devices behind the bridge share a group")
    assert number is not None
    with Group(number) as g:
        expect(not g.status().viable, "the group is not viable")
        try:
            g.set_container(Container())
            raise AssertionError("a non-viable group was attached")
        except GroupNotViable as err:
            expect(err.blockers == [(BR_NET, "virtio-pci")], f"blockers, got {err.blockers}")
            expect(BR_NET in str(err) and "virtio-pci" in str(err), f"message names it: {err}")
            result("fig.not_viable_message", str(err).replace("\n", " "))
        sysfs.bind_vfio(BR_NET)  # the blocker too: now the group is viable
        expect(g.status().viable, "viable once every device is on vfio-pci")
    expect(sysfs.unbind_vfio(BR_NET) == "virtio-pci", "the blocker given back to virtio-pci")
    sysfs.unbind_vfio(BR_EDU)


@check("virtio_net")
def _virtio_net() -> None:
    previous = sysfs.bind_vfio(NET)
    expect(previous == "virtio-pci", f"taken from virtio-pci, got {previous}")
    c = Container()
    with Group.of_device(NET) as g:
        g.set_container(c)
        c.set_iommu()
        with g.open_device(NET) as dev:
            caps = dev.capabilities()
            names = [cap.name for cap in caps]
            expect("msi-x" in names and "pci-express" in names and "ats" in names,
                   f"MSI-X, PCIe and ATS capabilities, got {names}")
            vendor = {cap.vendor_byte3: cap for cap in caps if cap.cap_id == 0x09}
            expect({1, 2, 3, 4} <= set(vendor), f"virtio common/notify/isr/device caps, got "
                   f"{sorted(k for k in vendor if k is not None)}")
            result("fig.virtio_net_caps", ",".join(names))

            def locate(cfg_type: int) -> tuple[Region, int]:
                off = vendor[cfg_type].offset
                bar, offset = dev.config_read(off + 4, 1), dev.config_read(off + 8, 4)
                return dev.bar(bar), offset

            bar, common = locate(1)
            bar.write32(common + 0, 1)
            hi = bar.read32(common + 4)
            expect(hi & 0b11 == 0b11, f"VERSION_1 and ACCESS_PLATFORM offered, hi {hi:#x}")
            nq = struct.unpack("<H", bar.read(common + 0x12, 2))[0]
            expect(nq == 3, f"3 queues (rx, tx, ctrl), got {nq}")
            dbar, devcfg = locate(4)
            mac = dbar.read(devcfg, 6)
            expect(mac == bytes.fromhex("5254000f1004"), f"MAC 52:54:00:0f:10:04, got {mac.hex()}")
            msix = dev.irq_info(V.PCI_MSIX_IRQ_INDEX)
            expect(msix.count >= 3 and msix.eventfd, f"MSI-X vectors, got {msix}")
            efds = dev.enable_irq(V.PCI_MSIX_IRQ_INDEX, msix.count)
            dev.trigger(V.PCI_MSIX_IRQ_INDEX, msix.count - 1)
            expect(efds[-1].wait(2.0) == 1 and efds[0].consume() == 0, "MSI-X vector routing")
        g.unset_container()
    c.close()
    back = sysfs.unbind_vfio(NET)
    expect(back == "virtio-pci", f"given back to virtio-pci, got {back}")


@check("virtio_pci_transport")
def _virtio_pci_transport() -> None:
    """The project's virtio-pci transport on the iommu_platform=on device (QEMU's own
    virtio-net on a hubport): MSI-X vectors, IOVA-mapped rings, TX through the vIOMMU."""
    from virtio.driver.net import NetDriver
    from virtio.transport.pci import VirtioPciTransport

    sysfs.bind_vfio(NET)
    t = VirtioPciTransport.open(NET, queues=2, queue_size=64)
    try:
        expect(t.irq_kind == "msix" and t.iova_mode == "va", f"MSI-X and allocated IOVAs, got "
               f"{t.irq_kind} {t.iova_mode}")
        expect(t.mac == bytes.fromhex("5254000f1004"), f"MAC from device cfg, got {t.mac!r}")
        regs = t.queue_registers()
        expect(all(r["enable"] == 1 for r in regs) and regs[1]["desc"] == t.queues[1].desc_gpa,
               f"queues enabled at our IOVAs: {regs}")
        net = NetDriver(t, buf_size=2048)
        t.queues[1].set_interrupts(True)  # TX completions signalled: the MSI-X path
        frame = bytes.fromhex("ffffffffffff5254000f1004") + b"\x88\xb5" + bytes(50)
        expect(net.send([frame] * 8, timeout=2.0) == 8, "8 frames posted")
        got = t.wait_call(1, 5.0)
        deadline = time.monotonic() + 5
        done = 0
        while done < 8 and time.monotonic() < deadline:
            done += net.reap_tx()
            time.sleep(0.01)
        if done != 8:
            log = subprocess.run(["dmesg"], check=False, capture_output=True, text=True).stdout
            print("dmesg tail:", *log.splitlines()[-8:], sep="\n")
        expect(done == 8, f"the device used the 8 TX chains through the vIOMMU, {done} came back "
               f"(status {t.status:#x}, used idx {t.queues[1].read_used_idx()}, avail idx "
               f"{t.queues[1].avail_idx}, kicks {t.kicks}, irq {got})")
        expect(got and t.interrupts >= 1, "a TX interrupt on the queue's MSI-X vector")
        result("fig.pci_transport_map_ops", t.map_ops)
    finally:
        t.close()
    expect(sysfs.unbind_vfio(NET) == "virtio-pci", "given back to virtio-pci")


def vhostx_vfio(*argv: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "vhostx", "vfio", *argv], check=False,
                         capture_output=True, text=True, timeout=120)
    print(f"$ vhostx vfio {' '.join(argv)}\n{out.stdout}{out.stderr}", end="")
    return out


@check("tooling")
def _tooling() -> None:
    out = vhostx_vfio("preflight", EDU)
    expect(out.returncode == 0, f"preflight exit 0, got {out.returncode}: {out.stdout}")
    expect(f"vfio-pci,host={EDU[5:]}" in out.stdout, "preflight prints the -device argument")
    expect("ok   interrupt remapping on" in out.stdout, "interrupt remapping detected")
    out = vhostx_vfio("groups")
    expect(out.returncode == 0 and f"not viable: {BR_NET} bound to virtio-pci" in out.stdout,
           f"groups names the blocker: {out.stdout}")
    expect(vhostx_vfio("bind", NET).returncode == 0, "bind")
    out = vhostx_vfio("show", NET)
    expect(out.returncode == 0, f"show exit 0, got {out.returncode}: {out.stderr}")
    for want in ("region BAR4", "region CONFIG", "irq MSI-X", "cap ats at 0x"):
        expect(want in out.stdout, f"show prints {want!r}")
    out = vhostx_vfio("unbind", NET)
    expect("driver now virtio-pci" in out.stdout, f"unbind gives it back: {out.stdout}")


def main() -> int:
    for run in CHECKS:
        run()
    try:
        for obj in (state.dev, state.group, state.container):
            if obj is not None:
                obj.close()
    except VfioError as err:
        print(f"cleanup: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
