"""SDP (RFC 8866, ex-4566) parsing and rewriting for a media relay. Sans-I/O.

The B2BUA must make every leg send RTP/RTCP to the relay, and must change nothing else: codecs,
fmtp, rtcp-fb, crypto and whatever a phone invents next pass through. So the model keeps every
line verbatim and parses only what a relay touches: o=, c= (session and media level), the port of
each m= line, the direction attribute and `a=rtcp:` (RFC 3605). `rewrite` replaces exactly those
and copies the rest, byte for byte (line ends are normalised to CRLF).

Choices:
- A held stream (`c=0.0.0.0` / `c=IN IP6 ::`, RFC 2543 hold) keeps its unspecified address: the
  far end then stops sending, as the holder asked. Rewriting it to the relay would undo the hold.
- ICE attributes (`a=candidate`, `a=ice-*`, ...) are removed: they name the phone's own addresses,
  and an ICE-capable peer would try to bypass the relay with them (the relay is no ICE agent).
- `o=` is ours, one `OriginState` per leg: same session id for the life of the leg, version + 1
  whenever the SDP we send on that leg changes, unchanged otherwise (RFC 3264 §8).
- Rejected streams (port 0) stay port 0; the B2BUA rejects a stream itself by passing port 0.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from media.errors import SdpError

#: `ipaddress.ip_address`, memoised: every offer and answer of a call names the same few
#: addresses, and parsing one costs ~10 µs. Invalid input is not cached (it raises each time).
_ip_address = functools.lru_cache(maxsize=1024)(ipaddress.ip_address)

MAX_SDP_SIZE = 65_536
"""Larger bodies are refused: a SIP message carrying one is already suspicious."""

MAX_MEDIA_SECTIONS = 16
"""Each relayed m= line costs a port pair per leg: cap what one offer can take from the range."""

_ICE_ATTRIBUTES = frozenset(
    {
        "candidate",
        "remote-candidates",
        "end-of-candidates",
        "ice-ufrag",
        "ice-pwd",
        "ice-options",
        "ice-lite",
        "ice-mismatch",
        "ice-pacing",
    }
)
_UNSPECIFIED = frozenset({"0.0.0.0", "::"})


class Direction(StrEnum):
    """The RFC 3264 direction attributes; a stream without one is sendrecv."""

    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"


_DIRECTIONS = {d.value: d for d in Direction}


@dataclass(frozen=True, slots=True, init=False)
class Connection:
    """A `c=` line (or the address part of `a=rtcp:`): `IN IP4|IP6 address[/ttl...]`."""

    addrtype: str
    address: str

    def __init__(self, addrtype: str, address: str) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "addrtype", addrtype)
        object.__setattr__(self, "address", address)

    @property
    def unspecified(self) -> bool:
        """True for 0.0.0.0 / ::, the RFC 2543 way of saying "do not send to me"."""
        return self.address in _UNSPECIFIED


@dataclass(frozen=True, slots=True, init=False)
class Origin:
    """The `o=` line of a parsed description, kept as text (session ids can exceed 64 bits)."""

    username: str
    session_id: str
    version: str
    addrtype: str
    address: str

    def __init__(
        self, username: str, session_id: str, version: str, addrtype: str, address: str
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "username", username)
        object.__setattr__(self, "session_id", session_id)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "addrtype", addrtype)
        object.__setattr__(self, "address", address)


@dataclass(slots=True, init=False)
class MediaSection:
    """One `m=` section: the parsed fields a relay needs plus every line of it, verbatim."""

    media: str
    port: int
    proto: str
    formats: list[str]
    connection: Connection | None
    direction: Direction | None
    rtcp_port: int | None
    rtcp_connection: Connection | None
    lines: list[str]

    def __init__(
        self,
        media: str,
        port: int,
        proto: str,
        formats: list[str],
        connection: Connection | None,
        direction: Direction | None,
        rtcp_port: int | None,
        rtcp_connection: Connection | None,
        lines: list[str],
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        self.media = media
        self.port = port
        self.proto = proto
        self.formats = formats
        self.connection = connection
        self.direction = direction
        self.rtcp_port = rtcp_port
        self.rtcp_connection = rtcp_connection
        self.lines = lines

    @property
    def rejected(self) -> bool:
        """Port 0: the stream is disabled (in an offer) or refused (in an answer)."""
        return self.port == 0


@dataclass(slots=True, init=False)
class SessionDescription:
    """A parsed SDP body. `lines` are the session-level lines, verbatim, `v=` first."""

    origin: Origin
    connection: Connection | None
    direction: Direction | None
    media: list[MediaSection]
    lines: list[str]

    def __init__(
        self,
        origin: Origin,
        connection: Connection | None,
        direction: Direction | None,
        media: list[MediaSection],
        lines: list[str],
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        self.origin = origin
        self.connection = connection
        self.direction = direction
        self.media = media
        self.lines = lines

    def connection_for(self, index: int) -> Connection | None:
        """The connection of m-line `index`: its own `c=` overrides the session's."""
        section = self.media[index]
        return section.connection or self.connection

    def direction_for(self, index: int) -> Direction:
        """The direction of m-line `index`: media-level, else session-level, else sendrecv."""
        return self.media[index].direction or self.direction or Direction.SENDRECV

    def is_held(self, index: int) -> bool:
        """True if m-line `index` asks not to receive: sendonly, inactive or c=0.0.0.0."""
        if self.direction_for(index) in (Direction.SENDONLY, Direction.INACTIVE):
            return True
        conn = self.connection_for(index)
        return conn is not None and conn.unspecified

    def rtp_address(self, index: int) -> tuple[str, int] | None:
        """Where m-line `index` wants its RTP, or None (rejected, held by 0.0.0.0, no IP literal).

        Only IP literals are returned: resolving a host name is not the fast path's business.
        """
        section = self.media[index]
        host = _literal(self.connection_for(index))
        if section.rejected or host is None:
            return None
        return host, section.port

    def rtcp_address(self, index: int) -> tuple[str, int] | None:
        """Where m-line `index` wants its RTCP: `a=rtcp:` if present (RFC 3605), else port + 1."""
        rtp = self.rtp_address(index)
        if rtp is None:
            return None
        section = self.media[index]
        if section.rtcp_port is None:
            return rtp[0], rtp[1] + 1
        host = _literal(section.rtcp_connection) if section.rtcp_connection else rtp[0]
        return None if host is None else (host, section.rtcp_port)


