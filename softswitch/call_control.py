"""Call control: routes call-related transaction events to call setup, the B2BUA and features.

The service hands it every INVITE, CANCEL, ACK and in-dialog request and every response or
timeout of a client transaction; it decides which component answers. Per-user runtime state that
feature codes change (do-not-disturb, opting out of a line's ringing) lives here and persists in
the store, so a restart keeps a delegate's choice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from dialplan import Config, Permission
from dialplan.routing import lines_of, may_act_as
from softswitch.logline import EventLog

from .call_model import Call, ForkTarget, Leg, LineRef, sip_user
from .call_setup import Admit, CallSetup, Feature, Refuse
from .lines import CallState, LineBus
from .sca import Reject, Retrieve, private_hold_requested
from .sip.errors import ParseError
from .sip.headers import parse_name_addr
from .sip.message import Request, Response
from .sip.transaction import Address, ClientTransaction, ServerTransaction
from .sip.transaction_layer import TransactionLayer
from .store import Store
from .throttle import FailureThrottle

if TYPE_CHECKING:
    from .sca import ScaManager

log = EventLog("softswitch.calls")

Respond = Callable[..., None]


class Calls(Protocol):
    """What call control asks of the B2BUA (`calls.B2BUA` provides it).

    A protocol rather than the class so that tests can hand call control a recording stand-in:
    the compiled build checks arguments typed with a compiled class at run time (D17).
    """

    calls: dict[str, Call]
    bus: LineBus

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
    ) -> Coroutine[Any, Any, None] | None: ...

    def on_cancel(self, invite_txn: ServerTransaction, cancel: Request) -> bool: ...

    def find_leg(self, req: Request) -> Leg | None: ...

    def find_call(self, call_id: str) -> Call | None: ...

    def other_leg(self, leg: Leg) -> Leg | None: ...

    def on_in_dialog(self, txn: ServerTransaction, req: Request, leg: Leg) -> None: ...

    def pickup(
        self, call: Call, txn: ServerTransaction, req: Request, source: Address, party: str
    ) -> None: ...

    def retrieve(
        self,
        call: Call,
        ref: LineRef,
        txn: ServerTransaction,
        req: Request,
        source: Address,
        party: str,
    ) -> None: ...

    def make_private(self, party: str) -> list[Call]: ...

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
    ) -> None: ...

    def attended_transfer(
        self, x1: Leg, refer_txn: ServerTransaction, refer: Request, replaces_call_id: str
    ) -> bool: ...

    def on_response(self, txn: ClientTransaction, resp: Response) -> bool: ...

    def on_timeout(self, txn: ClientTransaction) -> bool: ...

    def on_ack_timeout(self, txn: ServerTransaction) -> None: ...

    def on_ack(self, req: Request) -> bool: ...

    def on_stray_2xx(self, resp: Response) -> None: ...


class CallControl:
    def __init__(
        self,
        layer: TransactionLayer,
        b2bua: Calls,
        setup: CallSetup,
        store: Store,
        throttle: FailureThrottle,
        respond: Respond,
        cfg: Config,
    ) -> None:
        self.layer = layer
        self.b2bua = b2bua
        self.setup = setup
        self.store = store
        self.throttle = throttle
        self.respond = respond
        self.cfg = cfg
        self.opted_out: set[tuple[str, str]] = set()
        self.dnd: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Shared Call Appearance (set by the service): retrievals by INVITE, seized indices
        #: of admitted calls, private holds asked for in a re-INVITE's Call-Info.
        self.sca: ScaManager | None = None

    async def load_state(self) -> None:
        flags = await self.store.load_user_flags()
        self.opted_out = {(line, user) for user, flag, line in flags if flag == "ring_opt_out"}
        self.dnd = {user for user, flag, _ in flags if flag == "dnd"}

    # --- requests ---------------------------------------------------------------------------
    def on_request(self, txn: ServerTransaction, req: Request, source: Address) -> bool:
        """Handle call-related requests; False if the request is not the caller's business."""
        if req.method == "CANCEL":
            self._on_cancel(txn, req, source)
            return True
        if req.to.tag is not None:
            leg = self.b2bua.find_leg(req)
            if leg is None:
                if req.method == "ACK":
                    return True
                self.respond(txn, req, req.make_response(481), source)
                return True
            if req.method == "REFER":
                self._on_refer(txn, req, source, leg)
                return True
            private = self._private_hold(req, leg)
            if private:  # locked before the hold is published: never shown retrievable
                leg.call.private = True
            self.b2bua.on_in_dialog(txn, req, leg)
            if private and leg.call.held_by != leg.party:
                leg.call.private = False  # no hold SDP after all: nothing to lock
            return True
        if req.method == "INVITE" and req.headers.get("replaces"):
            self._on_replaces(txn, req, source)
            return True
        if req.method == "INVITE":
            if self.sca is not None and self._on_sca_invite(txn, req, source):
                return True
            self._on_invite(txn, req, source)
            return True
        return False

    def _on_cancel(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        invite = self.layer.find_invite_for_cancel(req)
        if invite is None:
            self.respond(txn, req, req.make_response(481), source)
            return
        self.respond(txn, req, req.make_response(200, "OK"), source)
        self.b2bua.on_cancel(invite, req)

    def _on_invite(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        now = time.time()
        decision = self.setup.decide(req, source, now, opted_out=self.opted_out, dnd=self.dnd)
        if isinstance(decision, Refuse):
            self._refuse(txn, req, source, decision, now)
        elif isinstance(decision, Feature):
            self._feature(txn, req, source, decision)
        else:
            self._start(txn, req, source, decision)

    def _refuse(
        self, txn: ServerTransaction, req: Request, source: Address, r: Refuse, now: float
    ) -> None:
        resp = req.make_response(r.status, r.reason, to_tag=_tag())
        for value in r.challenge or []:
            resp.headers.add("Proxy-Authenticate", value)
        if r.auth_failed and self.throttle.record_failure(source.host, now):
            log.warning("auth_source_blocked", peer=source.host)
        if r.event == "identity_refused":
            log.warning(
                "identity_refused",
                user=r.user,
                call_id=req.call_id,
                asked=req.headers.get("p-preferred-identity") or req.headers.get("from"),
            )
        self.respond(txn, req, resp, source, event=r.event, user=r.user)

    def _start(self, txn: ServerTransaction, req: Request, source: Address, a: Admit) -> None:
        if self.sca is not None:
            self.sca.on_call_admitted(req)  # dialled on a seized appearance: keep its index
        log.info(
            "call_admitted",
            call_id=req.call_id,
            user=a.user,
            identity=a.identity,
            line=a.lines[-1].line,
            targets=len(a.targets),
        )
        pending = self.b2bua.begin_call(
            txn,
            req,
            source,
            lines=a.lines,
            caller_from=a.caller_from,
            caller_pai=a.caller_pai,
            targets=a.targets,
            ring_time=a.ring_time,
        )
        if pending is None:  # forked already (or refused)
            return
        task = asyncio.get_running_loop().create_task(pending)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- taking calls over: Replaces (RFC 3891) and the pickup/retrieve codes --------------
    def _on_replaces(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        now = time.time()
        user = self.setup.authenticate(req, now)
        if isinstance(user, Refuse):
            self._refuse(txn, req, source, user, now)
            return
        try:
            call_id, early_only = _parse_replaces(req.headers.get("replaces") or "")
        except ValueError:
            self.respond(txn, req, req.make_response(400, "Bad Replaces", to_tag=_tag()), source)
            return
        call = self.b2bua.find_call(call_id)
        if call is None or call.ended:
            self.respond(
                txn,
                req,
                req.make_response(481, to_tag=_tag()),
                source,
                event="replaces_no_call",
                user=user,
            )
            return
        if early_only and call.b is not None:
            self.respond(
                txn,
                req,
                req.make_response(486, to_tag=_tag()),
                source,
                event="replaces_not_early",
                user=user,
            )
            return
        self._take_over(txn, req, source, user, call)

    def _take_over(
        self, txn: ServerTransaction, req: Request, source: Address, user: str, call: Call
    ) -> None:
        """Pick up (ringing) or retrieve (established) `call` for `user`, if they may."""
        ref = next(
            (r for r in call.lines if may_act_as(self.cfg, user, r.line, Permission.PICKUP)), None
        )
        if ref is None:
            self._refuse_take_over(txn, req, source, user, call, "Forbidden", "not a party")
            return
        if call.private and call.held_by != user:
            self._refuse_take_over(
                txn, req, source, user, call, "Call Is Private", "private hold", private=True
            )
            return
        log.info(
            "call_take_over",
            user=user,
            call=call.id,
            line=ref.line,
            kind="pickup" if call.b is None else "retrieve",
        )
        if call.b is None:
            self.b2bua.pickup(call, txn, req, source, user)
        else:
            self.b2bua.retrieve(call, ref, txn, req, source, user)

    def _private_hold(self, req: Request, leg: Leg) -> bool:
        """A hold re-INVITE from an SCA phone asking `appearance-state=held-private`.

        The call is marked private before the B2BUA handles the re-INVITE, so the hold it
        publishes is already private: a public "held" shown for an instant would let another
        phone's key offer the call. (`B2BUA.make_private`, the feature code's way, locks calls
        already held, which would publish the hold twice.)"""
        return (
            self.sca is not None
            and req.method == "INVITE"
            and leg.party is not None
            and private_hold_requested(req)
        )

    def _on_sca_invite(self, txn: ServerTransaction, req: Request, source: Address) -> bool:
        """An SCA phone reaching for the call on one of its line's appearances (BroadWorks:
        an INVITE to the line naming the held appearance's index); False for any other INVITE.

        Same rules as `Replaces` and the feature codes: authenticated, a member with the pickup
        permission, a private hold refused (`_take_over`).
        """
        assert self.sca is not None
        if self.cfg.is_trusted(source.host):
            return False
        verdict = self.sca.on_invite(req)
        if verdict is None:
            return False
        now = time.time()
        user = self.setup.authenticate(req, now)
        if isinstance(user, Refuse):
            self._refuse(txn, req, source, user, now)
            return True
        call = self.b2bua.calls.get(verdict.call_id) if isinstance(verdict, Retrieve) else None
        if call is not None and not call.ended:
            self._take_over(txn, req, source, user, call)
            return True
        if not may_act_as(self.cfg, user, verdict.line, Permission.PICKUP):
            status, reason = 403, "Forbidden"
        elif isinstance(verdict, Reject):
            status, reason = verdict.status, verdict.reason
        else:
            status, reason = 481, "Call Does Not Exist"
        self.respond(
            txn,
            req,
            req.make_response(status, reason, to_tag=_tag()),
            source,
            event="sca_take_over_refused",
            user=user,
        )
        return True

    def _refuse_take_over(
        self,
        txn: ServerTransaction,
        req: Request,
        source: Address,
        user: str,
        call: Call,
        reason: str,
        why: str,
        private: bool = False,
    ) -> None:
        """403 for a pickup or retrieve `user` may not do; logged with the reason."""
        log.warning("pickup_refused", user=user, call=call.id, reason=why)
        resp = req.make_response(403, reason, to_tag=_tag())
        event = "pickup_refused_private" if private else "pickup_refused"
        self.respond(txn, req, resp, source, event=event, user=user)

    def _find_on_lines(self, user: str, line: str, states: tuple[CallState, ...]) -> Call | None:
        """The call a `*8`/`*9` means: the oldest in `states` on `line`, else on `user`'s lines.

        Calls the user may take come first; failing those, any matching call is returned, so
        that `_take_over` answers 403 (not a member, or held privately) rather than "no call":
        the caller learns why, as with Replaces.
        """
        model = self.b2bua.bus.model
        mine = [line] if line else list(lines_of(self.cfg, user))
        everywhere = [] if line else [ln for ln in model.busy_lines() if ln not in mine]
        refused: Call | None = None
        for candidate in (*mine, *everywhere):
            for lc in model.calls(candidate):
                call = self.b2bua.calls.get(lc.call_id)
                if call is None or lc.state not in states:
                    continue
                if lc.party == user and lc.state is not CallState.HELD:
                    continue  # your own active call is not something to pick up
                allowed = candidate in mine and may_act_as(
                    self.cfg, user, candidate, Permission.PICKUP
                )
                if allowed and not (call.private and call.held_by != user):
                    return call
                refused = refused or call
        return refused

    # --- transfer (RFC 3515, executed here: the REFER never reaches the far end) ------------
    def _on_refer(self, txn: ServerTransaction, req: Request, source: Address, leg: Leg) -> None:
        try:
            target = parse_name_addr(req.headers.get("refer-to") or "")
        except ParseError:
            self.respond(txn, req, req.make_response(400, "Bad Refer-To"), source)
            return
        uri = target.uri
        replaces = _replaces_in(uri)
        by = req.headers.get("referred-by") or (
            f"<sip:{leg.party}@{self.cfg.domain}>" if leg.party else None
        )
        if replaces is not None:
            if not self.b2bua.attended_transfer(leg, txn, req, replaces):
                self.respond(
                    txn,
                    req,
                    req.make_response(481, "Replaced Call Not Found"),
                    source,
                    event="transfer_refused",
                    user=leg.party,
                )
            return
        far = self.b2bua.other_leg(leg)
        dialled = sip_user(uri) or ""
        admit = self.setup.transfer_admit(
            dialled, far.identity if far else "", far.name if far else None, time.time()
        )
        if isinstance(admit, Refuse):
            self.respond(
                txn,
                req,
                req.make_response(admit.status, admit.reason),
                source,
                event=admit.event,
                user=leg.party,
            )
            return
        self.b2bua.blind_transfer(
            leg,
            txn,
            req,
            lines=admit.lines,
            caller_from=admit.caller_from,
            caller_pai=admit.caller_pai,
            targets=admit.targets,
            ring_time=admit.ring_time,
            referred_by=by,
        )

    # --- feature codes ----------------------------------------------------------------------
    def _feature(self, txn: ServerTransaction, req: Request, source: Address, f: Feature) -> None:
        """Toggle features answer with a final response whose reason phrase says the new state:
        phones show it on their display, and no media is needed."""
        handlers = {
            "dnd_on": lambda: self._set_flag(f.user, "dnd", "", True, "DND On"),
            "dnd_off": lambda: self._set_flag(f.user, "dnd", "", False, "DND Off"),
            "ring_opt_out": lambda: self._opt(f, False),
            "ring_opt_in": lambda: self._opt(f, True),
        }
        if f.feature in ("pickup", "retrieve"):
            states = (CallState.RINGING,) if f.feature == "pickup" else (CallState.HELD,)
            call = self._find_on_lines(f.user, f.argument, states)
            if call is None:
                resp = req.make_response(404, "No Call To Pick Up", to_tag=_tag())
                self.respond(txn, req, resp, source, event=f"feature_{f.feature}", user=f.user)
                return
            self._take_over(txn, req, source, f.user, call)
            return
        if f.feature == "private_hold":
            locked = self.b2bua.make_private(f.user)
            reason = "Call Locked" if locked else "No Held Call"
            self.respond(
                txn,
                req,
                req.make_response(480, reason, to_tag=_tag()),
                source,
                event="feature_private_hold",
                user=f.user,
            )
            return
        handler = handlers.get(f.feature)
        if handler is None:
            resp = req.make_response(501, "Feature Not Available", to_tag=_tag())
            self.respond(txn, req, resp, source, event="feature_unavailable", user=f.user)
            return
        reason = handler()
        self.respond(
            txn,
            req,
            req.make_response(480, reason, to_tag=_tag()),
            source,
            event=f"feature_{f.feature}",
            user=f.user,
        )

    def _opt(self, f: Feature, ring: bool) -> str:
        line = f.argument or next(iter(self.cfg.delegators_of(f.user)), "")
        if not line or line not in self.cfg.delegators_of(f.user):
            return "Not A Delegate"
        return self._set_flag(
            f.user, "ring_opt_out", line, not ring, f"Ringing {'On' if ring else 'Off'} For {line}"
        )

    def _set_flag(self, user: str, flag: str, line: str, on: bool, reason: str) -> str:
        if flag == "dnd":
            (self.dnd.add if on else self.dnd.discard)(user)
        else:
            (self.opted_out.add if on else self.opted_out.discard)((line, user))
        task = asyncio.get_running_loop().create_task(
            self.store.set_user_flag(user, flag, line, on)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return reason

    # --- client side ------------------------------------------------------------------------
    def on_response(self, txn: ClientTransaction, resp: Response) -> None:
        self.b2bua.on_response(txn, resp)

    def on_timeout(self, txn: ClientTransaction) -> None:
        self.b2bua.on_timeout(txn)

    def on_ack_timeout(self, txn: ServerTransaction) -> None:
        self.b2bua.on_ack_timeout(txn)

    def on_ack(self, req: Request) -> None:
        self.b2bua.on_ack(req)

    def on_stray(self, resp: Response) -> None:
        if 200 <= resp.status < 300 and resp.cseq.method == "INVITE":
            self.b2bua.on_stray_2xx(resp)


def _parse_replaces(value: str) -> tuple[str, bool]:
    """`Replaces: call-id;to-tag=..;from-tag=..[;early-only]` -> (call-id, early-only)."""
    call_id, _, params = value.strip().partition(";")
    if not call_id.strip() or "to-tag=" not in params or "from-tag=" not in params:
        raise ValueError(f"malformed Replaces: {value!r}")
    flags = {p.strip().split("=", 1)[0].lower() for p in params.split(";")}
    return call_id.strip(), "early-only" in flags


def _replaces_in(uri: object) -> str | None:
    """The Call-ID of a `?Replaces=` header in a Refer-To URI (attended transfer)."""
    headers = getattr(uri, "headers", None)
    if not headers:
        return None
    for part in headers.split("&"):
        name, _, value = part.partition("=")
        if name.lower() == "replaces":
            return unquote(value).split(";", 1)[0]
    return None


def _tag() -> str:
    from .sip.dialog import new_tag

    return new_tag()
