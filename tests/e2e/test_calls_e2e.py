"""End-to-end tests of shared-line calls (issue 3): the B2BUA with real phones and SIPp.

What they pin down, from the outside (the service started from its CLI):
* a call to a delegator's line forks to the delegator's phone and each delegate's; the first
  answer wins and every other phone gets a CANCEL with
  ``Reason: SIP;cause=200;text="Call completed elsewhere"`` (RFC 3326);
* a delegate's phone sees who calls (From/PAI: the caller) and for whom (To, History-Info,
  Diversion: the line), and what a real phone (baresip 1.0.0) shows of it; a phone
  registered both on the line and as its own user rings once;
* audio goes through our relay (SDP points at 127.0.0.1 and a port in the media range) and
  arrives at both phones; a BYE ends both legs and the relay ports are free afterwards;
* calling on behalf: from a phone registered on the delegator's AoR with the delegate's
  credentials, or with ``P-Preferred-Identity``, the callee sees the delegator; anyone else
  asking for that identity (or registering that AoR) gets 403;
* failures: all busy -> 486, nobody registered -> 480, ring time over -> 480 plus CANCELs.

Peers: baresip where a real phone matters (media, what the user sees), SIPp UAS scenarios
where the wire must be exact (busy, ringing until cancelled, the identity a callee gets), and
the harness' ``SipCaller`` where the caller's credentials and headers are the point. Every
peer is bounded (baresip ``-t``, SIPp ``-m``/``-timeout``, ``e2e_timeout`` per test) and
everything stays on 127.0.0.1.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .conftest import attach_diagnostics
from .harness.baresip import Baresip, BaresipConfig, read_wav
from .harness.ports import LOOPBACK, free_udp_range
from .harness.service import (
    ServiceConfig,
    SoftswitchService,
    User,
    service_events,
    start_fresh,
    stop_all,
)
from .harness.sipclient import Registrar, SipCaller, SipClient, SipMessage
from .harness.sipp import SippProcess, register_sipp, start_sipp
from .harness.waiting import eventually

pytestmark = pytest.mark.e2e

ALICE = User("1001", "secret1", "Alice Exec")  # the delegator: her line is shared
BOB = User("1002", "secret2", "Bob Assistant")  # delegate
CAROL = User("1003", "secret3", "Carol Assistant")  # delegate
DAVE = User("1004", "secret4", "Dave Outsider")  # calls in; no delegation
EVE = User("1005", "secret5", "Eve Other")  # no delegation
USERS = (ALICE, BOB, CAROL, DAVE, EVE)
DELEGATIONS = [{"delegator": ALICE.extension, "delegates": [BOB.extension, CAROL.extension]}]

COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
LINE_TO = f'"Alice Exec (1001)" <sip:1001@{LOOPBACK}>'  # To of a fork to a delegate
ALICE_ID = f'"Alice Exec" <sip:1001@{LOOPBACK}>'
DAVE_ID = f'"Dave Outsider" <sip:1004@{LOOPBACK}>'


# --------------------------------------------------------------------------------------------
# fixtures and helpers

MakeService = Callable[..., SoftswitchService]
T = TypeVar("T")


@pytest.fixture
def switch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeService]:
    """``make(ring_time=None)`` -> a running service with USERS and Alice's delegation.

    Why not conftest's ``service_factory``: it has no way to pass ``delegations`` and
    ``lines``; this does the same (fresh ports, diagnostics, cleanup, crash check).
    """
    services: list[SoftswitchService] = []

    def make(ring_time: int | None = None) -> SoftswitchService:
        name = f"softswitch{len(services) + 1}"
        workdir = tmp_path / name
        extra: dict[str, Any] = {"lines": {"ring_time": ring_time}} if ring_time else {}

        def config() -> ServiceConfig:
            cfg = ServiceConfig.allocate(
                workdir / "data", USERS, delegations=DELEGATIONS, extra=extra
            )
            cfg.media_ports = free_udp_range(100, probe_all=True)  # calls really bind them
            return cfg

        def register(svc: SoftswitchService) -> None:
            services.append(svc)
            attach_diagnostics(request.node, svc.log_tail)

        return start_fresh(config, workdir, name, register)

    yield make
    crashed = stop_all(services)
    if crashed:
        pytest.fail("\n".join(crashed))


class Peers:
    """Every phone and SIPp a test starts: diagnostics on failure, stopped at the end."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.phones: list[Baresip] = []
        self.sipps: list[SippProcess] = []

    def phone(
        self,
        svc: SoftswitchService,
        user: User,
        *,
        name: str = "",
        aor_user: str | None = None,
        answermode: str = "manual",
        lifetime: int = 60,
    ) -> Baresip:
        """A started baresip (SIP trace and RTP statistics on; call ``wait_registered``).

        ``aor_user``: register that AoR with ``user``'s credentials (``auth_user``), as a
        delegate's phone on the delegator's shared line does.
        """
        name = name or user.extension
        cfg = BaresipConfig(
            aor_user or user.extension,
            user.password,
            svc.sip_addr,
            self.tmp_path / f"phone-{name}",
            display_name=user.name,
            answermode=answermode,
            auth_user=user.extension if aor_user else "",
            rtp_ports=free_udp_range(20, probe_all=True),
            sip_trace=True,
            extra_config=("rtp_stats\t\tyes",),
        )
        phone = Baresip(cfg, lifetime=lifetime, name=name)
        self.phones.append(phone)
        attach_diagnostics(self.request.node, phone.log_tail)
        return phone.start()

    def uas(self, svc: SoftswitchService, user: User, scenario: str, **kw: Any) -> SippProcess:
        """A SIPp UAS registered as ``user`` (reg_one on its port first), listening."""
        workdir = self.tmp_path / "sipp"
        reg = register_sipp(
            svc.sip_addr,
            workdir=workdir,
            aor_user=user.extension,
            password=user.password,
            name=f"reg_{user.extension}",
        )
        assert reg.returncode == 0, f"SIPp could not register {user.extension}\n{reg.describe()}"
        run = start_sipp(
            scenario,
            target=svc.sip_addr,
            workdir=workdir,
            name=f"{Path(scenario).stem}_{user.extension}",
            local_port=reg.local_port,
            **kw,
        )
        self.sipps.append(run)
        attach_diagnostics(self.request.node, run.describe)
        run.wait_listening()
        return run

    def close(self) -> None:
        for phone in self.phones:
            phone.stop()
        for run in self.sipps:
            run.stop()


