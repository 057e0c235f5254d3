"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 8760: MD5 and SHA-256, qop=auth).

Nonces are stateless: a timestamp and random bytes signed with a per-process secret, so that any
nonce we issued can be checked without a table, and one that is too old gets `stale=true` (the
phone retries with the same password, the user sees nothing). What does need state is replay
protection: the highest nonce-count seen per nonce, kept only for the nonce's lifetime.

Passwords are never hashed per request: `Credentials` precompute HA1 per algorithm once, when
the config is loaded.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum

from .errors import ParseError
from .randoms import random_bytes
from .syntax import WS, is_token, quoted_end, unquote


class Algorithm(StrEnum):
    MD5 = "MD5"
    SHA256 = "SHA-256"

    def hash(self, data: str) -> str:
        raw = data.encode("utf-8", "surrogateescape")
        if self is Algorithm.MD5:
            return hashlib.md5(raw, usedforsecurity=False).hexdigest()
        return hashlib.sha256(raw).hexdigest()


#: By name, for parsing: a dict lookup, where `Algorithm(name)` runs Enum's Python-level
#: `__call__` on every authenticated request.
_ALGORITHMS: dict[str, Algorithm] = {a.value: a for a in Algorithm}


def ha1(username: str, realm: str, password: str, algorithm: Algorithm) -> str:
    return algorithm.hash(f"{username}:{realm}:{password}")


@dataclass(frozen=True, slots=True, init=False)
class DigestResponse:
    """The parsed parameters of an `Authorization`/`Proxy-Authorization: Digest ...` header."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: Algorithm
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None

    def __init__(
        self,
        username: str,
        realm: str,
        nonce: str,
        uri: str,
        response: str,
        algorithm: Algorithm,
        qop: str | None = None,
        nc: str | None = None,
        cnonce: str | None = None,
        opaque: str | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "username", username)
        object.__setattr__(self, "realm", realm)
        object.__setattr__(self, "nonce", nonce)
        object.__setattr__(self, "uri", uri)
        object.__setattr__(self, "response", response)
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "qop", qop)
        object.__setattr__(self, "nc", nc)
        object.__setattr__(self, "cnonce", cnonce)
        object.__setattr__(self, "opaque", opaque)


_WS_CHARS = frozenset(WS)
#: The URL-safe base64 alphabet (RFC 4648 §5) for nonces: they travel in quoted-strings.
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def parse_authorization(value: str) -> DigestResponse:
    """Parse a Digest credentials header; a malformed one is a 400.

    A hand-written scan (`_auth_params`), compiled by mypyc: this runs for every authenticated
    request, and the regular expression it replaces (a quoted-string as a per-character
    alternation, validated then matched again) cost 200,000 instructions a header, a quarter
    of a whole registration's (callgrind, scripts/bench_inproc.py).
    """
    scheme, _, rest = value.strip(WS).partition(" ")
    if scheme.lower() != "digest":
        raise ParseError(f"unsupported authorization scheme {scheme!r}")
    params = _auth_params(rest)
    if params is None:
        raise ParseError(f"malformed digest parameters: {rest[:40]!r}")
    algorithm = _ALGORITHMS.get(params.get("algorithm", "MD5").upper())
    if algorithm is None:
        raise ParseError(f"unsupported digest algorithm {params.get('algorithm')!r}")
    try:
        return DigestResponse(
            username=params["username"], realm=params["realm"], nonce=params["nonce"],
            uri=params["uri"], response=params["response"].lower(), algorithm=algorithm,
            qop=params.get("qop"), nc=params.get("nc"), cnonce=params.get("cnonce"),
            opaque=params.get("opaque"),
        )  # fmt: skip
    except KeyError as exc:
        raise ParseError(f"digest parameter {exc.args[0]} missing") from None


def _auth_params(rest: str) -> dict[str, str] | None:
    """`name=value` pairs (RFC 7616 §3.4), names lower-cased, quoted values unquoted; None if
    the list is malformed.

    The grammar: `param *("," param) [","]`, a param being `token "=" (token / quoted-string)`
    with spaces or tabs allowed around every token, "=" and ",". A later duplicate wins. The
    scan jumps with `str.find` from one delimiter to the next rather than testing characters
    one by one: per-character work is what made this expensive.
    """
    params: dict[str, str] = {}
    n = len(rest)
    i = _skip_ws(rest, 0)
    while True:
        eq = rest.find("=", i)
        if eq < 0:
            return None
        name = rest[i:eq].rstrip(WS)
        if not is_token(name):
            return None
        i = _skip_ws(rest, eq + 1)
        if rest.startswith('"', i):
            try:
                end = quoted_end(rest, i)
            except ParseError:
                return None
            params[name.lower()] = unquote(rest[i:end])
            i = _skip_ws(rest, end)
        else:
            comma = rest.find(",", i)
            if comma < 0:
                comma = n
            value = rest[i:comma].rstrip(WS)
            if not value or " " in value or "\t" in value or '"' in value:
                return None
            params[name.lower()] = value
            i = comma
        if i >= n:
            return params
        if rest[i] != ",":
            return None
        i = _skip_ws(rest, i + 1)
        if i >= n:  # one trailing comma is tolerated
            return params


def _skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS_CHARS:
        i += 1
    return i


class Verdict(Enum):
    """Outcome of checking credentials; the registrar maps these to SIP responses."""

    # Identity hashing (members are singletons) runs in C; Enum's own __hash__ is a
    # Python call on every dict and set lookup of the message path.
    __hash__ = object.__hash__

    OK = "ok"
    STALE = "stale"  # our nonce, too old, or not ours (e.g. from before a restart): re-challenge
    REPLAY = "replay"  # nonce-count not increasing: re-challenge, never accept
    FAILED = "failed"  # wrong password or unknown user: indistinguishable by design
    MALFORMED = "malformed"  # no qop=auth, realm mismatch, missing cnonce/nc


@dataclass(frozen=True, slots=True)
class Credentials:
    """One user's precomputed HA1 values, per algorithm."""

    username: str
    ha1: dict[Algorithm, str]


