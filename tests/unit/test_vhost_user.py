"""Unit tests for the sans-IO vhost-user protocol (virtio/vhost_user.py): round trips, byte-at-a-time
parsing, replies and acks, malformed input, and fd ownership on failure."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.errors import RemoteProtocolError
from virtio.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_PAYLOAD_SIZE,
    REPLY_FLAGS,
    SPECS,
    VERSION,
    BackendConnection,
    Config,
    FrontendConnection,
    Inflight,
    IotlbMsg,
    Log,
    MemRegion,
    MemTable,
    Message,
    PostedIrq,
    ProtocolFeature,
    Request,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
    encode,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


# --------------------------------------------------------------------------- fd helpers


class Fds:
    """Creates throwaway fds (pipes' read ends) and closes whatever is left at the end."""

    def __init__(self) -> None:
        self.made: list[int] = []

    def new(self, n: int = 1) -> list[int]:
        out = []
        for _ in range(n):
            r, w = os.pipe()
            os.close(w)
            out.append(r)
        self.made.extend(out)
        return out

    def cleanup(self) -> None:
        for fd in self.made:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def fds() -> Iterator[Fds]:
    f = Fds()
    yield f
    f.cleanup()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def assert_closed(fdlist: Sequence[int]) -> None:
    for fd in fdlist:
        assert not is_open(fd), f"fd {fd} should have been closed"


# --------------------------------------------------------------------------- samples

REGION = MemRegion(gpa=0, size=1 << 20, uva=0x7F00_0000_0000, mmap_offset=0)


def sample(req: Request) -> tuple[object, int]:
    """A valid payload for ``req`` and how many fds go with it."""
    s = SPECS[req]
    name = s.payload.name
    if req == Request.SET_MEM_TABLE:
        return MemTable((REGION, MemRegion(1 << 20, 4096, 0x1000, 8192))), 2
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return VringFile(3), 1
    if name == "empty":
        return None, s.fds[0]
    if name == "u64":
        return 0x1234_5678_9ABC_DEF0, s.fds[0]
    if name == "VringState":
        return VringState(1, 256), s.fds[0]
    if name == "VringAddr":
        return VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0), s.fds[0]
    if name == "SingleMemRegion":
        return SingleMemRegion(REGION), s.fds[0]
    if name == "Config":
        return Config(0, 6, 0, b"\x52\x54\x00\x12\x34\x56"), s.fds[0]
    if name == "Inflight":
        return Inflight(4096, 0, 2, 256), s.fds[0]
    if name == "Log":
        return Log(1 << 20, 0), 1
    if name == "IotlbMsg":
        return IotlbMsg(0x1000, 0x2000, 0x3000, 3, 2), 0
    if name == "raw bytes":
        return b"crypto-blob", 0
    if name == "PostedIrq":
        return PostedIrq(4096, 0, 64, 1, 0, (1 << 200) | 0b1010), 2
    raise AssertionError(f"no sample for {req!r}")


ALL_REQUESTS = list(Request)


def test_request_ids_are_the_spec() -> None:
    spec = [r for r in Request if not r.name.startswith("VHOSTX_")]
    assert [int(r) for r in spec] == list(range(1, 41))
    assert Request.SET_STATUS == 39 and Request.GET_STATUS == 40
    assert Request.SET_BACKEND_REQ_FD == 21 and Request.VRING_KICK == 35
    spec_pf = [p for p in ProtocolFeature if not p.name.startswith("VHOSTX_")]
    assert [int(p) for p in spec_pf] == list(range(17))
    # the vhostx extensions: far from the spec's numbering, named as ours
    assert Request.VHOSTX_SET_POSTED_IRQ >= 0x10000
    assert ProtocolFeature.VHOSTX_POSTED_IRQ == 63
    assert set(SPECS) == set(Request)


