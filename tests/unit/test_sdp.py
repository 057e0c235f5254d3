"""SDP parsing and rewriting on offers shaped like those of real phones."""

from __future__ import annotations

import pytest

from media import Direction, OriginState, SdpError, is_hold, parse_sdp, rewrite
from media.sdp import MAX_MEDIA_SECTIONS, MAX_SDP_SIZE

RELAY = "203.0.113.5"


def sdp(text: str) -> bytes:
    return text.strip("\n").replace("\n", "\r\n").encode() + b"\r\n"


BARESIP = sdp("""
v=0
o=- 1597330366 2846282315 IN IP4 192.168.1.20
s=-
c=IN IP4 192.168.1.20
t=0 0
m=audio 10000 RTP/AVP 96 9 0 8 101
b=AS:128
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1;useinbandfec=1
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=ssrc:2374587327 cname:8f2f9fd4-c7b2-4a64-9a1e-1e22b1b0d6c3
a=rtcp-rsize
a=ptime:20
""")

LINPHONE = sdp("""
v=0
o=alice 1652 2543 IN IP4 10.0.0.7
s=Talk
c=IN IP4 10.0.0.7
t=0 0
a=ice-pwd:2a7c1b0d0e1f2a3b4c5d6e7f
a=ice-ufrag:5e2d1a0b
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
a=record:off
m=audio 7078 RTP/AVP 96 97 0 8 101 100
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:101 telephone-event/48000
a=rtpmap:100 telephone-event/8000
a=rtcp:7079
a=candidate:1 1 UDP 2130706303 10.0.0.7 7078 typ host
a=candidate:1 2 UDP 2130706302 10.0.0.7 7079 typ host
a=end-of-candidates
a=rtcp-fb:* trr-int 1000
a=rtcp-fb:* ccm tmmbr
m=video 0 RTP/AVP 96 97
a=rtpmap:96 VP8/90000
a=rtpmap:97 H264/90000
a=fmtp:97 profile-level-id=42801F
a=rtcp-fb:* nack pli
""")

YEALINK_SRTP = sdp("""
v=0
o=- 20024 20024 IN IP4 192.168.1.50
s=SDP data
c=IN IP4 192.168.1.50
t=0 0
m=audio 11790 RTP/SAVP 9 0 8 18 101
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:18 G729/8000
a=fmtp:18 annexb=no
a=ptime:20
a=sendrecv
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4
""")

SIPP = sdp("""
v=0
o=user1 53655765 2353687637 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 6000 RTP/AVP 0
a=rtpmap:0 PCMU/8000
""")

IPV6 = sdp("""
v=0
o=- 3 4 IN IP6 2001:db8::10
s=-
c=IN IP6 2001:db8::10
t=0 0
m=audio 5004 RTP/AVP 8 101
a=rtcp:5009 IN IP6 2001:db8::11
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
""")

ALL = {
    "baresip": BARESIP,
    "linphone": LINPHONE,
    "yealink": YEALINK_SRTP,
    "sipp": SIPP,
    "ipv6": IPV6,
}

_TOUCHED = ("o=", "c=", "m=", "a=rtcp:", "a=candidate", "a=end-of-candidates", "a=ice-")


def untouched(body: bytes) -> list[bytes]:
    """The lines a relay must leave alone, in order."""
    return [
        line
        for line in body.split(b"\r\n")
        if not line.startswith(tuple(t.encode() for t in _TOUCHED))
    ]


def with_line(body: bytes, old: str, new: str) -> bytes:
    assert old.encode() in body
    return body.replace(old.encode(), new.encode(), 1)


# --- parsing ----------------------------------------------------------------------------------


def test_parse_baresip() -> None:
    desc = parse_sdp(BARESIP)
    assert desc.origin.session_id == "1597330366" and desc.origin.version == "2846282315"
    assert desc.connection is not None and desc.connection.address == "192.168.1.20"
    (audio,) = desc.media
    assert (audio.media, audio.port, audio.proto) == ("audio", 10000, "RTP/AVP")
    assert audio.formats == ["96", "9", "0", "8", "101"]
    assert desc.direction_for(0) is Direction.SENDRECV
    assert desc.rtp_address(0) == ("192.168.1.20", 10000)
    assert desc.rtcp_address(0) == ("192.168.1.20", 10001)


def test_parse_linphone_rtcp_attribute_and_rejected_video() -> None:
    desc = parse_sdp(LINPHONE)
    audio, video = desc.media
    assert audio.rtcp_port == 7079 and desc.rtcp_address(0) == ("10.0.0.7", 7079)
    assert video.rejected and desc.rtp_address(1) is None and desc.rtcp_address(1) is None
    assert video.formats == ["96", "97"]


