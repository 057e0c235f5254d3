"""SIP requests and responses: parsing from bytes, serialising to bytes (RFC 3261 §7, §20, §25).

`parse_message(data)` is the one entry point for wire bytes. It checks what every layer above
relies on (start line, Via, From, To, Call-ID, CSeq, Max-Forwards, Content-Length and, where
present, Contact, Expires and Date) and raises `ParseError` with the status to answer otherwise.
Other headers stay raw until someone asks for them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeAlias

from .errors import LocalProtocolError, MessageTooLarge, ParseError
from .headers import (
    CSeq,
    Headers,
    NameAddr,
    Via,
    header_key,
    parse_cseq,
    parse_name_addr,
    parse_uint,
    parse_via,
    split_list,
)
from .syntax import WS, is_token
from .uri import SipUri, Uri, parse_uri

SIP_VERSION = "SIP/2.0"

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 204: "No Notification",
    301: "Moved Permanently", 302: "Moved Temporarily", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 415: "Unsupported Media Type", 416: "Unsupported URI Scheme",
    420: "Bad Extension", 421: "Extension Required", 423: "Interval Too Brief",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist", 482: "Loop Detected",
    483: "Too Many Hops", 484: "Address Incomplete", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 489: "Bad Event", 491: "Request Pending",
    500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}  # fmt: skip

_COPIED_TO_RESPONSES = frozenset(("via", "from", "to", "call-id", "cseq"))

_DATE_RE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"\d{4} \d{2}:\d{2}:\d{2} GMT"
)


class Message:
    """What requests and responses share: headers, body and the typed views of core headers."""

    __slots__ = ("body", "headers")

    def __init__(self, headers: Headers, body: bytes = b"") -> None:
        self.headers = headers
        self.body = body

    # --- typed views (parsed once, cached in `headers`) ---------------------------------
    @property
    def call_id(self) -> str:
        value = self.headers.get("call-id")
        if value is None:
            raise ParseError("missing Call-ID")
        return value

    @property
    def cseq(self) -> CSeq:
        return self.headers.parsed("cseq", _cseq_of)

    @property
    def vias(self) -> list[Via]:
        return self.headers.parsed("via", _vias_of)

    @property
    def via(self) -> Via:
        """The top Via: the transaction key and where responses go."""
        return self.headers.parsed("via", _vias_of)[0]

    @property
    def from_(self) -> NameAddr:
        return self.headers.parsed("from", _from_of)

    @property
    def to(self) -> NameAddr:
        return self.headers.parsed("to", _to_of)

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values; empty for `Contact: *` (check `is_star_contact`)."""
        return self.headers.parsed("contact", _contacts_of)

    @property
    def is_star_contact(self) -> bool:
        values = self.headers.get_all("contact")
        return len(values) == 1 and values[0].strip(WS) == "*"

    @property
    def expires(self) -> int | None:
        return self.headers.parsed("expires", _expires_of)

    @property
    def max_forwards(self) -> int | None:
        return self.headers.parsed("max-forwards", _max_forwards_of)

    def to_bytes(self) -> bytes:
        raise NotImplementedError

    def _serialize(self, start_line: str) -> bytes:
        h = self.headers
        wire = h.wire
        if wire is not None and h.wire_length == len(self.body):
            # Rendered and checked by its composer (`Headers.set_wire`): the start line is
            # all that is left to check.
            if "\n" in start_line or "\r" in start_line:
                raise LocalProtocolError("CR or LF inside a start line or header value")
            text = start_line + "\r\n" + wire + "\r\n"
            return text.encode("utf-8", "surrogateescape") + self.body
        self.headers.set("Content-Length", str(len(self.body)))
        text = start_line + "\r\n" + self.headers.serialize() + "\r\n"
        # One CRLF per line and no other CR or LF: a value carrying one would let whatever
        # follows it pass for a header of its own at the peer (header injection).
        lines = len(self.headers) + 2
        if text.count("\n") != lines or text.count("\r") != lines:
            raise LocalProtocolError("CR or LF inside a start line or header value")
        return text.encode("utf-8", "surrogateescape") + self.body


