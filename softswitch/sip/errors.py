"""Exception types of the SIP core.

Two families, as in h11: a peer broke the protocol (`RemoteProtocolError`, carrying the status we
should answer with), or our own code misused the API (`LocalProtocolError`). Keeping them apart
stops a bug of ours from being reported to a phone as a 400.
"""

from __future__ import annotations


class SipError(Exception):
    """Base class of every error raised by the SIP core."""


class RemoteProtocolError(SipError):
    """The peer broke RFC 3261; answer with `status` when a response is possible."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ParseError(RemoteProtocolError):
    """A message, header or URI could not be parsed."""


class MessageTooLarge(ParseError):
    """A message exceeds the configured maximum size; the stream cannot be resynchronised."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit}", 513)
        self.size = size
        self.limit = limit


class LocalProtocolError(SipError):
    """Our own code asked the SIP core to do something the protocol forbids."""
