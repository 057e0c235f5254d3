"""Bridges: who gets the packets an endpoint receives.

A `Bridge` owns the `on_packet` handlers of its endpoints while it is started; stopping it puts
the drop handler back. `RelayBridge` forwards two endpoints to each other (RTP to RTP, RTCP to
RTCP) by installing the other side's `RtpSocket.send` as the handler: one Python call per packet,
no parsing. Where the two phones number a payload format differently (D9, media/ptmap.py), that
direction's RTP handler is a small function instead, rewriting the payload type in byte 1 through
a 256-entry table; RTCP, and every direction that needs no map, keep the bare `send`. Future media
functions plug in at the same place:

- a recorder taps a relay bridge (`RelayBridge.set_tap`): its tap sees every forwarded packet
  after it was sent, and the untapped fast path stays as it is;
- a conference mixer is another `Bridge` subclass taking n endpoints and installing handlers that
  feed its mixing buffers instead of a peer socket.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from media.endpoint import PacketHandler, RtpEndpoint, RtpSocket, drop
from media.errors import BridgeError, EndpointClosed
from media.ptmap import Heads, PtMaps, heads

log = logging.getLogger(__name__)

Tap = Callable[[RtpEndpoint, bool, bytes], None]
"""Sees each forwarded packet: (endpoint it arrived on, is_rtcp, packet). Must be quick.
The packet is as it arrived, in the sending phone's payload type numbering (D9)."""


@dataclass(frozen=True, slots=True, init=False)
class FlowStats:
    """One direction of a bridge since it started."""

    rtp_packets: int
    rtp_bytes: int
    rtcp_packets: int
    dropped: int  # packets that could not be sent on (peer address unknown, buffer full)

    def __init__(self, rtp_packets: int, rtp_bytes: int, rtcp_packets: int, dropped: int) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "rtp_packets", rtp_packets)
        object.__setattr__(self, "rtp_bytes", rtp_bytes)
        object.__setattr__(self, "rtcp_packets", rtcp_packets)
        object.__setattr__(self, "dropped", dropped)

    def as_dict(self) -> dict[str, int]:
        """What `dataclasses.asdict` gives, without its recursive deep copy (~40,000
        instructions for a bridge's stats, logged once per call)."""
        return {
            "rtp_packets": self.rtp_packets,
            "rtp_bytes": self.rtp_bytes,
            "rtcp_packets": self.rtcp_packets,
            "dropped": self.dropped,
        }


@dataclass(frozen=True, slots=True, init=False)
class BridgeStats:
    a_to_b: FlowStats
    b_to_a: FlowStats

    def __init__(self, a_to_b: FlowStats, b_to_a: FlowStats) -> None:
        object.__setattr__(self, "a_to_b", a_to_b)
        object.__setattr__(self, "b_to_a", b_to_a)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """`dataclasses.asdict(self)`, written out (see `FlowStats.as_dict`)."""
        return {"a_to_b": self.a_to_b.as_dict(), "b_to_a": self.b_to_a.as_dict()}


class Bridge(ABC):
    """Owns the packet handlers of `endpoints` between `start` and `stop`."""

    __slots__ = ("active", "endpoints")

    def __init__(self, *endpoints: RtpEndpoint) -> None:
        if len(set(map(id, endpoints))) != len(endpoints):
            raise BridgeError("an endpoint cannot be bridged to itself")
        self.endpoints = endpoints
        self.active = False

    def start(self) -> None:
        """Take over the endpoints' handlers; each endpoint can be in one bridge at a time."""
        for ep in self.endpoints:
            if ep.released:
                raise EndpointClosed(f"{ep!r} is released")
            if ep.bridge is not None and ep.bridge is not self:
                raise BridgeError(f"{ep!r} is already bridged")
        for ep in self.endpoints:
            ep.bridge = self
        self.active = True
        self._install()

    def stop(self) -> None:
        """Give the handlers back: the endpoints keep latching and counting, and drop."""
        if not self.active:
            return
        self.active = False
        for ep in self.endpoints:
            ep.rtp.on_packet = drop
            ep.rtcp.on_packet = drop
            ep.bridge = None

    @abstractmethod
    def _install(self) -> None:
        """Set the endpoints' `on_packet` handlers."""


