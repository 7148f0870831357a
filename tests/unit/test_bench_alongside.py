"""`pingpong_alongside`: a guest-model ping-pong flow on one more device of the backend, during a
testpmd stream's window. Schema checks, what the backend counts (the ping-pong device excluded),
how the summary, the report and the plots derive its figures, and the flow itself against a
real daemon (pacing, window, stop)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from bench.harness.backends import RunningBackend, _dpdk_mode
from bench.harness.plots import make_plots
from bench.harness.report import markdown, summarize
from bench.harness.scenario import ScenarioError, parse_scenario
from bench.harness.scenario_model import Backend
from bench.testpmd import PortStats, StatsSample

BASE: dict[str, Any] = {
    "name": "al",
    "run": {"repeats": 3, "reference": "vx"},
    "backends": [{"name": "vx", "kind": "vhostx"},
                 {"name": "sh", "kind": "vhostx", "mode": "shared"}],
    "tests": [{"name": "tx", "kind": "stream", "devices": 8, "pingpong_alongside": True}],
}


def raw(test: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    r = copy.deepcopy(BASE)
    r["tests"][0].update(test or {})
    r.update(top)
    return r


def test_parse_defaults() -> None:
    (case,) = parse_scenario(raw()).cases()
    assert case.pingpong_alongside is True and case.pingpong_rate == 1000
    assert case.client == "testpmd" and case.devices == 8
    (plain,) = parse_scenario(raw({"pingpong_alongside": False})).cases()
    assert plain.pingpong_alongside is False
    (b2b,) = parse_scenario(raw({"pingpong_rate": 0})).cases()
    assert b2b.pingpong_rate == 0


@pytest.mark.parametrize(("test", "top", "message"), [
    ({"pingpong_alongside": 1}, {}, "pingpong_alongside = 1: expected true or false"),
    ({"pingpong_alongside": "yes"}, {}, "expected true or false"),
    ({"kind": "pingpong", "devices": 1}, {}, "applies to guest_tx streams driven by testpmd"),
    ({"kind": "idle"}, {}, "applies to guest_tx streams driven by testpmd"),
    ({"direction": "guest_rx"}, {}, "direction = 'guest_rx'"),
    ({"client": "guest_model", "rate": 1000}, {}, "client = 'guest_model'"),
    ({"queues": 2}, {}, "pingpong_alongside needs queues = 1"),
    ({"devices": 64}, {}, "devices = 64 + 1 exceeds 64"),
    ({"pingpong_alongside": False, "pingpong_rate": 500}, {},
     "pingpong_rate: applies only with pingpong_alongside = true"),
    ({"pingpong_rate": -1}, {}, "pingpong_rate = -1: out of range, allowed [0, 100000]"),
    ({"pingpong_rate": 1.5}, {}, "pingpong_rate = 1.5: expected an integer"),
    ({"pingpong_alongsid": True}, {}, "did you mean 'pingpong_alongside'"),
    ({"sweep": {"pingpong_alongside": [True, False]}}, {}, "cannot be swept"),
    ({}, {"clients": {"guest_model": {"wait": "poll"}}}, "two pollers on one core collapse"),
])
def test_errors(test: dict[str, Any], top: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw(test, **top))
    assert message in str(err.value)


def test_sweep_checks_every_point() -> None:
    r = raw()
    del r["tests"][0]["devices"]
    r["tests"][0]["sweep"] = {"devices": [8, 64]}
    with pytest.raises(ScenarioError, match=r"sweep \{'devices': 64\}.*64 \+ 1 exceeds 64"):
        parse_scenario(r)


def test_shared8_all_busy_rides_a_pingpong_alongside() -> None:
    from bench.harness.scenario import load_scenario

    sc = load_scenario(Path(__file__).resolve().parents[2] / "configs" / "bench" / "shared8.toml")
    by = {c.test: c for c in sc.cases()}
    assert by["all_busy"].pingpong_alongside and by["all_busy"].devices == 8
    assert not by["eight_busy"].pingpong_alongside


# ---- what the backend counts -----------------------------------------------------------------


def test_dpdk_forwards_io_when_a_port_must_echo() -> None:
    sc = parse_scenario(raw())
    (case,) = sc.cases()
    assert _dpdk_mode(case) == "io"
    (plain,) = parse_scenario(raw({"pingpong_alongside": False})).cases()
    assert _dpdk_mode(plain) == "rxonly"


def _vhostx_stats() -> dict[str, Any]:
    return {
        "queues": [{"name": "net0.tx0", "device": "net0", "packets": 1000, "kicks": 3},
                   {"name": "net1.tx0", "device": "net1", "packets": 500, "kicks": 2},
                   {"name": "pp0.tx0", "device": "pp0", "packets": 7, "kicks": 7}],
        "devices": [{"name": "net0"}, {"name": "net1"}, {"name": "pp0"}],
    }


def test_vhostx_counters_exclude_the_pingpong_device() -> None:
    from bench.harness.backends import notification_counters

    rb = RunningBackend(Backend("vx", "vhostx"))
    st = _vhostx_stats()
    assert rb.packets("guest_tx", st)[1] == 1507  # type: ignore[index]  # no alongside: all
    rb.alongside_device = "pp0"
    assert rb.packets("guest_tx", st)[1] == 1500  # type: ignore[index]
    only = rb.stream_stats(st)
    assert only is not None and [d["name"] for d in only["devices"]] == ["net0", "net1"]
    assert notification_counters(only)["kicks"] == 5
    assert len(st["queues"]) == 3  # the daemon's dict is not modified


class _Peers:
    """Two testpmd processes' port stats (group order), like TestpmdGroup.port_stats()."""

    def __init__(self, per_group: list[list[int]]) -> None:
        self.per_group = per_group

    def port_stats(self) -> list[StatsSample]:
        return [StatsSample(0.0, {p: PortStats(p, rx, 0, rx * 64, 0, 0, 0, 0, 0)
                                  for p, rx in enumerate(group)}) for group in self.per_group]


