"""The dialog-event notifier (RFC 6665 + RFC 4235), driven by hand with fake clocks.

The transaction layer is the real one: SUBSCRIBEs and the phones' answers to NOTIFYs are fed in
as bytes, and what the notifier sends is read back from the layer's datagram queue and parsed.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from itertools import count

import pytest

from dialplan import load_config_text
from softswitch.directory import Directory
from softswitch.lines import CallState, Direction, LineBus, LineEvent
from softswitch.sip.digest import Algorithm, DigestAuthenticator, compute_response
from softswitch.sip.message import Request, Response, SipMessage, parse_message
from softswitch.sip.transaction import Address, ClientTransaction
from softswitch.sip.transaction_layer import (
    RequestReceived,
    ResponseReceived,
    TransactionLayer,
    TransactionTimeout,
)
from softswitch.subscriptions import Subscription, SubscriptionManager

NS = {"d": "urn:ietf:params:xml:ns:dialog-info"}
SERVER = Address("udp", "127.0.0.1", 5060)
PHONE = Address("udp", "127.0.0.1", 5090)
TRUSTED = Address("udp", "127.0.0.9", 5060)
PASSWORDS = {"1001": "s1", "1002": "s2", "1003": "s3", "1004": "s4"}
CONFIG = """
domain: 127.0.0.1
listen: [udp:127.0.0.1:5060]
media: {address: 127.0.0.1, ports: 20000-20999}
trusted: ["127.0.0.9/32"]
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
_ids = count(1)


class Rig:
    """A notifier with a real transaction layer, fake clocks and the phones' side scripted."""

    def __init__(self, config: str = CONFIG) -> None:
        self.now = 1000.0  # the transaction layer's (loop) clock
        self.wall = WALL0
        self.cfg = load_config_text(config)
        self.layer = TransactionLayer()
        self.bus = LineBus()
        self.auth = DigestAuthenticator(self.cfg.realm, (Algorithm.MD5,), 300, secret=b"k" * 32)
        self.flushes = 0
        self.mgr = SubscriptionManager(
            self.layer,
            lambda transport: Address(transport, SERVER.host, SERVER.port),
            self.auth,
            Directory.from_config(self.cfg),
            self.cfg,
            self.bus.model,
            self.flush,
            lambda: self.now,
            wall=lambda: self.wall,
        )
        self.bus.subscribe(self.mgr.on_line_event)
        self.out: list[tuple[SipMessage, Address]] = []

    def flush(self) -> None:
        self.flushes += 1

    def pump(self) -> list[SipMessage]:
        """Dispatch the layer's events as the service does; return what was sent since."""
        while (ev := self.layer.next_event()) is not None:
            if isinstance(ev, RequestReceived):
                assert ev.request.method == "SUBSCRIBE"
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
        user: str | None,
        line: str = "1001",
        *,
        password: str | None = None,
        expires: int | None = 600,
        event: str = "dialog",
        dialog: Subscription | None = None,
        source: Address = PHONE,
        extra: str = "",
    ) -> list[SipMessage]:
        """One SUBSCRIBE (answering a 407 once with `user`'s credentials if it comes)."""
        sent = self._send_subscribe(user, line, None, expires, event, dialog, source, extra)
        first = sent[0]
        if user is not None and isinstance(first, Response) and first.status == 407:
            nonce = re.search(r'nonce="([^"]+)"', first.headers.get("proxy-authenticate") or "")
            assert nonce is not None
            password = password if password is not None else PASSWORDS[user]
            sent = self._send_subscribe(
                user, line, (nonce[1], password), expires, event, dialog, source, extra
            )
        return sent

    def _send_subscribe(
        self,
        user: str | None,
        line: str,
        creds: tuple[str, str] | None,
        expires: int | None,
        event: str,
        dialog: Subscription | None,
        source: Address,
        extra: str,
    ) -> list[SipMessage]:
        n = next(_ids)
        uri = f"sip:{line}@127.0.0.1"
        if dialog is None:
            call_id, from_tag, to = f"sub{n}", f"ft{n}", f"<{uri}>"
            cseq = 1
        else:
            call_id, from_tag = dialog.key[0], dialog.dialog.remote_tag or ""
            to = f"<{uri}>;tag={dialog.key[1]}"
            cseq = n + 10
        lines = [
            f"SUBSCRIBE {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {source.host}:{source.port};branch=z9hG4bKs{n};rport",
            f"From: <sip:{user or 'x'}@127.0.0.1>;tag={from_tag}",
            f"To: {to}",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} SUBSCRIBE",
            "Max-Forwards: 70",
            f"Contact: <sip:{user or 'x'}@{source.host}:{source.port}>",
            f"Event: {event}",
        ]
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if extra:
            lines.append(extra)
        if creds is not None:
            assert user is not None
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

    def answer(
        self, notify: SipMessage, status: int = 200, retry_after: bool = False
    ) -> list[SipMessage]:
        """The phone's answer to one of our NOTIFYs; returns what the notifier sent then."""
        assert isinstance(notify, Request) and notify.method == "NOTIFY"
        resp = notify.make_response(status)
        if retry_after:
            resp.headers.add("Retry-After", "10")
        self.layer.receive(parse_message(resp.to_bytes()), PHONE, self.now)
        return self.pump()

    def publish(
        self, state: CallState, call_id: str = "c1", reason: str | None = None
    ) -> list[SipMessage]:
        """What the B2BUA publishes: Dave (1004) calls the line, Bob (1002) answers."""
        party = "1002" if state not in (CallState.RINGING, CallState.ENDED) else None
        dialog = ("leg@h", "phonetag", "ourtag")
        event = LineEvent(
            "1001", call_id, state, Direction.INBOUND, party, "1004", "Dave", WALL0, self.wall,
            reason, dialog,
        )  # fmt: skip
        self.bus.publish(event)
        return self.pump()

    def advance(self, seconds: float) -> list[SipMessage]:
        self.now += seconds
        self.wall += seconds
        self.layer.handle_timer(self.now)
        self.mgr.handle_timer(self.now)
        return self.pump()

    def watch(self, user: str = "1002", line: str = "1001") -> tuple[Subscription, Request]:
        """A subscription, established and its first NOTIFY answered."""
        sent = self.subscribe(user, line)
        ok, notify = sent
        assert isinstance(ok, Response) and ok.status == 200
        assert isinstance(notify, Request)
        (sub,) = [s for s in self.mgr.subscriptions_of(line) if s.key[1] == ok.to.tag]
        self.answer(notify)
        return sub, notify


