"""The machine's two speeds: which mode each run fell in, and pairs only within one mode.

On the machines this project is measured on, the same command gives one of two throughputs
from one run to the next, for every backend (DPDK against DPDK about 5 or about 17 Mpps, guest
TX 64 B; docs/harness.md, "Two speeds"). A pair whose runs fell in different modes gives a ratio
of about 3 or 0.3 that says nothing about either backend, so every run gets a mode label and a
ratio is only taken between runs with the same label.

Evidence per run (recorded by the runner in ``run["mode_probe"]``):
- ``before`` / ``after``: a reference probe just before and just after the run, the same
  backend-independent workload every time: DPDK against DPDK (`DpdkProbe`: one net_vhost testpmd
  in rxonly on the backend core, one virtio-user testpmd in txonly 64 B on the client core, kept
  running for the whole scenario with forwarding stopped between probes), its Mpps over a short
  window;
- ``slices``: the run's own rate in equal parts of its window (client port counters sampled
  during the window, or round trips per second of each part of the RTT series), parts of at
  least MIN_SLICE_S.

Labels (`assign_modes`):
- ``detector = "probe"``: every probe value of the scenario goes into `boundary`: the best
  split of the values into two clusters in log space (`two_clusters`: least within-cluster sum
  of squares of the logs, each side at least two values: a run in a mode gives two, a lone
  disturbed probe is not a mode), taken as two modes when the clusters' geometric means are at
  least `gap` apart (a ratio) and the split explains at least PROBE_FIT of the variance of the
  logs (goodness of variance fit; an even spread of values explains 0.75, noise within 1.5x
  has centres closer than `gap`); the cut is the geometric midpoint of the two means. Values
  measured while the mode flipped lie between the clusters and bridge every gap between sorted
  neighbours, so a rule on neighbours would see one mode; the split still finds two. Above the
  cut is ``fast``, below ``slow``; one cluster: every run is in the one mode seen, ``one``. A
  run whose probes before and after disagree, or whose window slices show a step of `gap`
  (`slices_step`), is ``mixed`` (changed mode around or during the run); a run without probe
  values is ``unknown``.
- ``detector = "cluster"`` (no probe: ``[modes] probe = "none"``, a single backend, or the probe
  failed to start): the runs of each case and backend are split by their own primary rate in
  the same way. A backend with one cluster is ``one``; it pairs with ``one`` runs only, since
  which mode a single cluster is cannot be told without a reference.
Mixed and unknown runs are never paired. A probe label is cross-checked against the runs: runs
of one backend in one case with the same label that still split by `gap` give a warning.

Pure functions apart from `DpdkProbe`; any thread (the probe: the thread that started it, like
every testpmd child).
"""

from __future__ import annotations

import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .scenario_model import ModeSettings

__all__ = [
    "FAST",
    "MIN_SLICE_S",
    "MIXED",
    "ONE",
    "PAIRABLE",
    "PROBE_FIT",
    "SLOW",
    "UNKNOWN",
    "DpdkProbe",
    "ModeSettings",
    "Split",
    "assign_modes",
    "boundary",
    "label_of",
    "mode_counts",
    "positive_rates",
    "rtt_slices",
    "same_mode_pairs",
    "short_of_pairs",
    "slice_count",
    "slices_step",
    "two_clusters",
]

FAST, SLOW, ONE, MIXED, UNKNOWN = "fast", "slow", "one", "mixed", "unknown"
PAIRABLE = (FAST, SLOW, ONE)
MIN_SLICE_S = 0.5  # shorter parts of a window vary too much on a busy machine to show a mode
PROBE_FIT = 0.8  # share of the log variance a probe split must explain to be two modes


def slice_count(duration: float, wanted: int) -> int:
    """Parts of a `duration`-second window: `wanted`, fewer so that each lasts MIN_SLICE_S."""
    return max(1, min(wanted, int(duration / MIN_SLICE_S)))


def positive_rates(values: Iterable[Any]) -> list[float]:
    """The finite positive numbers among `values` (None, NaN, 0, negatives and non-numbers
    dropped: a part of a window that moved nothing, or a probe that failed, is not a rate)."""
    out = []
    for v in values:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            out.append(float(v))
    return out