def test_parse_ipv6_with_rtcp_address() -> None:
    desc = parse_sdp(IPV6)
    assert desc.connection is not None and desc.connection.addrtype == "IP6"
    assert desc.rtp_address(0) == ("2001:db8::10", 5004)
    assert desc.rtcp_address(0) == ("2001:db8::11", 5009)


def test_media_level_connection_overrides_session_level() -> None:
    desc = parse_sdp(with_line(SIPP, "a=rtpmap:0", "c=IN IP4 198.51.100.9\r\na=rtpmap:0"))
    assert desc.rtp_address(0) == ("198.51.100.9", 6000)


def test_host_names_give_no_rtp_address() -> None:
    desc = parse_sdp(with_line(SIPP, "c=IN IP4 127.0.0.1", "c=IN IP4 phone.example.com"))
    assert desc.rtp_address(0) is None


def test_lf_line_ends_and_blank_lines_are_accepted() -> None:
    desc = parse_sdp(SIPP.replace(b"\r\n", b"\n") + b"\n\n")
    assert desc.media[0].port == 6000


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"hello world",
        b"v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\n",
        b"v=0\r\ns=-\r\n",  # no o=
        b"v=0\r\no=- x 1 IN IP4 1.2.3.4\r\n",
        b"v=0\r\no=- 1 1 IN IP4\r\n",
        SIPP.replace(b"m=audio 6000", b"m=audio 70000"),
        SIPP.replace(b"m=audio 6000", b"m=audio six"),
        SIPP.replace(b"RTP/AVP 0", b""),
        SIPP.replace(b"c=IN IP4", b"c=IN IPX"),
        SIPP.replace(b"c=IN IP4 127.0.0.1", b"c=IN"),
        SIPP + b"a=rtcp:x\r\n",
        SIPP + b"this is not sdp\r\n",
        SIPP + b"\x00=zero\r\n",
        SIPP + b"m=audio 1 RTP/AVP 0\r\n" * MAX_MEDIA_SECTIONS,
        SIPP + b"a=x:" + b"y" * MAX_SDP_SIZE + b"\r\n",
    ],
)
def test_garbage_raises_sdp_error(body: bytes) -> None:
    with pytest.raises(SdpError):
        parse_sdp(body)


# --- rewriting --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL))
def test_rewrite_points_every_stream_at_the_relay_and_keeps_the_rest(name: str) -> None:
    original = ALL[name]
    desc = parse_sdp(original)
    ports = [30000 + 2 * i for i in range(len(desc.media))]
    out = rewrite(desc, RELAY, ports, OriginState())
    again = parse_sdp(out)
    for i, section in enumerate(again.media):
        want = 0 if desc.media[i].rejected else ports[i]
        assert section.port == want
        assert section.formats == desc.media[i].formats  # codecs untouched
        if want:
            assert again.rtp_address(i) == (RELAY, want)
            assert again.rtcp_address(i) == (RELAY, want + 1)
    assert untouched(out) == untouched(original)  # byte-exact, same order
    assert again.origin.address == RELAY and again.origin.addrtype == "IP4"
    assert b"a=candidate" not in out and b"a=ice-" not in out
    assert out.endswith(b"\r\n") and b"\n" not in out.replace(b"\r\n", b"")


def test_rewrite_keeps_the_m_line_codec_order_and_crypto() -> None:
    out = rewrite(parse_sdp(YEALINK_SRTP), RELAY, [30000], OriginState())
    assert b"m=audio 30000 RTP/SAVP 9 0 8 18 101\r\n" in out
    crypto = b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"
    assert crypto + b"|2^20|1:4\r\n" in out


def test_rtcp_attribute_follows_the_relay_port() -> None:
    out = rewrite(parse_sdp(LINPHONE), RELAY, [30000, 30002], OriginState())
    assert b"a=rtcp:30001\r\n" in out
    out6 = rewrite(parse_sdp(IPV6), "2001:db8::1", [30000], OriginState())
    assert b"a=rtcp:30001 IN IP6 2001:db8::1\r\n" in out6
    assert b"c=IN IP6 2001:db8::1\r\n" in out6
    assert b"o=- " in out6 and b" IN IP6 2001:db8::1\r\n" in out6


def test_ipv6_offer_rewritten_to_an_ipv4_relay() -> None:
    out = rewrite(parse_sdp(IPV6), RELAY, [30000], OriginState())
    desc = parse_sdp(out)
    assert desc.rtp_address(0) == (RELAY, 30000) and desc.rtcp_address(0) == (RELAY, 30001)
    assert b"IP6" not in out


def test_rejected_streams_stay_rejected_and_port_zero_rejects() -> None:
    out = parse_sdp(rewrite(parse_sdp(LINPHONE), RELAY, [30000, 30002], OriginState()))
    assert out.media[1].port == 0
    out = parse_sdp(rewrite(parse_sdp(LINPHONE), RELAY, [0, 0], OriginState()))
    assert [m.port for m in out.media] == [0, 0]


