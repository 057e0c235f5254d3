"""Digest authentication (RFC 3261 §22, RFC 8760) with a fake clock."""

from __future__ import annotations

import random
import re

import pytest

from softswitch.sip.digest import (
    Algorithm,
    Credentials,
    DigestAuthenticator,
    DigestResponse,
    Verdict,
    _auth_params,
    authorization_header_value,
    compute_response,
    credentials_for,
    parse_authorization,
)
from softswitch.sip.errors import ParseError
from softswitch.sip.syntax import unquote

REALM = "example.test"
NOW = 1_700_000_000.0


def make_auth(*algorithms: Algorithm) -> DigestAuthenticator:
    return DigestAuthenticator(
        REALM, algorithms or (Algorithm.SHA256, Algorithm.MD5), nonce_ttl=300, secret=b"k" * 32
    )


def answer(
    auth: DigestAuthenticator,
    now: float,
    password: str = "secret1",
    algorithm: Algorithm = Algorithm.MD5,
    nc: str = "00000001",
    username: str = "1001",
    nonce: str | None = None,
) -> DigestResponse:
    nonce = nonce or auth.new_nonce(now)
    uri = "sip:example.test"
    resp = compute_response(
        username, password, REALM, nonce, "REGISTER", uri, algorithm, nc, "c0ffee"
    )
    return DigestResponse(username, REALM, nonce, uri, resp, algorithm, "auth", nc, "c0ffee")


@pytest.fixture
def alice() -> Credentials:
    return credentials_for("1001", "secret1", REALM, (Algorithm.SHA256, Algorithm.MD5))


@pytest.mark.parametrize("algorithm", [Algorithm.MD5, Algorithm.SHA256])
def test_correct_password_is_accepted(alice: Credentials, algorithm: Algorithm) -> None:
    auth = make_auth()
    assert auth.verify(answer(auth, NOW, algorithm=algorithm), "REGISTER", alice, NOW) is Verdict.OK


def test_rfc2617_md5_vector() -> None:
    # The RFC 2617 §3.5 example, with method GET and uri /dir/index.html.
    resp = compute_response(
        "Mufasa",
        "Circle Of Life",
        "testrealm@host.com",
        "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        "GET",
        "/dir/index.html",
        Algorithm.MD5,
        "00000001",
        "0a4f113b",
    )
    assert resp == "6629fae49393a05397450978507c4ef1"


def test_wrong_password_and_unknown_user_fail_alike(alice: Credentials) -> None:
    auth = make_auth()
    assert auth.verify(answer(auth, NOW, password="nope"), "REGISTER", alice, NOW) is Verdict.FAILED
    unknown = answer(auth, NOW, username="9999")
    assert auth.verify(unknown, "REGISTER", None, NOW) is Verdict.FAILED


def test_old_nonce_is_stale_not_failed(alice: Credentials) -> None:
    auth = make_auth()
    cred = answer(auth, NOW)
    assert auth.verify(cred, "REGISTER", alice, NOW + 301) is Verdict.STALE


def test_nonce_from_another_process_is_stale(alice: Credentials) -> None:
    other = DigestAuthenticator(REALM, secret=b"x" * 32)
    auth = make_auth()
    cred = answer(auth, NOW, nonce=other.new_nonce(NOW))
    assert auth.verify(cred, "REGISTER", alice, NOW) is Verdict.STALE


def test_nonce_count_replay_is_refused(alice: Credentials) -> None:
    auth = make_auth()
    nonce = auth.new_nonce(NOW)
    first = answer(auth, NOW, nonce=nonce, nc="00000001")
    assert auth.verify(first, "REGISTER", alice, NOW) is Verdict.OK
    assert auth.verify(first, "REGISTER", alice, NOW + 1) is Verdict.REPLAY
    second = answer(auth, NOW, nonce=nonce, nc="00000002")
    assert auth.verify(second, "REGISTER", alice, NOW + 1) is Verdict.OK


def test_missing_qop_or_foreign_realm_is_malformed(alice: Credentials) -> None:
    auth = make_auth()
    cred = answer(auth, NOW)
    no_qop = DigestResponse(
        cred.username, REALM, cred.nonce, cred.uri, cred.response, cred.algorithm
    )
    assert auth.verify(no_qop, "REGISTER", alice, NOW) is Verdict.MALFORMED
    foreign = DigestResponse(
        cred.username,
        "other",
        cred.nonce,
        cred.uri,
        cred.response,
        cred.algorithm,
        "auth",
        "00000001",
        "c0ffee",
    )
    assert auth.verify(foreign, "REGISTER", alice, NOW) is Verdict.MALFORMED


