"""The benchmark harness: scenarios as TOML data, peers, interleaved runs, tables and plots.

Modules (imports point downwards in this list):
- ``scenario``: parse and validate a scenario file into frozen dataclasses; expand sweeps into
  cases. Pure; no processes.
- ``stats``: percentiles, median ratio with its spread, CDF points. Pure.
- ``system``: the dimensions of a run (commit, machine, versions) and CPU time per thread / core
  from /proc.
- ``pingpong``: the guest-model clients built on ``virtio.frontend`` (ping-pong latency with
  timestamps in the frames, paced streams, idle connections).
- ``backends``: start/stop a backend under test (the vhostx daemon in a mode, DPDK's vhost PMD in
  testpmd) and read its counters.
- ``runner``: one run (backend + client, warm-up, window, snapshot) and the interleaved loop,
  results written incrementally, Ctrl-C safe.
- ``report``: summary (ratios vs the reference backend), JSON and markdown.
- ``plots``: PNG figures with matplotlib (Agg).

Threads: everything runs on the caller's (main) thread: testpmd and QEMU children are tied to the
thread that starts them (PR_SET_PDEATHSIG).
"""

__all__: list[str] = []
