"""Shared fixtures: a factory of real daemon processes that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from bench.process import DaemonProcess


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(**kw: object) -> DaemonProcess:
        d = DaemonProcess(**kw)  # type: ignore[arg-type]
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
