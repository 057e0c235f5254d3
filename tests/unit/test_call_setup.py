"""Call admission: authentication, calling on behalf of a delegator, who rings."""

from __future__ import annotations

from dialplan import load_config_text
from softswitch.call_setup import Admit, CallSetup, Feature, Refuse
from softswitch.directory import Directory
from softswitch.registrar import Bindings
from softswitch.sip.digest import Algorithm, DigestAuthenticator, compute_response
from softswitch.sip.message import Request, parse_message
from softswitch.sip.transaction import Address
from softswitch.store import BindingKey, BindingRecord

NOW = 1_800_000_000.0
SRC = Address("udp", "127.0.0.1", 5090)
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


def setup() -> CallSetup:
    cfg = load_config_text(CONFIG)
    auth = DigestAuthenticator(cfg.realm, (Algorithm.MD5,), 300, secret=b"q" * 32)
    bindings = Bindings()
    return CallSetup(cfg, Directory.from_config(cfg), auth, bindings)


def bind(cs: CallSetup, aor: str, port: int, auth_user: str | None = None) -> None:
    cs.bindings.apply(
        [
            BindingRecord(
                aor,
                f"<sip:{aor}@127.0.0.1:{port}>",
                f"sip:{aor}@127.0.0.1:{port}",
                NOW + 3600,
                "c",
                1,
                f"udp:127.0.0.1:{port}",
                auth_user or aor,
            )
        ],
        [],
    )


