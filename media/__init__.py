"""Media for the softswitch: SDP rewriting, RTP/RTCP port allocation and the RTP relay.

One-way dependency: media/ never imports softswitch/ or dialplan/. The B2BUA drives it:

    manager = MediaManager("192.0.2.1", 20000, 29999)          # one per service
    offer = parse_sdp(body_from_a)                              # SdpError -> 400/488
    ep_a = await manager.allocate_endpoint()                    # PortsExhausted -> 503
    ep_b = await manager.allocate_endpoint()                    # (one pair per leg and m= line)
    ep_a.set_remote(offer.rtp_address(0), offer.rtcp_address(0))
    body_to_b = rewrite(offer, manager.address, [ep_b.port], origin_b)
    answer = parse_sdp(body_from_b)
    ep_b.set_remote(answer.rtp_address(0), answer.rtcp_address(0))
    body_to_a = rewrite(answer, manager.address, [ep_a.port], origin_a)
    bridge = manager.bridge(ep_a, ep_b)
    ...
    manager.release(ep_a); manager.release(ep_b)               # on BYE; idempotent
"""

from media.bridge import Bridge, BridgeStats, FlowStats, RelayBridge, Tap
from media.endpoint import Address, PacketHandler, RtpEndpoint, RtpSocket, drop
from media.errors import BridgeError, EndpointClosed, MediaError, PortsExhausted, SdpError
from media.ports import PortAllocator
from media.ptmap import PtMap, PtMaps, pt_map, pt_maps
from media.relay import MediaManager, MediaStats
from media.sdp import (
    Connection,
    Direction,
    MediaSection,
    Origin,
    OriginState,
    SessionDescription,
    is_hold,
    parse_sdp,
    rewrite,
)

__all__ = [
    "Address",
    "Bridge",
    "BridgeError",
    "BridgeStats",
    "Connection",
    "Direction",
    "EndpointClosed",
    "FlowStats",
    "MediaError",
    "MediaManager",
    "MediaSection",
    "MediaStats",
    "Origin",
    "OriginState",
    "PacketHandler",
    "PortAllocator",
    "PortsExhausted",
    "PtMap",
    "PtMaps",
    "RelayBridge",
    "RtpEndpoint",
    "RtpSocket",
    "SdpError",
    "SessionDescription",
    "Tap",
    "drop",
    "is_hold",
    "parse_sdp",
    "pt_map",
    "pt_maps",
    "rewrite",
]
