"""The Lines API: each user's shared lines and their calls, as JSON and as a live event stream.

It is a view of the `LineModel` and nothing else: `GET /api/lines` reads the model, and
`GET /api/events` forwards the `LineBus` events, so the HTTP view can never disagree with the
BLF/SCA NOTIFYs derived from the same bus. Users authenticate with HTTP Basic, extension and SIP
password (the API listens on loopback for now: Basic sends the password in clear text).

The event stream starts with a `snapshot` (the `GET /api/lines` body) taken in the same
synchronous step as the bus subscription, so no change can fall between the two. Each client
has a bounded queue: the bus calls subscribers synchronously, so a client that stops reading
must cost the bus nothing; when its queue overflows, that client is disconnected (it
reconnects and gets a fresh snapshot, which is better than a silently incomplete view).

The response bodies are pydantic models; the OpenAPI 3.1 document is generated from the same
models, so it cannot drift from what is sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from dialplan import Config, User
from dialplan.routing import Role, lines_of
from softswitch.logline import EventLog

from . import __version__
from .http_server import Request, Response, error_response, json_response
from .lines import CallState, Direction, LineBus, LineCall, LineEvent
from .throttle import FailureThrottle

log = EventLog(__name__)

REALM = "softswitch"
KEEPALIVE = 15.0  # seconds between `: keepalive` comments: proxies drop idle connections
QUEUE_SIZE = 1000  # events buffered per stream client before it is dropped
CHALLENGE = (("WWW-Authenticate", f'Basic realm="{REALM}"'),)
#: Compared against when the user is unknown, so unknown users cost the same as wrong passwords.
_DECOY = b"softswitch-decoy-password-never-valid"
_KEEPALIVE_CHUNK = b": keepalive\n\n"

Route = Callable[[Request], Awaitable[Response]]


# --- the response bodies ------------------------------------------------------------------------
class _View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CallView(_View):
    """One call on a line, as every member of the line sees it."""

    call_id: str = Field(description="The switch's id of the call (not a SIP Call-ID).")
    state: CallState = Field(
        description="ringing (inbound, alerting), dialing (outbound, not answered yet), "
        "active or held; `ended` only appears in events."
    )
    direction: Direction
    party: str | None = Field(
        description="The member using the line (the owner or a delegate); null while ringing."
    )
    party_name: str | None
    remote: str = Field(description="The other end's number or extension.")
    remote_name: str | None
    started_at: datetime = Field(description="When the call began, ISO 8601 UTC.")
    started_at_epoch: float = Field(description="started_at in Unix epoch seconds.")
    duration: int = Field(description="Whole seconds since the call began.")
    private: bool = Field(description="Held privately: other members may not retrieve it.")


class LineView(_View):
    """A line the user belongs to, with its current calls (oldest first)."""

    line: str = Field(description="The line's extension (its owner's).")
    name: str = Field(description="The owner's name.")
    role: Role = Field(description="owner: the user's own line; delegate: a delegator's line.")
    version: int = Field(description="Increases by one with each change of the line.")
    calls: list[CallView]


class LinesView(_View):
    """Every line of the calling user: their own first, then their delegators'."""

    user: str
    lines: list[LineView]


class LineEventView(_View):
    """One change of one call on a line (the `data` of a `line` event)."""

    line: str
    version: int = Field(description="The line's version after this change.")
    call_id: str
    state: CallState
    direction: Direction
    party: str | None
    party_name: str | None
    remote: str
    remote_name: str | None
    started_at: datetime
    started_at_epoch: float
    at: datetime = Field(description="When this change happened, ISO 8601 UTC.")
    at_epoch: float
    reason: str | None = Field(description='Why the call ended ("bye", "cancel", ...).')
    private: bool


class ErrorView(_View):
    error: str


class HealthView(_View):
    status: Literal["ok"]


