"""The B2BUA's forking logic, driven by hand with a fake clock and fake media.

The transaction layer is the real one; what the B2BUA sends is read back from its datagram queue
and parsed, and phones' answers are fed in as parsed responses.
"""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from media.bridge import BridgeStats, FlowStats
from media.ptmap import PtMaps
from softswitch.call_model import Call, ForkTarget, LineRef
from softswitch.calls import B2BUA
from softswitch.lines import CallState, Direction, LineBus, LineEvent
from softswitch.sip.errors import LocalProtocolError
from softswitch.sip.headers import Headers
from softswitch.sip.message import Request, Response, parse_message
from softswitch.sip.transaction import Address, ClientTransaction
from softswitch.sip.transaction_layer import (
    AckReceived,
    AckTimeout,
    RequestReceived,
    ResponseReceived,
    StrayResponse,
    TransactionLayer,
    TransactionTimeout,
)

CALLER = Address("udp", "127.0.0.1", 5070)
PHONES = [Address("udp", "127.0.0.1", 6000 + 2 * i) for i in range(4)]
SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
)


@dataclass
class FakeEndpoint:
    port: int
    remote: Any = None

    def set_remote(self, rtp: Any, rtcp: Any = None) -> None:
        self.remote = rtp


@dataclass
class FakeBridge:
    ports: tuple[int, int]
    pt_maps: PtMaps | None = None

    def set_pt_maps(self, pt_maps: PtMaps | None) -> None:
        self.pt_maps = pt_maps

    def stats(self) -> BridgeStats:
        return BridgeStats(FlowStats(0, 0, 0, 0), FlowStats(0, 0, 0, 0))


@dataclass
class FakeMedia:
    address: str = "127.0.0.1"
    next_port: int = 30000
    released: list[int] = field(default_factory=list)
    bridges: list[tuple[int, int]] = field(default_factory=list)
    made: list[FakeBridge] = field(default_factory=list)
    exhausted: bool = False
    pooled: bool = True

    async def allocate_endpoint(self) -> FakeEndpoint:
        from media.errors import PortsExhausted

        if self.exhausted:
            raise PortsExhausted("no ports")
        self.next_port += 2
        return FakeEndpoint(self.next_port)

    def take_ready(self, count: int) -> list[FakeEndpoint] | None:
        """Like the relay's pool: ready endpoints at once, unless `pooled` is off."""
        if self.exhausted or not self.pooled:
            return None
        ports = [self.next_port + 2 * (i + 1) for i in range(count)]
        self.next_port = ports[-1]
        return [FakeEndpoint(p) for p in ports]

    def release(self, ep: FakeEndpoint) -> None:
        self.released.append(ep.port)

    def bridge(
        self, a: FakeEndpoint, b: FakeEndpoint, *, pt_maps: PtMaps | None = None
    ) -> FakeBridge:
        self.bridges.append((a.port, b.port))
        self.made.append(FakeBridge((a.port, b.port), pt_maps))
        return self.made[-1]

    def unbridge(self, bridge: Any) -> None:
        pass


