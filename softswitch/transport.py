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
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from softswitch.logline import EventLog

from .sip.errors import ParseError
from .sip.framing import StreamFramer
from .sip.transaction import Address

log = EventLog(__name__)

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


#: Linux socket options the stdlib does not name (asm-generic values, as on x86-64 and arm64):
#: the kernel's receive time of each datagram (SCM_TIMESTAMPNS, a struct timespec) and the
#: socket's cumulative count of datagrams dropped for a full receive buffer (a uint32).
SO_TIMESTAMPNS = 35
SO_RXQ_OVFL = 40
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(4)
_TIMESTAMPS = sys.platform == "linux" and struct.calcsize("@l") == 8

#: Datagrams read per readiness callback before the loop gets a turn for timers and TCP.
UDP_BATCH = 64

#: Admission control: (datagram, seconds it waited in the kernel's queue, sender) -> keep it?
Admit = Callable[[bytes, float, tuple[str | int, ...]], bool]


class UdpEndpoint:
    """One UDP listening socket, read by us rather than by an asyncio transport.

    asyncio's datagram protocol hands over the bytes and the peer but not *when* the datagram
    arrived; overload control (`softswitch.overload`) needs that, so this reads with
    `recvmsg` and the kernel's receive timestamp. It reads up to `UDP_BATCH` datagrams per
    wake-up, and sends with a plain `sendto`: a datagram the kernel cannot take at once
    (EAGAIN) is dropped and counted, as any UDP loss, and the transaction layer retransmits.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: MessageHandler,
        max_size: int,
        admit: Admit | None = None,
        kernel_drops: Callable[[int], None] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sock = sock
        self._wall = wall  # the clock of the kernel's receive stamps (CLOCK_REALTIME)
        self.handler = handler
        self.max_size = max_size
        self.admit = admit
        self.kernel_drops = kernel_drops
        self.send_drops = 0
        self._kernel_total = 0
        self._timestamps = _TIMESTAMPS and _enable_timestamps(sock)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        self.sock.close()

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            self.send_drops += 1
        except OSError as exc:  # unreachable network, a closed socket during shutdown
            log.debug("udp_send_error", peer=f"{addr[0]}:{addr[1]}", error=str(exc))

    def _on_readable(self) -> None:
        recvmsg = self.sock.recvmsg
        size = self.max_size + 1  # one byte more: a datagram that fills it is too large
        ancillary = _ANCILLARY if self._timestamps else 0
        now = 0.0  # the wall clock, read once per wake-up and only if a datagram is stamped
        for _ in range(UDP_BATCH):
            try:
                data, ancdata, _, addr = recvmsg(size, ancillary)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors queued on the socket
                log.debug("udp_error", error=str(exc))
                continue
            age = 0.0
            for level, kind, value in ancdata:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(value)
                    now = now or self._wall()
                    age = now - (sec + nsec * 1e-9)
                elif kind == SO_RXQ_OVFL and len(value) >= 4:
                    self._note_kernel_drops(int.from_bytes(value[:4], sys.byteorder))
            self._deliver(data, addr, age)

    def _deliver(self, data: bytes, addr: tuple[str | int, ...], age: float) -> None:
        if len(data) > self.max_size:
            log.warning("sip_datagram_too_large", size=len(data), peer=f"{addr[0]}:{addr[1]}")
            return
        if self.admit is not None and not self.admit(data, age, addr):
            return
        if not data.strip(b"\r\n\x00 "):
            return  # RFC 5626 keep-alive (CRLF) or padding
        try:
            self.handler(data, Address("udp", str(addr[0]), int(addr[1])))
        except Exception:  # one bad message must not stop the socket being read
            log.exception("sip_handler_failed", peer=f"{addr[0]}:{addr[1]}")

    def _note_kernel_drops(self, total: int) -> None:
        if total != self._kernel_total:
            self._kernel_total = total
            if self.kernel_drops is not None:
                self.kernel_drops(total)


def _enable_timestamps(sock: socket.socket) -> bool:
    """Ask for receive timestamps and the drop counter; False if the kernel refuses."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    with contextlib.suppress(OSError):  # the drop count is a bonus
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    return True


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
                    _udp_socket(host, port),
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
