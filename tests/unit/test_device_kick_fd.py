"""SET_VRING_KICK with an fd epoll cannot watch (a memfd, /dev/null) is the frontend's error.

Before the check, such a kick fd was taken, and the ring's start then failed in the worker
(epoll_ctl: EPERM) as an internal error of the daemon, logged with a traceback, instead of a
protocol error naming the fd kind.
"""

from __future__ import annotations

import os

import pytest
from test_device_repeats import Wire, _open, wire  # noqa: F401 - the fixture

from virtio import vhost_user as vu
from virtio.errors import RemoteProtocolError
from virtio.vhost_user import Request as R


def _kinds() -> dict[str, int]:
    mem = os.memfd_create("vx-kick-test")
    return {"a regular file": mem, "a character device": os.open(os.devnull, os.O_RDONLY)}


@pytest.mark.parametrize("kind", ["a regular file", "a character device"])
def test_kick_fd_epoll_cannot_watch_is_a_protocol_error_not_an_internal_error(
    wire: Wire, kind: str  # noqa: F811
) -> None:
    wire.negotiate()
    fds = _kinds()
    try:
        fd = os.dup(fds[kind])
        with pytest.raises(RemoteProtocolError, match=f"pollable kick fd .*got {kind}"):
            wire.send(R.SET_VRING_KICK, vu.VringFile(0), (fd,))
        assert not _open(fd)  # the message's fd was closed, not kept
        assert wire.dev.vrings[0].kick_fd == -1
    finally:
        for f in fds.values():
            os.close(f)


def test_eventfd_and_pipe_kick_fds_are_taken(wire: Wire) -> None:  # noqa: F811
    wire.negotiate()
    ev = os.eventfd(0)
    r, w = os.pipe()
    try:
        wire.send(R.SET_VRING_KICK, vu.VringFile(0), (os.dup(ev),))
        wire.send(R.SET_VRING_KICK, vu.VringFile(1), (os.dup(r),))
        assert wire.dev.vrings[0].kick_fd >= 0 and wire.dev.vrings[1].kick_fd >= 0
    finally:
        for f in (ev, r, w):
            os.close(f)
