"""SIP transports: UDP and TCP endpoints behind one interface (RFC 3261 §18).

This is the only signalling module that owns sockets. It hands every complete message's bytes,
with the peer's `Address`, to one callback, and sends bytes to an `Address`. Framing on TCP is
`sip.framing.StreamFramer`'s job; parsing is the service's. TLS will slot in as another stream
listener.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from softswitch.logline import EventLog

from .sip.errors import ParseError
from .sip.framing import StreamFramer
from .sip.transaction import Address
from .udp import Admit, MessageHandler, UdpEndpoint, udp_socket

log = EventLog(__name__)


class TransportError(Exception):
    """A listen address could not be bound, or a destination cannot be reached."""


@dataclass(frozen=True, slots=True)
class TcpLimits:
    """Bounds on what TCP peers can hold of ours.

    `max_connections`: connections accepted at once; more are closed at once, so a flood of
    connections cannot take the descriptors that calls need for their RTP sockets.
    `message_timeout`: seconds a connection may hold an incomplete message, or stay silent
    after it connected to us, before we close it (slow-loris senders, silent scanners). A
    phone's registered connection that is simply idle between messages is kept.
    """

    max_connections: int = 10000
    message_timeout: float = 30.0


class TcpConnection(asyncio.Protocol):
    """One TCP connection: a framer, and a registration in the manager's connection table."""

    def __init__(self, manager: TransportManager, *, inbound: bool) -> None:
        self.manager = manager
        self.inbound = inbound  # the peer connected to us (vs. we connected to a phone)
        self.framer = StreamFramer(manager.max_size)
        self.transport: asyncio.Transport | None = None
        self.peer: Address | None = None
        self.heard = False  # a complete message came in
        self.progress_at = 0.0  # loop time of the connect or the last complete message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.progress_at = asyncio.get_running_loop().time()
        host, port = transport.get_extra_info("peername")[:2]
        peer = Address("tcp", str(host), int(port))
        if self.inbound and not self.manager._accept(peer):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.peer = peer
        self.manager._connections[peer] = self

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            return
        self.framer.receive_data(data)
        try:
            while (message := self.framer.next_message()) is not None:
                self.heard = True
                self.progress_at = asyncio.get_running_loop().time()
                self.manager.handler(message, self.peer)
        except ParseError as exc:
            # The stream cannot be resynchronised after a framing error: answer if we can, close.
            log.info(
                "sip_stream_framing_error",
                peer=f"{self.peer.host}:{self.peer.port}",
                reason=exc.reason,
            )
            self.manager.on_framing_error(bytes(self.framer._buf), self.peer, exc)
            if self.transport is not None:
                self.transport.close()

    def stalled(self, now: float, timeout: float) -> bool:
        """Holding half a message, or connected to us and silent, for longer than `timeout`."""
        waiting = self.framer.buffered > 0 or (self.inbound and not self.heard)
        return waiting and now - self.progress_at > timeout

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.manager._connections.get(self.peer) is self:
            del self.manager._connections[self.peer]

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class TransportManager:
    """Every listening socket and TCP connection of the service."""

    def __init__(
        self,
        handler: MessageHandler,
        max_size: int = 65535,
        on_framing_error: Callable[[bytes, Address, ParseError], None] | None = None,
        *,
        admit: Admit | None = None,
        kernel_drops: Callable[[int], None] | None = None,
        tcp: TcpLimits = TcpLimits(),
    ) -> None:
        self.handler = handler
        self.tcp = tcp
        self._refused = 0  # connections refused (over max_connections) since the last sweep
        self._sweeper: asyncio.TimerHandle | None = None
        self.max_size = max_size
        self.on_framing_error = on_framing_error or (lambda data, peer, exc: None)
        self.admit = admit
        self.kernel_drops = kernel_drops
        self._udp: list[UdpEndpoint] = []
        self._servers: list[asyncio.Server] = []
        self._connections: dict[Address, TcpConnection] = {}
        self._pending: dict[Address, list[bytes]] = {}
        self._connecting: set[asyncio.Task[None]] = set()
        self.local: list[Address] = []

    async def listen(self, transport: str, host: str, port: int) -> Address:
        loop = asyncio.get_running_loop()
        try:
            if transport == "udp":
                endpoint = UdpEndpoint(
                    udp_socket(host, port),
                    self.handler,
                    self.max_size,
                    self.admit,
                    self.kernel_drops,
                )
                endpoint.start(loop)
                self._udp.append(endpoint)
                bound = endpoint.sock.getsockname()
            elif transport == "tcp":
                server = await loop.create_server(
                    lambda: TcpConnection(self, inbound=True), host, port, reuse_address=True
                )
                self._servers.append(server)
                self._sweep_later()
                bound = server.sockets[0].getsockname()
            else:
                raise TransportError(f"unsupported transport {transport!r}")
        except OSError as exc:
            raise TransportError(f"cannot listen on {transport}:{host}:{port}: {exc}") from exc
        local = Address(transport, str(bound[0]), int(bound[1]))
        self.local.append(local)
        return local

    def send(self, data: bytes, dest: Address) -> None:
        if dest.transport == "udp":
            if self._udp:
                self._udp[0].sendto(data, (dest.host, dest.port))
            return
        conn = self._connections.get(dest)
        if conn is not None:
            conn.write(data)
            return
        self._connect_and_send(data, dest)

    def _connect_and_send(self, data: bytes, dest: Address) -> None:
        """Open a TCP connection for a request to a peer we have no connection with."""
        if dest in self._pending:
            self._pending[dest].append(data)
            return
        self._pending[dest] = [data]
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: TcpConnection(self, inbound=False), dest.host, dest.port
                    ),
                    5,
                )
            except (OSError, TimeoutError) as exc:
                log.info("tcp_connect_failed", peer=f"{dest.host}:{dest.port}", error=str(exc))
                self._pending.pop(dest, None)
                return
            for chunk in self._pending.pop(dest, []):
                proto.write(chunk)

        task = loop.create_task(connect())
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _accept(self, peer: Address) -> bool:
        """Room for one more inbound connection? Refusals are logged by the sweep, in sum."""
        if len(self._connections) < self.tcp.max_connections:
            return True
        self._refused += 1
        return False

    def _sweep_later(self) -> None:
        if self._sweeper is None:
            delay = self.tcp.message_timeout / 3  # the config keeps it >= 1 s
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """Close stalled connections (see `TcpLimits`); one log line for all of them."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        stalled = [
            c for c in self._connections.values() if c.stalled(now, self.tcp.message_timeout)
        ]
        for conn in stalled:
            if conn.transport is not None:
                conn.transport.abort()
        if stalled or self._refused:
            log.warning(
                "tcp_connections_closed",
                stalled=len(stalled),
                refused=self._refused,
                open=len(self._connections) - len(stalled),
                max_connections=self.tcp.max_connections,
            )
            self._refused = 0
        self._sweep_later()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for endpoint in self._udp:
            endpoint.close()
        for server in self._servers:
            server.close()
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._udp.clear()
        self._servers.clear()
