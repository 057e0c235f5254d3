"""Shared Call Appearance (call-info, line-seize), driven by hand with fake clocks.

As in test_subscriptions: the transaction layer is the real one, the phones' SUBSCRIBEs and
answers are fed in as bytes, and what the notifier sends is read back from the layer and parsed.
Line events are published on a real LineBus, as the B2BUA would.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from itertools import count

import pytest

from dialplan import load_config_text
from softswitch.appearances import Appearances
from softswitch.call_control import CallControl
from softswitch.call_model import Call, Leg, LineRef
from softswitch.call_setup import CallSetup
from softswitch.directory import Directory
from softswitch.lines import CallState, Direction, LineBus, LineEvent
from softswitch.registrar import Bindings
from softswitch.sca import (
    SEIZE_EXPIRES,
    Reject,
    Retrieve,
    ScaManager,
    appearance_index,
    appearance_uri,
    private_hold_requested,
    render_call_info,
)
from softswitch.sip.digest import Algorithm, DigestAuthenticator, compute_response
from softswitch.sip.headers import parse_name_addr, split_list
from softswitch.sip.message import Request, Response, SipMessage, parse_message
from softswitch.sip.transaction import (
    Address,
    ClientTransaction,
    InviteServerTransaction,
    ServerTransaction,
    server_key,
)
from softswitch.sip.transaction_layer import (
    RequestReceived,
    ResponseReceived,
    TransactionLayer,
    TransactionTimeout,
)
from softswitch.subscriptions import Subscription
from softswitch.throttle import FailureThrottle

SERVER = Address("udp", "127.0.0.1", 5060)
PHONE_A = Address("udp", "127.0.0.1", 5090)  # Bob's desk phone, SCA on Alice's line
PHONE_B = Address("udp", "127.0.0.1", 5092)  # Alice's own desk phone
PASSWORDS = {"1001": "s1", "1002": "s2", "1003": "s3", "1004": "s4"}
CONFIG = """
domain: 127.0.0.1
listen: [udp:127.0.0.1:5060]
media: {address: 127.0.0.1, ports: 20000-20999}
users:
  - {extension: "1001", name: Alice Exec, password: s1, number: "+15550101001"}
  - {extension: "1002", name: Bob Assistant, password: s2}
  - {extension: "1003", name: Carol Assistant, password: s3}
  - {extension: "1004", name: Dave Outsider, password: s4}
delegations:
  - delegator: "1001"
    delegates: ["1002", {extension: "1003", permissions: [answer]}]
