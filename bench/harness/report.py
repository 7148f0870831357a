"""Summaries and the markdown report of a scenario's runs.

`summarize(scenario, runs)` labels every run with its machine mode (`modes.assign_modes`), then
groups runs by case and backend: medians of every metric over the repetitions in the case's main
mode (the mode with the most runs), how many runs fell in each mode, and for every backend its
ratios against the reference backend, paired by repetition and only within one mode: per mode
median with min and max, the mode with the most pairs quoted first. A pair across modes is never
used. `markdown(doc)` renders the results document (results.json) as tables, with the
slice-level rates by mode of bench/harness/slice_modes.py (computed from the runs when an older
document lacks them); `rederive(doc)` computes a document's labels, summary and slice estimate
again by the current rules (`vhostx bench report`). Pure; any thread.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .modes import (
    FAST,
    MIXED,
    ONE,
    PAIRABLE,
    PROBE_FIT,
    SLOW,
    assign_modes,
    mode_counts,
    same_mode_pairs,
)
from .scenario_model import ModeSettings, Scenario
from .slice_modes import markdown_section, slice_modes
from .stats import Ratio

__all__ = ["RATIO_METRICS", "main_mode", "markdown", "metric", "one_line", "rederive",
           "summarize"]

# metric name -> (how to read it from a run's metrics, higher is better?)
RATIO_METRICS: dict[str, tuple[str, bool]] = {
    "pps": ("pps", True),
    "p50_us": ("latency.p50_us", False),
    "p99_us": ("latency.p99_us", False),
    "p99_9_us": ("latency.p99_9_us", False),
    "backend_cpu": ("backend_cpu.total", False),
    "alongside_p50_us": ("alongside.latency.p50_us", False),
    "alongside_p99_us": ("alongside.latency.p99_us", False),
    "alongside_p99_9_us": ("alongside.latency.p99_9_us", False),
}
_ALONGSIDE_RATIOS = ("alongside_p50_us", "alongside_p99_us", "alongside_p99_9_us")
_KIND_RATIOS = {"stream": ("pps", "backend_cpu"), "pingpong": ("p50_us", "p99_us", "pps"),
                "idle": ("backend_cpu",)}


def metric(run: Mapping[str, Any], path: str) -> float | None:
    """A metric of one run by dotted path, None when the run failed or lacks it."""
    if run.get("error") or run.get("skipped"):
        return None
    cur: Any = run.get("metrics", {})
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    if cur is None:
        return None
    try:
        value = float(cur)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _median(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


_MODE_ORDER = (FAST, ONE, SLOW)
_MEDIANS = (("pps", "pps"), ("bps", "bps"), ("backend_pps", "backend_pps"),
            ("backend_cpu", "backend_cpu.total"), ("client_cpu", "client_cpu.total"),
            ("p50_us", "latency.p50_us"), ("p99_us", "latency.p99_us"),
            ("p99_9_us", "latency.p99_9_us"),
            ("kicks_per_packet", "notifications.per_packet.kicks"),
            ("interrupts_per_packet", "notifications.per_packet.interrupts"),
            ("poll_switches_per_packet", "notifications.per_packet.poll_switches"),
            ("kicks_avoided_per_packet", "notifications.per_packet.kicks_avoided"),
            ("rss_without_guest_mb", "memory.rss_without_guest_mb"),
            ("alongside_p50_us", "alongside.latency.p50_us"),
            ("alongside_p99_us", "alongside.latency.p99_us"),
            ("alongside_p99_9_us", "alongside.latency.p99_9_us"),
            ("alongside_rtps", "alongside.round_trips_per_s"),
            ("alongside_cpu", "alongside.cpu.total"))


def _label(run: dict[str, Any]) -> str:
    return str((run.get("machine_mode") or {}).get("label", "unknown"))


def main_mode(counts: dict[str, int]) -> str | None:
    """The pairable mode with the most runs (ties: fast, one, slow); None without any."""
    best = [(counts.get(m, 0), -i, m) for i, m in enumerate(_MODE_ORDER) if counts.get(m, 0)]
    return max(best)[2] if best else None


def _ratio_doc(values: list[float]) -> dict[str, Any]:
    rt = Ratio.of(values)
    return {"median": rt.median, "min": rt.min, "max": rt.max, "spread_pct": rt.spread_pct,
            "pairs": rt.pairs, "values": list(rt.values)}


def summarize(scenario: Scenario, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    ref = scenario.reference
    want = scenario.run.pairs_wanted
    assign_modes(runs, scenario.modes)
    out: list[dict[str, Any]] = []
    cases: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        cases.setdefault(r["case"], []).append(r)
    for label, rs in cases.items():
        first = rs[0]
        ok_all = [r for r in rs if not r.get("error") and not r.get("skipped")]
        case_counts = mode_counts(ok_all)
        mode = main_mode(case_counts)
        entry: dict[str, Any] = {"case": label, "test": first["test"], "kind": first["kind"],
                                 "params": first["params"], "reference": ref, "backends": {},
                                 "mode": mode, "runs_per_mode": case_counts,
                                 "mixed_modes": (sum(1 for m in PAIRABLE if case_counts.get(m))
                                                 > 1 or bool(case_counts.get(MIXED)))}
        by_backend: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            by_backend.setdefault(r["backend"], []).append(r)
        for name, brs in by_backend.items():
            ok = [r for r in brs if not r.get("error") and not r.get("skipped")]
            counts = mode_counts(ok)
            own = mode if counts.get(mode or "") else main_mode(counts)
            in_mode = [r for r in ok if _label(r) == own]
            b: dict[str, Any] = {
                "runs": len(brs), "ok": len(ok),
                "errors": sorted({(r.get("error") or r.get("skipped") or "").splitlines()[0][:300]
                                  for r in brs if r.get("error") or r.get("skipped")}),
                "clean": sum(1 for r in ok if r.get("metrics", {}).get("clean")),
                "mode": own, "runs_per_mode": counts,
                "mode_changed_runs": [r.get("index") for r in ok if _label(r) == MIXED],
            }
            for key, path in _MEDIANS:
                b[key] = _median([metric(r, path) for r in in_mode])
            b["by_mode"] = {m: {"runs": n, **{key: _median([metric(r, path) for r in ok
                                                            if _label(r) == m])
                                             for key, path in _MEDIANS[:7]}}
                            for m, n in counts.items() if m in PAIRABLE}
            cores: dict[str, list[float]] = {}
            for r in in_mode:
                for core, share in r.get("metrics", {}).get("backend_cpu", {}).get(
                        "cores", {}).items():
                    cores.setdefault(core, []).append(share)
            b["backend_cpu_per_core"] = {c: statistics.median(v) for c, v in sorted(cores.items())}
            entry["backends"][name] = b
        ratios: dict[str, Any] = {}
        if ref in by_backend:
            for name, brs in by_backend.items():
                if name == ref:
                    continue
                ratios[name] = {}
                names = _KIND_RATIOS.get(first["kind"], ("pps",))
                if first["params"].get("pingpong_alongside"):
                    names = names + _ALONGSIDE_RATIOS
                for mname in names:
                    path, higher = RATIO_METRICS[mname]
                    a = {r["rep"]: (_label(r), metric(r, path)) for r in brs}
                    bb = {r["rep"]: (_label(r), metric(r, path)) for r in by_backend[ref]}
                    pairs = same_mode_pairs(a, bb)
                    by_mode = {m: _ratio_doc(v) for m, v in pairs["by_mode"].items()}
                    best = main_mode({m: d["pairs"] for m, d in by_mode.items()})
                    doc = _ratio_doc(pairs["by_mode"].get(best or "", []))
                    doc.update(mode=best, by_mode=by_mode, cross_mode_pairs=pairs["cross_mode"],
                               min_pairs=want, enough=doc["pairs"] >= want,
                               higher_is_better=higher)
                    ratios[name][mname] = doc
        entry["ratios"] = ratios
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# markdown


def _f(x: Any, fmt: str = ".2f", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x / scale, fmt)


def _ratio(r: dict[str, Any] | None) -> str:
    """A ratio cell: the paired median within its mode, its spread and pairs; "not enough pairs"
    below min_pairs; the other mode's median after it when both modes had pairs."""
    if not r or not r.get("pairs"):
        cross = (r or {}).get("cross_mode_pairs")
        return f"- (no same-mode pair; {cross} across modes)" if cross else "-"
    mode = r.get("mode")
    text = (f"**{r['median']:.2f}** ({r['min']:.2f}-{r['max']:.2f}, n={r['pairs']}"
            + (f", {mode}" if mode and mode != ONE else "") + ")")
    if not r.get("enough", True):
        text += f" NOT ENOUGH PAIRS (< {r.get('min_pairs')})"
    others = [f"{m} {d['median']:.2f} n={d['pairs']}"
              for m, d in (r.get("by_mode") or {}).items() if m != mode and d.get("pairs")]
    if others:
        text += " [" + "; ".join(others) + "]"
    return text


