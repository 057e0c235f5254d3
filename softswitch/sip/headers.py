"""Header fields: the ordered container and the typed values of the headers the core uses.

Headers are kept raw, in order, one entry per field line (RFC 3261 §7.3); typed values (Via,
CSeq, From/To, Contact) are parsed on first use and cached until the header changes. Most
relayed headers are never looked at, so parsing them eagerly would only cost time.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from .errors import LocalProtocolError, ParseError
from .syntax import (
    QUOTED_RE,
    TOKEN_RE,
    WS,
    ParseCache,
    find_param,
    format_params,
    is_token,
    parse_params,
    plain_params,
    quote,
    quoted_end,
    split_outside,
    unquote,
)
from .uri import SipUri, Uri, parse_uri

#: RFC 3261 §7.3.3 and later RFCs' compact forms.
COMPACT = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via",
    "o": "event", "r": "refer-to", "b": "referred-by", "x": "session-expires",
    "u": "allow-events", "a": "accept-contact", "j": "reject-contact", "d": "request-disposition",
    "y": "identity", "n": "identity-info",
}  # fmt: skip

#: How we spell headers we write; others keep the spelling they arrived with.
CANONICAL = {
    name.lower(): name
    for name in (
        "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Max-Forwards", "Content-Length",
        "Content-Type", "Expires", "Min-Expires", "Route", "Record-Route", "Allow", "Supported",
        "Require", "Unsupported", "User-Agent", "Server", "WWW-Authenticate", "Authorization",
        "Proxy-Authenticate", "Proxy-Authorization", "Authentication-Info", "Date", "Event",
        "Subscription-State", "Allow-Events", "Accept", "Reason", "Retry-After", "Warning",
        "Refer-To", "Referred-By", "Replaces", "P-Asserted-Identity", "P-Preferred-Identity",
        "History-Info", "Diversion", "Call-Info", "Alert-Info", "Session-Expires", "Subject",
    )
}  # fmt: skip

#: Headers whose value may be a comma-separated list (RFC 3261 §7.3.1); others never split.
LIST_HEADERS = frozenset(
    """via contact route record-route allow supported require proxy-require unsupported accept
    accept-encoding accept-language content-encoding allow-events alert-info call-info
    error-info in-reply-to warning reason history-info p-asserted-identity
    p-preferred-identity path service-route diversion""".split()  # noqa: SIM905
)

# header_key() runs on every lookup and every parsed header line, with a handful of distinct
# spellings in practice; memoising it saves the lower() and the compact-form lookup. The bound
# keeps a peer that invents header names from growing it without limit.
_KEY_CACHE: dict[str, str] = {}
_KEY_CACHE_MAX = 2048


def header_key(name: str) -> str:
    """The lookup key of a header name: lower case, long form."""
    key = _KEY_CACHE.get(name)
    if key is None:
        lower = name.lower()
        key = COMPACT.get(lower, lower)
        if len(_KEY_CACHE) < _KEY_CACHE_MAX:
            _KEY_CACHE[name] = key
    return key


def canonical_name(key: str) -> str:
    return CANONICAL.get(key) or "-".join(p.capitalize() for p in key.split("-"))


T = TypeVar("T")
_MISSING: Any = object()


class Headers:
    """Ordered header fields with case-insensitive, compact-form-aware lookup.

    Each entry is `(key, name, value)`: the lookup key, the name as it is written out, and the
    raw value (unfolded). Typed parses are cached per key and dropped when that key changes.
    """

    __slots__ = ("_cache", "_items", "wire", "wire_length")

    def __init__(self, items: list[tuple[str, str, str]] | None = None) -> None:
        self._items: list[tuple[str, str, str]] = items if items is not None else []
        self._cache: dict[str, Any] = {}
        # The composer's own rendering of these entries (`set_wire`); every change drops it.
        self.wire: str | None = None
        self.wire_length = -1

    @classmethod
    def of(cls, pairs: list[tuple[str, str]]) -> Headers:
        """Build from (name, value) pairs, e.g. when composing a request."""
        return cls([entry(n, v) for n, v in pairs])

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for _, name, value in self._items:
            yield name, value

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        key = header_key(name)
        return any(k == key for k, _, _ in self._items)

    def copy(self) -> Headers:
        return Headers(list(self._items))

    def get(self, name: str) -> str | None:
        """The first field's raw value, or None."""
        key = header_key(name)
        for k, _, v in self._items:
            if k == key:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, list headers split on commas outside quotes and `<>`."""
        key = header_key(name)
        values = [v for k, _, v in self._items if k == key]
        return split_list(values) if key in LIST_HEADERS else values

    def count(self, name: str) -> int:
        key = header_key(name)
        return len([k for k, _, _ in self._items if k == key])

    def get_each(self, name: str) -> list[str]:
        """Each field's raw value, one per header line and never split on commas."""
        key = header_key(name)
        return [v for k, _, v in self._items if k == key]

    def parsed(self, name: str, parse: Callable[[Headers], T]) -> T:
        """`parse(self)` cached under the header's key until that header changes."""
        key = header_key(name)
        # A sentinel rather than try/except: the first call for each header is a miss, and a
        # raised KeyError costs more than the rest of the lookup.
        value = self._cache.get(key, _MISSING)
        if value is _MISSING:
            value = self._cache[key] = parse(self)
        return value  # type: ignore[no-any-return]

    def prime(self, name: str, value: object) -> None:
        """Cache the typed value of a header the composer has just written (our own Via with
        its branch, our CSeq), so the layers below do not parse back what we formatted."""
        self._cache[header_key(name)] = value

    def set_wire(self, block: str, content_length: int) -> None:
        """Send `block` as these fields instead of rendering them again.

        For a composer that renders what many messages share once: a fork set's 16 INVITEs
        differ in four fields, and rendering and CR/LF-checking the other dozen per INVITE
        was a third of a fork's cost. `block` must be exactly what `serialize` would give,
        with a Content-Length for a body of `content_length` bytes, and free of CR or LF
        inside values: the composer checks what it puts in, `Message` trusts it. Any change
        to the fields (or another body length) falls back to rendering them.
        """
        self.wire = block
        self.wire_length = content_length

    def add(self, name: str, value: str) -> None:
        """Append a field at the end."""
        key = header_key(name)
        self._items.append((key, _out_name(name), value))
        self._cache.pop(key, None)
        self.wire = None

    def add_first(self, name: str, value: str) -> None:
        """Insert a field before any other of the same name (a proxy's Via, a Record-Route)."""
        key = header_key(name)
        index = next((i for i, (k, _, _) in enumerate(self._items) if k == key), 0)
        self._items.insert(index, (key, _out_name(name), value))
        self._cache.pop(key, None)
        self.wire = None

    def set(self, name: str, value: str) -> None:
        """Replace every field of this name with one, kept where the first one stood."""
        key = header_key(name)
        for i, (k, _, _) in enumerate(self._items):
            if k == key:
                self._items[i] = (key, _out_name(name), value)
                self._items[i + 1 :] = [e for e in self._items[i + 1 :] if e[0] != key]
                break
        else:
            self._items.append((key, _out_name(name), value))
        self._cache.pop(key, None)
        self.wire = None

    def remove(self, name: str) -> None:
        key = header_key(name)
        self._items = [e for e in self._items if e[0] != key]
        self._cache.pop(key, None)
        self.wire = None

    def remove_first_value(self, name: str) -> str | None:
        """Pop the first value of a list header (the top Via of a response we relay)."""
        key = header_key(name)
        for i, (k, n, v) in enumerate(self._items):
            if k != key:
                continue
            parts = list(split_outside(v, ","))
            first = parts[0].strip(WS)
            if len(parts) == 1:
                del self._items[i]
            else:
                self._items[i] = (k, n, ",".join(parts[1:]).strip(WS))
            self._cache.pop(key, None)
            self.wire = None
            return first
        return None

    def serialize(self) -> str:
        return _lines(self._items)


def split_list(values: list[str]) -> list[str]:
    """The elements of a list header's field values: split on commas outside quotes and `<>`,
    stripped, empty elements dropped (§7.3.1 allows `a,,b`)."""
    out: list[str] = []
    for v in values:
        if "," not in v:  # one value per line, the usual case
            if v:
                out.append(v)
            continue
        for part in split_outside(v, ","):
            part = part.strip(WS)
            if part:
                out.append(part)
    return out


def render_entries(entries: tuple[tuple[str, str, str], ...] | list[tuple[str, str, str]]) -> str:
    """`Headers.serialize` of `entries`, for `Headers.set_wire`: refused if a value carries
    CR or LF (which would smuggle a header of its own to the peer)."""
    for _, _, value in entries:
        if "\n" in value or "\r" in value:
            raise LocalProtocolError("CR or LF inside a header value")
    return _lines(entries)


def _lines(entries: tuple[tuple[str, str, str], ...] | list[tuple[str, str, str]]) -> str:
    return "".join([f"{name}: {value}\r\n" for _, name, value in entries])


def entry(name: str, value: str) -> tuple[str, str, str]:
    """One `Headers` entry (key, name as written, value): for code that composes many
    messages from shared parts and builds the entry list once instead of `add`ing each time."""
    return (header_key(name), _out_name(name), value)