"""
WALL0 = 1_800_000_000.0
IDLE = "<sip:127.0.0.1>;appearance-index=*;appearance-state=idle"
_ids = count(1)


class Rig:
    """An SCA notifier with a real transaction layer, fake clocks and scripted phones."""

    def __init__(self, config: str = CONFIG, size: int = 24) -> None:
        self.now = 1000.0
        self.wall = WALL0
        self.cfg = load_config_text(config)
        self.layer = TransactionLayer()
        self.bus = LineBus()
        self.auth = DigestAuthenticator(self.cfg.realm, (Algorithm.MD5,), 300, secret=b"k" * 32)
        self.mgr = ScaManager(
            self.layer,
            lambda transport: Address(transport, SERVER.host, SERVER.port),
            self.auth,
            Directory.from_config(self.cfg),
            self.cfg,
            self.bus.model,
            lambda: None,
            lambda: self.now,
            wall=lambda: self.wall,
            appearances=Appearances(size),
        )
        self.bus.subscribe(self.mgr.on_line_event)
        self.out: list[tuple[SipMessage, Address]] = []

    # --- the wire -----------------------------------------------------------------------------
    def pump(self) -> list[SipMessage]:
        while (ev := self.layer.next_event()) is not None:
            if isinstance(ev, RequestReceived):
                assert ev.request.method == "SUBSCRIBE" and self.mgr.handles(ev.request)
                self.mgr.on_subscribe(ev.txn, ev.request, ev.source)
            elif isinstance(ev, ResponseReceived):
                assert self.mgr.on_response(ev.txn, ev.response)
            elif isinstance(ev, TransactionTimeout):
                assert isinstance(ev.txn, ClientTransaction) and self.mgr.on_timeout(ev.txn)
        sent = [(parse_message(data), dest) for data, dest in self.layer.datagrams_to_send()]
        self.out += sent
        return [m for m, _ in sent]

    def subscribe(
        self,
        user: str,
        event: str = "call-info",
        line: str = "1001",
        *,
        expires: int | None = 3600,
        call_info: str | None = None,
        dialog: Subscription | None = None,
        source: Address = PHONE_A,
        password: str | None = None,
    ) -> list[SipMessage]:
        """One SUBSCRIBE, answering the 407 with `user`'s credentials."""
        sent = self._send(user, event, line, expires, call_info, dialog, source, None)
        first = sent[0]
        if isinstance(first, Response) and first.status == 407:
            nonce = re.search(r'nonce="([^"]+)"', first.headers.get("proxy-authenticate") or "")
            assert nonce is not None
            pw = password if password is not None else PASSWORDS[user]
            sent = self._send(user, event, line, expires, call_info, dialog, source, (nonce[1], pw))
        return sent

    def _send(
        self,
        user: str,
        event: str,
        line: str,
        expires: int | None,
        call_info: str | None,
        dialog: Subscription | None,
        source: Address,
        creds: tuple[str, str] | None,
    ) -> list[SipMessage]:
        n = next(_ids)
        uri = f"sip:{line}@127.0.0.1"
        if dialog is None:
            call_id, from_tag, to, cseq = f"sub{n}", f"ft{n}", f"<{uri}>", 1
        else:
            call_id, from_tag = dialog.key[0], dialog.dialog.remote_tag or ""
            to, cseq = f"<{uri}>;tag={dialog.key[1]}", n + 10
        lines = [
            f"SUBSCRIBE {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {source.host}:{source.port};branch=z9hG4bKs{n};rport",
            f"From: <{uri}>;tag={from_tag}",
            f"To: {to}",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} SUBSCRIBE",
            "Max-Forwards: 70",
            f"Contact: <sip:{line}@{source.host}:{source.port}>",
            f"Event: {event}",
        ]
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if call_info is not None:
            lines.append(f"Call-Info: {call_info}")
        if creds is not None:
            nonce, password = creds
            digest = compute_response(
                user, password, "127.0.0.1", nonce, "SUBSCRIBE", uri, Algorithm.MD5, "00000001", "c"
            )
            lines.append(
                f'Proxy-Authorization: Digest username="{user}", realm="127.0.0.1", '
                f'nonce="{nonce}", uri="{uri}", response="{digest}", algorithm=MD5, '
                'qop=auth, nc=00000001, cnonce="c"'
            )
        raw = "\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n"
        self.layer.receive(parse_message(raw.encode()), source, self.now)
        return self.pump()

    def answer(self, notify: SipMessage, status: int = 200) -> list[SipMessage]:
        assert isinstance(notify, Request) and notify.method == "NOTIFY"
        dest = next(d for m, d in self.out if m is notify)
        self.layer.receive(parse_message(notify.make_response(status).to_bytes()), dest, self.now)
        return self.pump()

    def answer_all(self, msgs: list[SipMessage]) -> list[SipMessage]:
        """Answer every NOTIFY in `msgs` (and those that causes), 200; returns them all."""
        seen: list[SipMessage] = []
        todo = notifies(msgs)
        while todo:
            n = todo.pop(0)
            seen.append(n)
            todo += notifies(self.answer(n))
        return seen

    def advance(self, seconds: float) -> list[SipMessage]:
        self.now += seconds
        self.wall += seconds
        self.layer.handle_timer(self.now)
        self.mgr.handle_timer(self.now)
        return self.pump()

    # --- helpers ------------------------------------------------------------------------------
    def watch(self, user: str = "1002", source: Address = PHONE_A) -> tuple[Subscription, Request]:
        """An established call-info subscription, its first NOTIFY answered."""
        ok, notify = self.subscribe(user, source=source)
        assert status(ok) == 200 and isinstance(notify, Request)
        self.answer(notify)
        return self.sub_of(ok), notify

    def seize(
        self, user: str = "1002", index: str = "1", source: Address = PHONE_A, expires: int = 15
    ) -> list[SipMessage]:
        return self.subscribe(
            user,
            "line-seize",
            expires=expires,
            call_info=f"<sip:1001@127.0.0.1>;appearance-index={index}",
            source=source,
        )

    def sub_of(self, ok: SipMessage) -> Subscription:
        assert isinstance(ok, Response)
        (sub,) = [s for s in self.mgr.subscriptions_of("1001") if s.key[1] == ok.to.tag]
        return sub

    def publish(
        self,
        state: CallState,
        call_id: str = "c1",
        *,
        direction: Direction = Direction.INBOUND,
        party: str | None = None,
        dialog: tuple[str, str, str] | None = ("leg@h", "phonetag", "ourtag"),
        private: bool = False,
        line: str = "1001",
        reason: str | None = None,
    ) -> list[SipMessage]:
        """What the B2BUA publishes for a call of Dave (1004) on Alice's line."""
        if party is None and state not in (CallState.RINGING, CallState.ENDED):
            party = "1002"
        event = LineEvent(
            line, call_id, state, direction, party, "1004", "Dave Outsider", WALL0, self.wall,
            reason, dialog, private,
        )  # fmt: skip
        self.bus.publish(event)
        return self.pump()

    def invite(
        self,
        to: str = "1004",
        *,
        from_: str = "1001",
        ruri: str | None = None,
        call_info: str | None = "<sip:1001@127.0.0.1>;appearance-index=1",
        call_id: str = "inv1@phone",
        tag: str = "invtag",
    ) -> Request:
        """An INVITE as an SCA phone of Alice's line sends it (not fed to the layer)."""
        lines = [
            f"INVITE {ruri or f'sip:{to}@127.0.0.1'} SIP/2.0",
            "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bKinv;rport",
            f"From: <sip:{from_}@127.0.0.1>;tag={tag}",
            f"To: <sip:{to}@127.0.0.1>",
            f"Call-ID: {call_id}",
            "CSeq: 1 INVITE",
            "Contact: <sip:1001@127.0.0.1:5090>",
            "Max-Forwards: 70",
        ]
        if call_info is not None:
            lines.append(f"Call-Info: {call_info}")
        msg = parse_message(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())
        assert isinstance(msg, Request)
        return msg


