"""Unit tests of bench.testpmd_parse's parsers on text captured from dpdk-testpmd 22.11 (Debian
dpdk-dev 22.11.11) in interactive mode: a virtio-user client with two ports of two queue pairs in
txonly (--txpkts=60,4) against a net_vhost peer in rxonly. No process is started here.

Threads: pytest's main thread only.
"""

from __future__ import annotations

import pytest

from bench.harness.backends import guest_mapping_rss_kb
from bench.testpmd import VhostVdev, VirtioUserVdev
from bench.testpmd_parse import (
    StatsSample,
    parse_fwd_stats,
    parse_port_count,
    parse_port_stats,
    parse_xstats,
)

__all__: list[str] = []

# ---- captured replies (trailing spaces as testpmd prints them) -------------------------------

CLIENT_PORT_STATS = """\

  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 312161     TX-errors: 0          TX-bytes:  19978304

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 312000     TX-errors: 0          TX-bytes:  19968000

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
"""

CLIENT_STOP = """\
Telling cores to stop...
Waiting for lcores to finish...

  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 1/Queue= 0 -------
  RX-packets: 0              TX-packets: 168548         TX-dropped: 1923452       

  ------- Forward Stats for RX Port= 1/Queue= 0 -> TX Port= 0/Queue= 0 -------
  RX-packets: 0              TX-packets: 168581         TX-dropped: 1923419       

  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 1/Queue= 1 -------
  RX-packets: 0              TX-packets: 168462         TX-dropped: 1923538       

  ------- Forward Stats for RX Port= 1/Queue= 1 -> TX Port= 0/Queue= 1 -------
  RX-packets: 0              TX-packets: 168558         TX-dropped: 1923442       

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 337139         TX-dropped: 3846861       TX-total: 4184000
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 337010         TX-dropped: 3846990       TX-total: 4184000
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 674149         TX-dropped: 7693851       TX-total: 8368000
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""

PEER_STOP = """\
Telling cores to stop...
Waiting for lcores to finish...

  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 1/Queue= 0 -------
  RX-packets: 168581         TX-packets: 0              TX-dropped: 0             

  ------- Forward Stats for RX Port= 1/Queue= 0 -> TX Port= 0/Queue= 0 -------
  RX-packets: 168548         TX-packets: 0              TX-dropped: 0             

  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 1/Queue= 1 -------
  RX-packets: 168558         TX-packets: 0              TX-dropped: 0             

  ------- Forward Stats for RX Port= 1/Queue= 1 -> TX Port= 0/Queue= 1 -------
  RX-packets: 168462         TX-packets: 0              TX-dropped: 0             

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 337139         RX-dropped: 0             RX-total: 337139
  TX-packets: 0              TX-dropped: 0             TX-total: 0
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 337010         RX-dropped: 0             RX-total: 337010
  TX-packets: 0              TX-dropped: 0             TX-total: 0
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 674149         RX-dropped: 0             RX-total: 674149
  TX-packets: 0              TX-dropped: 0             TX-total: 0
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""

PEER_XSTATS = """\
###### NIC extended statistics for port 1 
rx_good_packets: 336670
tx_good_packets: 0
rx_good_bytes: 21546880
tx_good_bytes: 0
rx_missed_errors: 0
rx_errors: 0
tx_errors: 0
rx_mbuf_allocation_errors: 0
rx_q0_packets: 168378
rx_q0_bytes: 10776192
rx_q0_errors: 0
rx_q1_packets: 168292
rx_q1_bytes: 10770688
rx_q1_errors: 0
tx_q0_packets: 0
tx_q0_bytes: 0
tx_q1_packets: 0
tx_q1_bytes: 0
rx_q0_good_packets: 168378
rx_q0_good_bytes: 10776192
rx_q0_multicast_packets: 0
rx_q0_broadcast_packets: 0
rx_q0_undersize_packets: 0
rx_q0_size_64_packets: 168378
rx_q0_size_65_127_packets: 0
rx_q0_size_128_255_packets: 0
rx_q0_size_256_511_packets: 0
rx_q0_size_512_1023_packets: 0
rx_q0_size_1024_1518_packets: 0
"""