def is_hold(desc: SessionDescription) -> bool:
    """True if every active stream is held (sendonly, inactive or c=0.0.0.0).

    A description with no active stream at all is not a hold: it is a rejection.
    """
    active = [i for i, section in enumerate(desc.media) if not section.rejected]
    return bool(active) and all(desc.is_held(i) for i in active)


def _literal(conn: Connection | None) -> str | None:
    if conn is None or conn.unspecified:
        return None
    try:
        _ip_address(conn.address)
    except ValueError:
        return None
    return conn.address


# --- parsing ---------------------------------------------------------------------------------


def parse_sdp(data: bytes) -> SessionDescription:
    """Parse an SDP body; raise `SdpError` if it is not one.

    Lenient where phones are sloppy (LF line ends, blank lines, missing s=/t=), strict on what the
    relay depends on (v=0 first, a well-formed o=, c= and m=).
    """
    if len(data) > MAX_SDP_SIZE:
        raise SdpError(f"SDP body of {len(data)} bytes exceeds {MAX_SDP_SIZE}")
    lines = _split_lines(data)
    if not lines or lines[0] != "v=0":
        raise SdpError("SDP must start with v=0")
    starts = [i for i, line in enumerate(lines) if line.startswith("m=")]
    if len(starts) > MAX_MEDIA_SECTIONS:
        raise SdpError(f"{len(starts)} m= lines, at most {MAX_MEDIA_SECTIONS} are accepted")
    bounds = [*starts, len(lines)]
    session_lines = lines[: bounds[0]]
    media = [_parse_media(lines[bounds[i] : bounds[i + 1]]) for i in range(len(starts))]
    origin: Origin | None = None
    connection: Connection | None = None
    direction: Direction | None = None
    for line in session_lines:
        kind, value = line[0], line[2:]
        if kind == "o":
            origin = _parse_origin(value)
        elif kind == "c" and connection is None:
            connection = _parse_connection(value)
        elif kind == "a" and value in _DIRECTIONS:
            direction = _DIRECTIONS[value]
    if origin is None:
        raise SdpError("SDP without o= line")
    return SessionDescription(origin, connection, direction, media, session_lines)


def _split_lines(data: bytes) -> list[str]:
    # surrogateescape: any byte sequence survives decode + encode unchanged, so a line we do not
    # understand (or a non-UTF-8 s=) is copied back byte-exact.
    text = data.decode("utf-8", "surrogateescape")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    lines = [line for line in lines if line]
    for line in lines:
        if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
            raise SdpError(f"not an SDP line: {line[:40]!r}")
    return lines


def _parse_origin(value: str) -> Origin:
    parts = value.split()
    if len(parts) != 6 or parts[3] != "IN":
        raise SdpError(f"bad o= line: {value[:60]!r}")
    if not parts[1].isdigit() or not parts[2].isdigit():
        raise SdpError(f"bad o= session id or version: {value[:60]!r}")
    return Origin(parts[0], parts[1], parts[2], parts[4], parts[5])


def _parse_connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"bad c= line: {value[:60]!r}")
    return Connection(parts[1], parts[2].split("/", 1)[0])


def _parse_port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise SdpError(f"bad port {text[:10]!r}")
    return int(text)


