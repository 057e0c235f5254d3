"""SIP, SIPS, tel and absolute URIs (RFC 3261 §19.1, §25.1; RFC 3966): parsing and §19.1.4."""

from __future__ import annotations

import pytest

from softswitch.sip.errors import ParseError
from softswitch.sip.uri import AbsoluteUri, SipUri, TelUri, parse_uri


def sip(text: str) -> SipUri:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    return uri


# --- parsing --------------------------------------------------------------------------------------


def test_full_sip_uri() -> None:
    uri = sip(
        "sip:alice:secret@atlanta.com:5070;transport=tcp;lr;maddr=239.255.255.1?subject=x&a=b"
    )
    assert uri.scheme == "sip"
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "atlanta.com"
    assert uri.port == 5070
    assert uri.params == (("transport", "tcp"), ("lr", None), ("maddr", "239.255.255.1"))
    assert uri.headers == "subject=x&a=b"
    assert uri.param("TRANSPORT") == "tcp"
    assert uri.has_param("lr") and uri.param("lr") is None
    assert not uri.has_param("ttl")
    assert not uri.secure


def test_host_only() -> None:
    uri = sip("sip:example.com")
    assert (uri.user, uri.host, uri.port, uri.params, uri.headers) == (
        None,
        "example.com",
        None,
        (),
        None,
    )
    assert uri.host_port() == ("example.com", 5060)


def test_sips_defaults_to_5061_and_scheme_is_case_insensitive() -> None:
    uri = sip("SIPS:bob@Biloxi.example.com")
    assert uri.scheme == "sips"
    assert uri.secure
    assert uri.host == "Biloxi.example.com"  # kept as sent; compared case-insensitively
    assert uri.host_port() == ("Biloxi.example.com", 5061)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("sip:[::1]:5060", "[::1]", 5060),
        ("sip:alice@[2001:db8::10]", "[2001:db8::10]", None),
        ("sip:[::ffff:192.0.2.1]:5080;transport=udp", "[::ffff:192.0.2.1]", 5080),
        ("sip:alice@192.0.2.4:0", "192.0.2.4", 0),
        ("sip:h:65535", "h", 65535),
        ("sip:example.com.", "example.com.", None),
    ],
)
def test_hosts_and_ports(text: str, host: str, port: int | None) -> None:
    uri = sip(text)
    assert (uri.host, uri.port) == (host, port)
    assert str(uri) == text


def test_ipv6_host_port_strips_brackets() -> None:
    assert sip("sip:[::1]:5070").host_port() == ("::1", 5070)
    assert sip("sip:[::1]").host_port() == ("::1", 5060)


@pytest.mark.parametrize(
    "text",
    [
        "sip:alice@atlanta.com",
        "sip:alice@atlanta.com;transport=tcp?subject=project%20x&priority=urgent",
        "sips:+1-212-555-1212:1234@gateway.com;user=phone",
        "sip:%61lice@atlanta.com;Transport=TCP",
        "sip:user;par=u%40example.net@example.com",
        "sip:[2001:db8::1]:5061;maddr=[2001:db8::2]",
        "sip:alice@atlanta.com;ttl=15;method=REGISTER",
        "tel:+1-201-555-0123",
        "tel:7042;phone-context=example.com",
        "urn:service:sos",
        "isbn:2983792873",
        "http://www.example.com/a?b=c#d",
    ],
)
def test_str_round_trips(text: str) -> None:
    uri = parse_uri(text)
    assert str(uri) == text
    assert parse_uri(str(uri)) == uri


def test_tel_uri() -> None:
    uri = parse_uri("tel:+1-201-555-0123;phone-context=+1")
    assert isinstance(uri, TelUri)
    assert uri.number == "+1-201-555-0123"
    assert uri.digits == "+12015550123"
    assert uri.params == (("phone-context", "+1"),)
    assert uri.equivalent(parse_uri("tel:+1.201.555.0123;phone-context=+1"))
    assert not uri.equivalent(parse_uri("tel:+1-201-555-0124"))


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("tel:+1-201-555-0123", "tel:+1(201)5550123", True),
        ("tel:+1-201-555-0123", "tel:1-201-555-0123", False),  # global vs local
        ("tel:7042;phone-context=example.com", "tel:7042;Phone-Context=EXAMPLE.com", True),
        ("tel:7042;phone-context=example.com", "tel:7042;phone-context=example.org", False),
        ("tel:7042;phone-context=+1-201", "tel:7042;phone-context=+1201", True),
        ("tel:7042;phone-context=example.com", "tel:7042", False),
        ("tel:+1234;ext=5;isub=a", "tel:+1234;isub=A;ext=5", True),
        ("tel:*99#;phone-context=x", "tel:*99#;phone-context=x", True),
        ("tel:12ab;phone-context=x", "tel:12AB;phone-context=x", True),
    ],
)
def test_tel_equivalence(a: str, b: str, same: bool) -> None:
    assert parse_uri(a).equivalent(parse_uri(b)) is same
    assert parse_uri(b).equivalent(parse_uri(a)) is same