def test_payload_sizes_match_c_layout() -> None:
    assert len(PostedIrq(0, 0, 0, 0, 0, 0).pack()) == 64
    p = PostedIrq.unpack(PostedIrq(1, 2, 3, 4, 0, (1 << 255) | 1).pack())
    assert p.queue_indices() == [0, 255] and (p.mmap_size, p.desc_offset, p.domain) == (1, 3, 4)
    assert len(VringState(0, 0).pack()) == 8
    assert len(VringAddr(0, 0, 0, 0, 0, 0).pack()) == 40
    assert len(MemRegion(0, 0, 0, 0).pack()) == 32
    assert len(MemTable((REGION,) * 8).pack()) == 264
    assert len(SingleMemRegion(REGION).pack()) == 40
    assert len(Inflight(0, 0, 0, 0).pack()) == 24
    assert len(Log(0, 0).pack()) == 16
    assert len(IotlbMsg(0, 0, 0, 0, 0).pack()) == 32
    assert len(Config(0, 256, 0, bytes(256)).pack()) == 268
    # used before avail in the C struct
    raw = VringAddr(7, 1, 0x10, 0x20, 0x30, 0x40).pack()
    assert struct.unpack("=IIQQQQ", raw) == (7, 1, 0x10, 0x20, 0x30, 0x40)
    assert VringFile(5, nofd=True).pack() == struct.pack("=Q", 0x105)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("req", ALL_REQUESTS, ids=lambda r: r.name)
def test_every_request_round_trips(req: Request, fds: Fds) -> None:
    payload, nfds = sample(req)
    sent_fds = fds.new(nfds)
    front = FrontendConnection()
    data = front.request(req, payload, sent_fds)
    back = BackendConnection()
    msgs = back.feed(data, sent_fds)
    assert len(msgs) == 1
    m = msgs[0]
    assert m.request == req and isinstance(m.request, Request)
    assert m.flags == VERSION
    assert m.payload == payload
    if req == Request.REM_MEM_REG:
        assert m.fds == ()
    else:
        assert m.fds == tuple(sent_fds)
        assert all(is_open(fd) for fd in sent_fds)


@pytest.mark.parametrize("req", ALL_REQUESTS, ids=lambda r: r.name)
def test_every_request_byte_at_a_time(req: Request, fds: Fds) -> None:
    payload, nfds = sample(req)
    sent_fds = fds.new(nfds)
    data = FrontendConnection().request(req, payload, sent_fds, need_reply=True)
    back = BackendConnection()
    got: list[Message] = []
    for i in range(len(data)):
        got += back.feed(data[i : i + 1], sent_fds if i == 0 else ())
        if i < len(data) - 1:
            assert got == []
    assert len(got) == 1
    assert got[0].payload == payload and got[0].need_reply
    assert got[0].fds == (() if req == Request.REM_MEM_REG else tuple(sent_fds))
    assert back.feed(b"") == []  # clean EOF


def test_rem_mem_reg_closes_a_passed_fd(fds: Fds) -> None:
    (fd,) = fds.new()
    data = FrontendConnection().request(Request.REM_MEM_REG, SingleMemRegion(REGION), [fd])
    (m,) = BackendConnection().feed(data, [fd])
    assert m.fds == ()
    assert_closed([fd])


def test_several_messages_in_one_chunk_fds_go_to_the_last(fds: Fds) -> None:
    front = FrontendConnection()
    kick = fds.new()
    a = front.request(Request.SET_OWNER)
    b = front.request(Request.SET_VRING_NUM, VringState(0, 256))
    c = front.request(Request.SET_VRING_KICK, VringFile(0), kick)
    msgs = BackendConnection().feed(a + b + c, kick)
    assert [m.request for m in msgs] == [
        Request.SET_OWNER,
        Request.SET_VRING_NUM,
        Request.SET_VRING_KICK,
    ]
    assert [m.fds for m in msgs] == [(), (), tuple(kick)]