def _parse_media(lines: list[str]) -> MediaSection:
    parts = lines[0][2:].split()
    if len(parts) < 4:
        raise SdpError(f"bad m= line: {lines[0][:60]!r}")
    port = _parse_port(parts[1].split("/", 1)[0])
    section = MediaSection(parts[0], port, parts[2], parts[3:], None, None, None, None, lines)
    for line in lines[1:]:
        kind, value = line[0], line[2:]
        if kind == "c" and section.connection is None:
            section.connection = _parse_connection(value)
        elif kind == "a" and value in _DIRECTIONS:
            section.direction = _DIRECTIONS[value]
        elif kind == "a" and value.startswith("rtcp:"):
            _parse_rtcp(section, value[5:])
    return section


def _parse_rtcp(section: MediaSection, value: str) -> None:
    parts = value.split()
    if len(parts) not in (1, 4):
        raise SdpError(f"bad a=rtcp: {value[:60]!r}")
    section.rtcp_port = _parse_port(parts[0])
    if len(parts) == 4:
        section.rtcp_connection = _parse_connection(" ".join(parts[1:]))


# --- rewriting -------------------------------------------------------------------------------


def _new_session_id() -> int:
    return secrets.randbits(62)


@dataclass(slots=True)
class OriginState:
    """Our `o=` line towards one leg, kept for the life of the dialog (RFC 3264 §8).

    `version` is the version of the last SDP sent on the leg (0: none yet). It is bumped only if
    the SDP differs from the previous one, so a session refresh re-sends an identical body.
    """

    username: str = "-"
    session_id: int = field(default_factory=_new_session_id)
    version: int = 0
    _last_body: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def stamp(self, body: bytes) -> int:
        """The version for `body` (the SDP without its o= line): +1 if it changed."""
        if body != self._last_body:
            self.version += 1
            self._last_body = body
        return self.version


def rewrite(
    desc: SessionDescription, address: str, ports: Sequence[int], origin: OriginState
) -> bytes:
    """Render `desc` with every stream pointed at the relay at `address`.

    `ports[i]` is the relay's RTP port for m-line i (RTCP is port + 1); 0 rejects the stream.
    A stream `desc` already rejected stays at port 0.
    """
    if len(ports) != len(desc.media):
        raise ValueError(f"{len(ports)} ports for {len(desc.media)} m= lines")
    relay = _Relay(address, _addrtype(address))
    out: list[str] = []
    origin_at = -1
    for line in desc.lines:
        if line.startswith("o="):
            origin_at = len(out)
        elif not _is_ice(line):
            out.append(_rewrite_connection(line, relay))
    for i, section in enumerate(desc.media):
        port = 0 if section.rejected else ports[i]
        needs_c = port != 0 and desc.connection is None and section.connection is None
        out.extend(_rewrite_media(section, port, relay, needs_c))
    version = origin.stamp(_encode(out))
    o_line = f"o={origin.username} {origin.session_id} {version} IN {relay.addrtype} {address}"
    out.insert(origin_at, o_line)
    return _encode(out)


class _Relay(NamedTuple):
    address: str
    addrtype: str  # IP4 | IP6

    @property
    def c_line(self) -> str:
        return f"c=IN {self.addrtype} {self.address}"


def _addrtype(address: str) -> str:
    try:
        ip = _ip_address(address)
    except ValueError:
        raise ValueError(f"relay address must be an IP literal, not {address!r}") from None
    return "IP4" if ip.version == 4 else "IP6"


def _is_ice(line: str) -> bool:
    return line.startswith("a=") and line[2:].split(":", 1)[0] in _ICE_ATTRIBUTES


def _rewrite_connection(line: str, relay: _Relay) -> str:
    if not line.startswith("c="):
        return line
    return line if _parse_connection(line[2:]).unspecified else relay.c_line


def _rewrite_media(section: MediaSection, port: int, relay: _Relay, needs_c: bool) -> list[str]:
    out = [f"m={section.media} {port} {section.proto} {' '.join(section.formats)}"]
    for line in section.lines[1:]:
        if _is_ice(line):
            continue
        if line.startswith("a=rtcp:"):
            if port:  # a rejected stream has no RTCP to point anywhere
                out.append(_rtcp_line(section, port + 1, relay))
            continue
        out.append(_rewrite_connection(line, relay))
    if needs_c:  # c= belongs after m= and i= (RFC 8866 §5)
        at = 2 if len(out) > 1 and out[1].startswith("i=") else 1
        out.insert(at, relay.c_line)
    return out


def _rtcp_line(section: MediaSection, port: int, relay: _Relay) -> str:
    if section.rtcp_connection is None:
        return f"a=rtcp:{port}"
    return f"a=rtcp:{port} IN {relay.addrtype} {relay.address}"


def _encode(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
