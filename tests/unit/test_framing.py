"""Content-Length framing on stream transports (RFC 3261 §18.3) with `StreamFramer`."""

from __future__ import annotations

import random

import pytest

from softswitch.sip.errors import MessageTooLarge, ParseError
from softswitch.sip.framing import StreamFramer
from softswitch.sip.message import Request, parse_message


def make(body: bytes = b"", cseq: int = 1, cl_name: str = "Content-Length") -> bytes:
    head = (
        "INVITE sip:bob@example.com SIP/2.0\r\n"
        "Via: SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bK-" + str(cseq) + "\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=1\r\n"
        "To: <sip:bob@example.com>\r\n"
        "Call-ID: framing-test\r\n"
        f"CSeq: {cseq} INVITE\r\n"
        f"{cl_name}: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"


def drain(framer: StreamFramer) -> list[bytes]:
    out = []
    while (msg := framer.next_message()) is not None:
        out.append(msg)
    return out


def test_one_message() -> None:
    f = StreamFramer()
    f.receive_data(make(SDP))
    assert drain(f) == [make(SDP)]
    assert f.buffered == 0


def test_two_messages_in_one_chunk() -> None:
    f = StreamFramer()
    f.receive_data(make(SDP, 1) + make(b"", 2))
    assert drain(f) == [make(SDP, 1), make(b"", 2)]
    assert parse_message(make(SDP, 1), stream=True).body == SDP


def test_message_and_a_half() -> None:
    f = StreamFramer()
    second = make(SDP, 2)
    f.receive_data(make(SDP, 1) + second[:30])
    assert drain(f) == [make(SDP, 1)]
    assert f.buffered == 30
    f.receive_data(second[30:])
    assert drain(f) == [second]


def test_split_byte_by_byte_including_inside_crlfcrlf() -> None:
    data = make(SDP)
    f = StreamFramer()
    got = []
    for i in range(len(data)):
        f.receive_data(data[i : i + 1])
        got += drain(f)
        if i < len(data) - 1:
            assert got == []
    assert got == [data]


@pytest.mark.parametrize("cut", [-2, -1, 0, 1, 2, 3])
def test_split_around_the_blank_line(cut: int) -> None:
    data = make(SDP)
    at = data.index(b"\r\n\r\n") + 2 + cut
    f = StreamFramer()
    f.receive_data(data[:at])
    assert f.next_message() is None
    f.receive_data(data[at:])
    assert drain(f) == [data]


def test_random_chunking_of_a_stream() -> None:
    rng = random.Random(3261)
    messages = [make(SDP if i % 2 else b"", i) for i in range(20)]
    stream = b"\r\n\r\n".join(messages)  # keep-alives between some of them
    for _ in range(20):
        f = StreamFramer()
        got: list[bytes] = []
        pos = 0
        while pos < len(stream):
            n = rng.randint(1, 200)
            f.receive_data(stream[pos : pos + n])
            pos += n
            got += drain(f)
        assert got == messages


def test_crlf_keepalives_are_skipped() -> None:
    f = StreamFramer()
    f.receive_data(b"\r\n\r\n")  # RFC 5626 ping
    assert f.next_message() is None
    assert f.buffered == 0
    f.receive_data(b"\r\n")  # pong
    assert f.next_message() is None
    f.receive_data(b"\r")  # half of one
    assert f.next_message() is None
    f.receive_data(b"\n" + make())
    assert drain(f) == [make()]


def test_compact_and_folded_content_length() -> None:
    f = StreamFramer()
    f.receive_data(make(SDP, cl_name="l"))
    assert drain(f) == [make(SDP, cl_name="l")]
    folded = make(SDP).replace(b"Content-Length: ", b"Content-Length:\r\n   ")
    f.receive_data(folded)
    assert drain(f) == [folded]
    assert parse_message(folded, stream=True).body == SDP


def test_missing_content_length_on_a_stream() -> None:
    data = make().replace(b"Content-Length: 0\r\n", b"")
    f = StreamFramer()
    f.receive_data(data)
    with pytest.raises(ParseError, match="Content-Length"):
        f.next_message()
    with pytest.raises(ParseError, match="Content-Length"):
        parse_message(data, stream=True)
    assert isinstance(parse_message(data), Request)  # a datagram may leave it out


@pytest.mark.parametrize("value", [b"-1", b"abc", b"1e3", b"9999999999", b"", b"\xc2\xb2"])
def test_invalid_content_length(value: bytes) -> None:
    f = StreamFramer()
    f.receive_data(make().replace(b"Content-Length: 0", b"Content-Length: " + value))
    with pytest.raises(ParseError):
        f.next_message()


def test_conflicting_content_lengths() -> None:
    f = StreamFramer()
    f.receive_data(make().replace(b"Content-Length: 0\r\n", b"Content-Length: 0\r\nl: 5\r\n"))
    with pytest.raises(ParseError, match="conflicting"):
        f.next_message()


def test_oversize_by_content_length() -> None:
    f = StreamFramer(max_size=1000)
    f.receive_data(make().replace(b"Content-Length: 0", b"Content-Length: 5000"))
    with pytest.raises(MessageTooLarge) as info:
        f.next_message()
    assert info.value.status == 513
    assert info.value.limit == 1000
    assert isinstance(info.value, ParseError)


def test_oversize_header_block_that_never_ends() -> None:
    f = StreamFramer(max_size=1000)
    f.receive_data(b"INVITE sip:x SIP/2.0\r\n")
    for _ in range(100):
        f.receive_data(b"X-Filler: " + b"a" * 20 + b"\r\n")
        try:
            assert f.next_message() is None
        except MessageTooLarge:
            break
    else:
        pytest.fail("the framer buffered past its limit")
    assert f.buffered > 1000


def test_exactly_the_maximum_size_is_accepted() -> None:
    body = b"x" * 100
    data = make(body)
    f = StreamFramer(max_size=len(data))
    f.receive_data(data)
    assert drain(f) == [data]
    f = StreamFramer(max_size=len(data) - 1)
    f.receive_data(data)
    with pytest.raises(MessageTooLarge):
        f.next_message()


def test_body_arriving_late_is_waited_for() -> None:
    data = make(SDP)
    head_end = data.index(b"\r\n\r\n") + 4
    f = StreamFramer()
    f.receive_data(data[:head_end])
    assert f.next_message() is None
    f.receive_data(data[head_end:-1])
    assert f.next_message() is None
    f.receive_data(data[-1:])
    assert drain(f) == [data]
