"""The B2BUA: calls with one inbound leg and forked outbound legs, bridged through our relay.

A `Call` owns an inbound `Leg` (we are the UAS towards the caller) and one outbound `Leg` per
ringing contact (we are the UAC). The first 2xx wins; every other fork is cancelled with
`Reason: SIP;cause=200;text="Call completed elsewhere"` (RFC 3326). After the answer, in-dialog
requests (BYE, re-INVITE, UPDATE, INFO) are relayed between the two dialogs with their SDP
rewritten towards our relay. An INVITE without SDP (late offer) is forked without SDP: the
offer then comes in a 2xx and its answer in the other side's ACK (`AwaitedAck`, decision D15).

This module is signalling logic: it talks to the transaction layer (sans-I/O), asks the media
manager for endpoints, and publishes line events. Timers (ring timeout, delayed forks) live in
its own heap so the service drives them with the same clock as the transaction layer.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

import structlog

from media.errors import MediaError, PortsExhausted, SdpError
from media.negotiation import answer_from_offer
from media.ptmap import PtMaps, pt_maps
from media.sdp import Direction as SdpDirection
from media.sdp import OriginState, SessionDescription, parse_sdp, rewrite

from .lines import CallState, Direction, LineBus, LineEvent
from .sip.dialog import Dialog, new_call_id, new_tag
from .sip.headers import CSeq, Headers, Via, entry
from .sip.message import Request, Response
from .sip.transaction import Address, ClientTransaction, ServerTransaction
from .sip.transaction_layer import TransactionLayer
from .sip.uri import SipUri, parse_uri

log = structlog.get_logger("softswitch.calls")

_REASONS = {
    480: "Temporarily Unavailable",
    486: "Busy Here",
    487: "Request Terminated",
    603: "Decline",
    408: "Request Timeout",
}
COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
RETRIEVED_ELSEWHERE = 'SIP;cause=200;text="Call retrieved elsewhere"'
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, REFER, NOTIFY, SUBSCRIBE"
#: Headers carried from one leg's request or response to the other's.
RELAYED_HEADERS = (
    "content-type",
    "reason",
    "event",
    "subscription-state",
    "info-package",
    "session-expires",
    "min-se",
    "allow-events",
    "call-info",
)


class Endpoint(Protocol):
    port: int

    def set_remote(
        self, rtp: tuple[str, int] | None, rtcp: tuple[str, int] | None = None
    ) -> None: ...


class Media(Protocol):
    """What the B2BUA needs of the media layer (media.relay.MediaManager provides it)."""

    address: str

    async def allocate_endpoint(self) -> Any: ...

    def release(self, endpoint: Any) -> None: ...

    def bridge(self, a: Any, b: Any, *, pt_maps: PtMaps | None = None) -> Any:
        """Relay `a` and `b`; the result has `set_pt_maps(PtMaps | None)` (media.RelayBridge)."""
        ...

    def unbridge(self, bridge: Any) -> None: ...


class LegState(Enum):
    # Identity hashing (members are singletons) runs in C; Enum's own __hash__ is a
    # Python call on every dict and set lookup of the message path.
    __hash__ = object.__hash__

    CALLING = "calling"  # INVITE sent / received, no answer yet
    EARLY = "early"  # a provisional with a tag
    CONFIRMED = "confirmed"
    ENDED = "ended"


@dataclass(eq=False, slots=True)
class Leg:
    """One side of a call: a dialog towards one phone, where to send to, and its media."""

    call: Call
    party: str | None  # the extension this leg reaches (None: an outside/trusted peer)
    dest: Address  # where requests for this leg go (the phone's NAT-safe source address)
    invite: ServerTransaction | ClientTransaction | None
    dialog: Dialog | None = None
    state: LegState = LegState.CALLING
    origin: OriginState = field(default_factory=OriginState)
    provisional: bool = False  # a 1xx arrived (a CANCEL may be sent)
    cancel_pending: bool = False
    cancel_reason: str | None = None
    local_tag: str = field(default_factory=new_tag)
    media: Any = None  # the relay endpoint facing this leg's phone
    keys: list[tuple[str, str]] = field(default_factory=list)  # its entries in B2BUA._dialogs
    sdp: SessionDescription | None = None  # what this leg's phone last sent
    sent: SessionDescription | None = None  # what we last sent it (its payload type numbers)
    identity: str = ""  # who this leg's phone presents (extension or number)
    name: str | None = None


@dataclass(eq=False, slots=True)
class Pending:
    """An in-dialog request relayed from one leg, waiting for the other leg's final answer."""

    server: ServerTransaction | None  # None: our own re-INVITE (transfer), just ACK its 2xx
    from_leg: Leg
    #: (old leg, new leg) when the request re-targets the call to another phone (retrieve)
    takeover: tuple[Leg, Leg] | None = None


@dataclass(eq=False, slots=True)
class Transfer:
    """A blind transfer in progress: `far` rings a new target on behalf of `transferor`."""

    transferor: Leg  # the phone that sent REFER; NOTIFYs go in its dialog
    old: Call  # the call the transferor and the far end were on
    old_media: tuple[Any, Any, Any]  # old call's (a_media, b_media, bridge), restored on failure


@dataclass(eq=False, slots=True)
class AwaitedAck:
    """A 2xx that carried an offer (late offer, RFC 3264 via RFC 3261 §13.2.1): the offerer's
    phone gets its ACK only once the answerer's ACK brings the answer, since that ACK must
    carry it (§13.2.2.4). Kept after the ACK went out, to repeat it to a retransmitted 2xx."""

    offerer: Leg  # the leg whose phone sent the offer in its 2xx and waits for our ACK
    answerer: Leg  # the leg whose phone got the offer in our 2xx and answers in its ACK
    cseq: int  # CSeq number of the INVITE the offerer answered (our ACK's)
    answer_cseq: int  # CSeq number of the answerer's INVITE (its ACK's)
    server: ServerTransaction  # the answerer's INVITE, whose 2xx we retransmit
    ack: Request | None = None  # our ACK to the offerer, once sent


@dataclass(frozen=True, slots=True)
class LineRef:
    """A line this call is on, seen from that line: its direction and the remote end.

    `party` is the member using the line; None means "whoever answers" (an inbound call).
    """

    line: str
    direction: Direction
    party: str | None
    remote: str
    remote_name: str | None = None


@dataclass(eq=False)
class Call:
    """One B2BUA call."""

    id: str
    a: Leg | None = None  # the caller's leg (set right after construction)
    forks: list[Leg] = field(default_factory=list)
    b: Leg | None = None  # the answering fork
    lines: list[LineRef] = field(default_factory=list)  # the lines this call is shown on
    started_at: float = field(default_factory=time.time)
    offer: SessionDescription | None = None  # the caller's SDP offer
    a_media: Any = None
    b_media: Any = None
    bridge: Any = None
    ended: bool = False
    b_call_id: str = ""
    b_from: str = ""  # From header value (without tag) towards the callees
    b_from_tag: str = field(default_factory=new_tag)
    extra_headers: list[tuple[str, str]] = field(default_factory=list)  # e.g. Referred-By
    bye_from: Leg | None = None  # the leg whose phone hung up
    ids: set[str] = field(default_factory=set)  # its entries in B2BUA._call_ids
    fork_origin: OriginState = field(default_factory=OriginState)  # o= towards every fork
    fork_body: bytes | None = None  # the offer every fork gets, rendered once
    fork_template: ForkTemplate | None = None  # the header entries every fork shares
    transfer: Transfer | None = None  # set while this call rings a blind-transfer target
    held_by: str | None = None  # the party whose phone holds the call
    private: bool = False  # held privately: only `held_by` may retrieve it
    failures: list[int] = field(default_factory=list)
    outstanding: int = 0  # forks not yet finished (including delayed ones not yet sent)
    late: bool = False  # the caller's INVITE had no SDP: the offer comes in the callee's 2xx
    awaited: AwaitedAck | None = None  # the last offer made in a 2xx, answered in an ACK