@pytest.fixture
def peers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Peers]:
    p = Peers(request, tmp_path)
    yield p
    p.close()


@pytest.fixture
def caller_for() -> Iterator[Callable[[SoftswitchService], SipCaller]]:
    """``caller_for(svc)`` -> a SipCaller on its own UDP socket (closed at the end)."""
    clients: list[SipClient] = []

    def make(svc: SoftswitchService) -> SipCaller:
        client = SipClient(svc.sip_addr, "udp", timeout=5.0)
        clients.append(client)
        return SipCaller(client, domain=svc.config.domain)

    yield make
    for c in clients:
        c.close()


def forks_sent(svc: SoftswitchService) -> list[dict[str, Any]]:
    """Every fork the service sent, with its party and destination: a fork set is logged as
    one `call_forked` event listing its forks, a delayed fork (ring_delay) as a `call_fork`."""
    out: list[dict[str, Any]] = []
    for e in service_events(svc):
        if e.get("event") == "call_forked":
            out += e["forks"]
        elif e.get("event") == "call_fork":
            out.append(e)
    return out


def wait_for_event(
    svc: SoftswitchService, event: str, timeout: float = 5.0, **fields: Any
) -> dict[str, Any]:
    """The first log line of ``event`` whose fields match; polls the log file."""
    deadline = time.monotonic() + timeout
    while True:
        for obj in service_events(svc, event):
            if all(obj.get(k) == v for k, v in fields.items()):
                return obj
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {event} {fields} in the service log\n{svc.log_tail()}")
        time.sleep(0.1)


