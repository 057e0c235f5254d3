"""The registrar (RFC 3261 §10.3): digest-authenticated REGISTER, bindings per address-of-record.

Sans-I/O: `Registrar.handle()` takes a request, its source and the wall-clock time and returns an
`Outcome`: the response and the binding changes that must be durable *before* that response is
sent. The service persists the changes (group commit) and only then transmits, so a phone told
"200 OK" keeps its registration across a kill -9.

Unknown users and wrong passwords take the same path and get the same answers (401 challenge,
then 403), so a scanner cannot enumerate extensions.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from enum import Enum

from .directory import Directory
from .sip.digest import DigestAuthenticator, DigestResponse, Verdict, parse_authorization
from .sip.errors import ParseError
from .sip.headers import NameAddr
from .sip.message import Request, Response
from .sip.syntax import quote
from .sip.uri import SipUri
from .store import BindingKey, BindingRecord


@dataclass(frozen=True, slots=True)
class RegistrarPolicy:
    min_expires: int = 60
    max_expires: int = 7200
    default_expires: int = 3600
    max_contacts: int = 10


class AuthResult(Enum):
    # Identity hashing (members are singletons) runs in C; Enum's own __hash__ is a
    # Python call on every dict and set lookup of the message path.
    __hash__ = object.__hash__

    NONE = "none"  # nothing to count
    FAILED = "failed"  # a wrong credential: counts towards throttling
    OK = "ok"


@dataclass(slots=True, init=False)
class Outcome:
    response: Response
    upserts: list[BindingRecord]
    deletes: list[BindingKey]
    auth: AuthResult
    user: str | None  # the authenticated user, for logs
    aor: str | None
    event: str  # log event name describing the outcome

    def __init__(
        self,
        response: Response,
        upserts: list[BindingRecord] | None = None,
        deletes: list[BindingKey] | None = None,
        auth: AuthResult = AuthResult.NONE,
        user: str | None = None,
        aor: str | None = None,
        event: str = "register",
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        self.response = response
        self.upserts = [] if upserts is None else upserts
        self.deletes = [] if deletes is None else deletes
        self.auth = auth
        self.user = user
        self.aor = aor
        self.event = event


class Bindings:
    """In-memory bindings: AoR -> {contact key -> record}. The store is the durable copy."""

    def __init__(self) -> None:
        self._by_aor: dict[str, dict[str, BindingRecord]] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._by_aor.values())

    def load(self, records: list[BindingRecord]) -> None:
        for rec in records:
            self._by_aor.setdefault(rec.aor, {})[rec.uri] = rec

    def replace_all(self, records: list[BindingRecord]) -> None:
        self._by_aor.clear()
        self.load(records)

    def current(self, aor: str, now: float) -> list[BindingRecord]:
        """Unexpired bindings of `aor`, the most recently refreshed first."""
        found = self._by_aor.get(aor)
        if not found:
            return []
        live = [b for b in found.values() if b.expires_at > now]
        if len(live) < 2:  # most AoRs have one phone: nothing to order
            return live
        return sorted(live, key=lambda b: (-(b.q or 0.0), -b.expires_at))

    def get(self, aor: str, key: str) -> BindingRecord | None:
        return self._by_aor.get(aor, {}).get(key)

    def apply(self, upserts: list[BindingRecord], deletes: list[BindingKey]) -> None:
        for k in deletes:
            found = self._by_aor.get(k.aor)
            if found is not None:
                found.pop(k.uri, None)
                if not found:
                    del self._by_aor[k.aor]
        for rec in upserts:
            self._by_aor.setdefault(rec.aor, {})[rec.uri] = rec

    def expire(self, now: float) -> list[BindingKey]:
        """Forget expired bindings; returns their keys so the store can drop them too."""
        gone: list[BindingKey] = []
        for aor in list(self._by_aor):
            found = self._by_aor[aor]
            for key in [k for k, b in found.items() if b.expires_at <= now]:
                del found[key]
                gone.append(BindingKey(aor, key))
            if not found:
                del self._by_aor[aor]
        return gone

    def __iter__(self) -> Iterator[BindingRecord]:
        for found in self._by_aor.values():
            yield from found.values()


def contact_key(uri: SipUri | object) -> str:
    """A binding's identity: the contact URI normalised for §19.1.4-style equality."""
    if not isinstance(uri, SipUri):
        return str(uri)
    params = ";".join(sorted(f"{k.lower()}={(v or '').lower()}" for k, v in uri.params))
    host, port = uri.host_port()
    return f"{uri.scheme}:{uri.user_unescaped or ''}@{host.lower()}:{port};{params}"


