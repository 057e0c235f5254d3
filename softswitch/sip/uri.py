"""SIP, SIPS, tel and other absolute URIs (RFC 3261 §19.1, §25.1; RFC 3966).

URIs are immutable values. A parsed URI keeps its parts exactly as received (escapes and case
included), so that a Contact is stored and returned byte for byte (RFC 4475 `cparam01`,
`regescrt`); comparison follows §19.1.4 instead of string equality.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from urllib.parse import unquote as _pct_unquote

from .errors import ParseError
from .syntax import ParseCache, find_param, format_params

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
# The rest of an absolute URI of another scheme: RFC 2396 uric and "#[]", no space, CTL or
# non-ASCII (which would have to be escaped), nothing that ends a name-addr or a header.
_OPAQUE = re.compile(r"[A-Za-z0-9\-_.!~*'()%;/?:@&=+$,#\[\]]+")
# paramchar: unreserved, escaped and "[]/:&+$" (':' etc. appear in maddr/received); tel URIs.
_PARAM_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()%[]/:&+$"
)

# The part of a SIP/SIPS URI after the scheme, straight from the RFC 3261 §25.1 grammar. One
# regex match replaces a dozen partitions and set tests: URIs are parsed several times per
# message (Request-URI, From, To, Contact), so this is most of the parser's cost.
_UNRESERVED = r"A-Za-z0-9\-_.!~*'()%"  # unreserved / escaped ("%" HEX HEX kept as is)
_PARAMCHAR = rf"[{_UNRESERVED}\[\]/:&+$]"  # paramchar = param-unreserved / unreserved / escaped
_SIP_REST = re.compile(
    rf"""
    (?:
      (?P<user>[{_UNRESERVED}&=+$,;?/]+)                  # user-unreserved adds &=+$,;?/
      (?::(?P<password>[{_UNRESERVED}&=+$,]*))?
    @)?
    (?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)          # IPv6reference / hostname / IPv4
    (?::(?P<port>[0-9]{{1,5}}))?
    (?P<params>(?:;{_PARAMCHAR}+(?:={_PARAMCHAR}*)?)*)
    (?:\?(?P<headers>[{_UNRESERVED}\[\]/:&+$?=]+))?
    """,
    re.VERBOSE,
)
#: RFC 2396 "reserved": escaped and unescaped forms of these are *not* equivalent (§19.1.4).
_RESERVED = frozenset(";/?:@&=+$,")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
#: URI parameters that make two URIs differ when only one of them has it (§19.1.4). The RFC's
#: text lists user, ttl, method and maddr; its examples also treat `transport` so.
_MUST_MATCH_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def _canon_escape(m: re.Match[str]) -> str:
    c = chr(int(m[1], 16))
    return "%" + m[1].upper() if c in _RESERVED or c == "%" else c


def _canon(s: str) -> str:
    """`s` with escapes of unreserved characters resolved, others upper-cased: the §19.1.4 form.

    `%25` stays escaped too, so that `a%2541` (the text `a%41`) never meets `a%41` (`aA`).
    """
    return _ESCAPE.sub(_canon_escape, s) if "%" in s else s


def _pct(s: str) -> str:
    return _pct_unquote(s, errors="surrogateescape") if "%" in s else s


@dataclass(frozen=True, slots=True, init=False)
class SipUri:
    """A `sip:` or `sips:` URI. `params` keep their order and original spelling."""

    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: tuple[tuple[str, str | None], ...] = ()
    headers: str | None = None
    scheme: str = "sip"
    # `str(self)`, kept: a parsed URI is cached and shared (`parse_uri`), and every request
    # we send renders its Request-URI.
    _text: str | None = field(default=None, init=False, repr=False, compare=False)

    def __init__(
        self,
        host: str,
        user: str | None = None,
        password: str | None = None,
        port: int | None = None,
        params: tuple[tuple[str, str | None], ...] = (),
        headers: str | None = None,
        scheme: str = "sip",
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "user", user)
        object.__setattr__(self, "password", password)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "_text", None)

    def __str__(self) -> str:
        text = self._text
        if text is None:
            text = self._render()
            object.__setattr__(self, "_text", text)
        return text

    def _render(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [":", self.password]
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out += [":", str(self.port)]
        if self.params:
            out.append(format_params(self.params))
        if self.headers is not None:
            out += ["?", self.headers]
        return "".join(out)

    @property
    def secure(self) -> bool:
        return self.scheme == "sips"

    @property
    def user_unescaped(self) -> str | None:
        """The user part with %-escapes resolved: what routing compares extensions against."""
        return None if self.user is None else _pct(self.user)

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)[1]

    def has_param(self, name: str) -> bool:
        return find_param(self.params, name)[0]

    def with_params(self, **changes: str | None) -> SipUri:
        """A copy with parameters set (value None means a flag such as `;lr`)."""
        keep = [(k, v) for k, v in self.params if k.lower() not in changes]
        return replace(self, params=(*keep, *changes.items()))

    def without_params(self, *names: str) -> SipUri:
        drop = {n.lower() for n in names}
        return replace(self, params=tuple((k, v) for k, v in self.params if k.lower() not in drop))

    def host_port(self, default: int = 5060) -> tuple[str, int]:
        host = self.host[1:-1] if self.host.startswith("[") else self.host
        return host, self.port if self.port is not None else (5061 if self.secure else default)

    def equivalent(self, other: object) -> bool:
        """RFC 3261 §19.1.4 comparison (registrar bindings, loop checks, Route matching).

        Escapes of unreserved characters are resolved; user and password compare case-sensitively,
        the rest case-insensitively; a parameter both sides have must match, and user, ttl,
        method, maddr and transport must be on both or neither; URI headers must match as a set.
        A port left out never matches an explicit one, even 5060.
        """
        if not isinstance(other, SipUri) or self.scheme != other.scheme:
            return False
        if self.port != other.port or _canon_host(self.host) != _canon_host(other.host):
            return False
        if (self.user is None) != (other.user is None) or (
            self.user is not None and _canon(self.user) != _canon(other.user or "")
        ):
            return False
        if _canon(self.password or "") != _canon(other.password or "") or (
            (self.password is None) != (other.password is None)
        ):
            return False
        mine, theirs = _canon_params(self.params), _canon_params(other.params)
        for key in mine.keys() & theirs.keys():
            if mine[key] != theirs[key]:
                return False
        if any((k in mine) != (k in theirs) for k in _MUST_MATCH_PARAMS):
            return False
        return _canon_headers(self.headers) == _canon_headers(other.headers)


def _canon_host(host: str) -> str:
    if host.startswith("["):  # [::1] and [0:0::1] are one address
        try:
            return "[" + ipaddress.IPv6Address(host[1:-1]).compressed + "]"
        except ValueError:  # a SipUri built by hand rather than parsed
            pass
    return host.lower()


def _canon_params(params: tuple[tuple[str, str | None], ...]) -> dict[str, str]:
    return {_canon(k).lower(): _canon(v or "").lower() for k, v in params}


def _canon_headers(headers: str | None) -> list[tuple[str, str]]:
    """URI headers as a sorted list: order is not significant, names are case-insensitive."""
    if not headers:
        return []
    out = []
    for h in headers.split("&"):
        name, _, value = h.partition("=")
        out.append((_canon(name).lower(), _canon(value)))
    return sorted(out)


@dataclass(frozen=True, slots=True, init=False)
class TelUri:
    """A `tel:` URI (RFC 3966): a global (`+...`) or local number with parameters."""

    number: str
    params: tuple[tuple[str, str | None], ...] = ()
    scheme: str = "tel"

    def __init__(
        self, number: str, params: tuple[tuple[str, str | None], ...] = (), scheme: str = "tel"
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "number", number)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "scheme", scheme)

    def __str__(self) -> str:
        return f"tel:{self.number}{format_params(self.params)}"

    @property
    def digits(self) -> str:
        """The number without visual separators (RFC 3966 §5.1.1)."""
        return "".join(c for c in self.number if c not in "-.()")

    def equivalent(self, other: object) -> bool:
        """RFC 3966 §4: same digits without separators, and the same parameters (any order).

        Comparison is case-insensitive; a `phone-context` that is a number loses its visual
        separators too. `tel:7042;phone-context=a.example` is not `tel:7042` elsewhere.
        """
        return (
            isinstance(other, TelUri)
            and self.digits.lower() == other.digits.lower()
            and _tel_params(self.params) == _tel_params(other.params)
        )


def _tel_params(params: tuple[tuple[str, str | None], ...]) -> dict[str, str]:
    out = {k.lower(): (v or "").lower() for k, v in params}
    context = out.get("phone-context", "")
    if context.startswith("+"):
        out["phone-context"] = "".join(c for c in context if c not in "-.()")
    return out


@dataclass(frozen=True, slots=True, init=False)
class AbsoluteUri:
    """Any other scheme (RFC 4475 `unksm2`, `novelsc`): kept verbatim, compared as a string."""

    scheme: str
    rest: str

    def __init__(self, scheme: str, rest: str) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "rest", rest)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.rest}"

    def equivalent(self, other: object) -> bool:
        return isinstance(other, AbsoluteUri) and str(self) == str(other)


Uri = SipUri | TelUri | AbsoluteUri


def parse_uri(text: str) -> Uri:
    """Parse a URI; raise ParseError (400) if it is not a valid SIP, SIPS, tel or absolute URI.

    Cached by text (`syntax.ParseCache`): the same few URIs come back all day.
    """
    return _CACHE(text)


def _parse_uri(text: str) -> Uri:
    scheme, colon, rest = text.partition(":")
    if scheme in ("sip", "sips"):  # the common case, spelled in lower case
        return _parse_sip(rest, scheme, text)
    if not colon or _SCHEME.fullmatch(scheme) is None:
        raise ParseError(f"invalid URI: {text!r}")
    lscheme = scheme.lower()
    if lscheme in ("sip", "sips"):
        return _parse_sip(rest, lscheme, text)
    if lscheme == "tel":
        return _parse_tel(rest, text)
    if _OPAQUE.fullmatch(rest) is None:
        raise ParseError(f"invalid URI: {text!r}")
    return AbsoluteUri(scheme, rest)


def _parse_sip(rest: str, scheme: str, text: str) -> SipUri:
    m = _SIP_REST.fullmatch(rest)
    if m is None:
        raise ParseError(f"invalid SIP URI: {text!r}")
    user, password, host, port_text, param_text, headers = m.groups()
    if host[0] == "[":
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise ParseError(f"invalid IPv6 address in {text!r}") from exc
    elif host[0] in "-." or host[-1] == "-":
        raise ParseError(f"invalid host in {text!r}")
    port: int | None = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise ParseError(f"invalid port in {text!r}")
    params: tuple[tuple[str, str | None], ...] = ()
    if param_text:
        params = tuple(_split_uri_params(param_text[1:]))
    return SipUri(host, user, password, port, params, headers, scheme)


def _split_uri_params(s: str) -> list[tuple[str, str | None]]:
    """`name[=value]` pairs of an already validated parameter string, without its first `;`."""
    out: list[tuple[str, str | None]] = []
    for part in s.split(";"):
        name, eq, value = part.partition("=")
        out.append((name, value if eq else None))
    return out


def _parse_uri_params(s: str, text: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for part in s.split(";"):
        name, eq, value = part.partition("=")
        if not name or not set(name) <= _PARAM_CHARS or (eq and not set(value) <= _PARAM_CHARS):
            raise ParseError(f"invalid URI parameter {part!r} in {text!r}")
        out.append((name, value if eq else None))
    return out


def _parse_tel(rest: str, text: str) -> TelUri:
    number, _, param_text = rest.partition(";")
    body = number[1:] if number.startswith("+") else number
    if not body or not all(c in "0123456789-.()*#ABCDabcd" for c in body):
        raise ParseError(f"invalid tel URI {text!r}")
    params = tuple(_parse_uri_params(param_text, text)) if param_text else ()
    return TelUri(number, params)


_CACHE: ParseCache[str, Uri] = ParseCache(_parse_uri, 4096)
