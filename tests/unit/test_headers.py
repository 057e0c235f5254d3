"""Header fields: the container, the lexical helpers and the typed values (RFC 3261 §7.3, §20)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from softswitch.sip import headers, syntax
from softswitch.sip.errors import ParseError
from softswitch.sip.headers import (
    CSeq,
    Headers,
    NameAddr,
    Via,
    canonical_name,
    header_key,
    parse_cseq,
    parse_name_addr,
    parse_name_addr_list,
    parse_uint,
    parse_via,
    split_list,
)
from softswitch.sip.syntax import (
    find_param,
    format_params,
    is_token,
    parse_params,
    quote,
    quoted_end,
    split_outside,
    unquote,
)
from softswitch.sip.uri import AbsoluteUri, SipUri, TelUri

# --- names ----------------------------------------------------------------------------------------

COMPACT = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via",
    "o": "event", "r": "refer-to", "b": "referred-by", "x": "session-expires",
    "u": "allow-events",
}  # fmt: skip


@pytest.mark.parametrize(("short", "key"), COMPACT.items())
def test_compact_forms(short: str, key: str) -> None:
    assert header_key(short) == key
    assert header_key(short.upper()) == key
    h = Headers()
    h.add(short, "x")
    assert h.get(key) == "x"
    assert h.get(canonical_name(key)) == "x"
    assert short in h and key.upper() in h


def test_names_are_case_insensitive() -> None:
    h = Headers.of([("cALL-iD", "abc"), ("MAX-forwards", "70")])
    assert h.get("Call-ID") == "abc"
    assert h.get("call-id") == "abc"
    assert h.get("i") == "abc"
    assert h.get("Max-Forwards") == "70"
    assert h.get("Missing") is None


def test_names_written_out() -> None:
    h = Headers.of([("v", "SIP/2.0/UDP h"), ("call-id", "x"), ("X-Custom-thing", "y")])
    assert list(h) == [("Via", "SIP/2.0/UDP h"), ("Call-ID", "x"), ("X-Custom-thing", "y")]
    assert canonical_name("x-foo-bar") == "X-Foo-Bar"
    assert canonical_name("www-authenticate") == "WWW-Authenticate"


# --- the container --------------------------------------------------------------------------------


def test_list_headers_split_on_commas_outside_quotes_and_brackets() -> None:
    h = Headers()
    h.add("Via", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/TCP b;branch=z9hG4bK2")
    h.add("v", "SIP/2.0/UDP c;branch=z9hG4bK3")
    h.add("Contact", '"Doe, John" <sip:j@x;a=b,c>;q=0.5, <sip:k@y>')
    h.add("Route", "<sip:p1;lr>,<sip:p2;lr>")
    h.add("Route", "<sip:p3;lr>")
    assert h.get_all("via") == [
        "SIP/2.0/UDP a;branch=z9hG4bK1",
        "SIP/2.0/TCP b;branch=z9hG4bK2",
        "SIP/2.0/UDP c;branch=z9hG4bK3",
    ]
    assert h.get_all("m") == ['"Doe, John" <sip:j@x;a=b,c>;q=0.5', "<sip:k@y>"]
    assert h.get_all("route") == ["<sip:p1;lr>", "<sip:p2;lr>", "<sip:p3;lr>"]
    assert h.count("route") == 2  # field lines, not values
    assert h.get_each("route") == ["<sip:p1;lr>,<sip:p2;lr>", "<sip:p3;lr>"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WWW-Authenticate", 'Digest realm="example.com", nonce="abc", qop="auth,auth-int"'),
        ("Authorization", 'Digest username="a", realm="b", uri="sip:x", response="0"'),
        ("Date", "Sat, 13 Nov 2010 23:29:00 GMT"),
        ("User-Agent", "Phone/1.0 (build 7, rev 3)"),
        ("Subject", "lunch, then a meeting"),
    ],
)
def test_other_headers_never_split(name: str, value: str) -> None:
    h = Headers.of([(name, value)])
    assert h.get_all(name) == [value]


def test_split_list_drops_empty_elements() -> None:
    assert split_list(["a,,b", "", " c , "]) == ["a", "b", "c"]


def test_add_first_set_remove() -> None:
    h = Headers.of([("Via", "v1"), ("To", "t"), ("Via", "v2"), ("Route", "r")])
    h.add_first("Via", "v0")
    assert h.get_all("via") == ["v0", "v1", "v2"]
    assert [n for n, _ in h][:2] == ["Via", "Via"]
    h.add_first("Record-Route", "rr")  # none yet: goes first
    assert next(iter(h)) == ("Record-Route", "rr")
    h.set("Via", "only")
    assert h.get_all("via") == ["only"]
    assert [n for n, _ in h] == ["Record-Route", "Via", "To", "Route"]
    h.set("Expires", "60")
    assert list(h)[-1] == ("Expires", "60")
    h.remove("route")
    assert "Route" not in h
    assert len(h) == 4


def test_remove_first_value() -> None:
    h = Headers.of([("Via", "a, b"), ("Via", "c")])
    assert h.remove_first_value("via") == "a"
    assert h.get_all("via") == ["b", "c"]
    assert h.remove_first_value("via") == "b"
    assert h.remove_first_value("via") == "c"
    assert h.remove_first_value("via") is None
    assert "via" not in h


def test_parsed_values_are_cached_until_the_header_changes() -> None:
    h = Headers.of([("CSeq", "1 INVITE")])
    calls: list[int] = []

    def parse(hs: Headers) -> CSeq:
        calls.append(1)
        return parse_cseq(hs.get("cseq") or "")

    assert h.parsed("cseq", parse).seq == 1
    assert h.parsed("CSeq", parse).seq == 1
    assert len(calls) == 1
    h.set("CSeq", "2 INVITE")
    assert h.parsed("cseq", parse).seq == 2
    assert len(calls) == 2
    h.add("To", "<sip:x>")  # another header: the cache stays
    h.parsed("cseq", parse)
    assert len(calls) == 2


def test_cached_none_is_a_hit() -> None:
    h = Headers()
    calls: list[int] = []

    def parse(hs: Headers) -> None:
        calls.append(1)

    h.parsed("expires", parse)
    h.parsed("expires", parse)
    assert calls == [1]


def test_copy_is_independent() -> None:
    h = Headers.of([("To", "a")])
    c = h.copy()
    c.set("To", "b")
    assert h.get("to") == "a"
    assert c.get("to") == "b"


def test_serialize() -> None:
    h = Headers.of([("v", "x"), ("To", "y")])
    assert h.serialize() == "Via: x\r\nTo: y\r\n"


# --- lexical helpers ------------------------------------------------------------------------------


def test_tokens() -> None:
    assert is_token("INVITE")
    assert is_token("!interesting-Method0123456789_*+`.%indeed'~")
    for bad in ("", "IN VITE", "a:b", "a;b", "é", "a\x00", "(x)", 'a"'):
        assert not is_token(bad)


def test_quoting() -> None:
    assert quote('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert unquote(quote('a "b" \\c')) == 'a "b" \\c'
    assert quoted_end('"a\\"b" rest', 0) == 6
    with pytest.raises(ParseError):
        quoted_end('"abc', 0)
    with pytest.raises(ParseError):
        quoted_end('"abc\\"', 0)


def test_split_outside() -> None:
    assert list(split_outside("a,b", ",")) == ["a", "b"]
    assert list(split_outside("ab", ",")) == ["ab"]
    assert list(split_outside('"x,y",<a,b>,c', ",")) == ['"x,y"', "<a,b>", "c"]
    assert list(split_outside('"x\\",y",z', ",")) == ['"x\\",y"', "z"]
    assert list(split_outside("a;b=<c;d>;e", ";")) == ["a", "b=<c;d>", "e"]
    assert list(split_outside("a>,b", ",")) == ["a>", "b"]  # a stray '>' is just a character
    with pytest.raises(ParseError):
        list(split_outside('"open, b', ","))


def test_parse_params() -> None:
    assert parse_params('a;b=1;c="x;y";d=[::1]', "t") == [
        ("a", None),
        ("b", "1"),
        ("c", '"x;y"'),
        ("d", "[::1]"),
    ]
    assert parse_params(" a = 1 ;  b ", "t") == [("a", "1"), ("b", None)]
    for bad in ("", ";", "a;;b", "a;", "a=", "a=b c", 'a="x', 'a="x"y', "a=<b>", "=b", "a b"):
        with pytest.raises(ParseError):
            parse_params(bad, "t")


def test_format_and_find_params() -> None:
    params = (("Lr", None), ("transport", "TCP"))
    assert format_params(params) == ";Lr;transport=TCP"
    assert find_param(params, "lr") == (True, None)
    assert find_param(params, "TRANSPORT") == (True, "TCP")
    assert find_param(params, "ttl") == (False, None)


# --- Via ------------------------------------------------------------------------------------------


def test_via_basic() -> None:
    via = parse_via("SIP/2.0/UDP pc33.atlanta.com:5066;branch=z9hG4bK776asdhds;received=192.0.2.1")
    assert via == Via(
        "UDP", "pc33.atlanta.com", 5066, (("branch", "z9hG4bK776asdhds"), ("received", "192.0.2.1"))
    )
    assert via.branch == "z9hG4bK776asdhds"
    assert via.param("received") == "192.0.2.1"
    assert not via.has_rport
    assert via.sent_by == "pc33.atlanta.com:5066"
    assert (
        str(via) == "SIP/2.0/UDP pc33.atlanta.com:5066;branch=z9hG4bK776asdhds;received=192.0.2.1"
    )


def test_via_rport_empty_and_valued() -> None:
    via = parse_via("SIP/2.0/UDP 192.0.2.1;rport;branch=z9hG4bK1")
    assert via.has_rport
    assert via.param("rport") is None
    answered = via.with_params(received="203.0.113.9", rport="5062")
    assert answered.param("rport") == "5062"
    assert str(answered) == "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1;received=203.0.113.9;rport=5062"


def test_via_lws_and_case() -> None:
    via = parse_via("sip / 2.0 / tcp   Host.Example.com : 5070 ; branch = z9hG4bKx ;rport")
    assert (via.transport, via.host, via.port) == ("TCP", "Host.Example.com", 5070)
    assert via.branch == "z9hG4bKx"
    assert via.has_rport
    assert via.sent_by == "host.example.com:5070"


def test_via_ipv6_and_default_ports() -> None:
    via = parse_via("SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bK2;received=[2001:db8::1]")
    assert via.host == "[2001:db8::9]"
    assert via.param("received") == "[2001:db8::1]"
    assert parse_via("SIP/2.0/TLS h").sent_by == "h:5061"
    assert parse_via("SIP/2.0/UDP h").sent_by == "h:5060"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
        "SIP/2.0 host",
        "SIP/2.0/UDP host:",
        "SIP/2.0/UDP host:99999",
        "SIP/2.0/UDP host:5o60",
        "SIP/2.0/UDP host:5²",
        "SIP/2.0/UDP host extra",
        "SIP/2.0/UDP host;",
        "SIP/2.0/UDP host;;branch=1",
        "SIP/2.0/UDP host;branch=",
        "SIP/2.0/UDP [::1",
        "SIP/2.0/UDP [::zz]",
        "SIP/2.0/UDP -host",
        "SIP/2.0/U;DP host",
        "HTTP/2.0/UDP host",
        "SIP/2.0/UDP ho<st",
    ],
)
def test_invalid_vias(text: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_via(text)
    assert info.value.status == 400


def test_via_with_other_version_is_505() -> None:
    with pytest.raises(ParseError) as info:
        parse_via("SIP/3.0/UDP host;branch=z9hG4bK1")
    assert info.value.status == 505
    with pytest.raises(ParseError) as info:
        parse_via("SIP / 7.0 / UDP host extra garbage")
    assert info.value.status == 505


# --- CSeq -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seq", "method"),
    [
        ("1 INVITE", 1, "INVITE"),
        ("0 REGISTER", 0, "REGISTER"),
        ("  0009   ACK  ", 9, "ACK"),
        ("2147483647 BYE", 2**31 - 1, "BYE"),
        ("1\tOPTIONS", 1, "OPTIONS"),
    ],
)
def test_cseq(text: str, seq: int, method: str) -> None:
    assert parse_cseq(text) == CSeq(seq, method)


@pytest.mark.parametrize(
    "text",
    [
        "2147483648 INVITE",  # 2**31: out of range (§8.1.1.5)
        "4294967296 INVITE",
        "36893488147419103232 REGISTER",
        "-1 INVITE",
        "1",
        "INVITE",
        "1 INVITE extra",
        "1 IN;VITE",
        "1.5 INVITE",
        "² INVITE",
        "1\xa0INVITE",
        "",
    ],
)
def test_invalid_cseq(text: str) -> None:
    with pytest.raises(ParseError):
        parse_cseq(text)


# --- name-addr / addr-spec ------------------------------------------------------------------------


def test_name_addr_forms() -> None:
    a = parse_name_addr('"Alice Smith" <sip:alice@atlanta.com;transport=tcp>;tag=1928301774')
    assert a.display == "Alice Smith"
    assert isinstance(a.uri, SipUri)
    assert a.uri.param("transport") == "tcp"
    assert a.tag == "1928301774"
    b = parse_name_addr("Bob <sip:bob@biloxi.com>")
    assert (b.display, b.params) == ("Bob", ())
    c = parse_name_addr("<sip:carol@chicago.com>;expires=60;q=0.5")
    assert c.display is None
    assert (c.param("expires"), c.param("q")) == ("60", "0.5")
    assert str(c) == "<sip:carol@chicago.com>;expires=60;q=0.5"


def test_addr_spec_parameters_belong_to_the_header() -> None:
    a = parse_name_addr("sip:alice@atlanta.com;tag=88;transport=tcp")
    assert str(a.uri) == "sip:alice@atlanta.com"
    assert a.params == (("tag", "88"), ("transport", "tcp"))
    b = parse_name_addr("<sip:alice@atlanta.com;transport=tcp>;tag=88")
    assert isinstance(b.uri, SipUri)
    assert b.uri.params == (("transport", "tcp"),)
    assert b.params == (("tag", "88"),)


def test_addr_spec_with_quoted_parameter_holding_brackets() -> None:
    a = parse_name_addr('sip:a@b;foo="<x>";tag=1')
    assert str(a.uri) == "sip:a@b"
    assert a.params == (("foo", '"<x>"'), ("tag", "1"))


def test_quoted_display_names() -> None:
    assert parse_name_addr('"Doe, John" <sip:j@x>').display == "Doe, John"
    assert parse_name_addr('"say \\"hi\\"" <sip:j@x>').display == 'say "hi"'
    assert parse_name_addr('"back\\\\slash" <sip:j@x>').display == "back\\slash"
    assert parse_name_addr('"" <sip:j@x>').display == ""
    assert parse_name_addr('"Zoë 日本"<sip:j@x>').display == "Zoë 日本"
    assert parse_name_addr("  multiple   token words   <sip:j@x>").display == "multiple token words"


def test_name_addr_str_round_trip() -> None:
    for text in [
        '"say \\"hi\\", ok" <sip:j@x>;tag=1',
        "<sip:j@x;lr>",
        '"A" <tel:+1-201-555-0123>',
        "<urn:service:sos>;q=1",
    ]:
        a = parse_name_addr(text)
        assert parse_name_addr(str(a)) == a
    assert str(parse_name_addr("sip:j@x;tag=1")) == "<sip:j@x>;tag=1"


def test_other_uri_schemes_in_name_addr() -> None:
    assert parse_name_addr("<tel:+1234>;tag=x").uri == TelUri("+1234")
    assert parse_name_addr("isbn:2983792873").uri == AbsoluteUri("isbn", "2983792873")
    with pytest.raises(ParseError):
        _ = parse_name_addr("<tel:+1234>").sip_uri
    assert parse_name_addr("<sip:a@b>").sip_uri.host == "b"


def test_with_params() -> None:
    a = parse_name_addr("<sip:a@b>;tag=1;q=0.5")
    assert str(a.with_params(tag="2")) == "<sip:a@b>;q=0.5;tag=2"
    assert a.has_param("Q") and not a.has_param("expires")


def test_name_addr_list() -> None:
    assert parse_name_addr_list(["<sip:a@b>", "sip:c@d"]) == [
        NameAddr(SipUri("b", "a")),
        NameAddr(SipUri("d", "c")),
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('"Watson, Thomas" < sip:t.watson@example.org >', "URI"),  # badaspec
        ("Watson, Thomas <sip:t.watson@example.org>", "display name"),  # baddn
        ('"Mr. J. User <sip:j.user@example.com>', "quoted"),  # quotbal
        ("sip:user@example.com?Route=%3Csip:sip.example.com%3E", "addr-spec"),  # regbadct
        ('"Joe" <sip:joe@example.org>;;;;', "parameter"),  # badinv01
        ('"Joe" sip:joe@example.org', "<uri>"),
        ("<sip:joe@example.org", "<...>"),
        ("sip:joe@example.org>", "'>'"),
        ("<sip:joe@example.org> junk", "after URI"),
        ("<>", "URI"),
        ("", "URI"),
        ("Joe <sip:a@b> <sip:c@d>", None),
        ('"a"b" <sip:x@y>', None),
        ("sip:a@b, sip:c@d", "addr-spec"),
    ],
)
def test_invalid_name_addrs(text: str, why: str | None) -> None:
    with pytest.raises(ParseError, match=why):
        parse_name_addr(text)


# --- numbers --------------------------------------------------------------------------------------


def test_parse_uint() -> None:
    assert parse_uint(" 70 ", "Max-Forwards", 255) == 70
    assert parse_uint("0", "Expires") == 0
    assert parse_uint("4294967295", "Expires") == 2**32 - 1
    for bad in ("", "-1", "+1", "1.0", "256", "0x10", "²", "٣", "1 2", "9" * 13):
        with pytest.raises(ParseError):
            parse_uint(bad, "Max-Forwards", 255)


# --- the string-method fast paths agree with the grammar ----------------------------------------


def _outcome(fn: Callable[[str], object], text: str) -> object:
    """What `fn` makes of `text`: its value, or the status of the ParseError it raises."""
    try:
        return fn(text)
    except ParseError as exc:
        return ("error", exc.status)


def test_plain_params_agree_with_the_grammar_fuzzed() -> None:
    rng = random.Random(3261)
    alphabet = ["a", "B", "9", "=", ";", " ", "\t", '"', "\\", "-", ",", "<", "é", "\r", ":"]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        plain = syntax.plain_params(text)
        if plain is not None:
            assert plain == syntax._grammar_params(text, "x"), text
        assert _outcome(lambda t: parse_params(t, "x"), text) == _outcome(
            lambda t: syntax._grammar_params(t, "x"), text
        ), text


@pytest.mark.parametrize(
    "text",
    [
        "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1;rport",
        "SIP/2.0/udp host.example.com;received=10.0.0.1",
        "SIP/2.0/TCP h:65536;branch=x",
        "SIP/2.0/TCP h:0",
        "SIP/2.0/UDP -h;branch=x",
        "SIP/2.0/UDP h-;branch=x",
        "SIP/2.0/UDP [::1]:5060;branch=x",
        "SIP/2.0/UDP h:5060;",
        "SIP/2.0/UDP h:5060;;a",
        "SIP/2.0/UDP h:50a0",
        "SIP/2.0/UDP h:\uff10",  # a digit, but not an ASCII one
        "SIP/2.0/UDP h:123456",
        "SIP/2.0/ UDP h",
        "SIP/2.0/UDP  h",
        "SIP/3.0/UDP h",
        "sip/2.0/UDP h",
        "SIP/2.0/UDP h ;branch=x",
        'SIP/2.0/UDP h:5060;branch="q"',
        "SIP/2.0/UDP h:5060;maddr=[::1]",
        "SIP/2.0/U@P h",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
    ],
)
def test_plain_via_agrees_with_the_grammar(text: str) -> None:
    assert _outcome(headers._parse_via, text) == _outcome(headers._grammar_via, text)


def test_plain_via_agrees_with_the_grammar_fuzzed() -> None:
    rng = random.Random(5060)
    pieces = ["SIP/2.0/UDP ", "SIP/2.0/", "UDP", " ", "h", "1.2", ":", "5060", "99999", ";",
              "branch=z9", "rport", "=", '"', "[::1]", "-", "\t", "é", ",", "x"]  # fmt: skip
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 9)))
        if rng.random() < 0.7:
            text = "SIP/2.0/UDP " + text
        assert _outcome(headers._parse_via, text) == _outcome(headers._grammar_via, text), text


@pytest.mark.parametrize(
    "text",
    [
        "<sip:1001@127.0.0.1>",
        "<sip:1001@127.0.0.1:5060;transport=udp>;tag=abc;expires=60",
        '"Alice Exec" <sip:1001@127.0.0.1>;tag=1',
        '"Alice Exec"<sip:1001@127.0.0.1>',
        '""  <sip:a@b>',
        '"" <sip:a@b>',
        '"a\\"b" <sip:a@b>',
        "sipp <sip:sipp@127.0.0.1:5061>;tag=1",
        "  Bob  the Phone <sip:b@h>",
        "Bob, Jr <sip:b@h>",
        "<sip:a@b> ;tag=1",
        "<sip:a@b>;",
        "<sip:a@b>;;x",
        "<sip:a@b>x",
        "<sip:a b@h>",
        "<sip:a\u3000b@h>",
        "<sip:a\x1cb@h>",
        "<>",
        "<sip:a@b",
        '"unterminated <sip:a@b>',
        "sip:a@b;tag=1",
        '<sip:a@b;lr>;tag="q"',
        "<sip:a@b>;tag=1 ",
        "<tel:+15550101001>",
        "<sip:a@[::1]:5060>",
    ],
)
def test_plain_name_addr_agrees_with_the_grammar(text: str) -> None:
    assert _outcome(headers._parse_name_addr, text) == _outcome(headers._grammar_name_addr, text)


def test_plain_name_addr_agrees_with_the_grammar_fuzzed() -> None:
    rng = random.Random(7044)
    pieces = ['"', "Alice", " ", "\t", "<", ">", "sip:", "a@h", ":5060", ";", "tag=1", "=",
              "\\", ",", "é", "\u3000", "@", "tel:+1", "lr", "\x00"]  # fmt: skip
    for _ in range(20_000):
        noise = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 4)))
        # mostly the shapes the fast path takes, with noise in one of their parts
        parts = [rng.choice(['"A B" ', '"A B"', "x ", "", "A  B\t"]), "<",
                 rng.choice(["sip:a@h", "sip:a@h:1;lr", "tel:+1"]), ">",
                 rng.choice(["", ";tag=1", ";tag=1;x", ";e=60"])]  # fmt: skip
        at = rng.randrange(0, len(parts) + 1)
        text = "".join(parts[:at]) + noise + "".join(parts[at:])
        got = _outcome(headers._parse_name_addr, text)
        assert got == _outcome(headers._grammar_name_addr, text), text
