"""End-to-end: two desk phones in BroadWorks Shared Call Appearance mode on one line (SIPp).

The "done" criterion of the SCA issue, from the outside (the service started from its CLI):
two Yealink-like phones (tests/e2e/scenarios/sca_phone_a.xml, sca_phone_b.xml) share Alice's
line (1001), each registered with its own member's credentials (Bob 1002, Carol 1003), and
subscribe to `call-info`. Phone A seizes appearance 1 (`line-seize`), dials Dave (1004, a SIPp
far end) on it and holds; phone B, seeing appearance 1 `held` in a call-info NOTIFY, retrieves
the call (INVITE to the line with `appearance-index=1`); A is hung up ("Call retrieved
elsewhere"). B holds privately (`appearance-state=held-private` in its re-INVITE); A, seeing
that, reaches for the call and is refused 403. A then seizes appearance 2 as its "done", B
resumes and hangs up, everybody unsubscribes.

The phones coordinate only through the server's NOTIFYs, as real SCA phones do; the test then
reads every message back from the SIPp traces and checks what each phone was told, in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import attach_diagnostics
from .harness import waiting
from .harness.ports import LOOPBACK, free_udp_range
from .harness.service import (
    ServiceConfig,
    SoftswitchService,
    User,
    service_events,
    start_fresh,
    stop_all,
)
from .harness.sipclient import SipMessage
from .harness.sipp import SippProcess, read_message_trace, register_sipp, start_sipp

pytestmark = pytest.mark.e2e

ALICE = User("1001", "secret1", "Alice Exec")  # the shared line
BOB = User("1002", "secret2", "Bob Assistant")  # phone A
CAROL = User("1003", "secret3", "Carol Assistant")  # phone B
DAVE = User("1004", "secret4", "Dave Outsider")  # the far end
USERS = (ALICE, BOB, CAROL, DAVE)
DELEGATIONS = [{"delegator": ALICE.extension, "delegates": [BOB.extension, CAROL.extension]}]

#: Dave's phone: answers the call, then every re-INVITE (holds, the retrieval), until BYE.
FAR_END = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="sca_far_end">
  <recv request="INVITE" crlf="true"/>
  <send>
    <![CDATA[
      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]FAR[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0

    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]FAR[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=dave 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000

    ]]>
  </send>
  <recv request="ACK"/>
  <label id="loop"/>
  <recv request="INVITE" optional="true" next="reinvite"/>
  <recv request="BYE" next="bye"/>
  <label id="reinvite"/>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=dave 1 2 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000

    ]]>
  </send>
  <recv request="ACK" next="loop"/>
  <label id="bye"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <pause milliseconds="300"/>
</scenario>
"""


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def sca_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SoftswitchService]:
    """A running service with USERS and Alice's line shared by Bob and Carol.

    Why not conftest's ``service_factory``: it cannot pass ``delegations``.
    """
    workdir = tmp_path / "softswitch"

    def config() -> ServiceConfig:
        cfg = ServiceConfig.allocate(workdir / "data", USERS, delegations=DELEGATIONS)
        cfg.media_ports = free_udp_range(100, probe_all=True)  # calls really bind them
        return cfg

    services: list[SoftswitchService] = []

    def register(svc: SoftswitchService) -> None:
        services.append(svc)
        attach_diagnostics(request.node, svc.log_tail)

    yield start_fresh(config, workdir, "softswitch", register)
    crashed = stop_all(services)
    if crashed:
        pytest.fail("\n".join(crashed))


@pytest.fixture
def sipps(request: pytest.FixtureRequest) -> Iterator[list[SippProcess]]:
    """SIPp runs a test starts: in the failure report, stopped at the end."""
    runs: list[SippProcess] = []
    yield runs
    for run in runs:
        run.stop()


def trace(run: SippProcess, direction: str = "received") -> list[SipMessage]:
    """What SIPp sent or received so far, from its -trace_msg file."""
    return [m for d, m in read_message_trace(run.files["trace"]) if d == direction]


def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return waiting.eventually(check, what, timeout, interval=0.05)


def timeline(run: SippProcess) -> list[tuple[str, SipMessage]]:
    """Everything SIPp sent and received, in order, from its -trace_msg file."""
    return read_message_trace(run.files["trace"])


def received(entries: list[tuple[str, SipMessage]]) -> list[SipMessage]:
    return [m for d, m in entries if d == "received"]


def sent(entries: list[tuple[str, SipMessage]]) -> list[SipMessage]:
    return [m for d, m in entries if d == "sent"]


