"""Requests and responses: parsing, validation, serialisation and responses (RFC 3261 §7, §8, §20).

Besides hand-written cases this file has two seeded loops: a round trip of generated messages
(serialise, parse, serialise again) and a fuzz loop that mutates the RFC 4475 messages and checks
that nothing but `ParseError` ever escapes the parser.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest

from softswitch.sip.errors import LocalProtocolError, MessageTooLarge, ParseError
from softswitch.sip.headers import Headers, render_entries
from softswitch.sip.message import (
    REASONS,
    Request,
    Response,
    SipMessage,
    header_value,
    new_request,
    parse_message,
    validate,
)
from softswitch.sip.uri import AbsoluteUri, SipUri, TelUri

RFC4475 = Path(__file__).resolve().parent.parent / "data" / "rfc4475"


def crlf(text: str) -> bytes:
    """A message written with `\\n` line ends, sent with CRLF."""
    return text.lstrip("\n").replace("\n", "\r\n").encode()


REGISTER = crlf("""
REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport
Max-Forwards: 70
From: "Alice" <sip:alice@example.com>;tag=1928301774
To: "Alice" <sip:alice@example.com>
Call-ID: a84b4c76e66710@pc33.example.com
CSeq: 2 REGISTER
Contact: <sip:alice@192.0.2.10:5060;transport=udp>;expires=3600
Expires: 3600
User-Agent: Phone/1.0 (build 7, rev 3)
Content-Length: 0

""")

INVITE_BODY = b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
INVITE = (
    crlf(f"""
INVITE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bK4b43c2ff8.1
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK74bf9;received=192.0.2.10;rport=5060
Max-Forwards: 69
From: "Alice" <sip:alice@example.com>;tag=9fxced76sl
To: <sip:bob@example.com>
Call-ID: 3848276298220188511@pc33.example.com
CSeq: 1 INVITE
Contact: <sip:alice@192.0.2.10:5060>
Content-Type: application/sdp
Content-Length: {len(INVITE_BODY)}

""")
    + INVITE_BODY
)


def req(data: bytes) -> Request:
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def with_header(data: bytes, old: str, new: str) -> bytes:
    assert old.encode() in data
    return data.replace(old.encode(), new.encode(), 1)


# --- parsing the basics ---------------------------------------------------------------------------


def test_register() -> None:
    msg = req(REGISTER)
    assert msg.method == "REGISTER"
    assert msg.uri == SipUri("example.com")
    assert msg.via.branch == "z9hG4bK776asdhds"
    assert msg.via.has_rport
    assert msg.from_.display == "Alice" and msg.from_.tag == "1928301774"
    assert msg.to.tag is None
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"
    assert (msg.cseq.seq, msg.cseq.method) == (2, "REGISTER")
    assert msg.max_forwards == 70
    assert msg.expires == 3600
    assert [c.param("expires") for c in msg.contacts] == ["3600"]
    assert not msg.is_star_contact
    assert msg.body == b""
    assert header_value(msg, "user-agent") == "Phone/1.0 (build 7, rev 3)"
    assert repr(msg) == "<Request REGISTER sip:example.com>"


def test_invite_with_body_and_two_vias() -> None:
    msg = req(INVITE)
    assert msg.body == INVITE_BODY
    assert [v.host for v in msg.vias] == ["proxy.example.com", "192.0.2.10"]
    assert msg.vias[1].param("rport") == "5060"
    assert msg.via is msg.vias[0]


def test_response() -> None:
    data = crlf("""
SIP/2.0 180 Ringing
Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK74bf9
From: <sip:alice@example.com>;tag=1
To: <sip:bob@example.com>;tag=2
Call-ID: x
CSeq: 1 INVITE
Content-Length: 0

""")
    msg = parse_message(data)
    assert isinstance(msg, Response)
    assert (msg.status, msg.reason) == (180, "Ringing")
    assert msg.max_forwards is None  # not required in responses
    assert repr(msg) == "<Response 180 Ringing>"
    assert msg.to_bytes() == data


def test_request_uri_schemes() -> None:
    assert isinstance(req(with_header(INVITE, "INVITE sip:", "INVITE sips:")).uri, SipUri)
    tel = req(with_header(INVITE, "INVITE sip:bob@example.com", "INVITE tel:+1-201-555-0123"))
    assert tel.uri == TelUri("+1-201-555-0123")
    urn = req(with_header(INVITE, "INVITE sip:bob@example.com", "INVITE urn:service:sos"))
    assert urn.uri == AbsoluteUri("urn", "service:sos")


def test_compact_forms_in_a_message() -> None:
    data = crlf("""
