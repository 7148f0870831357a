"""The backend killed (SIGKILL, or stopped with SIGTERM) and restarted under traffic while a QEMU
guest stays up.

The daemon serves a tap device whose TAP is in a network namespace; the guest's chardev has
`reconnect=1`. A paced TCP transfer from the namespace into the guest and a ping every 0.2 s run
through five kill + restart rounds: the transfer completes with the right md5, and the pings
lost in each round fit in that round's outage (kill -> the new daemon's rings running again) plus
the time the namespace needs to find the guest again. After a kill -9 QEMU gets no answer to
GET_VRING_BASE and resumes every ring from the used index in guest memory (QEMU 7.2
vhost_virtqueue_stop: virtio_queue_restore_last_avail_idx); the new daemon starts from the
SET_VRING_BASE it is given.

Threads: pytest's main thread owns QEMU and the daemons; the pinger and the sender have their own.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.qemu import Guest, VhostUserNic
from bench.restart import PacedSender, Pinger, restart_loop, summarize, wait_device_running

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

BOOT_TIMEOUT = 180.0
RESTARTS = 5
PING_INTERVAL = 0.2
TOTAL_BYTES = 12 << 20
PACED_RATE = 200_000.0  # bytes/s while restarts go on: 5 rounds of ~5 s fit well under the total
# after the rings run again: the namespace's ARP for the guest and the scheduling of a loaded
# two-core machine; a lost ping costs PING_INTERVAL
RECOVERY_SLACK_S = 2.0


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_restarts_keep_tcp_transfer_and_ping(
    guest_image: Any, e2e_dir: Path, netns: Any, vhostx_daemon: Callable[..., Any], subnet: str,
    unique: Callable[[str], str], stop_signal: int,
) -> None:
    """kill9: QEMU gets no answer to GET_VRING_BASE and resumes from the used index in guest
    memory; sigterm: the daemon stops every ring first, with the same outcome for QEMU, and a
    new daemon takes over the same socket."""
    sock = e2e_dir / "net0.sock"
    spec = (f"name=net0,type=net,socket={sock},port=tap,tap_name={unique('vxr')},"
            f"tap_netns={netns.name},tap_address={subnet}.1/24")
    daemon = vhostx_daemon([spec])
    guest_ip = f"{subnet}.2"
    job = (
        f"vx_wait_peer {subnet}.1 120 || exit 10\n"
        "vx_result recv_md5 $(nc -l -p 5002 | md5sum | cut -d' ' -f1)\n"
    )
    nic = VhostUserNic(sock, mac="52:54:00:cb:00:02", ip=f"{guest_ip}/24", reconnect=1)
    with Guest(guest_image, [nic], job, name="restart", workdir=e2e_dir) as g:
        g.wait_ready(BOOT_TIMEOUT)
        wait_device_running(daemon, "net0", 60)
        pinger = Pinger(netns, guest_ip, PING_INTERVAL).start()
        sender = PacedSender(netns, guest_ip, 5002, TOTAL_BYTES, PACED_RATE).start()
        try:
            deadline = time.monotonic() + 60
            while sender.sent == 0 and sender.error is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sender.sent > 0, f"the transfer did not start: {sender.error}"
            daemon, records = restart_loop(
                daemon, lambda: vhostx_daemon([spec]), pinger, restarts=RESTARTS,
                device="net0", sender=sender, stop_signal=stop_signal, log=print)
            # every kill happened while the transfer was under way
            sent_before = [r.bytes_sent_before for r in records]
            assert 0 < sent_before[0] and sent_before[-1] < TOTAL_BYTES, sent_before
            # ... and it moved between any two kills
            assert all(a < b for a, b in itertools.pairwise(sent_before)), sent_before
            t_paced_end = time.monotonic()
            sender.paced.clear()
            ok = sender.join(120)
            print("transfer after the restarts", round(time.monotonic() - t_paced_end, 1), "s")
            assert ok, f"transfer did not finish: {sender.error}\n{g.tail()}"
            assert g.result("recv_md5", 60) == sender.md5
            g.wait_done(60)
        finally:
            sender.paced.clear()
            pinger.stop()
    summary = summarize(records, pinger)
    print(summary)
    for r in records:
        assert r.ping_recovered_s is not None, f"ping never came back after restart {r.index}"
        allowed = (r.rings_running_s + RECOVERY_SLACK_S) / PING_INTERVAL + 1
        assert r.pings_lost <= allowed, (r, allowed)
    # outside the outages nothing was lost
    sent, answered = pinger.totals()
    assert sent - answered <= summary["pings_lost_in_outages"] + 2, summary
    stats = daemon.stats()
    dev = next(d for d in stats["devices"] if d["name"] == "net0")
    assert dev["broken"] is None and dev["counters"]["protocol_errors"] == 0
