"""The registrar's REGISTER processing (RFC 3261 §10.3), sans-I/O with a fake clock."""

from __future__ import annotations

import itertools

import pytest

from dialplan import load_config_text
from softswitch.directory import Directory
from softswitch.registrar import AuthResult, Bindings, Registrar, RegistrarPolicy
from softswitch.sip.digest import Algorithm, DigestAuthenticator, compute_response
from softswitch.sip.message import Request, Response, parse_message

NOW = 1_800_000_000.0
CONFIG = """
domain: 127.0.0.1
listen: [udp:127.0.0.1:5060]
media: {address: 127.0.0.1, ports: 20000-20999}
users:
  - {extension: "1001", name: Alice Exec, password: secret1}
  - {extension: "1002", name: Bob Assistant, password: secret2}
  - {extension: "1003", name: Carol, password: secret3}
delegations:
  - {delegator: "1001", delegates: ["1002"]}
"""
_seq = itertools.count(1)


def make_registrar() -> Registrar:
    cfg = load_config_text(CONFIG)
    auth = DigestAuthenticator(cfg.realm, (Algorithm.MD5,), 300, secret=b"s" * 32)
    return Registrar(Directory.from_config(cfg), auth, RegistrarPolicy(60, 7200, 3600), Bindings())


def register(
    aor: str,
    contacts: list[str] | None = None,
    *,
    expires: int | None = None,
    auth: tuple[str, str, str] | None = None,
    call_id: str = "cid-1",
    cseq: int | None = None,
) -> Request:
    lines = [
        "REGISTER sip:127.0.0.1 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK" + str(next(_seq)),
        f"From: <sip:{aor}@127.0.0.1>;tag=f1",
        f"To: <sip:{aor}@127.0.0.1>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq or next(_seq)} REGISTER",
        "Max-Forwards: 70",
    ]
    lines += [f"Contact: {c}" for c in contacts or []]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if auth is not None:
        user, password, nonce = auth
        resp = compute_response(
            user,
            password,
            "127.0.0.1",
            nonce,
            "REGISTER",
            "sip:127.0.0.1",
            Algorithm.MD5,
            "00000001",
            "abc",
        )
        lines.append(
            f'Authorization: Digest username="{user}", realm="127.0.0.1", '
            f'nonce="{nonce}", uri="sip:127.0.0.1", response="{resp}", algorithm=MD5, '
            'qop=auth, nc=00000001, cnonce="abc"'
        )
    msg = parse_message(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def authed(
    reg: Registrar,
    aor: str,
    contacts: list[str] | None = None,
    user: str | None = None,
    password: str = "secret1",
    now: float = NOW,
    **kw: object,
) -> Response:
    nonce = reg.auth.new_nonce(now)
    out = reg.handle(
        register(aor, contacts, auth=(user or aor, password, nonce), **kw),  # type: ignore[arg-type]
        "udp:127.0.0.1:5090",
        now,
    )
    return out.response


def test_first_register_is_challenged() -> None:
    reg = make_registrar()
    resp = reg.handle(register("1001", ["<sip:1001@127.0.0.1:5090>"]), "udp:x", NOW).response
    assert resp.status == 401
    (challenge,) = resp.headers.get_all("www-authenticate")
    assert 'realm="127.0.0.1"' in challenge and 'qop="auth"' in challenge


def test_register_binds_and_lists_contacts_with_their_own_expiry() -> None:
    reg = make_registrar()
    resp = authed(
        reg,
        "1001",
        ["<sip:1001@127.0.0.1:5090>;expires=600", "<sip:1001@127.0.0.1:5092>"],
        expires=1800,
    )
    assert resp.status == 200
    contacts = sorted(resp.headers.get_all("contact"))
    assert contacts == [
        "<sip:1001@127.0.0.1:5090>;expires=600",
        "<sip:1001@127.0.0.1:5092>;expires=1800",
    ]
    # A REGISTER without Contact lists what is bound, with the remaining time.
    listed = authed(reg, "1001", now=NOW + 100)
    assert sorted(listed.headers.get_all("contact")) == [
        "<sip:1001@127.0.0.1:5090>;expires=500",
        "<sip:1001@127.0.0.1:5092>;expires=1700",
    ]


def test_expires_is_clamped_to_max_and_too_brief_gets_423() -> None:
    reg = make_registrar()
    resp = authed(reg, "1001", ["<sip:1001@127.0.0.1:5090>"], expires=99999)
    assert resp.headers.get_all("contact") == ["<sip:1001@127.0.0.1:5090>;expires=7200"]
    brief = authed(reg, "1001", ["<sip:1001@127.0.0.1:5090>"], expires=10)
    assert brief.status == 423 and brief.headers.get("min-expires") == "60"


def test_star_unregisters_everything() -> None:
    reg = make_registrar()
    authed(reg, "1001", ["<sip:1001@127.0.0.1:5090>", "<sip:1001@127.0.0.1:5092>"])
    resp = authed(reg, "1001", ["*"], expires=0)
    assert resp.status == 200 and resp.headers.get_all("contact") == []
    assert reg.bindings.current("1001", NOW) == []


def test_expires_zero_removes_one_contact() -> None:
    reg = make_registrar()
    authed(reg, "1001", ["<sip:1001@127.0.0.1:5090>", "<sip:1001@127.0.0.1:5092>"])
    resp = authed(reg, "1001", ["<sip:1001@127.0.0.1:5090>;expires=0"])
    assert resp.headers.get_all("contact") == ["<sip:1001@127.0.0.1:5092>;expires=3600"]


def test_wrong_password_and_unknown_user_look_the_same() -> None:
    reg = make_registrar()

    def shape(resp: Response) -> tuple[int, str, list[str]]:
        return resp.status, resp.reason, sorted(n.lower() for n, _ in resp.headers)

    wrong = reg.handle(
        register(
            "1001", ["<sip:1001@127.0.0.1:5090>"], auth=("1001", "bad", reg.auth.new_nonce(NOW))
        ),
        "udp:x",
        NOW,
    )
    unknown = reg.handle(
        register(
            "7777", ["<sip:7777@127.0.0.1:5090>"], auth=("7777", "bad", reg.auth.new_nonce(NOW))
        ),
        "udp:x",
        NOW,
    )
    assert shape(wrong.response) == shape(unknown.response)
    assert wrong.response.status == 403
    assert wrong.auth is unknown.auth is AuthResult.FAILED
    first_wrong = reg.handle(register("1001", ["<sip:1001@h>"]), "udp:x", NOW).response
    first_unknown = reg.handle(register("7777", ["<sip:7777@h>"]), "udp:x", NOW).response
    assert shape(first_wrong) == shape(first_unknown)


def test_stale_nonce_gets_a_new_challenge_with_stale_true() -> None:
    reg = make_registrar()
    nonce = reg.auth.new_nonce(NOW)
    out = reg.handle(
        register("1001", ["<sip:1001@h>"], auth=("1001", "secret1", nonce)), "udp:x", NOW + 1000
    )
    assert out.response.status == 401 and out.auth is AuthResult.NONE
    assert "stale=true" in (out.response.headers.get("www-authenticate") or "")


def test_delegate_may_register_the_delegators_line_but_others_may_not() -> None:
    reg = make_registrar()
    ok = authed(reg, "1001", ["<sip:1001@127.0.0.1:6000>"], user="1002", password="secret2")
    assert ok.status == 200
    assert reg.bindings.current("1001", NOW)[0].auth_user == "1002"
    refused = authed(reg, "1001", ["<sip:1001@127.0.0.1:6002>"], user="1003", password="secret3")
    assert refused.status == 403


def test_out_of_order_cseq_is_refused() -> None:
    reg = make_registrar()
    assert authed(reg, "1001", ["<sip:1001@h>"], call_id="c1", cseq=10).status == 200
    assert authed(reg, "1001", ["<sip:1001@h>"], call_id="c1", cseq=9).status == 500
    assert authed(reg, "1001", ["<sip:1001@h>"], call_id="c2", cseq=1).status == 200


def test_contact_is_stored_exactly() -> None:
    # RFC 4475 `regescrt` / `cparam02`: the registrar returns the Contact as it was sent.
    reg = make_registrar()
    resp = authed(reg, "1001", ["<sip:1001@h;unknownparam>", "<sip:1001@g?Route=%3Csip:x%3E>"])
    assert sorted(resp.headers.get_all("contact")) == [
        "<sip:1001@g?Route=%3Csip:x%3E>;expires=3600",
        "<sip:1001@h;unknownparam>;expires=3600",
    ]


def test_expired_bindings_are_forgotten() -> None:
    reg = make_registrar()
    authed(reg, "1001", ["<sip:1001@h>"], expires=60)
    assert reg.bindings.current("1001", NOW + 61) == []
    gone = reg.bindings.expire(NOW + 61)
    assert [(k.aor, k.uri.startswith("sip:1001@h")) for k in gone] == [("1001", True)]


@pytest.mark.parametrize("n", [11])
def test_contacts_per_aor_are_bounded(n: int) -> None:
    reg = make_registrar()
    contacts = [f"<sip:1001@127.0.0.1:{6000 + i}>" for i in range(n)]
    assert authed(reg, "1001", contacts).status == 403
