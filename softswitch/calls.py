"""The B2BUA: calls with one inbound leg and forked outbound legs, bridged through our relay.

A `Call` owns an inbound `Leg` (we are the UAS towards the caller) and one outbound `Leg` per
ringing contact (we are the UAC). The first 2xx wins; every other fork is cancelled with
`Reason: SIP;cause=200;text="Call completed elsewhere"` (RFC 3326). After the answer, in-dialog
requests (BYE, re-INVITE, UPDATE, INFO) are relayed between the two dialogs with their SDP
rewritten towards our relay.

This module holds call set-up, forking and relaying. The call model is `call_model`; taking a
call over (pickup, retrieve) is `takeover`, REFER is `transfer` and the late offer (an INVITE
without SDP, D15) is `late_offer`: their functions take the `B2BUA` first and are called as
functions here; `B2BUA`'s public methods for take-overs and transfers delegate to them. (Not
functions installed in the class body as methods: mypyc compiles those as attributes, D17.)

This is signalling logic: it talks to the transaction layer (sans-I/O), asks the media
manager for endpoints, and publishes line events. Timers (ring timeout, delayed forks) live in
its own heap so the service drives them with the same clock as the transaction layer.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from media.errors import MediaError, PortsExhausted, SdpError
from media.ptmap import PtMaps, pt_maps
from media.sdp import SessionDescription, parse_sdp, rewrite
from softswitch.logline import EventLog

from . import late_offer, takeover, transfer
from .call_model import (
    ALLOW,
    COMPLETED_ELSEWHERE,
    RELAYED_HEADERS,
    AwaitedAck,
    Call,
    Entry,
    ForkTarget,
    ForkTemplate,
    Leg,
    LegState,
    LineRef,
    Media,
    Pending,
    invite_of,
)
from .lines import CallState, Direction, LineBus, LineEvent
from .sip.dialog import Dialog, new_call_id, new_tag
from .sip.errors import LocalProtocolError
from .sip.headers import CSeq, Headers, Via, entry, render_entries
from .sip.message import Request, Response
from .sip.transaction import Address, ClientTransaction, ServerTransaction
from .sip.transaction_layer import TransactionLayer
from .sip.uri import parse_uri

log = EventLog("softswitch.calls")


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

    # --- taking calls over and transfers: kept in modules of their own --------------------
    # The work is in softswitch/takeover.py and softswitch/transfer.py (their functions take
    # the B2BUA first); these methods are the B2BUA's interface to call control. They are
    # methods, not class attributes bound to those functions, so that mypyc compiles them as
    # methods (D17).
    def find_call(self, call_id: str) -> Call | None:
        """The call one of whose legs has this Call-ID (what a `Replaces` header names)."""
        return self._call_ids.get(call_id)

    @staticmethod
    def party_leg(call: Call, ref: LineRef) -> Leg | None:
        """The leg of the line member on `ref`'s line: the callee side of an inbound line."""
        return call.b if ref.direction is Direction.INBOUND else call.a

    @staticmethod
    def other_leg(leg: Leg) -> Leg | None:
        """The other side of `leg`'s call."""
        call = leg.call
        return call.b if leg is call.a else call.a

    def pickup(
        self, call: Call, txn: ServerTransaction, req: Request, source: Address, party: str
    ) -> None:
        takeover.pickup(self, call, txn, req, source, party)

    def retrieve(
        self,
        call: Call,
        ref: LineRef,
        txn: ServerTransaction,
        req: Request,
        source: Address,
        party: str,
    ) -> None:
        takeover.retrieve(self, call, ref, txn, req, source, party)

    def make_private(self, party: str) -> list[Call]:
        return takeover.make_private(self, party)

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
        transfer.blind_transfer(
            self,
            x,
            refer_txn,
            refer,
            lines=lines,
            caller_from=caller_from,
            caller_pai=caller_pai,
            targets=targets,
            ring_time=ring_time,
            referred_by=referred_by,
        )

    def attended_transfer(
        self, x1: Leg, refer_txn: ServerTransaction, refer: Request, replaces_call_id: str
    ) -> bool:
        return transfer.attended_transfer(self, x1, refer_txn, refer, replaces_call_id)

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
    def begin_call(
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
    ) -> Coroutine[Any, Any, None] | None:
        """Answer `req` by forking to `targets`; the caller's identity is already decided.

        The forks leave before this returns when the media layer has two endpoints ready (its
        pool: the usual case), so the INVITE's own step sends them, without waiting for a task
        to be scheduled behind whatever else the loop has queued. Otherwise the returned
        coroutine binds the endpoints and then forks; the caller runs it as a task.
        """
        call = self._new_call(txn, req, source, lines, targets)
        if call is None:
            return None
        launch = _Launch(txn, req, caller_from, caller_pai, targets, ring_time)
        ready = self.media.take_ready(2)
        if ready is None:
            return self._bind_then_launch(call, launch)
        call.a_media, call.b_media = ready
        self._launch(call, launch)
        return None

    def _new_call(
        self,
        txn: ServerTransaction,
        req: Request,
        source: Address,
        lines: list[LineRef],
        targets: list[ForkTarget],
    ) -> Call | None:
        """The call for `req`, or None once it was refused (bad SDP, nobody to ring)."""
        call = Call(id=new_tag() + new_tag(), lines=lines)
        a = Leg(call, None, source, txn)
        a.identity, a.name = lines[-1].remote, lines[-1].remote_name
        call.a = a
        try:
            call.offer = parse_sdp(req.body) if req.body else None
        except SdpError as exc:
            self._reply(a, req.make_response(488, "Not Acceptable Here"), detail=str(exc))
            return None
        if call.offer is None:
            # Late offer (D15): the forks go without SDP; the answering phone's 2xx offers.
            call.late = True
            call.fork_body = b""
        if not targets:
            self._reply(a, req.make_response(480, "Temporarily Unavailable"), detail="no contact")
            return None
        return call

    async def _bind_then_launch(self, call: Call, launch: _Launch) -> None:
        a, req = call.a, launch.req
        assert a is not None
        try:
            call.a_media = await self.media.allocate_endpoint()
            call.b_media = await self.media.allocate_endpoint()
        except PortsExhausted:
            self._release_media(call)
            resp = req.make_response(503, "Service Unavailable")
            resp.headers.add("Retry-After", "5")
            self._reply(a, resp, detail="media ports exhausted")
            return
        if launch.txn.terminated:  # cancelled while we were binding sockets
            self._release_media(call)
            return
        self._launch(call, launch)

    def _launch(self, call: Call, launch: _Launch) -> None:
        """The call has its endpoints: index it and send the forks."""
        a = call.a
        assert a is not None
        txn, req, targets = launch.txn, launch.req, launch.targets
        caller_pai = launch.caller_pai
        a.media = call.a_media
        if call.offer is not None:
            self._remember(a, call.offer)
        self.calls[call.id] = call
        self._index_leg(a, req.call_id, a.local_tag)
        self._index_call_id(call, req.call_id)
        self._by_invite[txn] = call
        call.b_call_id = new_call_id(self.local("udp").host)
        self._index_call_id(call, call.b_call_id)
        call.b_from = launch.caller_from
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
        self._later(t0, launch.ring_time, _bind(self._ring_timeout, call.id))
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
        to = target.to or f"<{target.uri}>"
        contact = self._contact(target.dest)
        own, own_text = target.entries, target.headers_text
        if self.fork_headers is not None:
            extra = tuple([entry(name, value) for name, value in self.fork_headers(call, target)])
            if extra:
                own, own_text = own + extra, own_text + render_entries(extra)
        headers = Headers(
            [
                ("via", "Via", via_text),
                *template.head,
                ("to", "To", to),
                *template.middle,
                ("contact", "Contact", contact),
                *template.common,
                *own,
                *template.tail,
            ]
        )
        # The same fields rendered from the template's texts; Via and Contact are ours, To
        # is checked here, the fork's own fields where they were rendered (`render_entries`).
        if "\n" in to or "\r" in to:
            raise LocalProtocolError("CR or LF inside a fork's To")
        headers.set_wire(  # one f-string: one allocation, where `+` copies at every step
            f"Via: {via_text}\r\n{template.head_text}To: {to}\r\n{template.middle_text}"
            f"Contact: {contact}\r\n{template.common_text}{own_text}{template.tail_text}",
            len(call.fork_body),
        )
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
        body = call.fork_body
        tail += (entry("Content-Length", str(len(body) if body is not None else 0)),)
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
                # An ended fork's INVITE is never read again (it is neither cancelled nor
                # answered): the transaction need not keep it through Timer D.
                self.layer.release_request(txn)
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
                transfer.notify_refer(
                    self, call.transfer.transferor, "SIP/2.0 180 Ringing", final=False
                )
            return
        if resp.to.tag and leg.dialog is None:
            leg.dialog = Dialog.as_uac(invite_of(leg), resp)
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
        invite = invite_of(leg)
        dialog = Dialog.as_uac(invite, resp)
        offer: SessionDescription | None = None
        if call.late:
            offer = late_offer.late_offer_of(self, leg, dialog, resp)
            if offer is None:
                return
        else:
            ack = dialog.new_request("ACK", self._via(leg.dest), cseq=invite.cseq.seq)
            self.layer.send_stateless(ack, leg.dest)
            if call.b is not None or call.ended:
                # A second answer lost the race: acknowledge it and hang it up at once.
                late_offer.hang_up_loser(self, leg, dialog)
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
            transfer.transfer_answered(self, call, leg, resp)
            return
        a = call.a
        assert a is not None
        out = self._response_for(a, resp, 200, "OK")
        out.headers.add("Contact", self._contact(a.dest))
        out.headers.add("Allow", ALLOW)
        assert isinstance(a.invite, ServerTransaction)
        if offer is not None:
            late_offer.offer_in_2xx(self, out, leg, a, offer, invite.cseq.seq, a.invite)
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

    def _ring_timeout(self, call_id: str) -> None:
        """The ring timer holds the call's id, not the call: an ended call is freed at once,
        not when its ring time runs out (30 s of each call's objects for the GC to walk)."""
        call = self.calls.get(call_id)
        if call is None or call.b is not None or call.ended:
            return
        self._fail_call(call, 480, "timeout")
        self.flush()

    def _fail_call(self, call: Call, status: int, reason: str) -> None:
        for leg in call.forks:
            if leg.state in (LegState.CALLING, LegState.EARLY):
                self._cancel_fork(leg, None)
        if call.transfer is not None:
            transfer.transfer_failed(self, call, status, reason)
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
        invite = invite_of(leg)
        h = invite.headers
        entries = [
            ("via", "Via", h.get("via") or ""),
            ("max-forwards", "Max-Forwards", "70"),
            ("from", "From", h.get("from") or ""),
            ("to", "To", h.get("to") or ""),
            ("call-id", "Call-ID", invite.call_id),
            ("cseq", "CSeq", f"{invite.cseq.seq} CANCEL"),
        ]
        reason = reason or leg.cancel_reason
        if reason:
            entries.append(entry("Reason", reason))
        entries.append(("content-length", "Content-Length", "0"))
        headers = Headers(entries)
        headers.set_wire(render_entries(entries), 0)  # an answered 16-way fork cancels 15
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
                late_offer.decline_awaited(self, call.awaited)
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
            takeover.complete_takeover(self, txn, pending, resp)
            return
        if pending.server is None:
            transfer.own_reinvite_answered(self, txn, pending, resp)
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
                late_offer.await_answer(self, other, to_leg, txn.request.cseq.seq, pending.server)
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
            late_offer.answer_in_ack(self, aw, req)
        return True

    def on_ack_timeout(self, txn: ServerTransaction) -> None:
        """Our 2xx to the caller was never acknowledged (§13.3.1.4): hang up both sides."""
        aw = self._awaiting.pop(txn, None)
        if aw is not None:  # the answer will never come either
            late_offer.give_up_answer(self, aw, "no ack")
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
            # The relay's own account of the call's audio, per direction (packets in, and
            # those it could not send on): an operator's first question about one-way or
            # choppy audio is which side stopped sending or where packets went missing.
            log.info("call_media", call=call.id, **call.bridge.stats().as_dict())
            self.media.unbridge(call.bridge)
            call.bridge = None
        if call.a_media is not None:
            self.media.release(call.a_media)
            call.a_media = None
        if call.b_media is not None:
            self.media.release(call.b_media)
            call.b_media = None

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


@dataclass(frozen=True, slots=True)
class _Launch:
    """What `begin_call` was asked, for the step that sends the forks."""

    txn: ServerTransaction
    req: Request
    caller_from: str
    caller_pai: str | None
    targets: list[ForkTarget]
    ring_time: float


def _dest_text(dest: Address) -> str:
    return f"{dest.transport}:{dest.host}:{dest.port}"


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)


def _is_appearance(name: str, value: str) -> bool:
    """SCA's `Call-Info: ...;appearance-index=N` is about our line, not for the far end."""
    return name.lower() == "call-info" and "appearance-" in value.lower()


def _parses(body: bytes) -> bool:
    try:
        parse_sdp(body)
    except SdpError:
        return False
    return True


def _aggregate(failures: list[int]) -> int:
    """The caller's answer when every fork failed (RFC 3261 §16.7 in spirit).

    All busy (486/600) -> 486; a decline (603) wins over no answer; otherwise 480.
    """
    if failures and all(f in (486, 600) for f in failures):
        return 486
    if 603 in failures:
        return 603
    return 480
