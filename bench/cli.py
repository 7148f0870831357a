"""`vhostx bench list`, `vhostx bench run FILE|NAME` and `vhostx bench report DIR`: the benchmark
harness's command line.

`register(subparsers)` adds the `bench` command to vhostx's parser (through the entry point
`bench` of the group `vhostx.commands`, which vhostx/cli.py discovers: vhostx imports no bench);
`python -m bench ...` (bench/__main__.py) gives the same commands without the daemon's CLI.
A run prints a progress bar and one line per run, and at the end where the results went
(results.json, report.md, plots/). Exit status: 0 when every run succeeded, 1 when some failed
or were skipped, 2 for a bad scenario, 130 after Ctrl-C (results so far are kept).

Threads: the main thread (testpmd children are tied to it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "register"]


def _cmd_list(args: argparse.Namespace) -> int:
    from bench.harness.scenario import ScenarioError, load_scenario, scenario_dirs

    seen: set[str] = set()
    for d in scenario_dirs():
        for f in sorted(d.glob("*.toml")) if d.is_dir() else []:
            if f.stem in seen:
                continue
            seen.add(f.stem)
            from bench.irq.scenario import is_interrupts_scenario

            if is_interrupts_scenario(f):  # its own runner (bench.irq.scenario)
                print(f"{f.stem:<12} {'':>9}  {load_desc(f)}")
                continue
            from bench.harness import passthrough as pt

            if pt.is_passthrough(f):
                ps = pt.load(f)
                print(f"{f.stem:<12} {len(ps.backends):>4} boots {ps.description}")
                continue
            try:
                sc = load_scenario(f)
                cases = sc.cases()
                runs = len(cases) * len(sc.backends) * sc.run.repeats
                print(f"{f.stem:<12} {runs:>4} runs  {sc.description}")
                if args.verbose:
                    print(f"{'':<12} file {f}; backends {', '.join(b.name for b in sc.backends)}; "
                          f"tests {', '.join(t.name for t in sc.tests)}")
            except ScenarioError as err:
                print(f"{f.stem:<12} INVALID: {err}")
    if not seen:
        print("no scenarios found (looked in " + ", ".join(map(str, scenario_dirs())) + ")")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bench.harness.runner import Runner
    from bench.harness.scenario import ScenarioError, find_scenario, load_scenario

    console = Console(stderr=True, soft_wrap=True)
    try:
        found = find_scenario(args.scenario)
    except ScenarioError as err:
        console.print(f"[red]invalid scenario:[/red] {err}", markup=True, highlight=False)
        return 2
    from bench.irq.scenario import is_interrupts_scenario

    if is_interrupts_scenario(found):
        return _run_interrupts(args, found, console)
    try:
        if _run_passthrough(args, console, found):
            return 0
        sc = load_scenario(found)
        sc = sc.with_overrides(
            repeats=args.repeats, duration=args.duration, warmup=args.warmup,
            quiet_wait=args.quiet_wait, min_pairs=args.min_pairs,
            max_extra_repeats=args.max_extra_repeats, probe=args.probe,
            backends=[b for b in (args.backends or "").split(",") if b] or None,
            tests=[t for t in (args.tests or "").split(",") if t] or None)
        sc.cases()
    except ScenarioError as err:
        console.print(f"[red]invalid scenario:[/red] {err}", markup=True, highlight=False)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "vhostx-bench" / (
        f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from bench.harness.runner import plan

    todo = plan(sc)
    console.print(f"scenario {sc.name}: {len(todo)} runs ({len(sc.cases())} cases x "
                  f"{sc.run.repeats} repetitions x {len(sc.backends)} backends), "
                  f"warm-up {sc.run.warmup} s + window {sc.run.duration} s each; results in {out}",
                  highlight=False)
    runner = Runner(sc, out, progress=not args.no_progress, plots=not args.no_plots,
                    log=lambda m: console.print(m, markup=False, highlight=False))
    doc = runner.run()
    _print_summary(console, doc)
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}"
                  + (f"\nplots:   {out / 'plots'}" if (out / "plots").is_dir() else ""),
                  highlight=False)
    if doc["interrupted"]:
        return 130
    bad = any(r.get("error") or r.get("skipped") for r in doc["runs"])
    return 1 if bad else 0


def load_desc(path: Path) -> str:
    import tomllib

    return str(tomllib.loads(path.read_text()).get("description", ""))


def _run_interrupts(args: argparse.Namespace, path: Path, console: Any) -> int:
    """The `interrupts` scenario (kind = "interrupts"): bench.irq.scenario runs it."""
    from bench.irq.scenario import run_scenario

    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "vhostx-bench" / (
        f"interrupts-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        run_scenario(path, out, duration=args.duration,
                     log=lambda m: console.print(m, markup=False, highlight=False))
    except ValueError as err:
        console.print(f"[red]invalid scenario:[/red] {err}", markup=True, highlight=False)
        return 2
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}\n"
                  f"plots:   {out / 'plots'}", highlight=False)
    return 0


def _run_passthrough(args: argparse.Namespace, console: Any, path: Path) -> bool:
    """A `kind = "passthrough"` scenario has its own runner (bench/harness/passthrough.py);
    False for any other scenario."""
    from bench.harness import passthrough as pt

    if not pt.is_passthrough(path):
        return False
    sc = pt.load(path, duration=args.duration,
                 backends=[b for b in (args.backends or "").split(",") if b] or None)
    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "vhostx-bench" / (
        f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    console.print(f"scenario {sc.name}: {len(sc.backends)} backends x 2 paths x 3 phases, "
                  f"{sc.duration} s each (TCG guest); results in {out}", highlight=False)
    pt.run(sc, out, plots=not args.no_plots,
           log=lambda m: console.print(m, markup=False, highlight=False))
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}",
                  highlight=False)
    return True


def _print_summary(console: Any, doc: dict[str, Any]) -> None:
    from bench.harness.slice_modes import summary_lines

    for e in doc["summary"]:
        for name, ratios in e["ratios"].items():
            for mname, r in ratios.items():
                if r["pairs"]:
                    console.print(f"{e['case']:<28} {name} / {e['reference']} {mname}: "
                                  f"median {r['median']:.3f} (min {r['min']:.3f}, max "
                                  f"{r['max']:.3f}, {r['pairs']} pairs, mode {r.get('mode')}"
                                  f"{'' if r.get('enough', True) else ', NOT ENOUGH PAIRS'})",
                                  highlight=False, markup=False)
    for line in summary_lines(doc.get("slice_modes")):
        console.print(line, highlight=False, markup=False)


def _cmd_report(args: argparse.Namespace) -> int:
    """Render a results directory's report.md again from its results.json, labels, summary and
    slice estimate derived again by the current rules; results.json is left as it is."""
    import json

    from rich.console import Console

    from bench.harness.report import markdown, rederive
    from bench.harness.scenario import ScenarioError

    console = Console(stderr=True, soft_wrap=True)
    results = Path(args.dir) / "results.json"
    try:
        doc = rederive(json.loads(results.read_text()))
    except (OSError, ValueError, KeyError, ScenarioError) as err:
        console.print(f"cannot re-render {results}: {type(err).__name__}: {err}",
                      markup=False, highlight=False)
        return 2
    plots = sorted(f"plots/{p.name}" for p in (Path(args.dir) / "plots").glob("*.png"))
    out = Path(args.out) if args.out else Path(args.dir) / "report.md"
    out.write_text(markdown(doc, plots=plots))
    _print_summary(console, doc)
    console.print(f"report: {out}", highlight=False)
    return 0


def _cmd_restart_soak(args: argparse.Namespace) -> int:
    import signal

    from bench.soak import restart_soak

    doc = restart_soak(args.restarts, stop_signal=signal.SIGTERM if args.sigterm else signal.SIGKILL,
                       interval=args.ping_interval, out=Path(args.out) if args.out else None)
    ok = doc["transfer_ok"] and not doc["unrecovered"] and not doc["device_broken"]
    return 0 if ok else 1


def _cmd_soak(args: argparse.Namespace) -> int:
    from bench.soak import soak

    doc = soak(args.devices, args.duration, sample_s=args.sample,
               out=Path(args.out) if args.out else None)
    return 0 if not doc["mismatches"] and not doc["broken"] else 1


def _register_soaks(bsub: Any) -> None:
    """`bench restart-soak` and `bench soak` (bench/soak.py)."""
    rs = bsub.add_parser("restart-soak", help="kill and restart the daemon N times under a QEMU "
                         "guest's TCP transfer and ping; report losses and recovery times")
    rs.add_argument("--restarts", type=int, default=100)
    rs.add_argument("--sigterm", action="store_true", help="stop with SIGTERM, not SIGKILL")
    rs.add_argument("--ping-interval", type=float, default=0.2, metavar="SECONDS")
    rs.add_argument("--out", metavar="FILE.json", help="write the report here")
    rs.set_defaults(func=_cmd_restart_soak)
    sk = bsub.add_parser("soak", help="N sink devices in shared mode under testpmd traffic: RSS, "
                         "fds, and counters on both sides")
    sk.add_argument("--devices", type=int, default=64)
    sk.add_argument("--duration", type=float, default=1800.0, metavar="SECONDS")
    sk.add_argument("--sample", type=float, default=10.0, metavar="SECONDS")
    sk.add_argument("--out", metavar="FILE.json", help="write the report here")
    sk.set_defaults(func=_cmd_soak)


def register(subparsers: Any) -> None:
    """Add `bench list`, `bench run`, `bench report`, `bench restart-soak` and `bench soak` to an
    argparse subparsers object."""
    b = subparsers.add_parser("bench", help="benchmark scenarios: vhostx vs DPDK, modes, sweeps",
                              description="Run the benchmark harness (docs/harness.md).")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    ls = bsub.add_parser("list", help="list the shipped scenarios (configs/bench/*.toml)")
    ls.add_argument("-v", "--verbose", action="store_true")
    ls.set_defaults(func=_cmd_list)
    r = bsub.add_parser("run", help="run a scenario file or a shipped scenario by name")
    r.add_argument("scenario", metavar="FILE|NAME")
    r.add_argument("--out", metavar="DIR", help="results directory (default: a new directory "
                   "under $TMPDIR/vhostx-bench)")
    r.add_argument("--repeats", type=int, help="override [run] repeats")
    r.add_argument("--duration", type=float, help="override [run] duration (window, seconds)")
    r.add_argument("--warmup", type=float, help="override [run] warmup (seconds)")
    r.add_argument("--quiet-wait", type=float, help="override [run] quiet_wait (seconds)")
    r.add_argument("--min-pairs", type=int, help="override [run] min_pairs (same-mode pairs)")
    r.add_argument("--max-extra-repeats", type=int, help="override [run] max_extra_repeats")
    r.add_argument("--probe", choices=("dpdk", "none"), help="override [modes] probe")
    r.add_argument("--backends", metavar="A,B", help="only these backends (by name)")
    r.add_argument("--tests", metavar="T,U", help="only these tests (by name)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.set_defaults(func=_cmd_run)
    rp = bsub.add_parser("report", help="render a results directory's report.md again, modes "
                         "and ratios derived again from its results.json by the current rules")
    rp.add_argument("dir", metavar="DIR", help="a `bench run` results directory")
    rp.add_argument("--out", metavar="FILE.md", help="write here (default: DIR/report.md)")
    rp.set_defaults(func=_cmd_report)
    _register_soaks(bsub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