OPTIONS sip:bob@example.com SIP/2.0
v: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1
f: <sip:alice@example.com>;tag=1
t: sip:bob@example.com
i: compact@example.com
CSeq: 5 OPTIONS
m: <sip:alice@192.0.2.10>
k: path, outbound
c: text/plain
e: gzip
s: hello
o: presence
r: <sip:carol@example.com>
b: <sip:alice@example.com>
x: 1800
u: dialog
l: 2

hi""")
    msg = req(data)
    assert msg.via.branch == "z9hG4bK1"
    assert msg.from_.tag == "1"
    assert str(msg.to.uri) == "sip:bob@example.com"
    assert msg.call_id == "compact@example.com"
    assert str(msg.contacts[0].uri) == "sip:alice@192.0.2.10"
    h = msg.headers
    assert h.get_all("Supported") == ["path", "outbound"]
    expected = {
        "Content-Type": "text/plain",
        "Content-Encoding": "gzip",
        "Subject": "hello",
        "Event": "presence",
        "Refer-To": "<sip:carol@example.com>",
        "Referred-By": "<sip:alice@example.com>",
        "Session-Expires": "1800",
        "Allow-Events": "dialog",
    }
    for name, value in expected.items():
        assert h.get(name) == value
    assert msg.body == b"hi"
    assert b"\r\nv: SIP/2.0" in msg.to_bytes()  # names are written back as they came


def test_folded_lines_and_odd_whitespace() -> None:
    data = crlf(
        """
OPTIONS sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10
 ;branch=z9hG4bK1
From:<sip:alice@example.com>
\t;tag=1
To   :   <sip:bob@example.com>
Call-ID:x
CSeq: 5
   OPTIONS
Subject: a
 b
\t c
X-Empty:
X-Empty-Folded:
<SP>
Max-Forwards: 70

""".replace("<SP>", " ")
    )
    msg = req(data)
    assert msg.via.branch == "z9hG4bK1"
    assert msg.from_.tag == "1"
    assert msg.cseq.method == "OPTIONS"
    assert msg.headers.get("subject") == "a b c"
    assert msg.headers.get("x-empty") == ""
    assert msg.headers.get("x-empty-folded") == ""
    assert parse_message(msg.to_bytes()).headers.get("subject") == "a b c"


def test_header_names_are_case_insensitive() -> None:
    data = (
        REGISTER.replace(b"Via:", b"vIA:")
        .replace(b"Call-ID:", b"call-id:")
        .replace(b"CSeq:", b"CSEQ:")
        .replace(b"Max-Forwards:", b"max-FORWARDS:")
    )
    msg = req(data)
    assert msg.via.branch == "z9hG4bK776asdhds"
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"
    assert msg.cseq.seq == 2
    assert msg.max_forwards == 70


def test_lf_only_line_ends_are_accepted() -> None:
    head, _, body = INVITE.partition(b"\r\n\r\n")
    msg = req(head.replace(b"\r\n", b"\n") + b"\n\n" + body)
    assert msg.call_id == "3848276298220188511@pc33.example.com"
    assert msg.body == INVITE_BODY


def test_lf_head_ends_before_a_crlfcrlf_in_the_body() -> None:
    data = (
        crlf("""