def notifies(msgs: list[SipMessage]) -> list[Request]:
    return [m for m in msgs if isinstance(m, Request) and m.method == "NOTIFY"]


def doc(notify: SipMessage) -> ET.Element:
    assert isinstance(notify, Request)
    assert notify.headers.get("content-type") == "application/dialog-info+xml"
    return ET.fromstring(notify.body)


def states(notify: SipMessage) -> list[str | None]:
    return [d.findtext("d:state", namespaces=NS) for d in doc(notify).findall("d:dialog", NS)]


def status(msg: SipMessage) -> int:
    assert isinstance(msg, Response)
    return msg.status


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    # Whatever a test did, nothing leaks: in-flight NOTIFYs all end within Timer F.
    r.advance(40)
    assert r.mgr.stats().notifies_in_flight == 0


# --- establishing -----------------------------------------------------------------------------


def test_challenge_then_200_and_a_full_notify(rig: Rig) -> None:
    first = rig._send_subscribe("1002", "1001", None, 600, "dialog", None, PHONE, "")
    assert [status(m) for m in first] == [407]
    assert isinstance(first[0], Response) and first[0].headers.get("proxy-authenticate")
    ok, notify = rig.subscribe("1002")
    assert isinstance(ok, Response) and ok.status == 200
    assert ok.to.tag and ok.headers.get("expires") == "600" and ok.contacts
    assert isinstance(notify, Request) and notify.method == "NOTIFY"
    assert str(notify.uri) == "sip:1002@127.0.0.1:5090"  # the subscriber's Contact
    assert notify.from_.tag == ok.to.tag and notify.to.tag == "ft" + notify.call_id[3:]
    assert notify.headers.get("event") == "dialog"
    assert notify.headers.get("subscription-state") == "active;expires=600"
    assert notify.contacts
    root = doc(notify)
    assert root.get("version") == "0" and root.get("state") == "full"
    assert root.get("entity") == "sip:1001@127.0.0.1" and root.findall("d:dialog", NS) == []
    assert [d for m, d in rig.out if m is notify] == [PHONE]


def test_initial_notify_carries_the_calls_already_on_the_line(rig: Rig) -> None:
    rig.publish(CallState.ACTIVE)
    _, notify = rig.watch()
    assert states(notify) == ["confirmed"]


def test_wrong_password_is_403(rig: Rig) -> None:
    sent = rig.subscribe("1002", password="nope")
    assert [status(m) for m in sent] == [403]
    assert rig.mgr.stats().subscriptions == 0