def credentials_for(
    username: str, password: str, realm: str, algorithms: Iterable[Algorithm]
) -> Credentials:
    return Credentials(username, {a: ha1(username, realm, password, a) for a in algorithms})


class DigestAuthenticator:
    """Issues challenges and checks responses for one realm.

    Sans-I/O: the caller passes `now`; the secret and random bytes come from `os.urandom` unless
    injected (tests).
    """

    def __init__(
        self,
        realm: str,
        algorithms: Iterable[Algorithm] = (Algorithm.SHA256, Algorithm.MD5),
        nonce_ttl: float = 300.0,
        secret: bytes | None = None,
        max_tracked_nonces: int = 200_000,
    ) -> None:
        self.realm = realm
        self.algorithms = tuple(algorithms)
        self.nonce_ttl = nonce_ttl
        self._secret = secret if secret is not None else os.urandom(32)
        self._nc_seen: OrderedDict[str, int] = OrderedDict()
        self._max_tracked = max_tracked_nonces
        # Unknown users are checked against this throwaway HA1 so they cost what a real one does.
        self._decoy = credentials_for("\x00decoy", os.urandom(16).hex(), realm, self.algorithms)

    # --- challenges ---------------------------------------------------------------------
    def new_nonce(self, now: float) -> str:
        stamp = struct.pack("!Q", int(now * 1000)) + random_bytes(8)
        mac = self._mac(stamp)
        return binascii.b2a_base64(stamp + mac, newline=False).translate(_URLSAFE).decode("ascii")

    def _mac(self, stamp: bytes) -> bytes:
        """The nonce's authenticator: keyed BLAKE2b (a MAC by design, RFC 7693 §2.9), 96 bits.

        HMAC-SHA256 through OpenSSL 3 cost 4-30 µs a call in the service (the digest is fetched
        by name each time); hashlib's own BLAKE2 costs ~1.3 µs, and a REGISTER needs two.
        """
        return hashlib.blake2b(stamp, key=self._secret, digest_size=12).digest()

    def challenges(self, now: float, stale: bool = False) -> list[str]:
        """One `Digest` challenge per algorithm, in order of preference (RFC 8760 §2.4)."""
        nonce = self.new_nonce(now)
        tail = ", stale=true" if stale else ""
        return [
            f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={a.value}, qop="auth"{tail}'
            for a in self.algorithms
        ]

    # --- verification -------------------------------------------------------------------
    def verify(
        self, cred: DigestResponse, method: str, user: Credentials | None, now: float
    ) -> Verdict:
        """Check `cred` for a request with `method`; `user` None means no such user.

        The order matters: nonce freshness first (so a phone with the right password is never
        told "forbidden" after a restart), then the hash (the same work for unknown users), and
        the nonce-count last, so a replay of a captured request fails even with a valid hash.
        """
        if cred.realm != self.realm or cred.algorithm not in self.algorithms:
            return Verdict.MALFORMED
        if cred.qop != "auth" or not cred.cnonce or not cred.nc or len(cred.nc) != 8:
            return Verdict.MALFORMED
        try:
            nc = int(cred.nc, 16)
        except ValueError:
            return Verdict.MALFORMED
        if not self._nonce_fresh(cred.nonce, now):
            return Verdict.STALE
        ha1_value = (user or self._decoy).ha1.get(cred.algorithm) or self._decoy.ha1[cred.algorithm]
        ha2 = cred.algorithm.hash(f"{method}:{cred.uri}")
        expected = cred.algorithm.hash(
            f"{ha1_value}:{cred.nonce}:{cred.nc}:{cred.cnonce}:{cred.qop}:{ha2}"
        )
        if user is None or not hmac.compare_digest(expected, cred.response):
            return Verdict.FAILED
        if not self._advance_nc(cred.nonce, nc):
            return Verdict.REPLAY
        return Verdict.OK

    def _nonce_fresh(self, nonce: str, now: float) -> bool:
        try:
            # base64.urlsafe_b64decode, without its three Python-level calls
            raw = binascii.a2b_base64(nonce.encode("ascii").translate(_FROM_URLSAFE))
        except (ValueError, UnicodeEncodeError):  # binascii.Error is a ValueError
            return False
        if len(raw) != 28:
            return False
        stamp, mac = raw[:16], raw[16:]
        if not hmac.compare_digest(self._mac(stamp), mac):
            return False
        issued: float = struct.unpack("!Q", stamp[:8])[0] / 1000
        return 0 <= now - issued <= self.nonce_ttl

    def _advance_nc(self, nonce: str, nc: int) -> bool:
        last = self._nc_seen.get(nonce, 0)
        if nc <= last:
            return False
        self._nc_seen[nonce] = nc
        self._nc_seen.move_to_end(nonce)
        while len(self._nc_seen) > self._max_tracked:
            # Oldest first: those nonces are the first to go stale anyway.
            self._nc_seen.popitem(last=False)
        return True

    def forget_expired(self, now: float) -> None:
        """Drop nonce-count entries of nonces that can no longer be used (called periodically)."""
        for nonce in list(self._nc_seen):
            if self._nonce_fresh(nonce, now):
                break
            del self._nc_seen[nonce]


def authorization_header_value(cred: DigestResponse) -> str:
    """Serialise credentials (used by tests and by our own client legs)."""
    parts = [
        f'username="{cred.username}"', f'realm="{cred.realm}"', f'nonce="{cred.nonce}"',
        f'uri="{cred.uri}"', f'response="{cred.response}"', f"algorithm={cred.algorithm.value}",
    ]  # fmt: skip
    if cred.qop:
        parts += [f"qop={cred.qop}", f"nc={cred.nc}", f'cnonce="{cred.cnonce}"']
    if cred.opaque is not None:
        parts.append(f'opaque="{cred.opaque}"')
    return "Digest " + ", ".join(parts)


def compute_response(
    username: str,
    password: str,
    realm: str,
    nonce: str,
    method: str,
    uri: str,
    algorithm: Algorithm,
    nc: str,
    cnonce: str,
) -> str:
    """The client side of the computation, for tests and client legs."""
    ha2 = algorithm.hash(f"{method}:{uri}")
    ha1_value = ha1(username, realm, password, algorithm)
    return algorithm.hash(f"{ha1_value}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