def test_fds_go_to_the_message_in_progress(fds: Fds) -> None:
    front = FrontendConnection()
    kick = fds.new()
    a = front.request(Request.SET_OWNER)
    c = front.request(Request.SET_VRING_CALL, VringFile(1), kick)
    back = BackendConnection()
    msgs = back.feed(a + c[:5], kick)
    assert [m.request for m in msgs] == [Request.SET_OWNER] and msgs[0].fds == ()
    (m,) = back.feed(c[5:])
    assert m.fds == tuple(kick) and m.payload == VringFile(1)


# --------------------------------------------------------------------------- hypothesis

regions = st.builds(MemRegion, u64, u64, u64, u64)
payloads: dict[str, st.SearchStrategy[object]] = {
    "empty": st.none(),
    "u64": u64,
    "VringState": st.builds(VringState, u32, u32),
    "VringAddr": st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    "VringFile": st.builds(VringFile, u8, st.booleans()),
    "MemTable": st.lists(regions, min_size=1, max_size=8).map(lambda rs: MemTable(tuple(rs))),
    "SingleMemRegion": st.builds(SingleMemRegion, regions),
    "Config": st.builds(lambda o, f, p: Config(o, len(p), f, p), u32, u32, st.binary(max_size=256)),
    "Inflight": st.builds(Inflight, u64, u64, u16, u16),
    "Log": st.builds(Log, u64, u64),
    "IotlbMsg": st.builds(IotlbMsg, u64, u64, u64, u8, u8),
    "raw bytes": st.binary(max_size=MAX_PAYLOAD_SIZE),
    "PostedIrq": st.builds(PostedIrq, u64, u64, u64, u32, u32, st.integers(0, 2**256 - 1)),
}


def nfds_for(req: Request, payload: object) -> int:
    s = SPECS[req]
    if s.fd_count is not None:
        return s.fd_count(payload)
    return s.fds[1] if req != Request.REM_MEM_REG else 0


@st.composite
def request_and_payload(draw: st.DrawFn) -> tuple[Request, object, bool]:
    req = draw(st.sampled_from(ALL_REQUESTS))
    payload = draw(payloads[SPECS[req].payload.name])
    return req, payload, draw(st.booleans())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(request_and_payload())
def test_random_payload_round_trip(item: tuple[Request, object, bool]) -> None:
    req, payload, need_reply = item
    f = Fds()
    try:
        sent = f.new(nfds_for(req, payload))
        data = FrontendConnection().request(req, payload, sent, need_reply=need_reply)
        (m,) = BackendConnection().feed(data, sent)
        assert m.request == req and m.payload == payload and m.need_reply == need_reply
        assert m.fds == tuple(sent)
    finally:
        f.cleanup()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request_and_payload(), min_size=1, max_size=6), st.data())
def test_random_splits(items: list[tuple[Request, object, bool]], data: st.DataObject) -> None:
    """A stream of messages cut at random points; fds ride on each message's first byte and a
    chunk never runs past the end of a message that carried fds (what the kernel guarantees)."""
    f = Fds()
    try:
        front = FrontendConnection()
        stream = b""
        fd_at: dict[int, list[int]] = {}  # offset of first byte -> fds
        hard_ends: set[int] = set()
        expect = []
        for req, payload, need_reply in items:
            sent = f.new(nfds_for(req, payload))
            raw = front.request(req, payload, sent, need_reply=need_reply)
            if sent:
                fd_at[len(stream)] = sent
                hard_ends.add(len(stream) + len(raw))
            stream += raw
            expect.append((req, payload, tuple(sent)))
        cuts = data.draw(
            st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=min(len(stream), 40))
        )
        points = sorted(set(cuts) | hard_ends | {len(stream)})
        back = BackendConnection()
        got: list[Message] = []
        start = 0
        for end in points:
            if end <= start:
                continue
            chunk_fds = [fd for off, fl in fd_at.items() if start <= off < end for fd in fl]
            got += back.feed(stream[start:end], chunk_fds)
            start = end
        assert [(m.request, m.payload, m.fds) for m in got] == expect
    finally:
        f.cleanup()


