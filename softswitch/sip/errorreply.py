"""Answering requests we could not parse (RFC 3261 §8.2, §16.3; RFC 4475 §3.1.2).

A malformed request still deserves a `400 Bad Request` when it can be routed back: we copy the
raw Via, From, To, Call-ID and CSeq lines verbatim (they may be the broken part) and the
transport sends the reply to the packet's source address. Responses and messages without those
headers are dropped: nothing sensible can be said to them.
"""

from __future__ import annotations

_NEEDED = {
    b"via": b"Via", b"v": b"Via", b"from": b"From", b"f": b"From", b"to": b"To", b"t": b"To",
    b"call-id": b"Call-ID", b"i": b"Call-ID", b"cseq": b"CSeq",
}  # fmt: skip


def error_response(
    data: bytes, status: int, reason: str, to_tag: str | None = None
) -> bytes | None:
    """Bytes of a `status` response to the request in `data`, or None if it cannot be answered.

    `to_tag` is added to a To header that has none (§8.2.6.2: a final response to a request
    outside a dialog carries one; overload's 503 gives it, a 400 to garbage need not).
    """
    data = data.lstrip(b"\r\n")
    end = data.find(b"\r\n\r\n")
    head = data[:end] if end >= 0 else data
    lines = head.split(b"\r\n")
    if not lines or lines[0].upper().startswith(b"SIP/") or b" " not in lines[0]:
        return None  # a response, or not SIP at all
    if lines[0].split(b" ", 1)[0] == b"ACK":
        return None  # ACK is never answered (§17.2.1)
    copied: list[bytes] = []
    seen: set[bytes] = set()
    for line in _unfold(lines[1:]):
        name, colon, value = line.partition(b":")
        canonical = _NEEDED.get(name.strip().lower()) if colon else None
        if canonical is None:
            continue
        if canonical != b"Via" and canonical in seen:
            continue
        seen.add(canonical)
        value = value.strip()
        if to_tag and canonical == b"To" and b";tag=" not in value.lower():
            value += b";tag=" + to_tag.encode("ascii")
        copied.append(canonical + b": " + value)
    if len(seen) < len(set(_NEEDED.values())):
        return None
    reason_bytes = reason.encode("utf-8", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    status_line = b"SIP/2.0 %d %s" % (status, reason_bytes[:120])
    return b"\r\n".join([status_line, *copied, b"Content-Length: 0", b"", b""])


def _unfold(lines: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = out[-1] + b" " + line.strip()
        else:
            out.append(line)
    return out