def test_dpdk_counters_exclude_the_pingpong_port() -> None:
    rb = RunningBackend(Backend("dpdk", "dpdk"))
    rb.peers = _Peers([[10] * 32, [5, 5, 1]])  # type: ignore[assignment]
    assert rb.packets("guest_tx")[1] == 331  # type: ignore[index]
    rb.stream_ports = 34  # 34 stream ports; port 34 (group 1, port 2) is the ping-pong device
    assert rb.packets("guest_tx")[1] == 330  # type: ignore[index]


# ---- summary, report, plots --------------------------------------------------------------------


def _run(backend: str, rep: int, pps: float, p50: float, p99: float) -> dict[str, Any]:
    return {
        "case": "tx", "test": "tx", "kind": "stream", "backend": backend, "rep": rep,
        "params": {"devices": 8, "pingpong_alongside": True, "pingpong_rate": 1000, "size": 64},
        "error": None, "skipped": None,
        "metrics": {"pps": pps, "bps": pps * 512, "backend_cpu": {"total": 1.0},
                    "client_cpu": {"total": 0.9}, "clean": True,
                    "alongside": {"latency": {"count": 4, "p50_us": p50, "p99_us": p99,
                                              "p99_9_us": 2 * p99},
                                  "round_trips_per_s": 900.0, "cpu": {"total": 0.05}}},
        "_alongside_rtt_ns": [int(p50 * 1000), int(p99 * 1000), 1000, 2000],
    }


def _synthetic() -> tuple[Any, list[dict[str, Any]]]:
    sc = parse_scenario(raw())
    runs = []
    for rep, (p50a, p50b) in enumerate([(10.0, 20.0), (12.0, 12.0), (10.0, 40.0)]):
        runs.append(_run("vx", rep, 9e6, p50a, 100.0))
        runs.append(_run("sh", rep, 10e6, p50b, 300.0 + rep))
    return sc, runs