def test_algorithm_not_offered_is_malformed(alice: Credentials) -> None:
    auth = make_auth(Algorithm.MD5)
    assert (
        auth.verify(answer(auth, NOW, algorithm=Algorithm.SHA256), "REGISTER", alice, NOW)
        is Verdict.MALFORMED
    )


def test_challenges_one_per_algorithm_in_order() -> None:
    values = make_auth().challenges(NOW, stale=True)
    assert [v.split("algorithm=")[1].split(",")[0] for v in values] == ["SHA-256", "MD5"]
    assert all('qop="auth"' in v and v.endswith("stale=true") for v in values)


def test_parse_authorization_round_trip() -> None:
    auth = make_auth()
    cred = answer(auth, NOW, algorithm=Algorithm.SHA256)
    assert parse_authorization(authorization_header_value(cred)) == cred


def test_parse_authorization_tolerates_spacing_and_commas_in_quotes() -> None:
    cred = parse_authorization(
        'Digest username="a,b" ,realm="r",  nonce="n", uri="sip:x",'
        ' response="ABC", qop=auth, nc=00000001, cnonce="c"'
    )
    assert cred.username == "a,b" and cred.response == "abc" and cred.algorithm is Algorithm.MD5


@pytest.mark.parametrize(
    "value",
    [
        "Basic abc",
        'Digest username="a"',
        'Digest realm="unterminated',
        'Digest username="a", realm="r", nonce="n", uri="u", response="x", algorithm=SHA-512',
    ],
)
def test_parse_authorization_rejects_malformed(value: str) -> None:
    with pytest.raises(ParseError):
        parse_authorization(value)


def test_nonce_tracking_is_bounded(alice: Credentials) -> None:
    auth = DigestAuthenticator(REALM, secret=b"k" * 32, max_tracked_nonces=10)
    for i in range(50):
        assert auth.verify(answer(auth, NOW + i), "REGISTER", alice, NOW + i) is Verdict.OK
    assert len(auth._nc_seen) == 10


# The grammar the hand-written scanner must accept, as the regular expression it replaced:
# a reference, so a fuzzed comparison pins every edge (escapes, commas, tabs, trailing comma).
_REF_TOKEN = r"[A-Za-z0-9_.!%*+`'~-]+"
_REF_VALUE = r'"(?:[^"\\]|\\.)*"|[^ \t,"]+'
_REF_ONE = rf"[ \t]*{_REF_TOKEN}[ \t]*=[ \t]*(?:{_REF_VALUE})[ \t]*"
_REF_LIST = re.compile(rf"{_REF_ONE}(?:,{_REF_ONE})*,?[ \t]*")
_REF_PARAM = re.compile(rf"({_REF_TOKEN})[ \t]*=[ \t]*({_REF_VALUE})")


def _reference_params(rest: str) -> dict[str, str] | None:
    if not _REF_LIST.fullmatch(rest):
        return None
    return {
        name.lower(): unquote(raw) if raw.startswith('"') else raw
        for name, raw in _REF_PARAM.findall(rest)
    }


@pytest.mark.parametrize(
    "rest",
    [
        'username="a\\"b", realm="r"',
        'username="a\\\\", realm="r"',
        'username="a\\',
        "a=b,",
        "a=b, ",
        "a=b,,c=d",
        'a = b ,\tc="x,y"\t',
        "a=b c=d",
        'a=b"c',
        "a=",
        "=b",
        "",
        " ",
        'a=""',
        "a=b,A=c",
    ],
)
def test_auth_params_match_the_reference_grammar(rest: str) -> None:
    assert _auth_params(rest) == _reference_params(rest)


def test_auth_params_match_the_reference_grammar_fuzzed() -> None:
    rng = random.Random(4475)
    alphabet = ["a", "b", "Z", "9", "=", ",", " ", "\t", '"', "\\", "-", ";", "é"]
    for _ in range(20_000):
        rest = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 14)))
        assert _auth_params(rest) == _reference_params(rest), rest
