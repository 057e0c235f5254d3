"""One leg's media endpoint: an RTP and an RTCP UDP socket with symmetric latching.

The fast path is `RtpSocket.datagram_received` -> `on_packet(data)`. `on_packet` is the plug
point: it drops by default, a `RelayBridge` points it at the other leg's `RtpSocket.send`, a
recorder or a mixer can put its own callable there. Nothing on that path parses RTP, awaits or
allocates; it compares the source address, bumps two ints and calls `socket.sendto` on the raw
socket (cheaper than `transport.sendto`, and a full send buffer drops the packet instead of
queueing it, which is what real-time media wants).

Symmetric latching (phones behind NAT send from, and must be sent to, their NAT mapping, not the
address in their SDP): each socket sends to the address the SDP announced until a packet
arrives, then latches onto that packet's source and sends there. Packets from other sources are
ignored. To resist media hijacking (a stranger spraying RTP at our ports) the socket re-latches
onto a new source only after the latched source has been silent for `relatch_after` seconds
(2 s for RTP, longer for RTCP, which only speaks every ~5 s); a phone whose NAT mapping changes
loses about that much audio. The first packet wins the initial latch: a stranger who is faster
than the phone can take it, like in every latching relay; the 2 s rule then lets the phone win
it back only if the stranger stops. Silence is measured without a clock read per packet: the
first foreign packet starts a probe, and the socket re-latches if no latched packet arrived
during the `relatch_after` seconds that followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from media.errors import EndpointClosed

if TYPE_CHECKING:
    from media.bridge import Bridge

Address = tuple[Any, ...]
"""A socket address as asyncio reports it: (host, port) or (host, port, flow, scope) for IPv6."""

PacketHandler = Callable[[bytes], None]
"""What an endpoint socket does with every packet from its latched source."""

RTP_RELATCH_AFTER = 2.0
RTCP_RELATCH_AFTER = 12.0


def drop(data: bytes) -> None:
    """The handler of an unbridged socket: packets are counted, then discarded."""


class RtpSocket(asyncio.DatagramProtocol):
    """One UDP socket of an endpoint (RTP or RTCP): receive, latch, hand over, send."""

    __slots__ = (
        "_on_closed",
        "_probe_at",
        "_probe_rx",
        "_sendto",
        "_transport",
        "announced",
        "dropped",
        "ignored",
        "on_packet",
        "port",
        "relatch_after",
        "relatches",
        "rx_bytes",
        "rx_packets",
        "sock",
        "source",
        "target",
    )

    def __init__(
        self, sock: socket.socket, relatch_after: float, on_closed: Callable[[], None]
    ) -> None:
        self.sock = sock
        self._sendto = sock.sendto
        self._transport: asyncio.BaseTransport | None = None
        self._on_closed: Callable[[], None] | None = on_closed
        self.port: int = sock.getsockname()[1]
        self.relatch_after = relatch_after
        self.on_packet: PacketHandler = drop
        self.announced: Address | None = None  # from the SDP
        self.source: Address | None = None  # latched source; None until the first packet
        self.target: Address | None = None  # where `send` goes: latched source, else announced
        self.rx_packets = 0  # packets from the latched source (all handed to on_packet)
        self.rx_bytes = 0
        self.dropped = 0  # packets `send` could not send (no target yet, send buffer full)
        self.ignored = 0  # packets from sources other than the latched one
        self.relatches = 0
        self._probe_at = 0.0
        self._probe_rx = -1

    # --- asyncio.DatagramProtocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if addr != self.source and not self._latch(addr):
            return
        self.rx_packets += 1
        self.rx_bytes += len(data)
        self.on_packet(data)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors (port unreachable while a phone restarts) are not worth a log line each."""

    def connection_lost(self, exc: Exception | None) -> None:
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed()

    # --- sending and latching ---

    def send(self, data: bytes) -> None:
        """Send one packet to the peer; drop it if the peer is unknown or the buffer is full."""
        target = self.target
        if target is None:
            self.dropped += 1
            return
        try:
            self._sendto(data, target)
        except OSError:
            self.dropped += 1

    def _latch(self, addr: Address) -> bool:
        """Slow path, a packet from a source other than the latched one: latch onto it or not."""
        if self.source is None or addr == self.announced:
            # The address the SDP announced always wins at once: after a transfer or a
            # retrieve the phone that had the call may still send for a moment, and waiting
            # `relatch_after` for it to fall silent would cost the new phone 2 s of audio.
            if self.source is not None:
                self.relatches += 1
            self.source = self.target = addr
            return True
        now = time.monotonic()
        if self._probe_rx != self.rx_packets:  # the latched source spoke since the last probe
            self._probe_rx = self.rx_packets
            self._probe_at = now
        elif now - self._probe_at >= self.relatch_after:
            self.source = self.target = addr
            self.relatches += 1
            self._probe_rx = -1
            return True
        self.ignored += 1
        return False

    def set_announced(self, addr: Address | None) -> None:
        """Record where the SDP says to send. A new address also forgets the latch.

        A changed address means a new media source (re-INVITE after a transfer, a phone that
        moved): its packets will come from elsewhere. The same address (a re-INVITE for hold)
        keeps the latch, since a phone behind NAT announces an address we cannot reach.
        """
        if addr == self.announced:
            return
        self.announced = addr
        self.source = None
        self.target = addr
        self._probe_rx = -1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        else:  # never attached to a loop: nobody will call connection_lost
            self.sock.close()
            self.connection_lost(None)


