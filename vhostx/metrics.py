"""Prometheus metrics: a prometheus_client Collector over the daemon's stats snapshot, served by
prometheus_client's WSGI app on a thread.

`StatsCollector(stats_fn)` builds the metric families at every scrape from `stats_fn()`, the same
stats dict the control socket serves (docs/internal-api.md, "Daemon statistics"): daemon uptime
and mode, every numeric parameter as `vhostx_param{name=...}`, per device (state, protocol
counters, the C ring counters read at that moment), per worker and per queue work. Nothing is
cached, so nothing drifts from the counters. It renders what is present and skips what is absent
or not a number (a counter below zero or NaN is skipped too): the stats dict grows over time and
a field this module does not know is ignored, never an error. `render(stats)` is the text
exposition (format 0.0.4) of one snapshot.

`serve(addr, stats_fn)` listens on "HOST:PORT" with `prometheus_client.make_wsgi_app` in a
`ThreadingWSGIServer` thread: GET (or HEAD) /metrics answers the exposition, another path 404,
another method 405. Anything on the network may connect, so a connection must send its request
head within REQUEST_TIMEOUT_S, and at most MAX_CONNECTIONS are served at once (more get 503).

Threads: `render` and `families` are pure (any thread). `serve` is awaited on the asyncio thread;
scrapes run on the server's threads, and `stats_fn` is called back on the asyncio thread (the
daemon's objects belong to it): the scrape waits for it at most STATS_TIMEOUT_S, then answers 500.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import math
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from virtio.errors import ConfigError

__all__ = [
    "MAX_CONNECTIONS",
    "REQUEST_TIMEOUT_S",
    "STATS_TIMEOUT_S",
    "MetricsServer",
    "StatsCollector",
    "families",
    "parse_addr",
    "render",
    "serve",
]

log = logging.getLogger("vhostx.control")

REQUEST_TIMEOUT_S = 5.0  # a connection's socket reads and writes time out after this
STATS_TIMEOUT_S = 5.0  # a scrape waits this long for the asyncio thread's snapshot
MAX_CONNECTIONS = 64  # served at once; more are answered 503 and closed

# ----------------------------------------------------------------------------------------------
# the families

# (stats key, metric suffix, type, help, scale). Counters get "_total" appended.
_Spec = tuple[str, str, str, str, float]

_WORKER_METRICS: tuple[_Spec, ...] = (
    ("busy_ns", "worker_busy_seconds", "counter", "Time the worker spent serving queues.", 1e-9),
    ("idle_ns", "worker_idle_seconds", "counter", "Time the worker spent idle or asleep.", 1e-9),
    ("loops", "worker_loops", "counter", "Scheduling loop iterations of the worker.", 1),
    ("sleeps", "worker_sleeps", "counter", "Times the worker blocked waiting for a kick.", 1),
    ("empty_polls", "worker_empty_polls", "counter",
     "Polling passes that found no work on any queue.", 1),
    ("rounds", "worker_poll_rounds", "counter",
     "C poll rounds: every polled queue of the worker served in one C call.", 1),
    ("round_ns", "worker_poll_round_seconds", "counter",
     "Time inside C poll rounds (the rest of the busy time is Python around them).", 1e-9),
    ("prefetch_explorations", "worker_prefetch_explorations", "counter",
     "tx_prefetch auto: measurements of the nta hint against t0.", 1),
    ("prefetch_switches", "worker_prefetch_switches", "counter",
     "tx_prefetch auto: measurements that changed the worker's hint.", 1),
    ("prefetch_t0", "worker_prefetch_t0", "gauge",
     "tx_prefetch auto: 1 while the worker's hint is t0, 0 while it is nta.", 1),
    ("works", "worker_works", "gauge", "Queue works currently attached to the worker.", 1),
    ("polling", "worker_polling", "gauge", "Queues the worker is currently polling.", 1),
)

_QUEUE_METRICS: tuple[_Spec, ...] = (
    ("packets", "queue_packets", "counter", "Packets handled by the queue.", 1),
    ("bytes", "queue_bytes", "counter", "Frame bytes handled by the queue (no net header).", 1),
    ("kicks", "queue_kicks", "counter", "Kicks (eventfd notifications) received from the driver.", 1),
    ("kicks_avoided", "queue_kicks_avoided", "counter",
     "Batches of new buffers found by polling while kicks were suppressed.", 1),
    ("interrupts", "queue_interrupts", "counter", "Interrupts (call eventfd writes) sent.", 1),
    ("interrupts_suppressed", "queue_interrupts_suppressed", "counter",
     "Used-ring publications the driver did not want signalled.", 1),
    ("poll_starts", "queue_poll_starts", "counter", "Switches of the queue into polling.", 1),
    ("poll_stops", "queue_poll_stops", "counter", "Switches of the queue out of polling.", 1),
    ("polled_ns", "queue_polled_seconds", "counter", "Time the queue spent in polling mode.", 1e-9),
    ("ring_full", "queue_ring_full", "counter", "RX frames dropped for lack of RX buffers.", 1),
    ("stuck_events", "queue_stuck_events", "counter",
     "Times the queue waited longer than the stuck limits allow.", 1),
    ("budget_exhausted", "queue_budget_exhausted", "counter",
     "Turns that ended because the budget ran out.", 1),
    ("turns", "queue_turns", "counter", "Service turns given to the queue.", 1),
    ("empty_turns", "queue_empty_turns", "counter", "Service turns that found nothing to do.", 1),
    ("wakes", "queue_wakes", "counter",
     "Arrivals that found the queue asleep in the worker's C wait (kicks on).", 1),
    ("caught", "queue_caught", "counter",
     "Arrivals a busy-poll window found with kicks still off (no kick, no wake-up).", 1),
    ("polling", "queue_polling", "gauge", "1 while the queue is polled, 0 while kicks drive it.", 1),
)

_DEVICE_COUNTERS: tuple[_Spec, ...] = (
    ("connections", "device_connections", "counter", "Frontend connections accepted.", 1),
    ("protocol_errors", "device_protocol_errors", "counter",
     "Connections closed for breaking the vhost-user protocol.", 1),
    ("guest_errors", "device_guest_errors", "counter", "Rings broken by bad guest data.", 1),
    ("messages", "device_messages", "counter", "vhost-user messages handled.", 1),
    ("replans", "device_replans", "counter", "Re-plannings of the device's queue works.", 1),
)

# The device IOTLB of ACCESS_PLATFORM devices (stats "iotlb"; docs/internal-api.md, "device IOTLB").
_IOTLB_METRICS: tuple[_Spec, ...] = (
    ("updates", "iotlb_updates", "counter", "IOTLB mappings inserted (IOTLB_MSG UPDATE).", 1),
    ("invalidations", "iotlb_invalidations", "counter",
     "IOTLB invalidations that removed or trimmed a mapping.", 1),
    ("miss_sent", "iotlb_misses_sent", "counter", "IOTLB MISS requests sent to the frontend.", 1),
    ("denied", "iotlb_denied", "counter",
     "Translations refused for a permission the mapping lacks (the ring breaks).", 1),
    ("entries", "iotlb_entries", "gauge", "Mappings in the device's IOTLB.", 1),
)

# The C ring counters (struct vx_stats in virtio/_core/vx_core.h), per device and ring index.
_RING_COUNTERS: tuple[_Spec, ...] = tuple(
    (key, f"ring_{key}", "counter", text, 1)
    for key, text in (
        ("packets", "Frames handled by the ring (TX consumed, RX delivered)."),
        ("bytes", "Frame bytes handled by the ring, net header excluded."),
        ("chains", "Descriptor chains used."),
        ("batches", "Publications of used entries (used->idx stores)."),
        ("interrupts", "Call eventfd writes."),
        ("interrupts_suppressed", "Publications the driver did not want signalled."),
        ("ring_empty", "Calls that found no available entry."),
        ("ring_full", "RX frames dropped: no (or not enough) RX buffers."),
        ("errors", "Guest errors (the ring breaks at the first)."),
        ("notify_off", "Kick suppressions (set_notify(0) calls)."),
        ("notify_on", "Kick re-enables (set_notify(1) calls)."),
        ("dropped", "TX frames dropped (malformed, no destination, ...)."),
        ("too_big", "Frames dropped for not fitting."),
        ("eagain", "File descriptor calls stopped by EAGAIN."),
        ("io_errors", "File descriptor calls that failed otherwise."),
        ("lock_contended", "RX lock acquisitions that had to spin."),
        ("interrupts_no_fd", "Publications the driver wanted signalled, without a call fd."),
        ("interrupts_deferred", "Interrupts held back by moderation."),
        ("interrupts_posted", "Posted-interrupt bits set with no notification needed."),
        ("pi_notifications", "Posted interrupts that wrote the domain's wake eventfd."),
        ("irq_deadline_flushes", "Held interrupts sent by their deadline or a flush."),
        ("irq_deadline_fired", "Held interrupts sent because their deadline had passed."),
        ("irq_late_ns", "Sum of how late those were sent after their deadline, ns."),
    )
)


def _number(value: Any) -> float | int | None:
    """The value as a number, or None when it is not one (strings are not numbers here)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    return None