Entry = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class ForkTemplate:
    """The header entries all forks of a call share, built once per call: a fork to 16 phones
    then costs 16 list concatenations instead of 16 x 13 `Headers.add` calls."""

    head: tuple[Entry, ...]  # Max-Forwards, From (before To)
    middle: tuple[Entry, ...]  # Call-ID, CSeq (between To and Contact)
    common: tuple[Entry, ...]  # P-Asserted-Identity, the call's extra headers
    tail: tuple[Entry, ...]  # Allow, Content-Type


@dataclass(frozen=True, slots=True)
class ForkTarget:
    """One contact to ring."""

    party: str
    uri: str  # Request-URI: the registered contact
    dest: Address
    delay: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()  # per-target extras (History-Info, To display)
    to: str = ""  # To header value for this fork


class B2BUA:
    """All calls of the service."""

    def __init__(
        self,
        layer: TransactionLayer,
        media: Media,
        bus: LineBus,
        local: Callable[[str], Address],
        flush: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        self.layer = layer
        self._now = clock  # the transaction layer's clock (loop time in the service)
        self.media = media
        self.bus = bus
        self.local = local  # transport name -> our listening Address (for Via and Contact)
        self.flush = flush
        self.calls: dict[str, Call] = {}
        self._dialogs: dict[tuple[str, str], Leg] = {}  # (Call-ID, our tag) -> leg
        self._call_ids: dict[str, Call] = {}  # every leg's Call-ID -> call (for Replaces)
        self._by_invite: dict[ServerTransaction, Call] = {}  # caller's INVITE -> call (CANCEL)
        self._clients: dict[ClientTransaction, Leg] = {}
        self._relayed: dict[ClientTransaction, Pending] = {}
        #: 2xx with an offer whose ACK (the answer) has not come yet, by the INVITE answered
        self._awaiting: dict[ServerTransaction, AwaitedAck] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        #: Extra headers for one fork (set by the service): SCA's `Call-Info` with the
        #: appearance index the call takes, for the phones of the line that show appearances.
        self.fork_headers: Callable[[Call, ForkTarget], list[tuple[str, str]]] | None = None

    # --- timers (sans-I/O: the service calls handle_timer at get_timer()) -------------------
    def get_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()

    def _later(self, now: float, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (now + delay, next(self._seq), fn))

    # --- starting calls ---------------------------------------------------------------------
    async def start_call(
        self,
        txn: ServerTransaction,
        req: Request,
        source: Address,
        *,
        lines: list[LineRef],
        caller_from: str,
        caller_pai: str | None,
        targets: list[ForkTarget],
        ring_time: float,
    ) -> None:
        """Answer `req` by forking to `targets`; the caller's identity is already decided."""
        call = Call(id=new_tag() + new_tag(), lines=lines)
        a = Leg(call, None, source, txn)
        a.identity, a.name = lines[-1].remote, lines[-1].remote_name
        call.a = a
        try:
            call.offer = parse_sdp(req.body) if req.body else None
        except SdpError as exc:
            self._reply(a, req.make_response(488, "Not Acceptable Here"), detail=str(exc))
            return
        if call.offer is None:
            # Late offer (D15): the forks go without SDP; the answering phone's 2xx offers.
            call.late = True
            call.fork_body = b""
        if not targets:
            self._reply(a, req.make_response(480, "Temporarily Unavailable"), detail="no contact")
            return
        try:
            call.a_media = await self.media.allocate_endpoint()
            call.b_media = await self.media.allocate_endpoint()
        except PortsExhausted:
            self._release_media(call)
            resp = req.make_response(503, "Service Unavailable")
            resp.headers.add("Retry-After", "5")
            self._reply(a, resp, detail="media ports exhausted")
            return
        if txn.terminated:  # cancelled while we were binding sockets
            self._release_media(call)
            return
        a.media = call.a_media
        if call.offer is not None:
            self._remember(a, call.offer)
        self.calls[call.id] = call
        self._index_leg(a, req.call_id, a.local_tag)
        self._index_call_id(call, req.call_id)
        self._by_invite[txn] = call
        call.b_call_id = new_call_id(self.local("udp").host)
        self._index_call_id(call, call.b_call_id)
        call.b_from = caller_from
        call.outstanding = len(targets)
        t0 = self._now()
        for target in targets:
            if target.delay > 0:
                self._later(t0, target.delay, _bind(self._fork, call, target, caller_pai))
            else:
                self._fork(call, target, caller_pai, log_it=False)
        # The fork set leaves first: the log line and the line event (its NOTIFYs to every
        # BLF key watching the line) are bookkeeping the ringing phones need not wait for.
        self.flush()
        now_forks = [t for t in targets if t.delay <= 0]
        log.info(
            "call_forked",
            call=call.id,
            call_id=req.call_id,
            forks=[{"party": t.party, "dest": _dest_text(t.dest)} for t in now_forks],
            delayed=len(targets) - len(now_forks),
        )
        if call.late:
            log.info("call_late_offer", call=call.id, call_id=req.call_id)
        self._later(t0, ring_time, lambda: self._ring_timeout(call))
        self._publish(call, CallState.RINGING)
        self.flush()

    def _fork(
        self, call: Call, target: ForkTarget, pai: str | None, *, log_it: bool = True
    ) -> None:
        if call.ended or call.b is not None:
            return
        # Every fork carries the same offer towards the same endpoint: render it once per
        # call, with one o= line state shared by the forks (the winner keeps it). A late
        # offer's forks carry none (start_call set the empty body).
        if call.fork_body is None:
            assert call.offer is not None
            call.fork_body = rewrite(
                call.offer,
                self.media.address,
                self._ports(call.offer, call.b_media),
                call.fork_origin,
            )
        template = call.fork_template
        if template is None:
            template = call.fork_template = self._fork_template(call, pai)
        leg = Leg(
            call,
            target.party,
            target.dest,
            None,
            local_tag=call.b_from_tag,
            media=call.b_media,
            origin=call.fork_origin,
        )
        leg.identity = target.party
        via_text, via = self._via_parts(target.dest)
        items = [
            ("via", "Via", via_text),
            *template.head,
            ("to", "To", target.to or f"<{target.uri}>"),
            *template.middle,
            ("contact", "Contact", self._contact(target.dest)),
            *template.common,
            *(entry(name, value) for name, value in target.headers),
        ]
        if self.fork_headers is not None:
            items += [entry(name, value) for name, value in self.fork_headers(call, target)]
        items += template.tail
        headers = Headers(items)
        headers.prime("via", [via])
        headers.prime("cseq", _INVITE_CSEQ)
        req = Request("INVITE", parse_uri(target.uri), headers, call.fork_body)
        txn = self.layer.send_request(req, target.dest, self._now())
        leg.invite = txn
        call.forks.append(leg)
        self._clients[txn] = leg
        if log_it:  # start_call logs the whole fork set in one line
            log.info("call_fork", call=call.id, party=target.party, dest=_dest_text(target.dest))
        # No flush here: start_call flushes once after the whole fork set, and a delayed
        # fork runs from the timer, whose caller pumps the layer.

    @staticmethod
    def _fork_template(call: Call, pai: str | None) -> ForkTemplate:
        common = [entry("P-Asserted-Identity", pai)] if pai else []
        common += [entry(name, value) for name, value in call.extra_headers]
        from_value = f"{call.b_from};tag={call.b_from_tag}"
        tail: tuple[Entry, ...] = (entry("Allow", ALLOW),)
        if not call.late:  # a late offer's forks have no body to type
            tail += (entry("Content-Type", "application/sdp"),)
        return ForkTemplate(
            head=(entry("Max-Forwards", "70"), entry("From", from_value)),
            middle=(entry("Call-ID", call.b_call_id), entry("CSeq", "1 INVITE")),
            common=tuple(common),
            tail=tail,
        )

    # --- responses on our client transactions -----------------------------------------------
    def on_response(self, txn: ClientTransaction, resp: Response) -> bool:
        """Handle a response to a request we sent; False if it is not ours."""
        pending = self._relayed.get(txn)
        if pending is not None:
            self._relay_response(txn, pending, resp)
            return True
        leg = self._clients.get(txn)
        if leg is None:
            if 200 <= resp.status < 300 and resp.cseq.method == "INVITE":
                # The transaction is in RFC 6026 Accepted: a retransmitted 2xx, which wants
                # its ACK again (§13.2.2.4) as much as one that comes after Timer M.
                self.on_stray_2xx(resp)
                return True
            return False
        if resp.status < 200:
            self._on_provisional(leg, resp)
        else:
            self._clients.pop(txn, None)
            if resp.status < 300:
                self._on_answer(leg, txn, resp)
            else:
                self._on_fork_failed(leg, resp.status)
        self.flush()
        return True

    def on_timeout(self, txn: ClientTransaction) -> bool:
        leg = self._clients.pop(txn, None)
        if leg is not None:
            self._on_fork_failed(leg, 408)
            self.flush()
            return True
        pending = self._relayed.pop(txn, None)
        if pending is not None:
            if pending.server is not None:
                resp = pending.server.request.make_response(408, "Request Timeout")
                self.layer.send_response(pending.server, resp, self._now())
            self.flush()
            return True
        return False

    def _on_provisional(self, leg: Leg, resp: Response) -> None:
        call = leg.call
        if resp.status > 100:
            leg.provisional = True
        if leg.cancel_pending and leg.provisional:
            leg.cancel_pending = False
            self._send_cancel(leg, None)
            return
        if resp.status == 100 or call.b is not None or call.ended:
            return
        if call.transfer is not None:
            if resp.status == 180:
                self._notify_refer(call.transfer.transferor, "SIP/2.0 180 Ringing", final=False)
            return
        if resp.to.tag and leg.dialog is None:
            leg.dialog = Dialog.as_uac(_invite_of(leg), resp)
            leg.state = LegState.EARLY
        a = call.a
        assert a is not None
        out = self._response_for(a, resp, resp.status, resp.reason)
        if resp.body and resp.status == 183 and not call.late:
            # In a late-offer call this SDP would be the callee's offer, which only its 2xx
            # may make here (we do not support PRACK): the 18x goes on without it (D15).
            self._add_sdp(out, resp.body, from_leg=leg, to_leg=a)
        self._send_a(a, out)

    def _on_answer(self, leg: Leg, txn: ClientTransaction, resp: Response) -> None:
        call = leg.call
        invite = _invite_of(leg)
        dialog = Dialog.as_uac(invite, resp)
        offer: SessionDescription | None = None
        if call.late:
            offer = self._late_offer_of(leg, dialog, resp)
            if offer is None:
                return
        else:
            ack = dialog.new_request("ACK", self._via(leg.dest), cseq=invite.cseq.seq)
            self.layer.send_stateless(ack, leg.dest)
            if call.b is not None or call.ended:
                # A second answer lost the race: acknowledge it and hang it up at once.
                self._hang_up_loser(leg, dialog)
                return
        leg.dialog = dialog
        leg.state = LegState.CONFIRMED
        leg.sent = call.offer  # every fork got it (None in a late-offer call)
        call.b = leg
        self._index_leg(leg, call.b_call_id, call.b_from_tag)
        for other in call.forks:
            if other is not leg and other.state in (LegState.CALLING, LegState.EARLY):
                self._cancel_fork(other, COMPLETED_ELSEWHERE)
        if call.transfer is not None:
            self._transfer_answered(call, leg, resp)
            return
        a = call.a
        assert a is not None
        out = self._response_for(a, resp, 200, "OK")
        out.headers.add("Contact", self._contact(a.dest))
        out.headers.add("Allow", ALLOW)
        assert isinstance(a.invite, ServerTransaction)
        if offer is not None:
            self._offer_in_2xx(out, leg, a, offer, invite.cseq.seq, a.invite)
        elif resp.body:
            self._add_sdp(out, resp.body, from_leg=leg, to_leg=a)
        a.dialog = Dialog.as_uas(a.invite.request, out, a.local_tag)
        a.state = LegState.CONFIRMED
        call.bridge = self.media.bridge(call.a_media, call.b_media, pt_maps=self._pt_maps(call))
        self.layer.send_response(a.invite, out, self._now(), retransmit_2xx=True)
        log.info("call_answered", call=call.id, party=leg.party)
        self._publish(call, CallState.ACTIVE)

    def _on_fork_failed(self, leg: Leg, status: int) -> None:
        call = leg.call
        leg.state = LegState.ENDED
        call.failures.append(status)
        call.outstanding -= 1
        if call.b is None and not call.ended and call.outstanding <= 0:
            self._fail_call(call, _aggregate(call.failures), "no answer")

    def _ring_timeout(self, call: Call) -> None:
        if call.b is not None or call.ended:
            return
        self._fail_call(call, 480, "timeout")
        self.flush()

    def _fail_call(self, call: Call, status: int, reason: str) -> None:
        for leg in call.forks:
            if leg.state in (LegState.CALLING, LegState.EARLY):
                self._cancel_fork(leg, None)
        if call.transfer is not None:
            self._transfer_failed(call, status, reason)
            return
        a = call.a
        assert a is not None and isinstance(a.invite, ServerTransaction)
        self._reply(
            a, a.invite.request.make_response(status, None, to_tag=a.local_tag), detail=reason
        )
        self._end(call, reason)

    # --- CANCEL -----------------------------------------------------------------------------
    def on_cancel(self, invite_txn: ServerTransaction, cancel: Request) -> bool:
        """A CANCEL for an INVITE we are forking: stop everything, answer 487."""
        call = self._by_invite.get(invite_txn)
        if call is None or call.b is not None:
            return call is not None
        reason = cancel.headers.get("reason")
        for leg in call.forks:
            if leg.state in (LegState.CALLING, LegState.EARLY):
                self._cancel_fork(leg, reason)
        a = call.a
        assert a is not None
        self._reply(
            a,
            invite_txn.request.make_response(487, "Request Terminated", to_tag=a.local_tag),
            detail="cancelled",
        )
        self._end(call, "cancel")
        self.flush()
        return True

    def _cancel_fork(self, leg: Leg, reason: str | None) -> None:
        leg.state = LegState.ENDED
        if not leg.provisional:
            leg.cancel_pending = True  # §9.1: no CANCEL before a provisional response
            leg.cancel_reason = reason
            return
        self._send_cancel(leg, reason)

    def _send_cancel(self, leg: Leg, reason: str | None) -> None:
        invite = _invite_of(leg)
        headers = Headers()
        headers.add("Via", invite.headers.get("via") or "")
        headers.add("Max-Forwards", "70")
        headers.add("From", invite.headers.get("from") or "")
        headers.add("To", invite.headers.get("to") or "")
        headers.add("Call-ID", invite.call_id)
        headers.add("CSeq", f"{invite.cseq.seq} CANCEL")
        reason = reason or leg.cancel_reason
        if reason:
            headers.add("Reason", reason)
        self.layer.send_request(Request("CANCEL", invite.uri, headers), leg.dest, self._now())

    # --- in-dialog requests -----------------------------------------------------------------
    def find_leg(self, req: Request) -> Leg | None:
        tag = req.to.tag
        return None if tag is None else self._dialogs.get((req.call_id, tag))

    def on_in_dialog(self, txn: ServerTransaction, req: Request, leg: Leg) -> None:
        """BYE, re-INVITE, UPDATE, INFO... from one side: relay to the other side."""
        call = leg.call
        other = call.b if leg is call.a else call.a
        if leg.dialog is not None and not leg.dialog.accept_remote_cseq(req):
            self.layer.send_response(txn, req.make_response(500, "Out Of Order"), self._now())
            self.flush()
            return
        if req.method == "BYE":
            self.layer.send_response(txn, req.make_response(200, "OK"), self._now())
            if call.awaited is not None:  # a held ACK goes first: its phone awaits it
                self._decline_awaited(call.awaited)
            if other is not None and other.dialog is not None and other.state is not LegState.ENDED:
                bye = other.dialog.new_request("BYE", self._via(other.dest))
                self.layer.send_request(bye, other.dest, self._now())
            call.bye_from = leg
            self._end(call, "bye", by=leg.party)
            self.flush()
            return
        if other is None or other.dialog is None or call.ended:
            self.layer.send_response(txn, req.make_response(481), self._now())
            self.flush()
            return
        if leg.dialog is not None and req.method in ("INVITE", "UPDATE"):
            leg.dialog.update_target(req)
        extra = [
            (n, v)
            for n, v in req.headers
            if n.lower() in RELAYED_HEADERS and not _is_appearance(n, v)
        ]
        body = req.body
        if req.body and req.method in ("INVITE", "UPDATE"):
            if not _parses(req.body):
                # Never forward SDP we cannot rewrite: it would take media around the relay.
                resp = req.make_response(488, "Not Acceptable Here")
                self.layer.send_response(txn, resp, self._now())
                self.flush()
                return
            body = self._rewrite_for(call, req.body, from_leg=leg, to_leg=other)
            extra = [(n, v) for n, v in extra if n.lower() != "content-type"]
            extra.append(("Content-Type", "application/sdp"))
        if req.method == "INVITE":
            if not req.body:  # asks for an offer (D15): no body to type
                extra = [(n, v) for n, v in extra if n.lower() != "content-type"]
            extra.append(("Allow", ALLOW))
        out = other.dialog.new_request(
            req.method,
            self._via(other.dest),
            contact=self._contact(other.dest) if req.method in ("INVITE", "UPDATE") else None,
            extra=extra,
            body=body,
        )
        client = self.layer.send_request(out, other.dest, self._now())
        self._relayed[client] = Pending(txn, leg)
        if req.method == "INVITE":
            self._publish_hold_state(call, req.body, by=leg)
        self.flush()

    def _relay_response(self, txn: ClientTransaction, pending: Pending, resp: Response) -> None:
        if resp.status < 200 and (resp.status == 100 or pending.takeover is not None):
            return
        if pending.takeover is not None:
            self._complete_takeover(txn, pending, resp)
            return
        if pending.server is None:
            self._own_reinvite_answered(txn, pending, resp)
            return
        to_leg = pending.from_leg
        other = to_leg.call.b if to_leg is to_leg.call.a else to_leg.call.a
        out = pending.server.request.make_response(resp.status, resp.reason)
        for name, value in resp.headers:
            if name.lower() in RELAYED_HEADERS and name.lower() != "content-type":
                out.headers.add(name, value)
        if resp.body and other is not None and txn.request.method in ("INVITE", "UPDATE"):
            out.body = self._rewrite_for(to_leg.call, resp.body, from_leg=other, to_leg=to_leg)
            out.headers.add("Content-Type", "application/sdp")
            if 200 <= resp.status < 300 and txn.request.body:  # an offer/answer completed
                self._refresh_pt_maps(to_leg.call)
        elif resp.body:
            out.body = resp.body
            ctype = resp.headers.get("content-type")
            if ctype:
                out.headers.add("Content-Type", ctype)
        if txn.request.method == "INVITE" and 200 <= resp.status < 300 and other is not None:
            assert other.dialog is not None
            other.dialog.update_target(resp)
            if out.body and not txn.request.body:
                # A re-INVITE without SDP: this 2xx offers, the requester's ACK answers (D15).
                self._await_answer(other, to_leg, txn.request.cseq.seq, pending.server)
            else:
                ack = other.dialog.new_request(
                    "ACK", self._via(other.dest), cseq=txn.request.cseq.seq
                )
                self.layer.send_stateless(ack, other.dest)
            out.headers.add("Contact", self._contact(to_leg.dest))
        if resp.status >= 200:
            self._relayed.pop(txn, None)
        self.layer.send_response(
            pending.server,
            out,
            self._now(),
            retransmit_2xx=pending.server.request.method == "INVITE" and 200 <= resp.status < 300,
        )
        self.flush()

    def on_ack(self, req: Request) -> bool:
        """An ACK for a 2xx we sent: stop retransmitting that 2xx."""
        leg = self.find_leg(req)
        if leg is None:
            return False
        if isinstance(leg.invite, ServerTransaction):
            self.layer.stop_2xx_retransmission(leg.invite)
        aw = leg.call.awaited
        if (
            aw is not None
            and aw.ack is None
            and aw.answerer is leg
            and req.cseq.seq == aw.answer_cseq
        ):
            self._answer_in_ack(aw, req)
        return True

    def on_ack_timeout(self, txn: ServerTransaction) -> None:
        """Our 2xx to the caller was never acknowledged (§13.3.1.4): hang up both sides."""
        aw = self._awaiting.pop(txn, None)
        if aw is not None:  # the answer will never come either
            self._give_up_answer(aw, "no ack")
            return
        call = self._by_invite.get(txn)
        if call is None:
            return
        for leg in (call.a, call.b):
            if leg is not None and leg.dialog is not None:
                bye = leg.dialog.new_request("BYE", self._via(leg.dest))
                self.layer.send_request(bye, leg.dest, self._now())
        self._end(call, "no ack")
        self.flush()

    def on_stray_2xx(self, resp: Response) -> None:
        """A retransmitted 2xx to one of our INVITEs: ACK it again (§13.2.2.4)."""
        leg = self._dialogs.get((resp.call_id, resp.from_.tag or ""))
        if leg is None or leg.dialog is None or resp.cseq.method != "INVITE":
            return
        if resp.to.tag != leg.dialog.remote_tag:
            return  # a losing fork's (forks share our tag): not this dialog's to acknowledge
        aw = leg.call.awaited
        if aw is not None and aw.offerer is leg and aw.cseq == resp.cseq.seq:
            # A late offer's 2xx: absorbed until the answer comes, then the same ACK again.
            if aw.ack is not None:
                self.layer.send_stateless(aw.ack, leg.dest)
                self.flush()
            return
        ack = leg.dialog.new_request("ACK", self._via(leg.dest), cseq=resp.cseq.seq)
        self.layer.send_stateless(ack, leg.dest)
        self.flush()

    # --- late offer: the offer in a 2xx, the answer in the ACK (D15) -----------------------
    def _late_offer_of(self, leg: Leg, dialog: Dialog, resp: Response) -> SessionDescription | None:
        """The offer in a late-offer fork's 2xx, or None if this 2xx cannot be the answer: it
        lost the race, or has no SDP we can relay. Such a 2xx still gets its ACK, with an
        answer declining every stream (§13.2.2.4: a valid answer, then BYE)."""
        call = leg.call
        offer = _sdp_or_none(resp.body)
        if offer is not None and call.b is None and not call.ended:
            return offer
        # An o= of its own: the forks' shared one is the winner's.
        body = self._declining(offer, OriginState()) if offer is not None else b""
        self._ack(dialog, leg.dest, _invite_of(leg).cseq.seq, body)
        if call.b is not None or call.ended:
            self._hang_up_loser(leg, dialog)
            return None
        log.warning("late_offer_unusable", call=call.id, call_id=dialog.call_id, party=leg.party)
        self._hang_up_loser(leg, dialog, reason=None)
        self._on_fork_failed(leg, 488)  # the other forks may still answer
        return None

    def _hang_up_loser(
        self, leg: Leg, dialog: Dialog, reason: str | None = COMPLETED_ELSEWHERE
    ) -> None:
        """BYE an answered fork that does not get the call (it has had its ACK)."""
        extra = [("Reason", reason)] if reason else None
        bye = dialog.new_request("BYE", self._via(leg.dest), extra=extra)
        self.layer.send_request(bye, leg.dest, self._now())
        leg.state = LegState.ENDED

    def _offer_in_2xx(
        self,
        out: Response,
        offerer: Leg,
        answerer: Leg,
        offer: SessionDescription,
        cseq: int,
        server: ServerTransaction,
    ) -> None:
        """Put `offerer`'s offer, pointed at `answerer`'s endpoint, into our 2xx `out`."""
        self._remember(offerer, offer)
        answerer.sent = offer
        out.body = rewrite(
            offer, self.media.address, self._ports(offer, answerer.media), answerer.origin
        )
        out.headers.set("Content-Type", "application/sdp")
        self._await_answer(offerer, answerer, cseq, server)

    def _await_answer(
        self, offerer: Leg, answerer: Leg, cseq: int, server: ServerTransaction
    ) -> None:
        """Hold `offerer`'s ACK back until the ACK to our 2xx on `server` brings the answer."""
        aw = AwaitedAck(offerer, answerer, cseq, server.request.cseq.seq, server)
        offerer.call.awaited = aw
        self._awaiting[server] = aw

    def _answer_in_ack(self, aw: AwaitedAck, ack: Request) -> None:
        """The answerer's ACK: its answer, rewritten, goes to the offerer in the held ACK."""
        self._awaiting.pop(aw.server, None)
        answer = _sdp_or_none(ack.body)
        if answer is None:
            self._give_up_answer(aw, "no answer in ack")
            return
        offerer = aw.offerer
        assert offerer.dialog is not None
        self._remember(aw.answerer, answer)
        offerer.sent = answer
        body = rewrite(
            answer, self.media.address, self._ports(answer, offerer.media), offerer.origin
        )
        aw.ack = self._ack(offerer.dialog, offerer.dest, aw.cseq, body)
        self._refresh_pt_maps(offerer.call)
        log.info("late_offer_answered", call=offerer.call.id, call_id=ack.call_id)
        self.flush()

    def _give_up_answer(self, aw: AwaitedAck, reason: str) -> None:
        """No answer will come (no ACK, or one without usable SDP): the offerer still gets
        its ACK (declining every stream), then both phones a BYE."""
        self._decline_awaited(aw)
        call = aw.offerer.call
        log.warning(
            "late_offer_failed", call=call.id, call_id=aw.server.request.call_id, reason=reason
        )
        for leg in (call.a, call.b):
            if leg is not None and leg.dialog is not None and leg.state is not LegState.ENDED:
                bye = leg.dialog.new_request("BYE", self._via(leg.dest))
                self.layer.send_request(bye, leg.dest, self._now())
        self._end(call, reason)
        self.flush()

    def _decline_awaited(self, aw: AwaitedAck) -> None:
        """Send the held ACK, if still held, with an answer declining every stream."""
        self._awaiting.pop(aw.server, None)
        offerer = aw.offerer
        if aw.ack is not None or offerer.dialog is None:
            return
        body = self._declining(offerer.sdp, offerer.origin) if offerer.sdp else b""
        aw.ack = self._ack(offerer.dialog, offerer.dest, aw.cseq, body)

    def _declining(self, offer: SessionDescription, origin: OriginState) -> bytes:
        """An answer to `offer` that rejects every stream (port 0), codecs left as offered."""
        return rewrite(offer, self.media.address, [0] * len(offer.media), origin)

    def _ack(self, dialog: Dialog, dest: Address, cseq: int, body: bytes) -> Request:
        """Send (and return) the ACK for our INVITE `cseq` in `dialog`, with SDP `body`."""
        extra = [("Content-Type", "application/sdp")] if body else None
        ack = dialog.new_request("ACK", self._via(dest), cseq=cseq, extra=extra, body=body)
        self.layer.send_stateless(ack, dest)
        return ack

    # --- taking a call over from another phone (pickup, retrieve) ---------------------------
    def find_call(self, call_id: str) -> Call | None:
        """The call one of whose legs has this Call-ID (what a `Replaces` header names)."""
        return self._call_ids.get(call_id)

    def party_leg(self, call: Call, ref: LineRef) -> Leg | None:
        """The leg of the line member on `ref`'s line: the callee side of an inbound line."""
        return call.b if ref.direction is Direction.INBOUND else call.a

    def pickup(
        self, call: Call, txn: ServerTransaction, req: Request, source: Address, party: str
    ) -> None:
        """Answer a ringing call from another phone (`*8`, `Replaces;early-only`).

        The caller's INVITE and the picker's INVITE are both offers: each is answered with its
        own offer restricted to the codecs the other offered (media.negotiation), so each keeps
        its own payload type numbers and the bridge maps between them (D9).
        """
        a = call.a
        assert a is not None and isinstance(a.invite, ServerTransaction)
        if call.late:
            # The caller has made no offer: its answer would only come in the ACK to a 2xx,
            # while the picker's INVITE waits for one. Not done (D15): refused, and said so.
            log.warning("pickup_refused", user=party, call=call.id, reason="late offer")
            resp = req.make_response(488, "Not Acceptable Here", to_tag=new_tag())
            self.layer.send_response(txn, resp, self._now())
            self.flush()
            return
        theirs = self._offer_of(req, txn)
        if theirs is None or call.offer is None:
            return
        c = Leg(call, party, source, txn, media=call.b_media)
        self._remember(c, theirs)
        for fork in call.forks:
            if fork.state in (LegState.CALLING, LegState.EARLY):
                self._cancel_fork(fork, COMPLETED_ELSEWHERE)
        to_a = a.invite.request.make_response(200, "OK", to_tag=a.local_tag)
        self._finish_answer(a, to_a, answer_from_offer(call.offer, theirs))
        to_c = req.make_response(200, "OK", to_tag=c.local_tag)
        self._finish_answer(c, to_c, answer_from_offer(theirs, call.offer))
        call.b = c
        self._index_leg(c, req.call_id, c.local_tag)
        self._index_call_id(call, req.call_id)
        call.bridge = self.media.bridge(call.a_media, call.b_media, pt_maps=self._pt_maps(call))
        log.info("call_picked_up", call=call.id, party=party)
        self._publish(call, CallState.ACTIVE)
        self.flush()

    def retrieve(
        self,
        call: Call,
        ref: LineRef,
        txn: ServerTransaction,
        req: Request,
        source: Address,
        party: str,
    ) -> None:
        """Move an established (typically held) call to another phone (`*9`, `Replaces`).

        The far end gets a re-INVITE carrying the new phone's offer; its answer answers the new
        phone; then the phone that had the call gets BYE. The relay endpoints stay: only their
        remote addresses change, so the far end never notices more than a re-INVITE.
        """
        old = self.party_leg(call, ref)
        far = call.a if old is call.b else call.b
        theirs = self._offer_of(req, txn)
        if old is None or far is None or far.dialog is None or theirs is None:
            return
        c = Leg(call, party, source, txn, media=old.media)
        self._remember(c, theirs)
        body = rewrite(
            _sendrecv(theirs), self.media.address, self._ports(theirs, far.media), far.origin
        )
        reinvite = far.dialog.new_request(
            "INVITE",
            self._via(far.dest),
            contact=self._contact(far.dest),
            extra=[("Content-Type", "application/sdp"), ("Allow", ALLOW)],
            body=body,
        )
        client = self.layer.send_request(reinvite, far.dest, self._now())
        self._relayed[client] = Pending(txn, c, takeover=(old, c))
        self.flush()

    def _complete_takeover(self, txn: ClientTransaction, pending: Pending, resp: Response) -> None:
        assert pending.takeover is not None and pending.server is not None
        old, c = pending.takeover
        server = pending.server
        call = c.call
        far = call.a if old is call.b else call.b
        self._relayed.pop(txn, None)
        if resp.status >= 300 or far is None or far.dialog is None:
            out = server.request.make_response(resp.status, resp.reason, to_tag=c.local_tag)
            self.layer.send_response(server, out, self._now())
            self.flush()
            return
        far.dialog.update_target(resp)
        ack = far.dialog.new_request("ACK", self._via(far.dest), cseq=txn.request.cseq.seq)
        self.layer.send_stateless(ack, far.dest)
        out = server.request.make_response(200, "OK", to_tag=c.local_tag)
        answer = _sdp_or_none(resp.body)
        if answer is not None:
            self._remember(far, answer)  # what the far end now expects to receive
            far.sent = c.sdp  # it answered the new phone's offer
        self._finish_answer(c, out, answer)
        if old.dialog is not None:
            bye = old.dialog.new_request(
                "BYE", self._via(old.dest), extra=[("Reason", RETRIEVED_ELSEWHERE)]
            )
            self.layer.send_request(bye, old.dest, self._now())
        old.state = LegState.ENDED
        self._unindex_leg(old)
        req = server.request
        self._index_leg(c, req.call_id, c.local_tag)
        self._index_call_id(call, req.call_id)
        if old is call.b:
            call.b = c
        else:
            call.a = c
            call.lines = [
                replace(r, party=c.party) if r.direction is Direction.OUTBOUND else r
                for r in call.lines
            ]
        call.held_by, call.private = None, False
        self._refresh_pt_maps(call)  # the new phone's numbering replaces the old phone's
        log.info("call_retrieved", call=call.id, party=c.party, previous=old.party)
        self._publish(call, CallState.ACTIVE)
        self.flush()

    def _offer_of(self, req: Request, txn: ServerTransaction) -> SessionDescription | None:
        try:
            return parse_sdp(req.body)
        except SdpError:
            resp = req.make_response(488, "Not Acceptable Here", to_tag=new_tag())
            self.layer.send_response(txn, resp, self._now())
            self.flush()
            return None

    def _finish_answer(self, leg: Leg, resp: Response, desc: SessionDescription | None) -> None:
        """Send our 2xx on `leg`'s INVITE with `desc` pointed at the leg's relay endpoint."""
        assert isinstance(leg.invite, ServerTransaction)
        resp.headers.add("Contact", self._contact(leg.dest))
        resp.headers.add("Allow", ALLOW)
        if desc is not None:
            resp.body = rewrite(desc, self.media.address, self._ports(desc, leg.media), leg.origin)
            resp.headers.add("Content-Type", "application/sdp")
            leg.sent = desc
        leg.dialog = Dialog.as_uas(leg.invite.request, resp, leg.local_tag)
        leg.state = LegState.CONFIRMED
        self.layer.send_response(leg.invite, resp, self._now(), retransmit_2xx=True)

    def make_private(self, party: str) -> list[Call]:
        """Mark the calls `party` holds as private (Zoom's "lock"): nobody else may retrieve."""
        locked = [c for c in self.calls.values() if c.held_by == party and not c.ended]
        for call in locked:
            call.private = True
            self._publish(call, CallState.HELD)
        return locked

    # --- transfer (REFER executed by the B2BUA, RFC 3515) ----------------------------------
    def other_leg(self, leg: Leg) -> Leg | None:
        call = leg.call
        return call.b if leg is call.a else call.a

    def blind_transfer(
        self,
        x: Leg,
        refer_txn: ServerTransaction,
        refer: Request,
        *,
        lines: list[LineRef],
        caller_from: str,
        caller_pai: str | None,
        targets: list[ForkTarget],
        ring_time: float,
        referred_by: str | None = None,
    ) -> None:
        """Ring `targets` for the far end of `x`'s call; `x` learns the outcome by NOTIFY.

        The far end keeps its dialog and relay endpoint; the endpoint that faced `x` will face
        the target, so media needs no new ports. Until the target answers, the old call stays
        (the transferor may still take the far end off hold if the transfer fails).
        """
        old = x.call
        far = self.other_leg(x)
        self._accept_refer(refer_txn, refer)
        self._notify_refer(x, "SIP/2.0 100 Trying", final=False)
        if far is None or far.sdp is None or not targets:
            self._notify_refer(x, "SIP/2.0 480 Temporarily Unavailable", final=True)
            self.flush()
            return
        t = Call(id=new_tag() + new_tag(), lines=lines, offer=_sendrecv(far.sdp))
        t.transfer = Transfer(x, old, (old.a_media, old.b_media, old.bridge))
        t.a, far.call = far, t
        t.a_media, t.b_media, t.bridge = far.media, x.media, old.bridge
        old.a_media = old.b_media = old.bridge = None
        far_call_id = far.dialog.call_id if far.dialog else ""
        self._index_call_id(t, far_call_id)
        t.b_call_id = new_call_id(self.local("udp").host)
        self._index_call_id(t, t.b_call_id)
        t.b_from = caller_from
        if referred_by:
            t.extra_headers.append(("Referred-By", referred_by))
        t.outstanding = len(targets)
        self.calls[t.id] = t
        log.info("call_transfer", call=old.id, to_call=t.id, by=x.party, kind="blind")
        for target in targets:
            self._fork(t, target, caller_pai)
        self._later(self._now(), ring_time, lambda: self._ring_timeout(t))
        self._publish(t, CallState.RINGING)
        self.flush()

    def _transfer_answered(self, t: Call, leg: Leg, resp: Response) -> None:
        tr = t.transfer
        assert tr is not None and t.a is not None
        far = t.a
        try:
            answer = parse_sdp(resp.body)
        except SdpError:
            answer = None
        if answer is not None:
            self._remember(leg, answer)
            self._reinvite(far, answer)
            self._refresh_pt_maps(t)
        t.transfer = None
        self._notify_refer(tr.transferor, "SIP/2.0 200 OK", final=True)
        self._hang_up(tr.transferor, "transferred")
        self._end(tr.old, "transferred", by=tr.transferor.party)
        log.info("call_answered", call=t.id, party=leg.party, transfer=True)
        self._publish(t, CallState.ACTIVE)

    def _transfer_failed(self, t: Call, status: int, reason: str) -> None:
        tr = t.transfer
        assert tr is not None and t.a is not None
        far, old = t.a, tr.old
        far.call = old
        old.a_media, old.b_media, old.bridge = tr.old_media
        t.a_media = t.b_media = t.bridge = None
        if far.dialog is not None:
            self._index_call_id(old, far.dialog.call_id)
        self._notify_refer(
            tr.transferor, f"SIP/2.0 {status} {_REASONS.get(status, reason)}", final=True
        )
        t.transfer = None
        t.a = None
        self._end(t, reason)

    def attended_transfer(
        self, x1: Leg, refer_txn: ServerTransaction, refer: Request, replaces_call_id: str
    ) -> bool:
        """Join the far ends of `x1`'s call and of the call the Refer-To's Replaces names.

        Both far ends keep their dialogs and endpoints; each gets a re-INVITE with the other's
        media, and the transferor's two legs are hung up. False if the named call is unknown.
        """
        call1, call2 = x1.call, self._call_ids.get(replaces_call_id)
        far1 = self.other_leg(x1)
        if call2 is None or call2 is call1 or far1 is None:
            return False
        x2 = next(
            (
                leg
                for leg in (call2.a, call2.b)
                if leg is not None
                and leg.dialog is not None
                and leg.dialog.call_id == replaces_call_id
            ),
            None,
        )
        far2 = self.other_leg(x2) if x2 is not None else None
        if x2 is None or far2 is None or far1.sdp is None or far2.sdp is None:
            return False
        # Who shows the joined call, decided before the legs move: each far end that is a
        # member of a line keeps that line, now with the other far end as its remote; the
        # transferor's lines see their two calls end.
        joined = [
            replace(r, party=r.party or leg.party, remote=other.identity, remote_name=other.name)
            for leg, other, src in ((far1, far2, call1), (far2, far1, call2))
            for r in src.lines
            if self.party_leg(src, r) is leg
        ]
        gone1 = [r for r in call1.lines if self.party_leg(call1, r) is x1]
        self._accept_refer(refer_txn, refer)
        self._notify_refer(x1, "SIP/2.0 100 Trying", final=False)
        for c in (call1, call2):
            if c.bridge is not None:
                self.media.unbridge(c.bridge)
                c.bridge = None
        for ep in (x1.media, x2.media):
            if ep is not None:
                self.media.release(ep)
        call1.a_media, call1.b_media = far1.media, far2.media
        call2.a_media = call2.b_media = None
        far2.call = call1
        if far2.dialog is not None:
            self._index_call_id(call1, far2.dialog.call_id)
        if far1 is call1.a:
            call1.b = far2
        else:
            call1.a = far2
        self._reinvite(far1, far2.sdp)
        self._reinvite(far2, far1.sdp)
        # Two far ends that never negotiated with each other: the numbering may well differ.
        call1.bridge = self.media.bridge(far1.media, far2.media, pt_maps=self._pt_maps(call1))
        self._notify_refer(x1, "SIP/2.0 200 OK", final=True)
        for x in (x1, x2):
            self._hang_up(x, "transferred")
        x_party = x1.party
        log.info("call_transfer", call=call1.id, joined=call2.id, by=x_party, kind="attended")
        call1.lines = gone1
        self._publish(call1, CallState.ENDED, reason="transferred")
        call1.lines = joined
        self._end(call2, "transferred", by=x_party)  # its id is gone from every line
        call1.held_by, call1.private = None, False
        self._publish(call1, CallState.ACTIVE)
        self.flush()
        return True

    def _reinvite(self, leg: Leg, desc: SessionDescription) -> None:
        """Send `leg`'s phone a re-INVITE with `desc` (made sendrecv) towards its endpoint."""
        if leg.dialog is None:
            return
        body = rewrite(
            _sendrecv(desc), self.media.address, self._ports(desc, leg.media), leg.origin
        )
        leg.sent = desc
        req = leg.dialog.new_request(
            "INVITE",
            self._via(leg.dest),
            contact=self._contact(leg.dest),
            extra=[("Content-Type", "application/sdp"), ("Allow", ALLOW)],
            body=body,
        )
        client = self.layer.send_request(req, leg.dest, self._now())
        self._relayed[client] = Pending(None, leg)

    def _own_reinvite_answered(
        self, txn: ClientTransaction, pending: Pending, resp: Response
    ) -> None:
        if resp.status < 200:
            return
        self._relayed.pop(txn, None)
        leg = pending.from_leg
        if 200 <= resp.status < 300 and leg.dialog is not None:
            leg.dialog.update_target(resp)
            ack = leg.dialog.new_request("ACK", self._via(leg.dest), cseq=txn.request.cseq.seq)
            self.layer.send_stateless(ack, leg.dest)
            with contextlib.suppress(SdpError):
                self._remember(leg, parse_sdp(resp.body))
                self._refresh_pt_maps(leg.call)  # its answer may number things its own way
        self.flush()

    def _hang_up(self, leg: Leg, reason: str) -> None:
        if leg.dialog is not None and leg.state is not LegState.ENDED:
            bye = leg.dialog.new_request("BYE", self._via(leg.dest))
            self.layer.send_request(bye, leg.dest, self._now())
        leg.state = LegState.ENDED
        self._unindex_leg(leg)

    def _accept_refer(self, txn: ServerTransaction, refer: Request) -> None:
        self.layer.send_response(txn, refer.make_response(202, "Accepted"), self._now())

    def _notify_refer(self, x: Leg, frag: str, *, final: bool) -> None:
        """The implicit `refer` subscription's NOTIFY (RFC 3515 §2.4.4), sipfrag body."""
        if x.dialog is None or x.state is LegState.ENDED:
            return
        state = "terminated;reason=noresource" if final else "active;expires=60"
        extra = [
            ("Event", "refer"),
            ("Subscription-State", state),
            ("Content-Type", "message/sipfrag;version=2.0"),
        ]
        req = x.dialog.new_request(
            "NOTIFY",
            self._via(x.dest),
            contact=self._contact(x.dest),
            extra=extra,
            body=frag.encode() + b"\r\n",
        )
        self.layer.send_request(req, x.dest, self._now())

    # --- indexes (every entry is removed when its call ends: no scans, no leaks) -----------
    def _index_leg(self, leg: Leg, call_id: str, tag: str) -> None:
        self._dialogs[(call_id, tag)] = leg
        leg.keys.append((call_id, tag))

    def _unindex_leg(self, leg: Leg) -> None:
        for key in leg.keys:
            if self._dialogs.get(key) is leg:
                del self._dialogs[key]
        leg.keys.clear()

    def _index_call_id(self, call: Call, call_id: str) -> None:
        self._call_ids[call_id] = call
        call.ids.add(call_id)

    # --- ending -----------------------------------------------------------------------------
    def _end(self, call: Call, reason: str, by: str | None = None) -> None:
        if call.ended:
            return
        call.ended = True
        for fork in call.forks:
            if fork.state in (LegState.CALLING, LegState.EARLY) and fork is not call.b:
                self._cancel_fork(fork, None)
        for leg in [call.a, *call.forks]:
            if leg is not None and leg.call is call:
                leg.state = LegState.ENDED
        self.calls.pop(call.id, None)
        for leg in (call.a, call.b, *call.forks):
            if leg is not None and leg.call is call:
                self._unindex_leg(leg)
        for cid in call.ids:
            if self._call_ids.get(cid) is call:
                del self._call_ids[cid]
        if call.a is not None and isinstance(call.a.invite, ServerTransaction):
            self._by_invite.pop(call.a.invite, None)
        if call.awaited is not None:
            self._awaiting.pop(call.awaited.server, None)
        self._release_media(call)
        log.info("call_ended", call=call.id, reason=reason, by=by)
        self._publish(call, CallState.ENDED, reason=reason)
        # Break the Call <-> Leg cycles now: otherwise every ended call waits for a full
        # cyclic GC pass, which at 200 calls/s stalled the loop for 0.2-0.9 s every few seconds.
        # Late responses still reach a fork through `_clients`, and its `call.ended` is True.
        call.a = call.b = call.bye_from = None
        call.forks = []

    def _release_media(self, call: Call) -> None:
        if call.bridge is not None:
            self.media.unbridge(call.bridge)
            call.bridge = None
        for attr in ("a_media", "b_media"):
            ep = getattr(call, attr)
            if ep is not None:
                self.media.release(ep)
                setattr(call, attr, None)

    # --- helpers ----------------------------------------------------------------------------
    def _publish(self, call: Call, state: CallState, reason: str | None = None) -> None:
        """One event per line the call is on; inbound lines learn the party on answer."""
        now = time.time()
        answered_by = call.b.party if call.b is not None else None
        for ref in call.lines:
            shown = state
            if state is CallState.RINGING and ref.direction is Direction.OUTBOUND:
                shown = CallState.DIALING
            why = reason
            if reason == "bye":  # RFC 4235 wants to know which side hung up
                why = "local-bye" if self.party_leg(call, ref) is call.bye_from else "remote-bye"
            event = LineEvent(
                ref.line,
                call.id,
                shown,
                ref.direction,
                ref.party or answered_by,
                ref.remote,
                ref.remote_name,
                call.started_at,
                now,
                why,
                dialog=self._dialog_id(call, ref.direction),
                private=call.private and shown is CallState.HELD,
            )
            self.bus.publish(event)

    @staticmethod
    def _dialog_id(call: Call, direction: Direction) -> tuple[str, str, str] | None:
        """The party's dialog as its phone knows it: (Call-ID, phone's tag, our tag).

        An inbound line's party is on the outbound leg (every fork shares its Call-ID and our
        tag; the phone's tag is known once it answers); an outbound line's party is the caller.
        """
        if direction is Direction.OUTBOUND:
            a = call.a
            if a is None or a.invite is None:
                return None
            return (a.invite.request.call_id, a.invite.request.from_.tag or "", a.local_tag)
        phone_tag = call.b.dialog.remote_tag if call.b and call.b.dialog else None
        return (call.b_call_id, phone_tag or "", call.b_from_tag)

    def _publish_hold_state(self, call: Call, body: bytes, by: Leg) -> None:
        if not body:
            return
        try:
            held = all(
                parse_sdp(body).is_held(i)
                for i, m in enumerate(parse_sdp(body).media)
                if not m.rejected
            )
        except SdpError:
            return
        call.held_by = by.party if held else None
        if not held:
            call.private = False
        self._publish(call, CallState.HELD if held else CallState.ACTIVE)

    def _reply(self, leg: Leg, resp: Response, detail: str | None = None) -> None:
        assert isinstance(leg.invite, ServerTransaction)
        if resp.status > 100 and resp.to.tag is None:
            resp.headers.set("To", f"{resp.headers.get('to')};tag={leg.local_tag}")
        self.layer.send_response(leg.invite, resp, self._now())
        log.info(
            "call_rejected" if resp.status >= 300 else "call_response",
            status=resp.status,
            call_id=leg.invite.request.call_id,
            detail=detail,
        )
        self.flush()

    def _response_for(self, a: Leg, resp: Response, status: int, reason: str) -> Response:
        assert isinstance(a.invite, ServerTransaction)
        out = a.invite.request.make_response(status, reason, to_tag=a.local_tag)
        for name, value in resp.headers:
            if name.lower() in ("reason", "call-info", "alert-info"):
                out.headers.add(name, value)
        return out

    def _send_a(self, a: Leg, resp: Response) -> None:
        assert isinstance(a.invite, ServerTransaction)
        self.layer.send_response(a.invite, resp, self._now())

    def _add_sdp(self, out: Response, body: bytes, from_leg: Leg, to_leg: Leg) -> None:
        """Put `from_leg`'s SDP, rewritten for `to_leg`'s phone, into `out`."""
        out.body = self._rewrite_for(from_leg.call, body, from_leg, to_leg)
        out.headers.set("Content-Type", "application/sdp")

    def _rewrite_for(self, call: Call, body: bytes, from_leg: Leg, to_leg: Leg) -> bytes:
        """SDP from `from_leg`'s phone, rewritten for `to_leg`'s phone."""
        try:
            desc = parse_sdp(body)
        except SdpError as exc:
            # Never pass a phone's own SDP to the other side: media would bypass the relay.
            log.warning("sdp_unusable", call=call.id, party=from_leg.party, error=str(exc))
            return b""
        self._remember(from_leg, desc)
        to_leg.sent = desc
        return rewrite(desc, self.media.address, self._ports(desc, to_leg.media), to_leg.origin)

    @staticmethod
    def _ports(desc: SessionDescription, endpoint: Any) -> list[int]:
        """Our relay port for the first audio stream; every other stream is declined (0)."""
        ports: list[int] = []
        used = False
        for m in desc.media:
            if not used and m.media == "audio" and not m.rejected and endpoint is not None:
                ports.append(endpoint.port)
                used = True
            else:
                ports.append(0)
        return ports

    def _remember(self, leg: Leg, desc: SessionDescription) -> None:
        """`desc` is what `leg`'s phone last sent: point its endpoint there and keep it."""
        leg.sdp = desc
        self._set_remote(leg.media, desc)

    @staticmethod
    def _set_remote(endpoint: Any, desc: SessionDescription) -> None:
        """Point `endpoint` where the first audio stream of `desc` wants RTP.

        An address the relay cannot use (a host name, the other address family) leaves the
        endpoint to latch onto whatever the phone sends; a released endpoint is left alone.
        """
        if endpoint is None or getattr(endpoint, "released", False):
            return
        for i, m in enumerate(desc.media):
            if m.media == "audio" and not m.rejected:
                try:
                    endpoint.set_remote(desc.rtp_address(i), desc.rtcp_address(i))
                except ValueError:
                    endpoint.set_remote(None, None)
                except MediaError:
                    pass
                return

    @staticmethod
    def _pt_maps(call: Call) -> PtMaps | None:
        """Payload type maps for the bridge of `call` (a_media -> b_media first), D9.

        Each phone sends with the numbers of the SDP it received and expects those of the SDP
        it sent (media/ptmap.py). A plain call relays both SDPs as they are: `pt_maps` sees
        that with two identity checks and a subset test, and computes nothing.
        """
        x, y = call.a, call.b
        if x is None or y is None:
            return None
        if x.media is not call.a_media:
            x, y = y, x
        return pt_maps(x.sent, x.sdp, y.sent, y.sdp)

    def _refresh_pt_maps(self, call: Call) -> None:
        """After an offer/answer on a bridged call: the numbering may have changed either way."""
        if call.bridge is not None:
            call.bridge.set_pt_maps(self._pt_maps(call))

    def _via(self, dest: Address) -> str:
        return self._via_parts(dest)[0]

    def _via_parts(self, dest: Address) -> tuple[str, Via]:
        """Our Via towards `dest` with a fresh branch, as text and as the parsed value."""
        local = self.local(dest.transport)
        transport = dest.transport.upper()
        branch = self.layer.new_branch()
        text = f"SIP/2.0/{transport} {local.host}:{local.port};branch={branch};rport"
        return text, Via(transport, local.host, local.port, (("branch", branch), ("rport", None)))

    def _contact(self, dest: Address) -> str:
        local = self.local(dest.transport)
        return f"<sip:{local.host}:{local.port};transport={dest.transport}>"


_INVITE_CSEQ = CSeq(1, "INVITE")


def _dest_text(dest: Address) -> str:
    return f"{dest.transport}:{dest.host}:{dest.port}"


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)


