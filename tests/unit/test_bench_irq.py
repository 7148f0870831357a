"""The interrupts scenario's runner without running anything: the shipped file loads, bad
matrices are refused, ratios pair each mode with per-queue eventfds of the same daemon mode and
point, and the report has every section."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.irq.scenario import _ratios, _report, _streams, is_interrupts_scenario, load

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "bench" / "interrupts.toml"


def test_the_shipped_scenario_loads_and_is_dispatched_to_its_runner() -> None:
    sc = load(SHIPPED)
    assert is_interrupts_scenario(SHIPPED)
    assert sc["matrix"]["queues"] == [1, 8, 64]
    assert set(sc["matrix"]["modes"]) == {"eventfd", "moderation", "posted"}
    assert sc["qemu"]["rates"] == [10000, 50000]
    assert sc["matrix"]["windows"] == [32, 1]
    assert not is_interrupts_scenario(SHIPPED.with_name("smoke.toml"))


@pytest.mark.parametrize("bad, why", [
    ('modes = ["eventfd", "msi"]', "matrix.modes"),
    ('queues = [0]', "matrix.queues"),
    ('daemon_modes = ["turbo"]', "matrix.daemon_modes"),
    ('windows = [0]', "matrix.windows"),
    ('windows = []', "matrix.windows"),
])
def test_bad_matrices_are_refused(tmp_path: Path, bad: str, why: str) -> None:
    p = tmp_path / "x.toml"
    p.write_text(f'kind = "interrupts"\n[matrix]\n{bad}\n')
    with pytest.raises(ValueError, match=why):
        load(p)


@pytest.mark.parametrize("bad", ["0", "21", "2.5", "true"])
def test_bad_unlimited_repeats_are_refused(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "x.toml"
    p.write_text(f'kind = "interrupts"\n[run]\nunlimited_repeats = {bad}\n')
    with pytest.raises(ValueError, match=r"run.unlimited_repeats: 1\.\.20"):
        load(p)


@pytest.mark.parametrize(("key", "bad", "why"), [
    ("driver_loop", '"rust"', r"run.driver_loop: allowed \('c', 'python'\)"),
    ("posted_spin_us", "-1", r"run.posted_spin_us: 0\.\.100000"),
    ("posted_spin_us", "100001", r"run.posted_spin_us: 0\.\.100000"),
    ("posted_spin_us", "true", r"run.posted_spin_us: 0\.\.100000"),
])
def test_bad_driver_loop_settings_are_refused(tmp_path: Path, key: str, bad: str,
                                              why: str) -> None:
    p = tmp_path / "x.toml"
    p.write_text(f'kind = "interrupts"\n[run]\n{key} = {bad}\n')
    with pytest.raises(ValueError, match=why):
        load(p)


def _stream(dm: str, mode: str, pps: float, notif: float, sys: float, window: int = 32) -> dict:
    return {"kind": "stream", "daemon_mode": dm, "queues": 64, "rate_pps": 0, "mode": mode,
            "window": window,
            "throughput_pps": pps, "notifications_per_pkt": notif, "syscalls_per_pkt": sys,
            "driver_cpu_us_per_pkt": 1.0, "backend_cpu_us_per_pkt": 1.0}


def test_ratios_pair_modes_with_eventfd_of_the_same_daemon_mode() -> None:
    recs = [_stream("baseline", "eventfd", 100.0, 0.5, 2.0),
            _stream("shared", "eventfd", 200.0, 0.1, 1.0),
            _stream("shared", "posted", 300.0, 0.001, 0.01)]
    (r,) = _ratios(recs)
    assert (r["daemon_mode"], r["mode"]) == ("shared", "posted")
    assert r["throughput_ratio"] == pytest.approx(1.5)
    assert r["notifications_ratio"] == pytest.approx(0.01)
    assert r["syscalls_ratio"] == pytest.approx(0.01)
    doc = {"name": "interrupts", "description": "d", "label": "dev run", "command": "c",
           "dimensions": {"commit": "abc"}, "runs": recs + [
               {"kind": "pingpong", "daemon_mode": "shared", "queues": 64, "mode": "posted",
                "rtt_p50_us": 10.0, "rtt_p99_us": 20.0, "syscalls_per_pkt": 0.5},
               {"kind": "qemu_stream", "rate_pps": 10000, "moderation": "on",
                "guest_irqs_per_pkt": 0.01, "guest_cpu_busy": 0.1, "received_pps": 9000.0}],
           "ratios": [r]}
    text = _report(doc)
    for part in ("## Streams", "## Ping-pong", "## Ratios", "## QEMU guest (TCG)", "dev run",
                 "| shared | 64 | unlimited | 32 | posted | 1.50 | 0.010 | 0.010 |"):
        assert part in text


def test_unlimited_streams_run_once_per_window_paced_ones_once() -> None:
    assert _streams([5000, 0], [32, 1]) == [(5000, 32), (0, 32), (0, 1)]


def test_ratios_pair_each_window_with_eventfd_at_the_same_window() -> None:
    recs = [_stream("shared", "eventfd", 100.0, 0.03, 0.06, window=32),
            _stream("shared", "eventfd", 50.0, 1.0, 2.0, window=1),
            _stream("shared", "posted", 100.0, 0.0, 0.0, window=32),
            _stream("shared", "posted", 80.0, 0.0, 0.0, window=1)]
    by_window = {r["window"]: r["throughput_ratio"] for r in _ratios(recs)}
    assert by_window == {32: pytest.approx(1.0), 1: pytest.approx(1.6)}