class Request(Message):
    """A SIP request. `uri` is the parsed Request-URI."""

    __slots__ = ("method", "uri")

    def __init__(self, method: str, uri: Uri, headers: Headers, body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"

    def to_bytes(self) -> bytes:
        return self._serialize(f"{self.method} {self.uri} {SIP_VERSION}")

    def make_response(
        self,
        status: int,
        reason: str | None = None,
        to_tag: str | None = None,
    ) -> Response:
        """A response per §8.2.6: Via, From, To, Call-ID and CSeq copied; To tag added if given.

        A 100 Trying never gets a tag; the To tag of an existing dialog is never replaced.
        """
        if not 100 <= status <= 699:
            raise LocalProtocolError(f"status code {status} is outside 100-699")
        items = [e for e in self.headers._items if e[0] in _COPIED_TO_RESPONSES]
        headers = Headers(items)
        if to_tag and status > 100 and self.to.tag is None:
            headers.set("To", f"{self.headers.get('to')};tag={to_tag}")
        return Response(status, reason or REASONS.get(status, "Unknown"), headers)


class Response(Message):
    """A SIP response."""

    __slots__ = ("reason", "status")

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"

    def to_bytes(self) -> bytes:
        return self._serialize(f"{SIP_VERSION} {self.status} {self.reason}")


SipMessage: TypeAlias = Request | Response


# --- parsing --------------------------------------------------------------------------------


def parse_message(data: bytes, *, stream: bool = False, max_size: int | None = None) -> SipMessage:
    """Parse one complete message.

    For datagrams (`stream=False`) bytes past Content-Length are ignored (RFC 4475 `dblreq`) and
    a missing Content-Length means the rest of the datagram is the body (§18.3). Stream framing
    is done by `framing.StreamFramer`, which hands over exactly one message. `max_size`, if
    given, refuses larger input with `MessageTooLarge` (513) before any work is done.

    Every malformed input raises `ParseError` (or its subclass `MessageTooLarge`) and nothing
    else, so a transport can answer or drop without a catch-all.
    """
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(len(data), max_size)
    head, body = _split_head(data)
    lines = _split_lines(head.decode("utf-8", "surrogateescape"))
    # The start line first: a version we do not speak is a 505 whatever its headers look like.
    start = lines[0]
    if start[:4].upper() == "SIP/":
        status, reason = _parse_status_line(start)
        items, fields = _parse_header_lines(lines[1:])
        body = _frame_body(fields.get("content-length"), body, stream)
        msg: SipMessage = Response(status, reason, Headers(items), body)
    else:
        method, uri = _parse_request_line(start)
        items, fields = _parse_header_lines(lines[1:])
        body = _frame_body(fields.get("content-length"), body, stream)
        msg = Request(method, uri, Headers(items), body)
    _check(msg, fields)
    return msg


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    # Leading CRLFs are keep-alives / stray bytes between messages (§7.5).
    data = data.lstrip(b"\r\n")
    end = data.find(b"\r\n\r\n")
    # A bare-LF message ends its head at the first empty line, even if its body has a CRLFCRLF.
    lf_end = data.find(b"\n\n", 0, len(data) if end < 0 else end)
    if lf_end >= 0:
        return data[:lf_end], data[lf_end + 2 :]
    if end >= 0:
        return data[:end], data[end + 4 :]
    # A message with no body and no blank line at all is accepted from datagrams.
    return data.rstrip(b"\r\n"), b""


def _split_lines(text: str) -> list[str]:
    """The lines of a header block, continuation lines joined to the line they continue.

    CRLF is the line end (§7); a bare LF is accepted as one too, as most stacks do. A bare CR is
    refused: left in a value it would end the line for some peer we relay the header to, which
    could then see a header we never parsed.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        if "\r" in text:
            raise ParseError("bare CR in the header block")
    lines = text.split("\n")
    if "\n " in text or "\n\t" in text:
        return _unfold(lines)
    return lines


def _unfold(raw: list[str]) -> list[str]:
    """Join continuation lines (leading SP/HT) to the previous one with a single SP (§7.3.1)."""
    lines: list[str] = []
    for line in raw:
        if line and line[0] in WS and lines:
            lines[-1] = lines[-1].rstrip(WS) + " " + line.strip(WS)
        else:
            lines.append(line)
    return lines


# Validated header names as they appear before the colon -> (lookup key, name as written). Real
# traffic has a few dozen spellings; the bound stops a peer inventing names from growing it.
_NAMES: dict[str, tuple[str, str]] = {}
_NAMES_MAX = 2048


def _parse_header_lines(
    lines: list[str],
) -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
    """The `Headers` entries of the header lines, and the values of the headers `_check` reads.

    Collecting those here saves a second pass over the list for validation.
    """
    items: list[tuple[str, str, str]] = []
    fields: dict[str, list[str]] = {}
    names = _NAMES
    checked = _CHECKED
    for line in lines:
        raw_name, colon, value = line.partition(":")
        known = names.get(raw_name) if colon else None
        if known is None:
            name = raw_name.rstrip(WS)
            if not colon or not is_token(name):
                raise ParseError(f"malformed header line: {line[:60]!r}")
            known = (header_key(name), name)
            if len(names) < _NAMES_MAX:
                names[raw_name] = known
        key = known[0]
        value = value.strip(WS)
        items.append((key, known[1], value))
        if key in checked:
            if key in fields:
                fields[key].append(value)
            else:
                fields[key] = [value]
    return items, fields


def _frame_body(cl_values: list[str] | None, body: bytes, stream: bool) -> bytes:
    """The body as Content-Length delimits it (all of the rest for a datagram without one)."""
    if not cl_values:
        if stream:
            raise ParseError("missing Content-Length on a stream transport")
        return body
    lengths = {parse_uint(v, "Content-Length") for v in cl_values}
    if len(lengths) > 1:
        raise ParseError("conflicting Content-Length headers")  # `mcl01`
    length = lengths.pop()
    if length > len(body):
        raise ParseError(f"Content-Length {length} exceeds the {len(body)} bytes received")
    return body[:length]


def _parse_request_line(line: str) -> tuple[str, Uri]:
    # Exactly one SP between the three elements, none trailing (`lwsstart`, `lwsruri`, `trws`).
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise ParseError(f"malformed request line: {line[:80]!r}")
    method, uri_text, version = parts
    if not is_token(method):
        raise ParseError(f"invalid method: {method!r}")
    if version.upper() != SIP_VERSION:  # ABNF strings are case-insensitive
        if version.upper().startswith("SIP/"):
            raise ParseError(f"unsupported version {version!r}", 505)
        raise ParseError(f"malformed request line: {line[:80]!r}")
    if uri_text.startswith("<"):
        raise ParseError("Request-URI in angle brackets")
    uri = parse_uri(uri_text)
    if isinstance(uri, SipUri) and uri.headers is not None:
        raise ParseError("headers are not allowed in a Request-URI")  # `escruri`
    return method, uri


def _parse_status_line(line: str) -> tuple[int, str]:
    version, _, rest = line.partition(" ")
    if version.upper() != SIP_VERSION:
        raise ParseError(f"unsupported version {version!r}", 505)
    code, _, reason = rest.partition(" ")
    if len(code) != 3 or not code.isascii() or not code.isdigit() or not "100" <= code <= "699":
        raise ParseError(f"invalid status code {code[:12]!r}")
    return int(code), reason


def validate(msg: SipMessage) -> None:
    """Check the headers every layer relies on, so later code can trust them.

    A missing mandatory header is 400 (§8.1.1; RFC 4475 `insuf`), and so is a second value of a
    single-valued one (`multi01`) or a CSeq method that is not the request's (`mismatch01`;
    `mismatch02` too, since a request we cannot vouch for the method of is not worth a 501).

    The typed values parsed on the way are left in the header cache, so the properties that
    read them later cost a dictionary lookup.
    """
    fields: dict[str, list[str]] = {}
    for key, _, value in msg.headers._items:
        if key in _CHECKED:
            if key in fields:
                fields[key].append(value)
            else:
                fields[key] = [value]
    _check(msg, fields)


def _check(msg: SipMessage, fields: dict[str, list[str]]) -> None:
    """`validate` given the raw values of the `_CHECKED` headers, one list entry per line."""
    h = msg.headers
    for name in _MANDATORY:
        if name not in fields:
            raise ParseError(f"missing {name} header")
    cache = h._cache
    for key, values in fields.items():
        view = _VIEWS.get(key)
        if view is not None and key not in cache:
            cache[key] = view(values)
    call_ids = fields["call-id"]
    call_id = call_ids[0]
    if len(call_ids) != 1:
        raise ParseError("exactly one Call-ID header is required")
    if not call_id or " " in call_id or "\t" in call_id:
        raise ParseError(f"invalid Call-ID: {call_id!r}")
    if isinstance(msg, Request) and cache["cseq"].method != msg.method:
        raise ParseError("CSeq method does not match the request method")
    dates = fields.get("date")
    if dates is not None and (len(dates) != 1 or not _DATE_RE.fullmatch(dates[0])):
        raise ParseError(f"invalid Date: {dates[0]!r}")  # `baddate`: only GMT is allowed


# --- typed views: raw values of one header (one per field line) -> the parsed value -----------


def _cseq_from(values: list[str]) -> CSeq:
    if len(values) != 1:
        raise ParseError("exactly one CSeq header is required")
    return parse_cseq(values[0])


def _vias_from(values: list[str]) -> list[Via]:
    vias = [parse_via(v) for v in split_list(values)]
    if not vias:
        raise ParseError("missing Via")
    return vias


def _name_addr_from(values: list[str]) -> NameAddr:
    if len(values) != 1:
        raise ParseError("exactly one From/To header is required")  # `multi01`
    return parse_name_addr(values[0])


def _contacts_from(values: list[str]) -> list[NameAddr]:
    contacts = split_list(values)
    if contacts == ["*"]:
        return []
    if "*" in contacts:
        raise ParseError("Contact: * mixed with other contacts")
    return [parse_name_addr(v) for v in contacts]


def _optional_uint(values: list[str], what: str, limit: int) -> int | None:
    if not values:
        return None
    if len(values) != 1:
        raise ParseError(f"more than one {what} header")
    return parse_uint(values[0], what, limit)


def _expires_from(values: list[str]) -> int | None:
    return _optional_uint(values, "Expires", 2**32 - 1)


def _max_forwards_from(values: list[str]) -> int | None:
    return _optional_uint(values, "Max-Forwards", 255)


#: Header key -> its typed view; `validate` primes the header cache with each of them.
_VIEWS: dict[str, Callable[[list[str]], object]] = {
    "cseq": _cseq_from,
    "via": _vias_from,
    "from": _name_addr_from,
    "to": _name_addr_from,
    "contact": _contacts_from,
    "expires": _expires_from,
    "max-forwards": _max_forwards_from,
}


_MANDATORY = ("via", "from", "to", "call-id", "cseq")
_CHECKED = frozenset((*_VIEWS, *_MANDATORY, "date", "content-length"))


# The `Headers.parsed` forms, used when a property is read before (or without) `validate`.
def _cseq_of(h: Headers) -> CSeq:
    return _cseq_from(h.get_each("cseq"))


def _vias_of(h: Headers) -> list[Via]:
    return _vias_from(h.get_each("via"))


def _from_of(h: Headers) -> NameAddr:
    return _name_addr_from(h.get_each("from"))


def _to_of(h: Headers) -> NameAddr:
    return _name_addr_from(h.get_each("to"))


def _contacts_of(h: Headers) -> list[NameAddr]:
    return _contacts_from(h.get_each("contact"))


def _expires_of(h: Headers) -> int | None:
    return _expires_from(h.get_each("expires"))


def _max_forwards_of(h: Headers) -> int | None:
    return _max_forwards_from(h.get_each("max-forwards"))


def header_value(msg: Message, name: str) -> str | None:
    """Convenience for callers that want one raw header value."""
    return msg.headers.get(name)


def new_request(
    method: str,
    uri: Uri | str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
) -> Request:
    """Compose a request from parts (used by the B2BUA and tests)."""
    return Request(
        method, parse_uri(uri) if isinstance(uri, str) else uri, Headers.of(headers), body
    )