def invite(
    cs: CallSetup,
    to: str,
    user: str | None,
    password: str = "",
    from_user: str = "",
    ppi: str | None = None,
) -> Request:
    lines = [
        f"INVITE sip:{to}@127.0.0.1 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bKx1",
        f"From: <sip:{from_user or user}@127.0.0.1>;tag=1",
        f"To: <sip:{to}@127.0.0.1>",
        "Call-ID: c1",
        "CSeq: 2 INVITE",
        "Max-Forwards: 70",
    ]
    if ppi:
        lines.append(f"P-Preferred-Identity: <sip:{ppi}@127.0.0.1>")
    if user:
        nonce = cs.auth.new_nonce(NOW)
        uri = f"sip:{to}@127.0.0.1"
        resp = compute_response(
            user, password, "127.0.0.1", nonce, "INVITE", uri, Algorithm.MD5, "00000001", "cn"
        )
        lines.append(
            f'Proxy-Authorization: Digest username="{user}", realm="127.0.0.1", '
            f'nonce="{nonce}", uri="{uri}", response="{resp}", algorithm=MD5, '
            'qop=auth, nc=00000001, cnonce="cn"'
        )
    msg = parse_message(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def test_unauthenticated_invite_is_challenged_with_407() -> None:
    cs = setup()
    d = cs.decide(invite(cs, "1001", None, from_user="1004"), SRC, NOW)
    assert isinstance(d, Refuse) and d.status == 407 and d.challenge


def test_wrong_password_is_403_and_counts_as_failure() -> None:
    cs = setup()
    d = cs.decide(invite(cs, "1001", "1004", "nope"), SRC, NOW)
    assert isinstance(d, Refuse) and d.status == 403 and d.auth_failed


def test_trusted_source_skips_auth() -> None:
    cs = setup()
    d = cs.decide(
        invite(cs, "1001", None, from_user="+15551234"), Address("udp", "127.0.0.9", 5060), NOW
    )
    assert isinstance(d, Admit) and d.user is None and d.identity == "+15551234"


def test_delegate_calls_as_delegator_via_shared_line_account() -> None:
    cs = setup()
    d = cs.decide(invite(cs, "1004", "1002", "s2", from_user="1001"), SRC, NOW)
    assert isinstance(d, Admit) and d.identity == "1001" and d.user == "1002"
    assert d.caller_from == '"Alice Exec" <sip:1001@127.0.0.1>'
    assert d.caller_pai is not None and "tel:+15550101001" in d.caller_pai
    outbound = d.lines[0]
    assert (outbound.line, outbound.party, outbound.remote) == ("1001", "1002", "1004")


def test_delegate_calls_as_delegator_via_p_preferred_identity() -> None:
    cs = setup()
    d = cs.decide(invite(cs, "1004", "1002", "s2", ppi="1001"), SRC, NOW)
    assert isinstance(d, Admit) and d.identity == "1001"


def test_others_asking_for_an_identity_get_403() -> None:
    cs = setup()
    for user, pw in (("1003", "s3"), ("1004", "s4")):  # 1003 lacks `place`; 1004 no delegate
        d = cs.decide(invite(cs, "1002", user, pw, ppi="1001"), SRC, NOW)
        assert isinstance(d, Refuse) and d.status == 403 and d.event == "identity_refused"


def test_line_rings_each_phone_once_preferring_the_line_account() -> None:
    cs = setup()
    bind(cs, "1001", 6000)  # Alice's phone
    bind(cs, "1002", 6002)  # Bob's phone, own account...
    bind(cs, "1001", 6002, auth_user="1002")  # ...and the shared line on the same phone
    bind(cs, "1003", 6004)
    d = cs.decide(invite(cs, "1001", "1004", "s4"), SRC, NOW)
    assert isinstance(d, Admit)
    assert sorted((t.party, t.dest.port) for t in d.targets) == [
        ("1001", 6000),
        ("1002", 6002),
        ("1003", 6004),
    ]
    bob = next(t for t in d.targets if t.party == "1002")
    assert bob.uri == "sip:1001@127.0.0.1:6002"  # rung on the line appearance
    carol = next(t for t in d.targets if t.party == "1003")
    assert carol.to.startswith('"Alice Exec (1001)"')
    assert dict(carol.headers)["History-Info"].startswith("<sip:1001@127.0.0.1>;index=1")


def test_targets_are_built_once_per_phone_and_again_when_its_contact_changes() -> None:
    cs = setup()
    bind(cs, "1001", 6000)
    bind(cs, "1003", 6004)
    first = cs.decide(invite(cs, "1001", "1004", "s4"), SRC, NOW)
    again = cs.decide(invite(cs, "1001", "1004", "s4"), SRC, NOW)
    assert isinstance(first, Admit) and isinstance(again, Admit)
    assert [id(t) for t in first.targets] == [id(t) for t in again.targets]
    cs.bindings.apply(
        [], [BindingKey("1003", "sip:1003@127.0.0.1:6004")]
    )  # Carol's phone re-registers elsewhere
    bind(cs, "1003", 6006)
    moved = cs.decide(invite(cs, "1001", "1004", "s4"), SRC, NOW)
    assert isinstance(moved, Admit)
    carol = next(t for t in moved.targets if t.party == "1003")
    assert carol.dest.port == 6006 and carol.uri == "sip:1003@127.0.0.1:6006"


def test_feature_codes_and_unknown_numbers() -> None:
    cs = setup()
    d = cs.decide(invite(cs, "*21", "1002", "s2"), SRC, NOW)
    assert d == Feature("1002", "ring_opt_out", "")
    nf = cs.decide(invite(cs, "5555", "1002", "s2"), SRC, NOW)
    assert isinstance(nf, Refuse) and nf.status == 404


def test_dnd_everywhere_is_busy_but_a_busy_phone_still_rings() -> None:
    cs = setup()
    bind(cs, "1004", 6010)
    cfg_dnd = load_config_text(
        CONFIG.replace(
            "name: Dave Outsider, password: s4}", "name: Dave Outsider, password: s4, dnd: true}"
        )
    )
    dnd = CallSetup(cfg_dnd, Directory.from_config(cfg_dnd), cs.auth, cs.bindings)
    d = dnd.decide(invite(dnd, "1004", "1002", "s2"), SRC, NOW)
    assert isinstance(d, Refuse) and d.status == 486
    # Without DND the call is admitted whatever else the phone is doing (call waiting).
    ok = cs.decide(invite(cs, "1004", "1002", "s2"), SRC, NOW)
    assert isinstance(ok, Admit) and [t.dest.port for t in ok.targets] == [6010]