def test_summary_medians_and_latency_ratios_vs_reference() -> None:
    sc, runs = _synthetic()
    (entry,) = summarize(sc, runs)
    sh = entry["backends"]["sh"]
    assert sh["pps"] == pytest.approx(10e6)  # the stream's own figure, untouched
    assert sh["alongside_p50_us"] == pytest.approx(20.0)
    assert sh["alongside_p99_us"] == pytest.approx(301.0)
    assert sh["alongside_p99_9_us"] == pytest.approx(602.0)
    assert sh["alongside_rtps"] == pytest.approx(900.0)
    r = entry["ratios"]["sh"]
    assert r["alongside_p50_us"]["values"] == pytest.approx([2.0, 1.0, 4.0])
    assert r["alongside_p50_us"]["median"] == pytest.approx(2.0)
    assert r["alongside_p50_us"]["higher_is_better"] is False
    assert r["alongside_p99_us"]["median"] == pytest.approx(3.01)
    assert r["alongside_p99_9_us"]["pairs"] == 3
    assert r["pps"]["median"] == pytest.approx(10 / 9)


def test_a_plain_stream_has_no_alongside_ratios() -> None:
    sc, runs = _synthetic()
    for r in runs:
        r["params"]["pingpong_alongside"] = False
        r["metrics"].pop("alongside")
    (entry,) = summarize(sc, runs)
    assert set(entry["ratios"]["sh"]) == {"pps", "backend_cpu"}
    assert entry["backends"]["sh"]["alongside_p99_us"] is None


def test_markdown_and_plot() -> None:
    sc, runs = _synthetic()
    doc = {"scenario": {"name": sc.name, "reference": sc.reference}, "dimensions": {},
           "complete": True, "interrupted": False, "planned_runs": 6,
           "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs],
           "summary": summarize(sc, runs)}
    text = markdown(doc)
    assert "## Ping-pong alongside the streams" in text
    assert "shares the client core with testpmd" in text
    assert "| tx | sh | 20.0 | 301.0 | 602.0 | 900 | **2.00** (1.00-4.00, n=3) |" in text
    assert "| tx | vx | 10.0 | 100.0 | 200.0 | 900 | ref | ref | ref |" in text
    with tempfile.TemporaryDirectory() as d:
        made = make_plots(doc, runs, Path(d) / "plots")
        assert "plots/latency_cdf.png" in made


# ---- the flow against a real daemon ------------------------------------------------------------


def test_alongside_flow_paces_records_its_window_and_stops() -> None:
    from bench.harness.backends import vhostx_daemon
    from bench.harness.pingpong import AlongsideFlow, GuestModel

    with tempfile.TemporaryDirectory(prefix="vxal") as d, \
            vhostx_daemon([("pp0", "echo", {})], params=["mode=baseline"], workdir=d) as dm, \
            GuestModel([dm.sockets["pp0"]]) as gm:
        flow = AlongsideFlow(gm, size=64, core=0, interval=0.01).start()
        assert flow.cpu_tid is not None and flow.sched
        time.sleep(0.2)  # warm-up: not recorded
        flow.begin_window()
        t0 = time.monotonic()
        time.sleep(0.5)
        res = flow.end_window()
        took = time.monotonic() - t0
        assert res.received > 0 and res.bad == 0 and res.lost == 0
        assert len(res.rtt_ns) == res.received
        # paced at 100/s: about 50 round trips in the 0.5 s window, never much more
        assert res.received <= 100 * took + 2
        assert res.elapsed_s == pytest.approx(took, abs=0.15)
        flow.stop()  # idempotent


def test_alongside_flow_reports_a_failure() -> None:
    from bench.harness.pingpong import AlongsideFlow

    class Broken:
        def pingpong(self, *a: Any, **kw: Any) -> Any:
            raise OSError("peer went away")

    flow = AlongsideFlow(Broken(), size=64, core=0).start()  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="alongside ping-pong failed: OSError: peer went away"):
        flow.end_window()
