"""Overload control: the stale-request policy, and the UDP transport's receive timestamps."""

from __future__ import annotations

import asyncio
import socket

import pytest

from softswitch.overload import StaleFilter, Verdict
from softswitch.service import Service
from softswitch.sip.errorreply import error_response
from softswitch.sip.transaction import Address
from softswitch.udp import UdpEndpoint, udp_socket

from .test_service_register import service  # noqa: F401 (a fixture)

INVITE = b"INVITE sip:1001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5062\r\n\r\n"
REGISTER = b"REGISTER sip:127.0.0.1 SIP/2.0\r\n\r\n"


def test_fresh_requests_pass() -> None:
    f = StaleFilter(0.5)
    assert f.judge(INVITE, 0.0) is Verdict.ADMIT and f.judge(REGISTER, 0.5) is Verdict.ADMIT
    assert f.dropped == 0 and f.report() is None


def test_stale_new_work_is_dropped_or_refused_and_reported_once() -> None:
    """A stale REGISTER is dropped (its retransmission will do); a stale INVITE is refused
    (a 503 stops the caller's retransmissions, which a drop would multiply)."""
    f = StaleFilter(0.5)
    assert f.judge(INVITE, 0.8) is Verdict.REFUSE
    assert f.judge(REGISTER, 1.2) is Verdict.DROP
    report = f.report()
    assert report is not None
    assert (report.dropped, report.refused, report.oldest, report.kernel_drops) == (1, 1, 1.2, 0)
    assert f.report() is None  # nothing new since
    assert f.judge(REGISTER, 0.6) is Verdict.DROP
    again = f.report()
    assert again is not None and (again.dropped, again.refused, again.oldest) == (1, 0, 0.6)
    assert (f.dropped, f.refused) == (2, 1)


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
    assert StaleFilter(0.5).judge(data, 30.0) is Verdict.ADMIT


@pytest.mark.parametrize("header", [b"Authorization", b"Proxy-Authorization", b"AUTHORIZATION"])
def test_requests_answering_a_challenge_are_kept(header: bytes) -> None:
    """The authenticated REGISTER or INVITE completes work the 401/407 already paid for."""
    f = StaleFilter(0.5)
    data = REGISTER[:-2] + header + b': Digest username="1001"\r\n\r\n'
    assert f.judge(data, 5.0) is Verdict.ADMIT
    assert f.dropped == 0
    invite = INVITE[:-2] + header + b': Digest username="1001"\r\n\r\n'
    assert f.judge(invite, 5.0) is Verdict.ADMIT  # the INVITE after a 407


def test_zero_turns_the_filter_off() -> None:
    assert StaleFilter(0).judge(INVITE, 30.0) is Verdict.ADMIT


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
    """A datagram's age is the endpoint's wall clock minus the kernel's receive stamp.

    The clock is injected and fixed far ahead of any real time, so the check is about which
    stamp the age comes from (the kernel's, one per datagram, in arrival order), never about
    how long anything took."""
    received: list[tuple[bytes, Address]] = []
    ages: list[float] = []

    def admit(data: bytes, age: float, addr: tuple[str | int, ...]) -> bool:
        ages.append(age)
        return data != b"drop me"

    ahead = 1.0e12  # the year 33,000: later than any kernel stamp this test can see
    endpoint = UdpEndpoint(
        udp_socket("127.0.0.1", 0),
        lambda d, a: received.append((d, a)),
        65535,
        admit,
        wall=lambda: ahead,
    )
    port = endpoint.sock.getsockname()[1]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender_port = 0
    try:
        sender.bind(("127.0.0.1", 0))
        sender_port = sender.getsockname()[1]
        for data in (INVITE, b"drop me", b"\r\n\r\n"):
            sender.sendto(data, ("127.0.0.1", port))
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
    if endpoint._timestamps:  # Linux: the stamp each age was computed from is the kernel's
        stamps = [ahead - age for age in ages]
        assert all(0 < stamp < ahead for stamp in stamps), stamps  # not the no-stamp age of 0
        assert stamps == sorted(stamps), stamps  # one per datagram, in the order they arrived


async def test_udp_endpoint_drops_oversized_datagrams() -> None:
    received: list[bytes] = []
    endpoint = UdpEndpoint(udp_socket("127.0.0.1", 0), lambda d, a: received.append(d), 1024)
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