def sdp_audio(body: bytes) -> tuple[str, int]:
    """(connection address, audio port) of an SDP body; the session or media c= line."""
    text = body.decode(errors="replace")
    conn = re.findall(r"^c=IN IP4 (\S+)", text, re.MULTILINE)
    port = re.search(r"^m=audio (\d+) ", text, re.MULTILINE)
    assert conn and port, f"no audio stream / connection in SDP:\n{text}"
    return conn[-1], int(port.group(1))


def udp_port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_ports_free(ports: list[int], timeout: float = 3.0) -> list[int]:
    """The ports of ``ports`` still bound after ``timeout`` (empty: all free)."""
    deadline = time.monotonic() + timeout
    busy = ports
    while True:
        busy = [p for p in ports if not udp_port_free(p)]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.1)


def wait_rtp_stats(phone: Baresip, timeout: float = 5.0) -> tuple[int, int]:
    """(sent, received) RTP packets of the phone's last call; printed just after it ends."""
    stats = eventually(phone.rtp_stats, f"{phone.config.user}: RTP statistics in its log", timeout)
    return stats[-1]


def in_log(phone: Baresip, text: str) -> None:
    eventually(lambda: text in phone.log_text(), f"{text!r} in {phone.log_path}")


def final_statuses(responses: list[SipMessage]) -> list[int]:
    return [r.status for r in responses if r.status >= 200]


def header(msg: SipMessage, name: str) -> str:
    value = msg.get(name)
    assert value is not None, f"no {name} header in:\n{msg.text()}"
    return value


def without_tag(value: str) -> str:
    return re.sub(r";tag=[^;,\s]+", "", value)


def one(messages: list[SipMessage], what: str) -> SipMessage:
    """The last of ``messages``, failing clearly when there is none."""
    assert messages, f"no {what}"
    return messages[-1]


def received_requests(run: SippProcess, method: str) -> list[SipMessage]:
    result = run.wait()
    return [m for m in result.messages("received") if m.start_line.startswith(method + " ")]


# --------------------------------------------------------------------------------------------
# 1 + 2. fork to real phones, one answers, the others get CANCEL; media through the relay


