"""The benchmark harness: scenarios as TOML data, peers, interleaved runs, tables and plots.

Modules (a module imports only modules above it in this list):
- ``scenario``: parse and validate a scenario file into frozen dataclasses; expand sweeps into
  cases. Pure; no processes.
- ``stats``: percentiles, median ratio with its spread, CDF points. Pure.
- ``system``: the dimensions of a run (commit, machine, versions) and CPU time per thread / core
  from /proc.
- ``modes``: the machine's two speeds: each run's mode from a DPDK-vs-DPDK reference probe (or
  clustering), pairs within one mode, runs short of same-mode pairs.
- ``pingpong``: the guest-model clients built on ``virtio.frontend`` (ping-pong latency with
  timestamps in the frames, paced streams, idle connections).
- ``backends``: start/stop a backend under test (the vhostx daemon in a mode, DPDK's vhost PMD in
  testpmd) and read its counters.
- ``window``: snapshots at both ends of a measurement window and the metrics every run derives.
- ``slice_modes``: rates by machine mode from the window slices of every run, pooled per case.
- ``report``: summary (ratios vs the reference backend), JSON and markdown.
- ``runner``: one run (backend + client, warm-up, window, snapshot) and the interleaved loop,
  results written incrementally, Ctrl-C safe.
- ``plots``: PNG figures with matplotlib (Agg).

Threads: everything runs on the caller's (main) thread: testpmd and QEMU children are tied to the
thread that starts them (PR_SET_PDEATHSIG).
"""

__all__: list[str] = []