def test_the_user_and_each_delegate_may_watch_the_delegators_line(rig: Rig) -> None:
    for user in ("1001", "1002", "1003"):
        ok, _ = rig.subscribe(user)
        assert status(ok) == 200
    assert sorted(s.user for s in rig.mgr.subscriptions_of("1001")) == ["1001", "1002", "1003"]


def test_a_non_member_gets_403(rig: Rig) -> None:
    assert [status(m) for m in rig.subscribe("1004")] == [403]


def test_a_delegates_line_is_not_watchable_by_its_delegator(rig: Rig) -> None:
    assert [status(m) for m in rig.subscribe("1001", "1002")] == [403]
    assert [status(m) for m in rig.subscribe("1003", "1002")] == [403]
    assert status(rig.subscribe("1002", "1002")[0]) == 200


def test_the_line_may_be_named_by_its_number(rig: Rig) -> None:
    ok, notify = rig.subscribe("1002", "+15550101001")
    assert status(ok) == 200 and doc(notify).get("entity") == "sip:1001@127.0.0.1"
    assert [status(m) for m in rig.subscribe("1002", "1999")] == [404]


def test_delegation_policy_off_leaves_only_the_user(rig: Rig) -> None:
    off = Rig(CONFIG + "policy: {delegation: false}\n")
    assert [status(m) for m in off.subscribe("1002")] == [403]
    assert status(off.subscribe("1001")[0]) == 200


def test_trusted_peer_asserts_the_subscriber(rig: Rig) -> None:
    (refused,) = rig.subscribe(None, source=TRUSTED)
    assert status(refused) == 403  # From "x" is nobody
    sent = rig._send_subscribe("1003", "1001", None, 600, "dialog", None, TRUSTED, "")
    assert status(sent[0]) == 200


def test_unknown_event_package_is_489(rig: Rig) -> None:
    (resp,) = rig.subscribe("1002", event="presence")
    assert isinstance(resp, Response) and resp.status == 489
    assert resp.headers.get("allow-events") == "dialog"


def test_event_id_is_echoed(rig: Rig) -> None:
    _, notify = rig.subscribe("1002", event="dialog;id=7")
    assert notify.headers.get("event") == "dialog;id=7"


def test_unacceptable_body_type_is_406(rig: Rig) -> None:
    (resp,) = rig.subscribe("1002", extra="Accept: application/pidf+xml")
    assert status(resp) == 406
    ok, _ = rig.subscribe("1002", extra="Accept: application/dialog-info+xml")
    assert status(ok) == 200


def test_expires_default_bounds_and_too_brief(rig: Rig) -> None:
    assert rig.subscribe("1002", expires=None)[0].headers.get("expires") == "3600"
    assert rig.subscribe("1002", expires=86400)[0].headers.get("expires") == "7200"
    (brief,) = rig.subscribe("1002", expires=30)
    assert status(brief) == 423 and brief.headers.get("min-expires") == "60"


def test_fetch_gets_one_terminated_notify_and_no_subscription(rig: Rig) -> None:
    rig.publish(CallState.RINGING)
    ok, notify = rig.subscribe("1002", expires=0)
    assert status(ok) == 200 and ok.headers.get("expires") == "0"
    assert notify.headers.get("subscription-state") == "terminated;reason=timeout"
    assert states(notify) == ["early"]
    assert rig.mgr.stats().subscriptions == 0
    rig.answer(notify)


def test_subscriptions_per_user_are_bounded() -> None:
    rig = Rig()
    rig.mgr.max_per_user = 2
    assert [status(rig.subscribe("1002")[0]) for _ in range(3)] == [200, 200, 403]


def test_a_new_subscribe_on_the_same_call_id_replaces_the_old(rig: Rig) -> None:
    sub, _ = rig.watch()
    raw = (
        "SUBSCRIBE sip:1001@127.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bKagain\r\n"
        f"From: <sip:1002@127.0.0.1>;tag={sub.dialog.remote_tag}\r\nTo: <sip:1001@127.0.0.1>\r\n"
        f"Call-ID: {sub.key[0]}\r\nCSeq: 9 SUBSCRIBE\r\nMax-Forwards: 70\r\n"
        "Contact: <sip:1002@127.0.0.9:5060>\r\nEvent: dialog\r\nContent-Length: 0\r\n\r\n"
    )
    rig.layer.receive(parse_message(raw.encode()), TRUSTED, rig.now)
    assert status(rig.pump()[0]) == 200
    (new,) = rig.mgr.subscriptions_of("1001")
    assert new is not sub and new.key[0] == sub.key[0]


