"""The notifier of RFC 6665 for the dialog event package (RFC 4235): BLF keys and shared lines.

A phone SUBSCRIBEs to a line (the Request-URI user); it may if it authenticates as the line's
own user or as one of its delegates (`dialplan.routing.lines_of`). We answer 200 and send the
line's full state at once, then a NOTIFY on every change the `LineBus` publishes, until the
subscription expires, is ended with `Expires: 0`, or the phone stops answering NOTIFYs.

Stuck lamps are what users report most about shared lines, so the design favours convergence
over cleverness:
- every NOTIFY carries full state, so one that arrives overcomes any that were lost;
- a call that ends is shown once as `terminated` and then disappears (see `dialog_info`);
- one NOTIFY at a time per subscription: changes that happen while one is in flight are
  coalesced into the next. Two NOTIFYs in flight over UDP can arrive out of order, the phone
  answers the late one 500 (lower CSeq, RFC 3261 §12.2.2), and RFC 6665 §4.2.2 would then
  have us drop the subscription: a lamp frozen until the phone re-subscribes;
- a failed NOTIFY (481, timeout, other errors) drops the subscription as §4.2.2 says, so the
  phone's next refresh gets a 481 and it subscribes afresh.

Sans-I/O like the rest of the SIP core: the service feeds requests, responses, timeouts and line
events in; this module sends through the transaction layer and calls `flush`. Two clocks are
injected: `clock` is the transaction layer's (loop time: expiry deadlines, `handle_timer`),
`wall` is time.time (digest nonces and `<duration>`, which LineEvents measure in wall time).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from dialplan import Config
from dialplan.routing import lines_of
from softswitch.logline import EventLog

from .call_model import sip_user
from .dialog_info import CONTENT_TYPE, Document, document
from .directory import Directory
from .lines import CallState, LineEvent, LineModel
from .sip.dialog import Dialog, new_tag
from .sip.digest import DigestAuthenticator, Verdict, parse_authorization
from .sip.errors import ParseError
from .sip.headers import CSeq, Headers, Via, header_key
from .sip.message import Request, Response
from .sip.syntax import is_token
from .sip.transaction import Address, ClientTransaction, ServerTransaction
from .sip.transaction_layer import TransactionLayer
from .sip.uri import Uri
from .throttle import FailureThrottle

log = EventLog("softswitch.subscriptions")

PACKAGE = "dialog"
DEFAULT_EXPIRES = 3600  # RFC 4235 §3.4
MIN_EXPIRES = 60
MAX_EXPIRES = 7200
#: Subscriptions one user may hold: a phone with a side car of BLF keys on a few lines needs a
#: few dozen; the bound keeps one compromised account from growing our memory without limit.
MAX_PER_USER = 64
_ACCEPTABLE = frozenset((CONTENT_TYPE, "application/*", "*/*"))


@dataclass(eq=False, slots=True)
class Subscription:
    """One watcher of one line: the SUBSCRIBE dialog and what has been shown through it."""

    key: tuple[str, str]  # (Call-ID, our tag): what an in-dialog SUBSCRIBE names
    line: str
    user: str  # who subscribed (authenticated, or asserted by a trusted peer)
    dialog: Dialog
    dest: Address  # the SUBSCRIBE's source: NOTIFYs go there (NAT-safe)
    event: str  # the Event header of our NOTIFYs: "dialog", with the SUBSCRIBE's id if any
    expires_at: float  # on the transaction layer's clock
    version: int = -1  # the last dialog-info version sent (RFC 4235: from 0, per subscription)
    pending: ClientTransaction | None = None  # the NOTIFY in flight
    dirty: bool = False  # the line changed while a NOTIFY was in flight
    ended: dict[str, LineEvent] = field(default_factory=dict)  # ended calls not yet shown
    template: _Template | None = None  # our NOTIFY, built once per target (see _Template)

    @property
    def peer(self) -> tuple[str, str | None]:
        """The subscriber's side of the dialog: (Call-ID, its From tag)."""
        return (self.dialog.call_id, self.dialog.remote_tag)


@dataclass(frozen=True, slots=True)
class _Template:
    """A subscription's NOTIFY less what changes per request: Via, CSeq, Subscription-State.

    Built with `Dialog.new_request` (route set, strict routing and all) whenever the target
    changes, it turns each NOTIFY into a list copy: building the request from scratch was a
    third of the cost of notifying a line's 48 watchers.
    """

    uri: Uri
    before_cseq: tuple[tuple[str, str, str], ...]  # Headers entries: (key, name, value)
    after_cseq: tuple[tuple[str, str, str], ...]

    @classmethod
    def of(
        cls, dialog: Dialog, contact: str, event: str, content_type: str | None = CONTENT_TYPE
    ) -> _Template:
        """`content_type=None`: NOTIFYs without a body (the SCA `call-info` package)."""
        extra = [("Event", event)]
        if content_type is not None:
            extra.append(("Content-Type", content_type))
        probe = dialog.new_request("NOTIFY", "", contact, extra, cseq=0)
        items = [(header_key(name), name, value) for name, value in probe.headers]
        at = next(i for i, item in enumerate(items) if item[0] == "cseq")
        return cls(probe.uri, tuple(items[1:at]), tuple(items[at + 1 :]))

    def request(
        self,
        via: Via,
        seq: int,
        state: str,
        body: bytes,
        extra: tuple[tuple[str, str, str], ...] = (),
    ) -> Request:
        """`extra`: (key, name, value) entries that change per NOTIFY (SCA's `Call-Info`)."""
        headers = Headers(
            [
                ("via", "Via", str(via)),
                *self.before_cseq,
                ("cseq", "CSeq", f"{seq} NOTIFY"),
                *self.after_cseq,
                ("subscription-state", "Subscription-State", state),
                *extra,
            ]
        )
        # The layer reads back the top Via and the CSeq of what it sends: hand it the values
        # just written rather than have it parse them again.
        headers.parsed("via", lambda _: [via])
        headers.parsed("cseq", lambda _: CSeq(seq, "NOTIFY"))
        return Request("NOTIFY", self.uri, headers, body)


class SubscriptionStats(NamedTuple):
    """Table sizes, for metrics and leak tests."""

    subscriptions: int
    lines: int
    notifies_in_flight: int
    timers: int