CLIENT_SUMMARY = """\
Number of available ports: 2
Port MAC Address       Name         Driver         Status   Link
0    A2:B5:DE:75:75:F6 net_virtio_user0 net_virtio_user up       Unknown
1    D2:6D:03:37:CF:80 net_virtio_user1 net_virtio_user up       Unknown
"""

PEER_CLEAR = """\

  NIC statistics for port 0 cleared

  NIC statistics for port 1 cleared
"""

# /proc/PID/smaps of the vhostx daemon with one testpmd client (-m 256, --no-huge) connected,
# four mappings kept (python binary, heap, anonymous, the client's memory), some fields dropped.
DAEMON_SMAPS = """\
558c91344000-558c91345000 r--p 00000000 fe:00 26723                      /root/.pyenv/versions/3.11.7/bin/python3.11
Size:                  4 kB
Rss:                   4 kB
Pss:                   0 kB
Shared_Clean:          4 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd mr mw me 
558caed5a000-558caf2a2000 rw-p 00000000 00:00 0                          [heap]
Size:               5408 kB
Rss:                5360 kB
Pss:                5360 kB
Shared_Clean:          0 kB
Private_Dirty:      5360 kB
Anonymous:          5360 kB
VmFlags: rd wr mr mw me ac 
7f847c000000-7f847c021000 rw-p 00000000 00:00 0 
Size:                132 kB
Rss:                   8 kB
Pss:                   8 kB
Shared_Clean:          0 kB
Private_Dirty:         8 kB
Anonymous:             8 kB
VmFlags: rd wr mr mw me nr 
7f846c000000-7f847c000000 rw-s 00000000 00:01 8384                       /memfd:nohuge (deleted)
Size:             262144 kB
Rss:                2816 kB
Pss:                1408 kB
Shared_Clean:       2708 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd wr sh mr mw me ms 
"""

# Asynchronous lines testpmd and the vhost library print from other threads, as captured in a
# peer's log while a client connected; they can land in the middle of a reply.
ASYNC_LINES = """\
VHOST_CONFIG: (/tmp/tp/peer.sock) read message VHOST_USER_GET_VRING_BASE

Port 0: link state change event
VHOST_CONFIG: (/tmp/tp/peer.sock) vring base idx:0 file:0
"""


def _interleave(text: str, after_line: int) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(lines[:after_line]) + ASYNC_LINES + "".join(lines[after_line:])


# ---- tests ------------------------------------------------------------------------------------


def test_port_stats_two_ports() -> None:
    stats = parse_port_stats(CLIENT_PORT_STATS)
    assert sorted(stats) == [0, 1]
    p0, p1 = stats[0], stats[1]
    assert (p0.tx_packets, p0.tx_bytes, p0.tx_errors) == (312161, 19978304, 0)
    assert (p1.tx_packets, p1.tx_bytes) == (312000, 19968000)
    assert p0.rx_packets == p0.rx_missed == p0.rx_bytes == p0.rx_errors == p0.rx_nombuf == 0
    assert p0.tx_bytes == 64 * p0.tx_packets  # --txpkts=60,4


def test_port_stats_throughput_lines_do_not_leak() -> None:
    # "Rx-pps: 0" / "Tx-bps: 0" follow the counters inside the same block: they must not be
    # mistaken for RX-packets / TX-bytes.
    stats = parse_port_stats(CLIENT_PORT_STATS)
    assert stats[0].tx_packets != 0


def test_port_stats_with_async_lines_inside_the_block() -> None:
    text = _interleave(CLIENT_PORT_STATS, 3)  # after the RX-packets line of port 0
    assert parse_port_stats(text) == parse_port_stats(CLIENT_PORT_STATS)


def test_port_stats_empty_reply() -> None:
    assert parse_port_stats(PEER_CLEAR) == {}
    assert parse_port_stats("") == {}


def test_port_stats_truncated_block_raises() -> None:
    truncated = "\n".join(CLIENT_PORT_STATS.splitlines()[:4])  # no TX line
    with pytest.raises(ValueError, match="port 0"):
        parse_port_stats(truncated)


