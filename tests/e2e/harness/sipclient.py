"""A tiny, stdlib-only SIP user agent for end-to-end tests.

Why not only SIPp or baresip: the fine-grained checks (identical answers for a wrong password
and an unknown user, the throttle, crafted and malformed messages, listing bindings after a
restart) need byte-level control of every request and a structured view of every response.
This module does exactly that and nothing more: one socket (UDP or TCP) per client, a
blocking request/response "transaction" with UDP retransmission, digest authentication
(MD5 and SHA-256, with and without ``qop=auth``, RFC 3261 / RFC 7616 / RFC 8760), and a
REGISTER helper that returns the bindings listed by the registrar.

Everything talks to 127.0.0.1 only; ``SipClient`` refuses other addresses.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

LOOPBACK = "127.0.0.1"

#: RFC 3261 §7.3.3 compact header forms (plus the common extension ones).
COMPACT_FORMS: dict[str, str] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}


class _Hash(Protocol):
    def hexdigest(self) -> str: ...


def _sha512_256(data: bytes) -> _Hash:
    return hashlib.new("sha512_256", data)


#: Digest algorithms this client can answer (RFC 7616 §3.2), mapped to a hash constructor.
DIGEST_HASHES: dict[str, Callable[[bytes], _Hash]] = {
    "MD5": hashlib.md5,
    "MD5-SESS": hashlib.md5,
    "SHA-256": hashlib.sha256,
    "SHA-256-SESS": hashlib.sha256,
    "SHA-512-256": _sha512_256,
    "SHA-512-256-SESS": _sha512_256,
}


class SipTimeout(TimeoutError):
    """No (final) response arrived in time."""


class SipParseError(ValueError):
    """The bytes received are not a SIP message this parser understands."""


def canonical_header_name(name: str) -> str:
    """Lower-case full header name, compact forms expanded (``m`` -> ``contact``)."""
    low = name.strip().lower()
    return COMPACT_FORMS.get(low, low)


# --------------------------------------------------------------------------------------------
# messages


@dataclass
class SipMessage:
    """A parsed SIP request or response; header order and original names are preserved."""

    start_line: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    source: tuple[str, int] | None = None
    received_at: float = field(default_factory=time.monotonic)

    @property
    def is_response(self) -> bool:
        return self.start_line.startswith("SIP/")

    @property
    def status(self) -> int:
        """Status code of a response (raises on a request)."""
        if not self.is_response:
            raise SipParseError(f"not a response: {self.start_line!r}")
        try:
            return int(self.start_line.split(" ", 2)[1])
        except (IndexError, ValueError) as exc:
            raise SipParseError(f"bad status line {self.start_line!r}") from exc

    @property
    def reason(self) -> str:
        """Reason phrase of a response ('' if absent)."""
        parts = self.start_line.split(" ", 2)
        return parts[2] if len(parts) > 2 else ""

    @property
    def method(self) -> str:
        """Method of a request, or the CSeq method of a response."""
        if self.is_response:
            cseq = self.get("cseq") or ""
            return cseq.split()[-1] if cseq.split() else ""
        return self.start_line.split(" ", 1)[0]

    def get(self, name: str) -> str | None:
        """First value of header ``name`` (full or compact name), or None."""
        want = canonical_header_name(name)
        for hname, value in self.headers:
            if canonical_header_name(hname) == want:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        """All values of header ``name`` in order (a comma-separated line is one value)."""
        want = canonical_header_name(name)
        return [v for n, v in self.headers if canonical_header_name(n) == want]

    def header_names(self) -> list[str]:
        """Canonical header names in order (with repetitions)."""
        return [canonical_header_name(n) for n, _ in self.headers]

    def summary(self) -> str:
        """One line for assertion messages."""
        return f"{self.start_line!r} ({len(self.raw)} bytes, headers {self.header_names()})"

    def text(self) -> str:
        """The raw message, decoded leniently (for failure output)."""
        return self.raw.decode("utf-8", "replace")


def parse_message(data: bytes, source: tuple[str, int] | None = None) -> SipMessage:
    """Parse one complete SIP message (header folding is unfolded, CRLF or bare LF accepted)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    lines = head.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        raise SipParseError("empty message")
    start = lines[0].strip()
    if not (start.startswith("SIP/") or start.endswith("SIP/2.0") or " SIP/" in start):
        raise SipParseError(f"not a SIP start line: {start[:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise SipParseError(f"header line without colon: {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
    return SipMessage(start, headers, body, data, source)


def split_header_list(value: str) -> list[str]:
    """Split a comma-separated header value, ignoring commas inside quotes and <...>."""
    items: list[str] = []
    cur: list[str] = []
    in_quote = in_angle = escaped = False
    for ch in value:
        if escaped:
            cur.append(ch)
            escaped = False
            continue
        if ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == "<" and not in_quote:
            in_angle = True
        elif ch == ">" and not in_quote:
            in_angle = False
        elif ch == "," and not in_quote and not in_angle:
            items.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        items.append("".join(cur).strip())
    return items


def parse_params(text: str) -> dict[str, str]:
    """Parse ``;a=b;c`` style parameters into a lower-case-keyed dict (values unquoted)."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, _, val = part.partition("=")
        out[key.strip().lower()] = val.strip().strip('"')
    return out


@dataclass(frozen=True)
class Binding:
    """One Contact listed by the registrar."""

    uri: str
    expires: int | None
    params: dict[str, str]
    raw: str


def parse_contact(value: str) -> Binding:
    """Parse one contact-param (``"name" <uri>;expires=N`` or ``uri;expires=N``)."""
    raw = value.strip()
    if "<" in raw:
        lt, gt = raw.index("<"), raw.index(">", raw.index("<"))
        uri, rest = raw[lt + 1 : gt], raw[gt + 1 :]
    else:
        uri, _, rest = raw.partition(";")
        rest = ";" + rest if rest else ""
    params = parse_params(rest)
    expires: int | None = None
    if "expires" in params:
        try:
            expires = int(params["expires"])
        except ValueError:
            expires = None
    return Binding(uri.strip(), expires, params, raw)


def contacts_of(msg: SipMessage) -> list[Binding]:
    """All bindings in the Contact headers of ``msg`` ('*' is skipped)."""
    out: list[Binding] = []
    for value in msg.get_all("contact"):
        for item in split_header_list(value):
            if item.strip() != "*":
                out.append(parse_contact(item))
    return out


# --------------------------------------------------------------------------------------------
# digest authentication


@dataclass(frozen=True)
class DigestChallenge:
    """A parsed ``WWW-Authenticate`` / ``Proxy-Authenticate`` header."""

    header: str  # canonical name of the header it came from
    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def nonce(self) -> str:
        return self.params.get("nonce", "")

    @property
    def algorithm(self) -> str:
        """Upper-case algorithm name; RFC 3261 default is MD5."""
        return self.params.get("algorithm", "MD5").upper()

    @property
    def qop_options(self) -> list[str]:
        return [q.strip().lower() for q in self.params.get("qop", "").split(",") if q.strip()]

    @property
    def stale(self) -> bool:
        return self.params.get("stale", "").lower() == "true"

    @property
    def answer_header(self) -> str:
        """Header to put the credentials in (Authorization or Proxy-Authorization)."""
        if self.header == "proxy-authenticate":
            return "Proxy-Authorization"
        return "Authorization"


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """Split ``Digest a="x, y", b=z`` into ("Digest", {"a": "x, y", "b": "z"})."""
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        start = i
        while i < n and rest[i] not in "=, \t":
            i += 1
        key = rest[start:i].strip().lower()
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == "=":
            i += 1
            while i < n and rest[i] in " \t":
                i += 1
            if i < n and rest[i] == '"':
                i += 1
                buf: list[str] = []
                while i < n and rest[i] != '"':
                    if rest[i] == "\\" and i + 1 < n:
                        i += 1
                    buf.append(rest[i])
                    i += 1
                i += 1  # closing quote
                val = "".join(buf)
            else:
                start = i
                while i < n and rest[i] != ",":
                    i += 1
                val = rest[start:i].strip()
        else:
            val = ""
        if key:
            params[key] = val
    return scheme, params


def challenges_of(msg: SipMessage) -> list[DigestChallenge]:
    """All Digest challenges of a 401/407, in header order."""
    out: list[DigestChallenge] = []
    for hname in ("www-authenticate", "proxy-authenticate"):
        for value in msg.get_all(hname):
            scheme, params = parse_auth_params(value)
            out.append(DigestChallenge(hname, scheme, params))
    return out


def _h(algorithm: str, text: str) -> str:
    return DIGEST_HASHES[algorithm.upper()](text.encode("utf-8")).hexdigest()


def digest_response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None,
    nc: str = "00000001",
    cnonce: str = "",
    body: bytes = b"",
) -> str:
    """The ``response=`` value (RFC 2617 §3.2.2 / RFC 7616 §3.4.1); qop None = RFC 2069 form."""
    alg = algorithm.upper()
    if alg not in DIGEST_HASHES:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    ha1 = _h(alg, f"{username}:{realm}:{password}")
    if alg.endswith("-SESS"):
        ha1 = _h(alg, f"{ha1}:{nonce}:{cnonce}")
    if qop == "auth-int":
        hbody = DIGEST_HASHES[alg](body).hexdigest()
        ha2 = _h(alg, f"{method}:{uri}:{hbody}")
    else:
        ha2 = _h(alg, f"{method}:{uri}")
    if qop:
        return _h(alg, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _h(alg, f"{ha1}:{nonce}:{ha2}")


def build_authorization(
    challenge: DigestChallenge,
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    nc: int = 1,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The value of an Authorization header answering ``challenge`` (qop=auth preferred)."""
    qop: str | None = None
    if challenge.qop_options:
        qop = "auth" if "auth" in challenge.qop_options else challenge.qop_options[0]
    cnonce = cnonce if cnonce is not None else secrets.token_hex(8)
    nc_text = f"{nc:08x}"
    resp = digest_response(
        algorithm=challenge.algorithm,
        username=username,
        realm=challenge.realm,
        password=password,
        method=method,
        uri=uri,
        nonce=challenge.nonce,
        qop=qop,
        nc=nc_text,
        cnonce=cnonce,
        body=body,
    )
    parts = [
        f'username="{username}"',
        f'realm="{challenge.realm}"',
        f'nonce="{challenge.nonce}"',
        f'uri="{uri}"',
        f'response="{resp}"',
        f"algorithm={challenge.params.get('algorithm', 'MD5')}",
    ]
    if qop:
        parts += [f"qop={qop}", f"nc={nc_text}", f'cnonce="{cnonce}"']
    if "opaque" in challenge.params:
        parts.append(f'opaque="{challenge.params["opaque"]}"')
    return "Digest " + ", ".join(parts)


def choose_challenge(
    challenges: Sequence[DigestChallenge], prefer: Sequence[str] = ("SHA-256", "MD5")
) -> DigestChallenge:
    """The challenge to answer: the first of ``prefer`` that is offered, else the first usable."""
    usable = [
        c for c in challenges if c.scheme.lower() == "digest" and c.algorithm in DIGEST_HASHES
    ]
    if not usable:
        raise ValueError(f"no usable digest challenge in {challenges!r}")
    for alg in prefer:
        for c in usable:
            if c.algorithm == alg.upper():
                return c
    return usable[0]


# --------------------------------------------------------------------------------------------
# transport


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def new_tag() -> str:
    return secrets.token_hex(6)


class SipClient:
    """One client socket on 127.0.0.1 talking to one server over UDP or TCP.

    Blocking and single-threaded on purpose: tests read top to bottom, and every wait has a
    timeout. Messages that do not belong to the current transaction are kept in
    ``self.stray`` so a test can inspect them.
    """

    def __init__(
        self,
        server: tuple[str, int],
        transport: str = "udp",
        *,
        timeout: float = 4.0,
        local_port: int = 0,
    ) -> None:
        host, port = server
        if host != LOOPBACK:
            raise ValueError(f"tests only talk to {LOOPBACK}, not {host!r}")
        self.server = (host, int(port))
        self.transport = transport.lower()
        if self.transport not in ("udp", "tcp"):
            raise ValueError(f"transport must be udp or tcp, not {transport!r}")
        self.timeout = timeout
        self.stray: list[SipMessage] = []
        self._buf = b""
        self._cseq = 0
        self.closed = False  # TCP: the server closed the connection
        if self.transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((LOOPBACK, local_port))
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind((LOOPBACK, local_port))
            self.sock.settimeout(timeout)
            self.sock.connect(self.server)
        self.local_port: int = self.sock.getsockname()[1]

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> SipClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- raw I/O -----------------------------------------------------------------------------

    @property
    def via_transport(self) -> str:
        return self.transport.upper()

    @property
    def local_hostport(self) -> str:
        return f"{LOOPBACK}:{self.local_port}"

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (one datagram, or appended to the TCP stream)."""
        if self.transport == "udp":
            self.sock.sendto(data, self.server)
        else:
            self.sock.sendall(data)

    def recv_bytes(self, timeout: float) -> bytes | None:
        """One raw datagram (UDP) or whatever the stream has (TCP); None on timeout.

        On TCP, ``b""`` means the server closed the connection.
        """
        self.sock.settimeout(max(timeout, 0.001))
        try:
            if self.transport == "udp":
                data, _addr = self.sock.recvfrom(70000)
                return data
            return self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return None

    def recv(self, timeout: float) -> SipMessage | None:
        """The next complete SIP message, or None on timeout (or TCP close, see ``closed``)."""
        deadline = time.monotonic() + timeout
        if self.transport == "udp":
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
                try:
                    data, addr = self.sock.recvfrom(70000)
                except TimeoutError:
                    return None
                if not data.strip():  # keep-alive
                    continue
                return parse_message(data, addr)
        while True:
            msg = self._take_stream_message()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                self.closed = True
                return None
            self._buf += chunk

    def _take_stream_message(self) -> SipMessage | None:
        self._buf = self._buf.lstrip(b"\r\n")
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self._buf[:end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if canonical_header_name(name.decode("latin-1")) == "content-length":
                length = int(value.strip() or b"0")
        total = end + 4 + length
        if len(self._buf) < total:
            return None
        data, self._buf = self._buf[:total], self._buf[total:]
        return parse_message(data, self.server)

    # -- requests ----------------------------------------------------------------------------

    def build_request(
        self,
        method: str,
        ruri: str,
        *,
        from_uri: str,
        to_uri: str,
        call_id: str,
        cseq: int,
        from_tag: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        branch: str | None = None,
    ) -> tuple[bytes, str]:
        """Serialize a request; returns (bytes, branch)."""
        branch = branch or new_branch()
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/{self.via_transport} {self.local_hostport};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <{from_uri}>;tag={from_tag}",
            f"To: <{to_uri}>",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method}",
        ]
        lines += [f"{n}: {v}" for n, v in headers]
        lines += ["User-Agent: softswitch-e2e-sipclient", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body, branch

    def transaction(
        self, data: bytes, branch: str, method: str, *, timeout: float | None = None
    ) -> SipMessage:
        """Send a request and wait for its final response (1xx skipped, UDP retransmitted).

        Retransmission follows RFC 3261 timer E (T1 = 0.5 s doubling up to T2 = 4 s).
        Raises SipTimeout when no final response arrives within ``timeout``.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        interval = 0.5
        self.send_raw(data)
        next_send = time.monotonic() + interval
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise SipTimeout(f"no final response to {method} within {timeout:.1f}s")
            wait = min(deadline, next_send) - now if self.transport == "udp" else deadline - now
            msg = self.recv(wait)
            if msg is None:
                if self.transport == "tcp" and self.closed:
                    raise SipTimeout(f"server closed the TCP connection during {method}")
                if self.transport == "udp" and time.monotonic() >= next_send:
                    self.send_raw(data)
                    interval = min(interval * 2, 4.0)
                    next_send = time.monotonic() + interval
                continue
            if not msg.is_response or f"branch={branch}" not in (msg.get("via") or ""):
                self.stray.append(msg)
                continue
            if msg.status < 200:
                continue
            return msg

    def options(self, *, timeout: float | None = None, ruri: str | None = None) -> SipMessage:
        """Send OPTIONS to the server itself (the readiness probe)."""
        self._cseq += 1
        host, port = self.server
        target = ruri or f"sip:{host}:{port}"
        data, branch = self.build_request(
            "OPTIONS",
            target,
            from_uri=f"sip:probe@{host}",
            to_uri=target,
            call_id=f"{secrets.token_hex(8)}@{LOOPBACK}",
            cseq=self._cseq,
            from_tag=new_tag(),
            headers=[("Accept", "application/sdp")],
        )
        return self.transaction(data, branch, "OPTIONS", timeout=timeout)


@dataclass
class RegisterResult:
    """Every final response of one REGISTER flow (challenge round trips included)."""

    responses: list[SipMessage]
    call_id: str

    @property
    def final(self) -> SipMessage:
        return self.responses[-1]

    @property
    def ok(self) -> bool:
        return 200 <= self.final.status < 300

    @property
    def bindings(self) -> list[Binding]:
        return contacts_of(self.final) if self.ok else []

    def describe(self) -> str:
        return " -> ".join(f"{r.status} {r.reason}" for r in self.responses)


class Registrar:
    """REGISTER flows against one server, through one SipClient.

    ``domain`` is the host part of the AoR (the service's configured domain). The digest
    ``uri`` is the Request-URI (``sip:127.0.0.1:PORT``), as SIPp and baresip send it.
    """

    def __init__(self, client: SipClient, domain: str = LOOPBACK) -> None:
        self.client = client
        self.domain = domain
        self._cseq = 0

    @property
    def ruri(self) -> str:
        host, port = self.client.server
        return f"sip:{host}:{port}"

    def default_contact(self, user: str) -> str:
        c = self.client
        return f"<sip:{user}@{c.local_hostport};transport={c.transport}>"

    def register(
        self,
        user: str,
        password: str | None,
        *,
        contact: str | None = "",
        expires: int | None = 300,
        prefer: Sequence[str] = ("SHA-256", "MD5"),
        auth_user: str | None = None,
        max_rounds: int = 3,
        timeout: float | None = None,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> RegisterResult:
        """Run one REGISTER flow: send, answer 401/407 with digest, return all final responses.

        contact: ``""`` = this client's own address, None = no Contact (query bindings),
        anything else is sent verbatim (e.g. ``"<sip:1001@127.0.0.1:40000>"`` or ``"*"``).
        expires: value of the Expires header (None = no Expires header).
        password None: never answer a challenge (the flow stops at the first 401).
        A challenge is answered at most ``max_rounds`` times; a second 401 is only answered
        when it says ``stale=true``.
        """
        call_id = f"{secrets.token_hex(10)}@{LOOPBACK}"
        from_tag = new_tag()
        aor = f"sip:{user}@{self.domain}"
        headers: list[tuple[str, str]] = list(extra_headers)
        if contact is not None:
            headers.append(("Contact", contact or self.default_contact(user)))
        if expires is not None:
            headers.append(("Expires", str(expires)))
        responses: list[SipMessage] = []
        auth: tuple[str, str] | None = None
        for round_no in range(max_rounds + 1):
            self._cseq += 1
            hdrs = headers + ([auth] if auth else [])
            data, branch = self.client.build_request(
                "REGISTER",
                self.ruri,
                from_uri=aor,
                to_uri=aor,
                call_id=call_id,
                cseq=self._cseq,
                from_tag=from_tag,
                headers=hdrs,
            )
            resp = self.client.transaction(data, branch, "REGISTER", timeout=timeout)
            responses.append(resp)
            if resp.status not in (401, 407) or password is None or round_no == max_rounds:
                break
            challenges = challenges_of(resp)
            if not challenges:
                break
            chosen = choose_challenge(challenges, prefer)
            if auth is not None and not chosen.stale:
                break  # credentials were rejected: do not loop
            value = build_authorization(
                chosen,
                username=auth_user or user,
                password=password,
                method="REGISTER",
                uri=self.ruri,
            )
            auth = (chosen.answer_header, value)
        return RegisterResult(responses, call_id)

    def bindings(
        self,
        user: str,
        password: str,
        *,
        prefer: Sequence[str] = ("SHA-256", "MD5"),
        timeout: float | None = None,
    ) -> RegisterResult:
        """REGISTER without Contact: the registrar lists the current bindings (RFC 3261 §10.2.3)."""
        return self.register(
            user, password, contact=None, expires=None, prefer=prefer, timeout=timeout
        )


# --------------------------------------------------------------------------------------------
# crafted messages

_VIA_RE = re.compile(
    rb"^(?P<pre>(?:via|v)[ \t]*:[ \t]*SIP[ \t]*/[ \t]*[^/\s]+[ \t]*/[ \t]*)"
    rb"(?P<transport>[A-Za-z]+)(?P<sp>[ \t]+)(?P<sentby>[^;,\s]+)",
    re.IGNORECASE | re.MULTILINE,
)


def rewrite_via_sent_by(data: bytes, host: str, port: int) -> tuple[bytes, str]:
    """Point the first Via's sent-by at (host, port); everything else stays byte-identical.

    RFC 4475 messages carry Via headers naming hosts such as 192.0.2.15: a server answers
    to the packet's source address but the Via port (RFC 3261 §18.2.2), so the test must
    name its own socket there. Returns (message, Via transport in upper case).
    """
    m = _VIA_RE.search(data)
    if m is None:
        raise ValueError("message has no Via header to rewrite")
    new = data[: m.start("sentby")] + f"{host}:{port}".encode() + data[m.end("sentby") :]
    return new, m.group("transport").decode().upper()


# --------------------------------------------------------------------------------------------
# calls (INVITE as a UAC), for the call tests


def offer_sdp(rtp_port: int, session_id: int | None = None) -> bytes:
    """A minimal PCMU/PCMA audio offer on 127.0.0.1:``rtp_port``."""
    sid = session_id if session_id is not None else secrets.randbelow(1 << 31)
    return (
        "v=0\r\n"
        f"o=e2e {sid} 1 IN IP4 {LOOPBACK}\r\n"
        "s=-\r\n"
        f"c=IN IP4 {LOOPBACK}\r\n"
        "t=0 0\r\n"
        f"m=audio {rtp_port} RTP/AVP 0 8 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-15\r\n"
        "a=sendrecv\r\n"
    ).encode()


@dataclass
class CallResult:
    """Everything one INVITE flow got back; ``final`` is the last final response."""

    responses: list[SipMessage]
    call_id: str
    from_tag: str
    from_uri: str
    to_uri: str
    cseq: int
    to_header: str = ""  # To of the final response (with the callee's tag)
    remote_target: str = ""  # Contact of the 2xx

    @property
    def final(self) -> SipMessage:
        finals = [r for r in self.responses if r.status >= 200]
        return finals[-1] if finals else self.responses[-1]

    @property
    def provisionals(self) -> list[SipMessage]:
        return [r for r in self.responses if r.status < 200]

    @property
    def answered(self) -> bool:
        return 200 <= self.final.status < 300

    def describe(self) -> str:
        return " -> ".join(f"{r.status} {r.reason}" for r in self.responses)


class SipCaller:
    """Places calls through the service as one phone: INVITE, 407 digest, ACK, BYE.

    Why not SIPp: the identity tests need per-request control of From,
    P-Preferred-Identity and the digest user, and a structured answer to assert on (403
    vs 407 vs 486 vs 480). Non-2xx finals are ACKed in the INVITE's transaction (RFC 3261
    §17.1.1.3), a 2xx with a new transaction to its Contact; requests the service sends us
    (a BYE) are answered 200 and kept in ``client.stray``.
    """

    def __init__(self, client: SipClient, domain: str = LOOPBACK) -> None:
        self.client = client
        self.domain = domain

    def _ack(self, result: CallResult, resp: SipMessage, branch: str | None, ruri: str) -> None:
        data, _ = self.client.build_request(
            "ACK",
            ruri,
            from_uri=result.from_uri,
            to_uri=result.to_uri,
            call_id=result.call_id,
            cseq=result.cseq,
            from_tag=result.from_tag,
            branch=branch,
        )
        # the To of the response carries the callee's tag: use it verbatim
        data = re.sub(
            rb"^To: .*$",
            b"To: " + (resp.get("to") or "").encode(),
            data,
            count=1,
            flags=re.MULTILINE,
        )
        self.client.send_raw(data)

    def answer_request(self, msg: SipMessage) -> None:
        """Answer a request the service sent us (BYE, re-INVITE...) with 200, statelessly."""
        lines = ["SIP/2.0 200 OK"]
        for name in ("via", "from", "to", "call-id", "cseq"):
            for value in msg.get_all(name):
                lines.append(f"{name.title()}: {value}")
        lines.append("Content-Length: 0")
        self.client.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode())

    def invite(
        self,
        callee: str,
        *,
        user: str,
        password: str | None,
        auth_user: str | None = None,
        from_user: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        sdp: bytes | None = None,
        timeout: float = 15.0,
    ) -> CallResult:
        """INVITE ``sip:callee@domain`` as ``from_user`` (default ``user``); answer one 407.

        Returns when a final response arrived (after the 407 round) or raises SipTimeout.
        ``password=None`` never answers the challenge.
        """
        c = self.client
        ruri = f"sip:{callee}@{self.domain}"
        result = CallResult(
            responses=[],
            call_id=f"{secrets.token_hex(10)}@{LOOPBACK}",
            from_tag=new_tag(),
            from_uri=f"sip:{from_user or user}@{self.domain}",
            to_uri=ruri,
            cseq=0,
        )
        body = sdp if sdp is not None else offer_sdp(40000 + secrets.randbelow(10000) * 2)
        base = [
            *headers,
            ("Contact", f"<sip:{from_user or user}@{c.local_hostport};transport={c.transport}>"),
            ("Content-Type", "application/sdp"),
        ]
        auth: tuple[str, str] | None = None
        deadline = time.monotonic() + timeout
        for _round in range(2):
            result.cseq += 1
            data, branch = c.build_request(
                "INVITE",
                ruri,
                from_uri=result.from_uri,
                to_uri=result.to_uri,
                call_id=result.call_id,
                cseq=result.cseq,
                from_tag=result.from_tag,
                headers=base + ([auth] if auth else []),
                body=body,
            )
            final = self._invite_transaction(result, data, branch, deadline)
            if final.status in (401, 407) and auth is None and password is not None:
                chosen = choose_challenge(challenges_of(final), ("MD5",))
                value = build_authorization(
                    chosen,
                    username=auth_user or user,
                    password=password,
                    method="INVITE",
                    uri=ruri,
                )
                auth = (chosen.answer_header, value)
                continue
            break
        return result

    def _invite_transaction(
        self, result: CallResult, data: bytes, branch: str, deadline: float
    ) -> SipMessage:
        c = self.client
        c.send_raw(data)
        interval, next_send, provisional = 0.5, time.monotonic() + 0.5, False
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise SipTimeout(f"no final response to INVITE ({result.describe()})")
            wait = deadline - now
            if c.transport == "udp" and not provisional:
                wait = min(wait, max(0.0, next_send - now))
            msg = c.recv(wait)
            if msg is None:
                if c.transport == "udp" and not provisional and time.monotonic() >= next_send:
                    c.send_raw(data)
                    interval = min(interval * 2, 4.0)
                    next_send = time.monotonic() + interval
                continue
            if not msg.is_response:
                if msg.method != "ACK":
                    self.answer_request(msg)
                c.stray.append(msg)
                continue
            if f"branch={branch}" not in (msg.get("via") or "") or msg.method != "INVITE":
                c.stray.append(msg)
                continue
            result.responses.append(msg)
            if msg.status < 200:
                provisional = True
                continue
            result.to_header = msg.get("to") or ""
            if msg.status < 300:
                contacts = contacts_of(msg)
                result.remote_target = contacts[0].uri if contacts else result.to_uri
                self._ack(result, msg, None, result.remote_target)
            else:
                self._ack(result, msg, branch, result.to_uri)
            return msg

    def bye(self, result: CallResult, timeout: float = 5.0) -> SipMessage:
        """Hang up an answered call; returns the final response to the BYE."""
        c = self.client
        result.cseq += 1
        data, branch = c.build_request(
            "BYE",
            result.remote_target or result.to_uri,
            from_uri=result.from_uri,
            to_uri=result.to_uri,
            call_id=result.call_id,
            cseq=result.cseq,
            from_tag=result.from_tag,
        )
        data = re.sub(
            rb"^To: .*$", b"To: " + result.to_header.encode(), data, count=1, flags=re.MULTILINE
        )
        return c.transaction(data, branch, "BYE", timeout=timeout)

    def wait_request(self, method: str, timeout: float = 5.0) -> SipMessage:
        """Wait for a request from the service (e.g. the BYE when the callee hangs up),
        answer it 200 and return it; earlier unrelated messages go to ``client.stray``."""
        c = self.client
        for msg in c.stray:
            if not msg.is_response and msg.method == method:
                c.stray.remove(msg)
                return msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SipTimeout(f"no {method} from the service within {timeout:.1f}s")
            got = c.recv(left)
            if got is None:
                continue
            if got.is_response or got.method != method:
                c.stray.append(got)
                continue
            self.answer_request(got)
            return got
