"""Late offer (decision D15): an INVITE without SDP, the offer in the 2xx, the answer in the ACK.

Driven like test_calls.py: the real transaction layer, a fake clock and fake media; what the
B2BUA sends is read back from the layer's datagram queue. The caller (CALLER) offers nothing;
the answering phone's 2xx offers SDP_B; the caller answers SDP_A in its ACK. Our relay is
127.0.0.1 with the caller-facing endpoint on 30002 and the phone-facing one on 30004.
"""

from __future__ import annotations

from softswitch.call_model import Call
from softswitch.lines import CallState
from softswitch.sip.message import Request, Response, parse_message

from .test_calls import (
    CALLER,
    PHONES,
    PICKER,
    SDP,
    Rig,
    caller_bye,
    in_dialog,
    new_invite,
    reply_to,
)

SDP_A = SDP  # the caller's media: 127.0.0.1:4000
SDP_B = SDP.replace(b"m=audio 4000 ", b"m=audio 5000 ").replace(
    b"a=rtpmap:101", b"a=ptime:20\r\na=rtpmap:101"
)  # the callee's media: 127.0.0.1:5000, with an attribute that must pass through untouched
A_PORT, B_PORT = 30002, 30004  # relay: caller-facing, phone-facing


def the_call(rig: Rig) -> Call:
    (call,) = rig.b2bua.calls.values()
    return call


