"""The real daemon's metrics endpoint and its CLI: `serve --metrics` scraped over HTTP and parsed
with prometheus_client, values checked against traffic sent by the Python frontend; hostile
clients on the metrics port do not disturb the data path; `vhostx stats/workers/worker/migrate`
against a running shared-mode daemon."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.process import DaemonProcess
from virtio.frontend import NetDriver, VhostUserFrontend

MAC_A = bytes.fromhex("525400aa0001")
MAC_B = bytes.fromhex("525400bb0002")


def frame(n: int, size: int = 100) -> bytes:
    return MAC_B + MAC_A + b"\x88\xb5" + struct.pack("!I", n) + bytes(size - 18)


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def scrape(d: DaemonProcess) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    assert d.metrics_url is not None
    with urllib.request.urlopen(d.metrics_url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def by_name(samples: dict[Any, float], metric: str, /, **labels: str) -> list[float]:
    return [v for (n, lbl), v in samples.items()
            if n == metric and all(dict(lbl).get(k) == want for k, want in labels.items())]


def vhostx_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostx", *args], capture_output=True, text=True,
                          check=False,
                          timeout=60)


@pytest.mark.parametrize("params", [["mode=baseline"], ["mode=shared", "workers=2"]],
                         ids=["baseline", "shared"])
def test_metrics_scrape_matches_traffic(daemon_factory: Any, params: list[str]) -> None:
    d = daemon_factory(metrics="127.0.0.1:0", params=params)
    sock = d.add_device("net0", port="sink")
    d.start()
    mode = params[0].removeprefix("mode=")
    _, s = scrape(d)
    assert by_name(s, "vhostx_mode", mode=mode) == [1]
    assert by_name(s, "vhostx_uptime_seconds")[0] >= 0
    assert by_name(s, "vhostx_param", name="turn_max_packets")  # numeric parameters exported
    assert not by_name(s, "vhostx_param", name="mode")  # a string is not a sample
    with VhostUserFrontend(sock) as fe:
        net = NetDriver(fe)
        assert net.send([frame(i) for i in range(500)], timeout=5) == 500
        assert wait_until(lambda: by_name(scrape(d)[1], "vhostx_queue_packets_total",
                                          device="net0", queue="net0.tx0") == [500])
        _, s = scrape(d)
        assert by_name(s, "vhostx_queue_bytes_total", device="net0", queue="net0.tx0") == [50000]
        assert by_name(s, "vhostx_ring_packets_total", device="net0", ring="1") == [500]
        assert by_name(s, "vhostx_device_broken", device="net0") == [0]
        assert sum(by_name(s, "vhostx_worker_loops_total")) > 0
        (worker,) = {dict(lbl)["worker"] for (n, lbl) in s
                     if n == "vhostx_queue_packets_total" and dict(lbl)["queue"] == "net0.tx0"}
        assert by_name(s, "vhostx_worker_busy_seconds_total", worker=worker)
        # the stats on the control socket agree with the exposition
        q = next(q for q in d.stats()["queues"] if q["name"] == "net0.tx0")
        assert by_name(s, "vhostx_queue_kicks_total", queue="net0.tx0") == [q["kicks"]]


def test_hostile_metrics_clients_do_not_disturb_the_daemon(daemon_factory: Any) -> None:
    d = daemon_factory(metrics="127.0.0.1:0")
    sock = d.add_device("net0", port="sink")
    d.start()
    assert d.metrics is not None
    host, port = d.metrics.rsplit(":", 1)
    # a stalled client, garbage, an oversize head, a reset
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(b"GET /met")
    for raw in (b"GET /metrics HTTP/1.1 junk", b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000,
                b"\x00\xff garbage"):
        with socket.create_connection((host, int(port))) as c:
            c.settimeout(10)
            c.sendall(raw + b"\r\n\r\n")
            answer = c.recv(4096)
            # a line that is not HTTP/1.x is answered HTTP/0.9-style: the code is in the page
            assert (answer.split(b" ")[1] in (b"400", b"431")
                    or b"Error code: 400" in answer), answer[:200]
    reset = socket.create_connection((host, int(port)))
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()
    try:
        with urllib.request.urlopen(f"http://{d.metrics}/nothing", timeout=10):
            pytest.fail("expected a 404")
    except urllib.error.HTTPError as err:
        assert err.code == 404
    with VhostUserFrontend(sock) as fe:
        assert NetDriver(fe).send([frame(i) for i in range(100)], timeout=5) == 100
        assert wait_until(lambda: by_name(scrape(d)[1], "vhostx_queue_packets_total",
                                          queue="net0.tx0") == [100])
    assert d.request({"cmd": "ping"})["ok"]
    stalled.close()
    assert d.alive()


def test_metrics_port_in_use_exits_2(daemon_factory: Any, tmp_path: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = vhostx_cli("serve", "--device", f"name=a,socket={tmp_path}/a.sock",
                       "--metrics", f"127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr
    assert "metrics" in r.stderr and "cannot listen" in r.stderr


def test_cli_against_a_shared_daemon(daemon_factory: Any) -> None:
    d = daemon_factory(params=["mode=shared", "workers=2"])
    sock = d.add_device("net0", port="sink")
    d.start()
    ctl = d.control
    with VhostUserFrontend(sock) as fe:
        net = NetDriver(fe)
        net.send([frame(i) for i in range(64)], timeout=5)
        r = vhostx_cli("workers", "--control", ctl)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0].split()[0] == "worker" and len(r.stdout.splitlines()) == 3
        r = vhostx_cli("worker", "add", "--control", ctl)
        assert r.returncode == 0 and "added worker 2" in r.stdout, r.stderr
        r = vhostx_cli("migrate", "net0", "2", "--control", ctl)
        assert r.returncode == 0 and "moved net0 to worker 2" in r.stdout, r.stderr
        assert wait_until(lambda: all(q["worker"] == 2 for q in d.stats()["queues"]
                                      if q["device"] == "net0"))
        r = vhostx_cli("migrate", "nosuch", "0", "--control", ctl)
        assert r.returncode == 1 and "refused 'migrate'" in r.stderr
        r = vhostx_cli("worker", "remove", "9", "--control", ctl)
        assert r.returncode == 1 and "refused 'worker_remove'" in r.stderr
        r = vhostx_cli("stats", "--count", "1", "--interval", "0.3", "--control", ctl)
        assert r.returncode == 0, r.stderr
        assert "queues" in r.stdout and "tx0" in r.stdout and "workers" in r.stdout
    d.stop()
    r = vhostx_cli("workers", "--control", ctl)
    assert r.returncode == 1 and "no daemon is listening" in r.stderr
