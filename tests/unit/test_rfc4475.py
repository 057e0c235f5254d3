"""RFC 4475 torture messages against the message layer.

Each message is read as bytes from tests/data/rfc4475 (CRLF line ends, some with NUL bytes and
binary bodies). The groups follow RFC 4475 §3: valid messages must parse with the values the RFC
describes, invalid ones must raise `ParseError` with the status the RFC asks for, and the ones
the RFC leaves to the transaction or application layer must parse here so that those layers can
decide (except `insuf`, `multi01` and `mcl01`, whose answer is a 400 anyway).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from softswitch.sip.errors import ParseError
from softswitch.sip.headers import NameAddr
from softswitch.sip.message import Request, Response, SipMessage, parse_message
from softswitch.sip.uri import AbsoluteUri, SipUri, parse_uri

DATA = Path(__file__).resolve().parent.parent / "data" / "rfc4475"

VALID = [
    "wsinv", "intmeth", "esc01", "escnull", "esc02", "lwsdisp", "longreq", "dblreq", "semiuri",
    "transports", "mpart01", "unreason", "noreason",
]  # fmt: skip
#: Invalid messages and the statuses RFC 4475 allows for each.
INVALID: dict[str, set[int]] = {
    name: {400}
    for name in [
        "badinv01", "clerr", "ncl", "scalar02", "scalarlg", "quotbal", "ltgtruri", "lwsruri",
        "lwsstart", "trws", "escruri", "baddate", "regbadct", "badaspec", "baddn", "mismatch01",
        "bigcode",
    ]
} | {"badvers": {505}, "mismatch02": {400, 501}}  # fmt: skip
APPLICATION_400 = ["insuf", "multi01", "mcl01"]
APPLICATION_PARSE = [
    "unkscm", "novelsc", "unksm2", "bext01", "invut", "regaut01", "sdp01", "bcast", "zeromf",
    "cparam01", "cparam02", "regescrt",
]  # fmt: skip


def load(name: str) -> bytes:
    return (DATA / f"{name}.dat").read_bytes()


def parse(name: str) -> SipMessage:
    return parse_message(load(name))


def request(name: str) -> Request:
    msg = parse(name)
    assert isinstance(msg, Request)
    return msg


def sip(addr: NameAddr) -> SipUri:
    assert isinstance(addr.uri, SipUri)
    return addr.uri


def test_every_file_is_classified() -> None:
    files = {p.stem for p in DATA.glob("*.dat")}
    classified = {*VALID, *INVALID, *APPLICATION_400, *APPLICATION_PARSE, "badbranch", "inv2543"}
    assert files == classified
    assert len(files) == 49


@pytest.mark.parametrize("name", VALID + APPLICATION_PARSE + ["badbranch", "inv2543"])
def test_parses_and_round_trips(name: str) -> None:
    msg = parse(name)
    again = parse_message(msg.to_bytes())
    assert type(again) is type(msg)
    assert again.to_bytes() == msg.to_bytes()
    assert again.body == msg.body
    assert [str(v) for v in again.vias] == [str(v) for v in msg.vias]


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_is_rejected_with_the_rfc_status(name: str) -> None:
    with pytest.raises(ParseError) as info:
        parse(name)
    assert info.value.status in INVALID[name]


@pytest.mark.parametrize("name", APPLICATION_400)
def test_application_400_cases_may_be_rejected_here(name: str) -> None:
    with pytest.raises(ParseError) as info:
        parse(name)
    assert info.value.status == 400


# --- valid messages (§3.1.1) ----------------------------------------------------------------------


def test_wsinv() -> None:
    msg = request("wsinv")
    assert msg.method == "INVITE"
    assert str(msg.uri) == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    assert [(v.transport, v.host, v.branch) for v in msg.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert (msg.cseq.seq, msg.cseq.method) == (9, "INVITE")
    assert msg.max_forwards == 68
    assert msg.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert msg.from_.display == 'J Rosenberg \\"'
    assert msg.from_.tag == "98asjd8"
    assert str(msg.from_.uri) == "sip:jdrosen@example.com"
    assert msg.to.tag == "1918181833n"
    assert msg.to.display is None
    assert msg.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert msg.headers.get("subject") == ""  # `s :` with an empty value
    assert msg.headers.get_all("route") == [
        "<sip:services.example.com;lr;unknownwith=value;unknown-no-value>"
    ]
    (contact,) = msg.contacts
    assert contact.display == 'Quoted string ""'
    assert contact.params == (("newparam", "newvalue"), ("secondparam", None), ("q", "0.33"))
    assert len(msg.body) == 150


def test_intmeth() -> None:
    msg = request("intmeth")
    method = "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.method == method
    assert msg.cseq.method == method
    uri = msg.uri
    assert isinstance(uri, SipUri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com"
    assert msg.via.branch == "z9hG4bK-.!%66*_+`'~"
    assert msg.to.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert sip(msg.to).user == uri.user
    assert msg.from_.display == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.param("fromParam''~+*_!.-%") == '"работающий"'
    assert msg.from_.tag == "_token~1'+`*%!-."
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.max_forwards == 255
    assert msg.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"


def test_esc01_user_parts_compare_unescaped() -> None:
    msg = request("esc01")
    ruri = msg.uri
    assert isinstance(ruri, SipUri)
    assert ruri.user == "sips%3Auser%40example.com"  # kept as sent
    assert ruri.user_unescaped == "sips:user@example.com"
    assert ruri.host == "example.net"
    assert sip(msg.to).user_unescaped == "user"
    assert msg.to.uri.equivalent(parse_uri("sip:user@example.com"))
    assert sip(msg.from_).user_unescaped == "I have spaces"
    (contact,) = msg.contacts
    assert contact.uri.equivalent(parse_uri("sip:caller@host5.example.net;lr;name=value%2541"))
    # `v%61lue%25%34%31` unescapes to `value%41`, not to `valueA`
    assert not contact.uri.equivalent(parse_uri("sip:caller@host5.example.net;lr;name=valueA"))


def test_escnull() -> None:
    msg = request("escnull")
    assert sip(msg.to).user_unescaped == "null-\x00-null"
    assert [sip(c).user_unescaped for c in msg.contacts] == ["\x00", "\x00\x00"]


def test_esc02_escapes_are_not_resolved_outside_uris() -> None:
    msg = request("esc02")
    assert msg.method == "RE%47IST%45R"  # not REGISTER
    assert msg.cseq.method == "RE%47IST%45R"
    assert msg.to.display == "%Z%45"
    assert msg.via.branch == "z9hG4bK209%fzsnel234"
    # `C%6Fntact` is an extension header, not a third Contact
    assert [str(c.uri) for c in msg.contacts] == [
        "sip:alias1@host1.example.com",
        "sip:alias3@host3.example.com",
    ]
    assert msg.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_lwsdisp_display_name_without_space_before_bracket() -> None:
    msg = request("lwsdisp")
    assert msg.from_.display == "caller"
    assert str(msg.from_.uri) == "sip:caller@example.com"
    assert msg.from_.tag == "323"


def test_longreq_keeps_long_values_intact() -> None:
    msg = request("longreq")
    raw = load("longreq").decode()
    assert msg.to.display is not None
    assert msg.to.display.startswith("I have a user name of extremeextreme")
    assert msg.to.display.endswith("extreme proportion")
    to_uri = sip(msg.to)
    assert to_uri.port == 6000
    assert to_uri.param("unknownparam1") == "very" + "long" * 20 + "value"
    assert to_uri.param("longparam" + "name" * 25) == "shortvalue"
    assert msg.from_.tag is not None and len(msg.from_.tag) > 100
    assert msg.call_id in raw
    assert len(msg.vias) == 34
    assert msg.vias[0].host == "sip33.example.com"
    assert msg.vias[-1].branch is not None and msg.vias[-1].branch.startswith("verylong")
    assert msg.vias[-1].param("received") == "192.0.2.5"
    long_name = "Unknown-" + "LongLong" * 10 + "-Name"
    value = msg.headers.get(long_name)
    assert value is not None and value in raw
    assert len(msg.body) == 150


def test_dblreq_ignores_bytes_after_content_length() -> None:
    msg = request("dblreq")
    assert msg.method == "REGISTER"
    assert msg.body == b""
    assert b"INVITE" not in msg.to_bytes()


def test_semiuri_user_part_with_semicolon() -> None:
    msg = request("semiuri")
    uri = msg.uri
    assert isinstance(uri, SipUri)
    assert uri.user == "user;par=u%40example.net"
    assert uri.host == "example.com"
    assert uri.params == ()
    assert msg.headers.get_all("accept") == [
        "application/sdp",
        "application/pkcs7-mime",
        "multipart/mixed",
        "multipart/signed",
        "message/sip",
        "message/sipfrag",
    ]


def test_transports() -> None:
    msg = request("transports")
    assert [v.transport for v in msg.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert [v.host for v in msg.vias] == [f"t{i}.example.com" for i in range(1, 6)]


def test_mpart01_binary_body_is_kept_byte_for_byte() -> None:
    raw = load("mpart01")
    msg = request("mpart01")
    assert len(msg.body) == 553
    assert raw.endswith(msg.body)
    assert msg.via.has_rport and msg.via.param("rport") is None


def test_unreason_utf8_reason_phrase() -> None:
    msg = parse("unreason")
    assert isinstance(msg, Response)
    assert msg.status == 200
    assert msg.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    assert "простое".encode() in msg.to_bytes()


def test_noreason_empty_reason_phrase() -> None:
    msg = parse("noreason")
    assert isinstance(msg, Response)
    assert (msg.status, msg.reason) == (100, "")


# --- transaction and application layer (§3.2, §3.3) -----------------------------------------------


def test_badbranch_parses_for_the_transaction_layer() -> None:
    assert request("badbranch").via.branch == "z9hG4bK"


def test_inv2543_parses_without_a_magic_cookie() -> None:
    msg = request("inv2543")
    assert msg.via.branch is None


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("unkscm", "nobodyKnowsThisScheme:totallyopaquecontent"),
        ("novelsc", "soap.beep://192.0.2.103:3002"),
    ],
)
def test_unknown_request_uri_schemes_parse_as_absolute_uris(name: str, text: str) -> None:
    uri = request(name).uri
    assert isinstance(uri, AbsoluteUri)
    assert str(uri) == text


def test_unksm2_to_with_unknown_scheme() -> None:
    msg = request("unksm2")
    assert msg.to.uri == AbsoluteUri("isbn", "2983792873")
    assert isinstance(msg.from_.uri, AbsoluteUri)
    assert [c.uri for c in msg.contacts] == [AbsoluteUri("name", "John_Smith")]


def test_zeromf() -> None:
    assert request("zeromf").max_forwards == 0


def test_cparam01_parameter_belongs_to_the_header() -> None:
    (contact,) = request("cparam01").contacts
    assert str(contact.uri) == "sip:+19725552222@gw1.example.net"
    assert sip(contact).params == ()
    assert contact.has_param("unknownparam")


def test_cparam02_parameter_belongs_to_the_uri() -> None:
    (contact,) = request("cparam02").contacts
    assert sip(contact).has_param("unknownparam")
    assert contact.params == ()
    assert str(contact.uri) == "sip:+19725552222@gw1.example.net;unknownparam"


def test_regescrt_contact_uri_is_kept_exactly() -> None:
    (contact,) = request("regescrt").contacts
    assert sip(contact).headers == "Route=%3Csip:sip.example.com%3E"
    assert str(contact.uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"


def test_bcast_parses_its_broadcast_via() -> None:
    msg = parse("bcast")
    assert [v.host for v in msg.vias] == ["192.0.2.198", "255.255.255.255"]


def test_bext01_require_values() -> None:
    msg = request("bext01")
    assert msg.headers.get_all("require") == ["nothingSupportsThis", "nothingSupportsThisEither"]


def test_invut_and_sdp01_keep_their_bodies() -> None:
    assert request("invut").headers.get("content-type") == "application/unknownformat"
    assert request("invut").body.startswith(b"<audio>")
    assert len(request("sdp01").body) == 150


def test_regaut01_keeps_the_unknown_authorization_raw() -> None:
    msg = request("regaut01")
    assert msg.headers.get("authorization") == "NoOneKnowsThisScheme opaque-data=here"


# --- reasons for the invalid ones -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("badinv01", "parameter"),
        ("clerr", "Content-Length"),
        ("ncl", "Content-Length"),
        ("scalar02", "CSeq"),
        ("quotbal", "quoted"),
        ("ltgtruri", "angle"),
        ("escruri", "Request-URI"),
        ("baddate", "Date"),
        ("regbadct", "addr-spec"),
        ("baddn", "display name"),
        ("mismatch01", "CSeq method"),
        ("bigcode", "status code"),
    ],
)
def test_invalid_reasons_name_the_problem(name: str, words: str) -> None:
    with pytest.raises(ParseError, match=words):
        parse(name)