def _modes_cell(b: dict[str, Any]) -> str:
    counts = b.get("runs_per_mode") or {}
    return " ".join(f"{m} {n}" for m, n in sorted(counts.items())) or "-"


def _case(e: dict[str, Any]) -> str:
    """A summary entry's case label, marked when its client is a TCG guest."""
    return e["case"] + (" (qemu TCG guest)" if e["params"].get("client") == "qemu" else "")


def markdown(doc: dict[str, Any], plots: Sequence[str] = ()) -> str:
    sc = doc["scenario"]
    dims = doc.get("dimensions", {})
    mach = dims.get("machine", {})
    ref = sc.get("reference", "")
    lines = [f"# Benchmark: {sc['name']}", ""]
    if sc.get("description"):
        lines += [sc["description"], ""]
    status = "complete" if doc.get("complete") else ("INTERRUPTED (partial results)"
                                                     if doc.get("interrupted") else "running")
    lines += [
        f"- status: {status}; {len(doc.get('runs', []))} of {doc.get('planned_runs')} runs",
        (f"- commit {dims.get('commit', '?')}{' (dirty tree)' if dims.get('dirty') else ''}; "
        f"kernel {dims.get('kernel')}; Python {dims.get('python')}; DPDK {dims.get('dpdk')}; "
        f"QEMU {dims.get('qemu')}"),
        (f"- machine: {mach.get('cpu')}, {mach.get('nproc')} cpus, "
        f"{_f((mach.get('memory_kb') or 0) / 1048576, '.1f')} GiB; time {dims.get('time')}"),
        (f"- placement: {dims.get('placement')}; ratios are against **{ref}**, paired by "
        "repetition (runs interleaved A B A B) within one machine mode, median (min-max)"),
    ]
    for name, b in (dims.get("backends") or {}).items():
        extra = (f"mode {b.get('mode')}, params set {b.get('params_set') or '{}'}"
                 if b.get("kind") == "vhostx" else
                 f"memory_mb {b.get('memory_mb')}, mbufs {b.get('total_num_mbufs')}")
        lines.append(f"- backend `{name}`: {b.get('kind')}, {extra}")
    qemu = (dims.get("clients") or {}).get("qemu")
    if qemu:
        lines.append(
            f"- client `qemu`: QEMU {qemu.get('qemu_version')} **TCG** guest (emulated CPU, "
            f"{qemu.get('smp')} vCPU, {qemu.get('memory_mb')} MB, kernel "
            f"{qemu.get('kernel_release')}) on core {qemu.get('core')} running vxperf: rows "
            "marked \"qemu TCG guest\" are TCG-guest figures, bounded by the emulated guest; "
            "read their ratios, not their absolute values"
            + (f"; UNAVAILABLE: {qemu['unavailable'][:300]}" if qemu.get("unavailable") else ""))
    for name, why in (doc.get("unavailable") or {}).items():
        lines.append(f"- backend `{name}` unavailable: {why[:300]}")
    lines.append("")
    summary = doc.get("summary", [])
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in summary:
        by_kind.setdefault(e["kind"], []).append(e)
    if "stream" in by_kind:
        lines += ["## Throughput", "",
                  ("| case | backend | Mpps | Gbit/s | ratio vs ref | backend cores | "
                  "kicks/pkt | irqs/pkt | poll sw/pkt | RSS MB | runs ok (clean) | modes |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in by_kind["stream"]:
            for name, b in e["backends"].items():
                lines.append(
                    f"| {_case(e)} | {name} | {_f(b['pps'], '.3f', 1e6)} | "
                    f"{_f(b['bps'], '.2f', 1e9)} | "
                    f"{_ratio(e['ratios'].get(name, {}).get('pps')) if name != ref else 'ref'} | "
                    f"{_f(b['backend_cpu'])} | {_f(b['kicks_per_packet'], '.4f')} | "
                    f"{_f(b['interrupts_per_packet'], '.4f')} | "
                    f"{_f(b['poll_switches_per_packet'], '.5f')} | "
                    f"{_f(b['rss_without_guest_mb'], '.1f')} | {b['ok']}/{b['runs']} "
                    f"({b['clean']}) | {_modes_cell(b)} |")
        lines.append("")
    if "pingpong" in by_kind:
        lines += ["## Latency (ping-pong round trips)", "",
                  ("| case | backend | p50 us | p99 us | p99.9 us | round trips/s | p50 ratio | "
                  "p99 ratio | backend cores | kicks/pkt | irqs/pkt | runs ok | modes |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in by_kind["pingpong"]:
            for name, b in e["backends"].items():
                r = e["ratios"].get(name, {})
                lines.append(
                    f"| {_case(e)} | {name} | {_f(b['p50_us'], '.1f')} | {_f(b['p99_us'], '.1f')} "
                    f"| {_f(b['p99_9_us'], '.1f')} | {_f(b['pps'], '.0f')} | "
                    f"{_ratio(r.get('p50_us')) if name != ref else 'ref'} | "
                    f"{_ratio(r.get('p99_us')) if name != ref else 'ref'} | "
                    f"{_f(b['backend_cpu'])} | {_f(b['kicks_per_packet'], '.3f')} | "
                    f"{_f(b['interrupts_per_packet'], '.3f')} | {b['ok']}/{b['runs']} | "
                    f"{_modes_cell(b)} |")
        lines.append("")
    along = [e for e in by_kind.get("stream", []) if e["params"].get("pingpong_alongside")]
    if along:
        lines += ["## Ping-pong alongside the streams", "",
                  ("One more device of the same backend carries a guest-model ping-pong flow "
                   "during the stream's window; the throughput table above excludes it. The "
                   "flow's thread shares the client core with testpmd (2-core machine), so its "
                   "round trips include that sharing: like for like across backends, absolute "
                   "figures inflated."), "",
                  ("| case | backend | p50 us | p99 us | p99.9 us | round trips/s | p50 ratio | "
                   "p99 ratio | p99.9 ratio | ping-pong cores | runs ok |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in along:
            for name, b in e["backends"].items():
                r = e["ratios"].get(name, {})
                cells = [_ratio(r.get(k)) if name != ref else "ref" for k in _ALONGSIDE_RATIOS]
                lines.append(
                    f"| {e['case']} | {name} | {_f(b['alongside_p50_us'], '.1f')} | "
                    f"{_f(b['alongside_p99_us'], '.1f')} | {_f(b['alongside_p99_9_us'], '.1f')} "
                    f"| {_f(b['alongside_rtps'], '.0f')} | {' | '.join(cells)} | "
                    f"{_f(b['alongside_cpu'], '.3f')} | {b['ok']}/{b['runs']} |")
        lines.append("")
    if "idle" in by_kind:
        lines += ["## Idle cost", "",
                  "| case | backend | backend cores | per core | RSS MB | runs ok |",
                  "|---|---|---|---|---|---|"]
        for e in by_kind["idle"]:
            for name, b in e["backends"].items():
                per = ", ".join(f"cpu{c}: {v:.3f}" for c, v in b["backend_cpu_per_core"].items())
                lines.append(f"| {e['case']} | {name} | {_f(b['backend_cpu'], '.3f')} | "
                             f"{per or '-'} | {_f(b['rss_without_guest_mb'], '.1f')} | "
                             f"{b['ok']}/{b['runs']} |")
        lines.append("")
    lines += _modes_section(doc)
    lines += markdown_section(_slice_doc(doc))
    errors = [(e["case"], n, err) for e in summary for n, b in e["backends"].items()
              for err in b["errors"]]
    if errors:
        lines += ["## Failed or skipped runs", ""]
        lines += [f"- {c} / {n}: {err}" for c, n, err in errors]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
        lines.append("")
    lines += [("Measured: client port counters (testpmd) or frames counted by the guest model, "
              "round-trip times from timestamps in the frames, CPU time per thread from "
              "/proc, daemon counters. Derived: rates, per-packet ratios, per-core CPU (a "
              "thread counts on the core it last ran on), medians and ratios. See "
              "docs/harness.md."), ""]
    return "\n".join(lines)


def _modes_section(doc: dict[str, Any]) -> list[str]:
    """## Machine modes: how each run's mode was found, runs per mode and backend, runs that
    changed mode, cases whose modes were mixed, and pairs short of min_pairs."""
    modes = doc.get("modes") or {}
    summary = doc.get("summary", [])
    if not modes and not summary:
        return []
    det = modes.get("detector", "?")
    cut = modes.get("boundary")
    lines = ["## Machine modes", ""]
    how = ("a DPDK-vs-DPDK reference probe before and after each run" if det == "probe" else
           "clustering each backend's runs of a case by their own rate (no probe)")
    lines.append(f"- detector: {how}; probe {modes.get('probe', '?')}; two modes when the "
                 f"rates split into two clusters (least within-cluster sum of squares of their "
                 f"logarithms) whose geometric means differ by >= {modes.get('gap')}x and that "
                 f"explain >= {modes.get('min_fit', PROBE_FIT)} of the variance"
                 + (f"; boundary {cut / 1e6:.2f} Mpps (probe)" if cut and det == "probe" else
                    "; one mode seen" if det == "probe" else ""))
    lines.append(f"- min_pairs {modes.get('min_pairs')} same-mode pairs per compared backend and "
                 f"case, at most {modes.get('max_extra_repeats')} extra repetitions; "
                 f"{doc.get('extra_runs', 0)} extra runs made")
    for backend, counts in (modes.get("runs_per_mode") or {}).items():
        lines.append(f"- `{backend}`: " + ", ".join(f"{n} {m}" for m, n in sorted(counts.items())))
    changed = modes.get("changed_midway") or []
    if changed:
        lines.append(f"- runs that changed mode (probe before != after, or a step inside the "
                     f"window; never paired): {', '.join(str(i) for i in changed)}")
    for e in summary:
        if e.get("mixed_modes"):
            lines.append(f"- {e['case']}: modes were MIXED ({_counts(e.get('runs_per_mode'))}); "
                         f"medians are of the {e.get('mode')} runs, ratios within one mode")
        for name, ratios in (e.get("ratios") or {}).items():
            for mname, r in ratios.items():
                if not r.get("enough", True):
                    lines.append(f"- {e['case']} / {name} {mname}: not enough same-mode pairs "
                                 f"({r.get('pairs', 0)} < {r.get('min_pairs')}; "
                                 f"{r.get('cross_mode_pairs', 0)} across modes left out)")
    for w in modes.get("warnings") or []:
        lines.append(f"- warning: {w}")
    lines.append("")
    return lines


def _slice_doc(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The document's slice-level estimate; computed from its runs when it has none (results
    written before the estimate existed)."""
    if "slice_modes" in doc:
        return doc["slice_modes"]  # type: ignore[no-any-return]
    if not doc.get("runs"):
        return None
    gap = (doc.get("modes") or {}).get("gap") or ModeSettings().gap
    return slice_modes(doc["runs"], doc["scenario"].get("reference", ""), gap)


def rederive(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a results document whose derived parts (each run's `machine_mode`, `modes`,
    `summary`, `slice_modes`) are computed again from its runs by the current rules; what was
    measured is kept as it is. The scenario comes from the document (`scenario.raw`), with the
    reference, min_pairs and max_extra_repeats it was run with. Raises ScenarioError when that
    scenario no longer parses."""
    from dataclasses import replace

    from .scenario import parse_scenario

    out = copy.deepcopy(doc)
    runs = out.get("runs") or []
    sc = parse_scenario(out["scenario"].get("raw") or {})
    old = out.get("modes") or {}
    sc = sc.with_overrides(min_pairs=old.get("min_pairs"),
                           max_extra_repeats=old.get("max_extra_repeats"))
    ref = out["scenario"].get("reference") or sc.reference
    sc = replace(sc, run=replace(sc.run, reference=ref))
    modes = assign_modes(runs, sc.modes)
    out["modes"] = {**old, **modes}
    out["summary"] = summarize(sc, runs)
    out["slice_modes"] = slice_modes(runs, ref, sc.modes.gap)
    return out


def _counts(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{n} {m}" for m, n in sorted((counts or {}).items()))


def one_line(rec: dict[str, Any]) -> str:
    """The progress line of one finished run."""
    head = f"{rec['case']:<28} rep {rec['rep']} {rec['backend']:<18}"
    if rec.get("skipped"):
        return head + " skipped: " + rec["skipped"][:160]
    if rec.get("error"):
        return head + " FAILED: " + rec["error"].splitlines()[0][:160]
    m = rec.get("metrics", {})
    parts = []
    if rec["kind"] == "pingpong":
        lat = m.get("latency", {})
        parts.append(f"p50 {lat.get('p50_us', float('nan')):.1f} us p99 "
                     f"{lat.get('p99_us', float('nan')):.1f} us")
    if rec["kind"] != "idle":
        parts.append(f"{m.get('pps', 0) / 1e6:.3f} Mpps")
    parts.append(f"backend cpu {m.get('backend_cpu', {}).get('total', float('nan')):.2f}")
    return head + " " + ", ".join(parts)
