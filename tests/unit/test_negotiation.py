"""Answering two offers against each other (pickup, retrieve)."""

from media.negotiation import answer_from_offer, encodings
from media.sdp import OriginState, parse_sdp, rewrite

BARESIP = (
    b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 9 0 8 96 101\r\na=rtpmap:9 G722/8000\r\n"
    b"a=rtpmap:96 opus/48000/2\r\na=fmtp:96 stereo=1\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n"
)
SIPP = (
    b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 5000 RTP/AVP 8 0 100\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:100 telephone-event/8000\r\n"
)
VIDEO_ONLY = (
    b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 5000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n"
)


def test_each_side_keeps_its_own_numbering_of_the_common_codecs() -> None:
    own, other = parse_sdp(BARESIP), parse_sdp(SIPP)
    answer = answer_from_offer(own, other)
    m = answer.media[0]
    assert m.formats == ["0", "8", "101"]
    assert encodings(m) == {"0": "pcmu/8000", "8": "pcma/8000", "101": "telephone-event/8000"}
    body = rewrite(answer, "127.0.0.1", [30000], OriginState())
    assert b"opus" not in body and b"G722" not in body and b"a=fmtp:101 0-15" in body


def test_no_common_codec_rejects_the_stream() -> None:
    answer = answer_from_offer(parse_sdp(VIDEO_ONLY), parse_sdp(SIPP))
    assert answer.media[0].port == 0
