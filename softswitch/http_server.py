"""A small asyncio HTTP/1.1 server: the transport edge of the HTTP API.

The project's dependencies are asyncio, pydantic, structlog and ruamel.yaml (no aiohttp), and the
Lines API needs little: GET requests without bodies, one request per connection
(`Connection: close`, so no keep-alive or pipelining state), plain responses and long-lived
streamed ones (server-sent events). This module does exactly that and nothing more, because
it faces browsers and scripts: every resource a client can make us hold is bounded (8 KB of
request head, 100 header fields, 10 s to send the head, a write timeout, a connection limit).

Parsing is a pure function of the head's bytes (`parse_head`), tested without sockets. The
application is one coroutine, `Handler`, from `Request` to `Response`; a response with a
`stream` has its body produced over time until either side ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import json
import re
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

from softswitch.logline import EventLog

log = EventLog(__name__)

MAX_HEAD = 8192  # request line + header fields, bytes
MAX_HEADERS = 100
HEAD_TIMEOUT = 10.0  # seconds for a client to send its whole head (slowloris)
WRITE_TIMEOUT = 30.0  # seconds a client may take to accept buffered output before we drop it
MAX_CONNECTIONS = 1000
#: After answering a request whose body we did not read, keep reading (and discarding) for a
#: moment before closing: closing a socket with unread input sends a TCP RST, and the client
#: may lose our response with it (the "lingering close" of Apache and nginx).
LINGER_TIME = 2.0
#: Kernel send buffer of a streaming connection. Linux autotunes it up to 4 MB, which would let
#: a stalled event-stream client sit on thousands of events before the application's own bound
#: (the handler's queue) notices; events are small, so 64 KB costs no throughput.
STREAM_SNDBUF = 65536
LINGER_BYTES = 65536

SERVER = "softswitch"

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_HEADER_NAME = re.compile(_TOKEN)
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters except HTAB
_METHODS_WITHOUT_BODY = frozenset({"GET", "HEAD"})


class HttpError(Exception):
    """A request we refuse before it reaches the application; `status` is the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpServerError(Exception):
    """The server cannot listen (the address is in use, not ours, or not an address)."""


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request head. There is no body: requests with one never reach a handler as GET."""

    method: str
    target: str  # as sent, e.g. "/api/lines?x=1"
    path: str  # percent-decoded path, e.g. "/api/lines"
    query: str
    version: str  # "1.0" or "1.1"
    #: Lower-case names; a repeated field's values are joined with ", " (RFC 9110 §5.3).
    headers: Mapping[str, str]
    peer: tuple[str, int]
    content_length: int = 0
    chunked: bool = False

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0


#: A streamed body: called with `abort` (drop the connection now, e.g. when the client falls
#: too far behind), it returns the chunks to send. The server closes the generator when the
#: client goes away or the server stops, so its `finally` is the place to release resources.
StreamFactory = Callable[[Callable[[], None]], AsyncGenerator[bytes, None]]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    stream: StreamFactory | None = None
    #: The authenticated user, for the access log only.
    user: str | None = None


Handler = Callable[[Request], Awaitable[Response]]


def json_response(
    status: int,
    payload: object,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    user: str | None = None,
) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, headers=headers, user=user)


def error_response(
    status: int, message: str | None = None, *, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """A JSON error body `{"error": ...}`, so scripts need one code path for every failure."""
    return json_response(status, {"error": message or HTTPStatus(status).phrase}, headers=headers)


def parse_head(head: bytes, peer: tuple[str, int]) -> Request:
    """Parse a request line and header fields (RFC 9112), without the final empty line.

    Strict where leniency has caused request smuggling (whitespace before the colon, obsolete
    line folding, conflicting Content-Length), lenient only where RFC 9112 allows it (bare LF
    line ends, empty lines before the request line).
    """
    lines = [line.removesuffix("\r") for line in head.decode("latin-1").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    if lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HttpError(400, "empty request")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise HttpError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != "1":
        raise HttpError(505, f"HTTP/{major}.{minor} is not supported; use HTTP/1.1")
    fields = lines[1:]
    if len(fields) > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    lengths: list[str] = []
    for line in fields:
        if line[:1] in (" ", "\t"):
            raise HttpError(400, "obsolete line folding in the header")
        name, sep, value = line.partition(":")
        if not sep or not _HEADER_NAME.fullmatch(name):
            raise HttpError(400, "malformed header field")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, f"control character in header field {name}")
        name = name.lower()
        if name == "content-length":
            lengths.extend(v.strip() for v in value.split(","))
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    version = f"{major}.{minor}"
    if version != "1.0" and "host" not in headers:
        raise HttpError(400, "HTTP/1.1 requests need a Host header")
    content_length = 0
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].isascii() or not lengths[0].isdigit():
            raise HttpError(400, "invalid Content-Length")
        content_length = int(lengths[0])
    path, query = _split_target(target)
    return Request(
        method,
        target,
        path,
        query,
        version,
        headers,
        peer,
        content_length,
        "transfer-encoding" in headers,
    )


def _split_target(target: str) -> tuple[str, str]:
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target.lower().startswith(("http://", "https://")):  # absolute-form, RFC 9112 §3.2.2
        parts = urlsplit(target)
        path, query = parts.path or "/", parts.query
    else:
        raise HttpError(400, "the request target must be a path")
    return unquote(path), query


def serialize_head(status: int, fields: list[tuple[str, str]]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in fields), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _head_fields(response: Response) -> list[tuple[str, str]]:
    fields = [("Date", email.utils.formatdate(usegmt=True)), ("Server", SERVER)]
    if response.content_type is not None:
        fields.append(("Content-Type", response.content_type))
    if response.stream is None:
        fields.append(("Content-Length", str(len(response.body))))
    fields += [
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Connection", "close"),
        *response.headers,
    ]
    return fields


async def read_head(reader: asyncio.StreamReader, limit: int = MAX_HEAD) -> bytes | None:
    """Read up to the empty line ending the head; None if the client closed before sending any.

    The reader's own limit must be at least `limit` (a longer line raises ValueError there).
    """
    head = bytearray()
    seen = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError as exc:  # a single line beyond the reader's limit
            raise HttpError(431, "request head too large") from exc
        seen += len(line)
        if seen > limit:
            raise HttpError(431, "request head too large")
        if not line.endswith(b"\n"):  # end of stream
            if head or line.strip():
                raise HttpError(400, "incomplete request head")
            return None
        if line in (b"\r\n", b"\n"):
            if head:
                return bytes(head)
            continue  # RFC 9112 §2.2: ignore empty lines before the request line
        head += line


def _peer(writer: asyncio.StreamWriter) -> tuple[str, int]:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return "?", 0


@dataclass
class HttpServer:
    """Serve `handler` on one TCP address; `close()` ends the listener and every connection."""

    handler: Handler
    max_connections: int = MAX_CONNECTIONS
    head_timeout: float = HEAD_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    _server: asyncio.Server | None = field(default=None, init=False)
    _connections: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0: any free port, see `address`)."""
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=MAX_HEAD, reuse_address=True
            )
        except OSError as exc:
            raise HttpServerError(f"cannot listen for HTTP on {host}:{port}: {exc}") from exc
        try:
            exposed = not ipaddress.ip_address(host).is_loopback
        except ValueError:
            exposed = True
        if exposed:
            # Basic credentials travel in clear text: fine on loopback, not on a network.
            log.warning("http_not_loopback", host=host, port=self.address[1])
        log.info("http_listening", host=self.address[0], port=self.address[1])

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), e.g. to learn the port after `start(host, 0)`."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not listening")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        """Stop listening, end every open connection (event streams included) and wait."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # --- one connection ---------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = _peer(writer)
        try:
            if len(self._connections) > self.max_connections:
                await self._send(writer, error_response(503, "too many connections"))
                await self._linger(reader, writer)
                return
            await self._exchange(reader, writer, peer)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("http_connection_lost", peer=peer[0], error=type(exc).__name__)
        except asyncio.CancelledError:
            # close() cancels us. This is the connection's top-level task, created by
            # start_server, whose done-callback (3.11) calls task.exception(), which raises
            # on a cancelled task: end normally instead, nothing awaits us.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[str, int]
    ) -> None:
        request: Request | None = None
        try:
            async with asyncio.timeout(self.head_timeout):
                head = await read_head(reader)
            if head is None:
                return
            request = parse_head(head, peer)
            if request.method in _METHODS_WITHOUT_BODY and request.has_body:
                raise HttpError(400, f"{request.method} requests must not have a body")
        except TimeoutError:
            log.debug("http_head_timeout", peer=peer[0])
            return
        except HttpError as exc:
            response = error_response(exc.status, exc.message)
            self._log(request, response, peer)
            await self._send(writer, response)
            await self._linger(reader, writer)
            return
        response = await self._call(request)
        self._log(request, response, peer)
        if response.stream is not None:
            await self._stream(reader, writer, response, peer)
            return
        await self._send(writer, response)
        if request.has_body:
            await self._linger(reader, writer)

    async def _call(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except Exception:  # a bug in one handler must cost one request, not the server
            log.exception("http_handler_failed", method=request.method, path=request.path)
            return error_response(500)

    async def _send(self, writer: asyncio.StreamWriter, response: Response) -> None:
        writer.write(serialize_head(response.status, _head_fields(response)) + response.body)
        await self._drain(writer)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.write_timeout):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()  # the client stopped reading: free its buffers now
            raise

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not writer.can_write_eof():
            return
        writer.write_eof()
        discarded = 0
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_TIME):
                while discarded < LINGER_BYTES and (data := await reader.read(4096)):
                    discarded += len(data)

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: Response,
        peer: tuple[str, int],
    ) -> None:
        """Send the head, then the stream's chunks until it ends, the client leaves or we stop.

        A reader task watches for the client's end of the connection, so a client that goes
        away is noticed at once rather than at the next write (event streams are mostly idle).
        """
        assert response.stream is not None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        writer.write(serialize_head(response.status, _head_fields(response)))
        await self._drain(writer)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        aborted = False

        def abort() -> None:
            nonlocal aborted
            aborted = True
            writer.transport.abort()

        pump = loop.create_task(self._pump(writer, response.stream(abort)))
        watch = loop.create_task(_until_eof(reader))
        reason = "server_closed"
        try:
            done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            reason = "aborted" if aborted else "client_closed" if watch in done else "ended"
        finally:
            pump.cancel()
            watch.cancel()
            failure, _ = await asyncio.gather(pump, watch, return_exceptions=True)
            if isinstance(failure, ConnectionError | TimeoutError):
                reason = "write_failed"
            elif isinstance(failure, Exception):
                reason = "failed"
                log.error("http_stream_failed", user=response.user, exc_info=failure)
            log.debug(
                "http_stream_closed",
                user=response.user,
                peer=peer[0],
                reason=reason,
                seconds=round(time.monotonic() - started, 3),
            )

    async def _pump(
        self, writer: asyncio.StreamWriter, stream: AsyncGenerator[bytes, None]
    ) -> None:
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                writer.write(chunk)
                await self._drain(writer)

    @staticmethod
    def _log(request: Request | None, response: Response, peer: tuple[str, int]) -> None:
        log.debug(
            "http_request",
            method=request.method if request else None,
            path=request.path if request else None,
            status=response.status,
            user=response.user,
            peer=peer[0],
        )


async def _until_eof(reader: asyncio.StreamReader) -> None:
    """Return when the client closes its side; discard anything it sends meanwhile."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass
