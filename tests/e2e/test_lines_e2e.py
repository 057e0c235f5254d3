"""End-to-end tests of shared-line features (issue 4) with real phones, SIPp and raw clients.

What they prove, from the outside (the service started from its CLI):
* BLF: a line member's dialog subscription (407 digest first) gets full-state dialog-info
  NOTIFYs for ringing (early), answered (confirmed, the answering party as local identity),
  held (``+sip.rendering=no``) and ended (terminated), then an idle document; the HTTP Lines
  view (``GET /api/lines`` and the ``/api/events`` stream) shows the same states in the same
  order; outsiders get 403, unknown packages 489;
* retrieval of a held call by ``Replaces`` built from the NOTIFY and by ``*9`` (also while the
  retriever holds another call), by baresip and by linphone; pickup of a ringing call by
  ``*8`` and by ``Replaces;early-only``; private hold (``*7``) keeps others out;
* transfer executed by the B2BUA: blind (baresip ``transfer``) and attended (REFER with
  ``Replaces``, from a scripted phone: neither baresip 1.0.0 nor linphone 5.1.65 can);
* every path ends with an idle line: BYE, CANCEL, ring timeout, pickup, transfer, and a
  restart of the service in the middle of a call.

Peers: baresip 1.0.0 for the phones (media and what a user does), linphone-daemon 5.1.65 for
a second SIP stack (in a loopback-only network namespace), SIPp as a desk phone's BLF key,
``harness.blf.BlfWatcher`` as a BLF key the test reads live, ``harness.rawphone.RawPhone``
where a request must be exact (Replaces, REFER). Audio is checked by RTP counts: baresip's
end-of-call statistics, the raw phone's own RTP socket, linphone's bandwidth log.
Everything stays on 127.0.0.1 and is bounded (``e2e_timeout``, baresip ``-t``, SIPp
``-m``/``-timeout``, ``timeout`` around linphone).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .conftest import attach_diagnostics
from .harness.baresip import Baresip, BaresipConfig, write_tone_wav
from .harness.blf import BlfWatcher, DialogInfo, labels, sipp_documents
from .harness.lines_api import EventStream, get_lines, line_calls
from .harness.linphone import (
    LinphoneConfig,
    LinphoneDaemon,
    NetNamespace,
    linphone_binary,
    netns_unavailable,
)
from .harness.ports import LOOPBACK, free_udp_range
from .harness.rawphone import RawPhone, sdp_audio_addr
from .harness.service import (
    ServiceConfig,
    SoftswitchService,
    User,
    service_events,
    start_fresh,
    stop_all,
)
from .harness.sipclient import SipMessage, offer_sdp
from .harness.sipp import SippProcess, start_sipp
from .harness.waiting import eventually

pytestmark = pytest.mark.e2e

ALICE = User("1001", "secret1", "Alice Exec")  # the delegator: her line is shared
BOB = User("1002", "secret2", "Bob Assistant")  # delegate
CAROL = User("1003", "secret3", "Carol Assistant")  # delegate
DAVE = User("1004", "secret4", "Dave Outsider")  # calls in; member of no line but his own
EVE = User("1005", "secret5", "Eve Other")  # member of no line but her own
USERS = (ALICE, BOB, CAROL, DAVE, EVE)
DELEGATIONS = [{"delegator": ALICE.extension, "delegates": [BOB.extension, CAROL.extension]}]
LINE = ALICE.extension

#: RTP ports for the service's relay and the phones: above 29999 and below the kernel's
#: ephemeral ports (32768+), because the e2e default (20000-32000) overlaps the relay range
#: scripts/bench_calls.py fills with thousands of sockets (MEDIA_PORTS 20000-29999) when a
#: benchmark runs on the same machine: a phone that cannot bind its RTP pair answers "500
#: Call Error" and the test fails for nothing. The window is small and ports are never
#: handed out twice per session, so ranges are kept tight: 40 relay ports per service (20
#: endpoints; a test needs at most 8) and 10 per phone (5 pairs; at most 3 in use).
RTP_WINDOW = (30000, 32766)
MEDIA_PORTS = 40
PHONE_RTP_PORTS = 10

RETRIEVED_ELSEWHERE = 'SIP;cause=200;text="Call retrieved elsewhere"'
COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'


def uri(user: User | str) -> str:
    """``sip:EXT@127.0.0.1``: what dialog-info identities and Referred-By name."""
    ext = user.extension if isinstance(user, User) else user
    return f"sip:{ext}@{LOOPBACK}"


# --------------------------------------------------------------------------------------------
# fixtures

MakeService = Callable[..., SoftswitchService]
T = TypeVar("T")


@pytest.fixture
def switch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeService]:
    """``make(ring_time=None)`` -> a running service with USERS and Alice's delegation.

    Why not conftest's ``service_factory``: it cannot pass ``delegations`` and ``lines``;
    this does the same (fresh ports, a fully probed media range, diagnostics, crash check).
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
            cfg.media_ports = free_udp_range(MEDIA_PORTS, *RTP_WINDOW, probe_all=True)
            return cfg

        def register(svc: SoftswitchService) -> None:
            services.append(svc)
            attach_diagnostics(request.node, svc.log_tail)

        return start_fresh(config, workdir, name, register)

    yield make
    crashed = stop_all(services)
    if crashed:
        pytest.fail("\n".join(crashed))