class RtpEndpoint:
    """One leg's media: RTP on an even port, RTCP on the next one, both on `address`.

    Built by `MediaManager.allocate_endpoint`; `port` is what goes into the SDP for the leg.
    `on_closed` runs once both sockets are closed, when the port pair may be reused.
    """

    __slots__ = (
        "_on_closed",
        "_open",
        "_released",
        "_waiter",
        "address",
        "bridge",
        "port",
        "rtcp",
        "rtp",
    )

    def __init__(
        self,
        rtp: socket.socket,
        rtcp: socket.socket,
        on_closed: Callable[[RtpEndpoint], None],
        relatch_after: tuple[float, float] = (RTP_RELATCH_AFTER, RTCP_RELATCH_AFTER),
    ) -> None:
        self.address: str = rtp.getsockname()[0]
        self.port: int = rtp.getsockname()[1]
        self.rtp = RtpSocket(rtp, relatch_after[0], self._socket_closed)
        self.rtcp = RtpSocket(rtcp, relatch_after[1], self._socket_closed)
        self.bridge: Bridge | None = None  # the bridge that owns our on_packet handlers
        self._on_closed: Callable[[RtpEndpoint], None] | None = on_closed
        self._open = 2  # sockets not closed yet
        self._released = False
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<RtpEndpoint {self.address}:{self.port} rtp->{self.rtp.target}>"

    @property
    def rtcp_port(self) -> int:
        return self.port + 1

    @property
    def released(self) -> bool:
        """True once `close` was called (the sockets may still be closing)."""
        return self._released

    def set_remote(self, rtp: Address | None, rtcp: Address | None = None) -> None:
        """Tell the endpoint where the leg's SDP says to send (None: unknown or held).

        `rtcp` defaults to the RTP port + 1 (pass `SessionDescription.rtcp_address` to honour
        `a=rtcp:`). Addresses must be IP literals of the endpoint's family: a host name would
        make the fast path resolve names.
        """
        if self.released:
            raise EndpointClosed(f"endpoint {self.address}:{self.port} is released")
        if rtp is not None and rtcp is None:
            rtcp = (rtp[0], rtp[1] + 1)
        self.rtp.set_announced(self._check(rtp))
        self.rtcp.set_announced(self._check(rtcp))

    def _check(self, addr: Address | None) -> Address | None:
        if addr is None:
            return None
        ip = ipaddress.ip_address(addr[0])  # ValueError for a host name
        if (ip.version == 6) != (":" in self.address):
            raise ValueError(f"{addr[0]} is not of the address family of {self.address}")
        return addr

    def close(self) -> None:
        """Close both sockets; `MediaManager.release` is the normal way to get here."""
        if self._released:
            return
        self._released = True
        self.rtp.close()
        self.rtcp.close()

    async def wait_closed(self) -> None:
        """Wait until both sockets are closed (their ports are then free to bind again)."""
        if self._open == 0:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)

    def _socket_closed(self) -> None:
        self._open -= 1
        if self._open:
            return
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
