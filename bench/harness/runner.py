"""Run a scenario: every case, every repetition, every backend, interleaved; results on disk as
they come; Ctrl-C stops cleanly and keeps what was measured.

Order (`plan`): for each case, for each repetition, each backend in file order: A B C A B C ...
so that a slow drift of the machine touches every backend alike, and run i of A pairs with run i
of B for the ratios.

Machine modes (bench/harness/modes.py): with two or more backends, a DPDK-vs-DPDK reference probe
measures the machine just before and just after every run, and a stream's window is sampled in
`[modes] slices` parts. Ratios pair runs of one mode only; when a case ends with a compared
backend short of `run.min_pairs` same-mode pairs, the case gets another repetition of every
backend, up to `run.max_extra_repeats`. Beside the run pairs, the window slices of every run are
pooled per case and split by mode (bench/harness/slice_modes.py: results.json "slice_modes").

One run: a fresh short socket directory, the backend started pinned to the backend core, the
client on the client core (testpmd's forwarding lcore, or this process's thread for the guest
model), warm-up (excluded), then a window between two snapshots of: the client's per-port
counters, the backend's own packet count, the daemon's stats (kicks, interrupts, polling
switches), CPU time of every backend and client thread. Then everything is stopped. The
window of each client kind (testpmd, guest model, QEMU) is driven by bench/harness/measure.py.

Files in the output directory (written after every run, so an interrupted run keeps them):
    results.json      dimensions, scenario, every run (without raw RTT samples), summary,
                      slice_modes
    runs/NNN-*.json   one run with all raw samples (RTTs in ns)
    logs/             testpmd and daemon logs
    report.md, plots/ at the end (also after Ctrl-C, from what was measured)

Threads: the main thread.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.testpmd import TestpmdError, find_testpmd

from . import system
from .backends import BackendFailed, RunningBackend, start_backend
from .measure import measure_guest_model, measure_qemu, measure_testpmd_stream
from .modes import DpdkProbe, assign_modes, short_of_pairs
from .report import one_line
from .scenario_model import Backend, Case, Scenario
from .slice_modes import slice_modes
from .system import wait_quiet

__all__ = ["Runner", "plan"]

Hook = Callable[[str, dict[str, Any]], None]


def plan(scenario: Scenario) -> list[tuple[Case, int, Backend]]:
    """Every run in execution order: case by case, repetition by repetition, backends
    interleaved."""
    out = []
    for case in scenario.cases():
        for rep in range(scenario.run.repeats):
            for backend in scenario.backends:
                out.append((case, rep, backend))
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


class Runner:
    def __init__(self, scenario: Scenario, out_dir: str | Path, *, progress: bool = True,
                 hook: Hook | None = None, plots: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.sc = scenario
        self.out = Path(out_dir).resolve()
        self.progress = progress
        self.hook = hook  # test seam: called at "started", "window" and "done" of every run
        self.plots = plots
        self.log = log or (lambda msg: None)
        self.runs: list[dict[str, Any]] = []
        self.unavailable: dict[str, str] = {}
        self.interrupted = False
        self.dims: dict[str, Any] = {}
        self.started = 0.0
        self.qemu_info: Any = None  # qemu_client.GuestImageInfo, built when a case needs it
        self.qemu_unavailable = ""
        self.probe: DpdkProbe | None = None  # the machine-mode reference pair
        self.probe_status = "not started"
        self.extra_runs = 0  # repetitions added to get same-mode pairs

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run everything; returns the results document (also in results.json)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "runs").mkdir(exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        if self.sc.source:
            shutil.copyfile(self.sc.source, self.out / "scenario.toml")
        self.dims = system.dimensions()
        self.dims["backends"] = {b.name: self._backend_dims(b) for b in self.sc.backends}
        self.dims["placement"] = asdict(self.sc.placement)
        if any(c.pingpong_alongside for c in self.sc.cases()):
            # 2 cores: the alongside ping-pong thread can only share the client core with testpmd
            self.dims["placement"]["pingpong_alongside_core"] = self.sc.placement.client_core
            self.dims["placement"]["pingpong_alongside_shares_core_with"] = "testpmd client"
        self.dims["clients"] = {"testpmd": asdict(self.sc.testpmd),
                                "guest_model": asdict(self.sc.guest_model)}
        if any(c.client == "qemu" for c in self.sc.cases()):
            self.dims["clients"]["qemu"] = self._qemu_dims()
        self.started = time.time()
        todo = plan(self.sc)
        self._write()
        progress_cm = _progress(self.progress, len(todo))
        with progress_cm as prog, ExitStack() as probes:
            task = prog.add_task("starting", total=len(todo)) if prog is not None else None
            try:
                self._start_probe(probes)
                for case in self.sc.cases():
                    extra = 0
                    rep = 0
                    while rep < self.sc.run.repeats or self._wants_more(case, extra):
                        if rep >= self.sc.run.repeats:
                            extra += 1
                            if prog is not None:
                                prog.update(task, total=len(todo) + self.extra_runs
                                            + len(self.sc.backends))
                            self._say(prog, f"{case.label}: too few same-mode pairs, extra "
                                      f"repetition {extra}/{self.sc.run.extra_limit}")
                        for backend in self.sc.backends:
                            self._one(prog, task, case, rep, backend, extra > 0)
                        rep += 1
            except KeyboardInterrupt:
                self.interrupted = True
                self._say(prog, "interrupted: every process stopped; keeping the results so far")
        doc = self._write(final=True)
        self._finish(doc)
        return doc

    def _one(self, prog: Any, task: Any, case: Case, rep: int, backend: Backend,
             extra: bool) -> None:
        desc = (f"{case.label} rep {rep + 1}/{self.sc.run.repeats}"
                + (" (extra)" if extra else "") + f" {backend.name}")
        if prog is not None:
            prog.update(task, description=desc)
        rec = self._run_one(len(self.runs), case, rep, backend)
        if extra:
            rec["extra"] = True
            self.extra_runs += 1
        self.runs.append(rec)
        self._write_run(rec)
        self._write()
        self._say(prog, one_line(rec))
        if prog is not None:
            prog.advance(task)

    # ---- machine modes -----------------------------------------------------------------------
    def _start_probe(self, stack: ExitStack) -> None:
        """The DPDK-vs-DPDK reference pair, when the scenario compares backends."""
        ms = self.sc.modes
        if ms.probe == "none" or len(self.sc.backends) < 2:
            self.probe_status = ("off: [modes] probe = 'none'" if ms.probe == "none" else
                                 "off: one backend, nothing to pair")
            return
        if find_testpmd() is None:
            self.probe_status = "unavailable: dpdk-testpmd not found"
            return
        logs = self.out / "logs" / "probe"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            self.probe = stack.enter_context(DpdkProbe(
                backend_core=self.sc.placement.backend_core,
                client_core=self.sc.placement.client_core, duration=ms.probe_duration,
                log_dir=logs))
            self.probe_status = "on"
        except (TestpmdError, OSError, RuntimeError, TimeoutError) as err:
            self.probe_status = f"unavailable: {type(err).__name__}: {err}"[:500]
            self.log(f"mode probe {self.probe_status}; modes from clustering the runs")

    def _probe(self) -> float | None:
        if self.probe is None:
            return None
        try:
            return round(self.probe.measure(), 1)
        except (TestpmdError, OSError, RuntimeError, TimeoutError, ValueError) as err:
            self.log(f"mode probe failed: {type(err).__name__}: {err}")
            return None

    def _wants_more(self, case: Case, extra: int) -> bool:
        """True while a compared backend of `case` has fewer than `run.min_pairs` same-mode pairs
        with the reference (any one mode) and extra repetitions are left."""
        if extra >= self.sc.run.extra_limit or self.interrupted:
            return False
        if self.sc.reference in self.unavailable:
            return False
        from .report import metric

        assign_modes(self.runs, self.sc.modes)
        path = "pps" if case.kind != "idle" else "backend_cpu.total"
        compared = [b.name for b in self.sc.backends if b.name not in self.unavailable]
        return bool(short_of_pairs([r for r in self.runs if r["case"] == case.label], compared,
                                   self.sc.reference, self.sc.run.pairs_wanted,
                                   lambda r: metric(r, path)))

    def _say(self, prog: Any, msg: str) -> None:
        if prog is not None:
            prog.console.print(msg, markup=False, highlight=False)
        else:
            self.log(msg)

    # ------------------------------------------------------------------------------------------
    def _backend_dims(self, b: Backend) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": b.kind}
        if b.kind == "vhostx":
            d["mode"] = b.mode
            d["params_set"] = dict(b.params)
            try:
                from vhostx.daemon import PARAM_SPECS

                eff = {p.name: p.default for p in PARAM_SPECS}
            except Exception:  # noqa: BLE001 - best effort: the daemon reports its own too
                eff = {}
            eff.update(dict(b.params))
            eff["mode"] = b.mode
            d["params"] = eff
        else:
            d.update(memory_mb=b.memory_mb, total_num_mbufs=b.total_num_mbufs or "auto",
                     burst=b.burst or "default")
        return d

    def _run_one(self, index: int, case: Case, rep: int, backend: Backend) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "index": index, "case": case.label, "test": case.test, "kind": case.kind,
            "params": asdict(case), "backend": backend.name, "backend_kind": backend.kind,
            "mode": backend.mode if backend.kind == "vhostx" else None,
            "rep": rep, "started_at": time.time(), "error": None, "skipped": None,
            "backend_pids": [], "client_pids": [], "loadavg_before": os.getloadavg(),
        }
        if backend.name in self.unavailable:
            rec["skipped"] = self.unavailable[backend.name]
            return rec
        if self.sc.run.quiet_wait > 0:
            rec["idle_cores_before"] = round(wait_quiet(self.sc.run.quiet_wait,
                                                        self.sc.run.quiet_cores), 3)
        rec["mode_probe"] = {"before": self._probe(), "after": None, "slices": []}
        rundir = Path(tempfile.mkdtemp(prefix=f"vhxb{os.getpid()}-"))  # short: AF_UNIX paths
        logs = self.out / "logs" / f"{index:03d}-{_slug(backend.name)}"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            with ExitStack() as stack:
                stack.callback(shutil.rmtree, rundir, True)
                be = stack.enter_context(start_backend(backend, case, self.sc.placement, rundir,
                                                       logs))
                rec["backend_pids"] = list(be.pids)
                rec["logs"] = list(be.logs)
                rec["backend_setup"] = be.setup
                self._call_hook("started", rec)
                if case.kind == "stream" and case.client == "testpmd":
                    measure_testpmd_stream(self.sc, stack, be, case, rec, logs, self._on_window)
                elif case.client == "qemu":
                    self._qemu(stack, be, case, rec, rundir, logs)
                else:
                    measure_guest_model(self.sc, stack, be, case, rec, self._on_window)
                if be.daemon is not None:
                    rec["daemon_params"] = (be.stats() or {}).get("params")
        except BackendFailed as err:
            rec["error"] = str(err)
            if err.permanent:
                self.unavailable[backend.name] = str(err)
        except (TestpmdError, OSError, RuntimeError, TimeoutError, ValueError) as err:
            rec["error"] = f"{type(err).__name__}: {err}"[:4000]
        except KeyboardInterrupt:
            rec["error"] = "interrupted"
            rec["interrupted"] = True
            self.runs.append(rec)
            self._write_run(rec)
            raise
        except Exception as err:  # noqa: BLE001 - a bug in one run must not lose the others
            rec["error"] = f"{type(err).__name__}: {err}"[:4000]
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        try:
            rec["mode_probe"]["after"] = self._probe()
        except KeyboardInterrupt:
            self.runs.append(rec)
            self._write_run(rec)
            raise
        self._call_hook("done", rec)
        return rec

    def _call_hook(self, point: str, rec: dict[str, Any]) -> None:
        if self.hook is not None:
            self.hook(point, rec)

    def _on_window(self, rec: dict[str, Any]) -> None:
        self._call_hook("window", rec)

    # ---- QEMU guests (TCG) --------------------------------------------------------------------
    def _qemu_dims(self) -> dict[str, Any]:
        from .qemu_client import QemuClientError, guest_image

        d: dict[str, Any] = {**asdict(self.sc.qemu), "accel": "tcg", "smp": 1,
                             "nic": "virtio-net-pci vectors=0 (INTx), vhost-user",
                             "core": self.sc.placement.client_core,
                             "qemu_version": system.qemu_version()}
        try:
            self.qemu_info = guest_image()
            d.update(self.qemu_info.dims())
        except (QemuClientError, OSError, RuntimeError) as err:
            self.qemu_unavailable = f"{type(err).__name__}: {err}"[:2000]
            d["unavailable"] = self.qemu_unavailable
        return d

    def _qemu(self, stack: ExitStack, be: RunningBackend, case: Case, rec: dict[str, Any],
              rundir: Path, logs: Path) -> None:
        if self.qemu_info is None:
            raise RuntimeError(f"no QEMU guest: {self.qemu_unavailable or 'not built'}")
        measure_qemu(self.sc, self.qemu_info, stack, be, case, rec, rundir, logs,
                     self._on_window)

    # ---- output ------------------------------------------------------------------------------
    def _write_run(self, rec: dict[str, Any]) -> None:
        name = f"{rec['index']:03d}-{_slug(rec['case'])}-{_slug(rec['backend'])}-{rec['rep']}.json"
        data = {k: v for k, v in rec.items() if not k.startswith("_")}
        data["rtt_ns"] = rec.get("_rtt_ns", [])
        if "_alongside_rtt_ns" in rec:
            data["alongside_rtt_ns"] = rec["_alongside_rtt_ns"]
        data["dimensions"] = self.dims
        _atomic_write(self.out / "runs" / name, json.dumps(data, default=str))
        rec["file"] = f"runs/{name}"

    def _write(self, final: bool = False) -> dict[str, Any]:
        from .report import summarize

        modes = assign_modes(self.runs, self.sc.modes)
        modes["probe"] = self.probe_status
        modes["min_pairs"] = self.sc.run.pairs_wanted
        modes["max_extra_repeats"] = self.sc.run.extra_limit
        runs = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.runs]
        doc = {
            "scenario": {"name": self.sc.name, "description": self.sc.description,
                         "source": self.sc.source, "raw": self.sc.raw,
                         "reference": self.sc.reference},
            "dimensions": self.dims,
            "started_at": self.started,
            "finished_at": time.time() if final else None,
            "complete": final and not self.interrupted,
            "interrupted": self.interrupted,
            "planned_runs": len(plan(self.sc)),
            "extra_runs": self.extra_runs,
            "modes": modes,
            "unavailable": self.unavailable,
            "runs": runs,
            "summary": summarize(self.sc, self.runs),
            "slice_modes": slice_modes(self.runs, self.sc.reference, self.sc.modes.gap),
        }
        _atomic_write(self.out / "results.json", json.dumps(doc, indent=1, default=str))
        return doc

    def _finish(self, doc: dict[str, Any]) -> None:
        from .report import markdown

        rtts = {i: r.get("_rtt_ns", []) for i, r in enumerate(self.runs)}
        plots: list[str] = []
        if self.plots:
            try:
                from .plots import make_plots

                plots = make_plots(doc, self.runs, self.out / "plots")
            except Exception as err:  # noqa: BLE001 - plots must not lose the results
                self.log(f"plots failed: {type(err).__name__}: {err}")
        del rtts
        _atomic_write(self.out / "report.md", markdown(doc, plots=plots))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _NoProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return _NoProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