def notifies(msgs: list[SipMessage]) -> list[Request]:
    return [m for m in msgs if isinstance(m, Request) and m.method == "NOTIFY"]


def status(msg: SipMessage) -> int:
    assert isinstance(msg, Response)
    return msg.status


def appearances(notify: SipMessage) -> list[tuple[str, str]]:
    """(index, state) of each Call-Info value of a NOTIFY."""
    out = []
    for value in split_list(notify.headers.get_all("call-info")):
        entry = parse_name_addr(value)
        out.append((entry.param("appearance-index") or "", entry.param("appearance-state") or ""))
    return out


def busy(notify: SipMessage) -> dict[int, str]:
    return {int(i): s for i, s in appearances(notify) if i != "*"}


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    # Whatever a test did, nothing is left in flight: seizures lapse within 15 s, and their
    # final NOTIFYs (like every other) end within Timer F.
    r.advance(20)
    r.advance(40)
    assert r.mgr.stats().notifies_in_flight == 0


# --- call-info ------------------------------------------------------------------------------


def test_call_info_subscription_is_challenged_then_notified_without_a_body(rig: Rig) -> None:
    first = rig._send("1002", "call-info", "1001", 3600, None, None, PHONE_A, None)
    assert [status(m) for m in first] == [407]
    ok, notify = rig.subscribe("1002")
    assert status(ok) == 200 and ok.headers.get("expires") == "3600" and ok.contacts
    assert isinstance(notify, Request) and notify.method == "NOTIFY"
    assert notify.headers.get("event") == "call-info"
    assert notify.headers.get("subscription-state") == "active;expires=3600"
    assert notify.body == b"" and notify.headers.get("content-type") is None
    assert notify.headers.get_all("call-info") == [IDLE]
    assert notify.from_.tag == ok.to.tag and str(notify.uri) == "sip:1001@127.0.0.1:5090"


def test_members_may_watch_others_may_not(rig: Rig) -> None:
    for user in ("1001", "1002", "1003"):
        assert status(rig.subscribe(user)[0]) == 200
    assert [status(m) for m in rig.subscribe("1004")] == [403]
    assert [status(m) for m in rig.subscribe("1002", line="1999")] == [404]


def test_other_packages_are_not_ours(rig: Rig) -> None:
    req = rig.invite()  # any request: only its Event header matters
    req.headers.set("Event", "dialog")
    assert not ScaManager.handles(req)
    for event in ("call-info", "Line-Seize;id=3"):
        req.headers.set("Event", event)
        assert ScaManager.handles(req)


def test_event_id_is_echoed(rig: Rig) -> None:
    _, notify = rig.subscribe("1002", "call-info;id=42")
    assert notify.headers.get("event") == "call-info;id=42"


def test_call_info_expiry_bounds(rig: Rig) -> None:
    assert rig.subscribe("1002", expires=None)[0].headers.get("expires") == "3600"
    assert rig.subscribe("1002", expires=86400)[0].headers.get("expires") == "7200"
    assert [status(m) for m in rig.subscribe("1002", expires=10)] == [423]


def test_inbound_call_shows_alerting_active_held_private_then_idle(rig: Rig) -> None:
    sub, _ = rig.watch()
    (n,) = notifies(rig.publish(CallState.RINGING))
    assert appearances(n) == [("1", "alerting"), ("*", "idle")]
    (value, idle) = split_list(n.headers.get_all("call-info"))
    assert value == (
        "<sip:127.0.0.1>;appearance-index=1;appearance-state=alerting;"
        'appearance-uri="\\"Dave Outsider\\" <sip:1004@127.0.0.1>"'
    )
    assert idle == IDLE and parse_name_addr(value).param("appearance-uri") is not None
    rig.answer(n)
    for state, private, shown in (
        (CallState.ACTIVE, False, "active"),
        (CallState.HELD, False, "held"),
        (CallState.HELD, True, "held-private"),
        (CallState.ACTIVE, False, "active"),
    ):
        (n,) = notifies(rig.publish(state, private=private))
        assert busy(n) == {1: shown}
        rig.answer(n)
    (n,) = notifies(rig.publish(CallState.ENDED, reason="bye"))
    assert appearances(n) == [("*", "idle")]
    rig.answer(n)
    assert rig.mgr.sca_stats().appearances == 0
    assert sub.version == 6