MESSAGE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1
From: <sip:alice@example.com>;tag=1
To: <sip:bob@example.com>
Call-ID: x
CSeq: 1 MESSAGE
""").replace(b"\r\n", b"\n")
        + b"\n"
        + b"a\r\n\r\nb"
    )
    assert req(data).body == b"a\r\n\r\nb"


def test_mixed_line_ends() -> None:
    data = REGISTER.replace(b"Expires: 3600\r\n", b"Expires: 3600\n")
    assert req(data).expires == 3600


@pytest.mark.parametrize(
    "injection",
    ["Expires: 3600\rX-Injected: 1", "User-Agent: a\rb", "Expires: 3600\r\r"],
)
def test_bare_cr_is_rejected(injection: str) -> None:
    data = with_header(REGISTER, "Expires: 3600", injection)
    with pytest.raises(ParseError, match="bare CR"):
        parse_message(data)


def test_leading_crlfs_are_skipped() -> None:
    assert req(b"\r\n\r\n" + REGISTER).method == "REGISTER"


def test_unknown_headers_keep_order_and_spelling() -> None:
    data = with_header(
        REGISTER, "Expires: 3600", "X-Odd-Name: Value, with ; stuff\r\nExpires: 3600"
    )
    msg = req(data)
    names = [n for n, _ in msg.headers]
    assert names.index("X-Odd-Name") == names.index("Expires") - 1
    assert msg.headers.get("x-odd-name") == "Value, with ; stuff"
    assert b"X-Odd-Name: Value, with ; stuff\r\n" in msg.to_bytes()


# --- what validation refuses ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Via", "From", "To", "Call-ID", "CSeq"])
def test_missing_mandatory_header(name: str) -> None:
    lines = [ln for ln in REGISTER.split(b"\r\n") if not ln.startswith(name.encode() + b":")]
    with pytest.raises(ParseError, match="missing") as info:
        parse_message(b"\r\n".join(lines))
    assert info.value.status == 400


@pytest.mark.parametrize(
    "extra",
    [
        "From: <sip:x@y>;tag=2",
        "To: <sip:x@y>",
        "CSeq: 3 REGISTER",
        "Call-ID: other",
        "Max-Forwards: 5",
        "Expires: 60",
    ],
)
def test_second_single_valued_header(extra: str) -> None:
    with pytest.raises(ParseError):
        parse_message(with_header(REGISTER, "Content-Length: 0", extra + "\r\nContent-Length: 0"))


@pytest.mark.parametrize(
    ("old", "new", "status"),
    [
        ("CSeq: 2 REGISTER", "CSeq: 2 INVITE", 400),
        ("CSeq: 2 REGISTER", "CSeq: 2147483648 REGISTER", 400),
        ("CSeq: 2 REGISTER", "CSeq: 2147483647 REGISTER", None),
        ("Max-Forwards: 70", "Max-Forwards: 256", 400),
        ("Max-Forwards: 70", "Max-Forwards: 255", None),
        ("Max-Forwards: 70", "Max-Forwards: 0", None),
        ("Max-Forwards: 70", "Max-Forwards: -1", 400),
        ("Max-Forwards: 70", "Max-Forwards: ²", 400),
        ("Expires: 3600", "Expires: 4294967296", 400),
        ("Expires: 3600", "Expires: soon", 400),
        ("Call-ID: a84b4c76e66710@pc33.example.com", "Call-ID: two words", 400),
        ("Call-ID: a84b4c76e66710@pc33.example.com", "Call-ID:", 400),
        ("Content-Length: 0", "Content-Length: 0\r\nDate: Sat, 13 Nov 2010 23:29:00 GMT", None),
        ("Content-Length: 0", "Content-Length: 0\r\nDate: Sat, 13 Nov 2010 23:29:00 EST", 400),
        ("Content-Length: 0", "Content-Length: 0\r\nContact: *", 400),
        ("Content-Length: 0", "Content-Length: 0\r\nBad Name: x", 400),
        ("Content-Length: 0", "Content-Length: 0\r\nNoColon", 400),
        ("Content-Length: 0", "Content-Length: 0\r\n: no name", 400),
        ("Content-Length: 0", "Content-Length: 0\r\nVia", 400),
        ("Content-Length: 0", "Content-Length: 0\r\nX-Ünïcode: x", 400),
        ("Via: SIP/2.0/UDP", "Via: SIP/3.0/UDP", 505),
        ("REGISTER sip:example.com SIP/2.0", "REGISTER sip:example.com SIP/3.0", 505),
        ("REGISTER sip:example.com SIP/2.0", "REGISTER sip:example.com sip/2.0", None),
        ("REGISTER sip:example.com SIP/2.0", "REGISTER sip:example.com HTTP/1.1", 400),
        ("REGISTER sip:example.com SIP/2.0", "REGISTER  sip:example.com SIP/2.0", 400),
        ("REGISTER sip:example.com SIP/2.0", "REGISTER sip:example.com SIP/2.0 ", 400),
        ("REGISTER sip:example.com SIP/2.0", "REGISTER <sip:example.com> SIP/2.0", 400),
        ("REGISTER sip:example.com SIP/2.0", "REGISTER sip:example.com?a=b SIP/2.0", 400),
        ("REGISTER sip:example.com SIP/2.0", "REG:ISTER sip:example.com SIP/2.0", 400),
        ("REGISTER sip:example.com SIP/2.0", "REGISTER", 400),
    ],
)
def test_validation(old: str, new: str, status: int | None) -> None:
    data = with_header(REGISTER, old, new)
    if status is None:
        parse_message(data)
        return
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert info.value.status == status


@pytest.mark.parametrize(
    ("line", "status"),
    [
        ("SIP/2.0 1000 Big", 400),
        ("SIP/2.0 099 Small", 400),
        ("SIP/2.0 700 Odd", 400),
        ("SIP/2.0 2OO OK", 400),
        ("SIP/2.0 2²0 OK", 400),
        ("SIP/2.0", 400),
        ("SIP/3.0 200 OK", 505),
        ("sip/2.0 200 OK", None),
        ("SIP/2.0 200", None),
    ],
)
def test_status_lines(line: str, status: int | None) -> None:
    data = crlf(f"""
{line}
Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1
From: <sip:a@b>;tag=1
To: <sip:c@d>
Call-ID: x
CSeq: 1 INVITE

