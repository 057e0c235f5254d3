"""Transfers: REFER executed by the B2BUA (RFC 3515), blind and attended.

These functions are the B2BUA's behaviour, kept in a module of their own to keep the call
set-up and relaying in calls.py readable: each takes the `calls.B2BUA` first, as `self`, and
uses its transaction layer, media manager and indexes. calls.py calls them as functions
(mypyc compiles them so, D17); the B2BUA's public methods for them delegate here.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import TYPE_CHECKING

from media.errors import SdpError
from media.sdp import SessionDescription, parse_sdp, rewrite
from softswitch.logline import EventLog

from .call_model import (
    ALLOW,
    FAILURE_REASONS,
    Call,
    ForkTarget,
    Leg,
    LegState,
    LineRef,
    Pending,
    Transfer,
    sendrecv,
)
from .lines import CallState
from .sip.dialog import new_call_id, new_tag
from .sip.message import Request, Response
from .sip.transaction import ClientTransaction, ServerTransaction

if TYPE_CHECKING:
    from .calls import B2BUA

log = EventLog("softswitch.calls")


def blind_transfer(
    self: B2BUA,
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
    _accept_refer(self, refer_txn, refer)
    notify_refer(self, x, "SIP/2.0 100 Trying", final=False)
    if far is None or far.sdp is None or not targets:
        notify_refer(self, x, "SIP/2.0 480 Temporarily Unavailable", final=True)
        self.flush()
        return
    t = Call(id=new_tag() + new_tag(), lines=lines, offer=sendrecv(far.sdp))
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
    self._later(self._now(), ring_time, lambda: self._ring_timeout(t.id))
    self._publish(t, CallState.RINGING)
    self.flush()


def transfer_answered(self: B2BUA, t: Call, leg: Leg, resp: Response) -> None:
    tr = t.transfer
    assert tr is not None and t.a is not None
    far = t.a
    try:
        answer = parse_sdp(resp.body)
    except SdpError:
        answer = None
    if answer is not None:
        self._remember(leg, answer)
        _reinvite(self, far, answer)
        self._refresh_pt_maps(t)
    t.transfer = None
    notify_refer(self, tr.transferor, "SIP/2.0 200 OK", final=True)
    _hang_up(self, tr.transferor, "transferred")
    self._end(tr.old, "transferred", by=tr.transferor.party)
    log.info("call_answered", call=t.id, party=leg.party, transfer=True)
    self._publish(t, CallState.ACTIVE)


def transfer_failed(self: B2BUA, t: Call, status: int, reason: str) -> None:
    tr = t.transfer
    assert tr is not None and t.a is not None
    far, old = t.a, tr.old
    far.call = old
    old.a_media, old.b_media, old.bridge = tr.old_media
    t.a_media = t.b_media = t.bridge = None
    if far.dialog is not None:
        self._index_call_id(old, far.dialog.call_id)
    notify_refer(
        self, tr.transferor, f"SIP/2.0 {status} {FAILURE_REASONS.get(status, reason)}", final=True
    )
    t.transfer = None
    t.a = None
    self._end(t, reason)


def attended_transfer(
    self: B2BUA, x1: Leg, refer_txn: ServerTransaction, refer: Request, replaces_call_id: str
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
            if leg is not None and leg.dialog is not None and leg.dialog.call_id == replaces_call_id
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
    _accept_refer(self, refer_txn, refer)
    notify_refer(self, x1, "SIP/2.0 100 Trying", final=False)
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
    _reinvite(self, far1, far2.sdp)
    _reinvite(self, far2, far1.sdp)
    # Two far ends that never negotiated with each other: the numbering may well differ.
    call1.bridge = self.media.bridge(far1.media, far2.media, pt_maps=self._pt_maps(call1))
    notify_refer(self, x1, "SIP/2.0 200 OK", final=True)
    for x in (x1, x2):
        _hang_up(self, x, "transferred")
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


def _reinvite(self: B2BUA, leg: Leg, desc: SessionDescription) -> None:
    """Send `leg`'s phone a re-INVITE with `desc` (made sendrecv) towards its endpoint."""
    if leg.dialog is None:
        return
    body = rewrite(sendrecv(desc), self.media.address, self._ports(desc, leg.media), leg.origin)
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


def own_reinvite_answered(
    self: B2BUA, txn: ClientTransaction, pending: Pending, resp: Response
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


def _hang_up(self: B2BUA, leg: Leg, reason: str) -> None:
    if leg.dialog is not None and leg.state is not LegState.ENDED:
        bye = leg.dialog.new_request("BYE", self._via(leg.dest))
        self.layer.send_request(bye, leg.dest, self._now())
    leg.state = LegState.ENDED
    self._unindex_leg(leg)


def _accept_refer(self: B2BUA, txn: ServerTransaction, refer: Request) -> None:
    self.layer.send_response(txn, refer.make_response(202, "Accepted"), self._now())


def notify_refer(self: B2BUA, x: Leg, frag: str, *, final: bool) -> None:
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
