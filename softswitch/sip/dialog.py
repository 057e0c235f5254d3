"""Dialog state (RFC 3261 §12): what one side of a call needs to send in-dialog requests.

A B2BUA keeps two dialogs per bridged call, one towards each phone. Each records the Call-ID,
both tags, the remote target (Contact), the route set (Record-Route) and the local CSeq, and
builds BYE, re-INVITE, UPDATE and the ACK for a 2xx from them. Sans-I/O: it returns Request
objects; the caller hands them to the transaction layer with the destination it resolves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .headers import Headers, NameAddr
from .message import Request, Response
from .randoms import token_hex
from .uri import SipUri, Uri, parse_uri


def new_tag() -> str:
    return token_hex(6)


def new_call_id(host: str) -> str:
    return f"{token_hex(10)}@{host}"


@dataclass(slots=True, init=False)
class Dialog:
    """One dialog, from our side (we are `local`)."""

    call_id: str
    local_tag: str
    remote_tag: str | None
    local_uri: str  # our From (UAC) / To (UAS) header value without tag
    remote_uri: str
    remote_target: Uri
    route_set: list[str]
    local_cseq: int
    remote_cseq: int | None
    secure: bool

    def __init__(
        self,
        call_id: str,
        local_tag: str,
        remote_tag: str | None,
        local_uri: str,
        remote_uri: str,
        remote_target: Uri,
        route_set: list[str] | None = None,
        local_cseq: int = 1,
        remote_cseq: int | None = None,
        secure: bool = False,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_uri = local_uri
        self.remote_uri = remote_uri
        self.remote_target = remote_target
        self.route_set = [] if route_set is None else route_set
        self.local_cseq = local_cseq
        self.remote_cseq = remote_cseq
        self.secure = secure

    @classmethod
    def as_uas(cls, request: Request, response: Response, local_tag: str) -> Dialog:
        """The dialog a UAS forms by answering `request` (§12.1.1)."""
        contact = request.contacts[0].uri if request.contacts else request.from_.uri
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=request.from_.tag,
            local_uri=_without_tag(request.headers.get("to") or ""),
            remote_uri=_without_tag(request.headers.get("from") or ""),
            remote_target=contact,
            route_set=request.headers.get_all("record-route"),
            local_cseq=1,
            remote_cseq=request.cseq.seq,
        )

    @classmethod
    def as_uac(cls, request: Request, response: Response) -> Dialog:
        """The dialog a UAC forms from a 1xx-with-tag or 2xx to `request` (§12.1.2).

        The route set is the response's Record-Route in reverse order.
        """
        contact = response.contacts[0].uri if response.contacts else request.uri
        return cls(
            call_id=request.call_id,
            local_tag=request.from_.tag or "",
            remote_tag=response.to.tag,
            local_uri=_without_tag(request.headers.get("from") or ""),
            remote_uri=_without_tag(request.headers.get("to") or ""),
            remote_target=contact,
            route_set=list(reversed(response.headers.get_all("record-route"))),
            local_cseq=request.cseq.seq,
        )

    def update_target(self, msg: Request | Response) -> None:
        """A target refresh (re-INVITE, UPDATE or their 2xx) may move the remote Contact."""
        if msg.contacts:
            self.remote_target = msg.contacts[0].uri

    def accept_remote_cseq(self, request: Request) -> bool:
        """§12.2.2: a lower CSeq than the last one is out of order (answer 500)."""
        seq = request.cseq.seq
        if self.remote_cseq is not None and seq < self.remote_cseq and request.method != "ACK":
            return False
        if request.method not in ("ACK", "CANCEL"):
            self.remote_cseq = seq
        return True

    def new_request(
        self,
        method: str,
        via: str,
        contact: str | None = None,
        extra: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        cseq: int | None = None,
    ) -> Request:
        """An in-dialog request; ACK and CANCEL reuse a CSeq number, others take the next."""
        if cseq is None:
            self.local_cseq += 1
            cseq = self.local_cseq
        uri, routes = self._request_target()
        headers = Headers()
        headers.add("Via", via)
        headers.add("Max-Forwards", "70")
        headers.add("From", f"{self.local_uri};tag={self.local_tag}")
        to = self.remote_uri + (f";tag={self.remote_tag}" if self.remote_tag else "")
        headers.add("To", to)
        headers.add("Call-ID", self.call_id)
        headers.add("CSeq", f"{cseq} {method}")
        for route in routes:
            headers.add("Route", route)
        if contact is not None:
            headers.add("Contact", contact)
        for name, value in extra or []:
            headers.add(name, value)
        return Request(method, uri, headers, body)

    def _request_target(self) -> tuple[Uri, list[str]]:
        """Loose routing (§12.2.1.1): the remote target, unless the first route is strict."""
        if not self.route_set:
            return self.remote_target, []
        first = parse_uri(_strip_brackets(self.route_set[0]))
        if isinstance(first, SipUri) and not first.has_param("lr"):
            return first, [*self.route_set[1:], f"<{self.remote_target}>"]
        return self.remote_target, list(self.route_set)


@functools.lru_cache(maxsize=1024)
def _without_tag(value: str) -> str:
    """A From/To value without its tag, re-serialised. Cached: both dialogs of a call and
    every in-dialog request see the same few values, and re-formatting costs ~10 µs."""
    from .headers import parse_name_addr

    addr = parse_name_addr(value)
    params = tuple((k, v) for k, v in addr.params if k.lower() != "tag")
    return str(NameAddr(addr.uri, addr.display, params))


def _strip_brackets(route: str) -> str:
    route = route.strip()
    if route.startswith("<"):
        return route[1 : route.index(">")]
    for i, c in enumerate(route):
        if c == "<":
            return route[i + 1 : route.index(">", i)]
    return route.split(";")[0]