class Rig:
    """A B2BUA with a real transaction layer, a fake clock and captured output."""

    def __init__(self) -> None:
        self.now = 100.0
        self.layer = TransactionLayer()
        self.media = FakeMedia()
        self.bus = LineBus()
        self.events: list[LineEvent] = []
        self.bus.subscribe(self.events.append)
        self.sent: list[tuple[Any, Address]] = []
        self.b2bua = B2BUA(
            self.layer,
            self.media,
            self.bus,
            lambda t: Address(t, "127.0.0.1", 5060),
            self.flush,
            lambda: self.now,
        )

    def flush(self) -> None:
        for data, dest in self.layer.datagrams_to_send():
            msg = parse_message(data)
            # What a composer rendered itself (`Headers.set_wire`: forks, ACKs, CANCELs) is
            # what the generic rendering of the same fields gives.
            assert msg.to_bytes() == data
            self.sent.append((msg, dest))
        while (ev := self.layer.next_event()) is not None:
            if isinstance(ev, ResponseReceived):
                self.b2bua.on_response(ev.txn, ev.response)
            elif isinstance(ev, AckReceived):
                self.b2bua.on_ack(ev.request)
            elif isinstance(ev, AckTimeout):
                self.b2bua.on_ack_timeout(ev.txn)  # type: ignore[arg-type]
            elif isinstance(ev, StrayResponse):
                self.b2bua.on_stray_2xx(ev.response)
            elif isinstance(ev, TransactionTimeout) and isinstance(ev.txn, ClientTransaction):
                # As the service: a server transaction's end (Timer H/I) is not the B2BUA's.
                self.b2bua.on_timeout(ev.txn)

    def take(self, dest: Address | None = None, method: str | None = None) -> list[Any]:
        out = [
            m
            for m, d in self.sent
            if (dest is None or d == dest)
            and (
                method is None
                or (isinstance(m, Request) and m.method == method)
                or (method.isdigit() and isinstance(m, Response) and m.status == int(method))
            )
        ]
        return out

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.layer.handle_timer(self.now)
        self.b2bua.handle_timer(self.now)
        self.flush()

    async def invite(
        self,
        n_targets: int = 3,
        ring_time: float = 30,
        call_id: str = "call-1",
        caller: Address = CALLER,
        phones: list[Address] | None = None,
        body: bytes = SDP,
    ) -> Any:
        """The caller's INVITE (`body=b""`: a late offer), forked to `n_targets` phones."""
        txn, pending = self.begin(n_targets, ring_time, call_id, caller, phones, body)
        if pending is not None:  # no endpoints ready (FakeMedia.pooled off): bound first
            await pending
        return txn

    def begin(
        self,
        n_targets: int = 3,
        ring_time: float = 30,
        call_id: str = "call-1",
        caller: Address = CALLER,
        phones: list[Address] | None = None,
        body: bytes = SDP,
        targets: list[ForkTarget] | None = None,
        caller_pai: str | None = None,
    ) -> tuple[Any, Coroutine[Any, Any, None] | None]:
        """`invite` up to `B2BUA.begin_call`: the transaction and what is left to await."""
        ctype = "Content-Type: application/sdp\r\n" if body else ""
        raw = (
            "INVITE sip:1001@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {caller.host}:{caller.port};branch=z9hG4bK{call_id}\r\n"
            'From: "Dave" <sip:1004@127.0.0.1>;tag=abc\r\nTo: <sip:1001@127.0.0.1>\r\n'
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:1004@{caller.host}:{caller.port}>\r\n"
            f"Max-Forwards: 70\r\n{ctype}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.layer.receive(parse_message(raw), caller, self.now)
        ev = self.layer.next_event()
        assert isinstance(ev, RequestReceived)
        if targets is None:
            targets = [
                ForkTarget(f"10{i + 1:02d}", f"sip:x@127.0.0.1:{p.port}", p)
                for i, p in enumerate((phones or PHONES)[:n_targets])
            ]
        lines = [LineRef("1001", Direction.INBOUND, None, "1004", "Dave")]
        pending = self.b2bua.begin_call(
            ev.txn,
            ev.request,
            caller,
            lines=lines,
            caller_from='"Dave" <sip:1004@127.0.0.1>',
            caller_pai=caller_pai,
            targets=targets,
            ring_time=ring_time,
        )
        return ev.txn, pending

    def answer(self, phone: Address, status: int, tag: str, body: bytes = b"") -> None:
        inv = self.take(phone, "INVITE")[-1]
        resp = inv.make_response(status, to_tag=tag)
        resp.headers.add("Contact", f"<sip:x@{phone.host}:{phone.port}>")
        if body:
            resp.headers.add("Content-Type", "application/sdp")
            resp.body = body
        self.layer.receive(parse_message(resp.to_bytes()), phone, self.now)
        self.flush()


async def test_first_answer_wins_and_the_others_are_cancelled_with_reason() -> None:
    rig = Rig()
    await rig.invite(3)
    assert len(rig.take(method="INVITE")) == 3
    for i, phone in enumerate(PHONES[:3]):
        rig.answer(phone, 180, f"t{i}")
    rig.answer(PHONES[1], 200, "t1", SDP)
    cancels = rig.take(method="CANCEL")
    assert sorted(
        d.port
        for _, d in ((c, d) for c, d in rig.sent if isinstance(c, Request) and c.method == "CANCEL")
    ) == [PHONES[0].port, PHONES[2].port]
    assert all(
        c.headers.get("reason") == 'SIP;cause=200;text="Call completed elsewhere"' for c in cancels
    )
    assert len(rig.take(PHONES[1], "ACK")) == 1
    ok = rig.take(CALLER, "200")
    assert len(ok) == 1 and b"m=audio 30002 " in ok[0].body  # the caller sees our relay
    assert rig.media.bridges == [(30002, 30004)]
    assert [e.state for e in rig.events] == [CallState.RINGING, CallState.ACTIVE]
    assert rig.events[-1].party == "1002"


async def test_an_ended_call_and_its_failed_forks_are_let_go() -> None:
    """Nothing keeps a finished call's objects for the GC to walk: the ring timer holds the
    call's id, not the call, and a fork's transaction drops its INVITE after a 486 (it keeps
    only the ACK's bytes through Timer D)."""
    rig = Rig()
    await rig.invite(2)
    txns = list(rig.b2bua._clients)
    call_id = next(iter(rig.b2bua.calls))
    for i, phone in enumerate(PHONES[:2]):
        rig.answer(phone, 486, f"t{i}")
    assert len(rig.take(CALLER, "486")) == 1 and call_id not in rig.b2bua.calls
    for txn in txns:
        with pytest.raises(LocalProtocolError):
            txn.request  # noqa: B018  (released)
    assert rig.b2bua._timers  # the ring timer is still armed...
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Call and o.id == call_id]  # ...alone
    rig.advance(31)  # and firing finds no call to fail again
    assert not rig.b2bua._timers and rig.events[-1].state != CallState.RINGING