@settings(max_examples=200)
@given(st.binary(min_size=0, max_size=300), st.data())
def test_garbage_never_crashes_otherwise(blob: bytes, data: st.DataObject) -> None:
    """Random bytes either parse or raise RemoteProtocolError, never anything else."""
    back = BackendConnection()
    try:
        i = 0
        while i < len(blob):
            n = data.draw(st.integers(1, 20))
            back.feed(blob[i : i + n])
            i += n
        back.feed(b"")
    except RemoteProtocolError:
        assert back.failed


# --------------------------------------------------------------------------- replies and acks


OWN_REPLY = {
    Request.GET_FEATURES: 1 << 32 | 1 << 30,
    Request.GET_PROTOCOL_FEATURES: 0x1_0009,
    Request.GET_QUEUE_NUM: 4,
    Request.GET_MAX_MEM_SLOTS: 32,
    Request.GET_STATUS: 0xF,
    Request.GET_VRING_BASE: VringState(1, 1234),
    Request.GET_CONFIG: Config(0, 6, 0, b"abcdef"),
    Request.GET_INFLIGHT_FD: Inflight(8192, 0, 2, 256),
    Request.SET_LOG_BASE: None,
    Request.CREATE_CRYPTO_SESSION: b"\x01" * 8,
    Request.POSTCOPY_ADVISE: None,
}


def test_own_reply_table_is_complete() -> None:
    assert {r for r, s in SPECS.items() if s.has_reply} == set(OWN_REPLY)


@pytest.mark.parametrize("req", list(OWN_REPLY), ids=lambda r: r.name)
def test_replies_round_trip(req: Request, fds: Fds) -> None:
    payload, nfds = sample(req)
    sent = fds.new(nfds)
    front = FrontendConnection()
    back = BackendConnection()
    (m,) = back.feed(front.request(req, payload, sent, need_reply=True), sent)
    raw = back.reply(m, OWN_REPLY[req])
    request, flags, size = HEADER.unpack_from(raw)
    assert (request, flags, size) == (req, REPLY_FLAGS, len(raw) - 12)
    assert flags == 0x5  # never echo NEED_REPLY
    assert back.ack(m) == b""  # has its own reply: no extra ack
    reply_fds = fds.new(SPECS[req].reply_fds[0])
    got: list[Message] = []
    for i in range(len(raw)):  # byte at a time
        got += front.feed(raw[i : i + 1], reply_fds if i == 0 else ())
    assert len(got) == 1
    assert got[0].request == req and got[0].payload == OWN_REPLY[req]
    assert got[0].fds == tuple(reply_fds)
    assert front.replies_due == 0


def negotiated(back: BackendConnection, front: FrontendConnection, bits: int) -> None:
    (m,) = back.feed(front.request(Request.SET_PROTOCOL_FEATURES, bits))
    assert back.ack(m) == b""
    assert back.protocol_features == bits


def test_ack_only_with_reply_ack_and_need_reply() -> None:
    front, back = FrontendConnection(), BackendConnection()
    (m,) = back.feed(front.request(Request.SET_OWNER, need_reply=True))
    assert back.ack(m) == b""  # REPLY_ACK not negotiated: NEED_REPLY is ignored
    front = FrontendConnection()
    negotiated(back, front, 1 << ProtocolFeature.REPLY_ACK)
    (m,) = back.feed(front.request(Request.SET_OWNER))
    assert back.ack(m) == b""  # no NEED_REPLY
    (m,) = back.feed(front.request(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True))
    assert back.needs_ack(m)
    raw = back.ack(m)
    assert raw == HEADER.pack(Request.SET_VRING_NUM, 0x5, 8) + struct.pack("=Q", 0)
    (r,) = front.feed(raw)
    assert r.request == Request.SET_VRING_NUM and r.payload == 0
    (m,) = back.feed(front.request(Request.SET_FEATURES, 1 << 32, need_reply=True))
    (r,) = front.feed(back.ack(m, ok=False))
    assert r.payload == 1


