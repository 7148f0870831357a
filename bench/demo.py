"""The default job (`vhostx demo`): the daemon with a DPDK virtio-user client and live figures.

The daemon (pinned to core 1) serves one net device; testpmd's virtio-user (forwarding on core 0)
sends into a sink, receives from a source, or both through an echo. Every second a table shows
the daemon's per-queue rates (packets, bits, kicks, interrupts) beside the client's own counters.
At the end it prints the totals of both sides, which must agree.

Threads: the caller's (main thread: testpmd is tied to the thread that starts it).
"""

from __future__ import annotations

import os
import time
from typing import Any

from vhostx.live import stats_table
from bench.process import DaemonProcess

from .testpmd import Testpmd, TestpmdError, VirtioUserVdev, find_testpmd

__all__ = ["run_demo"]

_CLIENT_MODE = {"sink": "txonly", "source": "rxonly", "echo": "txonly"}


def _cpus() -> tuple[set[int] | None, tuple[int, ...], int]:
    """(daemon cpus, client forwarding lcores, client main lcore) for this machine."""
    n = os.cpu_count() or 1
    if n >= 2:
        return {1}, (0,), 1
    return None, (0,), 0


def run_demo(seconds: float = 20.0, port: str = "sink", size: int = 64) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console()
    if find_testpmd() is None:
        console.print("[red]dpdk-testpmd is missing: run scripts/install.sh first[/red]")
        return 1
    daemon_cpus, fwd, main = _cpus()
    opts: dict[str, Any] = {"frame_size": size} if port == "source" else {}
    d = DaemonProcess(cpus=daemon_cpus)
    sock = d.add_device("net0", port=port, **opts)
    try:
        d.start()
        console.print(f"vhostx daemon pid {d.pid} serving {sock} (port={port}); "
                      f"client: testpmd virtio-user, {_CLIENT_MODE[port]} {size} B")
        with Testpmd([VirtioUserVdev(sock)], forward_mode=_CLIENT_MODE[port], forward_lcores=fwd,
                     main_lcore=main, txpkts=size, name="demo") as client:
            client.start_forwarding()
            prev = d.stats()
            c_prev = client.port_stats()
            t_end = time.monotonic() + seconds
            with Live(console=console, refresh_per_second=4) as live:
                try:
                    while time.monotonic() < t_end:
                        time.sleep(1.0)
                        cur = d.stats()
                        c_cur = client.port_stats()
                        r = c_cur.rates_since(c_prev).get(0, {})
                        foot = Table.grid()
                        foot.add_row(
                            f"client (testpmd virtio-user): TX {r.get('tx_pps', 0) / 1e6:.3f} Mpps, "
                            f"RX {r.get('rx_pps', 0) / 1e6:.3f} Mpps; "
                            f"{max(0.0, t_end - time.monotonic()):.0f} s left (Ctrl-C stops)"
                        )
                        grid = Table.grid()
                        grid.add_row(stats_table(prev, cur))
                        grid.add_row(foot)
                        live.update(grid)
                        prev, c_prev = cur, c_cur
                except KeyboardInterrupt:
                    pass
            client.stop_forwarding()
            time.sleep(0.5)
            totals = client.port_stats().ports.get(0)
        final = d.stop() or {}
        dev = (final.get("devices") or [{}])[0]
        served = sum(q.get("packets", 0) for q in dev.get("queues", {}).values())
        console.print(f"client sent {totals.tx_packets if totals else '?'} and received "
                      f"{totals.rx_packets if totals else '?'} packets; the daemon moved {served} "
                      f"packets; device broken: {dev.get('broken')}")
        return 0
    except TestpmdError as err:
        console.print(f"[red]testpmd failed: {err}[/red]")
        return 1
    finally:
        d.cleanup()