@pytest.mark.e2e_timeout(60)
def test_line_call_forks_first_answer_wins_audio_flows_and_bye_frees_ports(
    switch: MakeService, peers: Peers, require_baresip: str
) -> None:
    """Dave calls Alice's line; Alice's, Bob's and Carol's baresip phones ring (manual
    answer), Bob accepts over ctrl_tcp. Checked from the phones' own SIP traces, events, RTP
    statistics and recordings, plus the service's log and the relay's sockets."""
    svc = switch()
    media_lo, media_hi = svc.config.media_ports
    alice = peers.phone(svc, ALICE)
    bob = peers.phone(svc, BOB)
    carol = peers.phone(svc, CAROL)
    dave = peers.phone(svc, DAVE)
    for phone in (alice, bob, carol, dave):
        phone.wait_registered()
    assert dave.ctl is not None and bob.ctl is not None

    dave.ctl.command(f"dial sip:{ALICE.extension}@{LOOPBACK}:{svc.config.sip_port}")
    incoming = {p.config.user: p.wait_event("CALL_INCOMING", 10) for p in (alice, bob, carol)}

    # 2. what a delegate's phone shows (answermode=manual): the caller; nothing of the line
    shown = incoming[BOB.extension]
    assert shown["peerdisplayname"] == DAVE.name, shown
    assert shown["peeruri"] == f"sip:{DAVE.extension}@{LOOPBACK}", shown
    assert shown["accountaor"].startswith(f"sip:{BOB.extension}@"), shown
    in_log(bob, f"Incoming call from: {DAVE.name} sip:{DAVE.extension}@{LOOPBACK}")
    assert incoming[ALICE.extension]["peerdisplayname"] == DAVE.name, incoming

    # exactly one answers: Bob, the delegate
    bob.ctl.command("accept")
    bob.wait_event("CALL_ESTABLISHED", 10)
    dave.wait_event("CALL_ESTABLISHED", 10)
    # the only place baresip shows the line: callstat's local_uri is the To URI (1001)
    callstat = str(bob.ctl.command("callstat").get("data", ""))
    assert re.search(rf"local_uri: .*<sip:1001@{re.escape(LOOPBACK)}>", callstat), callstat
    for loser in (alice, carol):
        loser.wait_event("CALL_CLOSED", 10)
        cancel = eventually(partial(loser.received, "CANCEL"), f"CANCEL at {loser.config.user}")
        assert cancel[0].get("reason") == COMPLETED_ELSEWHERE, cancel[0].text()
    assert bob.received("CANCEL") == [], "the answering phone was cancelled"
    answered = wait_for_event(svc, "call_answered")
    assert answered["party"] == BOB.extension, answered

    # what the delegate's INVITE said: who calls, for which line, why it rings here
    invite = one(bob.received("INVITE"), "INVITE at Bob's phone")
    assert without_tag(header(invite, "from")) == DAVE_ID, invite.text()
    assert header(invite, "p-asserted-identity") == DAVE_ID, invite.text()
    assert header(invite, "to") == LINE_TO, invite.text()
    assert header(invite, "history-info") == (
        f"<sip:1001@{LOOPBACK}>;index=1, <sip:1002@{LOOPBACK}>;index=1.1;mp=1"
    ), invite.text()
    assert header(invite, "diversion") == (
        f'"Alice Exec" <sip:1001@{LOOPBACK}>;reason=unconditional;counter=1'
    ), invite.text()
    alice_invite = one(alice.received("INVITE"), "INVITE at Alice's phone")
    assert header(alice_invite, "to").startswith(f'"Alice Exec" <sip:1001@{LOOPBACK}>')
    assert alice_invite.get("diversion") is None, alice_invite.text()

    # SDP: both phones are pointed at the relay, on ports of the media range
    b_addr, b_port = sdp_audio(invite.body)
    ok = [
        r
        for r in dave.received("SIP/2.0 200")
        if (r.get("cseq") or "").endswith("INVITE") and r.body
    ]
    a_addr, a_port = sdp_audio(one(ok, "200 OK with SDP at Dave's phone").body)
    assert (a_addr, b_addr) == (LOOPBACK, LOOPBACK)
    assert media_lo <= a_port <= media_hi and media_lo <= b_port <= media_hi, (a_port, b_port)
    assert a_port != b_port
    bob.wait_event("CALL_RTPESTAB", 10)
    dave.wait_event("CALL_RTPESTAB", 10)
    in_log(bob, f"receiving from {LOOPBACK}:{b_port}")  # RTP came from the relay
    in_log(dave, f"receiving from {LOOPBACK}:{a_port}")
    relay_ports = [a_port, a_port + 1, b_port, b_port + 1]  # RTP and RTCP of both legs
    assert not any(udp_port_free(p) for p in relay_ports), "the relay is not bound to its ports"
    time.sleep(2.0)  # let some audio through

    # Dave hangs up: both legs end, the relay's sockets are closed
    dave.ctl.command("hangup")
    bob.wait_event("CALL_CLOSED", 10)
    eventually(lambda: bob.received("BYE"), "BYE at Bob's phone")
    ended = wait_for_event(svc, "call_ended", reason="bye")
    assert ended["call"] == answered["call"], ended
    line_ended = wait_for_event(svc, "line_event", line=ALICE.extension, state="ended")
    assert line_ended["party"] == BOB.extension, line_ended
    assert wait_ports_free(relay_ports) == [], f"relay ports still bound: {relay_ports}"

    # the audio each phone sent arrived at the other through the relay: RTP packet counts
    # (baresip's end-of-call table, 20 ms per packet) and the received audio itself (sndfile)
    dave.wait_event("CALL_CLOSED", 10)
    stats = {p.config.user: wait_rtp_stats(p) for p in (bob, dave)}
    for phone, peer in ((bob, dave), (dave, bob)):
        me, other = phone.config.user, peer.config.user
        sent, received = stats[other][0], stats[me][1]
        assert received >= 50, f"{me} received {received} RTP packets from {other} ({stats})"
        assert sent - 10 <= received <= sent, f"{other} sent {sent}, {me} got {received}"
        recordings = phone.recordings("dec")
        assert recordings, f"{me}: sndfile recorded nothing"
        seconds, rms = read_wav(recordings[-1])
        assert seconds >= 1.0, f"{me} recorded only {seconds:.2f}s of {other}'s audio"
        assert rms > 1000, f"{me}: the audio from {other} is silent (RMS {rms:.0f})"


