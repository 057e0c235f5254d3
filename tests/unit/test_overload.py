"""Overload control: the stale-request policy, and the UDP transport's receive timestamps."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from softswitch.overload import StaleFilter
from softswitch.sip.transaction import Address
from softswitch.transport import UdpEndpoint, _udp_socket

INVITE = b"INVITE sip:1001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5062\r\n\r\n"
REGISTER = b"REGISTER sip:127.0.0.1 SIP/2.0\r\n\r\n"


def test_fresh_requests_pass() -> None:
    f = StaleFilter(0.5)
    assert f.admit(INVITE, 0.0) and f.admit(REGISTER, 0.5)
    assert f.dropped == 0 and f.report() is None


def test_stale_new_work_is_dropped_and_reported_once() -> None:
    f = StaleFilter(0.5)
    assert not f.admit(INVITE, 0.8)
    assert not f.admit(REGISTER, 1.2)
    report = f.report()
    assert report is not None
    assert (report.dropped, report.oldest, report.kernel_drops) == (2, 1.2, 0)
    assert f.report() is None  # nothing new since
    assert not f.admit(REGISTER, 0.6)
    again = f.report()
    assert again is not None and (again.dropped, again.oldest) == (1, 0.6)
    assert f.dropped == 3


@pytest.mark.parametrize(
    "data",
    [
        b"SIP/2.0 200 OK\r\n\r\n",
        b"ACK sip:1001@127.0.0.1 SIP/2.0\r\n\r\n",
        b"CANCEL sip:1001@127.0.0.1 SIP/2.0\r\n\r\n",
        b"BYE sip:1001@127.0.0.1 SIP/2.0\r\n\r\n",
    ],
)
def test_what_finishes_work_is_never_dropped(data: bytes) -> None:
    """A late response or BYE still completes or frees work that is already paid for."""
    assert StaleFilter(0.5).admit(data, 30.0)


@pytest.mark.parametrize("header", [b"Authorization", b"Proxy-Authorization", b"AUTHORIZATION"])
def test_requests_answering_a_challenge_are_kept(header: bytes) -> None:
    """The authenticated REGISTER or INVITE completes work the 401/407 already paid for."""
    f = StaleFilter(0.5)
    data = REGISTER[:-2] + header + b': Digest username="1001"\r\n\r\n'
    assert f.admit(data, 5.0)
    assert f.dropped == 0


def test_zero_turns_the_filter_off() -> None:
    assert StaleFilter(0).admit(INVITE, 30.0)


def test_kernel_drops_are_reported_as_a_difference() -> None:
    f = StaleFilter(0.5)
    f.kernel_dropped(7)
    first = f.report()
    assert first is not None and first.kernel_drops == 7 and first.dropped == 0
    f.kernel_dropped(10)
    second = f.report()
    assert second is not None and second.kernel_drops == 3
    assert f.report() is None


async def test_udp_endpoint_hands_over_datagrams_with_their_age() -> None:
    """The kernel's receive timestamp gives the time a datagram waited before we read it."""
    received: list[tuple[bytes, Address]] = []
    ages: list[float] = []

    def admit(data: bytes, age: float) -> bool:
        ages.append(age)
        return data != b"drop me"

    endpoint = UdpEndpoint(
        _udp_socket("127.0.0.1", 0), lambda d, a: received.append((d, a)), 65535, admit
    )
    port = endpoint.sock.getsockname()[1]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender_port = 0
    try:
        sender.bind(("127.0.0.1", 0))
        sender_port = sender.getsockname()[1]
        # The first socket to ask for timestamps switches them on for the host a moment
        # later (a deferred static key): datagrams arriving before that are stamped when
        # read, age 0. The service's socket lives long; this test's must wait for it.
        time.sleep(0.05)
        for data in (INVITE, b"drop me", b"\r\n\r\n"):
            sender.sendto(data, ("127.0.0.1", port))
        time.sleep(0.1)  # they wait in the socket's queue: the loop is not reading yet
        endpoint.start(asyncio.get_running_loop())
        for _ in range(500):
            if len(ages) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        endpoint.close()
        sender.close()
    assert [d for d, _ in received] == [INVITE]  # dropped, and a keep-alive, go no further
    assert received[0][1] == Address("udp", "127.0.0.1", sender_port)
    assert len(ages) == 3
    if endpoint._timestamps:  # Linux: every one of them waited the 100 ms at least
        assert all(0.09 <= age < 30 for age in ages), ages


async def test_udp_endpoint_drops_oversized_datagrams() -> None:
    received: list[bytes] = []
    endpoint = UdpEndpoint(_udp_socket("127.0.0.1", 0), lambda d, a: received.append(d), 1024)
    port = endpoint.sock.getsockname()[1]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        endpoint.start(asyncio.get_running_loop())
        sender.sendto(b"X" * 1025, ("127.0.0.1", port))
        sender.sendto(REGISTER, ("127.0.0.1", port))
        for _ in range(500):
            if received:
                break
            await asyncio.sleep(0.01)
    finally:
        endpoint.close()
        sender.close()
    assert received == [REGISTER]
