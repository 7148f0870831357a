"""Report and plots of the `passthrough` scenario (bench/harness/passthrough.py).

``render_report(doc)`` is the markdown: the dimensions (commit, accelerator, label, backends and
whether their device had iommu_platform), one table per backend with a row per path and phase,
and the passthrough/paravirt ratios measured in the same guest boot. ``write_plots(doc, dir)``
draws rates and round-trip times per path (matplotlib, Agg) and returns the file names.
Any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["render_report", "write_plots"]

PATHS = ("paravirt", "passthrough")
PHASES = ("tx", "rx", "pingpong")
COLUMNS = [("pps", "guest pps"), ("peer_received_pps", "host got pps"),
           ("peer_sent_pps", "host sent pps"),
           ("rtt_p50_us", "RTT p50 us"), ("rtt_p99_us", "RTT p99 us"),
           ("cpu_us_per_pkt", "guest CPU us/pkt"), ("kicks_per_pkt", "kicks/pkt (guest)"),
           ("irqs_per_pkt", "irqs/pkt (guest)"), ("backend_kicks_per_pkt", "kicks/pkt (vhostx)"),
           ("backend_irqs_per_pkt", "irqs/pkt (vhostx)"), ("map_ops", "IOMMU map ops")]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def _ratio(a: Any, b: Any) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return f"{a / b:.2f}"
    return "-"


def render_report(doc: dict[str, Any]) -> str:
    sc = doc["scenario"]
    lines = [
        f"# Scenario `{sc['name']}`: paravirtual vs passthrough in one vIOMMU guest",
        "",
        f"{sc['description']}",
        "",
        ("- **TCG figures**: QEMU 7.2 `-accel tcg`, q35 + intel-iommu (intremap, caching-mode); "
        "the emulated guest is the bottleneck, so absolute rates say little about a KVM host; "
        "compare the two paths within one backend's run."),
        f"- label: {doc.get('label') or '-'}",
        (f"- commit {doc['commit']}, host {doc['host']}, started {doc['started']}; window "
        f"{sc['duration']} s per phase, {sc['size']}-byte frames, queue size {sc['queue_size']}, "
        f"peer source pace {sc['source_pps']} pps in the rx phase."),
        ("- paths: **paravirt** = the guest kernel's virtio_net through an AF_PACKET socket; "
        "**passthrough** = the NIC bound to vfio-pci in the guest and driven by the project's "
        "user-space driver (virtio.transport.pci.VirtioPciTransport + virtio.driver.net."
        "NetDriver, per-packet work in C: virtio/_core/vx_drvq.c)."),
        ("- phases: tx (guest sends as fast as it can), rx (the host peer sends to the guest, "
        "the guest counts), pingpong (one frame out, the peer's echo back; pps counts both "
        "directions)."),
        ("- guest CPU us/pkt: guest CPU busy time (/proc/stat) over the window per packet; with "
        "one vCPU a polling driver shows the whole window. kicks/irqs per packet: the user-space "
        "driver counts its notify-BAR writes and INTx/MSI-X interrupts; for the kernel path the "
        "guest sees only its interrupts (/proc/interrupts), vhostx's own counters give kicks "
        "and interrupts of both paths. IOMMU map ops: MAP_DMA ioctls of the user-space driver "
        "(one for its whole DMA area); the kernel path runs in an identity domain (iommu=pt), "
        "no map operations."),
        "",
    ]
    for rec in doc["backends"]:
        be = rec["backend"]
        lines.append(f"## Backend `{be['name']}` ({be['kind']}), device iommu_platform="
                     f"{'on' if be['iommu_platform'] else 'off'}")
        lines.append("")
        if be["iommu_platform"]:
            lines.append("The device runs with iommu_platform=on,ats=on behind the vIOMMU: "
                         "every ring and buffer address is an IOVA the backend translates "
                         "through its device IOTLB (UPDATEs and INVALIDATEs from QEMU, MISSes "
                         "back).")
        else:
            lines.append("The device runs without iommu_platform (the scenario's backend has "
                         "iommu_platform = false): it reads guest physical addresses and "
                         "bypasses the vIOMMU. The user-space driver then maps its DMA area at "
                         "IOVA = guest physical address (one hugepage), so the same buffers are "
                         "right either way; the vIOMMU isolates nothing for this device.")
        lines.append("")
        if rec.get("error"):
            lines += [f"**failed**: `{rec['error']}`", ""]
            continue
        g = rec.get("guest", {})
        lines.append(f"Guest boot {rec.get('boot_s', '-')} s; user-space driver: IOVA mode "
                     f"{g.get('iova_mode', '-')}, interrupts {g.get('irq', '-')}, features "
                     f"{g.get('features', '-')}.")
        lines.append("")
        lines.append("| path | phase | " + " | ".join(h for _k, h in COLUMNS) + " |")
        lines.append("|---|---|" + "---|" * len(COLUMNS))
        for path in PATHS:
            for phase in PHASES:
                ph = rec["phases"].get(f"{path}.{phase}", {})
                lines.append(f"| {path} | {phase} | " +
                             " | ".join(_fmt(ph.get(k)) for k, _h in COLUMNS) + " |")
        lines.append("")
        lines.append("passthrough / paravirt, same boot:")
        lines.append("")
        lines.append("| phase | rate ratio | RTT p50 ratio | CPU us/pkt ratio |")
        lines.append("|---|---|---|---|")
        for phase in PHASES:
            a = rec["phases"].get(f"passthrough.{phase}", {})
            b = rec["phases"].get(f"paravirt.{phase}", {})
            lines.append(f"| {phase} | {_ratio(a.get('pps'), b.get('pps'))} | "
                         f"{_ratio(a.get('rtt_p50_us'), b.get('rtt_p50_us'))} | "
                         f"{_ratio(a.get('cpu_us_per_pkt'), b.get('cpu_us_per_pkt'))} |")
        lines.append("")
    for p in doc.get("plots", []):
        lines.append(f"![{p}](plots/{p})")
    lines.append("")
    return "\n".join(lines)


def write_plots(doc: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    recs = [r for r in doc["backends"] if not r.get("error")]
    if not recs:
        return []
    names = []
    fig, axes = plt.subplots(1, len(PHASES), figsize=(12, 3.6))
    for ax, phase in zip(axes, PHASES, strict=True):
        xs, labels = [], []
        for i, rec in enumerate(recs):
            for j, path in enumerate(PATHS):
                v = rec["phases"].get(f"{path}.{phase}", {}).get("pps")
                xs.append(v if isinstance(v, (int, float)) else 0)
                labels.append(f"{rec['backend']['name']}\n{path}")
                ax.bar(i * 3 + j, xs[-1], color="C0" if path == "paravirt" else "C1")
        ax.set_xticks([i * 3 + j for i in range(len(recs)) for j in range(2)], labels,
                      fontsize=7)
        ax.set_title(f"{phase}: guest pps (TCG)")
    fig.tight_layout()
    fig.savefig(out / "rates.png", dpi=110)
    plt.close(fig)
    names.append("rates.png")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    k = 0
    ticks, labels = [], []
    for rec in recs:
        for path in PATHS:
            ph = rec["phases"].get(f"{path}.pingpong", {})
            p50, p99 = ph.get("rtt_p50_us"), ph.get("rtt_p99_us")
            if isinstance(p50, (int, float)):
                ax.bar(k, p50, color="C0" if path == "paravirt" else "C1")
                if isinstance(p99, (int, float)):
                    ax.plot([k, k], [p50, p99], color="k")
            ticks.append(k)
            labels.append(f"{rec['backend']['name']}\n{path}")
            k += 1
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("RTT us (bar p50, line to p99)")
    ax.set_title("ping-pong round trip (TCG)")
    fig.tight_layout()
    fig.savefig(out / "rtt.png", dpi=110)
    plt.close(fig)
    names.append("rtt.png")
    return names