def test_outgoing_call_without_seizing_shows_progressing(rig: Rig) -> None:
    rig.watch()
    msgs = rig.publish(CallState.DIALING, direction=Direction.OUTBOUND, party="1002")
    assert busy(notifies(msgs)[0]) == {1: "progressing"}


def test_calls_keep_their_index_and_holes_are_reused(rig: Rig) -> None:
    rig.watch()
    for cid in ("c1", "c2", "c3"):
        rig.answer_all(rig.publish(CallState.RINGING, cid))
    rig.answer_all(rig.publish(CallState.ENDED, "c2"))
    (n,) = rig.answer_all(rig.publish(CallState.ACTIVE, "c3"))
    assert busy(n) == {1: "alerting", 3: "active"}
    (n,) = rig.answer_all(rig.publish(CallState.RINGING, "c4"))
    assert busy(n) == {1: "alerting", 2: "alerting", 3: "active"}


def test_changes_while_a_notify_is_in_flight_are_coalesced(rig: Rig) -> None:
    rig.watch()
    (first,) = notifies(rig.publish(CallState.RINGING))
    assert notifies(rig.publish(CallState.ACTIVE)) == []
    assert notifies(rig.publish(CallState.HELD)) == []
    (latest,) = notifies(rig.answer(first))
    assert busy(latest) == {1: "held"}


def test_a_late_subscriber_sees_the_same_numbers(rig: Rig) -> None:
    rig.publish(CallState.RINGING, "c1")
    rig.publish(CallState.ACTIVE, "c2")
    _, notify = rig.watch()
    assert busy(notify) == {1: "alerting", 2: "active"}


def test_a_failed_notify_drops_the_subscription(rig: Rig) -> None:
    rig.watch()
    (n,) = notifies(rig.publish(CallState.RINGING))
    rig.answer(n, 481)
    assert rig.mgr.stats().subscriptions == 0
    assert notifies(rig.publish(CallState.ACTIVE)) == []


def test_unsubscribe_gets_a_final_notify(rig: Rig) -> None:
    sub, _ = rig.watch()
    ok, final = rig.subscribe("1002", expires=0, dialog=sub)
    assert status(ok) == 200
    assert final.headers.get("subscription-state") == "terminated;reason=timeout"
    assert final.headers.get_all("call-info") == [IDLE]
    assert rig.mgr.stats().subscriptions == 0


# --- line-seize -----------------------------------------------------------------------------


def test_seize_answers_200_short_expiry_and_notifies_everyone(rig: Rig) -> None:
    rig.watch("1001", source=PHONE_B)
    sent = rig.seize(expires=60)
    ok = sent[0]
    assert status(ok) == 200 and ok.headers.get("expires") == str(SEIZE_EXPIRES)
    seize_notify, watch_notify = notifies(sent)
    assert seize_notify.headers.get("event") == "line-seize"
    assert seize_notify.headers.get("subscription-state") == "active;expires=15"
    assert seize_notify.headers.get_all("call-info") == [
        "<sip:127.0.0.1>;appearance-index=1;appearance-state=seized"
    ]
    assert watch_notify.headers.get("event") == "call-info"
    assert busy(watch_notify) == {1: "seized"}
    assert rig.mgr.appearances.at("1001", 1) is not None


def test_seizing_a_busy_index_is_480_with_retry_after(rig: Rig) -> None:
    rig.publish(CallState.RINGING)  # index 1 rings
    (refused,) = rig.seize(index="1")
    assert status(refused) == 480 and refused.headers.get("retry-after") == "1"
    assert rig.mgr.stats().subscriptions == 0
    assert status(rig.seize(index="2")[0]) == 200
    assert [status(m) for m in rig.seize(user="1001", index="2", source=PHONE_B)] == [480]


def test_seizing_any_index_takes_the_lowest_free(rig: Rig) -> None:
    rig.publish(CallState.RINGING)
    (_, seized) = rig.seize(index="*")
    assert busy(seized) == {2: "seized"}
    sent = rig.subscribe("1001", "line-seize", expires=15, source=PHONE_B)  # no Call-Info
    assert busy(notifies(sent)[0]) == {3: "seized"}


def test_seizing_needs_the_place_permission(rig: Rig) -> None:
    assert [status(m) for m in rig.seize(user="1003")] == [403]  # Carol may only answer
    assert status(rig.subscribe("1003")[0]) == 200  # but may watch
    assert [status(m) for m in rig.seize(user="1004")] == [403]


def test_a_full_line_cannot_be_seized(rig: Rig) -> None:
    small = Rig(size=1)
    small.publish(CallState.ACTIVE)
    assert [status(m) for m in small.seize(index="*")] == [480]


