"""BroadWorks Shared Call Appearance (SCA): the `call-info` and `line-seize` event packages.

Desk phones in SCA mode (Yealink `account.X.shared_line = 1`, Polycom `reg.x.type = shared`,
Cisco MPP shared line) register on a shared line's address and show every call of the line on
numbered line keys, the *appearances* (see `appearances`). On the wire (BroadWorks SIP Access
Side Extensions, implemented the same way by Kamailio's `sca` and OpenSIPS'
`presence_callinfo`/`b2b_sca` modules):

- `SUBSCRIBE sip:<line>` with `Event: call-info` (RFC 6665, an hour or so): NOTIFYs carry no
  body, only a `Call-Info` header listing every busy appearance and its state, then the rest
  as idle::

      Call-Info: <sip:example.com>;appearance-index=1;appearance-state=held;
                 appearance-uri="\\"Dave\\" <sip:1004@example.com>",
                 <sip:example.com>;appearance-index=*;appearance-state=idle

  States: seized, progressing (our outgoing call rings out), alerting (an incoming call rings
  the line), active, held, held-private.
- `SUBSCRIBE sip:<line>` with `Event: line-seize` and `Call-Info: <sip:..>;appearance-index=N`
  (or `*`): the phone goes off hook on key N. We answer 200 with a short expiry (15 s, the
  BroadWorks recommendation and the Yealink default) and NOTIFY `appearance-index=N` when the
  index is ours to give, or refuse 480 with `Retry-After` when it is not. Every call-info
  watcher sees N `seized`. The phone then dials with `Call-Info: ...;appearance-index=N` in its
  INVITE: that call takes index N and the seizure ends (final NOTIFY, `noresource`); or it
  unseizes (`Expires: 0`), or the seizure lapses.
- Holding: a re-INVITE with a hold SDP; `Call-Info: ...;appearance-state=held-private` in it
  asks for a *private* hold, which nobody else may retrieve (`private_hold_requested`).
- Retrieving a held call from another phone of the line: an INVITE to the line itself
  (Request-URI, From and To all the line) carrying the held appearance's index and no Replaces.
  `ScaManager.on_invite` recognises it; call control then takes the call over exactly like a
  `Replaces` or the retrieve feature code (permissions, and 403 for a private hold).

Phones without SCA (softphones, BLF) see the same calls through the dialog package, feature
codes and the HTTP Lines view; SCA is one more view of the `LineModel`, and appearance numbers
are kept for every line so a phone that subscribes mid-call sees the same numbers as the others.

`ScaManager` is the dialog-package notifier (`SubscriptionManager`) with the package-specific
parts replaced: authentication (407), membership checks, one NOTIFY in flight per subscription,
expiry and dropping a subscription whose NOTIFY fails are shared, so both packages converge the
same way. Sans-I/O like its parent: the service feeds it SUBSCRIBEs, NOTIFY outcomes, line events,
INVITEs and timer ticks; time is injected.
"""

from __future__ import annotations

import heapq
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from dialplan import Config, Permission
from dialplan.routing import may_act_as
from softswitch.logline import EventLog

from .appearances import Appearance, Appearances
from .call_model import sip_user
from .dialog_info import Document, sip_uri
from .directory import Directory
from .lines import CallState, Direction, LineCall, LineEvent, LineModel
from .sip.dialog import Dialog, new_tag
from .sip.digest import DigestAuthenticator
from .sip.errors import ParseError
from .sip.headers import parse_name_addr, split_list
from .sip.message import Request, Response
from .sip.syntax import is_token, quote
from .sip.transaction import Address, ClientTransaction, ServerTransaction
from .sip.transaction_layer import TransactionLayer
from .subscriptions import (
    MAX_PER_USER,
    Subscription,
    SubscriptionManager,
    _expires,
    _Refusal,
    _Template,
)
from .throttle import FailureThrottle

log = EventLog("softswitch.sca")

