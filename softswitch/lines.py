"""The line model's event bus: every change of a call on a line, published in one place.

Whatever users see of a shared line (BLF keys, SCA, the HTTP Lines view, call history) is derived
from these events, so nothing else keeps its own copy of line state. Subscribers are plain
callables run synchronously, in order, with the event: cheap, deterministic and testable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from softswitch.logline import EventLog

log = EventLog(__name__)


class CallState(StrEnum):
    RINGING = "ringing"  # inbound: phones of the line alert
    DIALING = "dialing"  # outbound: the far end has not answered yet
    ACTIVE = "active"
    HELD = "held"
    ENDED = "ended"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True, init=False)
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
    #: The party's dialog as the party's phone knows it: (Call-ID, the phone's tag, our tag).
    #: Phones quote it in `Replaces` to pick the call up; dialog-info NOTIFYs carry it.
    dialog: tuple[str, str, str] | None = None
    private: bool = False  # held privately: nobody else may retrieve it

    def __init__(
        self,
        line: str,
        call_id: str,
        state: CallState,
        direction: Direction,
        party: str | None,
        remote: str,
        remote_name: str | None,
        started_at: float,
        at: float,
        reason: str | None = None,
        dialog: tuple[str, str, str] | None = None,
        private: bool = False,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18); frozen, hence
        # object.__setattr__, which mypyc turns into a plain store.
        object.__setattr__(self, "line", line)
        object.__setattr__(self, "call_id", call_id)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "party", party)
        object.__setattr__(self, "remote", remote)
        object.__setattr__(self, "remote_name", remote_name)
        object.__setattr__(self, "started_at", started_at)
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "dialog", dialog)
        object.__setattr__(self, "private", private)


@dataclass(frozen=True, slots=True, init=False)
class LineCall:
    """The current state of one call on a line, as every member sees it."""

    call_id: str
    state: CallState
    direction: Direction
    party: str | None
    remote: str
    remote_name: str | None
    started_at: float
    changed_at: float
    dialog: tuple[str, str, str] | None
    private: bool

    def __init__(
        self,
        call_id: str,
        state: CallState,
        direction: Direction,
        party: str | None,
        remote: str,
        remote_name: str | None,
        started_at: float,
        changed_at: float,
        dialog: tuple[str, str, str] | None,
        private: bool,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "call_id", call_id)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "party", party)
        object.__setattr__(self, "remote", remote)
        object.__setattr__(self, "remote_name", remote_name)
        object.__setattr__(self, "started_at", started_at)
        object.__setattr__(self, "changed_at", changed_at)
        object.__setattr__(self, "dialog", dialog)
        object.__setattr__(self, "private", private)

    @classmethod
    def of(cls, e: LineEvent) -> LineCall:
        return cls(
            e.call_id,
            e.state,
            e.direction,
            e.party,
            e.remote,
            e.remote_name,
            e.started_at,
            e.at,
            e.dialog,
            e.private,
        )


Subscriber = Callable[[LineEvent], None]


class LineModel:
    """The single source of truth for what is on each line right now.

    It is the bus's first subscriber, so by the time any other subscriber sees an event the
    model already reflects it. `version(line)` increases by one per change of that line: the
    dialog-info `version` attribute and the HTTP event stream's ids come from it.
    """

    def __init__(self) -> None:
        self._calls: dict[str, dict[str, LineCall]] = {}
        self._versions: dict[str, int] = {}

    def apply(self, event: LineEvent) -> None:
        calls = self._calls.setdefault(event.line, {})
        if event.state is CallState.ENDED:
            calls.pop(event.call_id, None)
            if not calls:
                del self._calls[event.line]
        else:
            calls[event.call_id] = LineCall.of(event)
        self._versions[event.line] = self._versions.get(event.line, 0) + 1

    def calls(self, line: str) -> list[LineCall]:
        """The line's calls, oldest first."""
        return sorted(self._calls.get(line, {}).values(), key=lambda c: c.started_at)

    def call(self, line: str, call_id: str) -> LineCall | None:
        return self._calls.get(line, {}).get(call_id)

    def version(self, line: str) -> int:
        return self._versions.get(line, 0)

    def busy_lines(self) -> list[str]:
        return sorted(self._calls)


class LineBus:
    """Publish/subscribe for line events, keeping the `LineModel` current first."""

    def __init__(self, model: LineModel | None = None) -> None:
        self.model = model or LineModel()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    @property
    def subscribers(self) -> int:
        """How many subscribers are live: the model's views and every open event stream."""
        return len(self._subscribers)

    def publish(self, event: LineEvent) -> None:
        log.info(
            "line_event",
            line=event.line,
            call=event.call_id,
            state=event.state,  # StrEnums: written as their text (`.value` is interpreted)
            direction=event.direction,
            party=event.party,
            remote=event.remote,
            reason=event.reason,
        )
        self.model.apply(event)
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:  # a broken subscriber must not break calls
                log.exception("line_subscriber_failed", line=event.line)
