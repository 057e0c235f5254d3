"""Answers sent without a transaction, kept for a while to repeat to retransmissions.

The registrar challenges a REGISTER without credentials statelessly (D3): no server
transaction, no Timer J entry, nothing a flood of such REGISTERs could fill. What a transaction
would still have done is answer a retransmission with the *same* response (a client whose 401
came back with another nonce may take it for a new message: SIPp does). This keeps those answers
by the request's bytes and its source, bounded in number and in age.

Sans-I/O like the transaction layer: the caller passes `now` and drives `get_timer` /
`handle_timer` from the service's one timer.
"""

from __future__ import annotations

from collections.abc import Hashable

#: A REGISTER's first six retransmissions come within 0.5+1+2+4+4+4 s.
TTL = 16.0
#: ~4 MB of 401s at most: 8 s of challenges at 1,000 a second.
LIMIT = 8192


class StatelessReplies:
    """Response bytes by request key, oldest first, for at most `ttl` seconds."""

    __slots__ = ("_replies", "limit", "ttl")

    def __init__(self, ttl: float = TTL, limit: int = LIMIT) -> None:
        self.ttl = ttl
        self.limit = limit
        self._replies: dict[Hashable, tuple[float, bytes]] = {}

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: Hashable) -> bytes | None:
        """The answer kept for `key`, or None."""
        kept = self._replies.get(key)
        return None if kept is None else kept[1]

    def put(self, key: Hashable, reply: bytes, now: float) -> None:
        replies = self._replies
        replies.pop(key, None)  # re-inserted at the end: the order stays the age order
        replies[key] = (now, reply)
        if len(replies) > self.limit:
            del replies[next(iter(replies))]

    def get_timer(self) -> float | None:
        """When the oldest answer expires."""
        for sent_at, _ in self._replies.values():
            return sent_at + self.ttl
        return None

    def handle_timer(self, now: float) -> None:
        """Forget the answers older than `ttl`."""
        replies = self._replies
        oldest = now - self.ttl
        while replies:
            key = next(iter(replies))
            if replies[key][0] > oldest:
                return
            del replies[key]
