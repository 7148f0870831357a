"""PNG plots of a scenario's results with matplotlib (Agg backend, no display needed).

`make_plots(doc, runs, out_dir)` writes whichever apply and returns their paths relative to the
results directory:
- throughput_vs_devices.png: median Mpps against the number of devices, one line per backend
  (stream tests swept over `devices`; only the runs in each case's main machine mode; error
  bars: min-max over those repetitions);
- latency_cdf.png: CDF of round-trip times per backend (ping-pong tests and ping-pong flows
  alongside streams; all repetitions pooled; one panel per case);
- cpu_vs_load.png: backend cores against the offered (or measured) packet rate per backend;
- notifications.png: kicks, interrupts and polling switches per packet per backend and case.
Any thread (the Agg backend is selected on import).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .report import metric
from .stats import cdf_points

__all__ = ["make_plots"]


def _ok(r: dict[str, Any]) -> bool:
    return not r.get("error") and not r.get("skipped")


def _group(runs: Sequence[dict[str, Any]], kind: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("kind") == kind and _ok(r):
            out.setdefault(r["test"], []).append(r)
    return out


def _throughput(runs: Sequence[dict[str, Any]], path: Path,
                main: dict[str, Any] | None = None) -> bool:
    """`main`: each case's main mode (summary "mode"); runs of another mode are left out."""
    main = main or {}
    runs = [r for r in runs if main.get(r["case"]) is None
            or (r.get("machine_mode") or {}).get("label") == main[r["case"]]]
    tests = _group(runs, "stream")
    tests = {t: rs for t, rs in tests.items() if len({r["params"]["devices"] for r in rs}) > 1}
    if not tests:
        return False
    fig, axes = plt.subplots(1, len(tests), figsize=(6 * len(tests), 4.2), squeeze=False)
    for ax, (test, rs) in zip(axes[0], tests.items(), strict=True):
        for backend in dict.fromkeys(r["backend"] for r in rs):
            pts: dict[int, list[float]] = {}
            for r in rs:
                if r["backend"] == backend and (v := metric(r, "pps")) is not None:
                    pts.setdefault(r["params"]["devices"], []).append(v / 1e6)
            xs = sorted(pts)
            med = [sorted(pts[x])[len(pts[x]) // 2] for x in xs]
            lo = [m - min(pts[x]) for m, x in zip(med, xs, strict=True)]
            hi = [max(pts[x]) - m for m, x in zip(med, xs, strict=True)]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=backend)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_ylabel("Mpps (total, median of the main mode's repetitions)")
        ax.set_title(test)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _latency(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    cases: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        if r.get("kind") == "pingpong" and _ok(r) and r.get("_rtt_ns"):
            cases.setdefault(r["case"], {}).setdefault(r["backend"], []).extend(
                x / 1000.0 for x in r["_rtt_ns"])
        elif _ok(r) and r.get("_alongside_rtt_ns"):  # a ping-pong riding alongside a stream
            cases.setdefault(f"{r['case']} (ping-pong alongside)", {}).setdefault(
                r["backend"], []).extend(x / 1000.0 for x in r["_alongside_rtt_ns"])
    if not cases:
        return False
    shown = list(cases.items())[:6]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.2), squeeze=False)
    for ax, (case, by_backend) in zip(axes[0], shown, strict=True):
        for backend, us in by_backend.items():
            xs, ys = cdf_points(us)
            ax.plot(xs, ys, label=f"{backend} (n={len(us)})")
        ax.set_xscale("log")
        ax.set_xlabel("round-trip time, us")
        ax.set_ylabel("fraction of round trips")
        ax.set_title(case)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _cpu_load(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    pts: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        if r.get("kind") not in ("stream", "pingpong") or not _ok(r):
            continue
        load = metric(r, "offered_pps") or metric(r, "pps")
        cpu = metric(r, "backend_cpu.total")
        if load is not None and cpu is not None:
            pts.setdefault(r["backend"], []).append((load, cpu))
    if not pts or max(len(v) for v in pts.values()) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for backend, p in pts.items():
        p.sort()
        ax.plot([x for x, _ in p], [y for _, y in p], "o", label=backend, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("offered load, packets/s (measured rate when unpaced)")
    ax.set_ylabel("backend CPU, cores")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _notifications(doc: dict[str, Any], path: Path) -> bool:
    rows = []
    for e in doc.get("summary", []):
        for backend, b in e["backends"].items():
            if b.get("kicks_per_packet") is not None or b.get("interrupts_per_packet") is not None:
                rows.append((f"{e['case']}\n{backend}", b.get("kicks_per_packet") or 0.0,
                             b.get("interrupts_per_packet") or 0.0,
                             b.get("poll_switches_per_packet") or 0.0))
    if not rows:
        return False
    rows = rows[:24]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    width = 0.27
    xs = range(len(rows))
    for k, (label, idx) in enumerate((("kicks", 1), ("interrupts", 2), ("polling switches", 3))):
        ax.bar([x + (k - 1) * width for x in xs], [r[idx] for r in rows], width, label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r[0] for r in rows], fontsize="x-small", rotation=30, ha="right")
    ax.set_ylabel("per packet (median of repetitions)")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_plots(doc: dict[str, Any], runs: Sequence[dict[str, Any]], out_dir: Path) -> list[str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    main = {e["case"]: e.get("mode") for e in doc.get("summary", [])}
    for name, fn in (("throughput_vs_devices.png", lambda p: _throughput(runs, p, main)),
                     ("latency_cdf.png", lambda p: _latency(runs, p)),
                     ("cpu_vs_load.png", lambda p: _cpu_load(runs, p)),
                     ("notifications.png", lambda p: _notifications(doc, p))):
        p = out_dir / name
        if fn(p):
            made.append(f"{out_dir.name}/{name}")
    return made