def test_reply_ack_negotiated_mid_batch_applies_from_that_message_on() -> None:
    front, back = FrontendConnection(), BackendConnection()
    a = front.request(Request.SET_OWNER)
    b = front.request(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.REPLY_ACK)
    c = front.request(Request.SET_FEATURES, 1 << 32, need_reply=True)
    ma, mb, mc = back.feed(a + b + c)
    assert not ma.reply_ack and mb.reply_ack and mc.reply_ack
    assert back.ack(mc) != b""


def test_reply_refused_for_requests_without_their_own() -> None:
    back = BackendConnection()
    (m,) = back.feed(FrontendConnection().request(Request.SET_OWNER))
    with pytest.raises(ValueError, match="no reply of its own"):
        back.reply(m, 0)


def test_frontend_rejects_reply_flags_other_than_0x5() -> None:
    front = FrontendConnection()
    front.request(Request.GET_FEATURES)
    with pytest.raises(RemoteProtocolError, match=r"exactly 0x5.*got 0xd"):
        front.feed(encode(Request.GET_FEATURES, 0xD, struct.pack("=Q", 1)))


def test_frontend_rejects_reply_to_another_request() -> None:
    front = FrontendConnection()
    front.request(Request.GET_FEATURES)
    with pytest.raises(
        RemoteProtocolError,
        match=r"expected a reply to GET_FEATURES \(1\), got a reply to GET_PROTOCOL_FEATURES",
    ):
        front.feed(encode(Request.GET_PROTOCOL_FEATURES, REPLY_FLAGS, struct.pack("=Q", 1)))


def test_frontend_rejects_unsolicited_reply() -> None:
    front = FrontendConnection()
    front.request(Request.SET_OWNER)
    with pytest.raises(RemoteProtocolError, match="no request outstanding"):
        front.feed(encode(Request.SET_OWNER, REPLY_FLAGS, struct.pack("=Q", 0)))


def test_frontend_rejects_reply_of_wrong_size() -> None:
    front = FrontendConnection()
    front.request(Request.GET_VRING_BASE, VringState(0, 0))
    with pytest.raises(
        RemoteProtocolError, match=r"reply to GET_VRING_BASE.*exactly 8 bytes, got 4"
    ):
        front.feed(encode(Request.GET_VRING_BASE, REPLY_FLAGS, b"\0" * 4))


def test_frontend_rejects_fds_on_a_plain_reply(fds: Fds) -> None:
    front = FrontendConnection()
    front.request(Request.GET_FEATURES)
    stray = fds.new()
    with pytest.raises(RemoteProtocolError, match="expects 0 fds, got 1"):
        front.feed(encode(Request.GET_FEATURES, REPLY_FLAGS, struct.pack("=Q", 1)), stray)
    assert_closed(stray)


def test_frontend_local_misuse_is_not_a_remote_error(fds: Fds) -> None:
    front = FrontendConnection()
    with pytest.raises(TypeError):
        front.request(Request.SET_FEATURES, VringState(0, 0))
    with pytest.raises(ValueError, match="needs 1 fds, got 0"):
        front.request(Request.SET_VRING_KICK, VringFile(0))
    with pytest.raises(ValueError, match="needs 0 fds, got 1"):
        front.request(Request.SET_VRING_KICK, VringFile(0, nofd=True), fds.new())
    with pytest.raises(ValueError, match="1..8 memory regions, got 9"):
        front.request(Request.SET_MEM_TABLE, MemTable((REGION,) * 9), fds.new(9))
    assert front.replies_due == 0


# --------------------------------------------------------------------------- malformed input


def feed_fails(
    back: BackendConnection | FrontendConnection,
    data: bytes,
    fdlist: Sequence[int] = (),
    match: str | None = None,
) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as ei:
        back.feed(data, fdlist)
    assert back.failed
    assert_closed(fdlist)
    return ei.value


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x8, 0xA])
def test_bad_version_bits(flags: int, fds: Fds) -> None:
    fdl = fds.new()
    err = feed_fails(BackendConnection(), encode(Request.SET_OWNER, flags, b""), fdl)
    assert "expected version 1" in str(err) and f"{flags:#x}" in str(err)