def test_missing_connection_line_is_added_to_each_stream() -> None:
    body = SIPP.replace(b"c=IN IP4 127.0.0.1\r\n", b"").replace(
        b"m=audio 6000 RTP/AVP 0\r\n", b"m=audio 6000 RTP/AVP 0\r\ni=voice\r\n"
    )
    out = rewrite(parse_sdp(body), RELAY, [30000], OriginState())
    assert b"m=audio 30000 RTP/AVP 0\r\ni=voice\r\nc=IN IP4 203.0.113.5\r\na=rtpmap" in out


def test_non_utf8_bytes_survive() -> None:
    body = SIPP.replace(b"s=-", b"s=Caf\xe9 \xff")  # Latin-1, not UTF-8
    out = rewrite(parse_sdp(body), RELAY, [30000], OriginState())
    assert b"s=Caf\xe9 \xff\r\n" in out


def test_rewrite_argument_errors() -> None:
    desc = parse_sdp(LINPHONE)
    with pytest.raises(ValueError):
        rewrite(desc, RELAY, [30000], OriginState())
    with pytest.raises(ValueError):
        rewrite(desc, "relay.example.com", [30000, 0], OriginState())


# --- origin versions --------------------------------------------------------------------------


def test_origin_version_increments_only_when_the_sdp_changes() -> None:
    origin = OriginState(username="softswitch")
    first = rewrite(parse_sdp(BARESIP), RELAY, [30000], origin)
    o1 = parse_sdp(first).origin
    assert (o1.username, o1.session_id, o1.version) == ("softswitch", str(origin.session_id), "1")
    refresh = rewrite(parse_sdp(BARESIP), RELAY, [30000], origin)  # session refresh: same body
    assert refresh == first
    held = rewrite(
        parse_sdp(with_line(BARESIP, "a=sendrecv", "a=sendonly")), RELAY, [30000], origin
    )
    o2 = parse_sdp(held).origin
    assert (o2.session_id, o2.version) == (o1.session_id, "2")
    resumed = rewrite(parse_sdp(BARESIP), RELAY, [30000], origin)
    assert parse_sdp(resumed).origin.version == "3"
    moved = rewrite(parse_sdp(BARESIP), RELAY, [30002], origin)  # new relay port
    assert parse_sdp(moved).origin.version == "4"


def test_the_phones_own_origin_changes_do_not_leak() -> None:
    origin = OriginState()
    a = rewrite(parse_sdp(SIPP), RELAY, [30000], origin)
    b = rewrite(parse_sdp(SIPP.replace(b"53655765 2353687637", b"1 2")), RELAY, [30000], origin)
    assert a == b


def test_each_leg_has_its_own_session_id() -> None:
    assert OriginState().session_id != OriginState().session_id


# --- directions and hold ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "held"),
    [("sendrecv", False), ("recvonly", False), ("sendonly", True), ("inactive", True)],
)
def test_direction_survives_rewrite_and_hold_is_detected(attribute: str, held: bool) -> None:
    body = with_line(BARESIP, "a=sendrecv", f"a={attribute}")
    desc = parse_sdp(body)
    assert desc.direction_for(0) == Direction(attribute)
    assert is_hold(desc) is held
    out = parse_sdp(rewrite(desc, RELAY, [30000], OriginState()))
    assert out.direction_for(0) == Direction(attribute)
    assert is_hold(out) is held


def test_rfc2543_hold_keeps_its_null_address() -> None:
    body = with_line(SIPP, "c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0")
    desc = parse_sdp(body)
    assert is_hold(desc) and desc.rtp_address(0) is None
    out = rewrite(desc, RELAY, [30000], OriginState())
    assert b"c=IN IP4 0.0.0.0\r\n" in out
    assert is_hold(parse_sdp(out))


def test_session_level_direction_and_media_level_override() -> None:
    body = with_line(SIPP, "t=0 0", "t=0 0\r\na=sendonly")
    assert is_hold(parse_sdp(body))
    body = with_line(body, "a=rtpmap:0", "a=sendrecv\r\na=rtpmap:0")
    assert not is_hold(parse_sdp(body))


def test_hold_needs_every_active_stream_held() -> None:
    two = BARESIP + b"m=video 10002 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n"
    assert not is_hold(parse_sdp(with_line(two, "a=sendrecv", "a=sendonly")))
    assert is_hold(parse_sdp(with_line(two, "a=sendrecv", "a=sendonly").replace(b"10002", b"0")))
    assert not is_hold(parse_sdp(SIPP.replace(b"m=audio 6000", b"m=audio 0")))
