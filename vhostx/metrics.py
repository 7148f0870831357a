"""Prometheus metrics: the daemon's stats dict as text exposition 0.0.4, and a tiny HTTP server.

`render(stats)` turns the stats dict of the control socket (docs/internal-api.md, "Daemon
statistics") into exposition text: daemon uptime and mode, every numeric parameter as
`vhostx_param{name=...}`, per device (state, protocol counters, the C ring counters), per worker
and per queue work. It renders what is present and skips what is absent or not a number: the stats
dict grows over time and a field this module does not know is ignored, never an error.

`serve(addr, stats_fn)` answers `GET /metrics` with `render(stats_fn())`; every other path is a
404. It is deliberately small and defensive, because anything on the network may connect: one
request per connection (then `Connection: close`), the request head bounded in size and in time, a
bounded number of connections at once, and a client that stalls or sends garbage only loses its
own connection.

Threads: `render` is pure (any thread); `serve` and the server run on the asyncio thread, and
`stats_fn` is called there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from virtio.errors import ConfigError

__all__ = [
    "CONTENT_TYPE",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT_S",
    "parse_addr",
    "render",
    "serve",
]

log = logging.getLogger("vhostx.control")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192  # request line + headers; more is refused with 431
REQUEST_TIMEOUT_S = 5.0  # the whole request head must arrive within this
WRITE_TIMEOUT_S = 10.0  # the client must take the answer within this
MAX_CONNECTIONS = 64  # at once; more are answered 503 and closed

# ----------------------------------------------------------------------------------------------
# rendering

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

# The C ring counters (struct vx_stats in virtio/_core/vx_core.h), per device and ring index.
_RING_COUNTERS: tuple[_Spec, ...] = tuple(
    (key, f"ring_{key}", "counter", text, 1)
    for key, text in (
        ("packets", "Frames handled by the ring (TX consumed, RX delivered)."),
        ("bytes", "Frame bytes handled by the ring, net header excluded."),
        ("chains", "Descriptor chains used."),
        ("batches", "Calls that published used entries."),
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
    )
)


def _number(value: Any) -> float | int | None:
    """The value as a number, or None when it is not one (strings are not numbers here)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    return None


def _fmt_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Exposition:
    """Collects samples per metric family, then writes each family once with HELP and TYPE."""

    def __init__(self, prefix: str = "vhostx_") -> None:
        self.prefix = prefix
        self.families: dict[str, tuple[str, str, dict[tuple[tuple[str, str], ...], str]]] = {}

    def add(self, name: str, mtype: str, help_: str, labels: Mapping[str, str],
            value: Any, scale: float = 1) -> None:
        num = _number(value)
        if num is None:
            return
        if scale != 1:
            num = num * scale
        if mtype == "counter" and (num < 0 or math.isnan(num)):
            return  # a counter cannot go below zero: a bogus field, not a sample
        full = self.prefix + name
        fam = self.families.setdefault(full, (mtype, help_, {}))
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        fam[2].setdefault(key, _fmt_value(num))  # a duplicate label set keeps its first value

    def add_specs(self, specs: Iterable[_Spec], row: Mapping[str, Any],
                  labels: Mapping[str, str]) -> None:
        for key, name, mtype, help_, scale in specs:
            if key in row:
                self.add(name, mtype, help_, labels, row[key], scale)

    def text(self) -> str:
        out: list[str] = []
        for full, (mtype, help_, samples) in self.families.items():
            if not samples:
                continue
            sample_name = full + "_total" if mtype == "counter" else full
            out.append(f"# HELP {sample_name} {_escape_help(help_)}")
            out.append(f"# TYPE {sample_name} {mtype}")
            for key, value in samples.items():
                if key:
                    lbl = ",".join(f'{k}="{_escape_label(v)}"' for k, v in key)
                    out.append(f"{sample_name}{{{lbl}}} {value}")
                else:
                    out.append(f"{sample_name} {value}")
        return "\n".join(out) + "\n" if out else ""


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


