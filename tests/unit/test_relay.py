"""The RTP relay on 127.0.0.1 with real UDP sockets, under stock asyncio and under uvloop.

Fake phones are plain asyncio datagram sockets; RTP and RTCP packets are built with aiortc.
Each test runs in its own loop (the `run` fixture) and is bounded by `TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import pytest
import uvloop
from aiortc.rtp import RtcpReceiverInfo, RtcpRrPacket, RtpPacket, is_rtcp

from media import (
    BridgeError,
    EndpointClosed,
    MediaManager,
    PortsExhausted,
    PtMaps,
    RelayBridge,
    RtpEndpoint,
)
from media.endpoint import PEER_SOCKETS

HOST = "127.0.0.1"
TIMEOUT = 5.0
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Run a scenario on a fresh loop of the parametrised kind, bounded in time."""

    def runner(scenario: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(asyncio.wait_for(scenario, TIMEOUT))

    return runner


def free_range(pairs: int) -> tuple[int, int]:
    """An even-based port range of `pairs` pairs that binds right now, below the ephemeral range
    and away from the service's default media range (20000-20999)."""
    for _ in range(200):
        low = random.randrange(21000, 32000 - 2 * pairs, 2)
        ports = range(low, low + 2 * pairs)
        if all(_bindable(p) for p in ports):
            return low, low + 2 * pairs - 1
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def rtp(seq: int, ssrc: int = 0x1234, payload_type: int = 0) -> bytes:
    return RtpPacket(
        payload_type, False, seq, seq * 160, ssrc, bytes([seq % 256]) * 160
    ).serialize()


def rtcp_rr(ssrc: int) -> bytes:
    report = RtcpReceiverInfo(ssrc + 1, 0, 0, 7, 0, 0, 0)
    return bytes(RtcpRrPacket(ssrc=ssrc, reports=[report]))


class Phone(asyncio.DatagramProtocol):
    """A UDP socket that records what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._arrived = asyncio.Event()
        self.transport: asyncio.DatagramTransport

    @classmethod
    async def open(cls, port: int = 0) -> Phone:
        loop = asyncio.get_running_loop()
        _, phone = await loop.create_datagram_endpoint(cls, local_addr=(HOST, port))
        return phone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.received.append((data, addr))
        self._arrived.set()

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def packets(self) -> list[bytes]:
        return [data for data, _ in self.received]

    def send(self, data: bytes, port: int) -> None:
        self.transport.sendto(data, (HOST, port))

    async def wait_for(self, count: int) -> None:
        while len(self.received) < count:
            self._arrived.clear()
            await self._arrived.wait()

    def close(self) -> None:
        self.transport.close()


async def settle() -> None:
    """Let in-flight loopback datagrams arrive (used only to check that nothing more comes)."""
    await asyncio.sleep(0.05)


async def send_paced(phone: Phone, packets: list[bytes], port: int, receiver: Phone) -> None:
    """Send in bursts of 20, each once the previous one arrived: no socket buffer can overflow,
    however slow the loop (stock asyncio reads one datagram per socket per iteration)."""
    for i in range(0, len(packets), 20):
        for data in packets[i : i + 20]:
            phone.send(data, port)
        await receiver.wait_for(min(i + 20, len(packets)))


async def call(manager: MediaManager) -> tuple[RtpEndpoint, RtpEndpoint, Phone, Phone]:
    """Two phones, an endpoint each, bridged; the endpoints know the phones' SDP addresses."""
    ep_a, ep_b = await manager.allocate_endpoint(), await manager.allocate_endpoint()
    alice, bob = await Phone.open(), await Phone.open()
    ep_a.set_remote(alice.addr)
    ep_b.set_remote(bob.addr)
    manager.bridge(ep_a, ep_b)
    return ep_a, ep_b, alice, bob


def scenario(
    pairs: int = 8, **kwargs: Any
) -> Callable[[Callable[[MediaManager], Awaitable[None]]], Coroutine[Any, Any, None]]:
    """Wrap a test body: a manager on a fresh range, closed (and checked empty) afterwards."""

    def wrap(body: Callable[[MediaManager], Awaitable[None]]) -> Coroutine[Any, Any, None]:
        async def main() -> None:
            manager = MediaManager(HOST, *free_range(pairs), **kwargs)
            try:
                await body(manager)
            finally:
                await manager.close()
            assert manager.ports.in_use == 0

        return main()

    return wrap


# --- relaying ---------------------------------------------------------------------------------


def test_relays_rtp_both_ways_unchanged(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, alice, bob = await call(manager)
        to_bob = [rtp(i, ssrc=0xA) for i in range(300)]
        to_alice = [rtp(i, ssrc=0xB, payload_type=8) for i in range(300)]
        await asyncio.gather(
            send_paced(alice, to_bob, ep_a.port, bob), send_paced(bob, to_alice, ep_b.port, alice)
        )
        await asyncio.gather(bob.wait_for(300), alice.wait_for(300))
        assert bob.packets == to_bob
        assert alice.packets == to_alice
        assert {addr for _, addr in bob.received} == {(HOST, ep_b.port)}  # from our relay port
        assert RtpPacket.parse(bob.packets[7]).sequence_number == 7
        assert isinstance(ep_a.bridge, RelayBridge)
        stats = ep_a.bridge.stats()
        assert stats.a_to_b.rtp_packets == 300 == stats.b_to_a.rtp_packets
        assert stats.a_to_b.rtp_bytes == sum(map(len, to_bob))
        assert stats.a_to_b.dropped == 0

    run(scenario()(body))


def test_rtcp_is_relayed_between_the_odd_ports(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b = await manager.allocate_endpoint(), await manager.allocate_endpoint()
        alice_rtp, alice_rtcp, bob_rtp, bob_rtcp = [await Phone.open() for _ in range(4)]
        # The RTCP addresses are not RTP + 1 here, as `a=rtcp:` (RFC 3605) allows.
        ep_a.set_remote(alice_rtp.addr, alice_rtcp.addr)
        ep_b.set_remote(bob_rtp.addr, bob_rtcp.addr)
        bridge = manager.bridge(ep_a, ep_b)
        assert ep_a.rtcp_port == ep_a.port + 1
        alice_rtcp.send(rtcp_rr(0xA), ep_a.rtcp_port)
        bob_rtcp.send(rtcp_rr(0xB), ep_b.rtcp_port)
        await asyncio.gather(bob_rtcp.wait_for(1), alice_rtcp.wait_for(1))
        assert bob_rtcp.packets == [rtcp_rr(0xA)] and is_rtcp(bob_rtcp.packets[0])
        assert alice_rtcp.packets == [rtcp_rr(0xB)]
        await settle()
        assert not alice_rtp.received and not bob_rtp.received
        assert bridge.stats().a_to_b.rtcp_packets == 1

    run(scenario()(body))


def test_symmetric_latching_reaches_a_phone_behind_nat(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b = await manager.allocate_endpoint(), await manager.allocate_endpoint()
        alice, announced, nat = await Phone.open(), await Phone.open(), await Phone.open()
        ep_a.set_remote(alice.addr)
        ep_b.set_remote(announced.addr)  # bob's SDP names his private address...
        manager.bridge(ep_a, ep_b)
        alice.send(rtp(1), ep_a.port)
        await announced.wait_for(1)  # ...used until bob's first packet arrives
        nat.send(rtp(100, ssrc=0xB), ep_b.port)  # ...which comes from his NAT mapping
        await alice.wait_for(1)
        for i in range(2, 12):
            alice.send(rtp(i), ep_a.port)
        await nat.wait_for(10)
        assert nat.packets == [rtp(i) for i in range(2, 12)]
        assert len(announced.received) == 1
        assert ep_b.rtp.target == nat.addr

    run(scenario()(body))


def test_a_stranger_cannot_take_over_a_talking_phone(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, alice, bob = await call(manager)
        stranger = await Phone.open()
        bob.send(rtp(1, ssrc=0xB), ep_b.port)
        await alice.wait_for(1)
        for i in range(5):
            stranger.send(rtp(i, ssrc=0xBAD), ep_b.port)
            bob.send(rtp(2 + i, ssrc=0xB), ep_b.port)
            await asyncio.sleep(0.01)
        alice.send(rtp(50), ep_a.port)
        await asyncio.gather(alice.wait_for(6), bob.wait_for(1))
        await settle()
        assert all(RtpPacket.parse(p).ssrc == 0xB for p in alice.packets)
        assert bob.packets == [rtp(50)] and not stranger.received
        assert ep_b.rtp.ignored == 5 and ep_b.rtp.relatches == 0

    run(scenario()(body))


def test_relatch_after_the_latched_source_fell_silent(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, alice, bob = await call(manager)
        moved = await Phone.open()  # bob's NAT mapping changed
        bob.send(rtp(1, ssrc=0xB), ep_b.port)
        await alice.wait_for(1)
        moved.send(rtp(2, ssrc=0xB), ep_b.port)  # starts the silence probe, ignored
        await asyncio.sleep(0.3)  # > relatch_after: bob's old address said nothing
        moved.send(rtp(3, ssrc=0xB), ep_b.port)  # latched
        await alice.wait_for(2)
        alice.send(rtp(60), ep_a.port)
        await moved.wait_for(1)
        assert [RtpPacket.parse(p).sequence_number for p in alice.packets] == [1, 3]
        assert ep_b.rtp.relatches == 1 and ep_b.rtp.ignored == 1

    run(scenario(relatch_after=(0.2, 0.2))(body))


@pytest.mark.skipif(not PEER_SOCKETS, reason="connected peer sockets need Linux")
def test_the_latched_source_gets_a_connected_socket_and_nobody_else_gets_the_port(
    run: Run,
) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, alice, bob = await call(manager)
        assert not ep_b.rtp.connected and not _bindable(ep_b.port)
        bob.send(rtp(1, ssrc=0xB), ep_b.port)
        await alice.wait_for(1)
        assert ep_b.rtp.connected and not ep_b.rtcp.connected  # RTCP has not spoken yet
        assert not _bindable(ep_b.port)  # SO_REUSEPORT on our sockets lets no one else in
        alice.send(rtp(2), ep_a.port)
        await bob.wait_for(1)
        assert bob.received == [(rtp(2), (HOST, ep_b.port))]  # sent from the relay port
        ep_b.set_remote(("127.0.0.1", 9))  # a new SDP address: back to the listener
        assert not ep_b.rtp.connected

    run(scenario()(body))


def test_the_announced_phone_takes_over_from_a_latched_one(run: Run) -> None:
    """A transfer: the leg's SDP names a new phone while the old one still sends."""

    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, alice, old = await call(manager)
        new = await Phone.open()
        old.send(rtp(1, ssrc=0x01D), ep_b.port)
        await alice.wait_for(1)
        ep_b.set_remote(new.addr)
        old.send(rtp(2, ssrc=0x01D), ep_b.port)  # first after the change: latched again
        await alice.wait_for(2)
        new.send(rtp(3, ssrc=0x9E3), ep_b.port)  # the announced phone wins at once
        await alice.wait_for(3)
        old.send(rtp(4, ssrc=0x01D), ep_b.port)  # and the old one is ignored from now on
        alice.send(rtp(50), ep_a.port)
        await new.wait_for(1)
        await settle()
        assert [RtpPacket.parse(p).sequence_number for p in alice.packets] == [1, 2, 3]
        assert ep_b.rtp.source == new.addr and ep_b.rtp.relatches == 1
        assert ep_b.rtp.ignored == 1 and not old.received

    run(scenario()(body))


def test_new_sdp_address_forgets_the_latch_same_address_keeps_it(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, alice, bob = await call(manager)
        nat, carol = await Phone.open(), await Phone.open()
        nat.send(rtp(1), ep_b.port)
        await alice.wait_for(1)
        ep_b.set_remote(bob.addr)  # re-INVITE (hold/resume) with the same SDP address
        assert ep_b.rtp.target == nat.addr
        ep_b.set_remote(carol.addr)  # transfer: a new device behind the same leg
        assert ep_b.rtp.target == carol.addr and ep_b.rtp.source is None
        alice.send(rtp(2), ep_a.port)
        await carol.wait_for(1)

    run(scenario()(body))


def test_held_leg_drops_and_counts(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b = await manager.allocate_endpoint(), await manager.allocate_endpoint()
        alice = await Phone.open()
        ep_a.set_remote(alice.addr)
        ep_b.set_remote(None)  # c=0.0.0.0, and bob has not sent anything
        bridge = manager.bridge(ep_a, ep_b)
        for i in range(3):
            alice.send(rtp(i), ep_a.port)
        while bridge.stats().a_to_b.dropped < 3:
            await asyncio.sleep(0.005)
        assert manager.stats().dropped == 3

    run(scenario()(body))


# --- bridges ----------------------------------------------------------------------------------


def test_unbridge_and_bridge_elsewhere_like_a_transfer(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, _, alice, bob = await call(manager)
        ep_c, carol = await manager.allocate_endpoint(), await Phone.open()
        ep_c.set_remote(carol.addr)
        with pytest.raises(BridgeError):
            manager.bridge(ep_a, ep_c)
        assert ep_a.bridge is not None
        manager.unbridge(ep_a.bridge)
        alice.send(rtp(1), ep_a.port)  # unbridged: received, counted, dropped
        while ep_a.rtp.rx_packets < 1:
            await asyncio.sleep(0.005)
        manager.bridge(ep_a, ep_c)
        alice.send(rtp(2), ep_a.port)
        await carol.wait_for(1)
        await settle()
        assert carol.packets == [rtp(2)] and not bob.received

    run(scenario()(body))


def test_bridge_refuses_released_and_self(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b = await manager.allocate_endpoint(), await manager.allocate_endpoint()
        with pytest.raises(BridgeError):
            manager.bridge(ep_a, ep_a)
        manager.release(ep_b)
        with pytest.raises(EndpointClosed):
            manager.bridge(ep_a, ep_b)
        with pytest.raises(EndpointClosed):
            ep_b.set_remote((HOST, 4000))
        with pytest.raises(ValueError):
            ep_a.set_remote(("phone.example.com", 4000))
        with pytest.raises(ValueError):
            ep_a.set_remote(("::1", 4000))

    run(scenario()(body))


def test_tap_sees_forwarded_packets_and_a_failing_tap_is_removed(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, alice, bob = await call(manager)
        assert isinstance(ep_a.bridge, RelayBridge)
        seen: list[tuple[int, bool, bytes]] = []
        ep_a.bridge.set_tap(lambda ep, is_rtcp, data: seen.append((ep.port, is_rtcp, data)))
        alice.send(rtp(1), ep_a.port)
        await bob.wait_for(1)
        assert seen == [(ep_a.port, False, rtp(1))]

        def broken(ep: RtpEndpoint, is_rtcp: bool, data: bytes) -> None:
            raise RuntimeError("disk full")

        ep_a.bridge.set_tap(broken)
        for i in (2, 3):
            alice.send(rtp(i), ep_a.port)
        await bob.wait_for(3)  # relaying went on
        assert bob.packets == [rtp(1), rtp(2), rtp(3)]
        assert ep_a.rtp.on_packet == ep_b.rtp.send  # the fast path is back

    run(scenario()(body))


def test_payload_types_are_rewritten_where_the_phones_number_them_differently(run: Run) -> None:
    """D9: alice knows telephone-event as 101, bob as 96; PCMU (0) and unknown 97 pass as they
    are, the marker bit and everything after byte 1 survive, RTCP is never touched (its byte 1,
    0xC9 for a receiver report, would be "marker + 73" if read as RTP)."""

    async def body(manager: MediaManager) -> None:
        ep_a, ep_b = await manager.allocate_endpoint(), await manager.allocate_endpoint()
        alice, bob, alice_rtcp, bob_rtcp = [await Phone.open() for _ in range(4)]
        ep_a.set_remote(alice.addr, alice_rtcp.addr)
        ep_b.set_remote(bob.addr, bob_rtcp.addr)
        bridge = manager.bridge(ep_a, ep_b, pt_maps=PtMaps({101: 96, 73: 9}, {96: 101}))
        dtmf_start = RtpPacket(101, True, 2, 320, 0xA, b"\x05\x0a\x00\xa0").serialize()
        sent = [rtp(1), dtmf_start, rtp(3, payload_type=101), rtp(4, payload_type=97), b"\x80"]
        for data in sent:
            alice.send(data, ep_a.port)
        alice_rtcp.send(rtcp_rr(0xA), ep_a.rtcp_port)
        bob.send(rtp(9, ssrc=0xB, payload_type=96), ep_b.port)
        await asyncio.gather(bob.wait_for(5), alice.wait_for(1), bob_rtcp.wait_for(1))
        got = [RtpPacket.parse(data) for data in bob.packets[:4]]
        assert [(p.payload_type, p.marker) for p in got] == [(0, 0), (96, 1), (96, 0), (97, 0)]
        assert bob.packets[1][2:] == dtmf_start[2:] and bob.packets[0] == rtp(1)
        assert bob.packets[4] == b"\x80"  # too short to carry a payload type: as it came
        assert bob_rtcp.packets == [rtcp_rr(0xA)]
        assert alice.packets == [rtp(9, ssrc=0xB, payload_type=101)]
        assert bridge.stats().a_to_b.rtp_packets == 5

    run(scenario()(body))


def test_directions_without_a_map_keep_the_bare_send(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, alice, bob = await call(manager)
        bridge = ep_a.bridge
        assert isinstance(bridge, RelayBridge)
        bridge.set_pt_maps(PtMaps({101: 96}, None))
        assert ep_a.rtp.on_packet != ep_b.rtp.send  # a -> b rewrites
        assert ep_b.rtp.on_packet == ep_a.rtp.send  # b -> a: the fast path as it was
        assert ep_a.rtcp.on_packet == ep_b.rtcp.send  # RTCP: always
        alice.send(rtp(1, payload_type=101), ep_a.port)
        await bob.wait_for(1)
        assert RtpPacket.parse(bob.packets[0]).payload_type == 96
        bridge.set_pt_maps(None)  # a re-INVITE made the numbering agree again
        assert ep_a.rtp.on_packet == ep_b.rtp.send and bridge.pt_maps is None
        alice.send(rtp(2, payload_type=101), ep_a.port)
        await bob.wait_for(2)
        assert bob.packets[1] == rtp(2, payload_type=101)

    run(scenario()(body))


# --- ports ------------------------------------------------------------------------------------


def test_release_frees_the_ports(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        ep_a, ep_b, _, _ = await call(manager)
        ports = [ep_a.port, ep_a.rtcp_port, ep_b.port, ep_b.rtcp_port]
        manager.release(ep_a)
        manager.release(ep_a)  # idempotent
        manager.release(ep_b)
        await asyncio.gather(ep_a.wait_closed(), ep_b.wait_closed())
        assert manager.ports.in_use == 0 and manager.stats().endpoints == 0
        for port in ports:
            assert _bindable(port), port

    run(scenario(pool=0)(body))  # a pool would take the released pairs again


# --- the pool of bound endpoints ----------------------------------------------------------------


async def let_the_pool_fill() -> None:
    """The pool tops itself up one endpoint per loop iteration."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_the_pool_hands_out_bound_endpoints_and_refills(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        low = manager.ports.low
        first = await manager.allocate_endpoint()  # the pool is empty yet: bound on the spot
        assert first.port == low and manager.stats().pooled == 0
        await let_the_pool_fill()
        assert manager.stats().pooled == 2 and manager.ports.in_use == 3
        assert not _bindable(low + 2) and not _bindable(low + 5)  # pooled ports are bound
        second = await manager.allocate_endpoint()
        assert second.port == low + 2 and manager.stats().pooled == 1
        await let_the_pool_fill()
        assert manager.stats().pooled == 2 and manager.stats().endpoints == 2
        _, _, alice, bob = await call(manager)  # pooled endpoints relay like any other
        alice.send(rtp(1), manager.ports.low + 4)
        await bob.wait_for(1)

    run(scenario(pool=2)(body))


def test_take_ready_hands_out_pooled_endpoints_or_nothing(run: Run) -> None:
    """A call's setup takes both its endpoints at once from the pool, or none of them."""

    async def body(manager: MediaManager) -> None:
        assert manager.take_ready(2) is None  # nothing pooled yet, nothing taken
        await manager.allocate_endpoint()
        await let_the_pool_fill()
        assert manager.take_ready(3) is None and manager.stats().pooled == 2
        ready = manager.take_ready(2)
        assert ready is not None and len(ready) == 2
        assert manager.stats().pooled == 0 and manager.stats().endpoints == 3
        await let_the_pool_fill()
        assert manager.stats().pooled == 2

    run(scenario(pool=2)(body))


def test_a_pooled_endpoint_forgets_what_reached_it_while_waiting(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        low = manager.ports.low
        await manager.allocate_endpoint()
        await let_the_pool_fill()
        stranger = await Phone.open()
        for i in range(3):
            stranger.send(rtp(i, ssrc=0xBAD), low + 2)  # the pooled endpoint's RTP port
            stranger.send(rtcp_rr(0xBAD), low + 3)
        await settle()
        ep = await manager.allocate_endpoint()
        assert ep.port == low + 2
        await settle()
        assert ep.rtp.source is None and ep.rtp.rx_packets == 0 and ep.rtcp.source is None
        stranger.send(rtp(9, ssrc=0xBAD), ep.port)  # what comes after the hand-out counts
        while ep.rtp.rx_packets < 1:
            await asyncio.sleep(0.005)
        assert ep.rtp.source == stranger.addr

    run(scenario(pool=1)(body))


def test_the_pool_gives_way_when_the_range_runs_out(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        await manager.allocate_endpoint()
        await let_the_pool_fill()
        assert manager.stats().pooled == 1 and manager.ports.free == 0
        await manager.allocate_endpoint()  # the pooled one
        with pytest.raises(PortsExhausted):
            await manager.allocate_endpoint()

    run(scenario(pairs=2, pool=8)(body))


def test_close_closes_the_pooled_endpoints(run: Run) -> None:
    async def body() -> None:
        low, high = free_range(4)
        manager = MediaManager(HOST, low, high, pool=3)
        await manager.allocate_endpoint()
        await let_the_pool_fill()
        assert manager.stats().pooled == 3
        await manager.close()
        assert manager.ports.in_use == 0 and manager.stats().pooled == 0
        assert all(_bindable(port) for port in range(low, high + 1))

    run(body())


def test_exhausted_range_raises_ports_exhausted(run: Run) -> None:
    async def body(manager: MediaManager) -> None:
        first = await manager.allocate_endpoint()
        await manager.allocate_endpoint()
        with pytest.raises(PortsExhausted):
            await manager.allocate_endpoint()
        manager.release(first)
        await first.wait_closed()
        again = await manager.allocate_endpoint()
        assert again.port == first.port

    run(scenario(pairs=2)(body))


def test_out_of_descriptors_is_ports_exhausted_and_blames_no_port(run: Run) -> None:
    """EMFILE is the process's problem, not the port's: 503 for the call (the B2BUA's answer to
    `PortsExhausted`), and the pair goes back to the range instead of being marked bad."""

    async def body(manager: MediaManager) -> None:
        free = manager.ports.free

        def no_fds(port: int) -> socket.socket:
            raise OSError(errno.EMFILE, "Too many open files")

        manager.open_socket = no_fds
        with pytest.raises(PortsExhausted, match="Too many open files"):
            await manager.allocate_endpoint()
        assert manager.ports.free == free and manager.ports.bind_failures == 0

    run(scenario(pairs=2, pool=0)(body))


def test_a_pair_held_by_another_process_is_skipped(run: Run) -> None:
    low, high = free_range(2)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind((HOST, low + 1))  # only the RTCP port of the first pair is taken

    async def body() -> None:
        manager = MediaManager(HOST, low, high)
        try:
            ep = await manager.allocate_endpoint()
            assert ep.port == low + 2
            assert manager.ports.bind_failures == 1
            with pytest.raises(PortsExhausted):
                await manager.allocate_endpoint()  # low is still taken
        finally:
            await manager.close()

    try:
        run(body())
    finally:
        squatter.close()


def test_close_releases_everything(run: Run) -> None:
    async def body() -> None:
        manager = MediaManager(HOST, *free_range(4))
        endpoints = [await manager.allocate_endpoint() for _ in range(4)]
        manager.bridge(endpoints[0], endpoints[1])
        await manager.close()
        stats = manager.stats()
        assert (stats.endpoints, stats.bridges, stats.ports_in_use) == (0, 0, 0)
        assert all(_bindable(ep.port) and _bindable(ep.rtcp_port) for ep in endpoints)

    run(body())


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "media.example.com"])
def test_manager_needs_an_address_phones_can_be_sent(address: str) -> None:
    with pytest.raises(ValueError):
        MediaManager(address, 30000, 30009)


async def test_the_announced_address_takes_the_latch_back_at_once() -> None:
    """After a transfer the old phone may keep sending; the new, announced one must win."""
    import socket

    from media.endpoint import RtpEndpoint

    def pair() -> tuple[socket.socket, socket.socket]:
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind(("127.0.0.1", 0))
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b.bind(("127.0.0.1", a.getsockname()[1] + 1))
        return a, b

    rtp, rtcp = pair()
    ep = RtpEndpoint(rtp, rtcp, lambda e: None)
    old, new = ("127.0.0.1", 40000), ("127.0.0.1", 40002)
    ep.rtp.datagram_received(b"x", old)
    assert ep.rtp.source == old
    ep.set_remote(new)
    ep.rtp.datagram_received(b"x", old)  # the old phone is latched again (it spoke first)...
    ep.rtp.datagram_received(b"x", new)  # ...but the announced phone takes over immediately
    assert ep.rtp.source == new and ep.rtp.target == new
    ep.rtp.datagram_received(b"x", old)
    assert ep.rtp.source == new  # and the old one cannot steal it back
    ep.close()


def test_the_poller_drains_sockets_only_when_behind() -> None:
    """A full batch of ready sockets means the relay is behind: each socket then gets its
    drainer (several packets), otherwise its one-packet handler."""
    from media.poller import BATCH, _dispatch

    calls: list[str] = []
    handlers: list[Callable[[], None] | None] = [lambda: calls.append("one"), None]
    drainers: list[Callable[[], None] | None] = [lambda: calls.append("many"), None]

    _dispatch(lambda timeout, most: [(0, 1), (1, 1)], handlers, drainers)  # fd 1: closed
    assert calls == ["one"]
    calls.clear()
    _dispatch(lambda timeout, most: [(0, 1)] * BATCH, handlers, drainers)
    assert calls == ["many"] * BATCH


def test_bridge_stats_as_dict_is_what_asdict_gives() -> None:
    from dataclasses import asdict

    from media.bridge import BridgeStats, FlowStats

    stats = BridgeStats(FlowStats(1, 2, 3, 4), FlowStats(5, 6, 7, 8))
    assert stats.as_dict() == asdict(stats)