def test_unknown_flag_bits_rejected() -> None:
    feed_fails(
        BackendConnection(), encode(Request.SET_OWNER, 0x11, b""), match=r"bits 0-3, got flags 0x11"
    )


def test_reply_flag_on_a_request_rejected() -> None:
    feed_fails(
        BackendConnection(), encode(Request.GET_FEATURES, REPLY_FLAGS, b""), match="REPLY flag"
    )


@pytest.mark.parametrize("req_id", [0, 41, 1000, 0xFFFFFFFF])
def test_unknown_request_ids(req_id: int, fds: Fds) -> None:
    fdl = fds.new()
    err = feed_fails(BackendConnection(), encode(req_id, VERSION, b""), fdl)
    assert f"unknown request {req_id}" in str(err) and "1..40" in str(err)


def test_unknown_request_detected_from_header_alone() -> None:
    back = BackendConnection()
    with pytest.raises(RemoteProtocolError, match="unknown request 41"):
        back.feed(HEADER.pack(41, VERSION, 8))  # payload never arrives


FIXED = [(r, s.payload.size) for r, s in SPECS.items() if s.payload.size is not None]


@pytest.mark.parametrize(
    "req,size", FIXED, ids=lambda x: x.name if isinstance(x, Request) else str(x)
)
def test_wrong_sizes_for_fixed_size_requests(req: Request, size: int, fds: Fds) -> None:
    for bad in {size + 1, size - 1, size + 8, 0 if size else 8} - {size, -1}:
        fdl = fds.new(SPECS[req].fds[1])
        back = BackendConnection()
        err = feed_fails(back, encode(req, VERSION, b"\0" * bad), fdl)
        msg = str(err)
        assert req.name in msg and f"exactly {size} bytes" in msg and f"got {bad}" in msg, msg
        # the header alone is enough to refuse it
        with pytest.raises(RemoteProtocolError):
            BackendConnection().feed(HEADER.pack(req, VERSION, bad))


def test_set_vring_enable_size_exact() -> None:
    feed_fails(
        BackendConnection(),
        encode(Request.SET_VRING_ENABLE, VERSION, struct.pack("=Q", 1) + b"\0" * 4),
        match=r"SET_VRING_ENABLE \(18\) expects a VringState payload of exactly 8 bytes, got 12",
    )


@pytest.mark.parametrize("size", [MAX_PAYLOAD_SIZE + 1, 1 << 20, 0xFFFFFFFF])
def test_oversize_header_size(size: int, fds: Fds) -> None:
    fdl = fds.new()
    err = feed_fails(BackendConnection(), HEADER.pack(Request.SET_MEM_TABLE, VERSION, size), fdl)
    assert f"<= {MAX_PAYLOAD_SIZE}, got {size}" in str(err)


def test_config_size_rules() -> None:
    # size field 300 > 256
    raw = struct.pack("=III", 0, 300, 0) + b"\0" * 12
    feed_fails(
        BackendConnection(), encode(Request.SET_CONFIG, VERSION, raw), match="<= 256, got 300"
    )
    # size field disagrees with the message size
    raw = struct.pack("=III", 0, 4, 0) + b"\0" * 6
    feed_fails(
        BackendConnection(),
        encode(Request.GET_CONFIG, VERSION, raw),
        match="needs 16 bytes, got 18",
    )
    # message bigger than a maximal config
    feed_fails(
        BackendConnection(),
        encode(Request.SET_CONFIG, VERSION, b"\0" * 269),
        match="12..268 bytes, got 269",
    )


def memtable_bytes(n: int) -> bytes:
    return struct.pack("=II", n, 0) + REGION.pack() * n


def test_mem_table_missing_fds(fds: Fds) -> None:
    fdl = fds.new(1)
    back = BackendConnection()
    feed_fails(
        back,
        encode(Request.SET_MEM_TABLE, VERSION, memtable_bytes(2)),
        fdl,
        match=r"SET_MEM_TABLE \(5\) expects 2 fds, got 1",
    )


