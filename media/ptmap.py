"""RTP payload type maps: which payload type number each side of a bridge expects (D9).

The relay forwards packets untouched, which is right as long as both phones number their
payload formats the same way. They need not: a picked-up ringing call answers two offers with
their own numbering (media/negotiation.py), an attended transfer joins two far ends that never
negotiated with each other, and a phone may answer with numbers of its own. Then, say,
telephone-event leaves one phone as 101 and the other expects 96, and DTMF is lost.

Who uses which number (RFC 3264): the numbers in the SDP a phone *sent* are the ones it expects
to receive (§5.1 for an offer, §6.1 for an answer), and a phone sends with the numbers of the SDP
it *received* (§6.1: "it MUST use the payload type numbers from the offer, even if they differ
from those in the answer"). So for the direction X -> Y the map takes each payload type X may
send (by the SDP we sent X, then, for numbers that SDP does not define, by X's own SDP: phones
that send with their own numbering exist) to the number Y's own SDP gives the same encoding.
Encodings match by name (case-insensitive), clock rate and channels, as in `a=rtpmap` (RFC 8866
§6.6); static payload types without an rtpmap line by their RFC 3551 names.

Left alone on purpose:
- a payload type Y's SDP does not name (the packet passes unchanged: we do not drop media);
- a payload type X's own SDP lists with the same encoding as Y's number: X offered two
  variants of one encoding (AMR-WB octet-aligned or not, told apart by fmtp), and Y took the
  other one;
- 64-95 on either side, where RTCP multiplexed on the RTP port lives (RFC 5761 §4);
- secure profiles (RTP/SAVP, RTP/SAVPF, UDP/TLS/...): SRTP authenticates the header, so a
  rewritten packet would fail authentication. The gap stays open for SRTP.

Only the first active audio stream is mapped: it is the only one the B2BUA relays.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

from media.sdp import MediaSection, SessionDescription

PtMap = Mapping[int, int]
"""Payload type as one side sends it -> payload type the other side expects."""

#: RFC 3551 §6 static payload types, as (name, clock rate, channels).
STATIC: dict[int, tuple[str, str, str]] = {
    0: ("pcmu", "8000", "1"), 3: ("gsm", "8000", "1"), 4: ("g723", "8000", "1"),
    5: ("dvi4", "8000", "1"), 6: ("dvi4", "16000", "1"), 7: ("lpc", "8000", "1"),
    8: ("pcma", "8000", "1"), 9: ("g722", "8000", "1"), 10: ("l16", "44100", "2"),
    11: ("l16", "44100", "1"), 12: ("qcelp", "8000", "1"), 13: ("cn", "8000", "1"),
    14: ("mpa", "90000", "1"), 15: ("g728", "8000", "1"), 16: ("dvi4", "11025", "1"),
    17: ("dvi4", "22050", "1"), 18: ("g729", "8000", "1"),
}  # fmt: skip

_MUX_RANGE = range(64, 96)
"""Payload types RFC 5761 §4 keeps free so that RTCP can share the RTP port."""


class PtMaps(NamedTuple):
    """Both directions of a bridge between endpoints a and b; None: forwarded untouched."""

    a_to_b: PtMap | None
    b_to_a: PtMap | None


Encoding = tuple[str, str, str]


def rtp_encodings(section: MediaSection) -> dict[int, Encoding]:
    """payload type -> (name, rate, channels), lower case, for each format of `section`."""
    out = {pt: STATIC[pt] for pt in map(_int, section.formats) if pt in STATIC}
    for line in section.lines:
        if line.startswith("a=rtpmap:"):
            pt_text, _, rest = line[9:].partition(" ")
            parts = rest.strip().lower().split("/")
            pt = _int(pt_text)
            if 0 <= pt < 128 and len(parts) >= 2:
                out[pt] = (parts[0], parts[1], parts[2] if len(parts) > 2 else "1")
    return out


def _int(text: str) -> int:
    return int(text) if text.isdigit() else -1


def audio_section(desc: SessionDescription | None) -> MediaSection | None:
    """The stream the B2BUA relays: the first audio m= line that is not rejected."""
    if desc is None:
        return None
    return next((m for m in desc.media if m.media == "audio" and not m.rejected), None)


def pt_map(
    x_received: SessionDescription | None,
    x_sent: SessionDescription | None,
    y_sent: SessionDescription | None,
) -> PtMap | None:
    """payload type as X sends it -> as Y expects it; None if nothing needs rewriting.

    `x_received` is the SDP we sent X's phone, `x_sent` and `y_sent` what the phones sent us.
    """
    got, own, theirs = audio_section(x_received), audio_section(x_sent), audio_section(y_sent)
    if theirs is None or (got is None and own is None):
        return None
    if any(m is not None and "SAVP" in m.proto.upper() for m in (got, own, theirs)):
        return None
    own_enc = rtp_encodings(own) if own is not None else {}
    sends = {**own_enc, **(rtp_encodings(got) if got is not None else {})}
    expects = rtp_encodings(theirs)
    first: dict[Encoding, int] = {}
    for pt in map(_int, theirs.formats):
        if pt in expects:
            first.setdefault(expects[pt], pt)
    out: dict[int, int] = {}
    for pt, enc in sends.items():
        target = first.get(enc)
        if target is None or expects.get(pt) == enc:
            continue
        if own_enc.get(pt) == enc and own_enc.get(target) == enc:
            continue  # X offered both: two variants of one encoding, not a renumbering
        if pt not in _MUX_RANGE and target not in _MUX_RANGE:
            out[pt] = target
    return out or None


def pt_maps(
    a_received: SessionDescription | None,
    a_sent: SessionDescription | None,
    b_received: SessionDescription | None,
    b_sent: SessionDescription | None,
) -> PtMaps | None:
    """The maps of a bridge whose endpoint a faces phone A and b phone B; None: no rewriting.

    A plain call relays each phone's SDP to the other as it is (A received what B sent and
    vice versa); then, if one side's numbering is contained in the other's (the answerer kept
    the offer's numbers), nothing can differ and nothing is computed: that is the call setup
    path, which is benchmarked.
    """
    if a_received is b_sent and b_received is a_sent and _nested(a_sent, b_sent):
        return None
    maps = PtMaps(pt_map(a_received, a_sent, b_sent), pt_map(b_received, b_sent, a_sent))
    return None if maps == (None, None) else maps


def _nested(one: SessionDescription | None, other: SessionDescription | None) -> bool:
    """True if one side's formats and rtpmap lines are all the other side's too."""
    m, n = audio_section(one), audio_section(other)
    if m is None or n is None:
        return True  # no stream to relay, or a side not known yet: nothing to map
    m_maps = {line for line in m.lines if line.startswith("a=rtpmap:")}
    n_maps = {line for line in n.lines if line.startswith("a=rtpmap:")}
    if m_maps <= n_maps and set(m.formats) <= set(n.formats):
        return True
    return n_maps <= m_maps and set(n.formats) <= set(m.formats)


Heads = list[list[bytes] | None]
"""The relay's form of a map, indexed by RTP header byte 1 (marker bit and payload type):
None where byte 1 stays, else the rewritten first two header bytes indexed by byte 0."""


def heads(mapping: PtMap) -> Heads:
    """`mapping` as the relay applies it: one index by byte 1, one by byte 0, no bit masking.

    The marker bit is carried over, and packets that are not RTP version 2 (byte 0 >> 6 != 2:
    STUN, say) keep their bytes; both are decided here once instead of per packet.
    """
    out: Heads = [None] * 256
    for pt, new in mapping.items():
        if 0 <= pt < 128 and 0 <= new < 128 and new != pt:
            out[pt] = _column(pt, new)
            out[pt | 0x80] = _column(pt | 0x80, new | 0x80)
    return out


@functools.lru_cache(maxsize=1024)
def _column(b1: int, new: int) -> list[bytes]:
    """Byte 0 -> the two header bytes to send, for a packet whose byte 1 is `b1`.

    Shared by every bridge mapping `b1` to `new` (a call mapping 101 to 96 costs no memory).
    """
    return [bytes((b0, new if b0 >> 6 == 2 else b1)) for b0 in range(256)]