def first(entries: list[tuple[str, SipMessage]], pred: Callable[[str, SipMessage], bool]) -> int:
    for i, (d, m) in enumerate(entries):
        if pred(d, m):
            return i
    raise AssertionError("not found in:\n" + "\n".join(f"{d} {m.start_line}" for d, m in entries))


def requests(msgs: list[SipMessage], method: str) -> list[SipMessage]:
    return [m for m in msgs if not m.is_response and m.method == method]


def responses(msgs: list[SipMessage], method: str, status: int | None = None) -> list[SipMessage]:
    return [
        m
        for m in msgs
        if m.is_response and m.method == method and (status is None or m.status == status)
    ]


def call_info(msg: SipMessage) -> str:
    return ",".join(msg.get_all("call-info"))


def states_shown(notifies: list[SipMessage], index: int) -> list[str]:
    """The successive states of appearance `index` in call-info NOTIFYs (idle when absent)."""
    out: list[str] = []
    for n in notifies:
        if (n.get("event") or "") != "call-info":
            continue
        m = re.search(rf"appearance-index={index};appearance-state=([a-z-]+)", call_info(n))
        state = m[1] if m else "idle"
        if not out or out[-1] != state:
            out.append(state)
    return out


def is_subsequence(seen: list[str], story: list[str]) -> bool:
    it = iter(story)
    return all(any(s == t for t in it) for s in seen)


# --------------------------------------------------------------------------------------------


