"""The transaction layer of a service: matching, the state machines' actions, and timers.

Pull-style and sans-I/O like aioquic: the transport calls `receive(msg, source, now)`, the TU
calls `send_request`/`send_response`, and both drain `datagrams_to_send()` and `next_event()`;
whoever owns the event loop sleeps until `get_timer()` and then calls `handle_timer(now)`.
Nothing here reads a clock or logs: events carry everything the TU wants to log.

Matching is dict-based and O(1) (§17.1.3, §17.2.3), and a transaction leaves its table the
moment it reaches Terminated, so at 5,000 REGISTER/s the memory held is what Timer J requires.
Requests are answered where they came from (RFC 3581 behaviour always): the source Address of a
request is the peer of its server transaction, and `received`/`rport` are stamped on its top Via.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import ip_address
from random import Random
from typing import NamedTuple, TypeAlias

from .errors import LocalProtocolError
from .headers import Via
from .message import Message, Request, Response, SipMessage
from .timers import RETRANSMIT_TIMERS, Timer, TimerHeap, TimerOwner, TimerSettings
from .transaction import (
    Action,
    Address,
    ClientTransaction,
    Input,
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    ServerTransaction,
    State,
    Transaction,
    TransitionInput,
    build_ack,
    client_key,
    is_rfc3261_branch,
    new_branch,
    response_input,
    server_key,
)

# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False)
class RequestReceived:
    """A new request, CANCEL included (see `TransactionLayer.find_invite_for_cancel`)."""

    txn: ServerTransaction
    request: Request
    source: Address

    def __init__(self, txn: ServerTransaction, request: Request, source: Address) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "txn", txn)
        object.__setattr__(self, "request", request)
        object.__setattr__(self, "source", source)


@dataclass(frozen=True, slots=True, init=False)
class AckReceived:
    """An ACK for a 2xx (or one the transaction layer could not place): the dialog's business."""

    request: Request
    source: Address

    def __init__(self, request: Request, source: Address) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "request", request)
        object.__setattr__(self, "source", source)


@dataclass(frozen=True, slots=True, init=False)
class ResponseReceived:
    txn: ClientTransaction
    response: Response

    def __init__(self, txn: ClientTransaction, response: Response) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "txn", txn)
        object.__setattr__(self, "response", response)


@dataclass(frozen=True, slots=True, init=False)
class StrayResponse:
    """A response matching no client transaction (a late 2xx retransmission, or garbage)."""

    response: Response
    source: Address

    def __init__(self, response: Response, source: Address) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "response", response)
        object.__setattr__(self, "source", source)


@dataclass(frozen=True, slots=True, init=False)
class TransactionTimeout:
    """Timer B, F or H fired: the peer never answered (or never ACKed our non-2xx)."""

    txn: Transaction
    timer: Timer

    def __init__(self, txn: Transaction, timer: Timer) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "txn", txn)
        object.__setattr__(self, "timer", timer)


@dataclass(frozen=True, slots=True, init=False)  # the parent's compiled __init__, not a new one
class AckTimeout(TransactionTimeout):
    """No ACK for a 2xx sent with `retransmit_2xx=True` within 64*T1 (§13.3.1.4: send BYE)."""


@dataclass(frozen=True, slots=True, init=False)
class TransportError:
    """The transport failed to deliver for `txn` (see `TransactionLayer.transport_error`)."""

    txn: Transaction

    def __init__(self, txn: Transaction) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "txn", txn)


@dataclass(frozen=True, slots=True, init=False)
class TransactionTerminated:
    """The layer has forgotten `txn`; the TU may drop its references too.

    `txn.method`, `txn.key` and `txn.peer` remain readable; `txn.request` of a non-INVITE server
    transaction does not (it is released with the final response).
    """

    txn: Transaction

    def __init__(self, txn: Transaction) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "txn", txn)


Event: TypeAlias = (
    RequestReceived
    | AckReceived
    | ResponseReceived
    | StrayResponse
    | TransactionTimeout
    | TransportError
    | TransactionTerminated
)


class LayerStats(NamedTuple):
    """Sizes of the layer's tables, for metrics and leak tests."""

    clients: int
    servers: int
    retransmitting_2xx: int
    heap_entries: int