@dataclass(frozen=True)
class Split:
    """The best two-cluster split of positive values in log space (`two_clusters`): the cut
    (geometric midpoint of the two centres), the centres (geometric means), the values on each
    side, and the goodness of variance fit 1 - SSE_within / SSE_total (1: two tight clusters,
    0: no structure)."""

    cut: float
    low: float
    high: float
    n_low: int
    n_high: int
    fit: float

    @property
    def ratio(self) -> float:
        """How far apart the two centres are (high / low)."""
        return self.high / self.low


def two_clusters(values: Iterable[Any], min_side: int = 1) -> Split | None:
    """The split of the sorted positive values into a lower and an upper cluster that minimises
    the within-cluster sum of squares of their logarithms, each side at least `min_side` values
    (an exact 1-D optimum: the best split of sorted values is contiguous). None with fewer than
    2 * `min_side` values or when all values are equal."""
    side = max(1, min_side)
    raw = [math.log(x) for x in sorted(positive_rates(values))]
    n = len(raw)
    if n < 2 * side:
        return None
    mean = sum(raw) / n
    logs = [v - mean for v in raw]  # centred: the prefix sums below lose no precision
    pre = [0.0, *itertools.accumulate(logs)]
    pre_sq = [0.0, *itertools.accumulate(v * v for v in logs)]

    def sse(i: int, j: int) -> float:  # of logs[i:j]
        s = pre[j] - pre[i]
        return max(0.0, pre_sq[j] - pre_sq[i] - s * s / (j - i))

    total = sse(0, n)
    if total <= 1e-12 * n:
        return None
    within, k = min((sse(0, k) + sse(k, n), k) for k in range(side, n - side + 1))
    lo, hi = mean + pre[k] / k, mean + (pre[n] - pre[k]) / (n - k)
    return Split(cut=math.exp((lo + hi) / 2), low=math.exp(lo), high=math.exp(hi), n_low=k,
                 n_high=n - k, fit=1.0 - within / total)


def boundary(values: Iterable[Any], gap: float, min_side: int = 1,
             min_fit: float = PROBE_FIT) -> float | None:
    """The value separating two modes among positive numbers, None when they form one: the cut
    of `two_clusters` (each side at least `min_side` values), accepted when the two centres
    differ by at least `gap` (a ratio) and the split explains at least `min_fit` of the
    variance of the logs. Values measured while the mode changed lie between the clusters and
    bridge any gap between sorted neighbours; they lower the fit only a little."""
    s = two_clusters(values, min_side)
    if s is None or s.ratio < gap or s.fit < min_fit:
        return None
    return s.cut


def label_of(value: Any, cut: float | None) -> str:
    """fast / slow against a boundary; one when there is none; unknown without a value."""
    if not positive_rates([value]):
        return UNKNOWN
    if cut is None:
        return ONE
    return FAST if float(value) >= cut else SLOW


def slices_step(slices: Sequence[Any], gap: float, min_block: int = 2) -> bool:
    """True when a window's parts (in time order) show a step: one level for the first parts and
    another, at least `gap` apart (medians of the two blocks), for the rest, each block at least
    `min_block` parts long. A single disturbed part (a dip anywhere, one slow last part) is not a
    step: that is noise of a busy machine, not a mode; a change near an end of the window is left
    to the probes before and after."""
    xs = positive_rates(slices)
    if len(xs) != len(slices) or len(xs) < 2 * min_block:
        return False
    for k in range(min_block, len(xs) - min_block + 1):
        a, b = statistics.median(xs[:k]), statistics.median(xs[k:])
        lo, hi = min(a, b), max(a, b)
        if hi / lo < gap:
            continue
        cut = math.sqrt(lo * hi)
        first, rest = xs[:k], xs[k:]
        if (all((x >= cut) == (a >= cut) for x in first)
                and all((x >= cut) == (b >= cut) for x in rest)):
            return True
    return False