def test_unseize_releases_the_index(rig: Rig) -> None:
    rig.watch("1001", source=PHONE_B)
    sent = rig.seize()
    rig.answer_all(sent)
    sub = rig.sub_of(sent[0])
    sent = rig.subscribe("1002", "line-seize", expires=0, dialog=sub, call_info=None)
    assert status(sent[0]) == 200
    final, watch = notifies(sent)
    assert final.headers.get("subscription-state") == "terminated;reason=timeout"
    assert busy(watch) == {}
    assert rig.mgr.appearances.at("1001", 1) is None


def test_a_seizure_lapses_unless_refreshed(rig: Rig) -> None:
    rig.watch("1001", source=PHONE_B)
    sent = rig.seize()
    rig.answer_all(sent)
    sub = rig.sub_of(sent[0])
    rig.advance(10)
    refreshed = rig.subscribe("1002", "line-seize", expires=15, dialog=sub)
    assert status(refreshed[0]) == 200
    (again,) = notifies(refreshed)  # a refresh is confirmed by a NOTIFY (RFC 6665 §4.2.1.2)
    assert busy(again) == {1: "seized"}
    rig.answer(again)
    assert notifies(rig.advance(10)) == []  # 20 s after the seizure: still held
    final, watch = notifies(rig.advance(6))
    assert final.headers.get("subscription-state") == "terminated;reason=timeout"
    assert busy(watch) == {}
    rig.answer_all([final, watch])
    assert rig.mgr.sca_stats().seized == 0 and rig.mgr.sca_stats().seize_subscriptions == 0


def test_a_failed_line_seize_notify_releases_the_index(rig: Rig) -> None:
    rig.watch("1001", source=PHONE_B)
    sent = rig.seize()
    seize_notify, watch = notifies(sent)
    rig.answer(watch)
    (update,) = notifies(rig.answer(seize_notify, 481))
    assert busy(update) == {}


def test_dialling_on_the_seized_index_keeps_it_and_ends_the_seizure(rig: Rig) -> None:
    rig.watch("1001", source=PHONE_B)
    rig.answer_all(rig.seize(index="3"))
    invite = rig.invite(call_info="<sip:1001@127.0.0.1>;appearance-index=3")
    assert rig.mgr.on_invite(invite) is None  # a call to Dave, not a retrieval
    rig.mgr.on_call_admitted(invite)
    sent = rig.publish(
        CallState.DIALING,
        direction=Direction.OUTBOUND,
        party="1002",
        dialog=("inv1@phone", "invtag", "ours"),
    )
    final, watch = notifies(sent)
    assert final.headers.get("event") == "line-seize"
    assert final.headers.get("subscription-state") == "terminated;reason=noresource"
    assert busy(watch) == {3: "progressing"}
    assert rig.mgr.appearance_of("1001", "c1") == 3
    assert rig.mgr.sca_stats().claims == 0 and rig.mgr.sca_stats().seize_subscriptions == 0


def test_an_index_named_without_seizing_is_used_when_free(rig: Rig) -> None:
    rig.mgr.on_call_admitted(rig.invite(call_info="<sip:1001@127.0.0.1>;appearance-index=5"))
    rig.publish(
        CallState.DIALING,
        direction=Direction.OUTBOUND,
        party="1002",
        dialog=("inv1@phone", "invtag", "ours"),
    )
    assert rig.mgr.appearance_of("1001", "c1") == 5


def test_someone_elses_seizure_is_not_taken(rig: Rig) -> None:
    rig.answer_all(rig.seize(user="1001", index="1", source=PHONE_B))
    rig.mgr.on_call_admitted(rig.invite())  # Bob names index 1, Alice holds it
    rig.publish(
        CallState.DIALING,
        direction=Direction.OUTBOUND,
        party="1002",
        dialog=("inv1@phone", "invtag", "ours"),
    )
    assert rig.mgr.appearance_of("1001", "c1") == 2
    assert rig.mgr.appearances.at("1001", 1) is not None  # still Alice's


def test_claims_lapse_and_are_bounded(rig: Rig) -> None:
    rig.mgr.on_call_admitted(rig.invite())
    assert rig.mgr.sca_stats().claims == 1
    rig.advance(40)
    assert rig.mgr.sca_stats().claims == 0
    for n in range(2000):
        rig.mgr.on_call_admitted(rig.invite(call_id=f"x{n}"))
    assert rig.mgr.sca_stats().claims == 1024
    rig.mgr.on_call_admitted(rig.invite(call_info=None))  # no index: nothing to remember
    assert rig.mgr.sca_stats().claims == 1024


# --- INVITEs to the phones, retrieval -------------------------------------------------------


def test_fork_header_index_is_provisional_until_the_call_shows(rig: Rig) -> None:
    assert rig.mgr.appearance_header("1001", "c1") == "<sip:127.0.0.1>;appearance-index=1"
    assert rig.mgr.appearance_header("1001", "c1") == "<sip:127.0.0.1>;appearance-index=1"
    assert rig.mgr.appearance_header("1001", "c2") == "<sip:127.0.0.1>;appearance-index=2"
    rig.publish(CallState.RINGING, "c1")
    rig.advance(40)  # c2 never showed on the line: its index lapses, c1's does not
    assert rig.mgr.appearance_of("1001", "c1") == 1
    assert rig.mgr.appearance_of("1001", "c2") is None