@pytest.mark.e2e_timeout(60)
def test_line_call_first_answer_wins_sipp_phones_get_cancel_with_reason(
    switch: MakeService,
    peers: Peers,
    caller_for: Callable[[SoftswitchService], SipCaller],
    require_sipp: str,
) -> None:
    """The same rule on the wire, with SIPp desk phones: Alice's answers at once, the two
    delegates' phones ring and must get a CANCEL carrying the RFC 3326 Reason, whether it
    reaches them before or after their 180 (a CANCEL may only follow a provisional)."""
    svc = switch()
    answering = peers.uas(svc, ALICE, "uas_answer.xml")
    ringing = [peers.uas(svc, u, "uas_ring_expect_cancel.xml") for u in (BOB, CAROL)]
    caller = caller_for(svc)

    call = caller.invite(ALICE.extension, user=DAVE.extension, password=DAVE.password)
    assert call.answered, f"Dave's call to the line: {call.describe()}\n{call.final.text()}"
    for run in ringing:
        result = run.wait(15)
        assert result.returncode == 0 and result.successful == 1, result.describe()
        cancel = one(received_requests(run, "CANCEL"), f"CANCEL at {run.name}")
        assert cancel.get("reason") == COMPLETED_ELSEWHERE, cancel.text()
    bye = caller.bye(call)
    assert bye.status == 200, bye.text()
    result = answering.wait(15)
    assert result.returncode == 0 and result.successful == 1, result.describe()
    wait_for_event(svc, "call_ended", reason="bye")


@pytest.mark.e2e_timeout(60)
def test_callee_hangup_ends_both_legs_and_frees_ports(
    switch: MakeService,
    peers: Peers,
    caller_for: Callable[[SoftswitchService], SipCaller],
    require_baresip: str,
) -> None:
    """The other direction of the BYE: Eve's phone (baresip, auto-answer) hangs up; the
    caller must get a BYE and the relay's ports must be released."""
    svc = switch()
    eve = peers.phone(svc, EVE, answermode="auto")
    eve.wait_registered()
    assert eve.ctl is not None
    caller = caller_for(svc)
    call = caller.invite(EVE.extension, user=DAVE.extension, password=DAVE.password)
    assert call.answered, f"{call.describe()}\n{call.final.text()}"
    eve.wait_event("CALL_ESTABLISHED", 10)
    a_addr, a_port = sdp_audio(call.final.body)
    _, b_port = sdp_audio(one(eve.received("INVITE"), "INVITE at Eve's phone").body)
    assert a_addr == LOOPBACK
    ports = [a_port, a_port + 1, b_port, b_port + 1]
    assert not any(udp_port_free(p) for p in ports), "the relay is not bound to its ports"

    eve.ctl.command("hangup")
    bye = caller.wait_request("BYE", timeout=5)
    assert bye.get("call-id") == call.call_id, bye.text()
    ended = wait_for_event(svc, "call_ended", reason="bye")
    assert ended["by"] == EVE.extension, ended
    assert wait_ports_free(ports) == [], f"relay ports still bound: {ports}"


