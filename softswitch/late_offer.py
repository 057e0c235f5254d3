"""Late offer: an INVITE without SDP, whose offer comes in the 2xx and whose answer in the
ACK (RFC 3261 §13.2.1, RFC 3264; decision D15). We hold the offerer's ACK until the
answerer's ACK brings the answer.

These functions are the B2BUA's behaviour, kept in a module of their own to keep the call
set-up and relaying in calls.py readable: each takes the `calls.B2BUA` first, as `self`, and
uses its transaction layer, media manager and indexes. calls.py calls them as functions
(mypyc compiles them so, D17); the B2BUA's public methods for them delegate here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from media.sdp import OriginState, SessionDescription, rewrite
from softswitch.logline import EventLog

from .call_model import (
    COMPLETED_ELSEWHERE,
    AwaitedAck,
    Leg,
    LegState,
    invite_of,
    sdp_or_none,
)
from .sip.dialog import Dialog
from .sip.message import Request, Response
from .sip.transaction import Address, ServerTransaction

if TYPE_CHECKING:
    from .calls import B2BUA

log = EventLog("softswitch.calls")


def late_offer_of(
    self: B2BUA, leg: Leg, dialog: Dialog, resp: Response
) -> SessionDescription | None:
    """The offer in a late-offer fork's 2xx, or None if this 2xx cannot be the answer: it
    lost the race, or has no SDP we can relay. Such a 2xx still gets its ACK, with an
    answer declining every stream (§13.2.2.4: a valid answer, then BYE)."""
    call = leg.call
    offer = sdp_or_none(resp.body)
    if offer is not None and call.b is None and not call.ended:
        return offer
    # An o= of its own: the forks' shared one is the winner's.
    body = _declining(self, offer, OriginState()) if offer is not None else b""
    _ack(self, dialog, leg.dest, invite_of(leg).cseq.seq, body)
    if call.b is not None or call.ended:
        hang_up_loser(self, leg, dialog)
        return None
    log.warning("late_offer_unusable", call=call.id, call_id=dialog.call_id, party=leg.party)
    hang_up_loser(self, leg, dialog, reason=None)
    self._on_fork_failed(leg, 488)  # the other forks may still answer
    return None


def hang_up_loser(
    self: B2BUA, leg: Leg, dialog: Dialog, reason: str | None = COMPLETED_ELSEWHERE
) -> None:
    """BYE an answered fork that does not get the call (it has had its ACK)."""
    extra = [("Reason", reason)] if reason else None
    bye = dialog.new_request("BYE", self._via(leg.dest), extra=extra)
    self.layer.send_request(bye, leg.dest, self._now())
    leg.state = LegState.ENDED


def offer_in_2xx(
    self: B2BUA,
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
    await_answer(self, offerer, answerer, cseq, server)


def await_answer(
    self: B2BUA, offerer: Leg, answerer: Leg, cseq: int, server: ServerTransaction
) -> None:
    """Hold `offerer`'s ACK back until the ACK to our 2xx on `server` brings the answer."""
    aw = AwaitedAck(offerer, answerer, cseq, server.request.cseq.seq, server)
    offerer.call.awaited = aw
    self._awaiting[server] = aw


def answer_in_ack(self: B2BUA, aw: AwaitedAck, ack: Request) -> None:
    """The answerer's ACK: its answer, rewritten, goes to the offerer in the held ACK."""
    self._awaiting.pop(aw.server, None)
    answer = sdp_or_none(ack.body)
    if answer is None:
        give_up_answer(self, aw, "no answer in ack")
        return
    offerer = aw.offerer
    assert offerer.dialog is not None
    self._remember(aw.answerer, answer)
    offerer.sent = answer
    body = rewrite(answer, self.media.address, self._ports(answer, offerer.media), offerer.origin)
    aw.ack = _ack(self, offerer.dialog, offerer.dest, aw.cseq, body)
    self._refresh_pt_maps(offerer.call)
    log.info("late_offer_answered", call=offerer.call.id, call_id=ack.call_id)
    self.flush()


def give_up_answer(self: B2BUA, aw: AwaitedAck, reason: str) -> None:
    """No answer will come (no ACK, or one without usable SDP): the offerer still gets
    its ACK (declining every stream), then both phones a BYE."""
    decline_awaited(self, aw)
    call = aw.offerer.call
    log.warning("late_offer_failed", call=call.id, call_id=aw.server.request.call_id, reason=reason)
    for leg in (call.a, call.b):
        if leg is not None and leg.dialog is not None and leg.state is not LegState.ENDED:
            bye = leg.dialog.new_request("BYE", self._via(leg.dest))
            self.layer.send_request(bye, leg.dest, self._now())
    self._end(call, reason)
    self.flush()


def decline_awaited(self: B2BUA, aw: AwaitedAck) -> None:
    """Send the held ACK, if still held, with an answer declining every stream."""
    self._awaiting.pop(aw.server, None)
    offerer = aw.offerer
    if aw.ack is not None or offerer.dialog is None:
        return
    body = _declining(self, offerer.sdp, offerer.origin) if offerer.sdp else b""
    aw.ack = _ack(self, offerer.dialog, offerer.dest, aw.cseq, body)


def _declining(self: B2BUA, offer: SessionDescription, origin: OriginState) -> bytes:
    """An answer to `offer` that rejects every stream (port 0), codecs left as offered."""
    return rewrite(offer, self.media.address, [0] * len(offer.media), origin)


def _ack(self: B2BUA, dialog: Dialog, dest: Address, cseq: int, body: bytes) -> Request:
    """Send (and return) the ACK for our INVITE `cseq` in `dialog`, with SDP `body`."""
    extra = [("Content-Type", "application/sdp")] if body else None
    ack = dialog.new_request("ACK", self._via(dest), cseq=cseq, extra=extra, body=body)
    self.layer.send_stateless(ack, dest)
    return ack