def test_fork_header_on_a_full_line_is_none(rig: Rig) -> None:
    small = Rig(size=1)
    small.publish(CallState.ACTIVE)
    assert small.mgr.appearance_header("1001", "c2") is None


def test_sca_phones_are_those_watching_call_info(rig: Rig) -> None:
    rig.watch("1002", source=PHONE_A)
    assert rig.mgr.is_sca_phone("1001", PHONE_A)
    assert not rig.mgr.is_sca_phone("1001", PHONE_B)
    assert not rig.mgr.is_sca_phone("1002", PHONE_A)


def retrieval(rig: Rig, index: int = 1) -> Request:
    """Another phone of the line reaches for the call on `index`."""
    return rig.invite(
        "1001",
        call_info=f"<sip:1001@127.0.0.1>;appearance-index={index}",
        call_id="ret@phone",
        tag="rettag",
    )


def test_an_invite_to_the_line_for_a_held_appearance_is_a_retrieval(rig: Rig) -> None:
    rig.publish(CallState.RINGING, "c1")
    rig.publish(CallState.HELD, "c1")
    assert rig.mgr.on_invite(retrieval(rig)) == Retrieve("1001", 1, "c1")
    # privately held: still a retrieval; call control's take-over refuses it with 403
    rig.publish(CallState.HELD, "c1", private=True)
    assert rig.mgr.on_invite(retrieval(rig)) == Retrieve("1001", 1, "c1")
    # a Request-URI without a user names the line by its To (as OpenSIPS' b2b_sca expects)
    bare = rig.invite("1001", ruri="sip:127.0.0.1", call_info="<sip:127.0.0.1>;appearance-index=1")
    assert rig.mgr.on_invite(bare) == Retrieve("1001", 1, "c1")


def test_a_ringing_appearance_may_be_picked_up(rig: Rig) -> None:
    rig.publish(CallState.RINGING, "c1")
    assert rig.mgr.on_invite(retrieval(rig)) == Retrieve("1001", 1, "c1")


def test_an_active_appearance_is_not_barged_into(rig: Rig) -> None:
    rig.publish(CallState.ACTIVE, "c1")
    assert rig.mgr.on_invite(retrieval(rig)) == Reject("1001", 403, "Barge-In Not Supported")


def test_an_idle_appearance_is_481(rig: Rig) -> None:
    assert rig.mgr.on_invite(retrieval(rig, 4)) == Reject("1001", 481, "Call Does Not Exist")
    rig.mgr.appearance_header("1001", "c9")  # provisional: not on the line yet
    assert rig.mgr.on_invite(retrieval(rig)) == Reject("1001", 481, "Call Does Not Exist")


def test_calling_the_line_from_a_seized_index_is_an_ordinary_call(rig: Rig) -> None:
    rig.answer_all(rig.seize(index="2"))
    assert rig.mgr.on_invite(retrieval(rig, 2)) is None


def test_invites_that_are_not_retrievals(rig: Rig) -> None:
    rig.publish(CallState.HELD, "c1")
    assert rig.mgr.on_invite(rig.invite("1004")) is None  # a call to Dave
    assert rig.mgr.on_invite(rig.invite("1001", call_info=None)) is None  # no index
    assert rig.mgr.on_invite(rig.invite("1001", call_info="<sip:x>;appearance-index=*")) is None
    # another line's SCA phone calling Alice, with its own line's index: not Alice's key
    assert rig.mgr.on_invite(rig.invite("1001", from_="1004")) is None
    assert rig.mgr.on_invite(rig.invite("1999", from_="1999")) is None  # no such line


# --- parsing and rendering ------------------------------------------------------------------


def test_appearance_index_and_private_hold_parsing(rig: Rig) -> None:
    req = rig.invite(
        call_info="<http://x/p.png>;purpose=icon, <sip:1001@127.0.0.1>;appearance-index=7"
    )
    assert appearance_index(req) == 7 and not private_hold_requested(req)
    hold = rig.invite(call_info="<sip:127.0.0.1>;appearance-index=1;Appearance-State=held-private")
    assert private_hold_requested(hold)
    public = rig.invite(call_info="<sip:127.0.0.1>;appearance-index=1;appearance-state=held")
    assert not private_hold_requested(public)
    for bad in ("<sip:x>;appearance-index=abc", "<sip:x>;appearance-index=99999", "garbage <"):
        assert appearance_index(rig.invite(call_info=bad)) is None