async def test_cancel_waits_for_a_provisional_response() -> None:
    rig = Rig()
    await rig.invite(2)
    rig.answer(PHONES[0], 200, "t0", SDP)  # phone 1 has not even said 180 yet
    assert rig.take(PHONES[1], "CANCEL") == []
    rig.answer(PHONES[1], 180, "t1")
    assert len(rig.take(PHONES[1], "CANCEL")) == 1


async def test_all_busy_gives_486() -> None:
    rig = Rig()
    await rig.invite(2)
    rig.answer(PHONES[0], 486, "t0")
    assert rig.take(CALLER, "486") == []
    rig.answer(PHONES[1], 600, "t1")
    assert len(rig.take(CALLER, "486")) == 1
    assert sorted(rig.media.released) == [30002, 30004]
    assert rig.events[-1].state is CallState.ENDED


async def test_mixed_failures_give_480() -> None:
    rig = Rig()
    await rig.invite(2)
    rig.answer(PHONES[0], 486, "t0")
    rig.answer(PHONES[1], 404, "t1")
    assert len(rig.take(CALLER, "480")) == 1


async def test_ring_timeout_cancels_everyone_and_answers_480() -> None:
    rig = Rig()
    await rig.invite(2, ring_time=20)
    for i, phone in enumerate(PHONES[:2]):
        rig.answer(phone, 180, f"t{i}")
    rig.advance(19.9)
    assert rig.take(CALLER, "480") == []
    rig.advance(0.2)
    assert len(rig.take(CALLER, "480")) == 1
    assert len(rig.take(method="CANCEL")) == 2
    assert rig.events[-1].reason == "timeout"


async def test_no_targets_is_480_and_exhausted_ports_503() -> None:
    rig = Rig()
    await rig.invite(0)
    assert len(rig.take(CALLER, "480")) == 1
    rig2 = Rig()
    rig2.media.exhausted = True
    await rig2.invite(2)
    assert len(rig2.take(CALLER, "503")) == 1
    assert rig2.take(method="INVITE") == []


async def test_forks_leave_in_the_invites_own_step_when_endpoints_are_ready() -> None:
    """The relay's pool has endpoints: no task, no loop iteration between INVITE and forks."""
    rig = Rig()
    txn = await rig.invite(2)
    assert len(rig.take(method="INVITE")) == 2
    assert rig.b2bua._by_invite[txn].a_media is not None


async def test_without_ready_endpoints_the_forks_wait_for_the_binding() -> None:
    """No pooled endpoints: `begin_call` hands back the rest of the work, and a CANCEL that
    comes while the endpoints are being bound ends the call before any phone rings."""
    rig = Rig()
    rig.media.pooled = False
    await rig.invite(2)  # awaits the returned coroutine
    assert len(rig.take(method="INVITE")) == 2
    late = Rig()
    late.media.pooled = False
    txn, pending = late.begin(1, call_id="late")
    assert pending is not None and late.take(method="INVITE") == []
    late.layer.send_response(txn, txn.request.make_response(487), late.now)
    late.advance(40)  # the INVITE transaction ends (Timer H/I): the caller is gone
    await pending
    assert late.take(method="INVITE") == []
    assert late.media.released  # the endpoints bound for nothing were released


async def test_late_second_answer_is_acked_and_hung_up() -> None:
    rig = Rig()
    await rig.invite(2)
    rig.answer(PHONES[0], 180, "t0")
    rig.answer(PHONES[1], 180, "t1")
    rig.answer(PHONES[0], 200, "t0", SDP)
    rig.answer(PHONES[1], 200, "t1", SDP)  # crossed with our CANCEL
    assert len(rig.take(PHONES[1], "ACK")) == 1
    assert len(rig.take(PHONES[1], "BYE")) == 1
    assert len(rig.take(CALLER, "200")) == 1


