"""dpdk-testpmd's replies parsed: exact per-port counters, forward statistics, xstats.

Role: pure functions over the text testpmd prints in interactive mode (`show port stats all`,
`show fwd stats all` / `stop`, `show port xstats N`, `show port summary all`) and the frozen
records they return. They tolerate asynchronous log lines (VHOST_CONFIG, "Port 0: link state
change event", ...) interleaved with a reply. bench/testpmd.py (the process) calls them and
re-exports every name here. No I/O; any thread.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "FwdPortStats",
    "FwdStats",
    "FwdStreamStats",
    "PortStats",
    "StatsSample",
    "parse_fwd_stats",
    "parse_port_count",
    "parse_port_stats",
    "parse_xstats",
]

_INT = r"(\d+)"
_NIC_HDR = re.compile(r"#+\s*NIC statistics for port\s+(\d+)\s*#+")
_FWD_HDR = re.compile(r"-+\s*Forward statistics for port\s+(\d+)\s*-+")
_ACC_HDR = re.compile(r"\++\s*Accumulated forward statistics for all ports\s*\++")
_STREAM_HDR = re.compile(
    r"-+\s*Forward Stats for RX Port=\s*(\d+)/Queue=\s*(\d+)\s*->\s*"
    r"TX Port=\s*(\d+)/Queue=\s*(\d+)\s*-+"
)
_BLOCK_END = re.compile(r"^\s*(#{20,}|-{20,}|\+{20,})\s*$")
_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9_-]*(?:-[A-Za-z]+)*):\s*(\d+)")


@dataclass(frozen=True)
class PortStats:
    """One port's ethdev counters from `show port stats all` (cumulative since the last clear)."""

    port: int
    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


@dataclass(frozen=True)
class FwdPortStats:
    """One port's forwarding-engine counters from `show fwd stats all` / `stop`."""

    port: int
    rx_packets: int
    rx_dropped: int
    rx_total: int
    tx_packets: int
    tx_dropped: int
    tx_total: int


@dataclass(frozen=True)
class FwdStreamStats:
    """One stream (RX port/queue -> TX port/queue); testpmd prints these only when there are more
    streams than ports, and only for streams that saw traffic."""

    rx_port: int
    rx_queue: int
    tx_port: int
    tx_queue: int
    rx_packets: int
    tx_packets: int
    tx_dropped: int


@dataclass(frozen=True)
class FwdStats:
    ports: dict[int, FwdPortStats]
    streams: list[FwdStreamStats]
    total: FwdPortStats | None  # the "Accumulated" block; port = -1


def _blocks(text: str, header: re.Pattern[str]) -> Iterable[tuple[re.Match[str], dict[str, int]]]:
    """Yield (header match, fields) for each block started by `header` and ended by a rule line
    or the next header of any kind. Field names are lower-cased with '-' kept."""
    lines = text.splitlines()
    i = 0
    headers = (_NIC_HDR, _FWD_HDR, _ACC_HDR, _STREAM_HDR)
    while i < len(lines):
        m = header.search(lines[i])
        i += 1
        if m is None:
            continue
        fields: dict[str, int] = {}
        while i < len(lines):
            line = lines[i]
            if _BLOCK_END.match(line) or any(h.search(line) for h in headers):
                break
            for name, value in _FIELD.findall(line):
                fields.setdefault(name.lower(), int(value))
            i += 1
        yield m, fields


def _need(fields: dict[str, int], keys: Sequence[str], what: str) -> list[int]:
    missing = [k for k in keys if k not in fields]
    if missing:
        raise ValueError(f"{what}: missing {', '.join(missing)} in {sorted(fields)}")
    return [fields[k] for k in keys]


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parse `show port stats all` (or `show port stats N`) output: {port: PortStats}."""
    out: dict[int, PortStats] = {}
    keys = ("rx-packets", "rx-missed", "rx-bytes", "rx-errors", "rx-nombuf",
            "tx-packets", "tx-errors", "tx-bytes")
    for m, fields in _blocks(text, _NIC_HDR):
        port = int(m.group(1))
        out[port] = PortStats(port, *_need(fields, keys, f"NIC statistics for port {port}"))
    return out


def parse_fwd_stats(text: str) -> FwdStats:
    """Parse the forward statistics printed by `show fwd stats all` and by `stop`."""
    keys = ("rx-packets", "rx-dropped", "rx-total", "tx-packets", "tx-dropped", "tx-total")
    ports: dict[int, FwdPortStats] = {}
    for m, fields in _blocks(text, _FWD_HDR):
        port = int(m.group(1))
        ports[port] = FwdPortStats(port, *_need(fields, keys, f"forward statistics port {port}"))
    total = None
    for _m, fields in _blocks(text, _ACC_HDR):
        total = FwdPortStats(-1, *_need(fields, keys, "accumulated forward statistics"))
    streams = []
    for m, fields in _blocks(text, _STREAM_HDR):
        rxp, rxq, txp, txq = (int(g) for g in m.groups())
        streams.append(FwdStreamStats(
            rxp, rxq, txp, txq,
            *_need(fields, ("rx-packets", "tx-packets", "tx-dropped"), "stream statistics"),
        ))
    return FwdStats(ports, streams, total)


def parse_xstats(text: str) -> dict[str, int]:
    """Parse `show port xstats N`: {name: value} (names as printed, e.g. rx_q0_packets)."""
    out: dict[str, int] = {}
    in_block = False
    for line in text.splitlines():
        if "NIC extended statistics for port" in line:
            in_block = True
            continue
        if not in_block:
            continue
        m = re.match(r"^\s*([A-Za-z0-9_\[\]\-]+):\s+(\d+)\s*$", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def parse_port_count(text: str) -> int:
    """Parse `show port summary all`: the number of available ports."""
    m = re.search(r"Number of available ports:\s*(\d+)", text)
    if m is None:
        raise ValueError("no 'Number of available ports' line")
    return int(m.group(1))


@dataclass(frozen=True)
class StatsSample:
    """Port counters read at one instant (monotonic seconds, taken half-way through the query)."""

    t: float
    ports: dict[int, PortStats]

    def rates_since(self, earlier: StatsSample) -> dict[int, dict[str, float]]:
        """Per-port rates per second between two samples: rx_pps, tx_pps, rx_bps, tx_bps
        (bits of frame bytes as counted by the PMD, no preamble/IFG), rx_missed_ps."""
        dt = self.t - earlier.t
        if dt <= 0:
            raise ValueError(f"samples not in order: dt={dt}")
        out: dict[int, dict[str, float]] = {}
        for port, now in self.ports.items():
            then = earlier.ports.get(port)
            if then is None:
                continue
            out[port] = {
                "rx_pps": (now.rx_packets - then.rx_packets) / dt,
                "tx_pps": (now.tx_packets - then.tx_packets) / dt,
                "rx_bps": 8 * (now.rx_bytes - then.rx_bytes) / dt,
                "tx_bps": 8 * (now.tx_bytes - then.tx_bytes) / dt,
                "rx_missed_ps": (now.rx_missed - then.rx_missed) / dt,
            }
        return out