_LABELS = {"device": ("device",), "ring": ("device", "ring"), "worker": ("worker",),
           "queue": ("device", "queue", "worker"), "param": ("name",), "mode": ("mode",),
           "info": ("worker", "name", "cpu"), "none": ()}


class _Families:
    """Metric families by name, each with its label names fixed at its first sample; a sample
    whose label values repeat keeps the first value."""

    def __init__(self, prefix: str = "vhostx_") -> None:
        self.prefix = prefix
        self.fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        self.seen: dict[str, set[tuple[str, ...]]] = {}

    def add(self, name: str, mtype: str, help_: str, labels: Mapping[str, str],
            value: Any, scale: float = 1) -> None:
        num = _number(value)
        if num is None:
            return
        if scale != 1:
            num = num * scale
        if mtype == "counter" and (math.isnan(num) or num < 0):
            return  # a counter cannot go below zero: a bogus field, not a sample
        full = self.prefix + name
        fam = self.fams.get(full)
        if fam is None:
            fam = (CounterMetricFamily(full, help_, labels=list(labels)) if mtype == "counter"
                   else GaugeMetricFamily(full, help_, labels=list(labels)))
            self.fams[full] = fam
            self.seen[full] = set()
        values = tuple(str(labels[k]) for k in labels)
        if values in self.seen[full]:
            return
        self.seen[full].add(values)
        fam.add_metric(list(values), num)

    def add_specs(self, specs: Iterable[_Spec], row: Mapping[str, Any],
                  labels: Mapping[str, str]) -> None:
        for key, name, mtype, help_, scale in specs:
            if key in row:
                self.add(name, mtype, help_, labels, row[key], scale)