async def test_retransmitted_2xx_is_acked_again_in_its_own_dialog_only() -> None:
    """RFC 6026 Accepted: a 2xx retransmitted on the INVITE transaction wants its ACK again
    (§13.2.2.4); a losing fork's (forks share our tag) must not be ACKed in the winner's."""
    rig = Rig()
    await rig.invite(2)
    rig.answer(PHONES[0], 180, "t0")
    rig.answer(PHONES[1], 180, "t1")
    rig.answer(PHONES[0], 200, "t0", SDP)
    rig.answer(PHONES[0], 200, "t0", SDP)  # our ACK was lost
    first, again = rig.take(PHONES[0], "ACK")
    assert (again.cseq.seq, again.to.tag, again.body) == (first.cseq.seq, "t0", b"")
    rig.answer(PHONES[1], 200, "t1", SDP)  # crossed with our CANCEL: ACK and BYE
    rig.answer(PHONES[1], 200, "t1", SDP)
    assert len(rig.take(PHONES[0], "ACK")) == 2 and len(rig.take(PHONES[1], "ACK")) == 1


@pytest.mark.parametrize("who", ["caller", "callee"])
async def test_bye_from_either_side_ends_both_legs(who: str) -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP)
    (ok,) = rig.take(CALLER, "200")
    if who == "caller":
        bye = (
            f"BYE sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;"
            f"branch=z9hG4bKbye1\r\nFrom: {ok.headers.get('from')}\r\n"
            f"To: {ok.headers.get('to')}\r\nCall-ID: call-1\r\nCSeq: 2 BYE\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        src, other = CALLER, PHONES[0]
    else:
        (inv,) = rig.take(PHONES[0], "INVITE")
        bye = (
            f"BYE sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{PHONES[0].port};"
            f"branch=z9hG4bKbye2\r\nFrom: {inv.headers.get('to')};tag=t0\r\n"
            f"To: {inv.headers.get('from')}\r\nCall-ID: {inv.call_id}\r\nCSeq: 5 BYE\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        src, other = PHONES[0], CALLER
    req = parse_message(bye.encode())
    rig.layer.receive(req, src, rig.now)
    ev = rig.layer.next_event()
    assert isinstance(ev, RequestReceived)
    leg = rig.b2bua.find_leg(ev.request)
    assert leg is not None
    rig.b2bua.on_in_dialog(ev.txn, ev.request, leg)
    assert len(rig.take(src, "200")) == (2 if src == CALLER else 1)
    assert len(rig.take(other, "BYE")) == 1
    assert sorted(rig.media.released) == [30002, 30004]
    assert rig.b2bua.calls == {}
    assert rig.events[-1].state is CallState.ENDED


async def test_missing_ack_hangs_up_both_sides() -> None:
    rig = Rig()
    txn = await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP)
    rig.b2bua.on_ack_timeout(txn)
    assert len(rig.take(CALLER, "BYE")) == 1
    assert len(rig.take(PHONES[0], "BYE")) == 1
    assert rig.b2bua.calls == {}


async def test_line_model_follows_the_call_and_returns_to_idle() -> None:
    rig = Rig()
    await rig.invite(2)
    model = rig.bus.model
    (ringing,) = model.calls("1001")
    assert ringing.state is CallState.RINGING and ringing.party is None
    assert ringing.dialog is not None and ringing.dialog[1] == ""  # nobody answered yet
    rig.answer(PHONES[1], 180, "t1")
    rig.answer(PHONES[1], 200, "t1", SDP)
    (active,) = model.calls("1001")
    assert active.state is CallState.ACTIVE and active.party == "1002"
    (inv,) = rig.take(PHONES[1], "INVITE")
    assert active.dialog == (inv.call_id, "t1", inv.from_.tag)
    rig.b2bua.on_ack_timeout(rig.b2bua.calls[active.call_id].a.invite)  # type: ignore[union-attr,arg-type]
    assert model.calls("1001") == [] and model.busy_lines() == []
    assert model.version("1001") == 3


PICKER = Address("udp", "127.0.0.1", 7000)
HOLD_SDP = SDP.replace(b"a=rtpmap:101", b"a=sendonly\r\na=rtpmap:101")


def new_invite(rig: Rig, src: Address, call_id: str, body: bytes = SDP) -> Any:
    raw = (
        f"INVITE sip:*8@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {src.host}:{src.port};"
        f"branch=z9hG4bK{call_id}\r\nFrom: <sip:1003@127.0.0.1>;tag=p1\r\n"
        f"To: <sip:*8@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:1003@{src.host}:{src.port}>\r\nMax-Forwards: 70\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    rig.layer.receive(parse_message(raw + body), src, rig.now)
    ev = rig.layer.next_event()
    assert isinstance(ev, RequestReceived)
    return ev


def reply_to(rig: Rig, req: Request, src: Address, status: int, body: bytes = b"") -> None:
    resp = req.make_response(status)
    if body:
        resp.headers.add("Content-Type", "application/sdp")
        resp.body = body
    rig.layer.receive(parse_message(resp.to_bytes()), src, rig.now)
    rig.flush()


async def test_pickup_of_a_ringing_call_answers_both_and_cancels_the_forks() -> None:
    rig = Rig()
    await rig.invite(2)
    rig.answer(PHONES[0], 180, "t0")
    rig.answer(PHONES[1], 180, "t1")
    (call,) = rig.b2bua.calls.values()
    ev = new_invite(rig, PICKER, "pick-1")
    rig.b2bua.pickup(call, ev.txn, ev.request, PICKER, "1003")
    rig.flush()
    assert len(rig.take(method="CANCEL")) == 2
    (to_caller,) = rig.take(CALLER, "200")
    (to_picker,) = rig.take(PICKER, "200")
    assert b"m=audio 30002 " in to_caller.body and b"m=audio 30004 " in to_picker.body
    assert rig.events[-1].state is CallState.ACTIVE and rig.events[-1].party == "1003"
    assert rig.media.bridges == [(30002, 30004)]


async def test_retrieve_moves_a_held_call_to_another_phone() -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP)
    (call,) = rig.b2bua.calls.values()
    (inv,) = rig.take(PHONES[0], "INVITE")
    # Phone 0 (party 1001) holds the call: re-INVITE sendonly, relayed to the caller.
    hold = (
        f"INVITE sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{PHONES[0].port};"
        f"branch=z9hG4bKhold1\r\nFrom: {inv.headers.get('to')};tag=t0\r\n"
        f"To: {inv.headers.get('from')}\r\nCall-ID: {inv.call_id}\r\nCSeq: 2 INVITE\r\n"
        f"Contact: <sip:x@127.0.0.1:{PHONES[0].port}>\r\nMax-Forwards: 70\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(HOLD_SDP)}\r\n\r\n"
    )
    rig.layer.receive(parse_message(hold.encode() + HOLD_SDP), PHONES[0], rig.now)
    ev = rig.layer.next_event()
    assert isinstance(ev, RequestReceived)
    rig.b2bua.on_in_dialog(ev.txn, ev.request, rig.b2bua.find_leg(ev.request))  # type: ignore[arg-type]
    rig.flush()
    (relayed,) = rig.take(CALLER, "INVITE")
    assert b"a=sendonly" in relayed.body
    reply_to(rig, relayed, CALLER, 200, SDP.replace(b"a=rtpmap:101", b"a=recvonly\r\na=rtpmap:101"))
    assert rig.events[-1].state is CallState.HELD and call.held_by == "1001"
    # Phone 7000 (1003) retrieves it.
    ev = new_invite(rig, PICKER, "retr-1")
    rig.b2bua.retrieve(call, call.lines[0], ev.txn, ev.request, PICKER, "1003")
    reinvites = rig.take(CALLER, "INVITE")
    assert len(reinvites) == 2 and b"sendonly" not in reinvites[-1].body
    reply_to(rig, reinvites[-1], CALLER, 200, SDP)
    (ok,) = rig.take(PICKER, "200")
    assert b"m=audio 30004 " in ok.body  # the endpoint phone 0 used now faces the picker
    (bye,) = rig.take(PHONES[0], "BYE")
    assert "retrieved elsewhere" in (bye.headers.get("reason") or "")
    assert call.b is not None and call.b.party == "1003"
    last = rig.events[-1]  # a new event since the HELD one (mypy keeps the earlier narrowing)
    assert last.state is CallState.ACTIVE and last.party == "1003"
    # A BYE from the caller now reaches the picker, and the call ends.
    (answer,) = rig.take(CALLER, "200")[:1]
    caller_bye(rig, answer, "z9hG4bKbye9", 9)
    assert len(rig.take(PICKER, "BYE")) == 1
    assert rig.b2bua.calls == {} and rig.bus.model.calls("1001") == []


CALLER2 = Address("udp", "127.0.0.1", 5072)


def caller_bye(rig: Rig, answer: Response, branch: str, cseq: int) -> None:
    """The caller hangs up in the dialog our 200 `answer` made; the B2BUA handles the BYE."""
    bye = (
        f"BYE sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{CALLER.port};"
        f"branch={branch}\r\nFrom: {answer.headers.get('from')}\r\n"
        f"To: {answer.headers.get('to')}\r\nCall-ID: {answer.call_id}\r\n"
        f"CSeq: {cseq} BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    rig.layer.receive(parse_message(bye.encode()), CALLER, rig.now)
    ev = rig.layer.next_event()
    assert isinstance(ev, RequestReceived)
    leg = rig.b2bua.find_leg(ev.request)
    assert leg is not None
    rig.b2bua.on_in_dialog(ev.txn, ev.request, leg)


def in_dialog(
    rig: Rig, phone: Address, inv: Any, tag: str, method: str, cseq: int, extra: str = ""
) -> Any:
    """A request from `phone` in the dialog its INVITE `inv` created (it answered with `tag`)."""
    raw = (
        f"{method} sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{phone.port};"
        f"branch=z9hG4bK{method}{cseq}{phone.port}\r\nFrom: {inv.headers.get('to')};tag={tag}"
        f"\r\nTo: {inv.headers.get('from')}\r\nCall-ID: {inv.call_id}\r\n"
        f"CSeq: {cseq} {method}\r\nContact: <sip:x@127.0.0.1:{phone.port}>\r\n{extra}"
        "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    rig.layer.receive(parse_message(raw.encode()), phone, rig.now)
    ev = rig.layer.next_event()
    assert isinstance(ev, RequestReceived)
    return ev


async def test_blind_transfer_rings_the_target_and_notifies_the_transferor() -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP)
    (inv,) = rig.take(PHONES[0], "INVITE")
    ev = in_dialog(rig, PHONES[0], inv, "t0", "REFER", 3, "Refer-To: <sip:1005@127.0.0.1>\r\n")
    x = rig.b2bua.find_leg(ev.request)
    assert x is not None
    target = ForkTarget("1005", f"sip:x@127.0.0.1:{PHONES[2].port}", PHONES[2])
    rig.b2bua.blind_transfer(
        x,
        ev.txn,
        ev.request,
        lines=[LineRef("1005", Direction.INBOUND, None, "1004", "Dave")],
        caller_from='"Dave" <sip:1004@127.0.0.1>',
        caller_pai=None,
        targets=[target],
        ring_time=30,
        referred_by="<sip:1001@127.0.0.1>",
    )
    assert len(rig.take(PHONES[0], "202")) == 1
    (trying,) = rig.take(PHONES[0], "NOTIFY")
    assert trying.body.startswith(b"SIP/2.0 100") and trying.headers.get("event") == "refer"
    (new,) = rig.take(PHONES[2], "INVITE")
    assert new.headers.get("referred-by") == "<sip:1001@127.0.0.1>"
    assert b"m=audio 30004 " in new.body  # the endpoint that faced the transferor
    rig.answer(PHONES[2], 180, "t2")
    rig.answer(PHONES[2], 200, "t2", SDP)
    notifies = rig.take(PHONES[0], "NOTIFY")
    assert [n.body.split(b"\r\n")[0] for n in notifies] == [
        b"SIP/2.0 100 Trying",
        b"SIP/2.0 180 Ringing",
        b"SIP/2.0 200 OK",
    ]
    assert "terminated" in (notifies[-1].headers.get("subscription-state") or "")
    assert len(rig.take(PHONES[0], "BYE")) == 1
    (reinvite,) = rig.take(CALLER, "INVITE")
    reply_to(rig, reinvite, CALLER, 200, SDP)
    assert len(rig.take(CALLER, "ACK")) == 1
    ended = [e for e in rig.events if e.state is CallState.ENDED]
    assert [(e.line, e.reason) for e in ended] == [("1001", "transferred")]
    assert (rig.events[-1].line, rig.events[-1].state, rig.events[-1].party) == (
        "1005",
        CallState.ACTIVE,
        "1005",
    )
    assert rig.bus.model.calls("1001") == []
    assert rig.media.released == []  # the endpoints moved to the new call


async def test_failed_blind_transfer_keeps_the_original_call() -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP)
    (inv,) = rig.take(PHONES[0], "INVITE")
    ev = in_dialog(rig, PHONES[0], inv, "t0", "REFER", 3, "Refer-To: <sip:1005@127.0.0.1>\r\n")
    x = rig.b2bua.find_leg(ev.request)
    assert x is not None
    target = ForkTarget("1005", f"sip:x@127.0.0.1:{PHONES[2].port}", PHONES[2])
    rig.b2bua.blind_transfer(
        x,
        ev.txn,
        ev.request,
        lines=[],
        caller_from="<sip:1004@h>",
        caller_pai=None,
        targets=[target],
        ring_time=30,
    )
    rig.answer(PHONES[2], 486, "t2")
    last = rig.take(PHONES[0], "NOTIFY")[-1]
    assert last.body.startswith(b"SIP/2.0 486")
    assert rig.take(PHONES[0], "BYE") == []
    (call,) = rig.b2bua.calls.values()
    assert call.a is not None and call.b is x and call.a.call is call
    assert rig.bus.model.calls("1001")[0].state is CallState.ACTIVE


async def attended_refer(rig: Rig, second_sdp: bytes = SDP) -> None:
    """Two calls from CALLER and CALLER2 answered on PHONES[0], whose phone then REFERs the
    first to the second (Refer-To with Replaces): the B2BUA joins the two far ends."""
    await rig.invite(1, call_id="call-1")
    rig.answer(PHONES[0], 200, "t0", SDP)
    await rig.invite(1, call_id="call-2", caller=CALLER2, body=second_sdp)
    rig.answer(PHONES[0], 200, "u0", second_sdp)
    first, second = rig.take(PHONES[0], "INVITE")
    refer_to = (
        f"Refer-To: <sip:1004@127.0.0.1?Replaces={second.call_id}%3Bto-tag%3D"
        f"{second.from_.tag}%3Bfrom-tag%3Du0>\r\n"
    )
    ev = in_dialog(rig, PHONES[0], first, "t0", "REFER", 3, refer_to)
    x1 = rig.b2bua.find_leg(ev.request)
    assert x1 is not None
    assert rig.b2bua.attended_transfer(x1, ev.txn, ev.request, second.call_id)


async def test_attended_transfer_joins_the_two_far_ends() -> None:
    rig = Rig()
    await attended_refer(rig)
    assert len(rig.take(PHONES[0], "BYE")) == 2
    assert rig.take(PHONES[0], "NOTIFY")[-1].body.startswith(b"SIP/2.0 200")
    (re1,) = rig.take(CALLER, "INVITE")
    (re2,) = rig.take(CALLER2, "INVITE")
    assert b"m=audio 30002 " in re1.body and b"m=audio 30006 " in re2.body
    assert rig.media.bridges[-1] == (30002, 30006)
    assert sorted(rig.media.released) == [30004, 30008]
    (call,) = rig.b2bua.calls.values()
    assert {call.a.dest, call.b.dest} == {CALLER, CALLER2}  # type: ignore[union-attr]


async def test_unparseable_sdp_in_a_reinvite_is_refused_not_forwarded() -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP)
    (inv,) = rig.take(PHONES[0], "INVITE")
    bad = b"v=0\r\nthis is not sdp\r\n"
    raw = (
        f"INVITE sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{PHONES[0].port};"
        f"branch=z9hG4bKbad1\r\nFrom: {inv.headers.get('to')};tag=t0\r\n"
        f"To: {inv.headers.get('from')}\r\nCall-ID: {inv.call_id}\r\nCSeq: 2 INVITE\r\n"
        f"Contact: <sip:x@127.0.0.1:{PHONES[0].port}>\r\nMax-Forwards: 70\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(bad)}\r\n\r\n"
    ).encode() + bad
    rig.layer.receive(parse_message(raw), PHONES[0], rig.now)
    ev = rig.layer.next_event()
    assert isinstance(ev, RequestReceived)
    leg = rig.b2bua.find_leg(ev.request)
    assert leg is not None
    rig.b2bua.on_in_dialog(ev.txn, ev.request, leg)
    assert len(rig.take(PHONES[0], "488")) == 1
    assert rig.take(CALLER, "INVITE") == []  # nothing reached the caller