def test_mem_table_no_fds_at_all() -> None:
    feed_fails(
        BackendConnection(),
        encode(Request.SET_MEM_TABLE, VERSION, memtable_bytes(1)),
        match="expects 1 fds, got 0",
    )


def test_mem_table_too_many_fds(fds: Fds) -> None:
    fdl = fds.new(3)
    feed_fails(
        BackendConnection(),
        encode(Request.SET_MEM_TABLE, VERSION, memtable_bytes(2)),
        fdl,
        match="expects 2 fds, got 3",
    )


def test_mem_table_nregions_disagrees_with_size(fds: Fds) -> None:
    fdl = fds.new(2)
    raw = struct.pack("=II", 3, 0) + REGION.pack() * 2
    feed_fails(
        BackendConnection(),
        encode(Request.SET_MEM_TABLE, VERSION, raw),
        fdl,
        match="3 regions needs 104 bytes, got 72",
    )


def test_mem_table_zero_regions() -> None:
    feed_fails(
        BackendConnection(),
        encode(Request.SET_MEM_TABLE, VERSION, struct.pack("=II", 0, 0)),
        match=r"SET_MEM_TABLE \(5\) expects a MemTable payload of 40..264 bytes, got 8",
    )


def test_mem_table_nine_regions(fds: Fds) -> None:
    fdl = fds.new(9)
    feed_fails(
        BackendConnection(),
        encode(Request.SET_MEM_TABLE, VERSION, memtable_bytes(9)),
        fdl,
        match="40..264 bytes, got 296",
    )


def test_mem_table_fds_beyond_max_refused_before_payload(fds: Fds) -> None:
    fdl = fds.new(9)
    back = BackendConnection()
    back.feed(HEADER.pack(Request.SET_MEM_TABLE, VERSION, 72)[:4], fdl[:4])
    feed_fails(
        back,
        HEADER.pack(Request.SET_MEM_TABLE, VERSION, 72)[4:],
        fdl[4:],
        match="at most 8 fds, got 9",
    )
    assert_closed(fdl)


@pytest.mark.parametrize(
    "req", [Request.GET_FEATURES, Request.SET_OWNER, Request.SET_VRING_NUM, Request.SET_STATUS]
)
def test_extra_fds_rejected(req: Request, fds: Fds) -> None:
    payload, _ = sample(req)
    fdl = fds.new(2)
    raw = encode(req, VERSION, SPECS[req].payload.encode(payload))
    feed_fails(
        BackendConnection(), raw, fdl, match=rf"{req.name} \({int(req)}\) expects 0 fds, got 2"
    )


def test_extra_fds_on_get_features_byte_at_a_time(fds: Fds) -> None:
    fdl = fds.new(1)
    raw = encode(Request.GET_FEATURES, VERSION, b"")
    back = BackendConnection()
    for i in range(len(raw) - 1):
        assert back.feed(raw[i : i + 1], fdl if i == 0 else ()) == []
    assert is_open(fdl[0])  # still held
    feed_fails(back, raw[-1:], match="expects 0 fds, got 1")
    assert_closed(fdl)


def test_vring_kick_fd_and_nofd_must_agree(fds: Fds) -> None:
    fdl = fds.new()
    raw = encode(Request.SET_VRING_KICK, VERSION, struct.pack("=Q", 0x100))
    feed_fails(BackendConnection(), raw, fdl, match=r"SET_VRING_KICK \(12\) expects 0 fds, got 1")
    raw = encode(Request.SET_VRING_CALL, VERSION, struct.pack("=Q", 0x1))
    feed_fails(BackendConnection(), raw, match=r"SET_VRING_CALL \(13\) expects 1 fds, got 0")
    raw = encode(Request.SET_VRING_ERR, VERSION, struct.pack("=Q", 0x201))
    feed_fails(BackendConnection(), raw, match="bits 0-8, got 0x201")


