"""Payload type maps between the two phones of a bridge (D9, media/ptmap.py)."""

from __future__ import annotations

from media.negotiation import answer_from_offer
from media.ptmap import PtMaps, heads, pt_map, pt_maps, rtp_encodings
from media.sdp import SessionDescription, parse_sdp

HEAD = b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"


def sdp(m_line: str, *attrs: str, proto: str = "RTP/AVP") -> SessionDescription:
    lines = [f"m=audio 4000 {proto} {m_line}", *attrs]
    return parse_sdp(HEAD + "".join(f"{line}\r\n" for line in lines).encode())


#: The caller: telephone-event 101, opus 111 (Linphone-style numbering).
CALLER = sdp(
    "0 8 111 101",
    "a=rtpmap:111 opus/48000/2",
    "a=fmtp:111 useinbandfec=1",
    "a=rtpmap:101 telephone-event/8000",
)
#: The picker: telephone-event 96, opus 97 (baresip-style numbering, upper-case names).
PICKER = sdp(
    "0 97 96",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:97 OPUS/48000/2",
    "a=rtpmap:96 Telephone-Event/8000",
)


def test_encodings_carry_channels_and_static_names() -> None:
    enc = rtp_encodings(CALLER.media[0])
    assert enc == {
        0: ("pcmu", "8000", "1"),
        8: ("pcma", "8000", "1"),
        111: ("opus", "48000", "2"),
        101: ("telephone-event", "8000", "1"),
    }


def test_same_numbers_need_no_map() -> None:
    assert pt_map(CALLER, CALLER, CALLER) is None
    assert pt_maps(CALLER, CALLER, CALLER, CALLER) is None


def test_telephone_event_and_opus_renumbered_each_way_after_a_pickup() -> None:
    to_caller = answer_from_offer(CALLER, PICKER)  # the caller's own numbers, common codecs
    to_picker = answer_from_offer(PICKER, CALLER)
    maps = pt_maps(to_caller, CALLER, to_picker, PICKER)
    assert maps == PtMaps({111: 97, 101: 96}, {97: 111, 96: 101})


def test_static_payload_types_are_never_mapped() -> None:
    # PCMU is 0 everywhere, with or without an rtpmap line: no entry for it.
    maps = pt_maps(CALLER, CALLER, PICKER, PICKER)
    assert maps is not None
    assert 0 not in (maps.a_to_b or {}) and 0 not in (maps.b_to_a or {})


def test_a_codec_the_other_side_does_not_name_passes_unmapped() -> None:
    x = sdp("0 101 102", "a=rtpmap:101 telephone-event/8000", "a=rtpmap:102 iLBC/8000")
    y = sdp("0 96", "a=rtpmap:96 telephone-event/8000")
    assert pt_map(x, x, y) == {101: 96}  # 102 (iLBC): Y would not know it under any number


def test_channels_and_clock_rate_must_match() -> None:
    x = sdp("96 97", "a=rtpmap:96 opus/48000/2", "a=rtpmap:97 telephone-event/48000")
    y = sdp("111 101", "a=rtpmap:111 opus/48000", "a=rtpmap:101 telephone-event/8000")
    assert pt_map(x, x, y) is None  # opus/48000 is mono here, telephone-event 8 kHz


def test_the_sdp_a_phone_received_decides_what_it_sends() -> None:
    """RFC 3264 §6.1: the answerer sends with the offer's numbers, not its answer's."""
    offer = sdp("0 96", "a=rtpmap:96 telephone-event/8000")
    answer = sdp("0 101", "a=rtpmap:101 telephone-event/8000")
    # The far end received `offer` and answered `answer`; the new phone sent `offer`.
    maps = pt_maps(offer, answer, answer, offer)
    # The far end sends 96 as it must (left alone), or 101 with its own numbers (mapped).
    assert maps == PtMaps({101: 96}, {96: 101})


def test_a_second_variant_of_an_encoding_is_not_renumbered() -> None:
    """X offered AMR-WB twice (fmtp tells them apart); Y took 97: 96 is not a renumbering."""
    x = sdp(
        "96 97",
        "a=rtpmap:96 AMR-WB/16000",
        "a=rtpmap:97 AMR-WB/16000",
        "a=fmtp:97 octet-align=1",
    )
    y = sdp("97", "a=rtpmap:97 AMR-WB/16000", "a=fmtp:97 octet-align=1")
    assert pt_map(y, x, y) is None


def test_a_phone_still_sending_the_numbers_it_was_sent_is_mapped() -> None:
    """Attended transfer: X was sent the old far end's 101, offered 96 itself, and Y now
    expects 96. X's own 96 is no second variant: X's 101 came from the SDP it received."""
    old = sdp("0 101", "a=rtpmap:101 telephone-event/8000")
    new = sdp("0 96", "a=rtpmap:96 telephone-event/8000")
    assert pt_map(old, new, new) == {101: 96}


def test_rtcp_mux_range_and_srtp_are_left_alone() -> None:
    x = sdp("0 72 101", "a=rtpmap:72 foo/8000", "a=rtpmap:101 telephone-event/8000")
    y = sdp("0 96 100", "a=rtpmap:96 foo/8000", "a=rtpmap:100 telephone-event/8000")
    assert pt_map(x, x, y) == {101: 100}  # 72 would collide with RTCP packet types (RFC 5761)
    sx = sdp("0 101", "a=rtpmap:101 telephone-event/8000", proto="RTP/SAVP")
    sy = sdp("0 96", "a=rtpmap:96 telephone-event/8000", proto="RTP/SAVP")
    assert pt_map(sx, sx, sy) is None  # SRTP authenticates the header


def test_a_plain_call_answered_with_the_offer_numbers_is_identity_without_computing() -> None:
    answer = sdp("0 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:101 telephone-event/8000")
    assert pt_maps(answer, CALLER, CALLER, answer) is None
    # An answer that renumbered: the caller sends the answer's 96 (left alone) or its own 101.
    renumbered = sdp("0 96", "a=rtpmap:96 telephone-event/8000")
    assert pt_maps(renumbered, CALLER, CALLER, renumbered) == PtMaps({101: 96}, {96: 101})


def test_unknown_sides_give_no_map() -> None:
    assert pt_maps(None, None, CALLER, CALLER) is None
    assert pt_map(CALLER, CALLER, None) is None


def test_heads_keep_the_marker_bit_and_leave_other_payload_types() -> None:
    table = heads({101: 96})
    assert table[0] is None and table[0x80] is None and table[96] is None
    column, marked = table[101], table[101 | 0x80]
    assert column is not None and marked is not None
    assert column[0x80] == bytes((0x80, 96))
    assert marked[0x80] == bytes((0x80, 0x80 | 96))  # the marker bit stays set
    assert column[0x90] == bytes((0x90, 96))  # header extension bit: still version 2
    assert column[0x00] == bytes((0x00, 101))  # not RTP version 2 (STUN): byte 1 kept