class _Resend2xx(TimerOwner):
    """The §13.3.1.4 2xx retransmission the TU may delegate to the layer.

    Kept apart from the server transaction, whose RFC 6026 Timer L may end it before the ACK
    wait does, and keyed like the dialog's ACK (Call-ID, CSeq number, To tag): the ACK for a 2xx
    is a new transaction with a new branch and never matches the INVITE's.
    """

    __slots__ = ("interval", "key", "txn", "wire")

    def __init__(
        self, txn: ServerTransaction, key: tuple[str, int, str | None], wire: bytes, interval: float
    ) -> None:
        super().__init__()
        self.txn = txn
        self.key = key
        self.wire = wire
        self.interval = interval


class _Context(NamedTuple):
    """What a transition's actions may need besides the transaction itself."""

    inp: TransitionInput
    now: float
    msg: Message | None
    source: Address | None


_Handler: TypeAlias = Callable[["TransactionLayer", Transaction, _Context], None]


class TransactionLayer:
    """All client and server transactions of one service, keyed for O(1) matching."""

    def __init__(
        self,
        settings: TimerSettings | None = None,
        *,
        send_100_trying: bool = True,
        rng: Random | None = None,
    ) -> None:
        """`send_100_trying`: answer each new INVITE with 100 at once (§17.2.1).

        The RFC allows skipping it only if the TU answers within 200 ms, which a B2BUA waiting
        for its outgoing leg cannot promise; so the TU should not send its own 100.
        """
        self.settings = settings or TimerSettings()
        self.send_100_trying = send_100_trying
        self._rng = rng
        self._clients: dict[tuple[object, ...], ClientTransaction] = {}
        self._servers: dict[tuple[object, ...], ServerTransaction] = {}
        self._pending_2xx: dict[tuple[str, int, str | None], _Resend2xx] = {}
        self._heap = TimerHeap()
        self._out: list[tuple[bytes, Address]] = []
        self._events: deque[Event] = deque()

    # --- I/O side -----------------------------------------------------------------------

    def receive(self, msg: SipMessage, source: Address, now: float) -> None:
        """Feed one parsed message that arrived from `source`."""
        if isinstance(msg, Response):
            self._receive_response(msg, source, now)
        elif msg.method == "ACK":
            self._receive_ack(msg, source, now)
        else:
            self._receive_request(msg, source, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Drain the queued datagrams, oldest first."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        """Pop the oldest event, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest pending deadline: call `handle_timer` at that time."""
        return self._heap.earliest()

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at `now`, earliest first."""
        while (due := self._heap.pop_due(now)) is not None:
            owner, timer = due
            if isinstance(owner, Transaction):
                self._apply(owner, timer, now)
            elif isinstance(owner, _Resend2xx):
                self._fire_2xx(owner, timer, now)

    # --- TU side ------------------------------------------------------------------------

    def new_branch(self) -> str:
        """A fresh RFC 3261 branch for the top Via of a request we are about to send."""
        return new_branch(self._rng)

    def send_request(self, req: Request, dest: Address, now: float) -> ClientTransaction:
        """Start a client transaction for `req` (whose top Via has a fresh branch) to `dest`."""
        if req.method == "ACK":
            raise LocalProtocolError("an ACK is not a transaction: use send_stateless")
        branch = req.via.branch
        if branch is None or not is_rfc3261_branch(branch):
            raise LocalProtocolError(f"top Via needs an RFC 3261 branch, got {branch!r}")
        key = client_key(branch, req.cseq.method)
        if key in self._clients:
            raise LocalProtocolError(f"a client transaction with branch {branch} exists")
        cls = InviteClientTransaction if req.method == "INVITE" else NonInviteClientTransaction
        txn = cls(req, dest, key)
        txn._wire = req.to_bytes()
        self._clients[key] = txn
        self._out.append((txn._wire, dest))
        for timer in cls.INITIAL_TIMERS:
            self._start(txn, timer, now)
        return txn

    def send_response(
        self, txn: ServerTransaction, resp: Response, now: float, *, retransmit_2xx: bool = False
    ) -> bool:
        """Send `resp` on `txn`; False if the RFC says to discard it (a second final response).

        `retransmit_2xx` (INVITE 2xx only) makes the layer do the UAS core's §13.3.1.4 job:
        resend on T1 doubling to T2 until an ACK with the same Call-ID, CSeq number and To tag
        arrives, or report `AckTimeout` after 64*T1.
        """
        if not isinstance(txn, ServerTransaction):
            raise LocalProtocolError(f"responses are sent on server transactions, not {txn!r}")
        is_2xx = 200 <= resp.status < 300
        if retransmit_2xx and not (isinstance(txn, InviteServerTransaction) and is_2xx):
            raise LocalProtocolError("retransmit_2xx applies to 2xx responses to INVITE only")
        if not self._apply(txn, response_input(resp.status), now, resp):
            return False
        if retransmit_2xx:
            self._start_2xx(txn, resp, now)
        return True

    def send_stateless(self, msg: SipMessage, dest: Address) -> None:
        """Queue a message outside any transaction: the ACK for a 2xx, a stray response."""
        self._out.append((msg.to_bytes(), dest))

    def transport_error(self, txn: Transaction, now: float) -> None:
        """The transport could not deliver for `txn` (e.g. a TCP connect failed)."""
        self._apply(txn, Input.TRANSPORT_ERROR, now)

    def has_server(self, req: Request) -> bool:
        """Whether `req` repeats a request we have a server transaction for (§17.2.3)."""
        return server_key(req) in self._servers

    def find_invite_for_cancel(self, cancel: Request) -> ServerTransaction | None:
        """The INVITE server transaction a received CANCEL targets (§9.2), in whatever state.

        The TU answers the CANCEL 200 (or 481 when this is None) and, if the INVITE is still
        in Proceeding, answers the INVITE 487.
        """
        txn = self._servers.get(server_key(cancel, method="INVITE"))
        return txn if isinstance(txn, InviteServerTransaction) else None

    def stop_2xx_retransmission(self, txn: ServerTransaction) -> None:
        """Stop the `retransmit_2xx` of an INVITE early (the dialog got a BYE before the ACK)."""
        key = (txn.request.call_id, txn.request.cseq.seq, txn.to_tag)
        self._drop_2xx(key)

    def stats(self) -> LayerStats:
        """Table sizes: cheap enough to export as gauges on every scrape."""
        return LayerStats(
            len(self._clients), len(self._servers), len(self._pending_2xx), len(self._heap)
        )

    # --- matching -----------------------------------------------------------------------

    def _receive_response(self, resp: Response, source: Address, now: float) -> None:
        branch = resp.via.branch
        txn = self._clients.get(client_key(branch, resp.cseq.method)) if branch else None
        if txn is None:
            self._events.append(StrayResponse(resp, source))
        else:
            self._apply(txn, response_input(resp.status), now, resp, source)

    def _receive_request(self, req: Request, source: Address, now: float) -> None:
        key = server_key(req)
        txn = self._servers.get(key)
        if txn is not None:
            self._apply(txn, Input.REQUEST, now, req, source)
            return
        stamp_received(req, source)
        if req.method == "INVITE":
            txn = InviteServerTransaction(req, source, key)
        else:
            txn = NonInviteServerTransaction(req, source, key)
        self._servers[key] = txn
        self._events.append(RequestReceived(txn, req, source))
        if self.send_100_trying and req.method == "INVITE":
            self._send_trying(txn, now)

    def _receive_ack(self, ack: Request, source: Address, now: float) -> None:
        txn = self._match_ack(ack)
        if txn is None:
            self._pass_ack(ack, source)
        else:
            self._apply(txn, Input.ACK, now, ack, source)

    def _match_ack(self, ack: Request) -> ServerTransaction | None:
        """§17.2.3: by branch, or the RFC 2543 way with the To tag of the response we sent."""
        if is_rfc3261_branch(ack.via.branch):
            return self._servers.get(server_key(ack))
        tag = ack.to.tag
        # The INVITE had no To tag (initial) or the dialog's, which our response kept.
        for invite_tag in (None, tag) if tag is not None else (None,):
            txn = self._servers.get(server_key(ack, to_tag=invite_tag))
            if txn is not None and txn.to_tag == tag:
                return txn
        return None

    def _pass_ack(self, ack: Request, source: Address) -> None:
        self._drop_2xx((ack.call_id, ack.cseq.seq, ack.to.tag))
        self._events.append(AckReceived(ack, source))

    def _send_trying(self, txn: ServerTransaction, now: float) -> None:
        resp = txn.request.make_response(100)
        timestamp = txn.request.headers.get("timestamp")
        if timestamp is not None:
            resp.headers.add("Timestamp", timestamp)  # §8.2.6.1
        self._apply(txn, Input.RESPONSE_1XX, now, resp)

    # --- running the tables -------------------------------------------------------------

    def _apply(
        self,
        txn: Transaction,
        inp: TransitionInput,
        now: float,
        msg: Message | None = None,
        source: Address | None = None,
    ) -> bool:
        """Run the transition for `inp`; False when the table absorbs it."""
        step = txn.TRANSITIONS.get((txn.state, inp))
        if step is None:
            return False
        new_state, actions = step
        txn.state = new_state
        ctx = _Context(inp, now, msg, source)
        for action in actions:
            if isinstance(action, Timer):
                self._start(txn, action, now)
            else:
                _HANDLERS[action](self, txn, ctx)
        if new_state is State.TERMINATED:
            self._terminate(txn)
        return True

    def _start(self, txn: Transaction, timer: Timer, now: float) -> None:
        """Arm `timer`; a zero duration (D, I, J, K on reliable transports) fires it now."""
        delay = self.settings.duration(timer, txn.peer.reliable)
        if delay is None or txn.state is State.TERMINATED:
            return
        if delay <= 0:
            self._apply(txn, timer, now)
            return
        if timer in RETRANSMIT_TIMERS:
            txn._interval = delay
        self._heap.arm(txn, timer, now + delay)

    def _terminate(self, txn: Transaction) -> None:
        self._heap.cancel_all(txn)
        txn._wire = None
        if isinstance(txn, ClientTransaction):
            if self._clients.get(txn.key) is txn:
                del self._clients[txn.key]
        elif self._servers.get(txn.key) is txn:
            del self._servers[txn.key]
        self._events.append(TransactionTerminated(txn))

    def _send(self, txn: Transaction, wire: bytes | None) -> None:
        if wire is not None:
            self._out.append((wire, txn.peer))

    # action handlers; the tables guarantee the message types the asserts spell out for mypy

    def _do_send_response(self, txn: Transaction, ctx: _Context) -> None:
        assert isinstance(ctx.msg, Response) and isinstance(txn, ServerTransaction)
        txn._wire = ctx.msg.to_bytes()
        if ctx.msg.status >= 200 and isinstance(txn, InviteServerTransaction):
            txn.to_tag = ctx.msg.to.tag
        self._send(txn, txn._wire)

    def _do_send_2xx(self, txn: Transaction, ctx: _Context) -> None:
        assert isinstance(ctx.msg, Response) and isinstance(txn, ServerTransaction)
        txn.to_tag = ctx.msg.to.tag
        self._send(txn, ctx.msg.to_bytes())

    def _do_resend(self, txn: Transaction, ctx: _Context) -> None:
        self._send(txn, txn._wire)

    def _do_send_ack(self, txn: Transaction, ctx: _Context) -> None:
        assert isinstance(ctx.msg, Response)
        txn._wire = build_ack(txn.request, ctx.msg).to_bytes()
        self._send(txn, txn._wire)

    def _do_pass_response(self, txn: Transaction, ctx: _Context) -> None:
        assert isinstance(ctx.msg, Response) and isinstance(txn, ClientTransaction)
        self._events.append(ResponseReceived(txn, ctx.msg))

    def _do_pass_ack(self, txn: Transaction, ctx: _Context) -> None:
        assert isinstance(ctx.msg, Request) and ctx.source is not None
        self._pass_ack(ctx.msg, ctx.source)

    def _do_timeout(self, txn: Transaction, ctx: _Context) -> None:
        assert isinstance(ctx.inp, Timer)
        self._events.append(TransactionTimeout(txn, ctx.inp))

    def _do_transport_error(self, txn: Transaction, ctx: _Context) -> None:
        self._events.append(TransportError(txn))

    def _do_forget(self, txn: Transaction, ctx: _Context) -> None:
        self._heap.cancel_all(txn)
        txn._wire = None

    def release_request(self, txn: ClientTransaction) -> None:
        """Let go of a finished client INVITE transaction's request (its TU is done with it).

        After a 3xx-6xx the transaction waits out Timer D (32 s) only to answer retransmitted
        finals with the ACK it keeps as bytes; the parsed INVITE (request, headers, their
        lists, dicts and Via) would stay alive as long, a dozen objects of each fork for the
        cyclic GC to walk again and again. Only once the state machine is past its last use.
        """
        if txn.state in (State.COMPLETED, State.TERMINATED) and txn.method == "INVITE":
            txn._request = None

    def _do_release_request(self, txn: Transaction, ctx: _Context) -> None:
        txn._request = None

    def _do_backoff(self, txn: Transaction, ctx: _Context) -> None:
        assert isinstance(ctx.inp, Timer)
        txn._interval = self.settings.backoff(ctx.inp, txn._interval)
        self._heap.arm(txn, ctx.inp, ctx.now + txn._interval)

    def _do_backoff_t2(self, txn: Transaction, ctx: _Context) -> None:
        assert isinstance(ctx.inp, Timer)
        txn._interval = self.settings.t2
        self._heap.arm(txn, ctx.inp, ctx.now + txn._interval)

    # --- §13.3.1.4 2xx retransmission ---------------------------------------------------

    def _start_2xx(self, txn: ServerTransaction, resp: Response, now: float) -> None:
        key = (txn.request.call_id, txn.request.cseq.seq, resp.to.tag)
        self._drop_2xx(key)
        job = _Resend2xx(txn, key, resp.to_bytes(), self.settings.t1)
        self._pending_2xx[key] = job
        self._heap.arm(job, Timer.RESEND_2XX, now + job.interval)
        self._heap.arm(job, Timer.WAIT_ACK, now + self.settings.timeout)

    def _fire_2xx(self, job: _Resend2xx, timer: Timer, now: float) -> None:
        if timer is Timer.WAIT_ACK:
            self._drop_2xx(job.key)
            self._events.append(AckTimeout(job.txn, timer))
            return
        self._out.append((job.wire, job.txn.peer))
        job.interval = self.settings.backoff(timer, job.interval)
        self._heap.arm(job, timer, now + job.interval)

    def _drop_2xx(self, key: tuple[str, int, str | None]) -> None:
        job = self._pending_2xx.pop(key, None)
        if job is not None:
            self._heap.cancel_all(job)


_HANDLERS: dict[Action, _Handler] = {
    Action.SEND_RESPONSE: TransactionLayer._do_send_response,
    Action.SEND_2XX: TransactionLayer._do_send_2xx,
    Action.RESEND: TransactionLayer._do_resend,
    Action.SEND_ACK: TransactionLayer._do_send_ack,
    Action.PASS_RESPONSE: TransactionLayer._do_pass_response,
    Action.PASS_ACK: TransactionLayer._do_pass_ack,
    Action.TIMEOUT: TransactionLayer._do_timeout,
    Action.TRANSPORT_ERROR: TransactionLayer._do_transport_error,
    Action.FORGET: TransactionLayer._do_forget,
    Action.RELEASE_REQUEST: TransactionLayer._do_release_request,
    Action.BACKOFF: TransactionLayer._do_backoff,
    Action.BACKOFF_T2: TransactionLayer._do_backoff_t2,
}


# --- received / rport -----------------------------------------------------------------------


def stamp_received(request: Request, source: Address) -> None:
    """Record where a request really came from on its top Via (§18.2.1, RFC 3581 §4).

    `received` is added when the sent-by host is not the source IP (a NAT, or a host name),
    and always when the client asked for `rport`, whose value becomes the source port: RFC 3581
    wants both, so that responses through proxies find their way back through the NAT.
    """
    via = request.via
    rport_asked = via.has_rport and via.param("rport") is None
    if not rport_asked and _same_host(via.host, source.host):
        return
    changes = {"received": source.host.strip("[]")}
    if rport_asked:
        changes["rport"] = str(source.port)
    request.headers.remove_first_value("via")
    request.headers.add_first("Via", str(_set_params(via, changes)))


def _same_host(sent_by_host: str, source_host: str) -> bool:
    a, b = sent_by_host.strip("[]").lower(), source_host.strip("[]").lower()
    if a == b:
        return True
    try:
        return ip_address(a) == ip_address(b)
    except ValueError:
        return False  # a host name: never the source IP


def _set_params(via: Via, changes: dict[str, str]) -> Via:
    """`via` with parameters set in place (unlike `Via.with_params`, which moves them last)."""
    params = [(k, changes.pop(k.lower(), v)) for k, v in via.params]
    params.extend(changes.items())
    return replace(via, params=tuple(params))
