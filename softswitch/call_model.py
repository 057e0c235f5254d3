"""The call model of the B2BUA: calls, their legs, and what the call modules share.

Plain data and pure helpers, no signalling: `calls` (set-up, forking, relaying), `takeover`
(pickup, retrieve), `transfer` (REFER) and `late_offer` all work on these objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

from media.errors import SdpError
from media.ptmap import PtMaps
from media.sdp import Direction as SdpDirection
from media.sdp import OriginState, SessionDescription, parse_sdp

from .lines import Direction
from .sip.dialog import Dialog, new_tag
from .sip.headers import entry, render_entries
from .sip.message import Request
from .sip.syntax import ParseCache
from .sip.transaction import Address, ClientTransaction, ServerTransaction
from .sip.uri import SipUri

FAILURE_REASONS = {
    480: "Temporarily Unavailable",
    486: "Busy Here",
    487: "Request Terminated",
    603: "Decline",
    408: "Request Timeout",
}
COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
RETRIEVED_ELSEWHERE = 'SIP;cause=200;text="Call retrieved elsewhere"'
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, REFER, NOTIFY, SUBSCRIBE"
#: Headers carried from one leg's request or response to the other's.
RELAYED_HEADERS = (
    "content-type",
    "reason",
    "event",
    "subscription-state",
    "info-package",
    "session-expires",
    "min-se",
    "allow-events",
    "call-info",
)


class Endpoint(Protocol):
    port: int

    def set_remote(
        self, rtp: tuple[str, int] | None, rtcp: tuple[str, int] | None = None
    ) -> None: ...


class Media(Protocol):
    """What the B2BUA needs of the media layer (media.relay.MediaManager provides it)."""

    address: str

    async def allocate_endpoint(self) -> Any: ...

    def take_ready(self, count: int) -> list[Any] | None:
        """`count` endpoints at once if that many are ready (bound, pooled), else None and
        nothing taken: the caller then awaits `allocate_endpoint`."""
        ...

    def release(self, endpoint: Any) -> None: ...

    def bridge(self, a: Any, b: Any, *, pt_maps: PtMaps | None = None) -> Any:
        """Relay `a` and `b`; the result has `set_pt_maps(PtMaps | None)` and
        `stats() -> media.bridge.BridgeStats` (media.RelayBridge)."""
        ...

    def unbridge(self, bridge: Any) -> None: ...


class LegState(Enum):
    # Identity hashing (members are singletons) runs in C; Enum's own __hash__ is a
    # Python call on every dict and set lookup of the message path.
    __hash__ = object.__hash__

    CALLING = "calling"  # INVITE sent / received, no answer yet
    EARLY = "early"  # a provisional with a tag
    CONFIRMED = "confirmed"
    ENDED = "ended"


@dataclass(eq=False, slots=True, init=False)
class Leg:
    """One side of a call: a dialog towards one phone, where to send to, and its media."""

    call: Call
    party: str | None  # the extension this leg reaches (None: an outside/trusted peer)
    dest: Address  # where requests for this leg go (the phone's NAT-safe source address)
    invite: ServerTransaction | ClientTransaction | None
    dialog: Dialog | None
    state: LegState
    origin: OriginState
    provisional: bool  # a 1xx arrived (a CANCEL may be sent)
    cancel_pending: bool
    cancel_reason: str | None
    local_tag: str
    media: Any  # the relay endpoint facing this leg's phone
    keys: list[tuple[str, str]]  # its entries in B2BUA._dialogs
    sdp: SessionDescription | None  # what this leg's phone last sent
    sent: SessionDescription | None  # what we last sent it (its payload type numbers)
    identity: str  # who this leg's phone presents (extension or number)
    name: str | None

    def __init__(
        self,
        call: Call,
        party: str | None,
        dest: Address,
        invite: ServerTransaction | ClientTransaction | None,
        dialog: Dialog | None = None,
        state: LegState = LegState.CALLING,
        origin: OriginState | None = None,
        *,
        local_tag: str | None = None,
        media: Any = None,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18). The other fields
        # start empty; nothing passes them.
        self.call = call
        self.party = party
        self.dest = dest
        self.invite = invite
        self.dialog = dialog
        self.state = state
        self.origin = OriginState() if origin is None else origin
        self.provisional = False
        self.cancel_pending = False
        self.cancel_reason = None
        self.local_tag = new_tag() if local_tag is None else local_tag
        self.media = media
        self.keys = []
        self.sdp = None
        self.sent = None
        self.identity = ""
        self.name = None


@dataclass(eq=False, slots=True, init=False)
class Pending:
    """An in-dialog request relayed from one leg, waiting for the other leg's final answer."""

    server: ServerTransaction | None  # None: our own re-INVITE (transfer), just ACK its 2xx
    from_leg: Leg
    #: (old leg, new leg) when the request re-targets the call to another phone (retrieve)
    takeover: tuple[Leg, Leg] | None = None

    def __init__(
        self,
        server: ServerTransaction | None,
        from_leg: Leg,
        takeover: tuple[Leg, Leg] | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        self.server = server
        self.from_leg = from_leg
        self.takeover = takeover


@dataclass(eq=False, slots=True, init=False)
class Transfer:
    """A blind transfer in progress: `far` rings a new target on behalf of `transferor`."""

    transferor: Leg  # the phone that sent REFER; NOTIFYs go in its dialog
    old: Call  # the call the transferor and the far end were on
    old_media: tuple[Any, Any, Any]  # old call's (a_media, b_media, bridge), restored on failure

    def __init__(self, transferor: Leg, old: Call, old_media: tuple[Any, Any, Any]) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        self.transferor = transferor
        self.old = old
        self.old_media = old_media


@dataclass(eq=False, slots=True, init=False)
class AwaitedAck:
    """A 2xx that carried an offer (late offer, RFC 3264 via RFC 3261 §13.2.1): the offerer's
    phone gets its ACK only once the answerer's ACK brings the answer, since that ACK must
    carry it (§13.2.2.4). Kept after the ACK went out, to repeat it to a retransmitted 2xx."""

    offerer: Leg  # the leg whose phone sent the offer in its 2xx and waits for our ACK
    answerer: Leg  # the leg whose phone got the offer in our 2xx and answers in its ACK
    cseq: int  # CSeq number of the INVITE the offerer answered (our ACK's)
    answer_cseq: int  # CSeq number of the answerer's INVITE (its ACK's)
    server: ServerTransaction  # the answerer's INVITE, whose 2xx we retransmit
    ack: Request | None = None  # our ACK to the offerer, once sent

    def __init__(
        self,
        offerer: Leg,
        answerer: Leg,
        cseq: int,
        answer_cseq: int,
        server: ServerTransaction,
        ack: Request | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        self.offerer = offerer
        self.answerer = answerer
        self.cseq = cseq
        self.answer_cseq = answer_cseq
        self.server = server
        self.ack = ack


@dataclass(frozen=True, slots=True, init=False)
class LineRef:
    """A line this call is on, seen from that line: its direction and the remote end.

    `party` is the member using the line; None means "whoever answers" (an inbound call).
    """

    line: str
    direction: Direction
    party: str | None
    remote: str
    remote_name: str | None = None

    def __init__(
        self,
        line: str,
        direction: Direction,
        party: str | None,
        remote: str,
        remote_name: str | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "line", line)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "party", party)
        object.__setattr__(self, "remote", remote)
        object.__setattr__(self, "remote_name", remote_name)


@dataclass(eq=False, init=False)
class Call:
    """One B2BUA call."""

    id: str
    a: Leg | None = None  # the caller's leg (set right after construction)
    forks: list[Leg] = field(default_factory=list)
    b: Leg | None = None  # the answering fork
    lines: list[LineRef] = field(default_factory=list)  # the lines this call is shown on
    started_at: float = field(default_factory=time.time)
    offer: SessionDescription | None = None  # the caller's SDP offer
    a_media: Any = None
    b_media: Any = None
    bridge: Any = None
    ended: bool = False
    b_call_id: str = ""
    b_from: str = ""  # From header value (without tag) towards the callees
    b_from_tag: str = field(default_factory=new_tag)
    extra_headers: list[tuple[str, str]] = field(default_factory=list)  # e.g. Referred-By
    bye_from: Leg | None = None  # the leg whose phone hung up
    ids: set[str] = field(default_factory=set)  # its entries in B2BUA._call_ids
    fork_origin: OriginState = field(default_factory=OriginState)  # o= towards every fork
    fork_body: bytes | None = None  # the offer every fork gets, rendered once
    fork_template: ForkTemplate | None = None  # the header entries every fork shares
    transfer: Transfer | None = None  # set while this call rings a blind-transfer target
    held_by: str | None = None  # the party whose phone holds the call
    private: bool = False  # held privately: only `held_by` may retrieve it
    failures: list[int] = field(default_factory=list)
    outstanding: int = 0  # forks not yet finished (including delayed ones not yet sent)
    late: bool = False  # the caller's INVITE had no SDP: the offer comes in the callee's 2xx
    awaited: AwaitedAck | None = None  # the last offer made in a 2xx, answered in an ACK

    def __init__(
        self,
        id: str,
        *,
        lines: list[LineRef] | None = None,
        offer: SessionDescription | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18); the B2BUA sets
        # everything else after construction.
        self.id = id
        self.a = None
        self.forks = []
        self.b = None
        self.lines = lines if lines is not None else []
        self.started_at = time.time()
        self.offer = offer
        self.a_media = None
        self.b_media = None
        self.bridge = None
        self.ended = False
        self.b_call_id = ""
        self.b_from = ""
        self.b_from_tag = new_tag()
        self.extra_headers = []
        self.bye_from = None
        self.ids = set()
        self.fork_origin = OriginState()
        self.fork_body = None
        self.fork_template = None
        self.transfer = None
        self.held_by = None
        self.private = False
        self.failures = []
        self.outstanding = 0
        self.late = False
        self.awaited = None


Entry = tuple[str, str, str]


@dataclass(frozen=True, slots=True, init=False)
class ForkTemplate:
    """The header entries all forks of a call share, built once per call: a fork to 16 phones
    then costs 16 list concatenations instead of 16 x 13 `Headers.add` calls. Each group is
    also rendered once (`*_text`, checked for CR/LF), so that a fork's wire form is a handful
    of concatenations around its own Via, To and Contact (`Headers.set_wire`)."""

    head: tuple[Entry, ...]  # Max-Forwards, From (before To)
    middle: tuple[Entry, ...]  # Call-ID, CSeq (between To and Contact)
    common: tuple[Entry, ...]  # P-Asserted-Identity, the call's extra headers
    tail: tuple[Entry, ...]  # Allow, Content-Type, Content-Length
    head_text: str
    middle_text: str
    common_text: str
    tail_text: str

    def __init__(
        self,
        head: tuple[Entry, ...],
        middle: tuple[Entry, ...],
        common: tuple[Entry, ...],
        tail: tuple[Entry, ...],
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "middle", middle)
        object.__setattr__(self, "common", common)
        object.__setattr__(self, "tail", tail)
        object.__setattr__(self, "head_text", render_entries(head))
        object.__setattr__(self, "middle_text", render_entries(middle))
        object.__setattr__(self, "common_text", render_entries(common))
        object.__setattr__(self, "tail_text", render_entries(tail))


@dataclass(frozen=True, slots=True, init=False)
class ForkTarget:
    """One contact to ring."""

    party: str
    uri: str  # Request-URI: the registered contact
    dest: Address
    delay: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()  # per-target extras (History-Info, To display)
    to: str = ""  # To header value for this fork
    # `headers` as `Headers` entries and rendered (checked for CR/LF), once per target: call
    # set-up keeps the targets it built, so a phone's fields are not rebuilt on every call.
    entries: tuple[Entry, ...] = ()
    headers_text: str = ""

    def __init__(
        self,
        party: str,
        uri: str,
        dest: Address,
        delay: float = 0.0,
        headers: tuple[tuple[str, str], ...] = (),
        to: str = "",
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "party", party)
        object.__setattr__(self, "uri", uri)
        object.__setattr__(self, "dest", dest)
        object.__setattr__(self, "delay", delay)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "to", to)
        entries = tuple([entry(name, value) for name, value in headers])
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "headers_text", render_entries(entries))


