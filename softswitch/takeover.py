"""Taking a call over from another phone: pickup of a ringing call, retrieve of an
established (typically held) one, private hold.

These functions are the B2BUA's behaviour, kept in a module of their own to keep the call
set-up and relaying in calls.py readable: each takes the `calls.B2BUA` first, as `self`, and
uses its transaction layer, media manager and indexes. calls.py calls them as functions
(mypyc compiles them so, D17); the B2BUA's public methods for them delegate here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from media.errors import SdpError
from media.negotiation import answer_from_offer
from media.sdp import SessionDescription, parse_sdp, rewrite
from softswitch.logline import EventLog

from .call_model import (
    ALLOW,
    COMPLETED_ELSEWHERE,
    RETRIEVED_ELSEWHERE,
    Call,
    Leg,
    LegState,
    LineRef,
    Pending,
    sdp_or_none,
    sendrecv,
)
from .lines import CallState, Direction
from .sip.dialog import Dialog, new_tag
from .sip.message import Request, Response
from .sip.transaction import Address, ClientTransaction, ServerTransaction

if TYPE_CHECKING:
    from .calls import B2BUA

log = EventLog("softswitch.calls")


def pickup(
    self: B2BUA, call: Call, txn: ServerTransaction, req: Request, source: Address, party: str
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
    theirs = _offer_of(self, req, txn)
    if theirs is None or call.offer is None:
        return
    c = Leg(call, party, source, txn, media=call.b_media)
    self._remember(c, theirs)
    for fork in call.forks:
        if fork.state in (LegState.CALLING, LegState.EARLY):
            self._cancel_fork(fork, COMPLETED_ELSEWHERE)
    to_a = a.invite.request.make_response(200, "OK", to_tag=a.local_tag)
    _finish_answer(self, a, to_a, answer_from_offer(call.offer, theirs))
    to_c = req.make_response(200, "OK", to_tag=c.local_tag)
    _finish_answer(self, c, to_c, answer_from_offer(theirs, call.offer))
    call.b = c
    self._index_leg(c, req.call_id, c.local_tag)
    self._index_call_id(call, req.call_id)
    call.bridge = self.media.bridge(call.a_media, call.b_media, pt_maps=self._pt_maps(call))
    log.info("call_picked_up", call=call.id, party=party)
    self._publish(call, CallState.ACTIVE)
    self.flush()


def retrieve(
    self: B2BUA,
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
    theirs = _offer_of(self, req, txn)
    if old is None or far is None or far.dialog is None or theirs is None:
        return
    c = Leg(call, party, source, txn, media=old.media)
    self._remember(c, theirs)
    body = rewrite(sendrecv(theirs), self.media.address, self._ports(theirs, far.media), far.origin)
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


def complete_takeover(
    self: B2BUA, txn: ClientTransaction, pending: Pending, resp: Response
) -> None:
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
    answer = sdp_or_none(resp.body)
    if answer is not None:
        self._remember(far, answer)  # what the far end now expects to receive
        far.sent = c.sdp  # it answered the new phone's offer
    _finish_answer(self, c, out, answer)
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


def _offer_of(self: B2BUA, req: Request, txn: ServerTransaction) -> SessionDescription | None:
    try:
        return parse_sdp(req.body)
    except SdpError:
        resp = req.make_response(488, "Not Acceptable Here", to_tag=new_tag())
        self.layer.send_response(txn, resp, self._now())
        self.flush()
        return None


def _finish_answer(self: B2BUA, leg: Leg, resp: Response, desc: SessionDescription | None) -> None:
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


def make_private(self: B2BUA, party: str) -> list[Call]:
    """Mark the calls `party` holds as private (Zoom's "lock"): nobody else may retrieve."""
    locked = [c for c in self.calls.values() if c.held_by == party and not c.ended]
    for call in locked:
        call.private = True
        self._publish(call, CallState.HELD)
    return locked
