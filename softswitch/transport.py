"""SIP transports: UDP and TCP endpoints behind one interface (RFC 3261 §18).

This is the only signalling module that owns sockets. It hands every complete message's bytes,
with the peer's `Address`, to one callback, and sends bytes to an `Address`. Framing on TCP is
`sip.framing.StreamFramer`'s job; parsing is the service's. TLS will slot in as another stream
listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import structlog

from .sip.errors import ParseError
from .sip.framing import StreamFramer
from .sip.transaction import Address

log = structlog.get_logger(__name__)

#: (message bytes, peer address, local listen address) -> None
MessageHandler = Callable[[bytes, Address], None]


class TransportError(Exception):
    """A listen address could not be bound, or a destination cannot be reached."""


#: Receive buffer asked for on SIP UDP sockets (the kernel caps it at net.core.rmem_max; 4 MiB
#: on Debian). The default ~208 KiB holds ~350 REGISTERs: a 50 ms pause of the loop (a full GC
#: pass, a burst of phones re-registering after a network outage) at a few thousand messages/s
#: overflows it, the phones retransmit 500 ms later and add load just when there is least room.
UDP_RCVBUF = 4 << 20


def _udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        with contextlib.suppress(OSError):  # a bigger buffer is best effort
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, handler: MessageHandler, max_size: int) -> None:
        self.handler = handler
        self.max_size = max_size
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(data) > self.max_size:
            log.warning("sip_datagram_too_large", size=len(data), peer=f"{addr[0]}:{addr[1]}")
            return
        if not data.strip(b"\r\n\x00 "):
            return  # RFC 5626 keep-alive (CRLF) or padding
        self.handler(data, Address("udp", str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp_error", error=str(exc))


class TcpConnection(asyncio.Protocol):
    """One TCP connection: a framer, and a registration in the manager's connection table."""

    def __init__(self, manager: TransportManager) -> None:
        self.manager = manager
        self.framer = StreamFramer(manager.max_size)
        self.transport: asyncio.Transport | None = None
        self.peer: Address | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = Address("tcp", str(host), int(port))
        self.manager._connections[self.peer] = self

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.framer.receive_data(data)
        try:
            while (message := self.framer.next_message()) is not None:
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
    ) -> None:
        self.handler = handler
        self.max_size = max_size
        self.on_framing_error = on_framing_error or (lambda data, peer, exc: None)
        self._udp: list[tuple[UdpEndpoint, asyncio.DatagramTransport]] = []
        self._servers: list[asyncio.Server] = []
        self._connections: dict[Address, TcpConnection] = {}
        self._pending: dict[Address, list[bytes]] = {}
        self._connecting: set[asyncio.Task[None]] = set()
        self.local: list[Address] = []

    async def listen(self, transport: str, host: str, port: int) -> Address:
        loop = asyncio.get_running_loop()
        try:
            if transport == "udp":
                dgram, proto = await loop.create_datagram_endpoint(
                    lambda: UdpEndpoint(self.handler, self.max_size), sock=_udp_socket(host, port)
                )
                self._udp.append((proto, dgram))
                bound = dgram.get_extra_info("sockname")
            elif transport == "tcp":
                server = await loop.create_server(
                    lambda: TcpConnection(self), host, port, reuse_address=True
                )
                self._servers.append(server)
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
                self._udp[0][1].sendto(data, (dest.host, dest.port))
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
                    loop.create_connection(lambda: TcpConnection(self), dest.host, dest.port), 5
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

    async def close(self) -> None:
        for _, dgram in self._udp:
            dgram.close()
        for server in self._servers:
            server.close()
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._udp.clear()
        self._servers.clear()