class _Refusal(Exception):
    """A SUBSCRIBE we answer with a final error response (internal control flow)."""

    def __init__(self, status: int, reason: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = list(headers)


class SubscriptionManager:
    """All dialog-event subscriptions of the service.

    The service routes to it: SUBSCRIBEs (`on_subscribe`), the responses and timeouts of its
    NOTIFYs (`on_response`, `on_timeout`: both say whether the transaction was ours), line
    events (`on_line_event`, subscribed to the LineBus after the model), and its deadline
    (`get_timer`/`handle_timer`). On a config reload it calls `update`.
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
    ) -> None:
        self.layer = layer
        self.local = local
        self.auth = auth
        self.directory = directory
        self.cfg = cfg
        self.model = model
        self.flush = flush
        self._clock = clock
        self._wall = wall
        self.throttle = throttle
        self.max_per_user = max_per_user
        self._subs: dict[tuple[str, str], Subscription] = {}
        self._by_line: dict[str, dict[tuple[str, str], Subscription]] = {}
        self._by_peer: dict[tuple[str, str | None], Subscription] = {}
        self._per_user: dict[str, int] = {}
        self._in_flight: dict[ClientTransaction, Subscription] = {}
        self._expiry: list[tuple[float, int, tuple[str, str]]] = []
        self._seq = itertools.count()

    # --- queries ----------------------------------------------------------------------------
    def find(self, req: Request) -> Subscription | None:
        """The subscription an in-dialog SUBSCRIBE belongs to (Call-ID and our To tag)."""
        tag = req.to.tag
        return None if tag is None else self._subs.get((req.call_id, tag))

    def subscriptions_of(self, line: str) -> list[Subscription]:
        return list(self._by_line.get(line, {}).values())

    def stats(self) -> SubscriptionStats:
        return SubscriptionStats(
            len(self._subs), len(self._by_line), len(self._in_flight), len(self._expiry)
        )

    # --- SUBSCRIBE --------------------------------------------------------------------------
    def on_subscribe(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        """Answer a SUBSCRIBE: a new subscription, a refresh, or an unsubscribe (Expires 0).

        An in-dialog SUBSCRIBE whose dialog we do not know gets 481, so the phone starts over.
        """
        try:
            if req.to.tag is None:
                self._new(txn, req, source)
            else:
                self._refresh(txn, req, source)
        except _Refusal as refusal:
            self._refuse(txn, req, source, refusal)
        except ParseError as exc:
            self._refuse(txn, req, source, _Refusal(exc.status, "Bad Request"))
        self.flush()

    def _new(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        event = _event_header(req)
        _check_accept(req)
        if not req.contacts:
            raise _Refusal(400, "Missing Contact")
        user = self._authenticate(req, source)
        line = self._line_of(req)
        if not self._may_watch(user, line):
            log.warning("subscribe_forbidden", user=user, line=line, call_id=req.call_id)
            raise _Refusal(403, "Forbidden")
        expires = _expires(req)
        if expires and self._per_user.get(user, 0) >= self.max_per_user:
            raise _Refusal(403, "Too Many Subscriptions")
        old = self._by_peer.get((req.call_id, req.from_.tag))
        if old is not None and old.user == user:  # the phone started over on its Call-ID
            self._drop(old, "replaced")
        tag = new_tag()
        resp = self._ok(req, expires, source, tag)
        now = self._clock()
        self.layer.send_response(txn, resp, now)
        sub = Subscription(
            (req.call_id, tag), line, user, Dialog.as_uas(req, resp, tag), source, event, now
        )
        log.info("subscribe", user=user, line=line, expires=expires, call_id=req.call_id)
        if expires == 0:  # a fetch (§4.4.3): one NOTIFY with the state, no subscription
            self._send(sub, "terminated;reason=timeout")
            return
        self._add(sub, now + expires)
        self._send(sub, self._active(sub, now))

    def _refresh(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        sub = self.find(req)
        if sub is None:
            raise _Refusal(481, "Subscription Does Not Exist")
        if not sub.dialog.accept_remote_cseq(req):
            raise _Refusal(500, "Out Of Order")
        _event_header(req)
        expires = _expires(req)
        now = self._clock()
        if not self._may_watch(sub.user, sub.line):
            self._respond(txn, req, source, req.make_response(403, "Forbidden"), sub.user)
            self._terminate(sub, "rejected")
            return
        sub.dialog.update_target(req)  # SUBSCRIBE is a target refresh request
        sub.dest = source  # the phone's NAT binding may have moved
        sub.template = None
        self._respond(txn, req, source, self._ok(req, expires, source, None), sub.user)
        if expires == 0:
            self._terminate(sub, "timeout")  # RFC 6665 §4.2.1.4: unsubscribing
            return
        sub.expires_at = now + expires
        heapq.heappush(self._expiry, (sub.expires_at, next(self._seq), sub.key))
        self._notify_or_defer(sub, now)

    def _ok(self, req: Request, expires: int, source: Address, tag: str | None) -> Response:
        resp = req.make_response(200, "OK", to_tag=tag)
        resp.headers.add("Expires", str(expires))
        resp.headers.add("Contact", self._contact(source))
        return resp

    def _authenticate(self, req: Request, source: Address) -> str:
        """The subscriber: digest-authenticated like an INVITE (407), or a trusted peer's From."""
        if self.cfg.is_trusted(source.host):
            user = sip_user(req.from_.uri) or ""
            if self.cfg.user(user) is None:
                raise _Refusal(403, "Forbidden")
            return user
        now = self._wall()
        values = req.headers.get_each("proxy-authorization")
        if not values:
            raise self._challenge(now, stale=False)
        try:
            creds = [parse_authorization(v) for v in values]
        except ParseError:
            raise _Refusal(400, "Bad Credentials") from None
        cred = next((c for c in creds if c.realm == self.auth.realm), creds[0])
        known = self.directory.credentials.get(cred.username)
        verdict = self.auth.verify(cred, "SUBSCRIBE", known, now)
        if verdict is Verdict.OK:
            return cred.username
        if verdict in (Verdict.STALE, Verdict.MALFORMED):
            raise self._challenge(now, stale=verdict is Verdict.STALE)
        if self.throttle is not None and self.throttle.record_failure(source.host, now):
            log.warning("auth_source_blocked", peer=source.host)
        log.info("subscribe_auth_failed", user=cred.username, verdict=verdict.value)
        raise _Refusal(403, "Forbidden")

    def _challenge(self, now: float, stale: bool) -> _Refusal:
        headers = [("Proxy-Authenticate", c) for c in self.auth.challenges(now, stale=stale)]
        return _Refusal(407, "Proxy Authentication Required", headers)

    def _line_of(self, req: Request) -> str:
        """The watched line: the Request-URI user, an extension or one of our numbers."""
        wanted = sip_user(req.uri) or ""
        cfg = self.cfg
        user = cfg.user(wanted) or cfg.user_by_number(wanted) or cfg.user_by_number("+" + wanted)
        if user is None:
            raise _Refusal(404, "Not Found")
        return user.extension

    def _may_watch(self, user: str, line: str) -> bool:
        """The line's own user and its delegates; nobody else (RFC 6665 §5.2 authorization)."""
        if self.cfg.user(line) is None:
            return False
        return line == user or line in lines_of(self.cfg, user)

    def _refuse(
        self, txn: ServerTransaction, req: Request, source: Address, refusal: _Refusal
    ) -> None:
        resp = req.make_response(refusal.status, refusal.reason, to_tag=new_tag())
        for name, value in refusal.headers:
            resp.headers.add(name, value)
        self._respond(txn, req, source, resp, None)

    def _respond(
        self,
        txn: ServerTransaction,
        req: Request,
        source: Address,
        resp: Response,
        user: str | None,
    ) -> None:
        self.layer.send_response(txn, resp, self._clock())
        log.info(
            "sip_request",
            method=req.method,
            status=resp.status,
            call_id=req.call_id,
            user=user,
            peer=f"{source.transport}:{source.host}:{source.port}",
        )

    # --- line events ------------------------------------------------------------------------
    def on_line_event(self, event: LineEvent) -> None:
        """NOTIFY every watcher of the line: full state, the ended call shown once.

        The document is rendered once per distinct set of ended calls (normally once per
        event) and only its version differs per subscription.
        """
        subs = self._by_line.get(event.line)
        if not subs:
            return
        ended = event.state is CallState.ENDED
        docs: dict[tuple[str, ...], Document] = {}
        now = self._clock()
        for sub in list(subs.values()):
            if ended:
                sub.ended[event.call_id] = event
            self._notify_or_defer(sub, now, docs)
        self.flush()

    def _notify_or_defer(
        self, sub: Subscription, now: float, docs: dict[tuple[str, ...], Document] | None = None
    ) -> None:
        """Send the state now, or after the NOTIFY in flight (whose response sends it)."""
        pending = sub.pending
        if pending is not None and not pending.terminated:
            sub.dirty = True
            return
        if pending is not None:  # its end never reached us (a transport error): move on
            self._in_flight.pop(pending, None)
        self._send(sub, self._active(sub, now), docs)

    # --- NOTIFY -----------------------------------------------------------------------------
    def _send(
        self,
        sub: Subscription,
        state: str,
        docs: dict[tuple[str, ...], Document] | None = None,
    ) -> None:
        """One NOTIFY with the line's full state and `Subscription-State: state`."""
        doc = self._document(sub, docs)
        sub.version += 1
        sub.ended.clear()
        sub.dirty = False
        if sub.template is None:
            sub.template = _Template.of(sub.dialog, self._contact(sub.dest), sub.event)
        sub.dialog.local_cseq += 1
        req = sub.template.request(
            self._via(sub.dest), sub.dialog.local_cseq, state, doc.body(sub.version)
        )
        txn = self.layer.send_request(req, sub.dest, self._clock())
        sub.pending = txn
        self._in_flight[txn] = sub

    def _document(
        self, sub: Subscription, docs: dict[tuple[str, ...], Document] | None
    ) -> Document:
        """The line's state for `sub`, rendered once per distinct set of ended calls.

        An ended call that is back on the line (a transfer ends a call and revives it under
        the same id) is shown as it is now, not also as terminated: ids must stay unique.
        """
        key = tuple(sub.ended)
        doc = docs.get(key) if docs is not None else None
        if doc is None:
            calls = self.model.calls(sub.line)
            live = {c.call_id for c in calls}
            ended = [e for e in sub.ended.values() if e.call_id not in live]
            names = self.directory.names
            doc = document(sub.line, calls, self.cfg.domain, self._wall(), ended, names)
            if docs is not None:
                docs[key] = doc
        return doc

    @staticmethod
    def _active(sub: Subscription, now: float) -> str:
        return f"active;expires={max(0, round(sub.expires_at - now))}"

    def on_response(self, txn: ClientTransaction, resp: Response) -> bool:
        """A response to one of our NOTIFYs; False if `txn` is not ours.

        RFC 6665 §4.2.2: a NOTIFY failed if it got an error response without Retry-After and
        without an obvious way to retry (401/407 have one): the subscription is dropped, and
        a 481 always drops it.
        """
        sub = self._in_flight.get(txn)
        if sub is None:
            return False
        if resp.status < 200:
            return True
        del self._in_flight[txn]
        if sub.pending is txn:
            sub.pending = None
        if self._subs.get(sub.key) is not sub:
            return True  # a final NOTIFY, or the subscription went meanwhile
        failed = resp.status >= 300 and resp.status not in (401, 407)
        if resp.status == 481 or (failed and "retry-after" not in resp.headers):
            self._drop(sub, f"notify_{resp.status}")
        elif sub.dirty:
            self._send(sub, self._active(sub, self._clock()))
            self.flush()
        return True

    def on_timeout(self, txn: ClientTransaction) -> bool:
        """A NOTIFY timed out (Timer F) or hit a transport error: drop its subscription."""
        sub = self._in_flight.pop(txn, None)
        if sub is None:
            return False
        if sub.pending is txn:
            sub.pending = None
        if self._subs.get(sub.key) is sub:
            self._drop(sub, "notify_timeout")
        return True

    # --- expiry -----------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """The next expiry deadline (stale heap entries of refreshed subscriptions skipped)."""
        heap = self._expiry
        while heap and not self._due_entry(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def handle_timer(self, now: float) -> None:
        """End every subscription not refreshed in time, with a final NOTIFY (§4.2.1.4)."""
        heap = self._expiry
        ended = False
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._due_entry(entry):
                self._terminate(self._subs[entry[2]], "timeout")
                ended = True
        if ended:
            self.flush()

    def _due_entry(self, entry: tuple[float, int, tuple[str, str]]) -> bool:
        sub = self._subs.get(entry[2])
        return sub is not None and sub.expires_at == entry[0]

    # --- configuration ----------------------------------------------------------------------
    def update(
        self, cfg: Config, directory: Directory, auth: DigestAuthenticator | None = None
    ) -> None:
        """A reloaded config: watchers who are no longer members of a line are cut off."""
        self.cfg = cfg
        self.directory = directory
        if auth is not None:
            self.auth = auth
        gone = False
        for sub in list(self._subs.values()):
            if cfg.user(sub.line) is None:
                self._terminate(sub, "noresource")
                gone = True
            elif not self._may_watch(sub.user, sub.line):
                self._terminate(sub, "rejected")
                gone = True
        if gone:
            self.flush()

    # --- the tables -------------------------------------------------------------------------
    def _add(self, sub: Subscription, expires_at: float) -> None:
        sub.expires_at = expires_at
        self._subs[sub.key] = sub
        self._by_line.setdefault(sub.line, {})[sub.key] = sub
        self._by_peer[sub.peer] = sub
        self._per_user[sub.user] = self._per_user.get(sub.user, 0) + 1
        heapq.heappush(self._expiry, (expires_at, next(self._seq), sub.key))

    def _terminate(self, sub: Subscription, reason: str) -> None:
        """The final NOTIFY (`terminated;reason=...`, full state), then forget `sub`."""
        self._send(sub, f"terminated;reason={reason}")
        self._drop(sub, reason)

    def _drop(self, sub: Subscription, reason: str) -> None:
        """Forget `sub`. In-flight NOTIFYs stay tracked until they end, so their responses are
        still recognised as ours; stale expiry entries are skipped when they come up."""
        if self._subs.pop(sub.key, None) is None:
            return
        line = self._by_line.get(sub.line)
        if line is not None:
            line.pop(sub.key, None)
            if not line:
                del self._by_line[sub.line]
        if self._by_peer.get(sub.peer) is sub:
            del self._by_peer[sub.peer]
        left = self._per_user.get(sub.user, 1) - 1
        if left > 0:
            self._per_user[sub.user] = left
        else:
            self._per_user.pop(sub.user, None)
        log.info("subscription_ended", user=sub.user, line=sub.line, reason=reason)

    # --- addressing (as the B2BUA builds them) ----------------------------------------------
    def _via(self, dest: Address) -> Via:
        local = self.local(dest.transport)
        params = (("branch", self.layer.new_branch()), ("rport", None))
        return Via(dest.transport.upper(), _host(local.host), local.port, params)

    def _contact(self, dest: Address) -> str:
        local = self.local(dest.transport)
        return f"<sip:{_host(local.host)}:{local.port};transport={dest.transport}>"


# --- request checks --------------------------------------------------------------------------


def _event_header(req: Request) -> str:
    """The Event value our NOTIFYs carry; 489 for a package other than `dialog` (§8.2.1).

    Parameters are dropped except `id`, which NOTIFYs must echo (§8.2.1); RFC 7463's `sa`
    flag is accepted, though appearances are not assigned.
    """
    value = req.headers.get("event") or ""
    package, *params = (p.strip(" \t") for p in value.split(";"))
    if package.lower() != PACKAGE:
        raise _Refusal(489, "Bad Event", [("Allow-Events", PACKAGE)])
    for param in params:
        name, _, arg = (p.strip(" \t") for p in param.partition("="))
        if name.lower() == "id" and is_token(arg):
            return f"{PACKAGE};id={arg}"
    return PACKAGE


def _check_accept(req: Request) -> None:
    """406 unless the phone takes application/dialog-info+xml (the default without Accept)."""
    accepted = req.headers.get_all("accept")
    if not accepted:
        return
    types = {a.split(";")[0].strip(" \t").lower() for a in accepted}
    if not types & _ACCEPTABLE:
        raise _Refusal(406, "Not Acceptable", [("Accept", CONTENT_TYPE)])


def _expires(req: Request) -> int:
    """The granted duration: default 3600, at most 7200; 423 below 60 unless 0 (§4.2.1.1)."""
    asked = req.expires
    if asked is None:
        return DEFAULT_EXPIRES
    if 0 < asked < MIN_EXPIRES:
        raise _Refusal(423, "Interval Too Brief", [("Min-Expires", str(MIN_EXPIRES))])
    return min(asked, MAX_EXPIRES)


def _host(host: str) -> str:
    """An IPv6 listen address in brackets, as Via and SIP URIs need it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