def test_appearance_uri_is_safe_whatever_the_name() -> None:
    assert appearance_uri("1004", "Dave", "d") == '"\\"Dave\\" <sip:1004@d>"'
    assert appearance_uri("1004", None, "d") == '"<sip:1004@d>"'
    nasty = appearance_uri("+1 555", 'Smith, "J"; \\ Jr\r\n', "d")
    assert nasty == '"\\"Smith J Jr\\" <sip:+1%20555@d>"'
    value = render_call_info("d", [(2, "active", nasty)])
    (first, idle) = split_list([value])
    assert parse_name_addr(first).param("appearance-uri") == nasty
    assert idle == "<sip:d>;appearance-index=*;appearance-state=idle"


# --- configuration and bounds ---------------------------------------------------------------


def test_reload_cuts_off_seizures_of_those_who_lost_the_permission(rig: Rig) -> None:
    rig.watch("1001", source=PHONE_B)
    rig.answer_all(rig.seize())
    cfg = load_config_text(
        CONFIG.replace('["1002", ', '[{extension: "1002", permissions: [answer]}, ')
    )
    rig.mgr.update(cfg, Directory.from_config(cfg))
    sent = rig.pump()
    final, watch = notifies(sent)
    assert final.headers.get("subscription-state") == "terminated;reason=rejected"
    assert busy(watch) == {}
    assert rig.mgr.stats().subscriptions == 1  # Alice's call-info stays


def test_nothing_is_left_behind(rig: Rig) -> None:
    """Many calls, seizures and subscriptions later, the tables are empty again."""
    rig.watch("1001", source=PHONE_B)
    for n in range(50):
        rig.answer_all(rig.seize(index="*"))
        invite = rig.invite(call_id=f"i{n}", call_info="<sip:1001@127.0.0.1>;appearance-index=1")
        rig.mgr.on_call_admitted(invite)
        rig.answer_all(
            rig.publish(
                CallState.DIALING,
                f"c{n}",
                direction=Direction.OUTBOUND,
                party="1002",
                dialog=(f"i{n}", "invtag", "ours"),
            )
        )
        rig.answer_all(rig.publish(CallState.RINGING, f"in{n}"))
        rig.answer_all(rig.publish(CallState.ENDED, f"c{n}"))
        rig.answer_all(rig.publish(CallState.ENDED, f"in{n}"))
        rig.mgr.appearance_header("1001", f"never{n}")
    rig.advance(40)
    stats = rig.mgr.sca_stats()
    assert stats.appearances == 0 and stats.claims == 0 and stats.seize_subscriptions == 0
    assert rig.mgr.stats().subscriptions == 1


# --- call control wiring: retrieval by INVITE and private hold, as the service runs them -----


def server_txn(req: Request) -> ServerTransaction:
    """`req`'s server transaction, as the layer makes it: the compiled call control checks the
    class of what it is given (D17)."""
    return InviteServerTransaction(req, PHONE_A, server_key(req))


class FakeB2BUA:
    """What CallControl asks of the B2BUA for take-overs and in-dialog requests, recorded."""

    def __init__(self, bus: LineBus) -> None:
        self.bus = bus
        self.calls: dict[str, Call] = {}
        self.taken: list[tuple[str, str, str]] = []  # (kind, call id, user)
        self.hold_sdp = True  # whether the next in-dialog INVITE is a hold
        self.leg: Leg | None = None  # the leg in-dialog requests belong to

    def retrieve(self, call: Call, ref: LineRef, *_: object) -> None:
        self.taken.append(("retrieve", call.id, str(_[-1])))

    def pickup(self, call: Call, *_: object) -> None:
        self.taken.append(("pickup", call.id, str(_[-1])))

    def on_in_dialog(self, txn: object, req: Request, leg: Leg) -> None:
        """The real one marks the call held by the leg's party when the SDP is a hold."""
        leg.call.held_by = leg.party if self.hold_sdp else None
        if not self.hold_sdp:
            leg.call.private = False

    def find_leg(self, req: Request) -> Leg | None:
        return self.leg


class Control:
    """CallControl wired to a ScaManager (as the service does), with a fake B2BUA."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.b2bua = FakeB2BUA(rig.bus)
        self.sent: list[Response] = []
        auth = rig.auth
        setup = CallSetup(rig.cfg, Directory.from_config(rig.cfg), auth, Bindings())

        def respond(
            txn: object, req: Request, resp: Response, source: Address, **_: object
        ) -> None:
            self.sent.append(resp)

        self.cc = CallControl(
            rig.layer,
            self.b2bua,  # type: ignore[arg-type]
            setup,
            None,  # type: ignore[arg-type]
            FailureThrottle(),
            respond,
            rig.cfg,
        )
        self.cc.sca = rig.mgr

    def call(self, state: CallState, *, held_by: str | None = None, private: bool = False) -> Call:
        """Alice's line calls Dave: a call on appearance 1, in `state`."""
        call = Call(id="c1", lines=[LineRef("1001", Direction.OUTBOUND, "1002", "1004")])
        call.b = Leg(call, "1004", PHONE_B, None)
        call.held_by, call.private = held_by, private
        self.b2bua.calls[call.id] = call
        self.rig.publish(state, "c1", direction=Direction.OUTBOUND, party="1002", private=private)
        return call

    def invite(self, user: str, *, index: int = 1, auth: bool = True) -> Response:
        """`user`'s SCA phone sends an INVITE to the line for appearance `index`."""
        req = self.rig.invite(
            "1001", call_info=f"<sip:1001@127.0.0.1>;appearance-index={index}", tag=f"t{user}"
        )
        if auth:
            nonce = self.rig.auth.new_nonce(time.time())
            uri = "sip:1001@127.0.0.1"
            digest = compute_response(
                user, PASSWORDS[user], "127.0.0.1", nonce, "INVITE", uri, Algorithm.MD5,
                "00000001", "cn",
            )  # fmt: skip
            req.headers.add(
                "Proxy-Authorization",
                f'Digest username="{user}", realm="127.0.0.1", nonce="{nonce}", uri="{uri}", '
                f'response="{digest}", algorithm=MD5, qop=auth, nc=00000001, cnonce="cn"',
            )
        before = len(self.sent)
        assert self.cc.on_request(server_txn(req), req, PHONE_A)
        return self.sent[before] if len(self.sent) > before else Response(0, "", req.headers)