# --- refresh and termination ------------------------------------------------------------------


def test_refresh_rearms_expiry_and_sends_full_state(rig: Rig) -> None:
    sub, _ = rig.watch()
    rig.advance(500)
    ok, notify = rig.subscribe("1002", dialog=sub, expires=600)
    assert status(ok) == 200 and ok.headers.get("expires") == "600"
    assert ok.to.tag == sub.key[1]
    assert notify.headers.get("subscription-state") == "active;expires=600"
    assert doc(notify).get("version") == "1"
    rig.answer(notify)
    assert rig.advance(599) == []  # 1099 s after subscribing: alive thanks to the refresh
    (final,) = notifies(rig.advance(2))
    assert final.headers.get("subscription-state") == "terminated;reason=timeout"


def test_refresh_follows_the_phone_to_a_new_address(rig: Rig) -> None:
    sub, _ = rig.watch()
    moved = Address("udp", "127.0.0.1", 5092)
    _, notify = rig.subscribe("1002", dialog=sub, source=moved)
    assert [d for m, d in rig.out if m is notify] == [moved]


def test_unsubscribe_sends_a_final_notify(rig: Rig) -> None:
    sub, _ = rig.watch()
    ok, final = rig.subscribe("1002", dialog=sub, expires=0)
    assert status(ok) == 200 and ok.headers.get("expires") == "0"
    assert final.headers.get("subscription-state") == "terminated;reason=timeout"
    assert doc(final).get("version") == "1"
    assert rig.mgr.stats().subscriptions == 0 and rig.mgr.stats().lines == 0
    rig.answer(final)
    assert rig.publish(CallState.RINGING) == []


def test_in_dialog_subscribe_for_an_unknown_subscription_is_481(rig: Rig) -> None:
    sub, _ = rig.watch()
    rig.subscribe("1002", dialog=sub, expires=0)
    assert [status(m) for m in rig.subscribe("1002", dialog=sub)] == [481]


def test_expiry_via_the_timer_sends_terminated(rig: Rig) -> None:
    rig.watch()
    assert rig.mgr.get_timer() == rig.now + 600
    assert rig.advance(599) == []
    (final,) = notifies(rig.advance(1))
    assert final.headers.get("subscription-state") == "terminated;reason=timeout"
    assert rig.mgr.stats().subscriptions == 0 and rig.mgr.get_timer() is None
    rig.answer(final)


def test_481_to_a_notify_drops_the_subscription(rig: Rig) -> None:
    rig.watch()
    (notify,) = rig.publish(CallState.RINGING)
    rig.answer(notify, 481)
    assert rig.mgr.stats().subscriptions == 0
    assert rig.publish(CallState.ACTIVE) == []


def test_other_errors_drop_unless_retry_after(rig: Rig) -> None:
    rig.watch()
    (notify,) = rig.publish(CallState.RINGING)
    rig.answer(notify, 503, retry_after=True)
    assert rig.mgr.stats().subscriptions == 1
    (notify,) = rig.publish(CallState.ACTIVE)
    rig.answer(notify, 500)
    assert rig.mgr.stats().subscriptions == 0


def test_unanswered_notify_times_out_and_drops(rig: Rig) -> None:
    rig.watch()
    rig.publish(CallState.RINGING)
    rig.advance(33)  # Timer F
    assert rig.mgr.get_timer() is None  # which also forgets the dropped one's expiry
    assert rig.mgr.stats() == (0, 0, 0, 0)


def test_config_reload_cuts_off_former_delegates(rig: Rig) -> None:
    rig.watch("1003")
    rig.watch("1002")
    cfg = load_config_text(CONFIG.replace(', {extension: "1003", permissions: [answer]}', ""))
    rig.mgr.update(cfg, Directory.from_config(cfg))
    (final,) = notifies(rig.pump())
    assert final.headers.get("subscription-state") == "terminated;reason=rejected"
    assert [s.user for s in rig.mgr.subscriptions_of("1001")] == ["1002"]


# --- notifications ----------------------------------------------------------------------------


def test_versions_increase_by_one_per_notify_per_subscription(rig: Rig) -> None:
    a, _ = rig.watch("1002")
    (n,) = rig.publish(CallState.RINGING, call_id="x")
    rig.answer(n)
    rig.watch("1003")
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for state in (CallState.ACTIVE, CallState.HELD, CallState.ENDED):
        for n in notifies(rig.publish(state, call_id="x")):
            who = "a" if n.from_.tag == a.key[1] else "b"
            seen[who].append(int(doc(n).get("version") or -1))
            rig.answer(n)
    assert seen == {"a": [2, 3, 4], "b": [1, 2, 3]}