def test_fwd_stats_client_stop() -> None:
    fwd = parse_fwd_stats(CLIENT_STOP)
    assert sorted(fwd.ports) == [0, 1]
    assert fwd.ports[0].tx_packets == 337139
    assert fwd.ports[0].tx_dropped == 3846861
    assert fwd.ports[0].tx_total == fwd.ports[0].tx_packets + fwd.ports[0].tx_dropped
    assert fwd.total is not None
    assert fwd.total.tx_packets == sum(p.tx_packets for p in fwd.ports.values())
    assert len(fwd.streams) == 4
    s = fwd.streams[0]
    assert (s.rx_port, s.rx_queue, s.tx_port, s.tx_queue) == (0, 0, 1, 0)
    assert (s.rx_packets, s.tx_packets, s.tx_dropped) == (0, 168548, 1923452)
    # per TX queue, the streams add up to the port totals
    by_tx_port: dict[int, int] = {}
    for st in fwd.streams:
        by_tx_port[st.tx_port] = by_tx_port.get(st.tx_port, 0) + st.tx_packets
    assert by_tx_port == {p: fwd.ports[p].tx_packets for p in fwd.ports}


def test_fwd_stats_peer_stop_counts_every_client_packet() -> None:
    client, peer = parse_fwd_stats(CLIENT_STOP), parse_fwd_stats(PEER_STOP)
    assert peer.total is not None and client.total is not None
    assert peer.total.rx_packets == client.total.tx_packets == 674149
    assert {(s.rx_port, s.rx_queue) for s in peer.streams} == {(0, 0), (1, 0), (0, 1), (1, 1)}
    assert all(s.rx_packets > 0 for s in peer.streams)


def test_fwd_stats_with_async_lines() -> None:
    assert parse_fwd_stats(_interleave(PEER_STOP, 8)) == parse_fwd_stats(PEER_STOP)


def test_xstats() -> None:
    x = parse_xstats(PEER_XSTATS)
    assert x["rx_good_packets"] == 336670
    assert x["rx_q0_packets"] + x["rx_q1_packets"] == x["rx_good_packets"]
    assert x["rx_q0_size_64_packets"] == x["rx_q0_packets"]
    assert "NIC" not in " ".join(x)


def test_port_count() -> None:
    assert parse_port_count(CLIENT_SUMMARY) == 2
    with pytest.raises(ValueError):
        parse_port_count("testpmd: unknown command")


def test_rates_since() -> None:
    a = StatsSample(10.0, parse_port_stats(CLIENT_PORT_STATS))
    b_ports = {
        p: s.__class__(**{**s.__dict__, "tx_packets": s.tx_packets + 1000,
                          "tx_bytes": s.tx_bytes + 64000})
        for p, s in a.ports.items()
    }
    b = StatsSample(12.0, b_ports)
    rates = b.rates_since(a)
    assert rates[0]["tx_pps"] == pytest.approx(500.0)
    assert rates[0]["tx_bps"] == pytest.approx(8 * 32000.0)
    assert rates[1]["rx_pps"] == 0.0
    with pytest.raises(ValueError):
        a.rates_since(b)


def test_vdev_devargs() -> None:
    assert VhostVdev("/s.sock", queues=2).devarg(0) == "net_vhost0,iface=/s.sock,queues=2"
    assert VhostVdev("/s.sock", client=True).devarg(1) == "net_vhost1,iface=/s.sock,queues=1,client=1"
    v = VirtioUserVdev("/s.sock", queues=2, queue_size=1024, mrg_rxbuf=False, in_order=True,
                       packed_vq=True, server=True)
    assert v.devarg(3) == ("net_virtio_user3,path=/s.sock,queues=2,queue_size=1024,"
                           "mrg_rxbuf=0,in_order=1,packed_vq=1,server=1")
    assert VirtioUserVdev("/s.sock").devarg(0) == "net_virtio_user0,path=/s.sock,queues=1"


def test_guest_mapping_rss_from_daemon_smaps() -> None:
    # only the client's memfd counts as guest memory; heap and anonymous mappings do not
    assert guest_mapping_rss_kb(DAEMON_SMAPS) == (2816, 1)
    deleted_shm = DAEMON_SMAPS.replace("/memfd:nohuge (deleted)", "/dev/shm/guest0")
    assert guest_mapping_rss_kb(deleted_shm) == (2816, 1)
    assert guest_mapping_rss_kb("") == (0, 0)