FULL_INVITE = (
    b"INVITE sip:1001@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK-1\r\n"
    b"From: <sip:3000@127.0.0.1>;tag=c1\r\nTo: <sip:1001@127.0.0.1>\r\n"
    b"Call-ID: ov-1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)


def test_the_refusal_is_a_503_with_a_to_tag() -> None:
    reply = error_response(FULL_INVITE, 503, "Service Unavailable", to_tag="t1")
    assert reply is not None and reply.startswith(b"SIP/2.0 503 Service Unavailable\r\n")
    assert b"\r\nTo: <sip:1001@127.0.0.1>;tag=t1\r\n" in reply
    tagged = FULL_INVITE.replace(b"<sip:1001@127.0.0.1>\r\n", b"<sip:1001@127.0.0.1>;tag=d\r\n")
    again = error_response(tagged, 503, "Service Unavailable", to_tag="t1")
    assert again is not None and b";tag=t1" not in again  # a dialog's tag is kept


async def test_the_service_answers_a_stale_invite_503_and_forgets_it(
    service: tuple[Service, list[bytes]],  # noqa: F811 (the imported fixture)
) -> None:
    svc, sent = service
    assert not svc._admit(FULL_INVITE, 2.0, ("127.0.0.1", 5062))
    assert len(sent) == 1 and sent[0].startswith(b"SIP/2.0 503 ")
    assert svc.layer.stats().servers == 0  # no transaction, no call: nothing kept
    other = FULL_INVITE.replace(b"branch=z9hG4bK-1", b"branch=z9hG4bK-2")
    assert svc._admit(other, 0.1, ("127.0.0.1", 5062))  # a fresh INVITE: handled as usual
    assert not svc._admit(FULL_INVITE, 0.1, ("127.0.0.1", 5062))  # the refused one's copy
    assert len(sent) == 2 and sent[1].startswith(b"SIP/2.0 503 ")


def test_a_stale_retransmission_of_an_admitted_invite_is_passed_on_not_refused() -> None:
    """Its call is under way (the 100 Trying was late): a 503 would kill it at the caller.
    Whether it is one is the transaction layer's knowledge (`retransmits`); the transaction
    then repeats its 100 Trying."""
    known = {FULL_INVITE}
    f = StaleFilter(0.5, retransmits=known.__contains__)
    assert f.judge(FULL_INVITE, 0.1) is Verdict.ADMIT
    assert f.judge(FULL_INVITE, 0.9) is Verdict.ADMIT  # the same request, again, late
    other = FULL_INVITE.replace(b"branch=z9hG4bK-1", b"branch=z9hG4bK-2")
    assert f.judge(other, 0.9) is Verdict.REFUSE
    assert (f.dropped, f.refused) == (0, 1)


async def test_the_service_passes_a_stale_retransmission_to_its_transaction(
    service: tuple[Service, list[bytes]],  # noqa: F811 (the imported fixture)
) -> None:
    svc, sent = service
    assert svc._admit(FULL_INVITE, 0.1, ("127.0.0.1", 5062))
    svc._on_message(FULL_INVITE, Address("udp", "127.0.0.1", 5062))  # a server transaction
    assert svc.layer.stats().servers == 1
    sent.clear()
    assert svc._admit(FULL_INVITE, 2.0, ("127.0.0.1", 5062))  # late copy: no 503
    assert sent == [] and svc.stale.refused == 0


def test_a_fresh_copy_of_a_refused_invite_is_refused_again() -> None:
    """Its caller has (or will have) our 503: a call set up now would never be ACKed."""
    f = StaleFilter(0.5)
    assert f.judge(FULL_INVITE, 0.9) is Verdict.REFUSE
    assert f.judge(FULL_INVITE, 0.1) is Verdict.REFUSE
    other = FULL_INVITE.replace(b"branch=z9hG4bK-1", b"branch=z9hG4bK-2")
    assert f.judge(other, 0.1) is Verdict.ADMIT
    assert f.refused == 2


def test_the_ack_for_our_503_is_dropped_unread() -> None:
    """It carries the refused INVITE's branch; other ACKs pass, however late."""
    f = StaleFilter(0.5)
    assert f.judge(FULL_INVITE, 0.9) is Verdict.REFUSE
    ack = FULL_INVITE.replace(b"INVITE sip:", b"ACK sip:", 1).replace(b"1 INVITE", b"1 ACK")
    assert f.judge(ack, 0.0) is Verdict.DROP
    other = ack.replace(b"branch=z9hG4bK-1", b"branch=z9hG4bK-9")
    assert f.judge(other, 5.0) is Verdict.ADMIT


def test_udp_endpoint_starts_and_closes_on_uvloop() -> None:
    """The service runs on uvloop, whose remove_reader returns None (asyncio's: a bool); the
    compiled endpoint once raised TypeError on it at shutdown (SIGTERM then exited 1)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        endpoint = UdpEndpoint(udp_socket("127.0.0.1", 0), lambda d, a: None, 1024)
        endpoint.start(asyncio.get_running_loop())
        endpoint.close()
        assert endpoint.sock.fileno() == -1

    uvloop.run(scenario())