def _out_name(name: str) -> str:
    key = header_key(name)
    return CANONICAL.get(key, name if len(name) > 1 else canonical_name(key))


# --------------------------------------------------------------------------------------------
# Typed values


@dataclass(frozen=True, slots=True, init=False)
class Via:
    """One Via value: `SIP/2.0/UDP host[:port];params`."""

    transport: str
    host: str
    port: int | None = None
    params: tuple[tuple[str, str | None], ...] = ()

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None = None,
        params: tuple[tuple[str, str | None], ...] = (),
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "transport", transport)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "params", params)

    def __str__(self) -> str:
        hp = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"SIP/2.0/{self.transport} {hp}{format_params(self.params)}"

    @property
    def branch(self) -> str | None:
        return find_param(self.params, "branch")[1]

    @property
    def has_rport(self) -> bool:
        return find_param(self.params, "rport")[0]

    @property
    def sent_by(self) -> str:
        """`host:port` as the transaction key uses it (default port filled in, §17.2.3)."""
        default = 5061 if self.transport.upper() == "TLS" else 5060
        return f"{self.host.lower()}:{self.port or default}"

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)[1]

    def with_params(self, **changes: str | None) -> Via:
        keep = [(k, v) for k, v in self.params if k.lower() not in changes]
        return replace(self, params=(*keep, *changes.items()))


# sent-protocol SP sent-by *( SEMI via-params ), LWS allowed around "/", ":" and ";" (`wsinv`).
_VIA = re.compile(
    rf"""
    [ \t]*({TOKEN_RE}+)[ \t]*/[ \t]*({TOKEN_RE}+)[ \t]*/[ \t]*({TOKEN_RE}+)  # SIP / 2.0 / UDP
    [ \t]+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)                             # host
    (?:[ \t]*:[ \t]*([0-9]{{1,5}}))?                                         # port
    [ \t]*(?:;(.*))?                                                       # params
    """,
    re.VERBOSE | re.DOTALL,
)


# Sizes: a received request's Via is new each time (its branch), so only the responses to our
# own requests hit the Via cache; a few hundred entries cover the transactions in flight. Both
# stay small because every entry also counts against the memory per binding (issue 2's aim).
_NAME_ADDRS_MAX = 1024
_VIAS_MAX = 256


def parse_via(text: str) -> Via:
    """Parse one Via value; LWS around `/` and `;` is legal (RFC 4475 `wsinv`). Cached."""
    return _VIAS(text)


def _parse_via(text: str) -> Via:
    via = _plain_via(text)
    return via if via is not None else _grammar_via(text)


_HOST_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-."


def _plain_via(text: str) -> Via | None:
    """The Via as `_grammar_via` reads it, for the usual shape; None for anything else.

    `SIP/2.0/UDP host[:port][;params]` with single spaces, a name or IPv4 host: what every
    phone and SIPp sends. A received request's Via is new each time (its branch), so it is
    never cached; the regex and the parameter loop took ~5.6 µs a Via. Every other form
    (LWS around `/`, `:`, `;`, IPv6, odd case) goes to the grammar, which also words errors.
    """
    if not text.startswith("SIP/2.0/"):
        return None
    sp = text.find(" ", 8)
    if sp < 0:
        return None
    transport = text[8:sp]
    if not is_token(transport):
        return None
    semi = text.find(";", sp + 1)
    hostport = text[sp + 1 :] if semi < 0 else text[sp + 1 : semi]
    colon = hostport.find(":")
    host = hostport if colon < 0 else hostport[:colon]
    if not host or host.strip(_HOST_CHARS):
        return None
    port: int | None = None
    if colon >= 0:
        port_text = hostport[colon + 1 :]
        if not 0 < len(port_text) <= 5 or port_text.strip("0123456789"):
            return None
        port = int(port_text)
        if port > 65535:
            raise ParseError(f"invalid Via port: {text!r}")
    _check_host(host, text)
    if semi < 0:
        return Via(transport.upper(), host, port, ())
    params = plain_params(text[semi + 1 :])
    if params is None:
        return None
    return Via(transport.upper(), host, port, tuple(params))


def _grammar_via(text: str) -> Via:
    m = _VIA.fullmatch(text)
    if m is None:
        raise _via_error(text)
    name, version, transport, host, port_text, params_text = m.groups()
    if name.upper() != "SIP":
        raise ParseError(f"invalid Via protocol: {text!r}")
    if version != "2.0":
        raise ParseError(f"unsupported SIP version in Via: {text!r}", 505)
    _check_host(host, text)
    port: int | None = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise ParseError(f"invalid Via port: {text!r}")
    params = tuple(parse_params(params_text, "Via")) if params_text is not None else ()
    return Via(transport.upper(), host, port, params)


def _via_error(text: str) -> ParseError:
    """Why `text` is not a Via: a version other than 2.0 is a 505 (§21.5.6), the rest a 400."""
    parts = text.split("/", 2)
    if len(parts) == 3 and parts[0].strip(WS).upper() == "SIP" and parts[1].strip(WS) != "2.0":
        return ParseError(f"unsupported SIP version in Via: {text!r}", 505)
    return ParseError(f"invalid Via: {text!r}")


def _check_host(host: str, text: str) -> None:
    """The checks the host pattern leaves to code: IPv6 syntax and where hyphens may stand."""
    if host[0] == "[":
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise ParseError(f"invalid IPv6 address in {text!r}") from exc
    elif host[0] in "-." or host[-1] == "-":
        raise ParseError(f"invalid host in {text!r}")


@dataclass(frozen=True, slots=True, init=False)
class CSeq:
    seq: int
    method: str

    def __init__(self, seq: int, method: str) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "method", method)

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


_CSEQ = re.compile(rf"[ \t]*([0-9]{{1,10}})[ \t]+({TOKEN_RE}+)[ \t]*")


def parse_cseq(text: str) -> CSeq:
    """`CSeq: 1*DIGIT LWS Method`; the number must be below 2**31 (§8.1.1.5, `scalar02`)."""
    m = _CSEQ.fullmatch(text)
    if m is None:
        raise ParseError(f"invalid CSeq: {text!r}")
    seq = int(m[1])
    if seq >= 2**31:
        raise ParseError(f"CSeq number out of range: {text!r}")
    return CSeq(seq, m[2])


@dataclass(frozen=True, slots=True, init=False)
class NameAddr:
    """From, To, Contact, Route and friends: `[display] <uri>;params` or a bare addr-spec.

    `params` are the header's parameters (tag, expires, q), not the URI's.
    """

    uri: Uri
    display: str | None = None
    params: tuple[tuple[str, str | None], ...] = ()

    def __init__(
        self, uri: Uri, display: str | None = None, params: tuple[tuple[str, str | None], ...] = ()
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "uri", uri)
        object.__setattr__(self, "display", display)
        object.__setattr__(self, "params", params)

    def __str__(self) -> str:
        disp = quote(self.display) + " " if self.display is not None else ""
        return f"{disp}<{self.uri}>{format_params(self.params)}"

    @property
    def tag(self) -> str | None:
        return find_param(self.params, "tag")[1]

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)[1]

    def has_param(self, name: str) -> bool:
        return find_param(self.params, name)[0]

    def with_params(self, **changes: str | None) -> NameAddr:
        keep = [(k, v) for k, v in self.params if k.lower() not in changes]
        return replace(self, params=(*keep, *((k, v) for k, v in changes.items())))

    @property
    def sip_uri(self) -> SipUri:
        """The URI, which must be sip/sips where the caller needs one (a 400 otherwise)."""
        if not isinstance(self.uri, SipUri):
            raise ParseError(f"not a SIP URI: {self.uri}")
        return self.uri


# name-addr = [ display-name ] LAQUOT addr-spec RAQUOT, then header parameters. A token display
# name is matched as one character class (tokens and LWS) rather than *(token LWS): the nested
# form backtracks exponentially on a long name with no `<`.
_NAME_ADDR = re.compile(
    rf"""
    [ \t]*
    (?:({QUOTED_RE})[ \t]*|([A-Za-z0-9\-.!%*_+`'~ \t]*))  # quoted-string / tokens and LWS
    <([^<>"\s]*)>                                        # the URI: no LWS inside (`badaspec`)
    [ \t]*(?:;(.*))?                                     # header parameters
    """,
    re.VERBOSE | re.DOTALL,
)


def parse_name_addr(text: str) -> NameAddr:
    """Parse one name-addr or addr-spec with header parameters.

    Without angle brackets the URI ends at the first `;` and may not contain `?` or `,`
    (RFC 3261 §20; RFC 4475 `regbadct`, `cparam01`). A display name is a quoted-string or
    tokens separated by whitespace (`baddn` has a comma there: a 400). No whitespace is allowed
    inside `<...>` (`badaspec`).
    """
    return _NAME_ADDRS(text)


# The characters of `_NAME_ADDR`'s unquoted display name: tokens and the LWS between them.
_DISPLAY_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~ \t"


def _parse_name_addr(text: str) -> NameAddr:
    plain = _plain_name_addr(text)
    return plain if plain is not None else _grammar_name_addr(text)


def _plain_name_addr(text: str) -> NameAddr | None:
    """The name-addr as `_grammar_name_addr` reads it, for the usual shapes; None otherwise.

    `<uri>`, `"Name" <uri>` or `Name <uri>`, then nothing or `;params`, with no whitespace
    where the grammar would have to skip it: what phones and SIPp send. A registration's
    From, To and Contact are new to the cache on a phone's first REGISTER, and the pattern
    cost ~5,000 instructions more than these string methods (1 % of a registration,
    callgrind). Everything else (escapes in the quotes, LWS before the URI or the
    parameters, addr-specs) goes to the grammar, which also words the errors.
    """
    if text.startswith('"'):
        q = text.find('"', 1)
        if q < 0:
            return None
        quoted = text[1:q]
        if "\\" in quoted:
            return None
        display: str | None = quoted
        lt = q + 2 if text.startswith(" <", q + 1) else q + 1
    else:
        lt = text.find("<")
        if lt < 0 or text[:lt].strip(_DISPLAY_TOKEN_CHARS):
            return None
        display = " ".join(text[:lt].split()) or None
    if not text.startswith("<", lt):
        return None
    gt = text.find(">", lt)
    if gt < 0:
        return None
    uri_text = text[lt + 1 : gt]
    if (
        not uri_text
        or not uri_text.isprintable()  # no control characters or Unicode spaces
        or " " in uri_text
        or '"' in uri_text
        or "<" in uri_text
    ):
        return None
    rest = text[gt + 1 :]
    if rest and not rest.startswith(";"):
        return None
    uri = parse_uri(uri_text)  # before the parameters: the grammar's order of errors
    params = tuple(parse_params(rest[1:], "header")) if rest else ()
    return NameAddr(uri, display, params)