def _is_appearance(name: str, value: str) -> bool:
    """SCA's `Call-Info: ...;appearance-index=N` is about our line, not for the far end."""
    return name.lower() == "call-info" and "appearance-" in value.lower()


def _sdp_or_none(body: bytes) -> SessionDescription | None:
    """`body` as SDP; None if there is none or it does not parse (never relayed, D7)."""
    if not body:
        return None
    try:
        return parse_sdp(body)
    except SdpError:
        return None


def _parses(body: bytes) -> bool:
    try:
        parse_sdp(body)
    except SdpError:
        return False
    return True


def _invite_of(leg: Leg) -> Request:
    assert leg.invite is not None
    return leg.invite.request


def _sendrecv(desc: SessionDescription) -> SessionDescription:
    """`desc` with every stream sendrecv: a retrieved call must not stay on hold."""
    media = [
        replace(m, direction=None, lines=[ln for ln in m.lines if ln[2:] not in _DIRS])
        for m in desc.media
    ]
    session = [ln for ln in desc.lines if ln[2:] not in _DIRS]
    return replace(desc, media=media, direction=None, lines=session)


_DIRS = {d.value for d in SdpDirection}


def _aggregate(failures: list[int]) -> int:
    """The caller's answer when every fork failed (RFC 3261 §16.7 in spirit).

    All busy (486/600) -> 486; a decline (603) wins over no answer; otherwise 480.
    """
    if failures and all(f in (486, 600) for f in failures):
        return 486
    if 603 in failures:
        return 603
    return 480


def contact_dest(source: str) -> Address:
    """A binding's stored source ("udp:127.0.0.1:5090", "udp:::1:5090") as an Address."""
    transport, _, rest = source.partition(":")
    host, _, port = rest.rpartition(":")
    return Address(transport, host, int(port))


def sip_user(uri: object) -> str | None:
    return uri.user_unescaped if isinstance(uri, SipUri) else None