@pytest.mark.e2e_timeout(60)
def test_phone_on_line_and_own_account_rings_once(
    switch: MakeService,
    peers: Peers,
    caller_for: Callable[[SoftswitchService], SipCaller],
    require_sipp: str,
    tmp_path: Path,
) -> None:
    """Bob's desk phone registers twice from one socket: as 1002 and on Alice's line (AoR
    1001, authenticating as 1002). A call to the line must ring that phone once, not twice."""
    svc = switch()
    workdir = tmp_path / "sipp"
    line = register_sipp(
        svc.sip_addr,
        workdir=workdir,
        aor_user=ALICE.extension,
        auth_user=BOB.extension,
        password=BOB.password,
        name="reg_1001_as_1002",
    )
    assert line.returncode == 0, line.describe()
    own = register_sipp(
        svc.sip_addr,
        workdir=workdir,
        aor_user=BOB.extension,
        password=BOB.password,
        local_port=line.local_port,
        name="reg_1002",
    )
    assert own.returncode == 0, own.describe()
    desk = start_sipp(
        "uas_busy.xml", target=svc.sip_addr, workdir=workdir, local_port=line.local_port,
        name="uas_busy_desk", calls=2, run_timeout=15,
    )  # fmt: skip
    peers.sipps.append(desk)
    desk.wait_listening()

    call = caller_for(svc).invite(ALICE.extension, user=DAVE.extension, password=DAVE.password)
    assert call.final.status == 486, call.describe()
    forks = forks_sent(svc)
    assert [f["party"] for f in forks] == [BOB.extension], forks
    result = desk.wait(2)  # -m 2: it ends by itself only if a second INVITE came
    invites = {m.get("call-id") for m in result.messages() if m.start_line.startswith("INVITE")}
    assert len(invites) == 1, f"the desk phone got {len(invites)} INVITEs: {result.describe()}"


# --------------------------------------------------------------------------------------------
# 3. calling on behalf of the delegator


def assert_callee_saw(run: SippProcess, identity: str) -> SipMessage:
    """The SIPp callee answered one call whose From and P-Asserted-Identity are ``identity``."""
    result = run.wait(15)
    assert result.returncode == 0 and result.successful == 1, result.describe()
    invite = one(received_requests(run, "INVITE"), f"INVITE at {run.name}")
    assert without_tag(header(invite, "from")) == identity, invite.text()
    assert header(invite, "p-asserted-identity") == identity, invite.text()
    return invite


@pytest.mark.e2e_timeout(60)
def test_delegate_calls_from_shared_line_account_as_delegator(
    switch: MakeService, peers: Peers, require_baresip: str, require_sipp: str
) -> None:
    """(a) Bob's phone registers AoR 1001 authenticating as 1002 (baresip ``auth_user``) and
    calls Eve: Eve's phone must see Alice Exec, not Bob."""
    svc = switch()
    eve = peers.uas(svc, EVE, "uas_answer.xml")
    bob_on_line = peers.phone(svc, BOB, name="1002-on-1001", aor_user=ALICE.extension)
    bob_on_line.wait_registered()
    assert bob_on_line.ctl is not None
    bob_on_line.ctl.command(f"dial sip:{EVE.extension}@{LOOPBACK}:{svc.config.sip_port}")
    bob_on_line.wait_event("CALL_ESTABLISHED", 10)
    bob_on_line.ctl.command("hangup")
    bob_on_line.wait_event("CALL_CLOSED", 10)

    assert_callee_saw(eve, ALICE_ID)
    admitted = wait_for_event(svc, "call_admitted")
    assert (admitted["user"], admitted["identity"]) == (BOB.extension, ALICE.extension), admitted


@pytest.mark.e2e_timeout(60)
def test_delegate_calls_with_p_preferred_identity_as_delegator(
    switch: MakeService,
    peers: Peers,
    caller_for: Callable[[SoftswitchService], SipCaller],
    require_sipp: str,
) -> None:
    """(b) Bob calls from his own account asking for Alice's identity (RFC 3325 PPI)."""
    svc = switch()
    eve = peers.uas(svc, EVE, "uas_answer.xml")
    caller = caller_for(svc)
    call = caller.invite(
        EVE.extension,
        user=BOB.extension,
        password=BOB.password,
        headers=[("P-Preferred-Identity", f"<sip:{ALICE.extension}@{LOOPBACK}>")],
    )
    assert call.answered, f"{call.describe()}\n{call.final.text()}"
    assert caller.bye(call).status == 200
    assert_callee_saw(eve, ALICE_ID)