def rtt_slices(rtt_ns: Sequence[int], parts: int) -> list[float]:
    """Round trips per second (1 / median RTT) of `parts` consecutive parts of an RTT series."""
    if parts < 2 or len(rtt_ns) < 2 * parts:
        return []
    n = len(rtt_ns)
    out = []
    for k in range(parts):
        chunk = rtt_ns[k * n // parts:(k + 1) * n // parts]
        med = statistics.median(chunk)
        out.append(1e9 / med if med > 0 else 0.0)
    return out


def _primary(run: Mapping[str, Any]) -> float | None:
    """The rate a run's mode shows in: pps of streams, round trips/s of ping-pong; None for idle
    runs and failed runs."""
    if run.get("error") or run.get("skipped") or run.get("kind") == "idle":
        return None
    v = positive_rates([(run.get("metrics") or {}).get("pps")])
    return v[0] if v else None


def assign_modes(runs: Sequence[dict[str, Any]], settings: ModeSettings) -> dict[str, Any]:
    """Label every run (``run["machine_mode"] = {"label", "why"}``) and return the scenario's
    mode summary: detector, boundary, warnings."""
    gap = settings.gap
    probes = [v for r in runs for v in ((r.get("mode_probe") or {}).get("before"),
                                        (r.get("mode_probe") or {}).get("after"))]
    have_probe = bool(positive_rates(probes))
    detector = "probe" if have_probe else "cluster"
    # a run in a mode gives two probe values (before, after): one lone value is a disturbed
    # probe, not a mode
    cut = boundary(probes, gap, min_side=2) if have_probe else None
    warnings: list[str] = []
    if have_probe:
        for r in runs:
            mp = r.get("mode_probe") or {}
            lb, la = label_of(mp.get("before"), cut), label_of(mp.get("after"), cut)
            known = [x for x in (lb, la) if x != UNKNOWN]
            if slices_step(mp.get("slices") or [], gap):
                r["machine_mode"] = {"label": MIXED, "why": "its window's parts differ by "
                                     f">= {gap}x: the mode changed during the run"}
            elif len(set(known)) > 1:
                r["machine_mode"] = {"label": MIXED, "why": f"probe before {lb}, after {la}"}
            elif not known:
                r["machine_mode"] = {"label": UNKNOWN, "why": "no probe value"}
            else:
                r["machine_mode"] = {"label": known[0], "why": "probe"}
        # cross-check: runs with one probe label should not split by their own rate
        groups: dict[tuple[str, str, str], list[float]] = {}
        for r in runs:
            p = _primary(r)
            if p is not None:
                key = (r["case"], r["backend"], r["machine_mode"]["label"])
                groups.setdefault(key, []).append(p)
        for (case, backend, label), vals in groups.items():
            if label in PAIRABLE and boundary(vals, gap) is not None:
                warnings.append(f"{case} / {backend}: runs the probe labels {label!r} still "
                                f"differ by >= {gap}x ({', '.join(f'{v:.4g}' for v in vals)}); "
                                "the probe may have missed a mode change")
    else:
        by: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in runs:
            by.setdefault((r["case"], r["backend"]), []).append(r)
        for rs in by.values():
            c = boundary([_primary(r) for r in rs], gap)
            for r in rs:
                p = _primary(r)
                slices = (r.get("mode_probe") or {}).get("slices") or []
                if r.get("kind") == "idle" and not (r.get("error") or r.get("skipped")):
                    r["machine_mode"] = {"label": ONE, "why": "idle: no rate to cluster"}
                elif p is None:
                    r["machine_mode"] = {"label": UNKNOWN, "why": "failed run"}
                elif slices_step(slices, gap):
                    r["machine_mode"] = {"label": MIXED, "why": "its window's parts differ by "
                                         f">= {gap}x: the mode changed during the run"}
                else:
                    r["machine_mode"] = {"label": label_of(p, c),
                                         "why": "clustered with this backend's other runs"}
    counts: dict[str, dict[str, int]] = {}
    for r in runs:
        if "machine_mode" in r and not r.get("skipped"):
            c2 = counts.setdefault(r["backend"], {})
            c2[r["machine_mode"]["label"]] = c2.get(r["machine_mode"]["label"], 0) + 1
    return {"detector": detector, "boundary": cut, "gap": gap, "min_fit": PROBE_FIT,
            "settings": settings.as_dict(),
            "runs_per_mode": counts,
            "changed_midway": [r.get("index") for r in runs
                               if (r.get("machine_mode") or {}).get("label") == MIXED],
            "warnings": warnings}


def mode_counts(runs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """{label: runs} of already labelled runs (skipped runs left out)."""
    out: dict[str, int] = {}
    for r in runs:
        if r.get("skipped"):
            continue
        label = (r.get("machine_mode") or {}).get("label", UNKNOWN)
        out[label] = out.get(label, 0) + 1
    return out


def same_mode_pairs(a: Mapping[int, tuple[str, float | None]],
                    b: Mapping[int, tuple[str, float | None]]) -> dict[str, Any]:
    """Pairs by repetition of (label, value) maps: {"by_mode": {label: [a/b, ...]},
    "cross_mode": pairs left out because their labels differ (or one is mixed / unknown)}."""
    by_mode: dict[str, list[float]] = {}
    cross = 0
    for rep in sorted(set(a) & set(b)):
        (la, x), (lb, y) = a[rep], b[rep]
        if x is None or y is None or y == 0 or math.isnan(x) or math.isnan(y):
            continue
        if la != lb or la not in PAIRABLE:
            cross += 1
            continue
        by_mode.setdefault(la, []).append(x / y)
    return {"by_mode": by_mode, "cross_mode": cross}


def short_of_pairs(runs: Sequence[Mapping[str, Any]], compared: Sequence[str], reference: str,
                   wanted: int, value: Callable[[Mapping[str, Any]], float | None]) -> list[str]:
    """The backends of `compared` (the reference aside) whose labelled runs of one case have
    fewer than `wanted` same-mode pairs with the reference in every mode. A backend, or a
    reference, none of whose runs succeeded is never short: more repetitions would fail alike."""
    def ran(name: str) -> bool:
        return any(r["backend"] == name and not r.get("error") and not r.get("skipped")
                   for r in runs)

    def side(name: str) -> dict[int, tuple[str, float | None]]:
        return {r["rep"]: ((r.get("machine_mode") or {}).get("label", UNKNOWN), value(r))
                for r in runs if r["backend"] == name}

    if not ran(reference):
        return []
    short = []
    for name in compared:
        if name == reference or not ran(name):
            continue
        pairs = same_mode_pairs(side(name), side(reference))["by_mode"]
        if max((len(v) for v in pairs.values()), default=0) < wanted:
            short.append(name)
    return short


class DpdkProbe:
    """The reference pair: DPDK's vhost PMD (rxonly, backend core) and a virtio-user testpmd
    (txonly 64 B, client core), started once and kept with forwarding stopped (no CPU);
    `measure()` forwards for `duration` s and returns the client's TX packets/s."""

    def __init__(self, *, backend_core: int, client_core: int, duration: float,
                 log_dir: Path) -> None:
        self.backend_core = backend_core
        self.client_core = client_core
        self.duration = duration
        self.log_dir = log_dir
        self._stack = ExitStack()
        self._peer: Any = None
        self._client: Any = None
        self.pids: list[int] = []

    def __enter__(self) -> Self:
        from bench.testpmd import Testpmd, VhostVdev, VirtioUserVdev

        try:
            tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="vhxprobe-"))
            sock = str(Path(tmp) / "probe.sock")
            self._peer = self._stack.enter_context(Testpmd(
                [VhostVdev(sock)], forward_mode="rxonly", forward_lcores=(self.backend_core,),
                main_lcore=self.client_core, memory_mb=512, log_dir=self.log_dir,
                name="probe-peer"))
            self._client = self._stack.enter_context(Testpmd(
                [VirtioUserVdev(sock)], forward_mode="txonly",
                forward_lcores=(self.client_core,), main_lcore=self.backend_core, txpkts=64,
                memory_mb=512, log_dir=self.log_dir, name="probe-client"))
        except BaseException:
            self._stack.close()
            raise
        self.pids = [p for p in (self._peer.pid, self._client.pid) if p is not None]
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    def measure(self) -> float:
        """Packets/s the reference pair moves now (guest TX 64 B, after 0.1 s of warm-up)."""
        self._peer.start_forwarding()
        try:
            self._client.start_forwarding()
            try:
                time.sleep(0.1)
                s0 = self._client.port_stats()
                time.sleep(self.duration)
                s1 = self._client.port_stats()
            finally:
                self._client.stop_forwarding()
        finally:
            self._peer.stop_forwarding()
        return float(s1.rates_since(s0)[0]["tx_pps"])