class Registrar:
    """REGISTER processing for one realm. Swapped whole on config reload."""

    def __init__(
        self,
        directory: Directory,
        auth: DigestAuthenticator,
        policy: RegistrarPolicy,
        bindings: Bindings,
    ) -> None:
        self.directory = directory
        self.auth = auth
        self.policy = policy
        self.bindings = bindings

    def handle(self, req: Request, source: str, now: float) -> Outcome:
        """Process one REGISTER. `now` is wall-clock time (bindings outlive the process)."""
        aor = _aor_of(req)
        if aor is None:
            return Outcome(req.make_response(404, "Not Found"), event="register_bad_aor")
        cred = _credentials(req, self.auth.realm)
        if cred is None:
            return self._challenge(req, now, stale=False, aor=aor, event="register_challenge")
        verdict = self.auth.verify(
            cred, "REGISTER", self.directory.credentials.get(cred.username), now
        )
        if verdict is Verdict.STALE:
            return self._challenge(req, now, stale=True, aor=aor, event="register_stale_nonce")
        if verdict is Verdict.MALFORMED:
            return self._challenge(req, now, stale=False, aor=aor, event="register_bad_credentials")
        if verdict is not Verdict.OK:
            out = Outcome(
                req.make_response(403, "Forbidden"),
                auth=AuthResult.FAILED,
                aor=aor,
                user=cred.username,
                event=f"register_auth_{verdict.value}",
            )
            return out
        if not self.directory.may_register(cred.username, aor):
            return Outcome(
                req.make_response(403, "Forbidden"),
                auth=AuthResult.OK,
                aor=aor,
                user=cred.username,
                event="register_identity_refused",
            )
        outcome = self._update(req, aor, cred.username, source, now)
        outcome.auth, outcome.user, outcome.aor = AuthResult.OK, cred.username, aor
        return outcome

    # --- steps ------------------------------------------------------------------------------
    def _challenge(
        self,
        req: Request,
        now: float,
        *,
        stale: bool,
        aor: str,
        event: str,
    ) -> Outcome:
        resp = req.make_response(401, "Unauthorized")
        for value in self.auth.challenges(now, stale=stale):
            resp.headers.add("WWW-Authenticate", value)
        return Outcome(resp, aor=aor, event=event)

    def _update(self, req: Request, aor: str, user: str, source: str, now: float) -> Outcome:
        if req.is_star_contact:
            return self._remove_all(req, aor, now)
        contacts = req.contacts
        if not contacts:
            return Outcome(self._ok(req, aor, now), event="register_query")
        header_expires = req.expires
        upserts: list[BindingRecord] = []
        deletes: list[BindingKey] = []
        # Strings shared by many bindings are stored once: the same phone model's User-Agent,
        # and the user who authenticated, which is usually the AoR itself (~100 B a binding).
        user_agent = sys.intern(req.headers.get("user-agent") or "")
        if user == aor:
            user = aor
        for contact in contacts:
            expires = self._expires_for(contact, header_expires)
            if 0 < expires < self.policy.min_expires:
                resp = req.make_response(423, "Interval Too Brief")
                resp.headers.add("Min-Expires", str(self.policy.min_expires))
                return Outcome(resp, event="register_interval_too_brief")
            key = contact_key(contact.uri)
            old = self.bindings.get(aor, key)
            if old is not None and old.call_id == req.call_id and old.cseq >= req.cseq.seq:
                resp = req.make_response(500, "Out Of Order")
                return Outcome(resp, event="register_out_of_order")
            if expires == 0:
                deletes.append(BindingKey(aor, key))
                continue
            upserts.append(BindingRecord(
                aor=aor, contact=_contact_value(contact), uri=key, expires_at=now + expires,
                call_id=req.call_id, cseq=req.cseq.seq, source=source, auth_user=user,
                user_agent=user_agent, q=_q_of(contact),
            ))  # fmt: skip
        live = {b.uri for b in self.bindings.current(aor, now)}
        live |= {b.uri for b in upserts}
        live -= {d.uri for d in deletes}
        if len(live) > self.policy.max_contacts:
            return Outcome(req.make_response(403, "Too Many Contacts"), event="register_too_many")
        self.bindings.apply(upserts, deletes)
        return Outcome(self._ok(req, aor, now), upserts, deletes, event="register_ok")

    def _remove_all(self, req: Request, aor: str, now: float) -> Outcome:
        if req.expires != 0 or len(req.headers.get_all("contact")) != 1:
            raise ParseError("Contact: * requires Expires: 0 and no other contact")
        deletes = [BindingKey(aor, b.uri) for b in self.bindings.current(aor, now)]
        self.bindings.apply([], deletes)
        return Outcome(self._ok(req, aor, now), [], deletes, event="register_remove_all")

    def _expires_for(self, contact: NameAddr, header_expires: int | None) -> int:
        raw = contact.param("expires")
        expires: int | None = None
        if raw is not None and raw.isdigit() and len(raw) <= 10:
            expires = int(raw)
        if expires is None:
            expires = header_expires if header_expires is not None else self.policy.default_expires
        return min(expires, self.policy.max_expires)

    def _ok(self, req: Request, aor: str, now: float) -> Response:
        resp = req.make_response(200, "OK")
        for b in self.bindings.current(aor, now):
            resp.headers.add("Contact", f"{b.contact};expires={max(0, int(b.expires_at - now))}")
        resp.headers.add("Date", _http_date(int(now)))
        return resp


@functools.lru_cache(maxsize=4)
def _http_date(second: int) -> str:
    """RFC 1123 date for the Date header (§20.17), computed once per second, not per REGISTER."""
    return formatdate(second, usegmt=True)


def _aor_of(req: Request) -> str | None:
    uri = req.to.uri
    if not isinstance(uri, SipUri) or not uri.user:
        return None
    return uri.user_unescaped


def _credentials(req: Request, realm: str) -> DigestResponse | None:
    """The Authorization header for our realm, if any (a phone may carry several)."""
    parsed = [parse_authorization(v) for v in req.headers.get_each("authorization")]
    return next((c for c in parsed if c.realm == realm), parsed[0] if parsed else None)


def _contact_value(contact: NameAddr) -> str:
    params = tuple((k, v) for k, v in contact.params if k.lower() != "expires")
    display = quote(contact.display) + " " if contact.display else ""
    tail = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)
    return f"{display}<{contact.uri}>{tail}"


def _q_of(contact: NameAddr) -> float | None:
    raw = contact.param("q")
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None