# --- the API ------------------------------------------------------------------------------------
class HttpApi:
    """Routes, authentication and bodies of the Lines API; plug `handle` into `HttpServer`.

    `cfg_provider` is called on every request and event rather than holding a `Config`,
    because a reload swaps the config: passwords, names and line membership follow it.
    """

    def __init__(
        self,
        cfg_provider: Callable[[], Config],
        bus: LineBus,
        *,
        throttle: FailureThrottle | None = None,
        clock: Callable[[], float] = time.time,
        keepalive: float = KEEPALIVE,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.cfg_provider = cfg_provider
        self.bus = bus
        # Our own throttle, not the SIP one: on loopback every client shares 127.0.0.1 with
        # the phones, and a script with a stale password must not lock the phones out.
        self.throttle = throttle or FailureThrottle()
        self.clock = clock
        self.keepalive = keepalive
        self.queue_size = queue_size
        self.streams = 0  # open event streams
        self.routes: dict[str, Route] = {
            "/api/lines": self.get_lines,
            "/api/events": self.get_events,
            "/api/openapi.json": self.get_openapi,
            "/api/health": self.get_health,
        }
        self._memo: tuple[LineEvent, Config, bytes] | None = None

    async def handle(self, request: Request) -> Response:
        """The `HttpServer` handler: 404 for unknown paths, 405 for anything but GET."""
        route = self.routes.get(request.path)
        if route is None:
            return error_response(404, f"no such resource: {request.path}")
        if request.method != "GET":
            return error_response(
                405, f"{request.method} is not allowed", headers=(("Allow", "GET"),)
            )
        return await route(request)

    # --- routes ---------------------------------------------------------------------------------
    async def get_lines(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        body = self.lines_view(self.cfg_provider(), user.extension).model_dump_json().encode()
        return Response(200, body, user=user.extension)

    async def get_events(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user

        def stream(abort: Callable[[], None]) -> AsyncGenerator[bytes, None]:
            return self._stream(user.extension, user.password, abort)

        return Response(
            200,
            content_type="text/event-stream",
            headers=(("X-Accel-Buffering", "no"),),  # reverse proxies: do not buffer the stream
            stream=stream,
            user=user.extension,
        )

    async def get_openapi(self, request: Request) -> Response:
        return Response(200, _openapi_bytes())

    async def get_health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    # --- authentication -------------------------------------------------------------------------
    def authenticate(self, request: Request) -> User | Response:
        """The user, or the response refusing the request (401, or 429 if throttled).

        Unknown users and wrong passwords get the same answer after the same work. Only
        presented credentials count as failures: a browser's first request never has any.
        """
        cfg = self.cfg_provider()
        self.throttle.max_failures = cfg.auth.max_failures
        self.throttle.window = cfg.auth.failure_window
        self.throttle.block_time = cfg.auth.block_time
        now = self.clock()
        ip = request.peer[0]
        if self.throttle.blocked(ip, now):
            retry = (("Retry-After", str(max(1, int(self.throttle.block_time)))),)
            return error_response(429, "too many failed logins; try again later", headers=retry)
        header = request.header("authorization")
        if header is None:
            return error_response(401, "authentication required", headers=CHALLENGE)
        credentials = _basic_credentials(header)
        if credentials is not None:
            name, password = credentials
            user = cfg.user(name)
            expected = user.password.encode() if user is not None else _DECOY
            if hmac.compare_digest(password.encode(), expected) and user is not None:
                return user
        log.info(
            "http_auth_failed",
            peer=ip,
            user=credentials[0][:32] if credentials else None,
            reason="bad_credentials" if credentials else "malformed",
        )
        if self.throttle.record_failure(ip, now):
            log.warning("http_auth_source_blocked", peer=ip, seconds=self.throttle.block_time)
        return error_response(401, "authentication required", headers=CHALLENGE)

    # --- bodies ---------------------------------------------------------------------------------
    def lines_view(self, cfg: Config, user: str) -> LinesView:
        now = self.clock()
        model = self.bus.model
        views = []
        for line in lines_of(cfg, user):
            owner = cfg.user(line)
            views.append(
                LineView(
                    line=line,
                    name=owner.name if owner is not None else line,
                    role=Role.OWNER if line == user else Role.DELEGATE,
                    version=model.version(line),
                    calls=[_call_view(cfg, call, now) for call in model.calls(line)],
                )
            )
        return LinesView(user=user, lines=views)

    def snapshot_chunk(self, cfg: Config, user: str) -> bytes:
        data = self.lines_view(cfg, user).model_dump_json()
        return f"event: snapshot\ndata: {data}\n\n".encode()

    def event_chunk(self, cfg: Config, event: LineEvent) -> bytes:
        """The SSE message of `event`; built once per event however many clients want it."""
        if self._memo is not None and self._memo[0] is event and self._memo[1] is cfg:
            return self._memo[2]
        version = self.bus.model.version(event.line)  # the model applied the event already
        party = cfg.user(event.party) if event.party is not None else None
        view = LineEventView(
            line=event.line,
            version=version,
            call_id=event.call_id,
            state=event.state,
            direction=event.direction,
            party=event.party,
            party_name=party.name if party is not None else None,
            remote=event.remote,
            remote_name=event.remote_name,
            started_at=_utc(event.started_at),
            started_at_epoch=event.started_at,
            at=_utc(event.at),
            at_epoch=event.at,
            reason=event.reason,
            private=event.private,
        )
        chunk = f"id: {event.line}:{version}\nevent: line\ndata: {view.model_dump_json()}\n\n"
        self._memo = (event, cfg, chunk.encode())
        return self._memo[2]

    # --- the event stream -----------------------------------------------------------------------
    async def _stream(
        self, user: str, password: str, abort: Callable[[], None]
    ) -> AsyncGenerator[bytes, None]:
        client = _StreamClient(self, user, password, abort)
        try:
            while not client.closed:
                try:
                    async with asyncio.timeout(self.keepalive):
                        chunk = await client.queue.get()
                except TimeoutError:
                    chunk = client.idle()
                if client.closed:
                    return
                yield chunk
        finally:
            client.close()


class _StreamClient:
    """One event-stream client: its bus subscription, its bounded queue, its current lines.

    Everything here runs synchronously inside `LineBus.publish`, so it must never block or
    raise: a full queue drops the client instead of waiting for it.
    """

    def __init__(self, api: HttpApi, user: str, password: str, abort: Callable[[], None]) -> None:
        self.api = api
        self.user = user
        self.password = password
        self.abort = abort
        self.closed = False
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(api.queue_size)
        cfg = api.cfg_provider()
        self.lines = lines_of(cfg, user)
        # Snapshot and subscription in one synchronous step: no event can fall in between.
        self.queue.put_nowait(api.snapshot_chunk(cfg, user))
        self._unsubscribe = api.bus.subscribe(self.on_event)
        api.streams += 1

    def on_event(self, event: LineEvent) -> None:
        if self.closed:
            return
        cfg = self.api.cfg_provider()
        if not self._still_valid(cfg):
            return
        if self.lines != (lines := lines_of(cfg, self.user)):
            # A reload changed which lines the user is on: a fresh snapshot (it already
            # includes this event) instead of events for lines the client knows nothing of.
            self.lines = lines
            chunk = self.api.snapshot_chunk(cfg, self.user)
        elif event.line in lines:
            chunk = self.api.event_chunk(cfg, event)
        else:
            return
        try:
            self.queue.put_nowait(chunk)
        except asyncio.QueueFull:
            self.drop("too_slow")

    def idle(self) -> bytes:
        """What to send after `keepalive` quiet seconds: a comment, or a snapshot after a
        reload that changed the user's lines."""
        cfg = self.api.cfg_provider()
        if not self._still_valid(cfg):
            return b""
        lines = lines_of(cfg, self.user)
        if lines != self.lines:
            self.lines = lines
            return self.api.snapshot_chunk(cfg, self.user)
        return _KEEPALIVE_CHUNK

    def _still_valid(self, cfg: Config) -> bool:
        """A user removed or whose password changed (a reload) loses the stream too."""
        user = cfg.user(self.user)
        if user is None or user.password != self.password:
            self.drop("credentials_revoked")
            return False
        return True

    def drop(self, reason: str) -> None:
        log.info("http_stream_dropped", user=self.user, reason=reason)
        self.close()
        self.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._unsubscribe()
            self.api.streams -= 1


# --- helpers ------------------------------------------------------------------------------------
def _basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, password) from `Basic <base64>`, or None if the header is not that (RFC 7617)."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # what browsers send when the challenge names no charset
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _call_view(cfg: Config, call: LineCall, now: float) -> CallView:
    party = cfg.user(call.party) if call.party is not None else None
    return CallView(
        call_id=call.call_id,
        state=call.state,
        direction=call.direction,
        party=call.party,
        party_name=party.name if party is not None else None,
        remote=call.remote,
        remote_name=call.remote_name,
        started_at=_utc(call.started_at),
        started_at_epoch=call.started_at,
        duration=max(0, int(now - call.started_at)),
        private=call.private,
    )


# --- OpenAPI ------------------------------------------------------------------------------------
def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _error(description: str, **headers: str) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": _json("ErrorView")}
    if headers:
        out["headers"] = {
            k: {"schema": {"type": "string"}, "description": v} for k, v in headers.items()
        }
    return out


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description, its schemas generated from the response models."""
    _, top = models_json_schema(
        [(m, "serialization") for m in (LinesView, LineEventView, ErrorView, HealthView)],
        ref_template="#/components/schemas/{model}",
    )
    unauthorized = _error(
        "Missing or wrong credentials (the same answer for unknown users).",
        **{"WWW-Authenticate": f'Basic realm="{REALM}"'},
    )
    throttled = _error(
        "Too many failed logins from this address.", **{"Retry-After": "Seconds to wait."}
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "softswitch Lines API",
            "version": __version__,
            "description": "The shared lines a user belongs to and their calls, live.",
        },
        "paths": {
            "/api/lines": {
                "get": {
                    "operationId": "getLines",
                    "summary": "The calling user's lines and their calls",
                    "security": [{"basic": []}],
                    "responses": {
                        "200": {"description": "The user's lines", "content": _json("LinesView")},
                        "401": unauthorized,
                        "429": throttled,
                    },
                }
            },
            "/api/events": {
                "get": {
                    "operationId": "getEvents",
                    "summary": "Live changes of the user's lines (server-sent events)",
                    "description": (
                        "A text/event-stream. First `event: snapshot` whose data is a LinesView "
                        "(the body of GET /api/lines), then one `event: line` per change on one "
                        "of the user's lines, `id: <line>:<version>`, data a LineEventView; "
                        f"`: keepalive` comments every {KEEPALIVE:g} s. A client that falls "
                        f"{QUEUE_SIZE} events behind is disconnected: reconnect for a new "
                        "snapshot. Last-Event-ID is ignored: every connection starts with a "
                        "snapshot."
                    ),
                    "security": [{"basic": []}],
                    "responses": {
                        "200": {
                            "description": "The event stream",
                            "content": {
                                "text/event-stream": {
                                    "schema": {"type": "string"},
                                    "x-events": {
                                        "snapshot": {"$ref": "#/components/schemas/LinesView"},
                                        "line": {"$ref": "#/components/schemas/LineEventView"},
                                    },
                                }
                            },
                        },
                        "401": unauthorized,
                        "429": throttled,
                    },
                }
            },
            "/api/health": {
                "get": {
                    "operationId": "getHealth",
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "Up", "content": _json("HealthView")}},
                }
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": top["$defs"],
            "securitySchemes": {
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "Extension and SIP password.",
                }
            },
        },
    }


@functools.cache
def _openapi_bytes() -> bytes:
    return json.dumps(openapi_document(), ensure_ascii=False, indent=1).encode()