def test_set_backend_req_fd_needs_its_fd() -> None:
    feed_fails(
        BackendConnection(),
        encode(Request.SET_BACKEND_REQ_FD, VERSION, b""),
        match="expects 1 fds, got 0",
    )


@pytest.mark.parametrize("n", range(1, 12))
def test_truncated_header_at_eof(n: int) -> None:
    raw = HEADER.pack(Request.GET_FEATURES, VERSION, 0)[:n]
    back = BackendConnection()
    assert back.feed(raw) == []
    feed_fails(back, b"", match=rf"expected a 12-byte header, got {n} bytes")


def test_truncated_header_at_eof_closes_held_fds(fds: Fds) -> None:
    fdl = fds.new(2)
    back = BackendConnection()
    back.feed(HEADER.pack(Request.SET_MEM_TABLE, VERSION, 72)[:3], fdl)
    assert all(is_open(fd) for fd in fdl)
    feed_fails(back, b"", match="got 3 bytes and 2 fds")
    assert_closed(fdl)


def test_truncated_payload_at_eof(fds: Fds) -> None:
    fdl = fds.new(2)
    back = BackendConnection()
    raw = encode(Request.SET_MEM_TABLE, VERSION, memtable_bytes(2))
    back.feed(raw[:30], fdl)
    feed_fails(back, b"", match=r"middle of SET_MEM_TABLE \(5\): expected 72 payload bytes, got 18")
    assert_closed(fdl)


def test_failed_connection_stays_failed(fds: Fds) -> None:
    back = BackendConnection()
    feed_fails(back, encode(41, VERSION, b""))
    later = fds.new()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        back.feed(FrontendConnection().request(Request.SET_OWNER), later)
    assert_closed(later)


def test_error_closes_fds_of_messages_parsed_in_the_same_feed(fds: Fds) -> None:
    front = FrontendConnection()
    kick = fds.new()
    good = front.request(Request.SET_VRING_KICK, VringFile(0), kick)
    bad = encode(1000, VERSION, b"")
    back = BackendConnection()
    assert back.feed(good[:1], kick) == []
    # the kick message completes in this feed, then the next header fails: it is never handed
    # out, so its fd must be closed by the connection
    feed_fails(back, good[1:] + bad, match="unknown request 1000")
    assert_closed(kick)


def test_fds_of_messages_already_handed_out_stay_open(fds: Fds) -> None:
    front = FrontendConnection()
    kick = fds.new()
    back = BackendConnection()
    (m,) = back.feed(front.request(Request.SET_VRING_KICK, VringFile(0), kick), kick)
    feed_fails(back, encode(1000, VERSION, b""))
    assert is_open(m.fds[0])


def test_feed_after_eof_raises() -> None:
    back = BackendConnection()
    assert back.feed(b"") == []
    assert back.closed
    with pytest.raises(RemoteProtocolError, match="after EOF"):
        back.feed(b"x")


def test_message_close_fds(fds: Fds) -> None:
    fdl = fds.new(2)
    m = Message(Request.SET_MEM_TABLE, VERSION, None, tuple(fdl))
    m.close_fds()
    assert_closed(fdl)


def test_flags_constants() -> None:
    assert VERSION == 1 and FLAG_REPLY == 4 and FLAG_NEED_REPLY == 8 and REPLY_FLAGS == 5
    assert HEADER.size == 12


def test_close_closes_the_fds_of_a_cut_off_message(fds: Fds) -> None:
    """A message whose fds arrived but whose bytes were cut off by a disconnect: the parser held
    the fds, and a caller that just dropped the connection object leaked them."""
    kick = fds.new()
    data = FrontendConnection().request(Request.SET_VRING_KICK, VringFile(0), kick)
    conn = BackendConnection()
    assert conn.feed(data[:15], kick) == []
    conn.close()
    assert_closed(kick)
    assert conn.closed
    with pytest.raises(RemoteProtocolError):
        conn.feed(b"x")
    conn.close()  # idempotent
