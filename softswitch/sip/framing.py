"""Message framing on stream transports (RFC 3261 §18.3): Content-Length delimits each message.

The h11 pattern: `receive_data(bytes)` only buffers; `next_message()` returns one complete
message's bytes, or None while more are needed. A message larger than the limit, or a header
block that never ends, raises `MessageTooLarge`/`ParseError`: the connection cannot be
resynchronised after that and must be closed.
"""

from __future__ import annotations

from .errors import MessageTooLarge, ParseError

_CL_NAMES = (b"content-length", b"l")


class StreamFramer:
    """Cuts a TCP byte stream into SIP messages."""

    __slots__ = ("_buf", "_need", "_scan", "max_size")

    def __init__(self, max_size: int = 65535) -> None:
        self._buf = bytearray()
        self.max_size = max_size
        # Where the search for the end of the header block resumes: a message that trickles in
        # over many segments is then scanned once, not once per segment.
        self._scan = 0
        # Size of the message at the front of the buffer once its header block is complete.
        self._need: int | None = None

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_message(self) -> bytes | None:
        """The next complete message, or None. CRLF keep-alives (RFC 5626 §3.5.1) are skipped.

        Raises `MessageTooLarge` (or `ParseError` for a missing or invalid Content-Length); the
        stream cannot be resynchronised after either, so the connection should be closed.
        """
        buf = self._buf
        need = self._need
        if need is None:
            start = 0
            while buf.startswith(b"\r\n", start):
                start += 2
            if start:
                del buf[:start]
                self._scan = 0
            end = buf.find(b"\r\n\r\n", self._scan)
            if end < 0:
                if len(buf) > self.max_size:
                    raise MessageTooLarge(len(buf), self.max_size)
                self._scan = max(len(buf) - 3, 0)  # a CRLFCRLF may straddle two segments
                return None
            need = end + 4 + _content_length(bytes(buf[:end]))
            if need > self.max_size:
                raise MessageTooLarge(need, self.max_size)
            self._need = need
        if len(buf) < need:
            return None
        message = bytes(buf[:need])
        del buf[:need]
        self._need = None
        self._scan = 0
        return message


def _content_length(head: bytes) -> int:
    """Content-Length from a raw header block; mandatory on streams (§20.14).

    Continuation lines are joined first, so a value folded onto the next line is still found.
    """
    found: int | None = None
    lines: list[bytes] = []
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b" " + line.strip()
        else:
            lines.append(line)
    for line in lines:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() in _CL_NAMES:
            text = value.strip()
            if not text.isdigit() or len(text) > 9:
                raise ParseError(f"invalid Content-Length: {text[:20]!r}")
            if found is not None and found != int(text):
                raise ParseError("conflicting Content-Length headers")
            found = int(text)
    if found is None:
        raise ParseError("missing Content-Length on a stream transport")
    return found
