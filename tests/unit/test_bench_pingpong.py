"""Guest-model ping-pong accounting: a reply to an older frame (one still in flight when the
warm-up call ended, or declared lost) is `late`, not `bad`, and sequence numbers carry on."""

from __future__ import annotations

from bench.harness.pingpong import GuestModel, PingPongResult, make_frame


def _reply(flow: int, seq: int) -> bytes:
    f = make_frame(64, flow, seq, 123, dst=b"\x02" * 6, src=b"\x04" * 6)
    return f[6:12] + f[0:6] + f[12:]  # as the echo port sends it back


def test_older_reply_is_late_current_is_received_other_is_bad() -> None:
    gm = GuestModel([])
    res = PingPongResult(per_flow=[0, 0])
    seq = [5, 9]
    inflight: list[int | None] = [1, 1]
    gm._account(0, [_reply(0, 4)], seq, inflight, res, record=True)
    assert (res.late, res.bad, res.received, inflight[0]) == (1, 0, 0, 1)
    gm._account(0, [_reply(0, 5)], seq, inflight, res, record=True)
    assert (res.received, inflight[0], len(res.rtt_ns)) == (1, None, 1)
    gm._account(1, [_reply(0, 9)], seq, inflight, res, record=True)  # another flow's frame
    gm._account(1, [_reply(1, 10)], seq, inflight, res, record=True)  # a frame never sent
    gm._account(1, [b"\x00" * 64], seq, inflight, res, record=True)  # not a ping-pong frame
    assert (res.bad, res.late, res.received) == (3, 1, 1)