@pytest.mark.e2e_timeout(90)
def test_two_sca_phones_seize_dial_hold_retrieve_and_private_hold_is_refused(
    sca_service: SoftswitchService,
    sipps: list[SippProcess],
    require_sipp: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    svc = sca_service
    workdir = tmp_path / "sipp"
    domain = LOOPBACK

    def start(scenario: str | Path, name: str, **kw: Any) -> SippProcess:
        run = start_sipp(
            scenario, target=svc.sip_addr, workdir=workdir, name=name, run_timeout=60.0, **kw
        )
        sipps.append(run)
        attach_diagnostics(request.node, run.describe)
        return run

    # Dave's phone, the far end
    reg = register_sipp(
        svc.sip_addr, workdir=workdir, aor_user=DAVE.extension, password=DAVE.password
    )
    assert reg.returncode == 0, reg.describe()
    far_xml = tmp_path / "sca_far_end.xml"
    far_xml.write_text(FAR_END)
    far = start(far_xml, "far_end", local_port=reg.local_port, recv_timeout_ms=30000)
    far.wait_listening()

    # phone B first: subscribed before A does anything, it sees the whole story
    line = ["-s", ALICE.extension]
    phone_b = start(
        "sca_phone_b.xml",
        "phone_b",
        extra=[*line, "-au", CAROL.extension, "-ap", CAROL.password, "-aa"],
    )
    eventually(lambda: requests(trace(phone_b), "NOTIFY"), "phone B's first call-info NOTIFY")
    phone_a = start(
        "sca_phone_a.xml",
        "phone_a",
        keys={"callee": DAVE.extension},
        extra=[*line, "-au", BOB.extension, "-ap", BOB.password, "-aa"],
    )

    results = {name: run.wait() for name, run in (("A", phone_a), ("B", phone_b), ("far", far))}
    for name, result in results.items():
        assert result.returncode == 0 and result.successful == 1, (
            f"phone {name}\n{result.describe(60)}"
        )

    a_all, b_all = timeline(phone_a), timeline(phone_b)
    a_in, b_in = received(a_all), received(b_all)
    a_out, b_out = sent(a_all), sent(b_all)
    line_uri = f"sip:{ALICE.extension}@{domain}:{svc.config.sip_port}"

    # --- 1. A seizes key 1: 200 with the short expiry, a line-seize NOTIFY saying so --------
    seize_req = next(m for m in a_out if m.get("event") == "line-seize")
    assert "appearance-index=1" in (seize_req.get("call-info") or ""), seize_req.text()
    seize_ok = [r for r in responses(a_in, "SUBSCRIBE", 200) if r.get("expires") == "15"]
    assert seize_ok, "no 200 with Expires: 15 for the line-seize SUBSCRIBE"
    seized = [
        n
        for n in requests(a_in, "NOTIFY")
        if n.get("event") == "line-seize" and "appearance-index=1;" in call_info(n)
    ]
    assert seized, "no line-seize NOTIFY at phone A"
    assert call_info(seized[0]) == f"<sip:{domain}>;appearance-index=1;appearance-state=seized"
    assert seized[0].get("subscription-state") == "active;expires=15", seized[0].text()
    assert not seized[0].body and seized[0].get("content-type") is None, seized[0].text()
    # dialling on key 1 consumed the seizure: its last NOTIFY ends the subscription
    assert seized[-1].get("subscription-state") == "terminated;reason=noresource", [
        n.get("subscription-state") for n in seized
    ]

    # --- 2. A dials on key 1; both phones watch appearance 1 go through the whole story ------
    dial = requests(a_out, "INVITE")[0]
    assert dial.start_line.startswith(f"INVITE sip:{DAVE.extension}@"), dial.start_line
    assert "appearance-index=1" in (dial.get("call-info") or ""), dial.text()
    assert responses(a_in, "INVITE", 200), "A's call to Dave was not answered"
    story = ["idle", "seized", "progressing", "active", "held", "active", "held-private"]
    story += ["active", "idle"]
    a_states = states_shown(requests(a_in, "NOTIFY"), 1)
    b_states = states_shown(requests(b_in, "NOTIFY"), 1)
    for states in (a_states, b_states):
        # NOTIFYs coalesce while one is in flight: states may be skipped, never reordered
        assert is_subsequence(states, story), states
        assert {"held", "held-private"} <= set(states), states
    assert b_states[-1] == "idle", b_states  # B hung up: appearance 1 is free again
    dave = f'appearance-uri="\\"{DAVE.name}\\" <sip:{DAVE.extension}@{domain}>"'
    assert any(dave in call_info(n) for n in requests(b_in, "NOTIFY")), [
        call_info(n) for n in requests(b_in, "NOTIFY")
    ]
    for n in requests(b_in, "NOTIFY"):  # call-info: state in Call-Info only, no body
        assert not n.body and n.get("content-type") is None, n.text()
        assert call_info(n).endswith(f"<sip:{domain}>;appearance-index=*;appearance-state=idle")

    # --- 3 + 4. A holds; B, shown "held", retrieves the call by INVITE to the line -----------
    retrieve = requests(b_out, "INVITE")[0]
    assert retrieve.start_line == f"INVITE {line_uri} SIP/2.0", retrieve.start_line
    assert retrieve.get("replaces") is None and "appearance-index=1" in call_info(retrieve)
    saw_held = first(
        b_all,
        lambda d, m: (
            d == "received"
            and bool(re.search(r"appearance-index=1;appearance-state=held[;,]", call_info(m)))
        ),
    )
    assert saw_held < b_all.index(("sent", retrieve)), "B retrieved before it saw 'held'"
    retrieved = responses(b_in, "INVITE", 200)
    assert retrieved and retrieved[0].body, "the retrieval was not answered with media"
    (bye,) = requests(a_in, "BYE")
    assert bye.get("reason") == 'SIP;cause=200;text="Call retrieved elsewhere"', bye.text()

    # --- 5. B holds privately; A, shown "held-private", reaches for it and is refused --------
    private = [m for m in requests(b_out, "INVITE") if "held-private" in call_info(m)]
    assert private, "B never asked for a private hold"
    grab = [m for m in requests(a_out, "INVITE") if m.start_line == f"INVITE {line_uri} SIP/2.0"]
    assert grab and all("appearance-index=1" in call_info(m) for m in grab), grab
    saw_private = first(
        a_all,
        lambda d, m: (
            d == "received" and "appearance-index=1;appearance-state=held-private" in call_info(m)
        ),
    )
    assert saw_private < a_all.index(("sent", grab[0])), "A reached before it saw the lock"
    refused = responses(a_in, "INVITE", 403)
    assert refused and refused[0].reason == "Call Is Private", [m.start_line for m in a_in]
    grab_cseqs = {m.get("cseq") for m in grab}
    assert not [r for r in responses(a_in, "INVITE", 200) if r.get("cseq") in grab_cseqs]

    # --- Dave: one call, moved between phones by re-INVITEs (A's hold, the retrieval, B's
    # private hold and resume), ended once ---------------------------------------------------
    far_in = trace(far)
    assert len(requests(far_in, "INVITE")) == 5, [m.start_line for m in far_in]
    assert len(requests(far_in, "BYE")) == 1

    # --- the service's own account ----------------------------------------------------------
    events = service_events(svc)
    names = [e.get("event") for e in events]
    assert "line_seize_dialled" in names and "pickup_refused_private" in names, names
    retrieves = [e for e in events if e.get("event") == "call_take_over"]
    assert [(e["user"], e["kind"]) for e in retrieves] == [(CAROL.extension, "retrieve")]
    assert not [e for e in events if e.get("level") in ("error", "critical")], events