async def test_forks_are_composed_from_a_template_and_read_back_the_same() -> None:
    """The fork INVITEs are built from shared header entries with their Via and CSeq values
    primed: what the transaction layer read from the cache must be what the phone parses."""
    rig = Rig()
    rig.layer._out.clear()
    await rig.invite(3)
    invites = rig.take(method="INVITE")
    assert len(invites) == 3
    outstanding = rig.b2bua._clients
    primed = {txn.request.via.branch: txn.request for txn in outstanding}
    for wire in invites:
        ours = primed[wire.via.branch]
        assert ours.via == wire.via and ours.cseq == wire.cseq
        assert [n for n, _ in ours.headers] == [n for n, _ in wire.headers]
    # What went out is the template's wire form: byte for byte the generic rendering.
    for txn in outstanding:
        sent = txn.request.to_bytes()
        assert txn.request.headers.wire is not None
        plain = Request("INVITE", txn.request.uri, Headers(list(txn.request.headers._items)))
        plain.body = txn.request.body
        assert sent == plain.to_bytes()
    # Shared parts are shared, the per-fork ones are not.
    assert len({i.headers.get("from") for i in invites}) == 1
    assert len({i.via.branch for i in invites}) == 3
    assert len({str(i.uri) for i in invites}) == 3


@pytest.mark.parametrize("late", [False, True])
async def test_forks_with_their_own_fields_are_sent_as_the_generic_rendering(late: bool) -> None:
    """Targets with a To display and History-Info, the service's per-fork hook and an
    asserted identity: the wire form still equals rendering the entries one by one, and a
    CR/LF smuggled into any per-fork value is refused, not sent."""
    rig = Rig()
    rig.b2bua.fork_headers = lambda call, target: [("X-Line", f"line of {target.party}")]
    targets = [
        ForkTarget(
            f"10{i + 2:02d}", f"sip:x@127.0.0.1:{p.port}", p,
            headers=(("History-Info", f"<sip:1001@127.0.0.1>;index=1.{i}"),),
            to=f'"Alice Exec (1001)" <sip:x@127.0.0.1:{p.port}>',
        )
        for i, p in enumerate(PHONES[:2])
    ]  # fmt: skip
    txn, _ = rig.begin(
        body=b"" if late else SDP, targets=targets, caller_pai="<sip:1004@127.0.0.1>"
    )
    sent = [t.request for t in rig.b2bua._clients]
    assert len(sent) == 2
    for request in sent:
        plain = Request("INVITE", request.uri, Headers(list(request.headers._items)))
        plain.body = request.body
        assert request.headers.wire is not None and request.to_bytes() == plain.to_bytes()
        assert request.headers.get("x-line") and request.headers.get("history-info")
        assert request.headers.get("p-asserted-identity") == "<sip:1004@127.0.0.1>"

    call = rig.b2bua._by_invite[txn]
    bad = ForkTarget("1009", "sip:x@127.0.0.1:7000", PHONES[3], to="<sip:x@h>\r\nX-Evil: 1")
    with pytest.raises(LocalProtocolError):
        rig.b2bua._fork(call, bad, None)
    with pytest.raises(LocalProtocolError):  # a target's own fields: when it is built
        ForkTarget("1009", "sip:x@127.0.0.1:7000", PHONES[3], headers=(("Subject", "a\nb"),))
    rig.b2bua.fork_headers = lambda call, target: [("X-Line", "a\rb")]
    with pytest.raises(LocalProtocolError):
        rig.b2bua._fork(call, targets[0], None)