@pytest.mark.e2e_timeout(60)
def test_non_delegates_cannot_call_or_register_as_delegator(
    switch: MakeService, caller_for: Callable[[SoftswitchService], SipCaller]
) -> None:
    """Dave and Eve are not Alice's delegates: PPI, a From of 1001 with their own credentials
    and a REGISTER of AoR 1001 are all refused with 403 (after the 407/401 challenge, i.e.
    with valid credentials), and no phone rings."""
    svc = switch()
    outcomes: dict[str, list[int]] = {}
    for who in (DAVE, EVE):
        ppi = caller_for(svc).invite(
            BOB.extension,
            user=who.extension,
            password=who.password,
            headers=[("P-Preferred-Identity", f"<sip:{ALICE.extension}@{LOOPBACK}>")],
        )
        outcomes[f"{who.extension} INVITE with PPI 1001"] = final_statuses(ppi.responses)
        spoofed = caller_for(svc).invite(
            BOB.extension, user=who.extension, from_user=ALICE.extension, password=who.password
        )
        outcomes[f"{who.extension} INVITE From 1001"] = final_statuses(spoofed.responses)
        client = SipClient(svc.sip_addr, "udp", timeout=5.0)
        try:
            reg = Registrar(client, domain=svc.config.domain).register(
                ALICE.extension, who.password, auth_user=who.extension
            )
        finally:
            client.close()
        outcomes[f"{who.extension} REGISTER AoR 1001"] = final_statuses(reg.responses)
    expected = {
        what: [401 if "REGISTER" in what else 407, 403] for what in outcomes
    }  # challenged first, so the 403 is about the identity, not the credentials
    assert outcomes == expected
    # the control: the same callers with their own identity pass authentication and routing
    # (Bob's phone is not registered: 480)
    own = caller_for(svc).invite(BOB.extension, user=DAVE.extension, password=DAVE.password)
    assert own.final.status == 480, own.describe()
    assert forks_sent(svc) == [], "a phone rang for a refused identity"


# --------------------------------------------------------------------------------------------
# 4. busy, nobody registered, ring time over


@pytest.mark.e2e_timeout(60)
def test_all_phones_busy_gives_486(
    switch: MakeService,
    peers: Peers,
    caller_for: Callable[[SoftswitchService], SipCaller],
    require_sipp: str,
) -> None:
    svc = switch()
    phones = [peers.uas(svc, u, "uas_busy.xml") for u in (ALICE, BOB, CAROL)]
    call = caller_for(svc).invite(ALICE.extension, user=DAVE.extension, password=DAVE.password)
    assert call.final.status == 486, call.describe()
    for run in phones:
        result = run.wait(10)
        assert result.returncode == 0 and result.successful == 1, result.describe()


@pytest.mark.e2e_timeout(60)
def test_nobody_registered_gives_480(
    switch: MakeService, caller_for: Callable[[SoftswitchService], SipCaller]
) -> None:
    svc = switch()
    call = caller_for(svc).invite(ALICE.extension, user=DAVE.extension, password=DAVE.password)
    assert call.final.status == 480, call.describe()
    assert forks_sent(svc) == []


