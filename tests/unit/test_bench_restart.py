"""bench/restart.py and bench/soak.py pieces that need no guest: the ICMP checksum, the readiness
test on daemon statistics, the summary of restart records, and /proc sampling."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest

from bench.restart import Restart, _checksum, device_running, summarize
from bench.soak import process_sample


def test_icmp_checksum_of_a_packet_with_its_checksum_is_zero() -> None:
    header = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 7)
    body = b"vhostx restart pinger"  # odd length: padded
    c = _checksum(header + body)
    packet = header[:2] + struct.pack("!H", c) + header[4:] + body
    assert _checksum(packet) == 0
    assert c != 0


def _stats(**dev: Any) -> dict[str, Any]:
    base = {"name": "net0", "connected": True, "broken": None, "queues": {"0": {}, "1": {}}}
    return {"devices": [{**base, **dev}]}


@pytest.mark.parametrize(("dev", "running"), [
    ({}, True),
    ({"connected": False}, False),
    ({"broken": "net0.tx0: avail idx jumped"}, False),
    ({"queues": {"1": {}}}, False),
])
def test_device_running_needs_connection_both_rings_and_no_breakage(
        dev: dict[str, Any], running: bool) -> None:
    assert device_running(_stats(**dev), "net0") is running
    assert device_running(_stats(**dev), "other") is False


class _Pinger:
    send_errors = 3

    def totals(self) -> tuple[int, int]:
        return 100, 90


def test_summarize_counts_losses_and_unrecovered_outages() -> None:
    records = [Restart(1, 0.0, 0.5, 1.0, 1.5, 1.6, 4, 100, 2.0),
               Restart(2, 0.1, 0.7, 2.0, None, None, 6)]
    s = summarize(records, _Pinger())  # type: ignore[arg-type]
    assert s["restarts"] == 2 and s["pings_lost_in_outages"] == 10 and s["unrecovered"] == 1
    assert s["rings_running_s"] == {"min": 1.0, "median": 2.0, "p90": 2.0, "max": 2.0}
    assert s["ping_recovered_s"]["max"] == 1.5
    assert s["transfer_resumed_s"] == {"min": 2.0, "median": 2.0, "p90": 2.0, "max": 2.0}
    assert s["ping_send_errors"] == 3 and len(s["records"]) == 2


def test_process_sample_reads_rss_and_fds_of_this_process() -> None:
    before = process_sample(os.getpid())
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        after = process_sample(os.getpid())
    finally:
        os.close(fd)
    assert before["rss_kib"] > 0
    assert after["fds"] == before["fds"] + 1