CALL_INFO = "call-info"
LINE_SEIZE = "line-seize"
PACKAGES = frozenset((CALL_INFO, LINE_SEIZE))
ALLOW_EVENTS = "call-info, line-seize"
#: A seizure lasts this long unless the phone dials or refreshes (BroadWorks recommends 15 s,
#: Yealink's `account.X.line_seize.expires` defaults to it); a phone asking more gets this.
SEIZE_EXPIRES = 15
#: How long an admitted INVITE's `appearance-index` waits for its call to show on the line
#: (Timer B: the call is on the line, or failed, well before).
CLAIM_TTL = 32.0
#: How long an index handed out for a fork INVITE waits for the call to show on the line.
PROVISIONAL_TTL = 32.0
#: Outstanding claims kept at most (a burst of calls from SCA phones; oldest dropped first).
MAX_CLAIMS = 1024

_STATES = {
    CallState.RINGING: "alerting",
    CallState.DIALING: "progressing",
    CallState.ACTIVE: "active",
    CallState.HELD: "held",
}
#: What a display name may not carry inside `appearance-uri`: quotes and backslashes would need
#: two levels of escaping, and commas/semicolons trip phones that split the header naively.
_UNSAFE_NAME = re.compile(r'["\\,;\x00-\x1f\x7f]')


@dataclass(frozen=True, slots=True, init=False)
class Retrieve:
    """An INVITE that takes over the call on an appearance: the held (or ringing) call there.

    Call control authenticates the INVITE and hands `call_id` to its take-over logic, which
    checks the permission and refuses a private hold with 403.
    """

    line: str
    index: int
    call_id: str

    def __init__(self, line: str, index: int, call_id: str) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "line", line)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "call_id", call_id)


@dataclass(frozen=True, slots=True, init=False)
class Reject:
    """An INVITE at an appearance that cannot be taken over: answer `status` (once the phone
    authenticated and turned out to be a member of `line`)."""

    line: str
    status: int
    reason: str

    def __init__(self, line: str, status: int, reason: str) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "line", line)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "reason", reason)


class ScaStats(NamedTuple):
    """Table sizes beyond the subscriptions', for metrics and leak tests."""

    appearances: int
    seized: int
    claims: int
    seize_subscriptions: int
    rendered: int