""")
    if status is None:
        assert isinstance(parse_message(data), Response)
        return
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert info.value.status == status


def test_star_contact() -> None:
    data = with_header(
        REGISTER, "Contact: <sip:alice@192.0.2.10:5060;transport=udp>;expires=3600", "Contact: *"
    )
    data = with_header(data, "Expires: 3600", "Expires: 0")
    msg = req(data)
    assert msg.is_star_contact
    assert msg.contacts == []
    mixed = with_header(data, "Contact: *", "Contact: *, <sip:a@b>")
    with pytest.raises(ParseError, match=r"\*"):
        parse_message(mixed)


def test_contact_lists() -> None:
    data = with_header(
        REGISTER,
        "Contact: <sip:alice@192.0.2.10:5060;transport=udp>;expires=3600",
        'Contact: "A, B" <sip:a@h1>;q=0.5, sip:b@h2;expires=60\r\nm: <sip:c@h3>',
    )
    msg = req(data)
    assert [str(c.uri) for c in msg.contacts] == ["sip:a@h1", "sip:b@h2", "sip:c@h3"]
    assert msg.contacts[0].display == "A, B"
    assert msg.contacts[1].param("expires") == "60"


# --- Content-Length and sizes ---------------------------------------------------------------------


def test_datagram_bytes_after_content_length_are_ignored() -> None:
    msg = req(INVITE + b"garbage after the body")
    assert msg.body == INVITE_BODY


def test_datagram_without_content_length_takes_the_rest() -> None:
    data = INVITE.replace(f"Content-Length: {len(INVITE_BODY)}\r\n".encode(), b"")
    assert req(data).body == INVITE_BODY


def test_content_length_larger_than_the_datagram() -> None:
    data = INVITE.replace(b"Content-Length: ", b"Content-Length: 9")
    with pytest.raises(ParseError, match="exceeds"):
        parse_message(data)


def test_equal_content_lengths_spelled_differently() -> None:
    data = with_header(REGISTER, "Content-Length: 0", "Content-Length: 0\r\nl: 00")
    assert req(data).body == b""


def test_max_size() -> None:
    assert req(INVITE)  # no limit by default
    assert req(INVITE) and parse_message(INVITE, max_size=len(INVITE))
    with pytest.raises(MessageTooLarge) as info:
        parse_message(INVITE, max_size=len(INVITE) - 1)
    assert (info.value.status, info.value.size, info.value.limit) == (
        513,
        len(INVITE),
        len(INVITE) - 1,
    )
    assert isinstance(info.value, ParseError)


def test_no_blank_line_at_all_is_a_datagram_without_body() -> None:
    assert req(REGISTER.rstrip(b"\r\n")).body == b""


# --- serialising ----------------------------------------------------------------------------------


def test_to_bytes_writes_content_length_where_it_was() -> None:
    msg = req(INVITE)
    msg.body = b"v=0\r\n"
    out = msg.to_bytes()
    assert b"Content-Length: 5\r\n" in out
    assert out.endswith(b"\r\n\r\nv=0\r\n")
    names = [n for n, _ in msg.headers]
    assert names.index("Content-Length") == names.index("Content-Type") + 1


def test_to_bytes_adds_a_missing_content_length() -> None:
    msg = new_request(
        "OPTIONS",
        "sip:bob@example.com",
        [
            ("Via", "SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1"),
            ("From", "<sip:a@b>;tag=1"),
            ("To", "<sip:bob@example.com>"),
            ("Call-ID", "x"),
            ("CSeq", "1 OPTIONS"),
            ("Max-Forwards", "70"),
        ],
    )
    out = msg.to_bytes()
    assert out.startswith(b"OPTIONS sip:bob@example.com SIP/2.0\r\nVia: ")
    assert out.endswith(b"Content-Length: 0\r\n\r\n")
    assert parse_message(out).to_bytes() == out


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\r\n b"])
def test_cr_or_lf_in_a_value_is_refused_on_output(value: str) -> None:
    msg = req(REGISTER)
    msg.headers.set("Subject", value)
    with pytest.raises(LocalProtocolError):
        msg.to_bytes()


def test_a_composers_wire_form_is_sent_as_is_until_a_field_changes() -> None:
    msg = req(REGISTER)
    rendered = msg.to_bytes()
    entries = list(msg.headers._items)
    wired = Request(msg.method, msg.uri, Headers(list(entries)), msg.body)
    wired.headers.set_wire(render_entries(entries), len(msg.body))
    assert wired.to_bytes() == rendered
    # what it sends is the composer's text, not a fresh rendering (a marker shows it)...
    wired.headers.set_wire(render_entries(entries).replace("Phone/1.0", "Phone/9.9"), 0)
    assert b"Phone/9.9" in wired.to_bytes()
    # ...only for the body length it was rendered for...
    wired.body = b"x"
    assert b"Phone/9.9" not in wired.to_bytes()
    # ...and a change to the fields drops it
    wired.body = b""
    wired.headers.set_wire(render_entries(entries).replace("Phone/1.0", "Phone/9.9"), 0)
    wired.headers.add("Subject", "s")
    out = wired.to_bytes()
    assert b"Phone/9.9" not in out and b"Subject: s\r\n" in out


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
def test_a_wire_form_is_checked_where_it_is_rendered(value: str) -> None:
    with pytest.raises(LocalProtocolError):
        render_entries([("subject", "Subject", value)])
    # the start line is still checked on output
    msg = req(REGISTER)
    msg.headers.set_wire(render_entries(list(msg.headers._items)), len(msg.body))
    msg.method = "REGISTER" + value
    with pytest.raises(LocalProtocolError):
        msg.to_bytes()


def test_cr_or_lf_in_a_reason_phrase_is_refused_on_output() -> None:
    resp = req(REGISTER).make_response(200, "OK\r\nX-Injected: 1")
    with pytest.raises(LocalProtocolError):
        resp.to_bytes()


def test_non_utf8_bytes_survive_a_round_trip() -> None:
    data = REGISTER.replace(b"Phone/1.0 (build 7, rev 3)", b"caf\xe9 \xff\xfe")  # Latin-1, junk
    msg = req(data)
    assert msg.headers.get("user-agent") == "caf\udce9 \udcff\udcfe"
    assert msg.to_bytes() == data


# --- make_response --------------------------------------------------------------------------------


def test_make_response_copies_the_right_headers_in_order() -> None:
    data = with_header(
        INVITE,
        "Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bK4b43c2ff8.1",
        "Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bK4b43c2ff8.1, SIP/2.0/TCP p2;branch=z9hG4bK2",  # noqa: E501
    )
    request = req(data)
    resp = request.make_response(180)
    assert (resp.status, resp.reason) == (180, "Ringing")
    assert resp.headers.get_all("via") == request.headers.get_all("via")
    assert [v.branch for v in resp.vias] == ["z9hG4bK4b43c2ff8.1", "z9hG4bK2", "z9hG4bK74bf9"]
    assert [n for n, _ in resp.headers] == ["Via", "Via", "From", "To", "Call-ID", "CSeq"]
    assert resp.call_id == request.call_id
    assert resp.cseq == request.cseq
    assert resp.from_ == request.from_
    assert resp.body == b""
    again = parse_message(resp.to_bytes())
    assert isinstance(again, Response)
    assert again.to_bytes() == resp.to_bytes()
    assert request.headers.get("contact") is not None  # the request is left alone
    assert "contact" not in resp.headers


def test_make_response_adds_the_to_tag_once() -> None:
    request = req(INVITE)
    ok = request.make_response(200, to_tag="abc")
    assert ok.to.tag == "abc"
    assert ok.headers.get("to") == "<sip:bob@example.com>;tag=abc"
    assert request.to.tag is None  # the request's To is unchanged
    # a request that already has a To tag (in-dialog) keeps it
    in_dialog = req(
        with_header(INVITE, "To: <sip:bob@example.com>", "To: <sip:bob@example.com>;tag=xyz")
    )
    assert in_dialog.make_response(200, to_tag="abc").to.tag == "xyz"
    assert in_dialog.make_response(200, to_tag="abc").headers.count("to") == 1


def test_make_response_never_tags_a_100() -> None:
    trying = req(INVITE).make_response(100, to_tag="abc")
    assert trying.to.tag is None
    assert trying.reason == "Trying"


def test_make_response_reasons() -> None:
    request = req(INVITE)
    assert request.make_response(486).reason == "Busy Here"
    assert request.make_response(499).reason == "Unknown"
    assert request.make_response(603, "No Thanks").reason == "No Thanks"
    assert all(100 <= code <= 699 for code in REASONS)
    for bad in (99, 700, 0, 1000):
        with pytest.raises(LocalProtocolError):
            request.make_response(bad)


def test_validate_on_a_composed_message() -> None:
    msg = new_request("OPTIONS", "sip:x@y", [("Via", "SIP/2.0/UDP h;branch=z9hG4bK1")])
    with pytest.raises(ParseError, match="missing from"):
        validate(msg)
    msg = new_request(
        "OPTIONS",
        "sip:x@y",
        [
            ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
            ("From", "<sip:a@b>;tag=1"),
            ("To", "<sip:x@y>"),
            ("Call-ID", "c"),
            ("CSeq", "1 OPTIONS"),
        ],
    )
    validate(msg)
    assert msg.cseq.seq == 1


# --- round trip of generated messages -------------------------------------------------------------

TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
TEXT = TOKEN + ' ,;:=<>@"/\\()[]{}?\tйé日本'


def rtoken(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice(TOKEN) for _ in range(rng.randint(1, n)))


def rhost(rng: random.Random) -> str:
    return rng.choice(
        [
            "example.com",
            f"h{rng.randint(0, 99)}.example.net",
            f"192.0.2.{rng.randint(1, 254)}",
            "[2001:db8::" + f"{rng.randint(1, 0xFFFF):x}" + "]",
        ]
    )


def rsip_uri(rng: random.Random) -> str:
    user = rng.choice(["", "alice@", "+1-212-555-1212@", "a%20b@", "bob:pw@"])
    port = rng.choice(["", f":{rng.randint(1, 65535)}"])
    params = "".join(
        rng.choice([";lr", ";transport=tcp", ";maddr=192.0.2.1", ";x=y"])
        for _ in range(rng.randint(0, 3))
    )
    headers = rng.choice(["", "?subject=hi%20there&priority=urgent"])
    return f"{rng.choice(['sip', 'sips'])}:{user}{rhost(rng)}{port}{params}{headers}"


def rdisplay(rng: random.Random) -> str:
    text = "".join(rng.choice(TEXT.replace("\t", "")) for _ in range(rng.randint(0, 12)))
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '" '


def rname_addr(rng: random.Random, tag: bool) -> str:
    disp = rng.choice(["", rdisplay(rng), "Token Name "])
    out = f"{disp}<{rsip_uri(rng)}>"
    if tag:
        out += f";tag={rtoken(rng)}"
    if rng.random() < 0.3:
        out += ';x="quoted;value, with <stuff>"'
    return out


def rvia(rng: random.Random) -> str:
    port = rng.choice(["", ":5060", ":5071"])
    extra = rng.choice(["", ";rport", ";received=192.0.2.9;rport=4000"])
    return f"SIP/2.0/{rng.choice(['UDP', 'TCP', 'TLS', 'WS'])} {rhost(rng)}{port};branch=z9hG4bK{rtoken(rng)}{extra}"  # noqa: E501


def random_message(rng: random.Random) -> SipMessage:
    method = rng.choice(["INVITE", "REGISTER", "OPTIONS", "BYE", rtoken(rng)])
    vias = [rvia(rng) for _ in range(rng.randint(1, 4))]
    headers: list[tuple[str, str]] = []
    if rng.random() < 0.5:
        headers.append(("Via", ", ".join(vias)))
    else:
        headers += [("v" if rng.random() < 0.3 else "Via", v) for v in vias]
    headers += [
        ("Max-Forwards", str(rng.randint(0, 255))),
        (rng.choice(["From", "f"]), rname_addr(rng, True)),
        (rng.choice(["To", "t"]), rname_addr(rng, rng.random() < 0.5)),
        (rng.choice(["Call-ID", "i"]), rtoken(rng, 30) + "@" + rhost(rng)),
        ("CSeq", f"{rng.randint(0, 2**31 - 1)} {method}"),
    ]
    for _ in range(rng.randint(0, 3)):
        headers.append(
            ("Contact", ", ".join(rname_addr(rng, False) for _ in range(rng.randint(1, 3))))
        )
    for _ in range(rng.randint(0, 4)):
        value = "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 40))).strip(" \t")
        headers.append(("X-" + rtoken(rng), value))
    rng.shuffle(headers)
    body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 10, 300])))
    if rng.random() < 0.3:
        request = new_request(method, rsip_uri(rng).partition("?")[0], headers, body)
        validate(request)
        reason = "".join(rng.choice(TEXT.replace("\t", "")) for _ in range(rng.randint(0, 20)))
        resp = request.make_response(rng.randint(100, 699), reason.strip(" "), to_tag=rtoken(rng))
        resp.body = body
        return resp
    return new_request(method, rsip_uri(rng).partition("?")[0], headers, body)


def test_serialise_parse_round_trip() -> None:
    rng = random.Random(3261)
    for _ in range(300):
        msg = random_message(rng)
        wire = msg.to_bytes()
        parsed = parse_message(wire)
        assert type(parsed) is type(msg)
        assert list(parsed.headers) == list(msg.headers)
        assert parsed.body == msg.body
        assert parsed.to_bytes() == wire
        assert [str(v) for v in parsed.vias] == [str(v) for v in msg.vias]
        assert parsed.from_ == msg.from_
        assert parsed.to == msg.to
        assert parsed.contacts == msg.contacts
        if isinstance(msg, Request):
            assert isinstance(parsed, Request)
            assert (parsed.method, parsed.uri) == (msg.method, msg.uri)
        else:
            assert isinstance(parsed, Response)
            assert (parsed.status, parsed.reason) == (msg.status, msg.reason)


# --- fuzz: nothing but ParseError escapes ---------------------------------------------------------

SPICE = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b";", b",", b"<", b">", b'"', b"\\", b"@", b"[",
    b"]", b"%", b"=", b"?", b"/", b"\x00", b"\xff", b"\xc3", "²".encode(), "٣".encode(),
    "\u00a0".encode(), b"0", b"9" * 12, b"-1", b"SIP/2.0", b"sip:", b"tel:", b"\r\n ", b"\r\n\r\n",
]  # fmt: skip


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0:
            del b[i : i + rng.randint(1, 8)]
        elif op == 1:
            b[i:i] = rng.choice(SPICE)
        elif op == 2 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 3:
            del b[i:]
        else:
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[j : j + rng.randint(1, 20)]
    return bytes(b)


def test_fuzz_only_parse_error_escapes() -> None:
    corpus = [p.read_bytes() for p in sorted(RFC4475.glob("*.dat"))] + [REGISTER, INVITE]
    rng = random.Random(4475)
    parsed = 0
    for i in range(4000):  # a fixed count, not a time budget: the same cases on any machine
        data = mutate(rng, rng.choice(corpus))
        try:
            msg = parse_message(data, stream=i % 4 == 0)
        except ParseError:
            continue
        parsed += 1
        # whatever parses serialises, and parses again to the same bytes
        wire = msg.to_bytes()
        assert parse_message(wire).to_bytes() == wire
        if isinstance(msg, Request):
            msg.make_response(200, to_tag="t").to_bytes()
    assert parsed > 50  # the mutations leave enough valid messages to exercise the happy path


def test_truncations_only_raise_parse_error() -> None:
    for path in sorted(RFC4475.glob("*.dat")):
        data = path.read_bytes()
        for end in range(0, len(data), 7):
            with contextlib.suppress(ParseError):
                parse_message(data[:end])


def test_every_status_is_a_valid_http_like_code() -> None:
    for path in sorted(RFC4475.glob("*.dat")):
        try:
            parse_message(path.read_bytes())
        except ParseError as exc:
            assert exc.status in (400, 505, 513)


def test_headers_object_is_shared_not_copied() -> None:
    msg = req(REGISTER)
    assert isinstance(msg.headers, Headers)
    msg.headers.set("Expires", "60")
    assert msg.expires == 60  # the cache follows the change
