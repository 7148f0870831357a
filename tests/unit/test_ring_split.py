"""Split ring: the pure-Python DriverQueue against the C DeviceQueue on one memfd-backed memory.

Random add/publish/serve/get_used sequences (direct and indirect chains, indexes near the 16-bit
wrap), kick and interrupt suppression against the spec's formulas, and hostile descriptors that
must break only their own queue.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_env import Env

from virtio import net
from virtio.driver.split import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    DriverQueue,
    vring_need_event,
)
from virtio.errors import GuestError
from virtio.ring import DeviceQueue, NotifyOutcome

HDR = 12
START_IDX = st.sampled_from([0, 1, 100, 65535 - 300, 65535 - 5, 65535])


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK)


def _irqs(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


# ---- random sequences ---------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"), st.integers(1, 4), st.integers(0, 2), st.booleans(), st.integers(0, 200)
        ),
        st.tuples(st.just("publish")),
        st.tuples(st.just("serve"), st.integers(0, 40)),
        st.tuples(st.just("used")),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, start=START_IDX, event_idx=st.booleans(), size=st.sampled_from([4, 16, 64]))
def test_random_tx_sequences(ops, start, event_idx, size):
    env = Env(size=1 << 20)
    try:
        drv, dev = env.pair(size, event_idx=event_idx, start_idx=start)
        pool = env.alloc(64 * 256)
        added: list[int] = []  # heads in avail order, not yet consumed
        published = 0  # how many of `added` are published
        consumed: list[int] = []  # heads consumed by the device, not yet seen in used
        payload_bytes: dict[int, int] = {}
        total_pkts = total_bytes = 0
        for op in ops:
            if op[0] == "add":
                _, nout, nin, indirect, plen = op
                indirect = indirect and nout + nin <= size
                need = 1 if indirect else nout + nin
                if drv.num_free < need:
                    continue
                outs = [(pool + 64 * (i % 256), 64) for i in range(nout)]
                outs[0] = (pool, HDR + min(plen, 52))
                ins = [(pool + 64 * (100 + i), 64) for i in range(nin)]
                head = drv.add(outs, ins, indirect=indirect)
                added.append(head)
                payload_bytes[head] = sum(n for _, n in outs) - HDR
            elif op[0] == "publish":
                drv.publish()
                published = len(added)
            elif op[0] == "serve":
                avail = published
                assert dev.pending() == avail
                n = net.tx_sink(dev, op[1], 1 << 40)
                assert n == min(op[1], avail)
                for h in added[:n]:
                    total_pkts += 1
                    total_bytes += payload_bytes[h]
                consumed += added[:n]
                del added[:n]
                published -= n
            else:
                used = drv.get_used()
                assert [h for h, _ in used] == consumed
                assert all(length == 0 for _, length in used)
                consumed = []
        assert dev.broken is None
        st_ = dev.stats()
        assert st_["packets"] == total_pkts and st_["bytes"] == total_bytes
        assert dev.last_avail_idx == (start + total_pkts) & 0xFFFF
        assert dev.used_idx == dev.last_avail_idx  # every consumed chain is published
    finally:
        env.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=START_IDX,
    chains=st.lists(
        st.tuples(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.booleans()),
        min_size=1,
        max_size=20,
    ),
    frame_len=st.integers(0, 100),
)
def test_rx_fill_writes_header_and_frame(start, chains, frame_len):
    env = Env(size=1 << 20)
    try:
        drv, dev = env.pair(128, start_idx=start)
        frame = bytes((i * 7 + 3) & 0xFF for i in range(frame_len))
        bufs: dict[int, list[tuple[int, int]]] = {}
        for lens, indirect in chains:
            ins = [(env.alloc(n, 8), n) for n in lens]
            indirect = indirect and len(ins) <= 128
            bufs[drv.add([], ins, indirect=indirect)] = ins
        drv.publish()
        want = HDR + frame_len
        n = net.rx_fill(dev, frame, len(chains))
        fits = [sum(n for _, n in bufs[h]) >= want for h in bufs]
        expect = fits.index(False) if False in fits else len(chains)
        assert n == expect
        if expect < len(chains):
            assert dev.stats()["too_big"] == 1
            assert dev.pending() == len(chains) - expect  # the short chain stays in the ring
        for head, length in drv.get_used():
            assert length == want
            data = b"".join(env.read(g, k) for g, k in bufs[head])[:want]
            assert data == bytes(10) + b"\x01\x00" + frame
    finally:
        env.close()


# ---- notification suppression -------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 65533])
def test_kick_suppression_flags(env, start):
    drv, dev = env.pair(16, start_idx=start)
    buf = env.alloc(64)
    dev.set_notify(False)
    drv.add([(buf, 64)])
    assert drv.publish() is False
    dev.set_notify(True)
    drv.add([(buf, 64)])
    assert drv.publish() is True
    assert dev.pending() == 2


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    start=START_IDX,
    rounds=st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.integers(0, 6)), max_size=30),
)
def test_kick_suppression_event_idx(env, start, rounds):
    """publish() says kick exactly when vring_need_event(avail_event, new, old) holds."""
    env2 = Env(size=1 << 20)
    try:
        drv, dev = env2.pair(16, event_idx=True, start_idx=start)
        buf = env2.alloc(64)
        dev.set_notify(True)
        assert drv.read_avail_event() == start
        for nadd, reenable, serve in rounds:
            nadd = min(nadd, drv.num_free)
            old = drv.avail_idx
            for _ in range(nadd):
                drv.add([(buf, 64)])
            event = drv.read_avail_event()
            kick = drv.publish()
            assert kick == (nadd > 0 and vring_need_event(event, (old + nadd) & 0xFFFF, old))
            if reenable:
                dev.set_notify(True)
                assert drv.read_avail_event() == drv.avail_idx
            else:
                dev.set_notify(False)
            net.tx_sink(dev, serve, 1 << 40)
            drv.get_used()
    finally:
        env2.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=START_IDX,
    event_idx=st.booleans(),
    rounds=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 65535), st.booleans()), max_size=30
    ),
)
def test_interrupt_suppression(start, event_idx, rounds):
    """The device writes the call fd exactly when the spec says the driver wants it."""
    env = Env(size=1 << 20)
    call = _eventfd()
    try:
        drv, dev = env.pair(16, event_idx=event_idx, start_idx=start, call_fd=call)
        buf = env.alloc(64)
        old = None  # used idx at the last decision (None: first decision always interrupts)
        sent = suppressed = 0
        for nadd, ev_delta, enabled in rounds:
            nadd = min(nadd, drv.num_free)
            for _ in range(nadd):
                drv.add([(buf, 64)])
            drv.publish()
            if event_idx:
                drv._write_used_event((drv.last_used + ev_delta) & 0xFFFF)
            else:
                drv.set_interrupts(enabled)
            before = dev.used_idx
            n = net.tx_sink(dev, 100, 1 << 40)
            new = dev.used_idx
            assert new == (before + n) & 0xFFFF
            if n:
                if not event_idx:
                    want = enabled
                elif old is None:
                    want = True  # no decision yet: the device cannot trust used_event's history
                else:
                    want = vring_need_event(drv.read_used_event(), new, old)
                if old is not None:
                    assert want == drv.device_wants_interrupt_check(old, new)
                got = _irqs(call)
                assert got == (1 if want else 0), (old, new, drv.read_used_event())
                sent += want
                suppressed += not want
                old = new
            else:
                assert _irqs(call) == 0
            drv.get_used()
        s = dev.stats()
        assert (s["interrupts"], s["interrupts_suppressed"]) == (sent, suppressed)
    finally:
        os.close(call)
        env.close()


def test_signal_publishes_nothing_twice(env):
    call = _eventfd()
    drv, dev = env.pair(8, call_fd=call)
    assert dev.signal() is False  # nothing used yet
    drv.add([(env.alloc(64), 64)])
    drv.publish()
    assert net.tx_sink(dev, 8, 1 << 20) == 1
    assert _irqs(call) == 1
    assert dev.signal() is False  # already signalled
    os.close(call)


def _use_one(env, drv, dev) -> None:
    drv.add([(env.alloc(64), 64)])
    drv.publish()
    assert net.tx_sink(dev, 8, 1 << 20) == 1  # publishes and decides once itself
    drv.get_used()
    drv.add([(env.alloc(64), 64)])
    drv.publish()
    assert net.tx_sink(dev, 8, 1 << 20) == 1


def test_notify_decide_outcomes_each_counted(env):
    call = _eventfd()
    try:
        drv, dev = env.pair(8, call_fd=call)
        assert dev.notify_decide() is NotifyOutcome.NONE  # nothing published yet
        _use_one(env, drv, dev)
        assert _irqs(call) == 2
        assert dev.notify_decide() is NotifyOutcome.NONE  # already decided
        drv.set_interrupts(False)
        drv.get_used()
        drv.add([(env.alloc(64), 64)])
        drv.publish()
        assert net.tx_sink(dev, 8, 1 << 20) == 1
        assert _irqs(call) == 0
        dev.set_call_fd(-1)
        drv.set_interrupts(True)
        drv.get_used()
        drv.add([(env.alloc(64), 64)])
        drv.publish()
        assert net.tx_sink(dev, 8, 1 << 20) == 1
        s = dev.stats()
        assert (s["interrupts"], s["interrupts_suppressed"], s["interrupts_no_fd"]) == (2, 1, 1)
        drv.push_avail(8 + 3)  # head out of range: the queue breaks
        drv.publish()
        with pytest.raises(GuestError):
            net.tx_sink(dev, 8, 1 << 20)
        with pytest.raises(GuestError):
            dev.notify_decide()
    finally:
        os.close(call)


def test_no_call_fd_is_not_counted_as_suppressed(env):
    drv, dev = env.pair(8)  # call_fd -1
    _use_one(env, drv, dev)
    s = dev.stats()
    assert (s["interrupts"], s["interrupts_suppressed"], s["interrupts_no_fd"]) == (0, 0, 2)


# ---- hostile guests -----------------------------------------------------------------------------


def _loop(drv, env, size):
    drv.write_desc(0, env.buf, 64, VRING_DESC_F_NEXT, 1)
    drv.write_desc(1, env.buf, 64, VRING_DESC_F_NEXT, 0)
    drv.push_avail(0)


def _next_out_of_range(drv, env, size):
    drv.write_desc(0, env.buf, 64, VRING_DESC_F_NEXT, size)
    drv.push_avail(0)


def _head_out_of_range(drv, env, size):
    drv.push_avail(size + 3)


def _indirect(
    drv,
    env,
    table: list[tuple[int, int, int, int]],
    length: int | None = None,
    flags: int = VRING_DESC_F_INDIRECT,
):
    t = env.alloc(16 * max(1, len(table)), 16)
    for i, (a, n, f, nx) in enumerate(table):
        env.write(
            t + 16 * i,
            a.to_bytes(8, "little")
            + n.to_bytes(4, "little")
            + f.to_bytes(2, "little")
            + nx.to_bytes(2, "little"),
        )
    drv.write_desc(0, t, 16 * len(table) if length is None else length, flags, 0)
    drv.push_avail(0)


def _nested_indirect(drv, env, size):
    _indirect(
        drv, env, [(env.buf, 64, VRING_DESC_F_NEXT, 1), (env.buf, 16, VRING_DESC_F_INDIRECT, 0)]
    )


def _indirect_len_not_16(drv, env, size):
    _indirect(drv, env, [(env.buf, 64, 0, 0), (env.buf, 64, 0, 0)], length=24)


def _indirect_too_big(drv, env, size):
    _indirect(drv, env, [(env.buf, 64, 0, 0)] * (size + 1))


def _indirect_with_next(drv, env, size):
    _indirect(drv, env, [(env.buf, 64, 0, 0)], flags=VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT)


def _indirect_loop(drv, env, size):
    _indirect(drv, env, [(env.buf, 64, VRING_DESC_F_NEXT, 1), (env.buf, 64, VRING_DESC_F_NEXT, 0)])


def _indirect_next_outside(drv, env, size):
    _indirect(drv, env, [(env.buf, 64, VRING_DESC_F_NEXT, 5), (env.buf, 64, 0, 0)])


def _indirect_table_outside(drv, env, size):
    drv.write_desc(0, 0x1000, 32, VRING_DESC_F_INDIRECT, 0)
    drv.push_avail(0)


def _addr_below_region(drv, env, size):
    drv.write_desc(0, 0x1000, 64, 0, 0)
    drv.push_avail(0)


def _addr_overflow(drv, env, size):
    drv.write_desc(0, 2**64 - 16, 64, 0, 0)
    drv.push_avail(0)


def _straddles_end(drv, env, size):
    drv.write_desc(0, env.gpa + env.size - 10, 64, 0, 0)
    drv.push_avail(0)


def _huge_len(drv, env, size):
    drv.write_desc(0, env.gpa, 0xFFFFFFFF, 0, 0)
    drv.push_avail(0)


def _readable_after_writable(drv, env, size):
    drv.write_desc(0, env.buf, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    drv.write_desc(1, env.buf, 64, 0, 0)
    drv.push_avail(0)


def _avail_jump(drv, env, size):
    drv.write_avail_idx(drv.avail_idx + size + 1)


HOSTILE = [
    _loop,
    _next_out_of_range,
    _head_out_of_range,
    _nested_indirect,
    _indirect_len_not_16,
    _indirect_too_big,
    _indirect_with_next,
    _indirect_loop,
    _indirect_next_outside,
    _indirect_table_outside,
    _addr_below_region,
    _addr_overflow,
    _straddles_end,
    _huge_len,
    _readable_after_writable,
    _avail_jump,
]


@pytest.mark.parametrize("spin_ns", [0, 50_000_000])
@pytest.mark.parametrize("start", [0, 65535])
@pytest.mark.parametrize("corrupt", HOSTILE, ids=[f.__name__.strip("_") for f in HOSTILE])
def test_hostile_breaks_only_that_queue(env, corrupt, start, spin_ns):
    env.buf = env.alloc(4096)
    good_drv, good = env.pair(8, start_idx=start, index=1)
    drv, dev = env.pair(8, start_idx=start, index=0)
    corrupt(drv, env, 8)
    if corrupt is not _avail_jump:
        drv.publish()
    with pytest.raises(GuestError) as ei:
        if corrupt is _avail_jump:
            dev.pending()
        net.tx_sink(dev, 8, 1 << 20, spin_ns=spin_ns)
    assert dev.broken and dev.broken in str(ei.value)
    used_before = drv.read_used_idx()
    for op in (
        lambda: net.tx_sink(dev, 8, 1 << 20, spin_ns=spin_ns),
        dev.pending,
        dev.signal,
        lambda: net.rx_fill(dev, b"x" * 60, 4, spin_ns=spin_ns),
    ):
        with pytest.raises(GuestError):
            op()
    assert drv.read_used_idx() == used_before  # a broken queue publishes nothing more
    assert dev.stats()["errors"] == 1
    # the other queue on the same memory still works
    b = env.alloc(128)
    env.write(b, bytes(HDR) + b"ok" * 20)
    good_drv.add([(b, HDR + 40)])
    good_drv.publish()
    assert net.tx_sink(good, 8, 1 << 20) == 1
    assert good_drv.get_used() and good.broken is None


def test_rx_chain_with_readable_buffer_breaks(env):
    drv, dev = env.pair(8)
    drv.add([(env.alloc(64), 64)], [(env.alloc(64), 64)])
    drv.publish()
    with pytest.raises(GuestError, match="device-readable"):
        net.rx_fill(dev, b"z" * 20, 1)


@settings(max_examples=300, deadline=None)
@given(
    descs=st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 7),
            st.integers(0, 20),
        ),
        min_size=8,
        max_size=8,
    ),
    heads=st.lists(st.integers(0, 20), max_size=8),
    jump=st.integers(0, 65535),
    table=st.binary(min_size=0, max_size=256),
)
def test_fuzz_never_crashes(descs, heads, jump, table):
    """Random descriptor tables: either served or a GuestError, never a crash or a hang."""
    env = Env(size=1 << 20)
    try:
        drv, dev = env.pair(8)
        t = env.alloc(256, 16)
        env.write(t, table.ljust(256, b"\0"))
        anchors = [env.gpa, t, env.gpa + env.size - 64]
        for i, (addr, n, flags, nxt) in enumerate(descs):
            if addr % 3 == 0:  # keep a third of them pointing into guest memory
                addr = anchors[addr % 9 // 3] + (addr >> 60)
                n %= 300
            drv.write_desc(i, addr, n, flags, nxt)
        for h in heads:
            drv.push_avail(h)
        if jump % 7 == 0:
            drv.write_avail_idx(jump)
        else:
            drv.publish()
        spin = 100_000  # the busy-poll path too (0.1 ms at most per call)
        for op in (
            lambda: net.tx_sink(dev, 8, 1 << 20, spin_ns=spin),
            lambda: net.rx_fill(dev, b"q" * 40, 8, spin_ns=spin),
        ):
            try:
                op()
            except GuestError:
                assert dev.broken
    finally:
        env.close()


def test_layout_matches_spec():
    d, a, u, total = DriverQueue.layout(256)
    assert (d, a) == (0, 4096) and u % 4 == 0 and u >= a + 6 + 512 and total >= u + 6 + 8 * 256


# ---- regression: notification races -------------------------------------------------------------


@pytest.mark.parametrize("spin_ns", [0, 20_000])
@pytest.mark.parametrize("event_idx", [False, True])
def test_no_lost_kicks(event_idx, spin_ns):
    """A device that sleeps on its kick fd between batches (disable, drain, enable, re-check) and a
    driver that kicks only when asked must never deadlock: every chain gets consumed. With
    spin_ns the device also busy-polls inside its calls; that must not lose kicks or
    interrupts either."""
    import select
    import threading
    import time

    env = Env(size=1 << 20)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    total = 20000
    try:
        drv, dev = env.pair(64, event_idx=event_idx, call_fd=call, start_idx=65000)
        buf = env.alloc(128)
        stop = threading.Event()
        stalls: list[str] = []
        irq_stalls: list[str] = []

        def device() -> None:
            served = 0
            dev.set_notify(True)
            while served < total and not stop.is_set():
                if dev.pending() == 0:  # re-check after enabling, then sleep
                    r, _, _ = select.select([kick], [], [], 5.0)
                    if not r:
                        stalls.append(
                            f"device slept 5 s with {dev.pending()} pending, served {served}"
                        )
                        return
                    os.read(kick, 8)
                while True:
                    dev.set_notify(False)
                    served += net.tx_sink(dev, 1000, 1 << 40, spin_ns=spin_ns)
                    dev.set_notify(True)
                    if dev.pending() == 0:
                        break

        t = threading.Thread(target=device)
        t.start()
        sent = kicks = 0
        while sent < total and t.is_alive():
            while drv.num_free and sent < total:
                drv.add([(buf, 100)])
                sent += 1
                if sent % 7 == 0:
                    break
            if drv.publish():
                os.write(kick, (1).to_bytes(8, "little"))
                kicks += 1
            drv.get_used()
            if not drv.num_free:
                drv.set_interrupts(True)
                if not drv.more_used():
                    t0 = time.monotonic()
                    r, _, _ = select.select([call], [], [], 5.0)
                    if not r and not drv.more_used():
                        irq_stalls.append(
                            f"driver waited {time.monotonic() - t0:.1f} s for an "
                            f"interrupt, used {drv.read_used_idx()}"
                        )
                try:
                    os.read(call, 8)
                except BlockingIOError:
                    pass
                drv.get_used()
        t.join(30)
        stop.set()
        assert not stalls, stalls
        assert not irq_stalls, irq_stalls
        assert dev.stats()["packets"] == total
        assert kicks < total  # suppression did something
    finally:
        os.close(kick)
        os.close(call)
        env.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_lost_kicks_after_restart(env, event_idx):
    """A ring stopped while its kicks were off (NO_NOTIFY left in used->flags, or a stale
    avail_event) and started again: the new queue believes kicks are on, so the ring must say so
    too, or the driver's next buffer never wakes anybody."""
    drv, dev = env.pair(16, event_idx=event_idx, start_idx=100)
    buf = env.alloc(64)
    dev.set_notify(False)
    for _ in range(3):  # served with kicks off: avail_event (EVENT_IDX) stays behind
        drv.add([(buf, 40)])
        assert not drv.publish() or event_idx  # NO_NOTIFY honoured (flags mode)
        net.tx_sink(dev, 16, 1 << 20)
    if not event_idx:
        assert drv.read_used_flags() & VRING_USED_F_NO_NOTIFY
    # the backend restarts on the same ring (GET_VRING_BASE, then a new queue at that base)
    again = DeviceQueue(
        env.mem, index=0, size=16, desc_uva=env.uva(drv.desc_gpa),
        avail_uva=env.uva(drv.avail_gpa), used_uva=env.uva(drv.used_gpa),
        last_avail_idx=dev.last_avail_idx, event_idx=event_idx,
    )  # fmt: skip
    assert drv.read_used_flags() & VRING_USED_F_NO_NOTIFY == 0
    drv.add([(buf, 40)])
    assert drv.publish()  # the driver kicks for the first buffer after the restart
    assert net.tx_sink(again, 16, 1 << 20) == 1
