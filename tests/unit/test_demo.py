"""bench/demo.py, the main job: its closing summary against a real daemon (with the guest model as
the client instead of testpmd), and its live tables in an 80-column terminal."""

from __future__ import annotations

import io
import struct
import time
from typing import Any

import pytest
from rich.console import Console

from bench import demo
from bench.process import DaemonProcess
from virtio.frontend import NetDriver, VhostUserFrontend

MAC_A = bytes.fromhex("525400aa0001")
MAC_B = bytes.fromhex("525400bb0002")


class GuestModelClient:
    """The demo's Client over the project's guest model: `start` sends `n` frames."""

    def __init__(self, sock: str, n: int) -> None:
        self.fe = VhostUserFrontend(sock)
        self.fe.connect()
        self.net = NetDriver(self.fe)
        self.n = n
        self.sent = 0

    def start(self) -> None:
        frames = [MAC_B + MAC_A + b"\x88\xb5" + struct.pack("!I", i) + bytes(82)
                  for i in range(self.n)]
        self.sent += self.net.send(frames, timeout=5)

    def tx_packets(self) -> tuple[float, int]:
        return time.monotonic(), self.sent

    def stop(self) -> None:
        pass


def test_demo_summary_said_the_daemon_moved_0_packets(daemon_factory: Any) -> None:
    """The summary once read the daemon's totals from the statistics it writes at exit, after
    the client had hung up: the device's queues (and their counters) were gone by then, so a
    run where testpmd sent 243 million packets ended with "the daemon moved 0 packets"."""
    d: DaemonProcess = daemon_factory(params=["mode=shared", "workers=1"])
    sock = d.add_device("net0", port="sink")
    d.start()
    client = GuestModelClient(sock, 700)
    res = demo.run_phase(d, client, 0.5, demo.PhaseResult(demo.MODES[0], 1), period=0.2)
    assert client.sent == 700
    assert res.client_sent == 700 and res.daemon_counted == 700
    assert res.window.daemon_pps > 0 and res.last is not None
    assert "the daemon received 700 (100.0%)" in demo.summary_lines([res])[0]
    # the cause: once the frontend is gone, the daemon's statistics no longer hold those packets
    client.fe.close()
    deadline = time.monotonic() + 5
    while demo.daemon_tx_packets(d.stats()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert demo.daemon_tx_packets(d.stats()) == 0
    assert demo.daemon_tx_packets(d.stop() or {}) == 0


def _stats(t: float, devices: int, per_queue: int, polling: bool) -> dict[str, Any]:
    queues = []
    for k in range(devices):
        for q in ("rx0", "tx0"):
            n = per_queue * t if q == "tx0" else 0
            queues.append({"name": f"net{k}.{q}", "device": f"net{k}", "worker": 0,
                           "polling": polling, "packets": int(n), "bytes": int(n) * 64,
                           "kicks": int(123_456 * t), "kicks_avoided": int(987_654 * t),
                           "interrupts": int(55_555 * t)})
    return {"time": t, "mode": "shared", "devices": [{"name": f"net{k}"} for k in range(devices)],
            "workers": [{"index": 0, "name": "w0", "busy_ns": 0, "idle_ns": 0}],
            "queues": queues}


def _results() -> list[demo.PhaseResult]:
    fig = demo.Second(seconds=10, client_pps=12_345_678, daemon_pps=12_345_678,
                      kicks_ps=1_234_567, avoided_ps=9_876_543, irq_ps=123_456, cpu=1.0,
                      threads=16, polling=16)
    shared = demo.PhaseResult(demo.MODES[0], 16, client_sent=243_000_000,
                              daemon_counted=243_000_000, window=fig, last=fig)
    baseline = demo.PhaseResult(demo.MODES[1], 16)
    return [shared, baseline]


def _render(renderable: Any, console: Console) -> list[str]:
    console.print(renderable)
    return console.export_text().splitlines()


@pytest.mark.parametrize("how", ["Console(width=80)", "COLUMNS=80"])
def test_demo_tables_fit_80_columns(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "COLUMNS=80":
        monkeypatch.setenv("COLUMNS", "80")
        console = Console(file=io.StringIO(), record=True)
        assert console.width == 80
    else:
        console = Console(file=io.StringIO(), width=80, record=True)
    prev, cur = _stats(1.0, 16, 3_000_000, True), _stats(2.0, 16, 3_000_000, True)
    results = _results()
    header = "phase 1/2: " + results[0].phase.title + ", 16 devices, 64 B frames; 9 s left"
    lines = _render(demo._layout(header, results, "shared", prev, cur), console)
    lines += _render(demo.comparison_table(results, None), console)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text, text  # nothing cut short
    for words in ("shared (now)", "baseline (next)", "12.346", "kicks avoided (polling)",
                  "net15", "3.000", "2 queues"):
        assert words in text, (words, text)


def test_summary_compares_the_phases() -> None:
    shared, baseline = _results()
    baseline.window = demo.Second(seconds=10, daemon_pps=6_172_839)
    baseline.client_sent = baseline.daemon_counted = 61_728_390
    lines = demo.summary_lines([shared, baseline])
    assert lines[0].startswith("shared: the client sent 243,000,000 packets over 16 devices")
    assert "the daemon received 243,000,000 (100.0%)" in lines[0]
    assert lines[-1] == ("one shared I/O core moved 2.00x the packets per second of a thread "
                         "per device on the same core")


def test_cpu_busy_reads_each_cpu() -> None:
    busy = demo.cpu_busy((0,), seconds=0.1)
    assert set(busy) == {0} and 0.0 <= busy[0] <= 1.0
    assert demo.cpu_busy((), seconds=0.01) == {}