class ScaManager(SubscriptionManager):
    """The `call-info`/`line-seize` notifier and the appearance numbers of every line.

    Besides what `SubscriptionManager` is fed (SUBSCRIBEs via `handles`/`on_subscribe`, NOTIFY
    outcomes, line events, timers, `update`), call control calls `on_invite` for every new
    INVITE (a retrieval, or nothing) and `on_call_admitted` for each one it admits (an SCA
    phone dialling on its seized index), and the B2BUA asks `appearance_header` for the
    `Call-Info` of the INVITEs it forks to the line's phones.
    """

    def __init__(
        self,
        layer: TransactionLayer,
        local: Callable[[str], Address],
        auth: DigestAuthenticator,
        directory: Directory,
        cfg: Config,
        model: LineModel,
        flush: Callable[[], None],
        clock: Callable[[], float],
        *,
        wall: Callable[[], float] = time.time,
        throttle: FailureThrottle | None = None,
        max_per_user: int = MAX_PER_USER,
        appearances: Appearances | None = None,
    ) -> None:
        super().__init__(
            layer,
            local,
            auth,
            directory,
            cfg,
            model,
            flush,
            clock,
            wall=wall,
            throttle=throttle,
            max_per_user=max_per_user,
        )
        self.appearances = appearances if appearances is not None else Appearances()
        self._seizes: dict[tuple[str, str], Appearance] = {}  # line-seize sub -> its index
        # (INVITE Call-ID, From tag) -> (appearance-index, deadline), oldest first
        self._claims: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._rendered: dict[str, str] = {}  # line -> its call-info Call-Info value

    # --- queries ----------------------------------------------------------------------------
    @staticmethod
    def handles(req: Request) -> bool:
        """Whether a SUBSCRIBE is for one of our packages (its Event: call-info, line-seize)."""
        package = (req.headers.get("event") or "").split(";", 1)[0].strip(" \t").lower()
        return package in PACKAGES

    def appearance_of(self, line: str, call_id: str) -> int | None:
        """The index `call_id` shows on at `line` (the HTTP Lines view may show it)."""
        return self.appearances.index_of(line, call_id)

    def appearance_header(self, line: str, call_id: str) -> str | None:
        """`Call-Info` for an INVITE the B2BUA sends to a phone of `line` for `call_id`.

        Forks go out before the call's first line event, so the index is handed out here if
        the call has none yet, provisionally: the line event confirms it, and if the call never
        shows on the line it lapses. None when every index of the line is taken.
        """
        app = self.appearances.bind(line, call_id, until=self._clock() + PROVISIONAL_TTL)
        if app is None:
            return None
        return f"<sip:{self.cfg.domain}>;appearance-index={app.index}"

    def is_sca_phone(self, line: str, dest: Address) -> bool:
        """Whether the phone at `dest` watches `line` with call-info (it understands indices)."""
        return any(
            _package(s) == CALL_INFO and s.dest == dest
            for s in self._by_line.get(line, {}).values()
        )

    def sca_stats(self) -> ScaStats:
        return ScaStats(
            len(self.appearances),
            self.appearances.stats().seized,
            len(self._claims),
            len(self._seizes),
            len(self._rendered),
        )

    # --- INVITEs ------------------------------------------------------------------------------
    def on_invite(self, req: Request) -> Retrieve | Reject | None:
        """What a new INVITE means for the appearances, before it is routed as a call.

        An INVITE from an SCA phone to its own line (Request-URI, To and From: the line; a
        Request-URI without a user counts as the To) naming a busy appearance is not a call to
        the line: it reaches for the call on that key. A held or ringing call there is taken
        over (`Retrieve`); an active one cannot be (joining calls is not supported: `Reject`
        403); an index with no call is a retrieval that came too late (`Reject` 481). A seized
        index is the phone calling its own line, an ordinary call (None), as is every INVITE
        without an `appearance-index`.
        """
        index = appearance_index(req)
        if index is None:
            return None
        line = self._extension(sip_user(req.uri) or sip_user(req.to.uri))
        if (
            line is None
            or self._extension(sip_user(req.to.uri)) != line
            or self._extension(sip_user(req.from_.uri)) != line
        ):
            return None
        app = self.appearances.at(line, index)
        if app is not None and app.seized:
            return None
        call = None if app is None or app.call_id is None else self.model.call(line, app.call_id)
        if app is None or app.call_id is None or call is None:
            return Reject(line, 481, "Call Does Not Exist")
        if call.state in (CallState.HELD, CallState.RINGING):
            return Retrieve(line, index, app.call_id)
        return Reject(line, 403, "Barge-In Not Supported")

    def on_call_admitted(self, req: Request) -> None:
        """An INVITE was admitted as a call: remember the index its phone dialled on.

        The call's first line event (its outbound line, DIALING) carries the INVITE's Call-ID
        and From tag and takes that index then (`_bind`). Recorded only once the call is
        admitted, so an unauthenticated INVITE cannot fill the table.
        """
        index = appearance_index(req)
        tag = req.from_.tag
        if index is None or not tag:
            return
        now = self._clock()
        self._prune_claims(now)
        key = (req.call_id, tag)
        self._claims.pop(key, None)
        self._claims[key] = (index, now + CLAIM_TTL)
        while len(self._claims) > MAX_CLAIMS:
            self._claims.popitem(last=False)

    # --- SUBSCRIBE ----------------------------------------------------------------------------
    def _new(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        package, event = _event(req)
        if not req.contacts:
            raise _Refusal(400, "Missing Contact")
        user = self._authenticate(req, source)
        line = self._line_of(req)
        seize = package == LINE_SEIZE
        if not self._allowed(package, user, line):
            log.warning("sca_subscribe_forbidden", user=user, line=line, package=package)
            raise _Refusal(403, "Forbidden")
        expires = _seize_expires(req) if seize else _expires(req)
        if expires and self._per_user.get(user, 0) >= self.max_per_user:
            raise _Refusal(403, "Too Many Subscriptions")
        old = self._by_peer.get((req.call_id, req.from_.tag))
        if old is not None and old.user == user:  # the phone started over on its Call-ID
            self._drop(old, "replaced")
        tag = new_tag()
        key = (req.call_id, tag)
        now = self._clock()
        seized: Appearance | None = None
        if seize and expires:
            wanted = appearance_index(req)
            seized = self.appearances.seize(line, key, now + expires, wanted)
            if seized is None:
                log.info("line_seize_refused", user=user, line=line, index=wanted)
                raise _Refusal(480, "Temporarily Unavailable", [("Retry-After", "1")])
        resp = self._ok(req, expires, source, tag)
        self.layer.send_response(txn, resp, now)
        sub = Subscription(key, line, user, Dialog.as_uas(req, resp, tag), source, event, now)
        log.info(
            "sca_subscribe",
            package=package,
            user=user,
            line=line,
            expires=expires,
            index=seized.index if seized else None,
            call_id=req.call_id,
        )
        if expires == 0:  # a fetch (RFC 6665 §4.4.3): the state once, no subscription
            self._send(sub, "terminated;reason=timeout")
            return
        self._add(sub, now + expires)
        if seized is not None:
            self._seizes[key] = seized
        self._send(sub, self._active(sub, now))
        if seized is not None:
            self._line_changed(line, now)

    def _refresh(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        sub = self.find(req)
        if sub is None:
            raise _Refusal(481, "Subscription Does Not Exist")
        if not sub.dialog.accept_remote_cseq(req):
            raise _Refusal(500, "Out Of Order")
        package, _ = _event(req)
        if package != _package(sub):
            raise _Refusal(489, "Bad Event", [("Allow-Events", ALLOW_EVENTS)])
        expires = _seize_expires(req) if package == LINE_SEIZE else _expires(req)
        now = self._clock()
        if not self._allowed(package, sub.user, sub.line):
            self._respond(txn, req, source, req.make_response(403, "Forbidden"), sub.user)
            self._terminate(sub, "rejected")
            return
        sub.dialog.update_target(req)  # SUBSCRIBE is a target refresh request
        sub.dest = source
        sub.template = None
        self._respond(txn, req, source, self._ok(req, expires, source, None), sub.user)
        if expires == 0:
            self._terminate(sub, "timeout")  # an unseize releases the index (see _drop)
            return
        sub.expires_at = now + expires
        self._expiry_push(sub)
        seized = self._seizes.get(sub.key)
        if seized is not None:
            self.appearances.extend(seized, sub.expires_at)
        self._notify_or_defer(sub, now)

    def _allowed(self, package: str, user: str, line: str) -> bool:
        """call-info: the line's members (as for BLF). line-seize: those who may place calls
        as the line, since a seizure is the first step of one."""
        if package == LINE_SEIZE:
            return self.cfg.user(line) is not None and may_act_as(
                self.cfg, user, line, Permission.PLACE
            )
        return self._may_watch(user, line)

    def _extension(self, name: str | None) -> str | None:
        if not name:
            return None
        cfg = self.cfg
        user = cfg.user(name) or cfg.user_by_number(name) or cfg.user_by_number("+" + name)
        return None if user is None else user.extension

    # --- line events --------------------------------------------------------------------------
    def on_line_event(self, event: LineEvent) -> None:
        """Keep the line's appearance numbers, then NOTIFY its call-info watchers.

        Runs after the `LineModel` applied the event, so what is rendered is the model's state.
        """
        now = self._clock()
        sent = False
        if event.state is CallState.ENDED:
            # A transfer may end a call on a line and revive it there under the same id: only
            # free the index if the call really left the line.
            if self.model.call(event.line, event.call_id) is None:
                self.appearances.release(event.line, event.call_id)
        else:
            sent = self._bind(event, now)
        if self._line_changed(event.line, now) or sent:
            self.flush()

    def _bind(self, event: LineEvent, now: float) -> bool:
        """Give the call on the event's line its appearance, or confirm the one it has.

        An outgoing call placed by an SCA phone takes the index its INVITE named: the phone's
        own seizure of it becomes the call (the line-seize subscription then ends, as its job
        is done), or the index if it is simply free. Someone else's seizure is never taken.
        """
        line, call_id = event.line, event.call_id
        if self.appearances.of_call(line, call_id) is not None:
            self.appearances.confirm(line, call_id)
            return False
        wanted = self._claimed(event, now)
        if wanted is not None:
            app = self.appearances.at(line, wanted)
            if app is not None and app.seized:
                sub = self._subs.get(app.owner) if isinstance(app.owner, tuple) else None
                if sub is not None and sub.user == event.party:
                    self.appearances.take(app, call_id)
                    log.info("line_seize_dialled", line=line, index=app.index, call=call_id)
                    self._terminate(sub, "noresource")
                    return True
                wanted = None
        self.appearances.bind(line, call_id, wanted)
        return False

    def _claimed(self, event: LineEvent, now: float) -> int | None:
        if event.direction is not Direction.OUTBOUND or event.dialog is None:
            return None
        claim = self._claims.pop((event.dialog[0], event.dialog[1]), None)
        if claim is None or claim[1] < now:
            return None
        return claim[0]

    def _line_changed(self, line: str, now: float) -> bool:
        """The line's appearances changed: NOTIFY each call-info watcher (coalesced while one
        NOTIFY is in flight, like the dialog package). False if nobody watches; the caller
        flushes."""
        self._rendered.pop(line, None)
        watchers = [s for s in self._by_line.get(line, {}).values() if _package(s) == CALL_INFO]
        for sub in watchers:
            self._notify_or_defer(sub, now)
        return bool(watchers)

    # --- NOTIFY -------------------------------------------------------------------------------
    def _send(
        self,
        sub: Subscription,
        state: str,
        docs: dict[tuple[str, ...], Document] | None = None,
    ) -> None:
        """One NOTIFY: no body, the state in `Call-Info` (`docs` is the dialog package's)."""
        sub.version += 1
        sub.dirty = False
        if sub.template is None:
            contact = self._contact(sub.dest)
            sub.template = _Template.of(sub.dialog, contact, sub.event, content_type=None)
        value = self._seize_info(sub) if _package(sub) == LINE_SEIZE else self._line_info(sub)
        extra = (("call-info", "Call-Info", value),) if value else ()
        sub.dialog.local_cseq += 1
        req = sub.template.request(self._via(sub.dest), sub.dialog.local_cseq, state, b"", extra)
        txn = self.layer.send_request(req, sub.dest, self._clock())
        sub.pending = txn
        self._in_flight[txn] = sub

    def _seize_info(self, sub: Subscription) -> str | None:
        app = self._seizes.get(sub.key)
        if app is None:
            return None
        return f"<sip:{self.cfg.domain}>;appearance-index={app.index};appearance-state=seized"

    def _line_info(self, sub: Subscription) -> str:
        """The line's full appearance state, rendered once per change of the line."""
        value = self._rendered.get(sub.line)
        if value is None:
            value = render_call_info(
                self.cfg.domain, self._entries(sub.line, self.appearances.of_line(sub.line))
            )
            self._rendered[sub.line] = value
        return value

    def _entries(self, line: str, apps: Iterable[Appearance]) -> list[tuple[int, str, str | None]]:
        domain = self.cfg.domain
        out: list[tuple[int, str, str | None]] = []
        for app in apps:
            if app.call_id is None:
                out.append((app.index, "seized", None))
                continue
            call = self.model.call(line, app.call_id)
            if call is not None:  # None: a provisional index, not on the line yet
                uri = appearance_uri(call.remote, call.remote_name, domain)
                out.append((app.index, appearance_state(call), uri))
        return out

    def on_response(self, txn: ClientTransaction, resp: Response) -> bool:
        ours = super().on_response(txn, resp)
        if ours:
            self.flush()  # a failed line-seize NOTIFY releases its index: tell the watchers
        return ours

    def on_timeout(self, txn: ClientTransaction) -> bool:
        ours = super().on_timeout(txn)
        if ours:
            self.flush()
        return ours

    # --- the tables ---------------------------------------------------------------------------
    def _drop(self, sub: Subscription, reason: str) -> None:
        """Forget `sub`; a seizure it still holds is released and the line's watchers told."""
        if self._subs.get(sub.key) is not sub:
            return
        super()._drop(sub, reason)
        app = self._seizes.pop(sub.key, None)
        if app is not None and self.appearances.unseize(app, sub.key):
            log.info("line_seize_released", line=app.line, index=app.index, reason=reason)
            self._line_changed(app.line, self._clock())

    def _expiry_push(self, sub: Subscription) -> None:
        heapq.heappush(self._expiry, (sub.expires_at, next(self._seq), sub.key))

    def _prune_claims(self, now: float) -> None:
        claims = self._claims
        while claims:
            key, (_, deadline) = next(iter(claims.items()))
            if deadline >= now:
                break
            del claims[key]

    # --- time ---------------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        pending = (super().get_timer(), self.appearances.next_deadline())
        deadlines = [d for d in pending if d is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Expire subscriptions (a lapsed line-seize frees its index), then whatever index
        lapsed by itself (a provisional one whose call never showed)."""
        super().handle_timer(now)
        gone = self.appearances.expire(now)
        for line in {app.line for app in gone}:
            self._line_changed(line, now)
        self._prune_claims(now)
        if gone:
            self.flush()

    # --- configuration ------------------------------------------------------------------------
    def update(
        self, cfg: Config, directory: Directory, auth: DigestAuthenticator | None = None
    ) -> None:
        """A reloaded config: watchers who left a line are cut off, and so are seizures of
        those who may no longer place calls on it (their indices are released)."""
        self._rendered.clear()  # the domain may have changed
        super().update(cfg, directory, auth)
        gone = False
        for sub in list(self._subs.values()):
            if _package(sub) == LINE_SEIZE and not self._allowed(LINE_SEIZE, sub.user, sub.line):
                self._terminate(sub, "rejected")
                gone = True
        if gone:
            self.flush()


# --- Call-Info, both ways ---------------------------------------------------------------------


def _call_info_params(req: Request) -> Iterable[dict[str, str | None]]:
    """The parameters of each `Call-Info` value of `req` (malformed values skipped)."""
    for value in split_list(req.headers.get_all("call-info")):
        try:
            entry = parse_name_addr(value)
        except ParseError:
            continue
        yield {name.lower(): arg for name, arg in entry.params}


def appearance_index(req: Request) -> int | None:
    """The `appearance-index` a request names; None if it names none or `*` (any)."""
    for params in _call_info_params(req):
        value = params.get("appearance-index")
        if value is not None and value.isascii() and value.isdigit() and len(value) <= 4:
            return int(value)
    return None


def private_hold_requested(req: Request) -> bool:
    """Whether a (hold) re-INVITE asks for a private hold: `appearance-state=held-private`."""
    return any(
        (params.get("appearance-state") or "").lower() == "held-private"
        for params in _call_info_params(req)
    )


def appearance_state(call: LineCall) -> str:
    """The `appearance-state` of a call on the line."""
    if call.state is CallState.HELD and call.private:
        return "held-private"
    return _STATES.get(call.state, "active")


def appearance_uri(remote: str, name: str | None, domain: str) -> str:
    """The quoted `appearance-uri` value: the other party, `"\\"Dave\\" <sip:1004@domain>"`."""
    addr = f"<{sip_uri(remote, domain)}>"
    clean = " ".join(_UNSAFE_NAME.sub(" ", name).split()) if name else ""
    return quote(f"{quote(clean)} {addr}" if clean else addr)


def render_call_info(domain: str, entries: Iterable[tuple[int, str, str | None]]) -> str:
    """A call-info NOTIFY's `Call-Info`: (index, state, appearance-uri) per busy appearance,
    then every other index as idle. One header, values comma-separated, as BroadWorks,
    Kamailio and OpenSIPS send it."""
    parts = []
    for index, state, uri in entries:
        part = f"<sip:{domain}>;appearance-index={index};appearance-state={state}"
        parts.append(part + (f";appearance-uri={uri}" if uri else ""))
    parts.append(f"<sip:{domain}>;appearance-index=*;appearance-state=idle")
    return ",".join(parts)


# --- SUBSCRIBE checks -------------------------------------------------------------------------


def _event(req: Request) -> tuple[str, str]:
    """(package, the Event value our NOTIFYs carry); 489 for another package (§8.2.1)."""
    value = req.headers.get("event") or ""
    package, *params = (p.strip(" \t") for p in value.split(";"))
    package = package.lower()
    if package not in PACKAGES:
        raise _Refusal(489, "Bad Event", [("Allow-Events", ALLOW_EVENTS)])
    for param in params:
        name, _, arg = (p.strip(" \t") for p in param.partition("="))
        if name.lower() == "id" and is_token(arg):
            return package, f"{package};id={arg}"
    return package, package


def _package(sub: Subscription) -> str:
    return sub.event.split(";", 1)[0]


def _seize_expires(req: Request) -> int:
    """A seizure is short: SEIZE_EXPIRES by default and at most (no 423: any is fine)."""
    asked = req.expires
    return SEIZE_EXPIRES if asked is None else min(asked, SEIZE_EXPIRES)
