"""A load generator's driver thread with its whole loop in C (vx_drvserve.c): the pairs of a
``PairTurns`` served until a deadline, learning which pairs have RX completions either from
one call eventfd per RX queue under one epoll (``eventfd_server``) or from a posted-interrupt
domain (``posted_server``: the bitmap taken, re-taken for up to ``spin_us`` when empty, the
wake eventfd slept on only after the sleep protocol; ``spin_us`` is the posted path's only: on
the eventfd path every look is a syscall). Between the two only the notification path
differs; the per-packet work is vx_drvpair's in both, and no Python runs until the deadline.

``PairServer.run(seconds)`` returns the frames received; ``syscalls`` (epoll_wait, poll,
eventfd reads; the pairs' kicks are ``PairTurns.kicks``), ``wakeups``, ``rounds`` and
``sleeps`` count what the loop did, over every run.
Threads: the thread that owns the PairTurns (one at a time).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from virtio._vx_core import ffi, lib
from virtio.driver.pairs import PairTurns
from virtio.driver.posted import PostedDomain
from virtio.errors import ConfigError

__all__ = ["PairServer", "eventfd_server", "posted_server"]

MAX_PAIRS = int(lib.VX_DRVSERVE_MAX_PAIRS)
_NO_PAIR = int(lib.VX_DRVSERVE_NO_PAIR)


class PairServer:
    """The C loop over ``turns``' pairs; made by eventfd_server or posted_server."""

    def __init__(self, turns: PairTurns, *, max_wait_ms: int = 50, spin_us: int = 0) -> None:
        if not 1 <= turns.pairs <= MAX_PAIRS:
            raise ConfigError(f"a driver loop serves 1..{MAX_PAIRS} queue pairs, got "
                              f"{turns.pairs}")
        if not 1 <= max_wait_ms <= 60_000:
            raise ConfigError(f"max_wait_ms: allowed 1..60000, got {max_wait_ms}")
        if not 0 <= spin_us <= 100_000:
            raise ConfigError(f"spin_us: allowed 0..100000, got {spin_us}")
        self.turns = turns
        self._s: Any = ffi.new("struct vx_drvserve *")
        self._s.pairs = turns._c
        self._s.npairs = turns.pairs
        self._s.max_wait_ms = max_wait_ms
        self._s.spin_ns = 1000 * spin_us
        self._s.epfd = -1
        self._s.wake_fd = -1
        self._call_fds: Any = None  # the eventfd path's fd array, kept alive with the loop

    def run(self, seconds: float) -> int:
        """Serve until `seconds` from now; frames received."""
        until = time.monotonic_ns() + max(0, int(seconds * 1e9))
        r = int(lib.vx_drvserve_run(self._s, until))
        if r < 0:
            p = int(self._s.err_pair)
            if p >= self.turns.pairs:  # the loop's own wait failed
                raise OSError(-r, f"driver loop: {os.strerror(-r)}")
            raise self.turns.error(p, r)
        return r

    @property
    def syscalls(self) -> int:
        return int(self._s.syscalls)

    @property
    def wakeups(self) -> int:
        return int(self._s.wakeups)

    @property
    def rounds(self) -> int:
        return int(self._s.rounds)

    @property
    def sleeps(self) -> int:
        return int(self._s.sleeps)

    def close(self) -> None:
        if self._s.epfd >= 0:
            os.close(int(self._s.epfd))
            self._s.epfd = -1


def eventfd_server(turns: PairTurns, call_fds: Sequence[int], **kw: Any) -> PairServer:
    """Pair p learns of completions from call_fds[p] (its RX queue's call eventfd)."""
    if len(call_fds) != turns.pairs:
        raise ConfigError(f"one RX call eventfd per pair: {turns.pairs}, got {len(call_fds)}")
    if kw.get("spin_us"):
        raise ConfigError("spin_us is the posted path's: on the eventfd path each look is an "
                          "epoll_wait")
    s = PairServer(turns, **kw)
    s._call_fds = ffi.new("int32_t[]", list(call_fds))
    s._s.call_fds = s._call_fds
    r = int(lib.vx_drvserve_epoll(s._s))
    if r < 0:
        raise OSError(-r, f"epoll over the call eventfds: {os.strerror(-r)}")
    return s


def posted_server(turns: PairTurns, domain: PostedDomain, rx_vring_of_pair: Sequence[int],
                  **kw: Any) -> PairServer:
    """Pair p's completions are the domain's request bit rx_vring_of_pair[p]."""
    if len(rx_vring_of_pair) != turns.pairs:
        raise ConfigError(f"one RX vring per pair: {turns.pairs}, got {len(rx_vring_of_pair)}")
    missing = sorted(set(rx_vring_of_pair) - set(domain.queues))
    if missing:
        raise ConfigError(f"vrings {missing} are not in the domain's {domain.queues}")
    s = PairServer(turns, **kw)
    for b in range(len(s._s.pair_of_bit)):
        s._s.pair_of_bit[b] = _NO_PAIR
    for p, v in enumerate(rx_vring_of_pair):
        s._s.pair_of_bit[v] = p
    s._s.pi = domain.desc
    s._s.wake_fd = domain.wake_fd
    return s
