"""A scripted phone for what the real phones here cannot do: Replaces, REFER with Replaces.

Why: baresip 1.0.0 has no attended transfer and cannot send ``Replaces``: ``dial
sip:1001@host?Replaces=...`` puts the header into the Request-URI (and appends
``;transport=udp`` after it, an invalid URI the service rightly answers 400); linphone-daemon
5.1.65 has neither. A desk phone's "pick up" / "retrieve" BLF key and an attended transfer do
exactly what this class does on the wire.

``RawPhone`` is ``sipclient.SipCaller`` (INVITE with 407 digest, ACK, BYE) plus:
* an RTP socket: its port is in the SDP offer, ``pump_rtp`` counts what arrives there (the
  far end's audio through the relay) and sends PCMU back, so both directions are measurable;
* in-dialog requests (REFER) and a log of every request the service sent (NOTIFY sipfrag,
  BYE), each answered 200 once (retransmissions are answered again but kept once).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .ports import LOOPBACK
from .sipclient import CallResult, SipCaller, SipClient, SipMessage, SipTimeout, offer_sdp


@dataclass
class RtpCount:
    """What ``pump_rtp`` saw: packets received (and from where), packets sent."""

    received: int
    sent: int
    sources: set[tuple[str, int]]


def sdp_audio_addr(body: bytes) -> tuple[str, int]:
    """(address, port) of the first audio stream of an SDP body."""
    text = body.decode(errors="replace")
    conn = re.findall(r"^c=IN IP4 (\S+)", text, re.M)
    port = re.search(r"^m=audio (\d+) ", text, re.M)
    if not conn or port is None:
        raise AssertionError(f"no audio stream in SDP:\n{text}")
    return conn[-1], int(port.group(1))


class RawPhone:
    """One user's scripted phone on its own UDP socket (and an RTP socket)."""

    def __init__(
        self, server: tuple[str, int], user: str, password: str, domain: str = LOOPBACK
    ) -> None:
        self.user = user
        self.password = password
        self.client = SipClient(server, "udp", timeout=5.0)
        self.caller = SipCaller(self.client, domain=domain)
        self.domain = domain
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((LOOPBACK, 0))
        self.rtp_port: int = self.rtp.getsockname()[1]
        self.requests: list[SipMessage] = []  # every request the service sent us, once
        self._seen: set[tuple[str, str]] = set()

    # -- calls -------------------------------------------------------------------------------

    def invite(
        self,
        callee: str,
        headers: Sequence[tuple[str, str]] = (),
        timeout: float = 15.0,
        sdp: bytes | None = None,
    ) -> CallResult:
        """INVITE ``callee`` as this user (407 answered) offering our RTP port (or ``sdp``)."""
        result = self.caller.invite(
            callee,
            user=self.user,
            password=self.password,
            headers=headers,
            sdp=sdp if sdp is not None else offer_sdp(self.rtp_port),
            timeout=timeout,
        )
        self._absorb_strays()
        return result

    def bye(self, call: CallResult) -> SipMessage:
        resp = self.caller.bye(call)
        self._absorb_strays()
        return resp

    def request(
        self,
        call: CallResult,
        method: str,
        headers: Sequence[tuple[str, str]] = (),
        timeout: float = 5.0,
    ) -> SipMessage:
        """An in-dialog request of ``call`` (e.g. REFER); returns its final response."""
        c = self.client
        call.cseq += 1
        data, branch = c.build_request(
            method,
            call.remote_target or call.to_uri,
            from_uri=call.from_uri,
            to_uri=call.to_uri,
            call_id=call.call_id,
            cseq=call.cseq,
            from_tag=call.from_tag,
            headers=[
                ("Contact", f"<sip:{self.user}@{c.local_hostport};transport=udp>"),
                *headers,
            ],
        )
        data = re.sub(
            rb"^To: [^\r\n]*", b"To: " + call.to_header.encode(), data, count=1, flags=re.M
        )
        resp = c.transaction(data, branch, method, timeout=timeout)
        self._absorb_strays()
        return resp

    # -- requests from the service -----------------------------------------------------------

    def _take(self, msg: SipMessage) -> None:
        if msg.is_response:
            return
        if msg.method != "ACK":
            self.caller.answer_request(msg)
        key = (msg.get("call-id") or "", msg.get("cseq") or "")
        if key not in self._seen:
            self._seen.add(key)
            self.requests.append(msg)

    def _absorb_strays(self) -> None:
        strays, self.client.stray = self.client.stray, []
        for msg in strays:
            self._take(msg)

    def received(self, method: str, call_id: str | None = None) -> list[SipMessage]:
        return [
            m
            for m in self.requests
            if m.method == method and (call_id is None or m.get("call-id") == call_id)
        ]

    def wait_requests(
        self, method: str, count: int = 1, timeout: float = 5.0, call_id: str | None = None
    ) -> list[SipMessage]:
        """Answer what arrives until ``count`` requests of ``method`` were received."""
        self._absorb_strays()
        deadline = time.monotonic() + timeout
        while len(self.received(method, call_id)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                got = [m.start_line for m in self.requests]
                raise SipTimeout(f"{self.user}: {count} x {method} expected, got {got}")
            msg = self.client.recv(left)
            if msg is not None:
                self._take(msg)
        return self.received(method, call_id)

    def drain(self, seconds: float = 0.3) -> None:
        """Answer whatever the service still sends (retransmissions) for a moment."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self.client.recv(left)
            if msg is not None:
                self._take(msg)

    # -- media -------------------------------------------------------------------------------

    def pump_rtp(self, seconds: float, to: tuple[str, int] | None = None) -> RtpCount:
        """For ``seconds``: count RTP arriving on our port; send 20 ms PCMU packets to ``to``
        (the relay port of the SDP answer) so the far end hears us too."""
        received = sent = 0
        sources: set[tuple[str, int]] = set()
        seq, ts, ssrc = 1, 0, 0x5EED1234
        payload = b"\xff" * 160  # PCMU silence-ish; counting is what matters
        deadline = time.monotonic() + seconds
        next_send = time.monotonic()
        while (now := time.monotonic()) < deadline:
            if to is not None and now >= next_send:
                header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
                self.rtp.sendto(header + payload, to)
                sent += 1
                seq, ts = seq + 1, ts + 160
                next_send += 0.02
            self.rtp.settimeout(max(0.001, min(next_send, deadline) - time.monotonic()))
            try:
                data, addr = self.rtp.recvfrom(4096)
            except TimeoutError:
                continue
            if len(data) >= 12 and data[0] >> 6 == 2 and not 200 <= data[1] <= 204:
                received += 1  # RTP, not RTCP
                sources.add(addr)
        return RtpCount(received, sent, sources)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rtp.close()
        self.client.close()
