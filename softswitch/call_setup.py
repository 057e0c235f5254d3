"""Admitting a new INVITE: who is calling, as whom, and which phones ring.

It turns an INVITE into the B2BUA's inputs, or into a refusal:
1. authentication (407 challenge, as a proxy would) unless the source is trusted;
2. the identity the call is placed with: the caller's own, or a delegator's when the caller is a
   delegate with the `place` permission and asked for it (a shared-line account: From is the
   delegator; or `P-Preferred-Identity`). Anyone else asking for another identity gets 403;
3. routing of the Request-URI to a line, and the line's ringing contacts, deduplicated so that
   a desk phone registered both as the delegate and on the shared line rings once, on the line.

Sans-I/O: it returns a decision; the service sends responses and starts the call.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from dialplan import Config, Permission
from dialplan.routing import CallRoute, FeatureRoute, NoRoute, may_act_as, route_call

from .call_model import ForkTarget, LineRef, contact_dest, sip_user
from .directory import Directory
from .lines import Direction
from .registrar import Bindings
from .sip.digest import DigestAuthenticator, Verdict, parse_authorization
from .sip.errors import ParseError
from .sip.headers import parse_name_addr
from .sip.message import Request
from .sip.syntax import ParseCache, quote
from .sip.transaction import Address


@dataclass(frozen=True, slots=True, init=False)
class Refuse:
    status: int
    reason: str
    event: str
    challenge: list[str] | None = None  # Proxy-Authenticate values for a 407
    auth_failed: bool = False
    user: str | None = None

    def __init__(
        self,
        status: int,
        reason: str,
        event: str,
        challenge: list[str] | None = None,
        auth_failed: bool = False,
        user: str | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "event", event)
        object.__setattr__(self, "challenge", challenge)
        object.__setattr__(self, "auth_failed", auth_failed)
        object.__setattr__(self, "user", user)


@dataclass(frozen=True, slots=True, init=False)
class Admit:
    user: str | None  # the authenticated caller (None: a trusted source)
    identity: str  # the extension the call is presented as
    caller_from: str  # From value (without tag) towards the callees
    caller_pai: str | None
    lines: list[LineRef]
    targets: list[ForkTarget]
    ring_time: int

    def __init__(
        self,
        user: str | None,
        identity: str,
        caller_from: str,
        caller_pai: str | None,
        lines: list[LineRef],
        targets: list[ForkTarget],
        ring_time: int,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "user", user)
        object.__setattr__(self, "identity", identity)
        object.__setattr__(self, "caller_from", caller_from)
        object.__setattr__(self, "caller_pai", caller_pai)
        object.__setattr__(self, "lines", lines)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "ring_time", ring_time)


@dataclass(frozen=True, slots=True, init=False)
class Feature:
    user: str
    feature: str
    argument: str

    def __init__(self, user: str, feature: str, argument: str) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "user", user)
        object.__setattr__(self, "feature", feature)
        object.__setattr__(self, "argument", argument)


Decision = Refuse | Admit | Feature


# What a fork target is built from: line, line name, party, contact, source, ring delay.
TargetKey = tuple[str, str, str, str, str, int]


class CallSetup:
    """Decides what happens to a new INVITE. Rebuilt on every config reload."""

    def __init__(
        self, cfg: Config, directory: Directory, auth: DigestAuthenticator, bindings: Bindings
    ) -> None:
        self.cfg = cfg
        self.directory = directory
        self.auth = auth
        self.bindings = bindings
        # The targets built so far, by everything they are built from (the config is this
        # object's: a reload starts afresh).
        self._known: ParseCache[TargetKey, ForkTarget] = ParseCache(self._new_target, 4096)

    def decide(
        self,
        req: Request,
        source: Address,
        now: float,
        *,
        opted_out: Collection[tuple[str, str]] = (),
        dnd: Collection[str] = (),
    ) -> Decision:
        trusted = self.cfg.is_trusted(source.host)
        user: str | None = None
        if not trusted:
            checked = self._authenticate(req, now)
            if isinstance(checked, Refuse):
                return checked
            user = checked
        identity = self._identity(req, user)
        if isinstance(identity, Refuse):
            return identity
        dialled = sip_user(req.uri) or ""
        route = route_call(self.cfg, dialled, opted_out=opted_out, dnd=dnd)
        if isinstance(route, NoRoute):
            return Refuse(404, "Not Found", "call_no_route", user=user)
        if isinstance(route, FeatureRoute):
            if user is None:
                return Refuse(403, "Forbidden", "feature_untrusted")
            return Feature(user, route.feature, route.argument)
        if not route.targets:
            # Everyone of the line set do-not-disturb: the one case where a busy answer is
            # right (a party on another call still rings: call waiting is the phone's job).
            return Refuse(486, "Busy Here", "call_dnd", user=user)
        return self._admit(req, user, identity, route, now)

    # --- steps ------------------------------------------------------------------------------
    def authenticate(self, req: Request, now: float) -> str | Refuse:
        """The authenticated user of an INVITE-like request (407 first), or the refusal."""
        return self._authenticate(req, now)

    def _authenticate(self, req: Request, now: float) -> str | Refuse:
        values = [v for n, v in req.headers if n.lower() == "proxy-authorization"]
        if not values:
            return Refuse(
                407,
                "Proxy Authentication Required",
                "call_challenge",
                challenge=self.auth.challenges(now),
            )
        try:
            cred = next(
                (c for c in map(parse_authorization, values) if c.realm == self.auth.realm),
                parse_authorization(values[0]),
            )
        except ParseError:
            return Refuse(400, "Bad Request", "call_bad_credentials")
        known = self.directory.credentials.get(cred.username)
        verdict = self.auth.verify(cred, req.method, known, now)
        if verdict is Verdict.OK:
            return cred.username
        if verdict in (Verdict.STALE, Verdict.MALFORMED):
            return Refuse(
                407,
                "Proxy Authentication Required",
                "call_stale_nonce",
                challenge=self.auth.challenges(now, stale=verdict is Verdict.STALE),
            )
        return Refuse(
            403, "Forbidden", f"call_auth_{verdict.value}", auth_failed=True, user=cred.username
        )

    def _identity(self, req: Request, user: str | None) -> str | Refuse:
        """The extension the call is placed as (see the module docstring)."""
        wanted = _preferred_identity(req) or sip_user(req.from_.uri) or ""
        if user is None:
            return wanted or "anonymous"  # a trusted peer asserts its own identity
        if not wanted or wanted == user or self.cfg.user(wanted) is None:
            return user  # an unknown From user ("anonymous") claims nobody's identity
        if may_act_as(self.cfg, user, wanted, Permission.PLACE):
            return wanted
        return Refuse(403, "Forbidden", "identity_refused", user=user)

    def _admit(
        self, req: Request, user: str | None, identity: str, route: CallRoute, now: float
    ) -> Admit:
        domain = self.cfg.domain
        caller = self.cfg.user(identity)
        name = caller.name if caller else (req.from_.display or None)
        caller_from = (f"{quote(name)} " if name else "") + f"<sip:{identity}@{domain}>"
        pai = caller_from
        if caller is not None and caller.number:
            pai = f"{caller_from}, <tel:{caller.number}>"
        lines = [LineRef(route.line, Direction.INBOUND, None, identity, name)]
        if user is not None:
            dialled = sip_user(req.uri) or ""
            callee = self.cfg.user(route.line)
            lines.insert(
                0,
                LineRef(
                    identity, Direction.OUTBOUND, user, dialled, callee.name if callee else None
                ),
            )
        targets = self._targets(route, now)
        return Admit(user, identity, caller_from, pai, lines, targets, route.ring_time)

    def transfer_admit(
        self, dialled: str, identity: str, name: str | None, now: float
    ) -> Admit | Refuse:
        """Where a blind transfer to `dialled` rings, with the far end (`identity`) calling."""
        route = route_call(self.cfg, dialled)
        if not isinstance(route, CallRoute):
            return Refuse(404, "Not Found", "transfer_no_route")
        caller_from = (f"{quote(name)} " if name else "") + f"<sip:{identity}@{self.cfg.domain}>"
        lines = [LineRef(route.line, Direction.INBOUND, None, identity, name)]
        return Admit(
            None,
            identity,
            caller_from,
            caller_from,
            lines,
            self._targets(route, now),
            route.ring_time,
        )

    def _targets(self, route: CallRoute, now: float) -> list[ForkTarget]:
        """Contacts to ring: the line's own bindings first, then each target's, one per phone."""
        wanted = {t.extension: t for t in route.targets}
        out: list[ForkTarget] = []
        seen: set[str] = set()
        for b in self.bindings.current(route.line, now):
            party = b.auth_user
            if party not in wanted or b.source in seen:
                continue
            seen.add(b.source)
            out.append(self._target(route, party, b.contact, b.source, wanted[party].delay))
        for t in route.targets:
            for b in self.bindings.current(t.extension, now):
                if b.source in seen:
                    continue
                seen.add(b.source)
                out.append(self._target(route, t.extension, b.contact, b.source, t.delay))
        return out

    def _target(
        self, route: CallRoute, party: str, contact: str, source: str, delay: int
    ) -> ForkTarget:
        """The fork to one phone. The same phones ring for the same line all day: quoting
        names and rendering History-Info and Diversion for each was ~10k instructions per
        fork, so a target is built once and shared (it is frozen)."""
        return self._known((route.line, route.line_name, party, contact, source, delay))

    def _new_target(self, key: TargetKey) -> ForkTarget:
        line, line_name, party, contact, source, delay = key
        domain = self.cfg.domain
        line_uri = f"<sip:{line}@{domain}>"
        uri = str(parse_name_addr(contact).uri)
        if party == line:
            to = f"{quote(line_name)} {line_uri}"
            return ForkTarget(party, uri, contact_dest(source), delay, (), to)
        # A delegate's phone: show the line that rings, and why (RFC 7044, RFC 5806).
        to = f"{quote(f'{line_name} ({line})')} {line_uri}"
        headers = (
            ("History-Info", f"{line_uri};index=1, <sip:{party}@{domain}>;index=1.1;mp=1"),
            ("Diversion", f"{quote(line_name)} {line_uri};reason=unconditional;counter=1"),
        )
        return ForkTarget(party, uri, contact_dest(source), delay, headers, to)


def _preferred_identity(req: Request) -> str | None:
    value = req.headers.get("p-preferred-identity")
    if not value:
        return None
    try:
        return sip_user(parse_name_addr(value.split(",")[0]).uri)
    except ParseError:
        return None