def test_an_sca_retrieval_takes_the_held_call_over(rig: Rig) -> None:
    ctl = Control(rig)
    ctl.call(CallState.HELD, held_by="1002")
    assert ctl.invite("1001").status == 0  # no answer yet: the B2BUA re-INVITEs the far end
    assert ctl.b2bua.taken == [("retrieve", "c1", "1001")]


def test_an_sca_retrieval_is_authenticated_first(rig: Rig) -> None:
    ctl = Control(rig)
    ctl.call(CallState.HELD, held_by="1002")
    resp = ctl.invite("1001", auth=False)
    assert resp.status == 407 and ctl.b2bua.taken == []


def test_a_private_hold_is_refused_to_everyone_but_its_holder(rig: Rig) -> None:
    ctl = Control(rig)
    ctl.call(CallState.HELD, held_by="1002", private=True)
    resp = ctl.invite("1001")
    assert (resp.status, resp.reason) == (403, "Call Is Private")
    assert ctl.b2bua.taken == []
    ctl.invite("1002")  # the holder itself, from another of its phones
    assert ctl.b2bua.taken == [("retrieve", "c1", "1002")]


def test_sca_take_over_needs_the_pickup_permission(rig: Rig) -> None:
    config = CONFIG.replace("permissions: [answer]", "permissions: [answer, place]")
    ctl = Control(Rig(config))
    ctl.call(CallState.HELD, held_by="1002")
    resp = ctl.invite("1003")  # Carol: a member, but without pickup
    assert resp.status == 403 and ctl.b2bua.taken == []


def test_active_and_idle_appearances_are_refused_to_members_only(rig: Rig) -> None:
    ctl = Control(rig)
    ctl.call(CallState.ACTIVE)
    resp = ctl.invite("1001")
    assert (resp.status, resp.reason) == (403, "Barge-In Not Supported")
    resp = ctl.invite("1001", index=7)
    assert (resp.status, resp.reason) == (481, "Call Does Not Exist")
    assert ctl.invite("1004", index=7).status == 403  # not told what is on Alice's line


def private_hold(rig: Rig, ctl: Control, call_info: str) -> None:
    req = rig.invite("1004", call_info=call_info)
    req.headers.set("To", "<sip:1004@127.0.0.1>;tag=ours")
    assert ctl.cc.on_request(server_txn(req), req, PHONE_A)


def test_a_held_private_reinvite_locks_the_call(rig: Rig) -> None:
    ctl = Control(rig)
    call = ctl.call(CallState.ACTIVE)
    ctl.b2bua.leg = Leg(call, "1002", PHONE_A, None)
    private_hold(rig, ctl, "<sip:127.0.0.1>;appearance-index=1;appearance-state=held-private")
    assert call.private and call.held_by == "1002"
    ctl.b2bua.hold_sdp = False  # resumed: the lock goes with the hold
    private_hold(rig, ctl, "<sip:127.0.0.1>;appearance-index=1")
    assert not call.private and call.held_by is None


def test_a_held_private_call_info_without_a_hold_locks_nothing(rig: Rig) -> None:
    ctl = Control(rig)
    call = ctl.call(CallState.ACTIVE)
    ctl.b2bua.leg = Leg(call, "1002", PHONE_A, None)
    ctl.b2bua.hold_sdp = False
    private_hold(rig, ctl, "<sip:127.0.0.1>;appearance-index=1;appearance-state=held-private")
    assert not call.private


def test_a_public_hold_stays_public(rig: Rig) -> None:
    ctl = Control(rig)
    call = ctl.call(CallState.ACTIVE)
    ctl.b2bua.leg = Leg(call, "1002", PHONE_A, None)
    private_hold(rig, ctl, "<sip:127.0.0.1>;appearance-index=1;appearance-state=held")
    assert call.held_by == "1002" and not call.private
