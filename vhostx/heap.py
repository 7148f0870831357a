"""Hand the free memory inside the C heap back to the system from time to time.

The asyncio thread mixes long- and short-lived allocations of many sizes (a connection's
messages, its regions, its device state); glibc keeps what they free inside the heap, so the
daemon's RSS creeps up under a frontend that connects and disconnects all day although the
memory in use stays flat (docs/reliability.md, "A hostile frontend at scale"). Every
`heap_trim_s` seconds `HeapTrimmer` calls glibc's malloc_trim(0), which releases the whole
free pages of the heap and of every arena (MADV_DONTNEED): a walk of a heap of a few MiB, well
under a millisecond, on the asyncio thread. Without glibc (no malloc_trim) it does nothing.

Threads: `HeapTrimmer.run` is a task of the daemon's asyncio loop; `malloc_trim` may be called
from any thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from typing import Any

from iosched.params import Param, Registry, Scope

__all__ = ["HEAP_TRIM_S", "PARAMS", "HeapTrimmer", "malloc_trim"]

log = logging.getLogger("vhostx.heap")

HEAP_TRIM_S = Param(
    "heap_trim_s", int, 30,
    "every this many seconds give the free pages inside the C heap back to the system "
    "(glibc malloc_trim); 0 = never",
    unit="s", min=0, max=3600, runtime=True, scope=Scope.GLOBAL,
)  # fmt: skip
PARAMS: tuple[Param, ...] = (HEAP_TRIM_S,)
"""The parameters this module reads."""

_TICK_S = 1.0  # the loop looks at heap_trim_s this often (a run-time change applies within it)


def _libc_trim() -> Any:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _libc_trim()


def malloc_trim() -> bool:
    """glibc's malloc_trim(0); True if some memory was released, False if none or no glibc."""
    return bool(_TRIM(0)) if _TRIM is not None else False


class HeapTrimmer:
    """Trims the heap every `heap_trim_s` seconds (read anew each round: settable at run time)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.trims = 0  # malloc_trim calls made
        self.released = 0  # of them, how many released memory

    def stats(self) -> dict[str, int]:
        return {"trims": self.trims, "released": self.released}

    def trim_now(self) -> bool:
        released = malloc_trim()
        self.trims += 1
        self.released += int(released)
        return released

    async def run(self) -> None:
        waited = 0.0
        while True:
            await asyncio.sleep(_TICK_S)
            every = self.registry.get(HEAP_TRIM_S.name)
            waited += _TICK_S
            if every and _TRIM is not None and waited >= every:
                waited = 0.0
                self.trim_now()
