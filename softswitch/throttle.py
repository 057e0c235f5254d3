"""Throttling of repeated authentication failures per source address.

A SIP scanner (sipvicious `svcrack`) tries thousands of passwords from one address. After
`max_failures` failures within `window` seconds, the source is blocked for `block_time`: its
requests are dropped unanswered, which costs us nothing and tells the scanner nothing. Sans-I/O:
the caller passes `now`. Memory stays bounded: entries are pruned as they age out.
"""

from __future__ import annotations

from collections import deque


class FailureThrottle:
    """Counts failures per source; `blocked(source, now)` says whether to drop its requests."""

    def __init__(
        self,
        max_failures: int = 10,
        window: float = 60.0,
        block_time: float = 60.0,
        max_sources: int = 100_000,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.block_time = block_time
        self.max_sources = max_sources
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}

    def blocked(self, source: str, now: float) -> bool:
        until = self._blocked_until.get(source)
        if until is None:
            return False
        if now < until:
            return True
        del self._blocked_until[source]
        return False

    def record_failure(self, source: str, now: float) -> bool:
        """Count one failure; True when this failure starts a block."""
        times = self._failures.get(source)
        if times is None:
            if len(self._failures) >= self.max_sources:
                self.prune(now)
            times = self._failures[source] = deque()
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.max_failures:
            self._blocked_until[source] = now + self.block_time
            del self._failures[source]
            return True
        return False

    def prune(self, now: float) -> None:
        for source in [s for s, t in self._failures.items() if not t or t[-1] <= now - self.window]:
            del self._failures[source]
        for source in [s for s, until in self._blocked_until.items() if until <= now]:
            del self._blocked_until[source]
