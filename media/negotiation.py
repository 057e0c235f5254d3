"""Offer/answer helpers for when the B2BUA holds two offers and must answer both (RFC 3264).

Picking up a ringing call or retrieving a held one joins a phone that sent its own offer to a
leg that already has one. Each side is answered with its *own* offer restricted to the codecs
the other side also offered: both then send a codec the other decodes. Codecs match by encoding
name and clock rate (static payload types by number). A dynamic payload type numbered
differently on the two sides (telephone-event as 101 vs 96) is kept on each side under its own
number, and the relay rewrites it in the packets (media/ptmap.py, D9).
"""

from __future__ import annotations

from dataclasses import replace

from media.sdp import MediaSection, SessionDescription

#: RFC 3551 static payload types we may meet without an rtpmap line.
STATIC = {"0": "pcmu/8000", "3": "gsm/8000", "4": "g723/8000", "8": "pcma/8000",
          "9": "g722/8000", "18": "g729/8000"}  # fmt: skip
_PER_FORMAT = ("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")


def encodings(section: MediaSection) -> dict[str, str]:
    """payload type -> "name/rate" (lower case) for each format of an m= section."""
    out = {pt: STATIC[pt] for pt in section.formats if pt in STATIC}
    for line in section.lines:
        if line.startswith("a=rtpmap:"):
            pt, _, rest = line[9:].partition(" ")
            name_rate = "/".join(rest.strip().lower().split("/")[:2])
            out[pt] = name_rate
    return out


def restrict(section: MediaSection, allowed: set[str]) -> MediaSection:
    """A copy of `section` keeping only formats whose encoding is in `allowed`."""
    enc = encodings(section)
    keep = [pt for pt in section.formats if enc.get(pt, f"pt{pt}") in allowed]
    dropped = set(section.formats) - set(keep)
    lines = [section.lines[0]] + [
        line for line in section.lines[1:] if not _names_dropped(line, dropped)
    ]
    return replace(section, formats=keep, lines=lines)


def _names_dropped(line: str, dropped: set[str]) -> bool:
    for prefix in _PER_FORMAT:
        if line.startswith(prefix):
            return line[len(prefix) :].split(" ", 1)[0] in dropped
    return False


def answer_from_offer(own: SessionDescription, other: SessionDescription) -> SessionDescription:
    """`own` offer turned into an answer: every audio stream keeps the codecs `other` offers too.

    Streams that end up with no common codec are rejected (port 0), as RFC 3264 §6 says.
    """
    theirs: set[str] = set()
    for m in other.media:
        if m.media == "audio" and not m.rejected:
            theirs |= set(encodings(m).values())
    media: list[MediaSection] = []
    for m in own.media:
        if m.media != "audio" or m.rejected:
            media.append(m)
            continue
        kept = restrict(m, theirs)
        if not any(enc != "telephone-event/8000" for enc in encodings(kept).values()):
            kept = replace(kept, port=0, formats=kept.formats or m.formats[:1])
        media.append(kept)
    return replace(own, media=media)