def render(stats: Mapping[str, Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of a daemon stats dict; never raises on content."""
    ex = _Exposition()
    if not isinstance(stats, Mapping):
        return ""
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
        if "status" in dev:
            ex.add("device_status", "gauge", "The virtio device status byte.", labels,
                   dev.get("status"))
        counters = dev.get("counters")
        if isinstance(counters, Mapping):
            ex.add_specs(_DEVICE_COUNTERS, counters, labels)
        rings = dev.get("queues")
        if isinstance(rings, Mapping):
            for index, ring in rings.items():
                if isinstance(ring, Mapping):
                    ex.add_specs(_RING_COUNTERS, ring, {"device": name, "ring": str(index)})

    for pos, w in enumerate(_rows(stats.get("workers"))):
        index = w.get("index", w.get("name", pos))
        labels = {"worker": _label(index)}
        info = {"worker": _label(index), "name": _label(w.get("name", index))}
        if w.get("cpu") is not None:
            info["cpu"] = _label(w.get("cpu"))
        ex.add("worker_info", "gauge", "Worker name and CPU (always 1).", info, 1)
        ex.add_specs(_WORKER_METRICS, w, labels)

    queues = _rows(stats.get("queues"))
    if "queues" not in stats:
        # Session-1 daemons: the per-work counters (kicks, turns, ...) sit under each device.
        for dev in _rows(stats.get("devices")):
            queues += [dict(w, device=dev.get("name")) for w in _rows(dev.get("works"))]
    for q in queues:
        labels = {"device": _label(q.get("device")), "queue": _label(q.get("name")),
                  "worker": _label(q.get("worker"))}
        ex.add_specs(_QUEUE_METRICS, q, labels)

    for pname, value in _params(stats.get("params")):
        ex.add("param", "gauge", "Current value of each numeric parameter.", {"name": pname}, value)
    return ex.text()


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


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class _MetricsServer:
    def __init__(self, stats_fn: Callable[[], Mapping[str, Any]]) -> None:
        self.stats_fn = stats_fn
        self.active = 0

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        try:
            if self.active > MAX_CONNECTIONS:
                await self._respond(writer, 503, b"too many connections\n")
                await self._linger(reader, writer)
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, body, head = await self._handle(reader)
            except TimeoutError:
                status, body, head = 408, b"request timeout\n", False
            await self._respond(writer, status, body, head_only=head)
            if status >= 400:
                await self._linger(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # The loop is shutting down. End quietly: on 3.11 the stream protocol's done-callback
            # logs a cancelled connection task as an error.
            pass
        except Exception:
            log.exception("metrics: unexpected error serving a client")
        finally:
            self.active -= 1
            writer.close()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error answer: stop sending, then read and drop what the client still sends
        (bounded in bytes and time), so that closing does not reset the connection before the
        client has read the answer."""
        if writer.can_write_eof():
            writer.write_eof()
        left = 65536
        try:
            async with asyncio.timeout(1.0):
                while left > 0:
                    chunk = await reader.read(min(left, 16384))
                    if not chunk:
                        break
                    left -= len(chunk)
        except TimeoutError:
            pass

    async def _read_head(self, reader: asyncio.StreamReader) -> list[bytes] | None:
        """Request line and header lines; None if the head grew past MAX_REQUEST_BYTES."""
        lines: list[bytes] = []
        total = 0
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                return None
            total += len(line)
            if total > MAX_REQUEST_BYTES:
                return None
            line = line.rstrip(b"\r\n")
            if not line:
                if lines:
                    return lines
                continue  # tolerate blank lines before the request line (RFC 9112 2.2)
            lines.append(line)

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = await self._read_head(reader)
        if head is None:
            return 431, b"request too large\n", False
        parts = head[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
            return 400, b"bad request line\n", False
        for line in head[1:]:
            name, sep, _ = line.partition(b":")
            if not sep or not name or name != name.strip():
                return 400, b"bad header line\n", False
            if name.lower() == b"transfer-encoding":
                return 400, b"a request body is not expected\n", False
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return 405, b"only GET\n", False
        path = target.split(b"?", 1)[0]
        if path != b"/metrics":
            return 404, b"not found; try /metrics\n", method == b"HEAD"
        try:
            body = render(self.stats_fn()).encode()
        except Exception:
            log.exception("metrics: collecting statistics failed")
            return 500, b"statistics unavailable\n", method == b"HEAD"
        return 200, body, method == b"HEAD"

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                       *, head_only: bool = False) -> None:
        ctype = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
        writer.write(
            (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
             f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
             "Connection: close\r\n\r\n").encode()
            + (b"" if head_only else body)
        )
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()


async def serve(addr: str, stats_fn: Callable[[], Mapping[str, Any]]) -> asyncio.AbstractServer:
    """Listen on "HOST:PORT" (port 0: any free port; read it from the server's sockets) and answer
    GET /metrics with `render(stats_fn())`. ConfigError for a bad address or a failed bind."""
    host, port = parse_addr(addr)
    handler = _MetricsServer(stats_fn)
    try:
        server = await asyncio.start_server(handler.client, host, port, limit=MAX_REQUEST_BYTES,
                                            reuse_address=True)
    except OSError as err:
        raise ConfigError(f"metrics={addr!r}: cannot listen: {err.strerror or err}") from err
    for sock in server.sockets:
        log.info("metrics on http://%s/metrics", _fmt_sockname(sock.getsockname()))
    return server


def _fmt_sockname(name: Any) -> str:
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
