"""bench/malloc_trace.py: snapshots in a directory, and a comparison that names what grew."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

from bench import malloc_trace

_kept: list[bytearray] = []


def _grow() -> None:
    _kept.extend(bytearray(4096) for _ in range(64))


def test_compare_names_the_allocation_site_that_grew(tmp_path: Path) -> None:
    tracemalloc.start(5)
    try:
        malloc_trace.snapshot_to(tmp_path, 0)
        _grow()
        malloc_trace.snapshot_to(tmp_path, 1)
    finally:
        tracemalloc.stop()
        _kept.clear()
    info = json.loads((tmp_path / "snap-001.json").read_text())
    assert info["rss_kib"]["VmRSS"] > 0 and info["objects"] > 0
    assert info["malloc"]["uordblks"] > 0  # glibc's statistics were read
    report = malloc_trace.compare(str(tmp_path / "snap-000.tracemalloc"),
                                  str(tmp_path / "snap-001.tracemalloc"), top=3)
    first = report.splitlines()[1:4]
    assert int(first[0].split()[0]) >= 64 * 4096
    assert any("_grow" in line or "bytearray(4096)" in line for line in first)