def test_ring_answer_hold_resume_bye_then_idle(rig: Rig) -> None:
    sub, _ = rig.watch()
    shown: list[list[str | None]] = []
    held: list[str | None] = []
    for state in (CallState.RINGING, CallState.ACTIVE, CallState.HELD, CallState.ACTIVE):
        (n,) = rig.publish(state)
        shown.append(states(n))
        param = doc(n).find("d:dialog/d:local/d:target/d:param", NS)
        held.append(None if param is None else param.get("pval"))
        rig.answer(n)
    (n,) = rig.publish(CallState.ENDED, reason="remote-bye")
    shown.append(states(n))
    ended = doc(n).find("d:dialog/d:state", NS)
    assert ended is not None and ended.get("event") == "remote-bye"
    rig.answer(n)
    _, idle = rig.subscribe("1002", dialog=sub)  # a refresh shows the line as it is now
    shown.append(states(idle))
    assert shown == [["early"], ["confirmed"], ["confirmed"], ["confirmed"], ["terminated"], []]
    assert held == [None, "yes", "no", "yes"]


def test_changes_during_a_notify_in_flight_are_coalesced(rig: Rig) -> None:
    rig.watch()
    (first,) = rig.publish(CallState.RINGING, call_id="c1")
    assert rig.publish(CallState.ACTIVE, call_id="c1") == []  # waits for the answer
    assert rig.publish(CallState.RINGING, call_id="c2") == []
    assert rig.publish(CallState.ENDED, call_id="c2", reason="cancel") == []
    (latest,) = rig.answer(first)
    assert doc(latest).get("version") == "2"
    ids = [(d.get("id"), d.findtext("d:state", namespaces=NS)) for d in doc(latest)]
    assert ids == [("c1", "confirmed"), ("c2", "terminated")]  # the missed call shown once
    rig.answer(latest)
    (after,) = rig.publish(CallState.HELD, call_id="c1")
    assert [d.get("id") for d in doc(after)] == ["c1"]
    rig.answer(after)


def test_a_terminated_call_is_shown_once_then_never_again(rig: Rig) -> None:
    rig.watch()
    for state in (CallState.RINGING, CallState.ENDED):
        (n,) = rig.publish(state, reason="cancel" if state is CallState.ENDED else None)
        rig.answer(n)
    assert states(n) == ["terminated"]
    (n,) = rig.publish(CallState.RINGING, call_id="c2")
    assert [d.get("id") for d in doc(n)] == ["c2"]
    rig.answer(n)


def test_every_watcher_of_the_line_is_told_and_no_one_else(rig: Rig) -> None:
    rig.watch("1002")
    rig.watch("1003")
    rig.watch("1002", "1002")
    sent = rig.publish(CallState.RINGING)
    assert len(notifies(sent)) == 2
    assert {n.from_.tag for n in notifies(sent)} == {
        s.key[1] for s in rig.mgr.subscriptions_of("1001")
    }
    for n in notifies(sent):
        rig.answer(n)
    assert rig.flushes > 0


def test_a_lost_transaction_does_not_freeze_the_subscription(rig: Rig) -> None:
    sub, _ = rig.watch()
    rig.publish(CallState.RINGING)
    assert sub.pending is not None
    rig.layer.transport_error(sub.pending, rig.now)  # an event the notifier never hears of
    (n,) = rig.publish(CallState.ACTIVE)
    assert states(n) == ["confirmed"]
    rig.answer(n)


def test_a_call_revived_under_its_id_is_not_also_shown_terminated(rig: Rig) -> None:
    rig.watch()
    (first,) = rig.publish(CallState.ACTIVE)
    rig.publish(CallState.ENDED, reason="transferred")  # an attended transfer ends call 1...
    rig.publish(CallState.ACTIVE)  # ...and carries it on under the same id
    (latest,) = rig.answer(first)
    assert [(d.get("id"), states(latest)) for d in doc(latest)] == [("c1", ["confirmed"])]
    rig.answer(latest)


def test_a_refresh_during_a_notify_in_flight_is_answered_after_it(rig: Rig) -> None:
    sub, _ = rig.watch()
    (pending,) = rig.publish(CallState.RINGING)
    (ok,) = rig.subscribe("1002", dialog=sub)
    assert status(ok) == 200
    (full,) = rig.answer(pending)
    assert states(full) == ["early"] and doc(full).get("version") == "2"
    rig.answer(full)