def _rows(section: Any) -> list[Mapping[str, Any]]:
    """A list of dict rows from a list (or a name-keyed dict) of dicts; anything else: none."""
    if isinstance(section, Mapping):
        return [dict(v, name=v.get("name", k)) for k, v in section.items() if isinstance(v, Mapping)]
    if isinstance(section, list | tuple):
        return [r for r in section if isinstance(r, Mapping)]
    return []


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def _params(section: Any) -> list[tuple[str, Any]]:
    if isinstance(section, Mapping):
        return [(str(k), v) for k, v in section.items()]
    # the control socket's "params" rows: [{"name": ..., "value": ...}, ...]
    return [(str(r["name"]), r.get("value")) for r in _rows(section) if "name" in r]


def families(stats: Mapping[str, Any]) -> list[Metric]:
    """The metric families of one stats snapshot; never raises on content."""
    ex = _Families()
    if not isinstance(stats, Mapping):
        return []
    ex.add("uptime_seconds", "gauge", "Seconds since the daemon started.", {}, stats.get("uptime_s"))
    mode = stats.get("mode")
    if isinstance(mode, str):
        ex.add("mode", "gauge", "The daemon's scheduling mode (1 for the mode in force).",
               {"mode": mode}, 1)

    for dev in _rows(stats.get("devices")):
        name = _label(dev.get("name"))
        labels = {"device": name}
        if "broken" in dev:
            ex.add("device_broken", "gauge", "1 when the device is broken (NEEDS_RESET).",
                   labels, 1 if dev.get("broken") else 0)
        if "needs_reset" in dev:
            ex.add("device_needs_reset", "gauge", "1 while the device reports NEEDS_RESET (0x40) "
                   "and waits for the frontend to reset it.", labels, int(bool(dev["needs_reset"])))
        if "status" in dev:
            ex.add("device_status", "gauge", "The virtio device status byte.", labels,
                   dev.get("status"))
        counters = dev.get("counters")
        if isinstance(counters, Mapping):
            ex.add_specs(_DEVICE_COUNTERS, counters, labels)
        iotlb = dev.get("iotlb")
        if isinstance(iotlb, Mapping):
            ex.add_specs(_IOTLB_METRICS, iotlb, labels)
        rings = dev.get("queues")
        if isinstance(rings, Mapping):
            for index, ring in rings.items():
                if isinstance(ring, Mapping):
                    ex.add_specs(_RING_COUNTERS, ring, {"device": name, "ring": str(index)})

    for pos, w in enumerate(_rows(stats.get("workers"))):
        index = w.get("index", w.get("name", pos))
        ex.add("worker_info", "gauge", "Worker name and CPU (always 1; cpu empty when unpinned).",
               {"worker": _label(index), "name": _label(w.get("name", index)),
                "cpu": _label(w.get("cpu"))}, 1)
        ex.add_specs(_WORKER_METRICS, w, {"worker": _label(index)})

    for q in _rows(stats.get("queues")):
        labels = {"device": _label(q.get("device")), "queue": _label(q.get("name")),
                  "worker": _label(q.get("worker"))}
        ex.add_specs(_QUEUE_METRICS, q, labels)

    for pname, value in _params(stats.get("params")):
        ex.add("param", "gauge", "Current value of each numeric parameter.", {"name": pname}, value)
    return list(ex.fams.values())