def caller_ack(rig: Rig, ok: Response, body: bytes = b"", branch: str = "z9hG4bKack1") -> None:
    """The caller's ACK for our 2xx `ok`, with `body` (the answer) if any."""
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    raw = (
        f"ACK sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{CALLER.port};"
        f"branch={branch}\r\nFrom: {ok.headers.get('from')}\r\nTo: {ok.headers.get('to')}\r\n"
        f"Call-ID: {ok.call_id}\r\nCSeq: {ok.cseq.seq} ACK\r\nMax-Forwards: 70\r\n{ctype}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    rig.layer.receive(parse_message(raw), CALLER, rig.now)
    rig.flush()


async def answered(rig: Rig, n_targets: int = 1, winner: int = 0) -> Response:
    """A late-offer call to `n_targets` phones, answered by `winner` with SDP_B: our 2xx."""
    await rig.invite(n_targets, body=b"")
    for i, phone in enumerate(PHONES[:n_targets]):
        rig.answer(phone, 180, f"t{i}")
    rig.answer(PHONES[winner], 200, f"t{winner}", SDP_B)
    (ok,) = rig.take(CALLER, "200")
    assert isinstance(ok, Response)
    return ok


def assert_relay_sdp(body: bytes, port: int) -> None:
    text = body.decode()
    assert "c=IN IP4 127.0.0.1\r\n" in text and f"m=audio {port} RTP/AVP 0 101\r\n" in text, text
    assert "a=rtpmap:0 PCMU/8000" in text and "a=rtpmap:101 telephone-event/8000" in text


async def test_late_offer_call_is_answered_through_the_relay() -> None:
    rig = Rig()
    await rig.invite(3, body=b"")
    forks = rig.take(method="INVITE")
    assert len(forks) == 3
    for fork in forks:
        assert fork.body == b"" and fork.headers.get("content-type") is None
        assert fork.headers.get("content-length") == "0"
    rig.answer(PHONES[0], 183, "t0", SDP_B)  # early media would be the callee's offer
    (progress,) = rig.take(CALLER, "183")
    assert progress.body == b"" and progress.headers.get("content-type") is None
    rig.answer(PHONES[1], 180, "t1")
    rig.answer(PHONES[2], 180, "t2")
    rig.answer(PHONES[1], 200, "t1", SDP_B)

    (ok,) = rig.take(CALLER, "200")
    assert ok.headers.get("content-type") == "application/sdp"
    assert_relay_sdp(ok.body, A_PORT)  # the callee's offer, pointed at our relay
    assert b"a=ptime:20" in ok.body
    assert rig.take(PHONES[1], "ACK") == []  # held until the caller's ACK brings the answer
    cancelled = sorted(
        d.port for m, d in rig.sent if isinstance(m, Request) and m.method == "CANCEL"
    )
    assert cancelled == [PHONES[0].port, PHONES[2].port]
    call = the_call(rig)
    assert call.b_media.remote == ("127.0.0.1", 5000)  # the phone-facing endpoint -> the phone
    assert rig.media.bridges == [(A_PORT, B_PORT)]
    assert [e.state for e in rig.events] == [CallState.RINGING, CallState.ACTIVE]

    caller_ack(rig, ok, SDP_A)
    (ack,) = rig.take(PHONES[1], "ACK")
    assert ack.headers.get("content-type") == "application/sdp"
    assert_relay_sdp(ack.body, B_PORT)  # the caller's answer, pointed at our relay
    assert ack.cseq.seq == 1 and ack.to.tag == "t1"
    assert call.a_media.remote == ("127.0.0.1", 4000)  # the caller-facing endpoint -> the caller
    assert rig.take(method="BYE") == [] and call.id in rig.b2bua.calls


async def test_caller_ack_without_sdp_hangs_up_both_legs() -> None:
    rig = Rig()
    ok = await answered(rig)
    caller_ack(rig, ok)
    (ack,) = rig.take(PHONES[0], "ACK")
    # §13.2.2.4: the ACK still carries a valid answer, declining every stream, then BYE.
    assert b"m=audio 0 RTP/AVP 0 101" in ack.body
    assert len(rig.take(PHONES[0], "BYE")) == 1
    assert len(rig.take(CALLER, "BYE")) == 1
    assert rig.b2bua.calls == {} and sorted(rig.media.released) == [A_PORT, B_PORT]
    assert rig.events[-1].state is CallState.ENDED
    assert rig.events[-1].reason == "no answer in ack"


async def test_caller_never_acks_hangs_up_both_legs() -> None:
    rig = Rig()
    await answered(rig)
    rig.advance(31)
    assert rig.take(PHONES[0], "ACK") == [] and rig.take(method="BYE") == []
    rig.advance(2)  # 64*T1 after our 2xx: the transaction layer gives up (AckTimeout)
    (ack,) = rig.take(PHONES[0], "ACK")
    assert b"m=audio 0 " in ack.body
    sent_to_phone = [m for m, d in rig.sent if d == PHONES[0]]
    assert sent_to_phone.index(ack) < sent_to_phone.index(rig.take(PHONES[0], "BYE")[0])
    assert len(rig.take(CALLER, "BYE")) == 1
    assert rig.b2bua.calls == {} and rig.b2bua._awaiting == {}
    assert rig.events[-1].reason == "no ack"


async def test_retransmitted_2xx_is_absorbed_then_acked_again_with_the_answer() -> None:
    rig = Rig()
    ok = await answered(rig)
    rig.advance(0.5)
    rig.answer(PHONES[0], 200, "t0", SDP_B)  # the phone retransmits: still no answer to give
    assert rig.take(PHONES[0], "ACK") == []
    assert len(rig.take(CALLER, "200")) >= 1 and rig.take(CALLER, "INVITE") == []
    caller_ack(rig, ok, SDP_A)
    rig.answer(PHONES[0], 200, "t0", SDP_B)  # our ACK was lost: the same ACK again
    first, again = rig.take(PHONES[0], "ACK")
    assert again.to_bytes() == first.to_bytes() and b"m=audio 30004 " in again.body
    caller_ack(rig, ok, SDP_A, branch="z9hG4bKack2")  # a repeated ACK changes nothing
    assert len(rig.take(PHONES[0], "ACK")) == 2 and rig.take(method="BYE") == []


async def test_second_late_answer_gets_a_declining_ack_and_a_bye() -> None:
    rig = Rig()
    await answered(rig, n_targets=2, winner=0)
    rig.answer(PHONES[1], 200, "t1", SDP_B)  # crossed with our CANCEL
    (ack,) = rig.take(PHONES[1], "ACK")
    assert b"m=audio 0 " in ack.body
    (bye,) = rig.take(PHONES[1], "BYE")
    assert "Call completed elsewhere" in (bye.headers.get("reason") or "")
    assert len(rig.take(PHONES[1], "CANCEL")) == 1
    assert rig.take(PHONES[0], "ACK") == [] and len(rig.take(CALLER, "200")) == 1


async def test_late_answer_without_sdp_fails_only_that_fork() -> None:
    rig = Rig()
    await rig.invite(2, body=b"")
    rig.answer(PHONES[0], 200, "t0")  # a 2xx to an offer-less INVITE must offer: it did not
    (ack,) = rig.take(PHONES[0], "ACK")
    assert ack.body == b""
    assert len(rig.take(PHONES[0], "BYE")) == 1
    assert rig.take(CALLER, "200") == [] and the_call(rig).b is None
    rig.answer(PHONES[1], 200, "t1", SDP_B)  # the other phone still gets the call
    (ok,) = rig.take(CALLER, "200")
    assert_relay_sdp(ok.body, A_PORT)


async def test_late_answer_without_sdp_from_the_only_phone_fails_the_call() -> None:
    rig = Rig()
    await rig.invite(1, body=b"")
    rig.answer(PHONES[0], 200, "t0")
    assert len(rig.take(CALLER, "480")) == 1 and rig.b2bua.calls == {}


async def test_caller_bye_before_its_ack_still_acks_the_callee_first() -> None:
    rig = Rig()
    ok = await answered(rig)
    caller_bye(rig, ok, "z9hG4bKbye1", 2)
    to_phone = [m for m, d in rig.sent if d == PHONES[0] and isinstance(m, Request)]
    assert [m.method for m in to_phone] == ["INVITE", "ACK", "BYE"]
    assert rig.b2bua.calls == {} and rig.b2bua._awaiting == {}


async def test_pickup_of_a_ringing_late_offer_call_is_refused() -> None:
    rig = Rig()
    await rig.invite(2, body=b"")
    rig.answer(PHONES[0], 180, "t0")
    call = the_call(rig)
    ev = new_invite(rig, PICKER, "pick-1")
    rig.b2bua.pickup(call, ev.txn, ev.request, PICKER, "1003")
    rig.flush()
    assert len(rig.take(PICKER, "488")) == 1
    assert rig.take(method="CANCEL") == [] and call.b is None and not call.ended


async def test_early_offer_call_is_unchanged() -> None:
    """The early-offer path: SDP in every fork, the ACK at once, no late-offer state."""
    rig = Rig()
    await rig.invite(2)
    for fork in rig.take(method="INVITE"):
        assert (
            fork.headers.get("content-type") == "application/sdp" and b"m=audio 30004 " in fork.body
        )
    rig.answer(PHONES[0], 200, "t0", SDP_B)
    assert len(rig.take(PHONES[0], "ACK")) == 1
    call = the_call(rig)
    assert not call.late and call.awaited is None and rig.b2bua._awaiting == {}


# --- a re-INVITE without SDP in an established call ------------------------------------------


async def test_reinvite_without_sdp_carries_the_offer_in_2xx_and_the_answer_in_ack() -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP_B)
    caller_ack(rig, rig.take(CALLER, "200")[0])
    (inv,) = rig.take(PHONES[0], "INVITE")
    ev = in_dialog(rig, PHONES[0], inv, "t0", "INVITE", 2, "Content-Type: application/sdp\r\n")
    leg = rig.b2bua.find_leg(ev.request)
    assert leg is not None
    rig.b2bua.on_in_dialog(ev.txn, ev.request, leg)
    (relayed,) = rig.take(CALLER, "INVITE")
    assert relayed.body == b"" and relayed.headers.get("content-type") is None

    new_a = SDP_A.replace(b"m=audio 4000 ", b"m=audio 4100 ")
    reply_to(rig, relayed, CALLER, 200, new_a)  # the caller's fresh offer
    (ok,) = rig.take(PHONES[0], "200")
    assert_relay_sdp(ok.body, B_PORT)
    assert rig.take(CALLER, "ACK") == []  # held for the phone's answer
    call = the_call(rig)
    assert call.a_media.remote == ("127.0.0.1", 4100)

    new_b = SDP_B.replace(b"m=audio 5000 ", b"m=audio 5100 ")
    ack = (
        f"ACK sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{PHONES[0].port};"
        f"branch=z9hG4bKreack\r\nFrom: {ok.headers.get('from')}\r\nTo: {ok.headers.get('to')}"
        f"\r\nCall-ID: {ok.call_id}\r\nCSeq: 2 ACK\r\nMax-Forwards: 70\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(new_b)}\r\n\r\n"
    ).encode() + new_b
    rig.layer.receive(parse_message(ack), PHONES[0], rig.now)
    rig.flush()
    (to_caller,) = rig.take(CALLER, "ACK")
    assert to_caller.cseq.seq == relayed.cseq.seq
    assert_relay_sdp(to_caller.body, A_PORT)
    assert call.b_media.remote == ("127.0.0.1", 5100)
    assert rig.take(method="BYE") == []


async def test_reinvite_without_sdp_never_acked_hangs_up_both_legs() -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP_B)
    caller_ack(rig, rig.take(CALLER, "200")[0])
    (inv,) = rig.take(PHONES[0], "INVITE")
    ev = in_dialog(rig, PHONES[0], inv, "t0", "INVITE", 2)
    leg = rig.b2bua.find_leg(ev.request)
    assert leg is not None
    rig.b2bua.on_in_dialog(ev.txn, ev.request, leg)
    (relayed,) = rig.take(CALLER, "INVITE")
    reply_to(rig, relayed, CALLER, 200, SDP_A)
    rig.advance(33)
    (ack,) = rig.take(CALLER, "ACK")
    assert b"m=audio 0 " in ack.body
    assert len(rig.take(CALLER, "BYE")) == 1 and len(rig.take(PHONES[0], "BYE")) == 1
    assert rig.b2bua.calls == {}
