"""The line model's event bus: every change of a call on a line, published in one place.

Whatever users see of a shared line (BLF keys, SCA, the HTTP Lines view, call history) is derived
from these events, so nothing else keeps its own copy of line state. Subscribers are plain
callables run synchronously, in order, with the event: cheap, deterministic and testable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import structlog

log = structlog.get_logger(__name__)


class CallState(StrEnum):
    RINGING = "ringing"  # inbound: phones of the line alert
    DIALING = "dialing"  # outbound: the far end has not answered yet
    ACTIVE = "active"
    HELD = "held"
    ENDED = "ended"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class LineEvent:
    """One change of one call on one line."""

    line: str  # the line's extension (the delegator's, or a user's own)
    call_id: str  # our id of the call (the B2BUA call, not a leg's Call-ID)
    state: CallState
    direction: Direction
    party: str | None  # which member uses the line: the delegator or a delegate; None = ringing
    remote: str  # the other end's number or extension
    remote_name: str | None
    started_at: float  # wall clock, when the call began
    at: float  # wall clock, when this change happened
    reason: str | None = None  # for ENDED: "bye", "cancel", "busy", "timeout", ...


Subscriber = Callable[[LineEvent], None]


class LineBus:
    """Publish/subscribe for line events."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def publish(self, event: LineEvent) -> None:
        log.info(
            "line_event",
            line=event.line,
            call=event.call_id,
            state=event.state.value,
            direction=event.direction.value,
            party=event.party,
            remote=event.remote,
            reason=event.reason,
        )
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:  # a broken subscriber must not break calls
                log.exception("line_subscriber_failed", line=event.line)