class _Snapshot(Collector):
    def __init__(self, stats: Mapping[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.stats))


def render(stats: Mapping[str, Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of a daemon stats dict; never raises on content."""
    return generate_latest(_Snapshot(stats)).decode()  # type: ignore[arg-type]


class StatsCollector(Collector):
    """Families built at every scrape from `stats_fn()`. With `loop`, a scrape from another
    thread runs `stats_fn` on that loop's thread and waits for it (STATS_TIMEOUT_S)."""

    def __init__(self, stats_fn: Callable[[], Mapping[str, Any]],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.stats_fn = stats_fn
        self.loop = loop

    def snapshot(self) -> Mapping[str, Any]:
        loop = self.loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            return self.stats_fn()
        fut: concurrent.futures.Future[Mapping[str, Any]] = concurrent.futures.Future()

        def call() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self.stats_fn())
                except BaseException as err:  # noqa: BLE001 - handed to the scraping thread
                    fut.set_exception(err)

        loop.call_soon_threadsafe(call)
        try:
            return fut.result(STATS_TIMEOUT_S)
        finally:
            fut.cancel()

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.snapshot()
        except Exception:
            log.exception("metrics: collecting statistics failed")
            raise
        return iter(families(stats))


# ----------------------------------------------------------------------------------------------
# the HTTP server


def parse_addr(addr: str, *, what: str = "metrics") -> tuple[str, int]:
    """Split "HOST:PORT" (IPv6 as "[::1]:PORT"); ConfigError naming the value if it is not one."""
    if not isinstance(addr, str) or not addr:
        raise ConfigError(f"{what}={addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9477")
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{what}={addr!r}: expected [IPV6]:PORT, e.g. [::1]:9477")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what}={addr!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{what}={addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9477")
        if ":" in host:
            raise ConfigError(f"{what}={addr!r}: write an IPv6 host in brackets, e.g. [::1]:9477")
        if any(c.isspace() for c in host) or "/" in host:
            raise ConfigError(f"{what}={addr!r}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}={addr!r}: port {port_text!r} is not an integer in [0, 65535]")
    return host, int(port_text)


def _only_metrics(app: Callable[..., Any]) -> Callable[..., Any]:
    """prometheus_client's app answers every path; this one answers /metrics (GET, HEAD) only."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method = environ.get("REQUEST_METHOD", "")
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found; try /metrics\n"]
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                                      ("Content-Type", "text/plain")])
            return [b"only GET\n"]
        answer: dict[str, Any] = {}

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer.update(status=status, headers=headers)

        try:
            body = b"".join(app(dict(environ, REQUEST_METHOD="GET"), keep))
        except Exception:  # noqa: BLE001 - the snapshot failed or timed out: logged in collect
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"statistics unavailable\n"]
        start_response(answer["status"], [*answer["headers"], ("Content-Length", str(len(body)))])
        return [b"" if method == "HEAD" else body]

    return wrapped


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # socket timeout of the connection: a stalled client goes

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s " + format, self.address_string(), *args)


class _Server(ThreadingWSGIServer):
    """One thread per connection (daemon threads), at most MAX_CONNECTIONS at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain"
                                b"\r\nContent-Length: 21\r\nConnection: close\r\n\r\n"
                                b"too many connections\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: error serving %s: %r", client_address, sys.exc_info()[1])


class MetricsServer:
    """The running endpoint: `address` (host, port) as bound, `close()` then `await
    wait_closed()` (the asyncio.Server shape the daemon stops)."""

    def __init__(self, httpd: _Server) -> None:
        self.httpd = httpd
        self.address: tuple[str, int] = httpd.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="vhostx-metrics", daemon=True)
        self._closed = threading.Event()
        self._thread.start()

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.httpd.socket]

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            threading.Thread(target=self._stop, name="vhostx-metrics-stop", daemon=True).start()

    def _stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    async def wait_closed(self) -> None:
        await asyncio.to_thread(self._thread.join)


async def serve(addr: str, stats_fn: Callable[[], Mapping[str, Any]]) -> MetricsServer:
    """Listen on "HOST:PORT" (port 0: any free port; read it from `.address`) and answer
    GET /metrics with the families of `stats_fn()`. ConfigError for a bad address or a failed
    bind."""
    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats_fn, asyncio.get_running_loop()))
    app = _only_metrics(make_wsgi_app(registry))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]

        class Server(_Server):
            address_family = family

        httpd = make_server(str(sockaddr[0]), port, app, Server, handler_class=_Handler)
    except OSError as err:
        raise ConfigError(f"metrics={addr!r}: cannot listen: {err.strerror or err}") from err
    server = MetricsServer(httpd)
    log.info("metrics on http://%s/metrics", _fmt_sockname(server.address))
    return server


def _fmt_sockname(name: Any) -> str:
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