class RelayBridge(Bridge):
    """Forwards everything `a` receives to `b`'s remote and vice versa."""

    __slots__ = ("_base", "_maps", "_tables", "_tap")

    def __init__(
        self,
        a: RtpEndpoint,
        b: RtpEndpoint,
        tap: Tap | None = None,
        pt_maps: PtMaps | None = None,
    ) -> None:
        super().__init__(a, b)
        self._tap = tap
        self._base: tuple[int, ...] = (0,) * 8
        self._maps: PtMaps | None = None
        self._tables: tuple[Heads | None, Heads | None] = (None, None)
        self._set_maps(pt_maps)

    @property
    def a(self) -> RtpEndpoint:
        return self.endpoints[0]

    @property
    def b(self) -> RtpEndpoint:
        return self.endpoints[1]

    def start(self) -> None:
        super().start()
        self._base = self._counters()

    def set_tap(self, tap: Tap | None) -> None:
        """Install (or remove, with None) a tap, e.g. a recorder, on a running bridge."""
        self._tap = tap
        if self.active:
            self._install()

    @property
    def pt_maps(self) -> PtMaps | None:
        """The payload type maps in force (None: both directions forwarded untouched)."""
        return self._maps

    def set_pt_maps(self, pt_maps: PtMaps | None) -> None:
        """Change the payload type maps of a bridge (after a re-INVITE changed the numbering)."""
        if pt_maps == self._maps:
            return
        self._set_maps(pt_maps)
        if self.active:
            self._install()

    def _set_maps(self, pt_maps: PtMaps | None) -> None:
        if pt_maps is None or pt_maps == (None, None):
            self._maps, self._tables = None, (None, None)
            return
        self._maps = pt_maps
        a_to_b, b_to_a = pt_maps
        self._tables = (
            heads(a_to_b) if a_to_b else None,
            heads(b_to_a) if b_to_a else None,
        )

    def stats(self) -> BridgeStats:
        now = self._counters()
        d = [n - b for n, b in zip(now, self._base, strict=True)]
        return BridgeStats(FlowStats(*d[0:4]), FlowStats(*d[4:8]))

    def _counters(self) -> tuple[int, ...]:
        a, b = self.endpoints
        return (
            *(a.rtp.rx_packets, a.rtp.rx_bytes, a.rtcp.rx_packets, b.rtp.dropped + b.rtcp.dropped),
            *(b.rtp.rx_packets, b.rtp.rx_bytes, b.rtcp.rx_packets, a.rtp.dropped + a.rtcp.dropped),
        )

    def _install(self) -> None:
        a, b = self.endpoints
        for src, dst, pt_table in ((a, b, self._tables[0]), (b, a, self._tables[1])):
            src.rtp.on_packet = self._forwarder(src, dst.rtp, False, pt_table)
            src.rtcp.on_packet = self._forwarder(src, dst.rtcp, True, None)  # RTCP: never

    def _forwarder(
        self, src: RtpEndpoint, dst: RtpSocket, is_rtcp: bool, pt_table: Heads | None
    ) -> PacketHandler:
        tap = self._tap
        send: PacketHandler = dst.send
        if pt_table is not None:
            send = _rewriting(send, pt_table)
        if tap is None:
            return send  # the fast path: `dst.send` itself when there is no map

        def forward(data: bytes) -> None:
            send(data)
            try:
                tap(src, is_rtcp, data)
            except Exception:
                # A broken recorder must not cost the call its audio: drop the tap, keep relaying.
                log.exception("media tap failed, removing it")
                self.set_tap(None)

        return forward


def _rewriting(send: PacketHandler, table: Heads) -> PacketHandler:
    """`send` behind a payload type rewrite (see `media.ptmap.heads`).

    An unmapped payload type costs two indexings and a compare; a mapped one also one
    concatenation (bytes are immutable: the packet is copied once, header bytes prebuilt).
    A packet too short to have a byte 1 goes out as it came.
    """

    def forward(data: bytes) -> None:
        try:
            column = table[data[1]]
        except IndexError:
            send(data)
            return
        if column is not None:
            data = column[data[0]] + data[2:]
        send(data)

    return forward