def sdp_or_none(body: bytes) -> SessionDescription | None:
    """`body` as SDP; None if there is none or it does not parse (never relayed, D7)."""
    if not body:
        return None
    try:
        return parse_sdp(body)
    except SdpError:
        return None


def invite_of(leg: Leg) -> Request:
    assert leg.invite is not None
    return leg.invite.request


def sendrecv(desc: SessionDescription) -> SessionDescription:
    """`desc` with every stream sendrecv: a retrieved call must not stay on hold."""
    media = [
        replace(m, direction=None, lines=[ln for ln in m.lines if ln[2:] not in _DIRS])
        for m in desc.media
    ]
    session = [ln for ln in desc.lines if ln[2:] not in _DIRS]
    return replace(desc, media=media, direction=None, lines=session)


def contact_dest(source: str) -> Address:
    """A binding's stored source ("udp:127.0.0.1:5090", "udp:::1:5090") as an Address."""
    return _DESTS(source)


def _parse_dest(source: str) -> Address:
    transport, _, rest = source.partition(":")
    host, _, port = rest.rpartition(":")
    return Address(transport, host, int(port))


# A fork to 16 phones reads 16 binding sources per call, the same ones all day, and building
# a NamedTuple runs its interpreted __new__ (~2,400 instructions).
_DESTS: ParseCache[str, Address] = ParseCache(_parse_dest, 4096)


def sip_user(uri: object) -> str | None:
    return uri.user_unescaped if isinstance(uri, SipUri) else None


_DIRS = {d.value for d in SdpDirection}