# --- payload type numbering (D9) ---------------------------------------------------------------

#: A phone that knows telephone-event as 96 (the caller and the forks' SDP use 101).
SDP_96 = SDP.replace(b" 0 101", b" 0 96").replace(b"rtpmap:101", b"rtpmap:96")


async def test_a_plain_call_is_bridged_without_payload_type_maps() -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP)
    (bridge,) = rig.media.made
    assert bridge.pt_maps is None


async def test_pickup_with_another_telephone_event_number_bridges_with_maps() -> None:
    rig = Rig()
    await rig.invite(2)
    rig.answer(PHONES[0], 180, "t0")
    (call,) = rig.b2bua.calls.values()
    ev = new_invite(rig, PICKER, "pick-1", SDP_96)
    rig.b2bua.pickup(call, ev.txn, ev.request, PICKER, "1003")
    rig.flush()
    (to_caller,) = rig.take(CALLER, "200")
    (to_picker,) = rig.take(PICKER, "200")
    assert b"telephone-event" in to_caller.body and b" 0 101\r\n" in to_caller.body
    assert b" 0 96\r\n" in to_picker.body  # each phone keeps its own numbers...
    (bridge,) = rig.media.made
    assert bridge.ports == (30002, 30004)  # caller's endpoint first
    assert bridge.pt_maps == PtMaps({101: 96}, {96: 101})  # ...and the relay translates