@pytest.mark.e2e_timeout(60)
def test_ring_time_over_gives_480_and_cancels_every_phone(
    switch: MakeService,
    peers: Peers,
    caller_for: Callable[[SoftswitchService], SipCaller],
    require_sipp: str,
) -> None:
    """``lines: {ring_time: 3}``: the caller gets 480 from the ring timer, every ringing phone
    a CANCEL (SIPp fails the call without one). When the timer fires is the B2BUA's fake-clock
    unit test's job (test_ring_timeout_cancels_everyone_and_answers_480); here the service's
    own account says which timer ended the call, whatever the machine's speed."""
    ring_time = 3
    svc = switch(ring_time=ring_time)
    phones = [peers.uas(svc, u, "uas_ring_expect_cancel.xml") for u in (ALICE, BOB, CAROL)]
    call = caller_for(svc).invite(
        ALICE.extension, user=DAVE.extension, password=DAVE.password, timeout=ring_time + 10
    )
    assert call.final.status == 480, call.describe()
    assert any(r.status == 180 for r in call.provisionals), call.describe()
    rejected = [e for e in service_events(svc, "call_rejected") if e.get("status") == 480]
    assert [e.get("detail") for e in rejected] == ["timeout"], rejected
    # logged just after the 480 left: wait for the line rather than race the service
    wait_for_event(svc, "call_ended", reason="timeout")
    assert [e.get("reason") for e in service_events(svc, "call_ended")] == ["timeout"]
    reasons = {}
    for run in phones:
        result = run.wait(10)
        assert result.returncode == 0 and result.successful == 1, result.describe()
        reasons[run.name] = one(received_requests(run, "CANCEL"), run.name).get("reason")
    # no "completed elsewhere" for an unanswered call: it would hide it from missed calls
    assert COMPLETED_ELSEWHERE not in reasons.values(), reasons


# --------------------------------------------------------------------------------------------
# 5. late offer (D15): no SDP in the INVITE, the offer in the 200, the answer in the ACK


@pytest.mark.e2e_timeout(60)
def test_late_offer_call_offer_in_200_answer_in_ack_both_through_the_relay(
    switch: MakeService, peers: Peers, require_sipp: str
) -> None:
    """Dave's SIPp is a delayed-offer trunk: its INVITE has no SDP. Eve's SIPp phone must get
    an INVITE without SDP and answer with an offer; Dave's 200 must carry that offer pointed at
    our relay, and Eve's ACK Dave's answer, pointed at our relay too (the other endpoint)."""
    svc = switch()
    media_lo, media_hi = svc.config.media_ports
    eve = peers.uas(svc, EVE, "uas_late_offer.xml")
    dave = start_sipp(
        "uac_late_offer.xml",
        target=svc.sip_addr,
        workdir=peers.tmp_path / "sipp",
        name="uac_late_offer",
        keys={"caller": DAVE.extension},
        extra=["-s", EVE.extension, "-au", DAVE.extension, "-ap", DAVE.password],
    )
    peers.sipps.append(dave)
    attach_diagnostics(peers.request.node, dave.describe)

    caller = dave.wait(20)
    assert caller.returncode == 0 and caller.successful == 1, caller.describe()
    callee = eve.wait(10)
    assert callee.returncode == 0 and callee.successful == 1, callee.describe()

    invite = one(received_requests(eve, "INVITE"), "INVITE at Eve's phone")
    assert invite.body == b"" and invite.get("content-type") is None, invite.text()
    ok = one(
        [m for m in caller.messages("received") if m.is_response and m.status == 200
         and m.method == "INVITE"],
        "200 for Dave's INVITE",
    )  # fmt: skip
    offer_addr, offer_port = sdp_audio(ok.body)
    assert offer_addr == LOOPBACK and media_lo <= offer_port <= media_hi, ok.text()
    assert "a=rtpmap:8 PCMA/8000" in ok.body.decode(), "the callee's codecs must pass as offered"
    ack = one(received_requests(eve, "ACK"), "ACK at Eve's phone")
    assert header(ack, "content-type") == "application/sdp", ack.text()
    answer_addr, answer_port = sdp_audio(ack.body)
    assert answer_addr == LOOPBACK and media_lo <= answer_port <= media_hi, ack.text()
    assert answer_port != offer_port, "each phone must face its own relay endpoint"
    wait_for_event(svc, "late_offer_answered")
    wait_for_event(svc, "call_ended", reason="bye")
