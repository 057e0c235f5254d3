"""RFC 3261 §17 / RFC 6026 transactions and RFC 3581 rport, driven by a hand-advanced clock.

The layer is sans-I/O, so every test is a script: feed messages and times in, read datagrams,
events and deadlines out. `run()` plays the event loop: it jumps to each deadline the layer
reports and records what is sent at that time.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TypeVar

import pytest

from softswitch.sip.errors import LocalProtocolError
from softswitch.sip.headers import Headers
from softswitch.sip.message import Request, Response, new_request, parse_message
from softswitch.sip.syntax import is_token
from softswitch.sip.timers import RETRANSMIT_TIMERS, Timer, TimerSettings
from softswitch.sip.transaction import (
    INVITE_CLIENT,
    INVITE_SERVER,
    MAGIC_COOKIE,
    NON_INVITE_CLIENT,
    NON_INVITE_SERVER,
    Address,
    ClientTransaction,
    ServerTransaction,
    State,
    Table,
    Transaction,
    build_ack,
    new_branch,
)
from softswitch.sip.transaction_layer import (
    AckReceived,
    AckTimeout,
    Event,
    RequestReceived,
    ResponseReceived,
    StrayResponse,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimeout,
    TransportError,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "rfc4475"
PEER = Address("udp", "192.0.2.20", 5060)
PEER_TCP = Address("tcp", "192.0.2.20", 5060)


# --- helpers --------------------------------------------------------------------------------


M = TypeVar("M", Request, Response)


def wire(msg: M) -> M:
    """What the peer receives: the message serialised and parsed again."""
    out = parse_message(msg.to_bytes())
    assert isinstance(out, type(msg))
    return out


def state(txn: Transaction) -> State:
    """`txn.state`, read through a call so mypy does not pin it after an earlier assert."""
    return txn.state


def request(
    method: str,
    branch: str,
    *,
    via: str = "SIP/2.0/UDP 192.0.2.20:5060",
    call_id: str = "call-1@test",
    cseq: int = 1,
    to_tag: str | None = None,
    extra: tuple[str, ...] = (),
) -> Request:
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} sip:bob@example.com SIP/2.0",
        f"Via: {via};branch={branch}",
        "Max-Forwards: 70",
        "From: <sip:alice@example.com>;tag=a1",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *extra,
        "Content-Length: 0",
        "",
        "",
    ]
    msg = parse_message("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


def response_to(req: Request, status: int, to_tag: str | None = "bob-1") -> Response:
    return wire(req.make_response(status, to_tag=to_tag))


def events(layer: TransactionLayer) -> list[Event]:
    out = []
    while (event := layer.next_event()) is not None:
        out.append(event)
    return out


def run(layer: TransactionLayer, until: float) -> list[tuple[float, bytes]]:
    """Fire every timer up to `until`, as an event loop would; return (time, datagram)s."""
    sent: list[tuple[float, bytes]] = []
    while (deadline := layer.get_timer()) is not None and deadline <= until:
        layer.handle_timer(deadline)
        sent += [(deadline, data) for data, _ in layer.datagrams_to_send()]
    return sent


def times(sent: list[tuple[float, bytes]]) -> list[float]:
    return [t for t, _ in sent]


def receive_new(layer: TransactionLayer, req: Request, source: Address = PEER,
                now: float = 0.0) -> ServerTransaction:  # fmt: skip
    layer.receive(req, source, now)
    (event,) = [e for e in events(layer) if isinstance(e, RequestReceived)]
    return event.txn


def load(name: str) -> Request:
    msg = parse_message((DATA / name).read_bytes())
    assert isinstance(msg, Request)
    return msg


@pytest.fixture
def layer() -> TransactionLayer:
    return TransactionLayer(rng=random.Random(7))


# --- timer settings -------------------------------------------------------------------------


def test_timer_durations_derive_from_t1_t2_t4() -> None:
    s = TimerSettings()
    for timer in (Timer.B, Timer.F, Timer.H, Timer.J, Timer.L, Timer.M, Timer.WAIT_ACK):
        assert s.duration(timer, reliable=False) == 32.0
    assert s.duration(Timer.D, reliable=False) == 32.0
    assert s.duration(Timer.I, reliable=False) == s.duration(Timer.K, reliable=False) == 5.0
    for timer in (Timer.D, Timer.I, Timer.J, Timer.K):
        assert s.duration(timer, reliable=True) == 0.0
    for timer in RETRANSMIT_TIMERS:
        assert s.duration(timer, reliable=False) == 0.5
        assert s.duration(timer, reliable=True) is None
    assert s.duration(Timer.B, reliable=True) == s.duration(Timer.L, reliable=True) == 32.0
    assert s.backoff(Timer.A, 4.0) == 8.0  # INVITE retransmissions are not capped
    assert s.backoff(Timer.E, 4.0) == s.backoff(Timer.G, 2.0) == 4.0
    assert TimerSettings(t1=1.0).duration(Timer.F, reliable=False) == 64.0


def test_timer_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        TimerSettings(t1=0)
    with pytest.raises(ValueError):
        TimerSettings(t1=5.0, t2=4.0)


# --- client retransmissions -----------------------------------------------------------------


def test_timer_a_doubles_and_timer_b_times_out(layer: TransactionLayer) -> None:
    invite = request("INVITE", layer.new_branch())
    txn = layer.send_request(invite, PEER, 0.0)
    (first,) = layer.datagrams_to_send()
    assert first == (invite.to_bytes(), PEER)
    sent = run(layer, 31.9)
    assert times(sent) == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # intervals 0.5, 1, 2, 4, 8, 16
    assert all(data == first[0] for _, data in sent)
    assert layer.get_timer() == 32.0 and not events(layer)
    assert run(layer, 100.0) == []
    assert events(layer) == [TransactionTimeout(txn, Timer.B), TransactionTerminated(txn)]
    assert txn.state is State.TERMINATED
    assert layer.stats() == (0, 0, 0, 0)


def test_timer_e_caps_at_t2_and_timer_f_times_out(layer: TransactionLayer) -> None:
    txn = layer.send_request(request("REGISTER", layer.new_branch()), PEER, 0.0)
    layer.datagrams_to_send()
    sent = run(layer, 100.0)
    assert times(sent) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert events(layer) == [TransactionTimeout(txn, Timer.F), TransactionTerminated(txn)]


def test_timer_e_restarts_at_t2_in_proceeding(layer: TransactionLayer) -> None:
    req = request("OPTIONS", layer.new_branch())
    txn = layer.send_request(req, PEER, 0.0)
    layer.datagrams_to_send()
    layer.receive(response_to(req, 100, None), PEER, 0.2)
    assert txn.state is State.PROCEEDING
    assert times(run(layer, 10.0)) == [0.5, 4.5, 8.5]  # §17.1.2.2: reset with T2 in Proceeding


def test_non_invite_client_completed_absorbs_retransmitted_final(
    layer: TransactionLayer,
) -> None:
    req = request("REGISTER", layer.new_branch())
    txn = layer.send_request(req, PEER, 0.0)
    ok = response_to(req, 200)
    layer.receive(ok, PEER, 0.1)
    layer.receive(ok, PEER, 0.6)
    assert events(layer) == [ResponseReceived(txn, ok)]
    assert layer.get_timer() == pytest.approx(5.1)  # Timer K = T4; E and F were cancelled
    layer.datagrams_to_send()
    assert run(layer, 10.0) == []
    assert events(layer) == [TransactionTerminated(txn)]


def test_no_retransmissions_on_tcp(layer: TransactionLayer) -> None:
    invite = request("INVITE", layer.new_branch(), via="SIP/2.0/TCP 192.0.2.10:5060")
    txn = layer.send_request(invite, PEER_TCP, 0.0)
    assert len(layer.datagrams_to_send()) == 1
    assert run(layer, 31.9) == []
    assert layer.get_timer() == 32.0  # Timer B still guards the transaction
    busy = response_to(invite, 486)
    layer.receive(busy, PEER_TCP, 1.0)
    [(ack, dest)] = layer.datagrams_to_send()
    assert dest == PEER_TCP and ack.startswith(b"ACK ")
    # Timer D is zero on TCP: the transaction ends at once.
    assert events(layer) == [ResponseReceived(txn, busy), TransactionTerminated(txn)]

    register = request("REGISTER", layer.new_branch(), via="SIP/2.0/TCP 192.0.2.10:5060")
    txn2 = layer.send_request(register, PEER_TCP, 2.0)
    layer.receive(response_to(register, 200), PEER_TCP, 2.1)
    assert [type(e) for e in events(layer)] == [ResponseReceived, TransactionTerminated]
    assert txn2.terminated and layer.stats()[:3] == (0, 0, 0)
    assert layer.get_timer() is None


def test_a_client_invite_releases_its_request_only_once_finished(
    layer: TransactionLayer,
) -> None:
    invite = request("INVITE", layer.new_branch(), cseq=7)
    txn = layer.send_request(invite, PEER, 0.0)
    layer.release_request(txn)  # still calling: kept (a CANCEL would need it)
    assert txn.request is invite
    layer.receive(response_to(invite, 486, to_tag="b"), PEER, 0.5)
    [(ack, _)] = layer.datagrams_to_send()[-1:]
    layer.release_request(txn)
    with pytest.raises(LocalProtocolError):
        txn.request  # noqa: B018
    layer.receive(response_to(invite, 486, to_tag="b"), PEER, 1.0)  # a retransmitted final
    assert layer.datagrams_to_send() == [(ack, PEER)]  # ACKed again from the kept bytes


def test_ack_refuses_a_to_with_cr_or_lf() -> None:
    invite = request("INVITE", "z9hG4bKcrlf", cseq=7)
    busy = response_to(invite, 486, to_tag="t")
    busy.headers.set("To", "<sip:x@y>;tag=t\r\nX-Evil: 1")
    with pytest.raises(LocalProtocolError):
        build_ack(invite, busy)


# --- INVITE client: ACK for non-2xx, RFC 6026 Accepted --------------------------------------


def test_ack_for_486_and_reack_on_retransmission(layer: TransactionLayer) -> None:
    routes = ("Route: <sip:p1.example.com;lr>", "Route: <sip:p2.example.com;lr>")
    invite = request("INVITE", layer.new_branch(), cseq=7, extra=routes)
    txn = layer.send_request(invite, PEER, 0.0)
    layer.datagrams_to_send()
    layer.receive(response_to(invite, 180), PEER, 0.1)
    busy = response_to(invite, 486, to_tag="busy-tag")
    layer.receive(busy, PEER, 2.0)
    [(ack_bytes, dest)] = layer.datagrams_to_send()
    assert dest == PEER and txn.state is State.COMPLETED
    ack = parse_message(ack_bytes)
    assert isinstance(ack, Request) and ack.method == "ACK"
    assert str(ack.uri) == str(invite.uri)
    assert ack.call_id == invite.call_id
    assert ack.headers.get("from") == invite.headers.get("from")
    assert ack.to.tag == "busy-tag"
    assert str(ack.cseq) == "7 ACK"
    assert ack.headers.get_all("via") == [invite.headers.get_all("via")[0]]
    assert ack.headers.get_all("route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert ack.max_forwards == 70
    assert ack.headers.get("content-length") == "0" and ack.body == b""
    # sent as rendered by build_ack: byte for byte the generic rendering of its fields
    assert ack_bytes == Request("ACK", ack.uri, Headers(list(ack.headers._items))).to_bytes()
    assert [type(e) for e in events(layer)] == [ResponseReceived, ResponseReceived]

    layer.receive(busy, PEER, 2.5)  # the server did not get our ACK
    assert layer.datagrams_to_send() == [(ack_bytes, PEER)]
    assert events(layer) == []  # absorbed: the TU saw the 486 once

    assert run(layer, 33.9) == [] and not events(layer)
    run(layer, 34.0)  # Timer D: 32 s after the 486
    assert events(layer) == [TransactionTerminated(txn)]
    layer.receive(busy, PEER, 40.0)
    assert events(layer) == [StrayResponse(busy, PEER)]


def test_invite_client_accepted_passes_2xx_retransmissions_up(layer: TransactionLayer) -> None:
    invite = request("INVITE", layer.new_branch())
    txn = layer.send_request(invite, PEER, 0.0)
    layer.datagrams_to_send()
    ok = response_to(invite, 200)
    layer.receive(ok, PEER, 1.0)
    assert txn.state is State.ACCEPTED
    assert layer.datagrams_to_send() == []  # the TU (dialog) ACKs a 2xx, not the transaction
    layer.receive(ok, PEER, 1.5)  # retransmitted 2xx
    layer.receive(response_to(invite, 180), PEER, 1.6)  # anything else is absorbed
    assert events(layer) == [ResponseReceived(txn, ok), ResponseReceived(txn, ok)]
    assert run(layer, 32.9) == [] and not events(layer)
    run(layer, 33.0)  # Timer M = 64*T1 after the first 2xx
    assert events(layer) == [TransactionTerminated(txn)]
    layer.receive(ok, PEER, 34.0)
    assert events(layer) == [StrayResponse(ok, PEER)]


# --- server transactions --------------------------------------------------------------------


def test_retransmitted_request_is_absorbed_and_answered_again(layer: TransactionLayer) -> None:
    register = request("REGISTER", "z9hG4bKreg-1")
    txn = receive_new(layer, register)
    layer.receive(wire(register), PEER, 0.1)  # before any response: nothing to resend
    assert layer.datagrams_to_send() == [] and events(layer) == []

    layer.send_response(txn, register.make_response(200, to_tag="r1"), 0.2)
    [(ok_bytes, dest)] = layer.datagrams_to_send()
    assert dest == PEER and txn.state is State.COMPLETED
    layer.receive(wire(register), PEER, 1.0)
    assert layer.datagrams_to_send() == [(ok_bytes, PEER)]
    assert events(layer) == []  # no second RequestReceived

    run(layer, 32.2)  # Timer J
    assert events(layer) == [TransactionTerminated(txn)]
    txn2 = receive_new(layer, wire(register), now=40.0)  # a request after Terminated is new
    assert txn2 is not txn


def test_non_invite_server_resends_last_provisional(layer: TransactionLayer) -> None:
    options = request("OPTIONS", "z9hG4bKopt-1")
    txn = receive_new(layer, options)
    layer.send_response(txn, options.make_response(100), 0.0)
    [(trying, _)] = layer.datagrams_to_send()
    layer.receive(wire(options), PEER, 0.5)
    assert layer.datagrams_to_send() == [(trying, PEER)]
    assert txn.state is State.PROCEEDING


def test_non_invite_server_releases_its_request_with_the_final_response(
    layer: TransactionLayer,
) -> None:
    register = request("REGISTER", "z9hG4bKreg-rel")
    txn = receive_new(layer, register)
    layer.send_response(txn, register.make_response(100), 0.0)
    assert txn.request is register  # still there while the TU is working on it
    layer.send_response(txn, register.make_response(200, to_tag="r"), 0.1)
    with pytest.raises(LocalProtocolError):
        txn.request  # noqa: B018
    assert txn.method == "REGISTER" and "REGISTER" in repr(txn)
    layer.receive(wire(register), PEER, 0.2)  # retransmissions are still answered
    assert len(layer.datagrams_to_send()) == 3

    invite = request("INVITE", "z9hG4bKinv-rel")
    invite_txn = receive_new(layer, invite)
    layer.send_response(invite_txn, invite.make_response(486, to_tag="r"), 0.0)
    assert invite_txn.request is invite  # INVITE transactions keep theirs (CANCEL, 2xx job)


def test_second_final_response_is_discarded(layer: TransactionLayer) -> None:
    options = request("OPTIONS", "z9hG4bKopt-2")
    txn = receive_new(layer, options)
    assert layer.send_response(txn, options.make_response(200), 0.0)
    assert not layer.send_response(txn, options.make_response(500), 0.1)
    assert len(layer.datagrams_to_send()) == 1


def test_invite_server_g_h_i(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-1")
    txn = receive_new(layer, invite)
    [(trying, dest)] = layer.datagrams_to_send()
    assert trying.startswith(b"SIP/2.0 100 Trying") and dest == PEER
    layer.receive(wire(invite), PEER, 0.1)
    assert layer.datagrams_to_send() == [(trying, PEER)]  # retransmission: resend the 100

    layer.send_response(txn, invite.make_response(486, to_tag="srv"), 0.0)
    [(busy, _)] = layer.datagrams_to_send()
    sent = run(layer, 10.0)
    assert times(sent) == [0.5, 1.5, 3.5, 7.5]  # Timer G, doubling
    assert times(run(layer, 12.0)) == [11.5]  # capped at T2
    assert all(data == busy for _, data in sent)
    layer.receive(wire(invite), PEER, 12.0)
    assert layer.datagrams_to_send() == [(busy, PEER)]

    ack = request("ACK", "z9hG4bKinv-1", to_tag="srv")
    layer.receive(ack, PEER, 12.5)
    assert state(txn) is State.CONFIRMED and events(layer) == []  # the non-2xx ACK is absorbed
    layer.receive(ack, PEER, 12.6)
    assert run(layer, 17.4) == [] and events(layer) == []
    run(layer, 17.5)  # Timer I = T4 after the ACK
    assert events(layer) == [TransactionTerminated(txn)]
    assert layer.stats() == (0, 0, 0, 0)


def test_invite_server_timer_h_without_ack(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-2")
    txn = receive_new(layer, invite)
    layer.send_response(txn, invite.make_response(603, to_tag="srv"), 0.0)
    layer.datagrams_to_send()
    sent = run(layer, 100.0)
    assert times(sent) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert events(layer) == [TransactionTimeout(txn, Timer.H), TransactionTerminated(txn)]


def test_invite_server_on_tcp_has_no_g_and_ends_at_ack(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-3", via="SIP/2.0/TCP 192.0.2.20:5060")
    txn = receive_new(layer, invite, PEER_TCP)
    layer.send_response(txn, invite.make_response(486, to_tag="srv"), 0.0)
    layer.datagrams_to_send()
    assert layer.get_timer() == 32.0  # only Timer H
    layer.receive(request("ACK", "z9hG4bKinv-3", via="SIP/2.0/TCP 192.0.2.20:5060",
                          to_tag="srv"), PEER_TCP, 1.0)  # fmt: skip
    assert events(layer) == [TransactionTerminated(txn)]  # Timer I is zero
    assert layer.get_timer() is None


def test_send_100_trying_can_be_left_to_the_tu() -> None:
    layer = TransactionLayer(send_100_trying=False)
    receive_new(layer, request("INVITE", "z9hG4bKinv-4"))
    assert layer.datagrams_to_send() == []


def test_100_trying_copies_timestamp(layer: TransactionLayer) -> None:
    receive_new(layer, request("INVITE", "z9hG4bKinv-5", extra=("Timestamp: 54",)))
    [(trying, _)] = layer.datagrams_to_send()
    assert b"\r\nTimestamp: 54\r\n" in trying


# --- RFC 6026 Accepted and 2xx retransmission -----------------------------------------------


def test_invite_server_accepted_absorbs_invite_and_passes_ack_up(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-6")
    txn = receive_new(layer, invite)
    layer.send_response(txn, invite.make_response(200, to_tag="srv"), 0.0)
    layer.datagrams_to_send()
    assert txn.state is State.ACCEPTED
    layer.receive(wire(invite), PEER, 0.6)
    assert layer.datagrams_to_send() == [] and events(layer) == []  # absorbed, not to the TU

    same_branch_ack = request("ACK", "z9hG4bKinv-6", to_tag="srv")
    layer.receive(same_branch_ack, PEER, 1.0)  # matches the transaction: passed up (6026)
    new_branch_ack = request("ACK", "z9hG4bKack-6", to_tag="srv")
    layer.receive(new_branch_ack, PEER, 1.1)  # the normal 2xx ACK: a stray for the dialog
    assert events(layer) == [AckReceived(same_branch_ack, PEER), AckReceived(new_branch_ack, PEER)]

    assert run(layer, 31.9) == []  # the layer does not retransmit 2xx unless asked
    run(layer, 32.0)  # Timer L
    assert events(layer) == [TransactionTerminated(txn)]


def test_invite_server_accepted_sends_further_2xx_from_tu(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-7")
    txn = receive_new(layer, invite)
    ok = invite.make_response(200, to_tag="srv")
    assert layer.send_response(txn, ok, 0.0)
    assert layer.send_response(txn, ok, 0.5)  # the TU's own 2xx retransmission
    assert not layer.send_response(txn, invite.make_response(486), 0.6)
    assert [d for d, _ in layer.datagrams_to_send()][1:] == [ok.to_bytes()] * 2


def test_retransmit_2xx_until_the_ack(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-8")
    txn = receive_new(layer, invite)
    layer.datagrams_to_send()
    ok = invite.make_response(200, to_tag="srv")
    layer.send_response(txn, ok, 0.0, retransmit_2xx=True)
    [(ok_bytes, _)] = layer.datagrams_to_send()
    sent = run(layer, 8.0)
    assert times(sent) == [0.5, 1.5, 3.5, 7.5] and {d for _, d in sent} == {ok_bytes}
    layer.receive(request("ACK", "z9hG4bKack-8", to_tag="other"), PEER, 8.0)  # not ours
    assert layer.stats().retransmitting_2xx == 1
    ack = request("ACK", "z9hG4bKack-8", to_tag="srv")
    layer.receive(ack, PEER, 8.2)
    assert events(layer)[-1] == AckReceived(ack, PEER)
    assert layer.stats().retransmitting_2xx == 0
    assert run(layer, 100.0) == []
    assert events(layer) == [TransactionTerminated(txn)]  # Timer L, no AckTimeout


def test_retransmit_2xx_gives_up_with_ack_timeout(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-9")
    txn = receive_new(layer, invite)
    layer.send_response(txn, invite.make_response(200, to_tag="srv"), 0.0, retransmit_2xx=True)
    layer.datagrams_to_send()
    sent = run(layer, 100.0)
    assert times(sent) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    evs = events(layer)
    assert AckTimeout(txn, Timer.WAIT_ACK) in evs and TransactionTerminated(txn) in evs
    assert isinstance(AckTimeout(txn, Timer.WAIT_ACK), TransactionTimeout)
    assert layer.stats() == (0, 0, 0, 0)


def test_stop_2xx_retransmission(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-10")
    txn = receive_new(layer, invite)
    layer.send_response(txn, invite.make_response(200, to_tag="srv"), 0.0, retransmit_2xx=True)
    layer.stop_2xx_retransmission(txn)
    layer.datagrams_to_send()
    assert run(layer, 100.0) == []
    assert events(layer) == [TransactionTerminated(txn)]


# --- CANCEL ---------------------------------------------------------------------------------


def test_cancel_is_its_own_transaction_and_finds_its_invite(layer: TransactionLayer) -> None:
    invite = request("INVITE", "z9hG4bKinv-11")
    invite_txn = receive_new(layer, invite)
    cancel = request("CANCEL", "z9hG4bKinv-11")
    cancel_txn = receive_new(layer, cancel, now=1.0)
    assert cancel_txn is not invite_txn and cancel_txn.method == "CANCEL"
    assert layer.find_invite_for_cancel(cancel) is invite_txn

    layer.send_response(cancel_txn, cancel.make_response(200, to_tag="srv"), 1.0)
    layer.send_response(invite_txn, invite.make_response(487, to_tag="srv"), 1.0)
    assert invite_txn.state is State.COMPLETED and cancel_txn.state is State.COMPLETED
    layer.receive(request("ACK", "z9hG4bKinv-11", to_tag="srv"), PEER, 1.2)
    assert state(invite_txn) is State.CONFIRMED

    assert layer.find_invite_for_cancel(request("CANCEL", "z9hG4bKother")) is None
    elsewhere = request("CANCEL", "z9hG4bKinv-11", via="SIP/2.0/UDP 192.0.2.99:5060")
    assert layer.find_invite_for_cancel(elsewhere) is None  # same branch, other sent-by


# --- RFC 2543 matching (RFC 4475 torture messages) ------------------------------------------


def test_badbranch_bare_cookie_is_matched_the_rfc2543_way(layer: TransactionLayer) -> None:
    options = load("badbranch.dat")
    assert options.via.branch == MAGIC_COOKIE
    txn = receive_new(layer, options)
    assert txn.key[0] != MAGIC_COOKIE  # not (branch, sent-by, method)
    layer.receive(load("badbranch.dat"), PEER, 0.1)
    assert events(layer) == []  # the retransmission is absorbed

    other = load("badbranch.dat")
    other.headers.set("Call-ID", "another-call")
    other_txn = receive_new(layer, other, now=0.2)  # same bare branch, different request
    assert other_txn is not txn

    layer.send_response(txn, options.make_response(200, to_tag="t"), 0.3)
    [(ok, _)] = layer.datagrams_to_send()
    layer.receive(load("badbranch.dat"), PEER, 0.4)
    assert layer.datagrams_to_send() == [(ok, PEER)]


def test_inv2543_no_branch_retransmission_ack_and_cancel(layer: TransactionLayer) -> None:
    source = Address("udp", "192.0.2.5", 5060)
    invite = load("inv2543.dat")
    assert invite.via.branch is None
    txn = receive_new(layer, invite, source)
    assert txn.request.via.param("received") == "192.0.2.5"  # sent-by is a host name
    [(trying, _)] = layer.datagrams_to_send()
    layer.receive(load("inv2543.dat"), source, 0.2)
    assert events(layer) == [] and layer.datagrams_to_send() == [(trying, source)]

    cancel_text = (DATA / "inv2543.dat").read_bytes().split(b"\r\n\r\n")[0]
    cancel_text = cancel_text.replace(b"INVITE sip:", b"CANCEL sip:")
    cancel_text = cancel_text.replace(b"56 INVITE", b"56 CANCEL")
    cancel = parse_message(cancel_text.replace(b"Content-Type: application/sdp", b"l: 0"))
    assert isinstance(cancel, Request)
    receive_new(layer, cancel, source, 0.3)
    assert layer.find_invite_for_cancel(cancel) is txn

    layer.send_response(txn, invite.make_response(487, to_tag="x1"), 0.4)
    ack_text = cancel_text.replace(b"CANCEL sip:", b"ACK sip:").replace(b"56 CANCEL", b"56 ACK")
    ack_text = ack_text.replace(b"user=phone\r\nCall-ID", b"user=phone;tag=x1\r\nCall-ID")
    ack_text = ack_text.replace(b"Content-Type: application/sdp", b"l: 0")
    wrong_tag = parse_message(ack_text.replace(b"tag=x1", b"tag=x2"))
    assert isinstance(wrong_tag, Request)
    layer.receive(wrong_tag, source, 0.5)
    assert events(layer) == [AckReceived(wrong_tag, source)]  # not this transaction's response
    assert txn.state is State.COMPLETED
    layer.receive(parse_message(ack_text), source, 0.6)
    assert state(txn) is State.CONFIRMED and events(layer) == []


# --- RFC 3581 rport / received --------------------------------------------------------------


@pytest.mark.parametrize(
    ("via", "source", "expected"),
    [
        (  # behind a NAT, rport asked: both filled, rport keeps its place
            "SIP/2.0/UDP 10.0.0.1:5060;rport",
            Address("udp", "192.0.2.1", 40000),
            "SIP/2.0/UDP 10.0.0.1:5060;rport=40000;branch=z9hG4bKv1;received=192.0.2.1",
        ),
        (  # same address, no rport: untouched
            "SIP/2.0/UDP 192.0.2.1:5060",
            Address("udp", "192.0.2.1", 5060),
            "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKv1",
        ),
        (  # different address, no rport: received only
            "SIP/2.0/UDP 10.0.0.1:5060",
            Address("udp", "192.0.2.1", 40000),
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKv1;received=192.0.2.1",
        ),
        (  # rport asked from the sent-by address: RFC 3581 still wants received
            "SIP/2.0/UDP 192.0.2.1:5060;rport",
            Address("udp", "192.0.2.1", 5060),
            "SIP/2.0/UDP 192.0.2.1:5060;rport=5060;branch=z9hG4bKv1;received=192.0.2.1",
        ),
        (  # IPv6 written two ways is the same address
            "SIP/2.0/UDP [2001:db8::1]:5060",
            Address("udp", "2001:DB8:0::1", 5060),
            "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKv1",
        ),
    ],
)
def test_received_and_rport_are_stamped(
    layer: TransactionLayer, via: str, source: Address, expected: str
) -> None:
    options = request("OPTIONS", "z9hG4bKv1", via=via)
    txn = receive_new(layer, options, source)
    assert txn.request.headers.get_all("via") == [expected]
    assert txn.peer == source
    layer.send_response(txn, options.make_response(200), 0.0)
    [(data, dest)] = layer.datagrams_to_send()
    assert dest == source  # answered where it came from, whatever the Via says
    assert f"Via: {expected}\r\n".encode() in data


def test_stamping_keeps_lower_vias(layer: TransactionLayer) -> None:
    options = request("OPTIONS", "z9hG4bKv2;rport", via="SIP/2.0/UDP 10.0.0.1",
                      extra=("Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp",))  # fmt: skip
    txn = receive_new(layer, options, Address("udp", "192.0.2.1", 1234))
    assert [v.host for v in txn.request.vias] == ["10.0.0.1", "proxy.example.com"]
    assert txn.request.via.param("rport") == "1234"


# --- stray messages, errors, API misuse -----------------------------------------------------


def test_stray_response_and_ack(layer: TransactionLayer) -> None:
    resp = response_to(request("OPTIONS", "z9hG4bKnobody"), 200)
    layer.receive(resp, PEER, 0.0)
    ack = request("ACK", "z9hG4bKnobody2", to_tag="t")
    layer.receive(ack, PEER, 0.0)
    assert events(layer) == [StrayResponse(resp, PEER), AckReceived(ack, PEER)]
    assert layer.stats() == (0, 0, 0, 0)


def test_send_stateless(layer: TransactionLayer) -> None:
    ack = request("ACK", layer.new_branch(), to_tag="t")
    layer.send_stateless(ack, PEER)
    assert layer.datagrams_to_send() == [(ack.to_bytes(), PEER)]
    assert layer.stats() == (0, 0, 0, 0)


def test_transport_error_ends_a_client_transaction(layer: TransactionLayer) -> None:
    txn = layer.send_request(request("INVITE", layer.new_branch()), PEER_TCP, 0.0)
    layer.transport_error(txn, 0.1)
    assert events(layer) == [TransportError(txn), TransactionTerminated(txn)]
    assert layer.get_timer() is None


def test_api_misuse_raises_local_protocol_error(layer: TransactionLayer) -> None:
    with pytest.raises(LocalProtocolError):
        layer.send_request(request("ACK", layer.new_branch()), PEER, 0.0)
    with pytest.raises(LocalProtocolError):
        layer.send_request(request("OPTIONS", MAGIC_COOKIE), PEER, 0.0)
    req = request("OPTIONS", layer.new_branch())
    layer.send_request(req, PEER, 0.0)
    with pytest.raises(LocalProtocolError):
        layer.send_request(req, PEER, 0.0)
    register = request("REGISTER", "z9hG4bKreg-9")
    txn = receive_new(layer, register)
    with pytest.raises(LocalProtocolError):
        layer.send_response(txn, register.make_response(200), 0.0, retransmit_2xx=True)
    client = layer.send_request(request("OPTIONS", layer.new_branch()), PEER, 0.0)
    # The compiled build (D17) checks the argument's type at the call, before our own check.
    with pytest.raises((LocalProtocolError, TypeError)):
        layer.send_response(client, register.make_response(200), 0.0)  # type: ignore[arg-type]


def test_new_branch() -> None:
    branches = {new_branch() for _ in range(1000)}
    assert len(branches) == 1000
    for branch in branches:
        assert branch.startswith(MAGIC_COOKIE) and len(branch) >= len(MAGIC_COOKIE) + 16
        assert is_token(branch)
    assert new_branch(random.Random(1)) == new_branch(random.Random(1))


# --- structure and bookkeeping --------------------------------------------------------------


@pytest.mark.parametrize("table", [INVITE_CLIENT, NON_INVITE_CLIENT, INVITE_SERVER,
                                   NON_INVITE_SERVER])  # fmt: skip
def test_tables_start_timers_last_and_never_leave_terminated(table: Table) -> None:
    for (state, _), (_, actions) in table.items():
        assert state is not State.TERMINATED
        kinds = [isinstance(a, Timer) for a in actions]
        assert kinds == sorted(kinds), actions  # a zero timer may end the transaction


def test_get_timer_is_always_the_earliest_pending_deadline() -> None:
    rng = random.Random(3)
    layer = TransactionLayer(rng=rng)
    live: list[Transaction] = []
    now = 0.0
    for step in range(3000):
        now += rng.choice((0.0, 0.01, 0.1, 0.7, 3.0))
        _random_step(layer, rng, live, step, now)
        if rng.random() < 0.3:
            layer.handle_timer(now)
        events(layer)
        layer.datagrams_to_send()
        live = [t for t in live if not t.terminated]
        owners = [*live, *layer._pending_2xx.values()]  # 2xx jobs outlive their transaction
        pending = [d for owner in owners for d in owner.timers.values()]
        assert layer.get_timer() == (min(pending) if pending else None)


def _random_step(layer: TransactionLayer, rng: random.Random, live: list[Transaction],
                 step: int, now: float) -> None:  # fmt: skip
    method = rng.choice(("INVITE", "OPTIONS"))
    peer = rng.choice((PEER, PEER_TCP))
    clients = [t for t in live if isinstance(t, ClientTransaction)]
    servers = [
        t
        for t in live
        if isinstance(t, ServerTransaction)
        and (t.method == "INVITE" or t.state in (State.TRYING, State.PROCEEDING))
    ]
    action = rng.randrange(4)
    if action == 0:
        live.append(layer.send_request(request(method, layer.new_branch()), peer, now))
    elif action == 1:
        live.append(receive_new(layer, request(method, f"z9hG4bKs{step}"), peer, now))
    elif action == 2 and clients:
        client = rng.choice(clients)
        layer.receive(response_to(client.request, rng.choice((100, 180, 200, 486))), peer, now)
    elif action == 3 and servers:
        txn = rng.choice(servers)
        status = rng.choice((180, 200, 486))
        retransmit = status == 200 and txn.method == "INVITE" and rng.random() < 0.5
        resp = txn.request.make_response(status, to_tag="t")
        layer.send_response(txn, resp, now, retransmit_2xx=retransmit)
        if txn.method == "INVITE" and rng.random() < 0.5:
            layer.receive(request("ACK", txn.request.via.branch or "", to_tag="t"), peer, now)


def quick_register(branch: str, call_id: str, cseq: int) -> Request:
    return new_request("REGISTER", "sip:example.com", [
        ("Via", f"SIP/2.0/UDP 192.0.2.20:5060;branch={branch}"), ("Max-Forwards", "70"),
        ("From", "<sip:alice@example.com>;tag=a1"), ("To", "<sip:alice@example.com>"),
        ("Call-ID", call_id), ("CSeq", f"{cseq} REGISTER"),
    ])  # fmt: skip


def register_pair(layer: TransactionLayer, i: int, peer: Address, now: float,
                  seen: list[Event]) -> None:  # fmt: skip
    """One REGISTER we send and get answered, one we receive and answer; events go to `seen`.

    Messages are composed, not parsed: this measures the layer, not the parser.
    """
    out = quick_register(layer.new_branch(), f"out-{i}", i + 1)
    layer.send_request(out, peer, now)
    layer.receive(out.make_response(200, to_tag="r"), peer, now)
    incoming = quick_register(f"z9hG4bKin-{i}", f"in-{i}", i + 1)
    layer.receive(incoming, peer, now)
    new = events(layer)
    (txn,) = [e.txn for e in new if isinstance(e, RequestReceived)]
    layer.send_response(txn, incoming.make_response(200, to_tag="r"), now)
    seen += new + events(layer)


def test_no_leak_after_10000_register_transactions_on_udp(layer: TransactionLayer) -> None:
    seen: list[Event] = []
    now = 0.0
    for i in range(5_000):  # 5,000 client + 5,000 server transactions
        now = i * 0.004  # 250/s each way: all 5,000 server ones are alive at once (Timer J)
        if i % 100 == 0:
            layer.handle_timer(now)
        register_pair(layer, i, PEER, now, seen)
        layer.datagrams_to_send()
    stats = layer.stats()
    assert stats.heap_entries <= 3 * (stats.clients + stats.servers) + 2048
    run(layer, now + 100.0)
    seen += events(layer)
    assert sum(isinstance(e, TransactionTerminated) for e in seen) == 10_000
    assert layer.stats() == (0, 0, 0, 0)
    assert layer.get_timer() is None


def test_no_leak_on_tcp_without_ever_handling_timers(layer: TransactionLayer) -> None:
    # Terminated at once (K = J = 0), leaving only cancelled Timer F entries in the heap.
    seen: list[Event] = []
    for i in range(2_500):
        register_pair(layer, i, PEER_TCP, i * 0.001, seen)
        layer.datagrams_to_send()
    assert sum(isinstance(e, TransactionTerminated) for e in seen) == 5_000
    stats = layer.stats()
    assert (stats.clients, stats.servers, stats.retransmitting_2xx) == (0, 0, 0)
    assert stats.heap_entries <= 2 * 1024 + 2  # cancelled Timer F entries are compacted away
