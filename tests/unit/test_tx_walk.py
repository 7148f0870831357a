"""The TX loop's one-descriptor walk (vq_walk_tx, inlined in vx_tx.h): a chain of one direct,
device-readable descriptor inside guest memory is read without the general walk; everything
else must end exactly as the general walk ends it (same breakage, same message, same drops)."""

from __future__ import annotations

import pytest
from test_core_env import Env

from virtio import net
from virtio.errors import GuestError

BIG = 1 << 40
HDR = 12
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
MAX_BUF_LEN = 1 << 24


@pytest.fixture
def env():
    e = Env(size=16 << 20)
    yield e
    e.close()


def _one(env: Env, drv, addr: int, length: int, flags: int = 0) -> int:
    """A one-descriptor chain rewritten to (addr, length, flags), published."""
    head = drv.add([(env.alloc(HDR + 60), HDR + 60)])
    drv.write_desc(head, addr, length, flags, 0)
    drv.publish()
    return head


def test_one_descriptor_chains_are_read_like_the_walk(env):
    drv, tx = env.pair(64, index=1)
    frames = [bytes([i]) * (20 + i) for i in range(40)]
    for f in frames:
        g = env.alloc(HDR + len(f))
        env.write(g, bytes(HDR) + f)
        drv.add([(g, HDR + len(f))])
    drv.publish()
    assert net.tx_sink(tx, 64, BIG) == 40
    s = tx.stats()
    assert (s["packets"], s["bytes"], s["dropped"]) == (40, sum(map(len, frames)), 0)


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("outside", "outside guest memory \\(chain {head}\\)"),
        ("across_end", "outside guest memory \\(chain {head}\\)"),
        ("too_long", "descriptor len 16777217 > cap 16777216 in chain {head}"),
    ],
)
def test_hostile_one_descriptor_chain_breaks_the_queue_like_the_walk(env, where, match):
    drv, tx = env.pair(16, index=1)
    addr, length = {
        "outside": (0xFFFF_FFFF_0000, 64),
        "across_end": (env.gpa + env.size - 32, 64),
        "too_long": (env.gpa, MAX_BUF_LEN + 1),
    }[where]
    head = _one(env, drv, addr, length)
    with pytest.raises(GuestError, match=match.format(head=head)):
        net.tx_sink(tx, 16, BIG)
    assert tx.broken


@pytest.mark.parametrize("flags", [F_WRITE, 0])
def test_writable_or_empty_one_descriptor_chain_is_dropped_not_fatal(env, flags):
    drv, tx = env.pair(16, index=1)
    _one(env, drv, env.alloc(64), 64 if flags else 0, flags)
    g = env.alloc(HDR + 60)
    env.write(g, bytes(HDR) + b"y" * 60)
    drv.add([(g, HDR + 60)])
    drv.publish()
    assert net.tx_sink(tx, 16, BIG) == 2  # both completed
    s = tx.stats()
    assert (s["packets"], s["dropped"]) == (1, 1)
    assert not tx.broken