def _grammar_name_addr(text: str) -> NameAddr:
    m = _NAME_ADDR.fullmatch(text)
    if m is not None:
        quoted, tokens, uri_text, param_text = m.groups()
        display = unquote(quoted) if quoted is not None else " ".join(tokens.split()) or None
        uri = parse_uri(uri_text)
        params = () if param_text is None else tuple(parse_params(param_text, "header"))
        return NameAddr(uri, display, params)
    s = text.strip(WS)
    semi = s.find(";")
    head = s if semi < 0 else s[:semi]
    if s.startswith('"') or "<" in head or ">" in head:
        raise _name_addr_error(s, text)
    # addr-spec: the URI ends at the first `;`, whatever follows belongs to the header
    uri_text = head.rstrip(WS)
    if "?" in uri_text or "," in uri_text:
        raise ParseError(f"addr-spec with '?' or ',' must be in <...>: {text!r}")
    if not uri_text:
        raise ParseError(f"invalid URI in {text!r}")
    uri = parse_uri(uri_text)
    params = () if semi < 0 else tuple(parse_params(s[semi + 1 :], "header"))
    return NameAddr(uri, None, params)


def _name_addr_error(s: str, text: str) -> ParseError:
    """Say what is wrong with a name-addr the pattern refused (it accepts every valid one)."""
    if s.startswith('"'):
        end = quoted_end(s, 0)  # raises for an unterminated quote (`quotbal`)
        if not s[end:].lstrip(WS).startswith("<"):
            return ParseError(f"quoted display name without <uri> in {text!r}")
        lt = end + len(s[end:]) - len(s[end:].lstrip(WS))
    else:
        lt = s.find("<")
        if lt < 0:
            return ParseError(f"'>' without '<' in {text!r}")
        if not all(is_token(t) for t in s[:lt].split()):
            return ParseError(f"invalid display name: {s[:lt].strip(WS)!r}")
    gt = s.find(">", lt)
    if gt < 0:
        return ParseError(f"unterminated <...> in {text!r}")
    if s[gt + 1 :].strip(WS)[:1] not in ("", ";"):
        return ParseError(f"unexpected text after URI in {text!r}")
    return ParseError(f"invalid URI in {text!r}")


_VIAS: ParseCache[str, Via] = ParseCache(_parse_via, _VIAS_MAX)
_NAME_ADDRS: ParseCache[str, NameAddr] = ParseCache(_parse_name_addr, _NAME_ADDRS_MAX)


def parse_name_addr_list(values: list[str]) -> list[NameAddr]:
    return [parse_name_addr(v) for v in values]


def parse_uint(text: str, what: str, limit: int = 2**32 - 1) -> int:
    """A non-negative decimal within `limit` (Expires, Max-Forwards, Content-Length).

    ASCII digits only: `str.isdigit` alone accepts `²` and other Unicode digits, which `int`
    then rejects with a ValueError (or, worse, reads as a number).
    """
    t = text.strip(WS)
    if not (t.isascii() and t.isdigit()) or len(t) > 12 or int(t) > limit:
        raise ParseError(f"invalid {what}: {text!r}")
    return int(t)