class Lab:
    """Every phone, watcher, stream and SIPp a test starts: in failure reports, and stopped."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.phones: list[Baresip] = []
        self.linphones: list[LinphoneDaemon] = []
        self.watchers: list[BlfWatcher] = []
        self.streams: list[EventStream] = []
        self.raws: list[RawPhone] = []
        self.sipps: list[SippProcess] = []

    def _diag(self, produce: Callable[[], str]) -> None:
        attach_diagnostics(self.request.node, produce)

    def phone(self, svc: SoftswitchService, user: User, *, answermode: str = "manual") -> Baresip:
        """A started baresip for ``user`` (SIP trace and RTP statistics on)."""
        cfg = BaresipConfig(
            user.extension,
            user.password,
            svc.sip_addr,
            self.tmp_path / f"phone-{user.extension}",
            display_name=user.name,
            answermode=answermode,
            rtp_ports=free_udp_range(PHONE_RTP_PORTS, *RTP_WINDOW, probe_all=True),
            sip_trace=True,
            extra_config=("rtp_stats\t\tyes",),
        )
        phone = Baresip(cfg, lifetime=90, name=user.extension)
        self.phones.append(phone)
        self._diag(phone.log_tail)
        return phone.start()

    def registered_phones(
        self, svc: SoftswitchService, *users: User, auto: tuple[User, ...] = ()
    ) -> dict[str, Baresip]:
        """Start one phone per user (``auto``: auto-answer), then wait until all registered."""
        phones = {u.extension: self.phone(svc, u) for u in users}
        phones |= {u.extension: self.phone(svc, u, answermode="auto") for u in auto}
        for phone in phones.values():
            phone.wait_registered()
        return phones

    def watcher(self, svc: SoftswitchService, user: User, line: str = LINE) -> BlfWatcher:
        """A BLF watcher of ``line`` subscribed as ``user`` (initial NOTIFY received)."""
        w = self.unstarted_watcher(svc, user, line)
        w.start()
        return w

    def unstarted_watcher(self, svc: SoftswitchService, user: User, line: str) -> BlfWatcher:
        w = BlfWatcher(svc.sip_addr, line, user.extension, user.password)
        self.watchers.append(w)
        self._diag(lambda: f"--- BLF watcher {user.extension} on {line}:\n{w.describe()}")
        return w

    def stream(self, svc: SoftswitchService, user: User) -> EventStream:
        s = EventStream(svc.config.http_port, user.extension, user.password)
        self.streams.append(s)
        self._diag(lambda: f"--- /api/events as {user.extension}: {s.describe()}")
        return s

    def raw(self, svc: SoftswitchService, user: User) -> RawPhone:
        r = RawPhone(svc.sip_addr, user.extension, user.password)
        self.raws.append(r)
        self._diag(
            lambda: f"--- raw phone {user.extension} got: {[m.start_line for m in r.requests]}"
        )
        return r

    def sipp(self, svc: SoftswitchService, scenario: str, name: str, **kw: Any) -> SippProcess:
        run = start_sipp(scenario, target=svc.sip_addr, workdir=self.tmp_path / "sipp",
                         name=name, **kw)  # fmt: skip
        self.sipps.append(run)
        self._diag(run.describe)
        return run

    def linphone(self, user: User, lifetime: int = 60) -> LinphoneDaemon:
        lp = LinphoneDaemon(LinphoneConfig(user.extension, self.tmp_path / f"lp-{user.extension}"),
                            lifetime=lifetime)  # fmt: skip
        self.linphones.append(lp)
        self._diag(lp.log_tail)
        return lp.start()

    def close(self) -> None:
        for s in self.streams:
            s.close()
        for w in self.watchers:
            w.close()
        for r in self.raws:
            r.close()
        for lp in self.linphones:
            lp.stop()
        for phone in self.phones:
            phone.stop()
        for run in self.sipps:
            run.stop()


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(request, tmp_path)
    yield lab
    lab.close()


def _unavailable(msg: str) -> None:
    """Skip on a developer machine, fail under CI: a silently skipped interop test is worse
    than a red build (the same rule as conftest's SIPp/baresip checks)."""
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[NetNamespace]:
    """The test runs inside a fresh loopback-only network namespace (see harness.linphone).

    Requested first, so it is set up before and torn down after every process of the test.
    """
    if linphone_binary() is None:
        _unavailable("linphone-daemon not installed (Debian: apt-get install linphone-cli)")
    reason = netns_unavailable()
    if reason is not None:
        _unavailable(reason)
    ns = NetNamespace(f"ss-e2e-{os.getpid()}-{abs(hash(request.node.nodeid)) % 100000}")
    ns.create()
    try:
        with ns.entered():
            yield ns
    finally:
        ns.delete()


# --------------------------------------------------------------------------------------------
# helpers


def mark_of(phone: Baresip) -> int:
    """The index the phone's next ctrl_tcp event will have (for ``wait_event(since=)``).

    Events are only read when someone reads the socket: pump first, or an event of an
    earlier call still in the socket (a CALL_CLOSED) would count as one that follows.
    """
    phone.pump(0.05)
    return len(phone.events)


def dial(phone: Baresip, svc: SoftswitchService, target: str) -> int:
    """``dial sip:TARGET@127.0.0.1:PORT`` on a baresip; returns the event mark before it."""
    assert phone.ctl is not None
    mark = mark_of(phone)
    for _ in range(3):
        reply = phone.ctl.command(f"dial sip:{target}@{LOOPBACK}:{svc.config.sip_port}")
        # baresip binds a random RTP pair of its range per call; another program on the
        # machine (an RTP benchmark) may hold one: a local bind failure, retried on another
        if reply.get("ok") or "Address already in use" not in str(reply.get("data")):
            break
    assert reply.get("ok"), reply
    return mark


def command(phone: Baresip, line: str) -> None:
    assert phone.ctl is not None
    reply = phone.ctl.command(line)
    assert reply.get("ok"), f"{phone.config.user}: {line!r} -> {reply}"


def refused(phone: Baresip, svc: SoftswitchService, code: str) -> str:
    """Dial a feature code that must not connect; returns the final answer ("403 Forbidden").

    baresip reports it in the CALL_CLOSED event's ``param``.
    """
    mark = dial(phone, svc, code)
    ev = phone.wait_event("CALL_CLOSED", 10, since=mark)
    established = [e for e in phone.events[mark:] if e.get("type") == "CALL_ESTABLISHED"]
    assert not established, f"{code} connected: {established}"
    return str(ev.get("param", ""))


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


def rtp_of_call(phone: Baresip, index: int, timeout: float = 5.0) -> tuple[int, int]:
    """(sent, received) RTP packets of the phone's ``index``-th statistics table (0 = first).

    baresip prints a table when a call ends, but not for every call (none for a call without
    media, a cancelled ring or a feature code's 480, and not always for one that lasted
    under a second): take ``len(phone.rtp_stats())`` just before ending the call of
    interest as its index.
    """
    stats = eventually(
        lambda: phone.rtp_stats() if len(phone.rtp_stats()) > index else None,
        f"RTP statistics of call {index} in {phone.log_path}",
        timeout,
    )
    return stats[index]


def sent_at_most(phone: Baresip) -> int:
    """An upper bound of the RTP packets ``phone`` sent in all its (ended) calls.

    Exact from baresip's statistics tables when every call with media printed one; they
    are not printed for every short call, so otherwise from sndfile's ``enc`` WAVs: every
    20 ms frame of the transmit pipeline is recorded there (320 bytes after a 44-byte
    header) and a phone cannot send a packet it did not encode (it may encode frames it
    does not send, on hold: a looser bound).
    """
    stats = phone.rtp_stats()
    recordings = phone.recordings("enc")
    if stats and len(stats) >= len(recordings):
        return sum(sent for sent, _ in stats)
    return sum(-(-max(0, p.stat().st_size - 44) // 320) for p in recordings)


def audio_from(received: int, others: list[Baresip]) -> int:
    """A lower bound of the packets a phone got from the *last* peer of its call.

    A phone's statistics count every packet of the call, whoever sent it; the phones its
    peer talked to before (``others``) account for at most what they sent, so the rest came
    from the peer we want to prove.
    """
    return received - sum(sent_at_most(p) for p in others)


AUDIO_SECONDS = 3.0  # of talk after every take-over, before the audio is counted
TALK_BEFORE_HOLD = 1.5  # long enough for baresip to print the call's RTP table at its end
# After a retrieve the far end's phone hears a new RTP source (the retrieving phone's SSRC)
# and loses a few packets resynchronising: 17 (0.34 s) in a run where the relay's call_media
# event showed every packet received and sent on, none ignored or dropped; 47 (0.94 s) in
# another ("SSRC changed", "discard old frame (7.910 seconds old)" in baresip's log, the
# relay again 0 dropped), which failed 6 s of talk at 84 %. The same 90 % is asked over a
# talk long enough that this one-time loss stays under 10 %, while a stale latch (2 s,
# 100 packets) or a missed re-INVITE still fails it.
RETRIEVE_AUDIO_SECONDS = 12.0


def assert_audio(got: int, sent: int, what: str) -> None:
    """``got`` of the ``sent`` packets of one direction arrived: at least 90 %.

    Both phones send 50 packets/s from the moment the call is theirs, so a relay that
    forwards late (a stale latch, a missed re-INVITE) shows as a fraction, not just as
    "nothing at all"; 10 % covers the first packets before both ends are pointed.
    """
    assert sent >= 100, f"{what}: only {sent} packets were sent, the call was too short"
    assert got >= 0.9 * sent, f"{what}: {got} of {sent} packets arrived ({got / sent:.0%})"


def lines_view(svc: SoftswitchService, user: User = ALICE) -> list[tuple[str, str | None, str]]:
    """(state, party, remote) of each call on LINE, from ``GET /api/lines`` as ``user``."""
    view = get_lines(svc.config.http_port, user.extension, user.password)
    return [(c["state"], c["party"], c["remote"]) for c in line_calls(view, LINE)]


def states_of(view: list[tuple[str, str | None, str]]) -> str:
    """A /api/lines call list as a lamp label, comparable to ``DialogInfo.label``."""
    return "+".join(state for state, _, _ in view) or "idle"


def ends_idle(svc: SoftswitchService, watcher: BlfWatcher, since: int) -> DialogInfo:
    """The line's call is over: the watcher saw it terminated, a re-read shows the line idle
    (a lamp that stays lit is what users report most), and ``/api/lines`` lists no call."""
    watcher.wait_for(
        lambda d: all(x.state == "terminated" for x in d.dialogs) and bool(d.dialogs),
        10,
        since=since,
        what="the terminated dialog",
    )
    now = watcher.read_now()
    assert now.idle, f"line not idle after the call:\n{watcher.describe()}"
    assert lines_view(svc) == [], "GET /api/lines still lists a call"
    return now


def party_doc(party: User, remote: User, label: str = "active") -> Callable[[DialogInfo], bool]:
    """A document whose only live dialog is ``party`` talking to ``remote`` in ``label``.

    Terminated dialogs are ignored: a call that just ended (the transferor's, say) is listed
    once more as terminated, in the same NOTIFY as the change that ended it or in its own.
    """

    def check(d: DialogInfo) -> bool:
        live = [x for x in d.dialogs if x.state != "terminated"]
        return (
            len(live) == 1
            and live[0].label == label
            and live[0].local_identity == uri(party)
            and live[0].remote_identity == uri(remote)
        )

    return check


def sipfrags(messages: list[SipMessage]) -> list[str]:
    """Status lines of the ``message/sipfrag`` NOTIFYs of a REFER (RFC 3515)."""
    return [
        m.body.decode(errors="replace").strip()
        for m in messages
        if m.start_line.startswith("NOTIFY ") and (m.get("event") or "").startswith("refer")
    ]


def ring_line(
    svc: SoftswitchService, caller: Baresip, ringing: list[Baresip], watcher: BlfWatcher
) -> DialogInfo:
    """``caller`` dials LINE; every phone of ``ringing`` alerts; returns the early document."""
    marks = [mark_of(p) for p in ringing]
    since = watcher.mark()
    dial(caller, svc, LINE)
    for phone, mark in zip(ringing, marks, strict=True):
        phone.wait_event("CALL_INCOMING", 10, since=mark)
    return watcher.wait_label("ringing", 10, since=since)


def answer(phone: Baresip, watcher: BlfWatcher, party: User, remote: User) -> DialogInfo:
    """``phone`` accepts its ringing call; returns the confirmed document showing it."""
    mark, since = mark_of(phone), watcher.mark()
    command(phone, "accept")
    phone.wait_event("CALL_ESTABLISHED", 10, since=mark)
    return watcher.wait_for(party_doc(party, remote), 10, since=since, what=f"{party.name} active")


def hold(phone: Baresip, watcher: BlfWatcher, party: User, remote: User) -> DialogInfo:
    """``phone`` holds its current call (re-INVITE sendonly); returns the held document."""
    since = watcher.mark()
    command(phone, "hold")
    return watcher.wait_for(party_doc(party, remote, "held"), 10, since=since, what="held")


# --------------------------------------------------------------------------------------------
# 1 + 6. BLF NOTIFYs follow a line call; the HTTP view shows the same states in the same order


@pytest.mark.e2e_timeout(60)
def test_blf_and_http_view_follow_ring_answer_hold_and_hangup(
    switch: MakeService, lab: Lab, require_baresip: str, require_sipp: str
) -> None:
    """Dave calls Alice's line; the phones of Alice, Bob and Carol ring; Bob answers, holds,
    Dave hangs up. Two BLF keys watch: Bob's (the Python watcher, read live) and Carol's
    (SIPp, an independent SIP stack, read from its trace). Alice's HTTP event stream and
    ``GET /api/lines`` are read at every step. All must tell the same story, in order."""
    svc = switch()
    phones = lab.registered_phones(svc, ALICE, BOB, CAROL, DAVE)
    alice, bob, carol, dave = (phones[u.extension] for u in (ALICE, BOB, CAROL, DAVE))
    stream = lab.stream(svc, ALICE)
    watcher = lab.watcher(svc, BOB)
    assert watcher.docs[0].idle and watcher.docs[0].entity == uri(ALICE), watcher.describe()
    sipp = lab.sipp(
        svc, "blf_watch.xml", "blf_watch_1003", keys={"watcher": CAROL.extension},
        extra=["-s", LINE, "-au", CAROL.extension, "-ap", CAROL.password],
        recv_timeout_ms=30000, run_timeout=50,
    )  # fmt: skip
    wait_for_event(svc, "subscribe", user=CAROL.extension, line=LINE)
    http = [states_of(lines_view(svc))]

    ringing = ring_line(svc, dave, [alice, bob, carol], watcher)
    early = ringing.dialog()
    assert (early.state, early.direction) == ("early", "recipient"), ringing.describe()
    assert early.remote_identity == uri(DAVE) and early.local_identity == "", ringing.describe()
    http.append(states_of(lines_view(svc)))
    assert lines_view(svc) == [("ringing", None, DAVE.extension)]

    active = answer(bob, watcher, BOB, DAVE)
    http.append(states_of(lines_view(svc)))
    assert lines_view(svc) == [("active", BOB.extension, DAVE.extension)]
    # the dialog ids are Bob's phone's own: a phone can build Replaces from them
    invite = bob.received("INVITE")[-1]
    ok = [
        t.msg
        for t in bob.sip_trace()
        if not t.incoming and t.msg.start_line.startswith("SIP/2.0 200")
        and (t.msg.get("cseq") or "").endswith("INVITE")
    ]  # fmt: skip
    d = active.dialog()
    assert d.call_id == invite.get("call-id"), (d, invite.text())
    assert f"tag={d.remote_tag}" in (invite.get("from") or ""), (d, invite.text())
    assert ok and f"tag={d.local_tag}" in (ok[0].get("to") or ""), (d, ok)
    assert d.rendering == "yes" and d.exclusive == "false", active.describe()

    held = hold(bob, watcher, BOB, DAVE)
    assert held.dialog().rendering == "no", held.describe()
    http.append(states_of(lines_view(svc)))
    assert lines_view(svc) == [("held", BOB.extension, DAVE.extension)]

    since = watcher.mark()
    command(dave, "hangup")
    ended = watcher.wait_label("ended", 10, since=since)
    assert ended.dialog().event == "remote-bye", ended.describe()  # Dave, not Bob, hung up
    http.append(states_of(lines_view(svc)))
    now = watcher.read_now()
    assert now.idle, watcher.describe()

    # the same story everywhere, in the same order
    assert labels(watcher.docs) == ["idle", "ringing", "active", "held", "ended", "idle"], (
        watcher.describe()
    )
    versions = [doc.version for doc in watcher.docs]
    assert versions == list(range(len(versions))), f"versions not +1 per NOTIFY: {versions}"
    line_events = stream.line_events(LINE)
    assert [e.data["state"] for e in line_events] == ["ringing", "active", "held", "ended"]
    assert [e.data["party"] for e in line_events] == [None, "1002", "1002", "1002"]
    assert {e.data["remote"] for e in line_events} == {DAVE.extension}
    event_versions = [e.data["version"] for e in line_events]
    assert event_versions == list(range(event_versions[0], event_versions[0] + 4))
    assert http == ["idle", "ringing", "active", "held", "idle"]
    logged = [e["state"] for e in service_events(svc, "line_event") if e["line"] == LINE]
    assert logged == ["ringing", "active", "held", "ended"]

    result = sipp.wait(15)  # saw the terminated dialog, unsubscribed, took the final NOTIFY
    assert result.returncode == 0, result.describe()
    docs = sipp_documents(result.files["trace"])
    assert labels(docs) == ["idle", "ringing", "active", "held", "ended", "idle"], [
        d.describe() for d in docs
    ]
    assert docs[-1].subscription_state.startswith("terminated"), docs[-1].describe()
    assert docs[2].dialog().local_identity == uri(BOB), docs[2].describe()


# --------------------------------------------------------------------------------------------
# 2. retrieving a held call: Replaces from the NOTIFY, and *9


@pytest.mark.e2e_timeout(60)
def test_retrieve_held_call_with_replaces_built_from_the_notify(
    switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """Bob holds Dave's call on Alice's line; Alice's desk phone (a scripted phone: baresip
    cannot send Replaces) sends INVITE with ``Replaces`` taken from her BLF NOTIFY. Dave's
    phone is re-INVITEd to her, Bob's gets BYE ("Call retrieved elsewhere"), and audio flows
    both ways between Dave and Alice through the relay."""
    svc = switch()
    phones = lab.registered_phones(svc, BOB, DAVE)
    bob, dave = phones[BOB.extension], phones[DAVE.extension]
    watcher = lab.watcher(svc, ALICE)
    ring_line(svc, dave, [bob], watcher)
    answer(bob, watcher, BOB, DAVE)
    dave.wait_event("CALL_RTPESTAB", 10)
    held = hold(bob, watcher, BOB, DAVE)

    alice = lab.raw(svc, ALICE)
    since, bob_mark = watcher.mark(), mark_of(bob)
    call = alice.invite(LINE, headers=[("Replaces", held.dialog().replaces())])
    assert call.answered, f"{call.describe()}\n{call.final.text()}"
    lo, hi = svc.config.media_ports
    relay = sdp_audio_addr(call.final.body)
    assert relay[0] == LOOPBACK and lo <= relay[1] <= hi, call.final.text()
    watcher.wait_for(party_doc(ALICE, DAVE), 10, since=since, what="Alice active with Dave")
    retrieved = wait_for_event(svc, "call_retrieved", party=ALICE.extension)
    assert retrieved["previous"] == BOB.extension, retrieved

    bob.wait_event("CALL_CLOSED", 10, since=bob_mark)
    byes = eventually(lambda: bob.received("BYE"), "BYE at Bob's phone")
    assert byes[-1].get("reason") == RETRIEVED_ELSEWHERE, byes[-1].text()
    assert len(dave.received("INVITE")) >= 2, "Dave's phone got no re-INVITE"  # hold + retrieve

    rtp = alice.pump_rtp(AUDIO_SECONDS, to=relay)
    assert_audio(rtp.received, rtp.sent, "Dave -> Alice")  # Dave sends as often as we do
    assert rtp.sources == {relay}, f"RTP not from the relay port {relay}: {rtp.sources}"
    since = watcher.mark()
    assert alice.bye(call).status == 200
    dave.wait_event("CALL_CLOSED", 10)
    from_alice = audio_from(rtp_of_call(dave, 0)[1], [bob])
    assert_audio(from_alice, rtp.sent, "Alice -> Dave")
    ends_idle(svc, watcher, since)


@pytest.mark.e2e_timeout(60)
def test_retrieve_held_call_by_star9_while_holding_another_call(
    switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """Bob holds Dave's call; Alice is on a call with Eve, holds it and dials ``*9`` on her
    baresip: the oldest held call on her lines that is not hers (Dave's) moves to her phone,
    Bob's phone gets BYE, Dave's audio reaches Alice, and her call with Eve stays held."""
    svc = switch()
    phones = lab.registered_phones(svc, ALICE, BOB, DAVE, auto=(EVE,))
    alice, bob, dave = phones[ALICE.extension], phones[BOB.extension], phones[DAVE.extension]
    watcher = lab.watcher(svc, ALICE)
    ring_line(svc, dave, [alice, bob], watcher)
    answer(bob, watcher, BOB, DAVE)
    # Bob talks before he holds: a call shorter than a second may end without baresip's RTP
    # table, and `audio_from` then bounds what Bob sent by the frames he *encoded*, held
    # time included. That loose bound, not lost audio, failed "Alice -> Dave" (139 of 155)
    # while the relay's call_media counted every one of Alice's 155 packets forwarded.
    time.sleep(TALK_BEFORE_HOLD)
    hold(bob, watcher, BOB, DAVE)

    mark = dial(alice, svc, EVE.extension)
    alice.wait_event("CALL_ESTABLISHED", 10, since=mark)
    since = watcher.mark()
    command(alice, "hold")
    watcher.wait_for(
        lambda d: sorted(x.label for x in d.dialogs) == ["held", "held"], 10, since=since,
        what="both calls held",
    )  # fmt: skip

    since, bob_mark = watcher.mark(), mark_of(bob)
    mark = dial(alice, svc, "*9")
    ev = alice.wait_event("CALL_ESTABLISHED", 10, since=mark)
    assert ev["peeruri"].startswith("sip:*9@"), ev
    doc = watcher.wait_for(
        lambda d: {(x.label, x.local_identity, x.remote_identity) for x in d.dialogs}
        == {("active", uri(ALICE), uri(DAVE)), ("held", uri(ALICE), uri(EVE))},
        10, since=since, what="Alice with Dave, Eve still held",
    )  # fmt: skip
    assert len(doc.dialogs) == 2, doc.describe()
    retrieved = wait_for_event(svc, "call_retrieved", party=ALICE.extension)
    assert retrieved["previous"] == "1002", retrieved
    bob.wait_event("CALL_CLOSED", 10, since=bob_mark)
    byes = eventually(lambda: bob.received("BYE"), "BYE at Bob's phone")
    assert byes[-1].get("reason") == RETRIEVED_ELSEWHERE, byes[-1].text()

    time.sleep(RETRIEVE_AUDIO_SECONDS)
    since, mark, stats = watcher.mark(), mark_of(alice), len(alice.rtp_stats())
    command(alice, "hangup")  # the current call: the retrieved one
    closed = alice.wait_event("CALL_CLOSED", 10, since=mark)
    assert closed["id"] == ev["id"], (closed, ev)
    dave.wait_event("CALL_CLOSED", 10)
    sent, received = rtp_of_call(alice, stats)
    dave_sent, dave_received = rtp_of_call(dave, 0)
    # Dave's phone resumes sending when the far end's un-hold re-INVITE is through, which a
    # busy machine delayed by 2.5 s once: Alice then sent more than Dave, and comparing her
    # received count with her own sent count failed while the relay had forwarded every
    # packet Dave sent. So compare with what Dave sent *to her*: his whole call less what
    # Bob received before the retrieve (Bob can only have received Dave's packets). Bob's
    # call ended at the retrieve, seconds ago: its table is printed by now if it ever is
    # (not for every call, see `rtp_of_call`); without one, 0 is the safe lower bound.
    bob_tables = bob.rtp_stats()
    dave_to_alice = dave_sent - (bob_tables[0][1] if bob_tables else 0)
    assert_audio(received, dave_to_alice, "Dave -> Alice")
    assert_audio(audio_from(dave_received, [bob]), sent, "Alice -> Dave")
    # the relay's own account of that call, logged when its media is released: one bridge
    # for the whole call, a = Dave's leg, b = Bob's and then Alice's
    media = wait_for_event(svc, "call_media", call=retrieved["call"])
    assert media["a_to_b"]["rtp_packets"] >= dave_to_alice, media
    assert media["b_to_a"]["rtp_packets"] >= sent, media

    # the Eve call is still there (baresip resumes it when the other call ends): hang it up
    watcher.wait_for(
        lambda d: any(x.state == "terminated" and x.remote_identity == uri(DAVE)
                      for x in d.dialogs),
        10, since=since, what="Dave's call terminated",
    )  # fmt: skip
    since, mark = watcher.mark(), mark_of(alice)
    command(alice, "hangup")
    alice.wait_event("CALL_CLOSED", 10, since=mark)
    ends_idle(svc, watcher, since)


# --------------------------------------------------------------------------------------------
# 3. transfer executed by the B2BUA


@pytest.mark.e2e_timeout(60)
def test_blind_transfer_by_baresip_refer_reaches_alice(
    switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """Bob answers Dave's call and transfers it blind to Alice (baresip ``transfer``, a
    REFER). The B2BUA answers 202, reports 100/180/200 in sipfrag NOTIFYs, rings Alice's
    line with Referred-By, and after her answer Dave talks to Alice; Bob's call is over."""
    svc = switch()
    phones = lab.registered_phones(svc, ALICE, BOB, DAVE)
    alice, bob, dave = phones[ALICE.extension], phones[BOB.extension], phones[DAVE.extension]
    watcher = lab.watcher(svc, ALICE)
    stream = lab.stream(svc, ALICE)
    ring_line(svc, dave, [alice, bob], watcher)
    answer(bob, watcher, BOB, DAVE)
    dave.wait_event("CALL_RTPESTAB", 10)

    alice_mark, bob_mark, since = mark_of(alice), mark_of(bob), watcher.mark()
    command(bob, f"transfer {uri(ALICE)}:{svc.config.sip_port}")
    alice.wait_event("CALL_INCOMING", 10, since=alice_mark)
    invite = alice.received("INVITE")[-1]
    assert uri(BOB) in (invite.get("referred-by") or ""), invite.text()
    assert uri(DAVE) in (invite.get("from") or ""), invite.text()
    command(alice, "accept")
    alice.wait_event("CALL_ESTABLISHED", 10, since=alice_mark)
    watcher.wait_for(party_doc(ALICE, DAVE), 10, since=since, what="Alice active with Dave")
    bob.wait_event("CALL_CLOSED", 10, since=bob_mark)

    responses = [m.start_line for m in bob.received("SIP/2.0") if m.method == "REFER"]
    assert "SIP/2.0 202 Accepted" in responses, responses

    def final_frag() -> list[str] | None:
        frags = sipfrags(bob.received("NOTIFY"))
        return frags if "SIP/2.0 200 OK" in frags else None

    frags = eventually(final_frag, "the final sipfrag NOTIFY at Bob's phone")
    assert frags[0] == "SIP/2.0 100 Trying" and frags[-1] == "SIP/2.0 200 OK", frags
    assert "SIP/2.0 180 Ringing" in frags, frags
    transfer = wait_for_event(svc, "call_transfer", kind="blind")
    assert transfer["by"] == BOB.extension, transfer
    wait_for_event(svc, "call_ended", reason="transferred")

    time.sleep(AUDIO_SECONDS)
    since, stats = watcher.mark(), len(alice.rtp_stats())
    command(dave, "hangup")
    alice.wait_event("CALL_CLOSED", 10, since=alice_mark)
    dave.wait_event("CALL_CLOSED", 10)
    sent, received = rtp_of_call(alice, stats)
    assert_audio(received, sent, "Dave -> Alice")
    assert_audio(audio_from(rtp_of_call(dave, 0)[1], [bob]), sent, "Alice -> Dave")
    ends_idle(svc, watcher, since)
    states = stream.states(LINE)
    assert states[:2] == ["ringing", "active"] and states[-1] == "ended", states
    assert "ringing" in states[2:], f"the transfer never rang the line: {states}"


@pytest.mark.e2e_timeout(60)
def test_attended_transfer_refer_with_replaces_joins_dave_and_alice(
    switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """Bob's scripted desk phone picks up Dave's ringing call with ``Replaces;early-only``
    from the NOTIFY, calls Alice (consultation), then sends REFER in Dave's dialog with
    ``Refer-To: <sip:1001@...?Replaces=<consultation>>``. The B2BUA joins Dave and Alice
    (re-INVITEs), hangs up both of Bob's legs, and audio flows between Dave and Alice."""
    svc = switch()
    phones = lab.registered_phones(svc, ALICE, DAVE)
    alice, dave = phones[ALICE.extension], phones[DAVE.extension]
    watcher = lab.watcher(svc, ALICE)
    bob = lab.raw(svc, BOB)

    ringing = ring_line(svc, dave, [alice], watcher)
    since, alice_mark = watcher.mark(), mark_of(alice)
    call_a = bob.invite(LINE, headers=[("Replaces", ringing.dialog().replaces(early_only=True))])
    assert call_a.answered, f"pickup by Replaces: {call_a.describe()}\n{call_a.final.text()}"
    dave.wait_event("CALL_ESTABLISHED", 10)
    alice.wait_event("CALL_CLOSED", 10, since=alice_mark)
    watcher.wait_for(party_doc(BOB, DAVE), 10, since=since, what="Bob active with Dave")
    assert wait_for_event(svc, "call_picked_up")["party"] == BOB.extension

    command(alice, "answermode auto")  # the consultation: Alice answers at once
    alice_mark, stats = mark_of(alice), len(alice.rtp_stats())
    call_b = bob.invite(LINE)
    assert call_b.answered, f"consultation: {call_b.describe()}"
    alice.wait_event("CALL_ESTABLISHED", 10, since=alice_mark)

    to_tag = re.search(r";tag=([^;\s]+)", call_b.to_header)
    assert to_tag, call_b.to_header
    replaces = f"{call_b.call_id};to-tag={to_tag.group(1)};from-tag={call_b.from_tag}"
    refer_to = f"<{uri(ALICE)}?Replaces={urllib.parse.quote(replaces, safe='')}>"
    since = watcher.mark()
    resp = bob.request(call_a, "REFER", [("Refer-To", refer_to), ("Referred-By", f"<{uri(BOB)}>")])
    assert resp.status == 202, resp.text()
    notifies = bob.wait_requests("NOTIFY", 2, call_id=call_a.call_id)
    assert sipfrags(notifies) == ["SIP/2.0 100 Trying", "SIP/2.0 200 OK"], sipfrags(notifies)
    bob.wait_requests("BYE", 1, call_id=call_a.call_id)
    bob.wait_requests("BYE", 1, call_id=call_b.call_id)
    transfer = wait_for_event(svc, "call_transfer", kind="attended")
    assert transfer["by"] == BOB.extension, transfer
    dave_reinvited = eventually(lambda: len(dave.received("INVITE")) >= 1, "re-INVITE at Dave")
    alice_reinvited = eventually(lambda: len(alice.received("INVITE")) >= 3, "re-INVITE at Alice")
    assert dave_reinvited and alice_reinvited  # line call, consultation, re-INVITE
    time.sleep(AUDIO_SECONDS)  # Bob's scripted phone never sent RTP: all of it is theirs
    view = lines_view(svc)  # what GET /api/lines says while Alice talks to Dave
    during = watcher.mark()
    command(dave, "hangup")
    alice.wait_event("CALL_CLOSED", 10, since=alice_mark)
    dave.wait_event("CALL_CLOSED", 10)
    alice_sent, alice_got = rtp_of_call(alice, stats)
    _, dave_got = rtp_of_call(dave, 0)
    assert_audio(alice_got, alice_sent, "Dave -> Alice")
    assert_audio(dave_got, alice_sent, "Alice -> Dave")
    bob.drain()
    ends_idle(svc, watcher, during)

    # what the line showed after the transfer: Alice talking to Dave (the caller), the
    # transferor gone; checked last so that a wrong lamp does not hide the rest
    shown = watcher.docs[since:during]  # the last one is the state while they talked
    assert shown and party_doc(ALICE, DAVE)(shown[-1]), (
        f"after the attended transfer the line should show Alice with Dave; NOTIFYs since "
        f"the REFER:\n{watcher.describe()}"
    )
    assert view == [("active", ALICE.extension, DAVE.extension)], view


# --------------------------------------------------------------------------------------------
# 4. outsiders: 403 for watching and taking calls; private hold keeps members out too


@pytest.mark.e2e_timeout(60)
def test_outsiders_and_private_hold_are_refused(
    switch: MakeService, lab: Lab, require_baresip: str, require_sipp: str
) -> None:
    """Dave is no member of Alice's line: his SUBSCRIBE (SIPp and the Python watcher, with
    valid credentials) gets 403, and so do ``*8``/``*81001`` while the line rings, ``*9``/
    ``*91001`` while a call is held, and INVITEs with ``Replaces`` (early-only and not).
    None of it disturbs the call. Then Bob locks his held call (``*7``): Alice, a member,
    now gets ``403 Call Is Private`` for ``*9`` and for Replaces, until Bob resumes."""
    svc = switch()
    phones = lab.registered_phones(svc, ALICE, BOB, DAVE, EVE)
    alice, bob, dave, eve = (phones[u.extension] for u in (ALICE, BOB, DAVE, EVE))
    watcher = lab.watcher(svc, ALICE)
    outcomes: dict[str, str] = {}

    sipp = lab.sipp(
        svc, "blf_watch_forbidden.xml", "blf_forbidden_1004", keys={"watcher": DAVE.extension},
        extra=["-s", LINE, "-au", DAVE.extension, "-ap", DAVE.password], run_timeout=20,
    )  # fmt: skip
    result = sipp.wait(15)
    outcomes["SIPp SUBSCRIBE as 1004"] = "403" if result.returncode == 0 else result.describe()
    outsider = lab.unstarted_watcher(svc, DAVE, LINE)
    outcomes["SUBSCRIBE as 1004"] = outsider.subscribe().start_line
    bad_event = outsider.subscribe(event="presence")
    outcomes["SUBSCRIBE Event: presence"] = bad_event.start_line
    assert bad_event.get("allow-events") == "dialog", bad_event.text()

    ringing = ring_line(svc, eve, [alice, bob], watcher)
    quiet = watcher.mark()
    raw_dave = lab.raw(svc, DAVE)
    for code in ("*8", "*81001"):
        outcomes[f"{code} by 1004 while ringing"] = refused(dave, svc, code)
    early = raw_dave.invite(
        LINE, headers=[("Replaces", ringing.dialog().replaces(early_only=True))]
    )
    outcomes["Replaces;early-only by 1004"] = early.final.start_line

    answer(bob, watcher, BOB, EVE)
    held = hold(bob, watcher, BOB, EVE)
    for code in ("*9", "*91001"):
        outcomes[f"{code} by 1004 while held"] = refused(dave, svc, code)
    late = raw_dave.invite(LINE, headers=[("Replaces", held.dialog().replaces())])
    outcomes["Replaces by 1004"] = late.final.start_line

    # private hold: Bob's phone (a scripted one: baresip resumes its held call as soon as
    # the *7 call ends, which would unlock it at once) dials *7 while his call is held
    since = watcher.mark()
    lock = lab.raw(svc, BOB).invite("*7")
    outcomes["*7 by 1002"] = lock.final.start_line
    locked = watcher.wait_for(lambda d: d.dialogs[0].exclusive == "true", 10, since=since)
    assert party_doc(BOB, EVE, "held")(locked), locked.describe()
    for code in ("*9", "*91001"):
        outcomes[f"{code} by 1001 on a private call"] = refused(alice, svc, code)
    private = lab.raw(svc, ALICE).invite(LINE, headers=[("Replaces", held.dialog().replaces())])
    outcomes["Replaces by 1001 on a private call"] = private.final.start_line
    # nothing of it touched the call: the lamps only moved for Bob's own actions
    moves = [d.label for d in watcher.docs[quiet:]]
    assert moves == ["active", "held", "held"], watcher.describe()
    assert all(d.dialog().local_identity in ("", uri(BOB)) for d in watcher.docs[1:])

    since, bob_mark = watcher.mark(), mark_of(bob)
    command(bob, "resume")
    unlocked = watcher.wait_for(party_doc(BOB, EVE), 10, since=since, what="resumed")
    assert unlocked.dialog().exclusive == "false", unlocked.describe()
    since = watcher.mark()
    command(bob, "hangup")
    bob.wait_event("CALL_CLOSED", 10, since=bob_mark)
    ends_idle(svc, watcher, since)

    # the answers, checked last so that one wrong answer does not hide the others or the rest
    expected = {
        "SIPp SUBSCRIBE as 1004": "403",
        "SUBSCRIBE as 1004": "SIP/2.0 403 Forbidden",
        "SUBSCRIBE Event: presence": "SIP/2.0 489 Bad Event",
        "*8 by 1004 while ringing": "403 Forbidden",
        "*81001 by 1004 while ringing": "403 Forbidden",
        "Replaces;early-only by 1004": "SIP/2.0 403 Forbidden",
        "*9 by 1004 while held": "403 Forbidden",
        "*91001 by 1004 while held": "403 Forbidden",
        "Replaces by 1004": "SIP/2.0 403 Forbidden",
        "*7 by 1002": "SIP/2.0 480 Call Locked",
        "*9 by 1001 on a private call": "403 Call Is Private",
        "*91001 by 1001 on a private call": "403 Call Is Private",
        "Replaces by 1001 on a private call": "SIP/2.0 403 Call Is Private",
    }
    wrong = {k: f"got {outcomes.get(k)!r}, want {v!r}" for k, v in expected.items()
             if outcomes.get(k) != v}  # fmt: skip
    assert not wrong, "answers that differ from issue 4:\n" + "\n".join(
        f"  {k}: {v}" for k, v in wrong.items()
    )


# --------------------------------------------------------------------------------------------
# 5. a second SIP stack: linphone-daemon retrieves a held call with *9


@pytest.mark.e2e_timeout(90)
def test_linphone_delegate_retrieves_held_call_by_star9(
    netns: NetNamespace, switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """Carol's phone is linphone-daemon (belle-sip). It rings with the line's call like any
    member's phone and is cancelled when Bob answers; Bob holds; Carol dials
    ``sip:*9@127.0.0.1``: linphone answers the 407, the call moves to it (Bob gets BYE),
    Dave's audio reaches linphone and linphone's (an in-call WAV player) reaches Dave."""
    assert netns.addresses().split()[0] == "lo", netns.addresses()  # nothing but loopback
    svc = switch()
    phones = lab.registered_phones(svc, BOB, DAVE)
    bob, dave = phones[BOB.extension], phones[DAVE.extension]
    carol = lab.linphone(CAROL, lifetime=80)
    carol.register(CAROL.extension, CAROL.password, svc.sip_addr)
    carol.wait_registered()
    watcher = lab.watcher(svc, BOB)

    mark = carol.mark()
    ring_line(svc, dave, [bob], watcher)
    carol.wait_event("IncomingReceived", 10, since=mark)
    answer(bob, watcher, BOB, DAVE)
    carol.wait_event("LinphoneCallEnd", 10, since=mark)  # cancelled: answered elsewhere
    hold(bob, watcher, BOB, DAVE)

    mark, since, bob_mark = carol.mark(), watcher.mark(), mark_of(bob)
    call_id = carol.call(f"sip:*9@{LOOPBACK}:{svc.config.sip_port}")
    carol.wait_event("StreamsRunning", 15, since=mark, call_id=call_id)
    watcher.wait_for(party_doc(CAROL, DAVE), 10, since=since, what="Carol active with Dave")
    assert wait_for_event(svc, "call_retrieved", party=CAROL.extension)["previous"] == "1002"
    bob.wait_event("CALL_CLOSED", 10, since=bob_mark)
    byes = eventually(lambda: bob.received("BYE"), "BYE at Bob's phone")
    assert byes[-1].get("reason") == RETRIEVED_ELSEWHERE, byes[-1].text()

    wav = write_tone_wav(lab.tmp_path / "carol-tone.wav", seconds=10)
    reply = carol.cmd(f"incall-player-start {wav} {call_id}")
    assert reply.ok, reply.text  # linphone has no sound card here: play a file instead
    time.sleep(2.5)
    since = watcher.mark()
    command(dave, "hangup")
    carol.wait_event("LinphoneCallEnd", 10, since=mark, call_id=call_id)
    _, dave_got = rtp_of_call(dave, 0)
    down = [
        float(d)
        for d, _ in re.findall(r"RTP : \[d=([\d.]+),u=([\d.]+)\]", carol.log_path.read_text())
    ]
    assert max(down, default=0.0) >= 50.0, f"Dave's audio did not reach linphone: {down} kbit/s"
    from_carol = audio_from(dave_got, [bob])
    assert from_carol >= 50, f"linphone's audio did not reach Dave (>= {from_carol} packets)"
    ends_idle(svc, watcher, since)


# --------------------------------------------------------------------------------------------
# pickup of a ringing call by *8


@pytest.mark.e2e_timeout(60)
def test_pickup_by_star8_from_a_delegate_who_opted_out_of_ringing(
    switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """Carol opts out of the line's ringing (``*21``), so only Alice's and Bob's phones ring;
    she picks the call up with ``*8``: both ringing phones get CANCEL ("Call completed
    elsewhere"), Dave talks to Carol. ``*22`` opts her back in."""
    svc = switch()
    phones = lab.registered_phones(svc, ALICE, BOB, CAROL, DAVE)
    alice, bob, carol, dave = (phones[u.extension] for u in (ALICE, BOB, CAROL, DAVE))
    watcher = lab.watcher(svc, CAROL)
    assert refused(carol, svc, "*21") == "480 Ringing Off For 1001"

    carol_mark = mark_of(carol)
    ring_line(svc, dave, [alice, bob], watcher)
    since = watcher.mark()
    mark = dial(carol, svc, "*8")
    carol.wait_event("CALL_ESTABLISHED", 10, since=mark)
    incoming = [e for e in carol.events[carol_mark:] if e.get("type") == "CALL_INCOMING"]
    assert incoming == [], f"Carol's phone rang although she opted out: {incoming}"
    dave.wait_event("CALL_ESTABLISHED", 10)
    watcher.wait_for(party_doc(CAROL, DAVE), 10, since=since, what="Carol active with Dave")
    assert wait_for_event(svc, "call_picked_up")["party"] == CAROL.extension
    for loser in (alice, bob):
        loser.wait_event("CALL_CLOSED", 10)
        cancel = eventually(partial(loser.received, "CANCEL"), f"CANCEL at {loser.config.user}")
        assert cancel[-1].get("reason") == COMPLETED_ELSEWHERE, cancel[-1].text()

    time.sleep(AUDIO_SECONDS)
    since, stats = watcher.mark(), len(carol.rtp_stats())
    command(dave, "hangup")
    carol.wait_event("CALL_CLOSED", 10, since=mark)
    sent, received = rtp_of_call(carol, stats)
    assert_audio(received, sent, "Dave -> Carol")
    ends_idle(svc, watcher, since)
    assert refused(carol, svc, "*22") == "480 Ringing On For 1001"


def rtp_packet(payload_type: int, seq: int, marker: bool = False) -> bytes:
    """A 12-byte RTP header (version 2, SSRC 0xD9) and a 4-byte payload."""
    b1 = payload_type | (0x80 if marker else 0)
    return struct.pack("!BBHII", 0x80, b1, seq, seq * 160, 0xD9) + b"\x05\x0a\x00\xa0"


def receive_rtp(phone: RawPhone, count: int, timeout: float = 5.0) -> list[bytes]:
    """The next ``count`` RTP packets at ``phone``'s RTP port (RTCP skipped)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        phone.rtp.settimeout(left)
        with contextlib.suppress(TimeoutError):
            data = phone.rtp.recv(2048)
            if len(data) >= 12 and not 200 <= data[1] <= 204:
                got.append(data)
    return got


@pytest.mark.e2e_timeout(60)
def test_pickup_renumbers_telephone_event_between_the_caller_and_the_picker(
    switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """D9: Dave's scripted phone offers telephone-event as 101; Carol's, picking the ringing
    call up with ``*8``, as 96. Each keeps its own numbers in the 200 it gets, and the relay
    renumbers DTMF packets both ways (marker bit kept); PCMU passes as it is."""
    svc = switch()
    alice = lab.registered_phones(svc, ALICE)[ALICE.extension]
    dave, carol = lab.raw(svc, DAVE), lab.raw(svc, CAROL)
    te_96 = re.sub(rb"\b101\b", b"96", offer_sdp(carol.rtp_port))
    mark = mark_of(alice)
    with ThreadPoolExecutor(1) as pool:
        ringing = pool.submit(dave.invite, LINE)
        alice.wait_event("CALL_INCOMING", 10, since=mark)
        picked = carol.invite("*8", sdp=te_96)
        call = ringing.result(timeout=15)
    assert picked.answered and call.answered, (picked.describe(), call.describe())
    assert b"rtpmap:96 telephone-event" in picked.final.body, picked.final.text()
    assert b"rtpmap:101 telephone-event" in call.final.body, call.final.text()
    to_carol = [rtp_packet(0, 1), rtp_packet(101, 2, marker=True), rtp_packet(101, 3)]
    for data in to_carol:
        dave.rtp.sendto(data, sdp_audio_addr(call.final.body))
    got = receive_rtp(carol, 3)
    assert [(p[1] & 0x7F, p[1] >> 7) for p in got] == [(0, 0), (96, 1), (96, 0)], got
    assert [p[2:] for p in got] == [p[2:] for p in to_carol]
    carol.rtp.sendto(rtp_packet(96, 9, marker=True), sdp_audio_addr(picked.final.body))
    (back,) = receive_rtp(dave, 1)
    assert back[1] == 0x80 | 101, back
    carol.bye(picked)


# --------------------------------------------------------------------------------------------
# 7. every path ends with an idle line: CANCEL, ring timeout, restart


@pytest.mark.e2e_timeout(60)
def test_line_is_idle_after_cancel_and_after_ring_timeout(
    switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """Dave hangs up while the line rings (CANCEL), then calls again and nobody answers
    within ``ring_time`` (3 s): each time the lamp goes early -> terminated -> idle, and the
    event stream and ``GET /api/lines`` agree."""
    svc = switch(ring_time=3)
    phones = lab.registered_phones(svc, ALICE, BOB, DAVE)
    alice, bob, dave = phones[ALICE.extension], phones[BOB.extension], phones[DAVE.extension]
    watcher = lab.watcher(svc, ALICE)
    stream = lab.stream(svc, ALICE)

    ring_line(svc, dave, [alice, bob], watcher)
    since = watcher.mark()
    marks = [mark_of(p) for p in (alice, bob)]
    command(dave, "hangup")
    for phone, mark in zip((alice, bob), marks, strict=True):
        phone.wait_event("CALL_CLOSED", 10, since=mark)
    cancelled = watcher.wait_label("ended", 10, since=since)
    assert cancelled.dialog().event == "cancelled", cancelled.describe()
    ends_idle(svc, watcher, since)

    ring_line(svc, dave, [alice, bob], watcher)
    since, mark = watcher.mark(), mark_of(dave)
    closed = dave.wait_event("CALL_CLOSED", 10, since=mark)
    assert "480" in str(closed.get("param")), closed
    timed_out = watcher.wait_label("ended", 5, since=since)
    assert timed_out.dialog().event == "timeout", timed_out.describe()
    ends_idle(svc, watcher, since)

    events = stream.line_events(LINE)
    assert [(e.data["state"], e.data["reason"]) for e in events] == [
        ("ringing", None),
        ("ended", "cancel"),
        ("ringing", None),
        ("ended", "timeout"),
    ], stream.describe()
    assert labels(watcher.docs) == ["idle", "ringing", "ended", "idle", "ringing", "ended", "idle"]


@pytest.mark.e2e_timeout(60)
def test_restart_during_a_call_leaves_the_line_idle_and_working(
    switch: MakeService, lab: Lab, require_baresip: str
) -> None:
    """The service is killed (SIGKILL, like a crash) while Bob talks to Dave, and started
    again on the same config and data. Calls do not survive a restart; lamps must not stay
    lit: the watcher's refresh gets 481, it subscribes afresh and sees an idle line,
    ``/api/lines`` lists no call, the phones' BYEs get 481, and the next call works."""
    svc = switch()
    phones = lab.registered_phones(svc, BOB, DAVE)
    bob, dave = phones[BOB.extension], phones[DAVE.extension]
    watcher = lab.watcher(svc, BOB)
    stream = lab.stream(svc, ALICE)
    ring_line(svc, dave, [bob], watcher)
    answer(bob, watcher, BOB, DAVE)
    assert lines_view(svc) == [("active", BOB.extension, DAVE.extension)]

    svc.kill()
    svc.start()
    eventually(lambda: stream.closed, "the event stream to end with the old process")
    refresh = watcher.refresh()
    assert refresh.status == 481, refresh.text()  # the phone now knows to start over
    fresh = watcher.start()
    assert fresh.idle, f"a call survived the restart on the lamp:\n{watcher.describe()}"
    assert lines_view(svc) == []
    after = lab.stream(svc, ALICE)
    snapshot = after.events[0].data
    assert line_calls(snapshot, LINE) == [], snapshot

    since = watcher.mark()
    for phone in (bob, dave):
        mark = mark_of(phone)
        command(phone, "hangup")
        phone.wait_event("CALL_CLOSED", 10, since=mark)
    assert eventually(lambda: len(bob.received("SIP/2.0 481")) >= 1, "481 to Bob's BYE")
    time.sleep(0.5)
    assert all(d.idle for d in watcher.docs[since:]), watcher.describe()

    # registrations survived (persisted); a new call rings, is answered, ends idle
    ring_line(svc, dave, [bob], watcher)
    answer(bob, watcher, BOB, DAVE)
    since = watcher.mark()
    command(dave, "hangup")
    ends_idle(svc, watcher, since)
    assert after.states(LINE) == ["ringing", "active", "ended"], after.describe()
