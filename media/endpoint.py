"""One leg's media endpoint: an RTP and an RTCP UDP port with symmetric latching.

`on_packet` is the plug point: every packet from the latched source is handed to it. It drops
by default, a `RelayBridge` points it at the other leg's `RtpSocket.send`, a recorder or a mixer
can put its own callable there. Nothing on the packet path parses RTP, awaits or allocates
beyond the packet's own bytes (a bridge that renumbers payload types reads header byte 1 and
copies the packet once, and only in the directions that need it: D9).

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

How the packets are read (D14 in docs/decisions.md). Sockets are read through the manager's
`Poller` (one epoll set for all of them, one reader on the event loop: see media/poller.py),
one packet per readiness event. Each port is a bound, unconnected socket (the *listener*) read
with `recvfrom`: every packet before the latch, and strangers' after it, arrive there and go
through the latching rules. Once latched, the port gets
a second socket, bound to the same address and port (SO_REUSEPORT) and `connect`ed to the
latched source (the *peer* socket): the kernel then delivers that source's packets to it and
everything else to the listener, so the fast path is `recv` -> `on_packet` -> the other leg's
`send`, with no address to build, compare or parse per packet and no route lookup per send
(the connected socket caches it). The peer socket is made a few loop iterations after the
latch (`Poller.later`, a bounded number per iteration), so that a thousand calls starting at
once do not stall everyone's audio; until then the listener carries the packets. A re-latch
reconnects the peer socket; a new SDP address closes it. SO_REUSEPORT is set on the listener
only after it is bound, so another process binding the same port without it (another
softswitch on an overlapping range) still fails with EADDRINUSE instead of sharing the port.
Where a peer socket cannot be made (not Linux, the socket was never attached to a loop)
everything goes through the listener, as before. Sends that fail (a full send buffer, ICMP
errors a connected socket reports) drop the packet instead of queueing it, which is what
real-time media wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from media.errors import EndpointClosed
from media.poller import Poller

#: Memoised: every offer and answer of a call names the same few addresses (~10 µs a parse).
_ip_address = functools.lru_cache(maxsize=1024)(ipaddress.ip_address)

if TYPE_CHECKING:
    from media.bridge import Bridge

Address = tuple[Any, ...]
"""A socket address as the socket module reports it: (host, port), or 4 items for IPv6."""

PacketHandler = Callable[[bytes], None]
"""What an endpoint socket does with every packet from its latched source."""

RTP_RELATCH_AFTER = 2.0
RTCP_RELATCH_AFTER = 12.0

DRAIN: Final = 8
"""Packets a peer socket reads per readiness event when the relay is behind (media/poller.py)."""

RECV_SIZE: Final = 65536
"""Read buffer per packet: the largest UDP payload, so that no packet is ever cut short (the
bytes object is shrunk to the packet's size, so this costs no memory per packet)."""

PEER_SOCKETS: Final = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
"""Connected peer sockets need Linux's SO_REUSEPORT lookup (a connected socket wins over the
unconnected one for its own source); elsewhere the listener reads everything."""


def drop(data: bytes) -> None:
    """The handler of an unbridged socket: packets are counted, then discarded."""


class RtpSocket:
    """One UDP port of an endpoint (RTP or RTCP): receive, latch, hand over, send."""

    __slots__ = (
        "_on_closed",
        "_peer",
        "_poller",
        "_probe_at",
        "_probe_rx",
        "_recv",
        "_send",
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
        self.sock = sock  # the listener: bound, never connected
        self._peer: socket.socket | None = None  # connected to `source`, once latched
        self._recv: Callable[[int], bytes] = _nothing  # the peer socket's recv
        self._send: Callable[[bytes], object] = self._send_to_target
        self._poller: Poller | None = None
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

    @property
    def connected(self) -> bool:
        """True while the latched source has a connected socket of its own (the fast path)."""
        return self._peer is not None

    # --- reading ---

    def attach(self, poller: Poller) -> None:
        """Start reading through `poller` (the socket must be non-blocking)."""
        self._poller = poller
        poller.add(self.sock.fileno(), self._read_listener)

    def _read_peer(self) -> None:
        """The fast path: one packet from the latched source (the kernel matched the address).

        One packet per call: at 50 packets/s a socket rarely holds two, and a loop that reads
        until EAGAIN would pay a failed system call and an exception for nearly every packet.
        Callables held in slots are read into locals before the call: `self.x(...)` compiles to
        a method lookup that CPython 3.11 cannot specialise for slots (5 % of the relay's CPU).
        """
        recv = self._recv
        try:
            data = recv(RECV_SIZE)
        except OSError:  # nothing after all, or an ICMP error the connected socket reports
            return
        self.rx_packets += 1
        self.rx_bytes += len(data)
        handler = self.on_packet
        handler(data)

    def _drain_peer(self) -> None:
        """`_read_peer` for when the relay is behind: up to `DRAIN` packets in one go."""
        recv = self._recv
        for _ in range(DRAIN):
            try:
                data = recv(RECV_SIZE)
            except OSError:
                return
            self.rx_packets += 1
            self.rx_bytes += len(data)
            handler = self.on_packet
            handler(data)

    def _read_listener(self) -> None:
        """One packet before the latch, from a stranger, or queued before the peer socket."""
        try:
            data, addr = self.sock.recvfrom(RECV_SIZE)
        except OSError:
            return
        self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """A packet and its source address: latch or ignore, count, hand over."""
        if addr != self.source and not self._latch(addr):
            return
        self.rx_packets += 1
        self.rx_bytes += len(data)
        self.on_packet(data)

    # --- sending and latching ---

    def send(self, data: bytes) -> None:
        """Send one packet to the peer; drop it if the peer is unknown or the buffer is full."""
        send = self._send  # a local first: see `_read_peer`
        try:
            send(data)
        except OSError:
            self.dropped += 1

    def _send_to_target(self, data: bytes) -> None:
        """`send` before a latch (or without a peer socket): to the target, from the listener."""
        target = self.target
        if target is None:
            self.dropped += 1
            return
        self.sock.sendto(data, target)

    def _latch(self, addr: Address) -> bool:
        """Slow path, a packet from a source other than the latched one: latch onto it or not."""
        if self.source is None or addr == self.announced:
            # The address the SDP announced always wins at once: after a transfer or a
            # retrieve the phone that had the call may still send for a moment, and waiting
            # `relatch_after` for it to fall silent would cost the new phone 2 s of audio.
            if self.source is not None:
                self.relatches += 1
            self._latch_onto(addr)
            return True
        now = time.monotonic()
        if self._probe_rx != self.rx_packets:  # the latched source spoke since the last probe
            self._probe_rx = self.rx_packets
            self._probe_at = now
        elif now - self._probe_at >= self.relatch_after:
            self._latch_onto(addr)
            self.relatches += 1
            self._probe_rx = -1
            return True
        self.ignored += 1
        return False

    def _latch_onto(self, addr: Address) -> None:
        self.source = self.target = addr
        if self._peer is not None:  # a re-latch: reconnecting is one cheap system call
            self._connect(self._peer, addr)
        elif self._poller is not None and PEER_SOCKETS:
            # A new socket costs ~50 us; when a thousand calls start (or relatch) at once, doing
            # it here would stall every call's audio for 50 ms. The listener carries the
            # source's packets until its turn comes.
            self._poller.later(self._make_peer)

    def _make_peer(self) -> None:
        """Give the latched source its connected socket, if it is still latched and open."""
        source, poller = self.source, self._poller
        if source is None or poller is None or self._peer is not None or self._on_closed is None:
            return
        try:
            peer = _peer_socket(self.sock)
        except OSError:  # no fast path for this source: the listener reads everything
            return
        self._peer = peer
        poller.add(peer.fileno(), self._read_peer, self._drain_peer)
        self._connect(peer, source)

    def _connect(self, peer: socket.socket, addr: Address) -> None:
        """Point the peer socket at the latched source; from now on it carries the packets."""
        try:
            peer.connect(addr)
        except OSError:
            self._disconnect()
            return
        self._recv = peer.recv
        self._send = peer.send

    def _disconnect(self) -> None:
        """Close the peer socket: every source reaches the listener again."""
        peer, self._peer = self._peer, None
        self._recv = _nothing
        self._send = self._send_to_target
        if peer is None:
            return
        if self._poller is not None:
            self._poller.remove(peer.fileno())
        peer.close()

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
        self._disconnect()

    def reset(self) -> None:
        """Back to the state of a fresh socket: no latch, no addresses, no counts, dropping.

        A pooled endpoint has been reading (and dropping, or latching onto) whatever strangers
        sent to its ports while it waited; none of that may follow it into a call.
        """
        self._disconnect()
        self.on_packet = drop
        self.announced = self.source = self.target = None
        self.rx_packets = self.rx_bytes = self.dropped = self.ignored = self.relatches = 0
        self._probe_rx = -1

    def close(self) -> None:
        """Close both sockets at once (the port is free again when this returns)."""
        if self._on_closed is None:
            return
        self._disconnect()
        if self._poller is not None:
            self._poller.remove(self.sock.fileno())
        self.sock.close()
        on_closed, self._on_closed = self._on_closed, None
        on_closed()


def _nothing(size: int) -> bytes:
    """The peer `recv` while there is no peer socket (a stale readiness event)."""
    raise BlockingIOError


def _peer_socket(listener: socket.socket) -> socket.socket:
    """A socket bound to the listener's address and port, to be connected to one source.

    SO_REUSEPORT goes on the listener only now, after its bind: until then no other socket,
    ours or another process's, could share the port.
    """
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    peer = socket.socket(listener.family, socket.SOCK_DGRAM)
    try:
        peer.setblocking(False)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _copy_tos(listener, peer)
        peer.bind(listener.getsockname())
    except OSError:
        peer.close()
        raise
    return peer


def _copy_tos(src: socket.socket, dst: socket.socket) -> None:
    """The peer socket sends the call's packets: it needs the listener's QoS marking."""
    if src.family == socket.AF_INET6:
        level, option = socket.IPPROTO_IPV6, socket.IPV6_TCLASS
    else:
        level, option = socket.IPPROTO_IP, socket.IP_TOS
    with contextlib.suppress(OSError):  # best effort, like the marking itself
        dst.setsockopt(level, option, src.getsockopt(level, option))


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
        ip = _ip_address(addr[0])  # ValueError for a host name
        if (ip.version == 6) != (":" in self.address):
            raise ValueError(f"{addr[0]} is not of the address family of {self.address}")
        return addr

    def reset(self) -> None:
        """Forget everything since the sockets were bound (a pooled endpoint handed out)."""
        self.rtp.reset()
        self.rtcp.reset()

    def attach(self, poller: Poller) -> None:
        """Start reading both sockets through `poller`."""
        self.rtp.attach(poller)
        self.rtcp.attach(poller)

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