async def test_retrieve_maps_the_far_ends_answer_to_the_new_phones_offer() -> None:
    rig = Rig()
    await rig.invite(1)
    rig.answer(PHONES[0], 200, "t0", SDP)
    (call,) = rig.b2bua.calls.values()
    ev = new_invite(rig, PICKER, "retr-1", SDP_96)
    rig.b2bua.retrieve(call, call.lines[0], ev.txn, ev.request, PICKER, "1003")
    (reinvite,) = rig.take(CALLER, "INVITE")
    assert b"rtpmap:96 telephone-event" in reinvite.body
    reply_to(rig, reinvite, CALLER, 200, SDP)  # the caller keeps its own 101 in the answer
    (bridge,) = rig.media.made
    # RFC 3264 has the caller send 96 (the offer's) and the picker 101 (the answer's), which
    # pass untouched; each sending its own numbers instead is translated too.
    assert bridge.pt_maps == PtMaps({101: 96}, {96: 101})


async def test_attended_transfer_maps_the_joined_far_ends_and_follows_their_answers() -> None:
    rig = Rig()
    await attended_refer(rig, SDP_96)
    joined = rig.media.made[-1]
    assert joined.ports == (30002, 30006)  # CALLER's endpoint, CALLER2's
    assert joined.pt_maps == PtMaps({101: 96}, {96: 101})
    # CALLER takes CALLER2's numbers in its answer: it now expects 96, while CALLER2 still
    # sends 101 (the numbers of the SDP it was sent); CALLER sends 96 as CALLER2 expects.
    (re1,) = rig.take(CALLER, "INVITE")
    reply_to(rig, re1, CALLER, 200, SDP_96)
    assert joined.pt_maps == PtMaps(None, {101: 96})