def test_absolute_uri() -> None:
    uri = parse_uri("urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
    assert uri == AbsoluteUri("urn", "uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
    assert uri.equivalent(AbsoluteUri("urn", "uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sip",
        "sip:",
        "alice@atlanta.com",
        ":alice@atlanta.com",
        "1sip:alice@atlanta.com",
        "sip:alice@",
        "sip:@atlanta.com",
        "sip:alice@atlanta.com:",
        "sip:alice@atlanta.com:65536",
        "sip:alice@atlanta.com:123456",
        "sip:alice@atlanta.com:5o60",
        "sip:alice@atlanta.com:²",
        "sip:alice@atlanta.com:٣",
        "sip:alice@-atlanta.com",
        "sip:alice@atlanta-.com-",
        "sip:alice@atl anta.com",
        "sip:alice smith@atlanta.com",
        "sip:alice@atlanta.com;",
        "sip:alice@atlanta.com;;lr",
        "sip:alice@atlanta.com;=x",
        "sip:alice@atlanta.com?",
        "sip:alice@atlanta.com;a b",
        "sip:alice@[::1",
        "sip:alice@[::g]",
        "sip:alice@[1:2:3:4:5:6:7:8:9]",
        "sip:alice@atlanta.com>",
        'sip:"alice"@atlanta.com',
        "sip:a@b@c",
        "sip:alice@atlanté.com",
        "sip:alice@atlanta.com\r\nX: y",
        "tel:",
        "tel:+",
        "tel:xyz",
        "urn:",
        "urn:a b",
        "urn:<x>",
        "ur n:x",
    ],
)
def test_invalid_uris_raise_parse_error(text: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_uri(text)
    assert info.value.status == 400


# --- parameters -----------------------------------------------------------------------------------


def test_with_and_without_params() -> None:
    uri = sip("sip:a@b;transport=udp;lr")
    assert str(uri.with_params(transport="tcp")) == "sip:a@b;lr;transport=tcp"
    assert str(uri.with_params(ob=None)) == "sip:a@b;transport=udp;lr;ob"
    assert str(uri.without_params("LR", "transport")) == "sip:a@b"
    assert str(uri) == "sip:a@b;transport=udp;lr"  # immutable


def test_user_unescaped() -> None:
    assert sip("sip:%61lice@x").user_unescaped == "alice"
    assert sip("sip:x").user_unescaped is None
    assert sip("sip:caf%C3%A9@x").user_unescaped == "café"


# --- §19.1.4 comparison ---------------------------------------------------------------------------

RFC_EQUIVALENT = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    (
        "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
        "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    ),
    (
        "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
        "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
    ),
]

RFC_NOT_EQUIVALENT = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
]


@pytest.mark.parametrize(("a", "b"), RFC_EQUIVALENT)
def test_rfc3261_equivalent_examples(a: str, b: str) -> None:
    assert parse_uri(a).equivalent(parse_uri(b))
    assert parse_uri(b).equivalent(parse_uri(a))


@pytest.mark.parametrize(("a", "b"), RFC_NOT_EQUIVALENT)
def test_rfc3261_non_equivalent_examples(a: str, b: str) -> None:
    assert not parse_uri(a).equivalent(parse_uri(b))
    assert not parse_uri(b).equivalent(parse_uri(a))


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        # sip and sips are never equivalent
        ("sip:alice@atlanta.com", "sips:alice@atlanta.com", False),
        # user, ttl, method and maddr must be on both sides or neither
        ("sip:a@b;user=phone", "sip:a@b", False),
        ("sip:a@b;ttl=1", "sip:a@b", False),
        ("sip:a@b;method=INVITE", "sip:a@b", False),
        ("sip:a@b;maddr=1.2.3.4", "sip:a@b", False),
        ("sip:a@b;maddr=1.2.3.4", "sip:a@b;MADDR=1.2.3.4", True),
        # a parameter on both sides must match; values compare case-insensitively
        ("sip:a@b;foo=1", "sip:a@b;foo=2", False),
        ("sip:a@b;foo=ABC", "sip:a@b;FOO=abc", True),
        # escapes: unreserved characters equal their escape, reserved ones do not
        ("sip:%41lice@b", "sip:Alice@b", True),
        ("sip:alice@b", "sip:Alice@b", False),
        ("sip:a%3Bb@h", "sip:a;b@h", False),
        ("sip:a%3bb@h", "sip:a%3Bb@h", True),
        ("sip:a%2541@h", "sip:a%41@h", False),
        ("sip:a@h;%6C%72", "sip:a@h;lr", True),
        # passwords compare too
        ("sip:a:x@h", "sip:a:y@h", False),
        ("sip:a:x@h", "sip:a@h", False),
        ("sip:a:%78@h", "sip:a:x@h", True),
        # no user vs an empty-looking one, different ports
        ("sip:h", "sip:a@h", False),
        ("sip:a@h:5060", "sip:a@h:5061", False),
        # the same IPv6 address spelled twice
        ("sip:a@[::1]:5060", "sip:a@[0:0::1]:5060", True),
        ("sip:a@[::1]", "sip:a@[::2]", False),
        # URI headers: names case-insensitive, order irrelevant, values compared
        ("sip:a@h?Subject=x", "sip:a@h?subject=x", True),
        ("sip:a@h?subject=x", "sip:a@h?subject=y", False),
        ("sip:a@h?subject=%78", "sip:a@h?subject=x", True),
    ],
)
def test_more_equivalence_rules(a: str, b: str, same: bool) -> None:
    assert parse_uri(a).equivalent(parse_uri(b)) is same
    assert parse_uri(b).equivalent(parse_uri(a)) is same


def test_equivalence_across_types() -> None:
    assert not sip("sip:+1234@h").equivalent(parse_uri("tel:+1234"))
    assert not parse_uri("tel:+1234").equivalent(sip("sip:+1234@h"))
    assert not parse_uri("urn:x").equivalent(sip("sip:x@h"))
    assert not sip("sip:a@h").equivalent("sip:a@h")
