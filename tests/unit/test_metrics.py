"""vhostx.metrics: the families of a stats snapshot parsed back by prometheus_client's parser, and
the endpoint (prometheus_client's WSGI app on its threaded server) over real sockets, including
clients that send garbage, too much, or nothing at all."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vhostx import metrics
from vhostx.metrics import parse_addr, render, serve
from virtio.errors import ConfigError

NEW_STATS: dict[str, Any] = {
    "ok": True, "mode": "shared", "uptime_s": 12.5, "time": 1763740000.0,
    "devices": [
        {"name": "net0", "broken": None, "status": 15, "features": "0x1",
         "queues": {"0": {"packets": 7, "bytes": 700, "ring_full": 2},
                    "1": {"packets": 1000, "bytes": 64000, "interrupts": 3}},
         "works": {"net0.tx0": {"kicks": 5}},
         "counters": {"connections": 1, "messages": 30}},
        {"name": "net1", "broken": "bad descriptor", "queues": {}, "counters": {}},
    ],
    "workers": [
        {"index": 0, "name": "w0", "cpu": 1, "busy_ns": 1_500_000_000, "idle_ns": 500_000_000,
         "loops": 100, "sleeps": 4, "empty_polls": 50, "works": 2, "devices": ["net0"],
         "polling": 1},
        {"index": 1, "name": "w1", "cpu": None, "busy_ns": 0, "idle_ns": 0, "loops": 0,
         "sleeps": 0, "empty_polls": 0, "works": 0, "devices": [], "polling": 0},
    ],
    "queues": [
        {"name": "net0.tx0", "device": "net0", "worker": 0, "polling": True,
         "packets": 1000, "bytes": 64000, "kicks": 5, "kicks_avoided": 40, "interrupts": 3,
         "interrupts_suppressed": 9, "poll_starts": 2, "poll_stops": 1, "polled_ns": 250_000_000,
         "ring_full": 0, "stuck_events": 1, "budget_exhausted": 6, "turns": 77,
         "empty_turns": 11, "wakes": 4, "caught": 960},
        {"name": "net0.rx0", "device": "net0", "worker": 0, "polling": False,
         "packets": 7, "bytes": 700},
    ],
    "params": {"mode": "shared", "turn_max_packets": 256, "poll_stop_idle_us": 50.5,
               "worker_cpus": "1-3", "polling": True},
}


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def lbl(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def test_render_parses_back_with_the_values() -> None:
    text = render(NEW_STATS)
    fam = families(text)
    s = samples(text)
    assert fam["vhostx_queue_packets"].type == "counter"
    assert fam["vhostx_queue_polling"].type == "gauge"
    assert fam["vhostx_worker_works"].type == "gauge"
    assert s[("vhostx_uptime_seconds", ())] == 12.5
    assert s[("vhostx_mode", lbl(mode="shared"))] == 1
    q = lbl(device="net0", queue="net0.tx0", worker="0")
    assert s[("vhostx_queue_packets_total", q)] == 1000
    assert s[("vhostx_queue_bytes_total", q)] == 64000
    assert s[("vhostx_queue_kicks_total", q)] == 5
    assert s[("vhostx_queue_kicks_avoided_total", q)] == 40
    assert s[("vhostx_queue_interrupts_suppressed_total", q)] == 9
    assert s[("vhostx_queue_polled_seconds_total", q)] == 0.25
    assert s[("vhostx_queue_stuck_events_total", q)] == 1
    assert s[("vhostx_queue_budget_exhausted_total", q)] == 6
    assert s[("vhostx_queue_empty_turns_total", q)] == 11
    assert s[("vhostx_queue_wakes_total", q)] == 4
    assert s[("vhostx_queue_caught_total", q)] == 960
    assert s[("vhostx_queue_polling", q)] == 1
    assert s[("vhostx_queue_polling", lbl(device="net0", queue="net0.rx0", worker="0"))] == 0
    # absent fields are absent, not zero
    assert ("vhostx_queue_kicks_total", lbl(device="net0", queue="net0.rx0", worker="0")) not in s
    w0 = lbl(worker="0")
    assert s[("vhostx_worker_busy_seconds_total", w0)] == 1.5
    assert s[("vhostx_worker_idle_seconds_total", w0)] == 0.5
    assert s[("vhostx_worker_loops_total", w0)] == 100
    assert s[("vhostx_worker_empty_polls_total", w0)] == 50
    assert s[("vhostx_worker_polling", w0)] == 1
    assert s[("vhostx_worker_info", lbl(worker="0", name="w0", cpu="1"))] == 1
    assert s[("vhostx_worker_info", lbl(worker="1", name="w1", cpu=""))] == 1  # empty = absent
    assert s[("vhostx_device_broken", lbl(device="net0"))] == 0
    assert s[("vhostx_device_broken", lbl(device="net1"))] == 1
    assert s[("vhostx_device_messages_total", lbl(device="net0"))] == 30
    assert s[("vhostx_ring_packets_total", lbl(device="net0", ring="1"))] == 1000
    assert s[("vhostx_ring_ring_full_total", lbl(device="net0", ring="0"))] == 2
    assert s[("vhostx_param", lbl(name="turn_max_packets"))] == 256
    assert s[("vhostx_param", lbl(name="poll_stop_idle_us"))] == 50.5
    assert s[("vhostx_param", lbl(name="polling"))] == 1
    # strings are not numbers: no sample for them
    assert ("vhostx_param", lbl(name="mode")) not in s
    assert ("vhostx_param", lbl(name="worker_cpus")) not in s
    # new-style stats: the per-device works are not rendered a second time as queues
    assert ("vhostx_queue_kicks_total", lbl(device="net0", queue="net0.tx0", worker="")) not in s


def test_every_family_has_help_and_type_once() -> None:
    text = render(NEW_STATS)
    helps = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# HELP")]
    types = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")]
    assert helps == types and len(set(types)) == len(types)
    for line in text.splitlines():
        if line.startswith("# TYPE") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total")
    assert text.endswith("\n")


def test_label_values_are_escaped() -> None:
    nasty = 'we"ird\\dev\nname'
    stats = {"devices": [{"name": nasty, "broken": None}],
             "queues": [{"name": "q\"1", "device": nasty, "worker": "a\\b", "packets": 3}],
             "params": {'p"\\\n': 4}}
    text = render(stats)
    assert '\n' not in text.split('device="', 1)[1].split('"} ', 1)[0]
    s = samples(text)
    assert s[("vhostx_device_broken", lbl(device=nasty))] == 0
    assert s[("vhostx_queue_packets_total", lbl(device=nasty, queue='q"1', worker="a\\b"))] == 3
    assert s[("vhostx_param", lbl(name='p"\\\n'))] == 4


@pytest.mark.parametrize(
    "stats",
    [
        {},
        {"devices": None, "workers": "nope", "queues": 5, "params": [1, 2]},
        {"devices": [None, 3, {"queues": {"0": "x", "1": None}, "counters": [1]}]},
        {"workers": [{"busy_ns": "lots", "loops": None, "sleeps": [1], "works": {"a": 1}}]},
        {"queues": [{"name": "q", "packets": float("nan"), "bytes": -5, "polled_ns": float("inf"),
                     "turns": 2**70, "unknown_counter": 9, "nested": {"deep": 1}}]},
        {"uptime_s": "long", "mode": 5, "params": {"a": None, "b": {"x": 1}, "c": [1]}},
        {"params": [{"name": "turn_max_packets", "value": 64}, {"value": 1}, "junk"]},
    ],
)
def test_unknown_or_odd_fields_never_crash_and_still_parse(stats: dict[str, Any]) -> None:
    text = render(stats)
    list(text_string_to_metric_families(text))  # the parser accepts it


def test_odd_values_are_skipped_and_unknown_fields_ignored() -> None:
    text = render({"queues": [{"name": "q", "device": "d", "worker": 0, "packets": float("nan"),
                               "bytes": -5, "polled_ns": 2e9, "turns": 2**70,
                               "unknown_counter": 9, "kicks": "3"}],
                   "future_section": {"x": 1}, "params": [{"name": "a", "value": 64}]})
    s = samples(text)
    q = lbl(device="d", queue="q", worker="0")
    assert ("vhostx_queue_packets_total", q) not in s  # NaN counter: skipped
    assert ("vhostx_queue_bytes_total", q) not in s  # negative counter: skipped
    assert ("vhostx_queue_kicks_total", q) not in s  # a string is not a number
    assert s[("vhostx_queue_polled_seconds_total", q)] == 2.0
    assert s[("vhostx_queue_turns_total", q)] == float(2**70)
    assert s[("vhostx_param", lbl(name="a"))] == 64
    assert "unknown_counter" not in text and "future_section" not in text


def test_render_does_not_modify_its_input() -> None:
    before = copy.deepcopy(NEW_STATS)
    render(NEW_STATS)
    assert NEW_STATS == before


@pytest.mark.parametrize("addr, port", [("127.0.0.1:9477", 9477), ("localhost:0", 0),
                                        ("[::1]:80", 80), ("0.0.0.0:65535", 65535)])
def test_parse_addr_good(addr: str, port: int) -> None:
    assert parse_addr(addr)[1] == port


@pytest.mark.parametrize("addr, words", [
    ("9477", ["HOST:PORT"]), (":9477", ["HOST:PORT"]), ("127.0.0.1:", ["port"]),
    ("127.0.0.1:65536", ["[0, 65535]"]), ("127.0.0.1:-1", ["port"]), ("h:x", ["port 'x'"]),
    ("::1:80", ["brackets"]), ("[::1]80", ["[IPV6]:PORT"]), ("[nothost]:80", ["IPv6"]),
    ("a b:80", ["host"]), ("", ["HOST:PORT"]),
])
def test_parse_addr_bad(addr: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_addr(addr)
    for w in words:
        assert w in str(info.value)
    assert repr(addr) in str(info.value)


# ------------------------------------------------------------------------------------------------
# the HTTP server over real sockets


async def request(port: int, raw: bytes, *,
                  read_timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


@pytest.fixture
async def server() -> Any:
    calls: list[int] = []

    def stats_fn() -> dict[str, Any]:
        calls.append(threading.get_ident())
        return NEW_STATS

    srv = await serve("127.0.0.1:0", stats_fn)
    srv.calls = calls  # type: ignore[attr-defined]
    srv.port = srv.address[1]  # type: ignore[attr-defined]
    yield srv
    srv.close()
    await srv.wait_closed()


async def test_get_metrics(server: Any) -> None:
    status, headers, body = await request(
        server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    assert body.decode() == render(NEW_STATS)
    # the snapshot was taken on the asyncio thread (the daemon's objects belong to it)
    assert server.calls == [threading.get_ident()]
    # query strings are ignored, bare LF line ends accepted
    status, _, body2 = await request(server.port, b"GET /metrics?x=1 HTTP/1.0\n\n")
    assert status == 200 and body2 == body


async def test_counters_are_read_at_scrape_time() -> None:
    state = {"packets": 0}

    def stats_fn() -> dict[str, Any]:
        state["packets"] += 10
        return {"queues": [{"name": "net0.tx0", "device": "net0", "worker": 0,
                            "packets": state["packets"]}]}

    srv = await serve("127.0.0.1:0", stats_fn)
    try:
        seen = []
        for _ in range(3):
            _, _, body = await request(srv.address[1], b"GET /metrics HTTP/1.1\r\n\r\n")
            seen.append(samples(body.decode())[("vhostx_queue_packets_total",
                                                lbl(device="net0", queue="net0.tx0",
                                                    worker="0"))])
        assert seen == [10, 20, 30]
    finally:
        srv.close()
        await srv.wait_closed()


async def test_head_has_no_body(server: Any) -> None:
    status, headers, body = await request(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


@pytest.mark.parametrize("raw, code", [
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS hello-ish garbage
    (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET /metrics SPDY/3\r\n\r\n", 400),
])
async def test_errors(server: Any, raw: bytes, code: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(raw)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    # a request line that is not HTTP/1.x gets http.server's HTTP/0.9-style answer: no status
    # line, the code in the page
    assert data.startswith(b"HTTP/1.") and int(data.split()[1]) == code or (
        b"Error code: %d" % code in data)
    assert server.calls == []


async def test_oversize_request_is_refused(server: Any) -> None:
    many = b"GET /metrics HTTP/1.1\r\n" + b"".join(
        b"X-Filler-%d: %s\r\n" % (i, b"a" * 100) for i in range(200)) + b"\r\n"
    status, _, _ = await request(server.port, many)
    assert status == 431  # more than 100 header lines
    long_header = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
    status, _, _ = await request(server.port, long_header)
    assert status == 431
    one_long_line = b"GET /" + b"m" * 70000 + b" HTTP/1.1\r\n\r\n"
    status, _, _ = await request(server.port, one_long_line)
    assert status == 414
    assert server.calls == []


async def test_stalled_client_does_not_block_others(server: Any) -> None:
    # Two clients that stall: one sends half a request line, one nothing at all.
    _r1, w1 = await asyncio.open_connection("127.0.0.1", server.port)
    _r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)
    w1.write(b"GET /metr")
    await w1.drain()
    t0 = time.monotonic()
    status, _, body = await request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n", read_timeout=2)
    assert status == 200 and body
    assert time.monotonic() - t0 < 1.0
    w1.close()
    w2.close()


async def test_stalled_client_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics._Handler, "timeout", 0.3)
    srv = await serve("127.0.0.1:0", lambda: NEW_STATS)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.address[1])
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        await writer.drain()
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, nothing served
        assert time.monotonic() - t0 < 2.5
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_client_that_resets_does_not_hurt(server: Any) -> None:
    for _ in range(5):
        _, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.transport.abort()
    status, _, _ = await request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == 200


async def test_too_many_connections_get_503_and_others_recover(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 2)
    srv = await serve("127.0.0.1:0", lambda: NEW_STATS)
    port = srv.address[1]
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.2)
        status, _, body = await request(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 503 and body == b"too many connections\n"
        for _, w in held:
            w.close()
        await asyncio.sleep(0.3)
        status, _, _ = await request(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200
    finally:
        srv.close()
        await srv.wait_closed()


async def test_stats_fn_failure_is_a_500_and_the_server_lives() -> None:
    state = {"fail": True}

    def stats_fn() -> dict[str, Any]:
        if state["fail"]:
            raise RuntimeError("boom")
        return {"uptime_s": 1}

    srv = await serve("127.0.0.1:0", stats_fn)
    port = srv.address[1]
    try:
        assert (await request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 500
        state["fail"] = False
        status, _, body = await request(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200 and b"vhostx_uptime_seconds 1.0" in body
    finally:
        srv.close()
        await srv.wait_closed()


async def test_serve_refuses_bad_and_busy_addresses(server: Any) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        await serve("nonsense", dict)
    with pytest.raises(ConfigError, match="cannot listen"):
        await serve(f"127.0.0.1:{server.port}", dict)


async def test_close_stops_the_server_thread() -> None:
    srv = await serve("127.0.0.1:0", dict)
    port = srv.address[1]
    srv.close()
    await asyncio.wait_for(srv.wait_closed(), 5)
    with pytest.raises(OSError):
        await request(port, b"GET /metrics HTTP/1.1\r\n\r\n")


def test_iotlb_counters_of_an_access_platform_device() -> None:
    stats = {"devices": [
        {"name": "io0", "iotlb": {"updates": 7, "invalidations": 3, "miss_sent": 5, "denied": 0,
                                  "entries": 4}},
        {"name": "plain", "iotlb": None},
    ]}
    s = samples(render(stats))
    io0 = lbl(device="io0")
    assert s[("vhostx_iotlb_updates_total", io0)] == 7
    assert s[("vhostx_iotlb_invalidations_total", io0)] == 3
    assert s[("vhostx_iotlb_misses_sent_total", io0)] == 5
    assert s[("vhostx_iotlb_entries", io0)] == 4
    assert ("vhostx_iotlb_updates_total", lbl(device="plain")) not in s
