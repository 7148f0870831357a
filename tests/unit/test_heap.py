"""vhostx.heap: the daemon gives the heap's free pages back every heap_trim_s seconds."""

from __future__ import annotations

import asyncio

import pytest

from vhostx import heap
from vhostx.daemon import new_registry
from virtio.errors import ConfigError

pytestmark = pytest.mark.skipif(heap._TRIM is None, reason="no glibc malloc_trim")


def test_trim_now_counts_each_call_and_says_whether_memory_went_back() -> None:
    t = heap.HeapTrimmer(new_registry())
    junk = [bytearray(200) for _ in range(100_000)]  # ~25 MB of small blocks in the C heap
    del junk
    assert t.trim_now() is True  # the freed blocks' pages go back
    t.trim_now()
    assert t.stats()["trims"] == 2 and 1 <= t.stats()["released"] <= 2


async def _trims_after(reg, seconds: float) -> int:
    t = heap.HeapTrimmer(reg)
    task = asyncio.create_task(t.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return t.trims


def test_the_loop_trims_every_heap_trim_s_and_not_at_all_with_zero() -> None:
    reg = new_registry()
    reg.set(heap.HEAP_TRIM_S.name, 1)
    assert asyncio.run(_trims_after(reg, 2.6)) >= 1
    reg.set(heap.HEAP_TRIM_S.name, 0)
    assert asyncio.run(_trims_after(reg, 2.6)) == 0


def test_heap_trim_s_out_of_range_is_refused_with_the_range() -> None:
    reg = new_registry()
    with pytest.raises(ConfigError, match="3600"):
        reg.set(heap.HEAP_TRIM_S.name, 7200)
