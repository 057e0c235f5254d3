"""Transaction timers (RFC 3261 §17 Table 4, RFC 6026 §8.4) and the heap that schedules them.

Every duration derives from three settings, T1, T2 and T4, so that a deployment on a slow network
can raise T1 once and get consistent values everywhere. The retransmission timers (A, E, G) run
only on unreliable transports, and the "wait for stragglers" timers (D, I, J, K) are zero on
reliable ones: TCP already retransmits, and a stream never delivers a late duplicate.

The heap is shared by all transactions of a layer. Cancelling a timer is far more common than
firing one (a 200 OK to a REGISTER stops E and F), and removing from the middle of a heap is
O(n), so cancellation is lazy: the owner forgets the deadline and the stale entry is skipped when
it reaches the top. Garbage is bounded by compacting once stale entries outnumber live ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from heapq import heapify, heappop, heappush


class Timer(Enum):
    """Timer names. Letters are RFC 3261/6026's; the last two are the §13.3.1.4 2xx timers."""

    # Identity hashing (members are singletons) runs in C; Enum's own __hash__ is a
    # Python call on every dict and set lookup of the message path.
    __hash__ = object.__hash__

    A = "A"  # INVITE client: request retransmission (unreliable only), doubling without cap
    B = "B"  # INVITE client: transaction timeout
    D = "D"  # INVITE client: wait for response retransmissions in Completed
    E = "E"  # non-INVITE client: request retransmission (unreliable only), capped at T2
    F = "F"  # non-INVITE client: transaction timeout
    G = "G"  # INVITE server: non-2xx final response retransmission (unreliable only)
    H = "H"  # INVITE server: wait for ACK
    I = "I"  # noqa: E741  INVITE server: wait for ACK retransmissions in Confirmed
    J = "J"  # non-INVITE server: wait for request retransmissions in Completed
    K = "K"  # non-INVITE client: wait for response retransmissions in Completed
    L = "L"  # RFC 6026 INVITE server: absorb INVITE retransmissions in Accepted
    M = "M"  # RFC 6026 INVITE client: pass 2xx retransmissions up in Accepted
    RESEND_2XX = "2xx"  # §13.3.1.4: the UAS core retransmits its 2xx until the ACK
    WAIT_ACK = "2xx ACK"  # §13.3.1.4: give up on the ACK for a 2xx after 64*T1


#: Timers that only exist to retransmit over an unreliable transport.
RETRANSMIT_TIMERS = frozenset((Timer.A, Timer.E, Timer.G))

#: Timers that only absorb late duplicates, which a reliable transport never delivers.
ZERO_WHEN_RELIABLE = frozenset((Timer.D, Timer.I, Timer.J, Timer.K))


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """T1 (RTT estimate), T2 (retransmission cap for non-INVITE) and T4 (network lifetime)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.t1 <= self.t2 or self.t4 < 0:
            raise ValueError(f"invalid timer settings {self!r}: need 0 < T1 <= T2 and T4 >= 0")

    @property
    def timeout(self) -> float:
        """64*T1: Timers B, F, H, J (unreliable), L, M and the 2xx ACK wait."""
        return 64 * self.t1

    def duration(self, timer: Timer, reliable: bool) -> float | None:
        """The initial duration of `timer`, or None when it is not used on this transport.

        The §13.3.1.4 2xx retransmission runs on every transport: it is end-to-end, and a
        proxy downstream may use UDP even when our hop is TCP.
        """
        if timer in RETRANSMIT_TIMERS:
            return None if reliable else self.t1
        if reliable and timer in ZERO_WHEN_RELIABLE:
            return 0.0
        if timer is Timer.RESEND_2XX:
            return self.t1
        if timer is Timer.D:
            return 32.0
        if timer is Timer.I or timer is Timer.K:
            return self.t4
        return self.timeout

    def backoff(self, timer: Timer, interval: float) -> float:
        """The next retransmission interval: A doubles without bound, E/G/2xx stop at T2."""
        doubled = 2 * interval
        return doubled if timer is Timer.A else min(doubled, self.t2)


class TimerOwner:
    """Something that arms timers on a `TimerHeap`: a transaction or a 2xx retransmitter.

    `timers` maps each armed timer to its deadline; a heap entry is live only while it agrees.
    """

    __slots__ = ("timers",)

    def __init__(self) -> None:
        self.timers: dict[Timer, float] = {}


_Entry = tuple[float, int, TimerOwner, Timer]


class TimerHeap:
    """Deadlines of every armed timer of a layer, earliest first, with lazy deletion."""

    __slots__ = ("_entries", "_seq", "_stale")

    #: Compact only past this many stale entries, so small heaps are never rebuilt.
    COMPACT_MIN = 1024

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        # Tie-breaker: owners are never compared, equal deadlines stay FIFO. A plain int, not
        # itertools.count: `next()` and `heapq.` lookups were a third of arming a timer.
        self._seq = 0
        self._stale = 0

    def __len__(self) -> int:
        """Entries held, stale ones included (what memory use is proportional to)."""
        return len(self._entries)

    def arm(self, owner: TimerOwner, timer: Timer, deadline: float) -> None:
        """Set `timer` of `owner` to fire at `deadline`, replacing any earlier setting."""
        if timer in owner.timers:
            self._stale += 1
        owner.timers[timer] = deadline
        self._seq += 1
        heappush(self._entries, (deadline, self._seq, owner, timer))

    def cancel_all(self, owner: TimerOwner) -> None:
        """Forget every timer of `owner`; its heap entries become garbage."""
        if owner.timers:
            self._stale += len(owner.timers)
            owner.timers.clear()
            self._maybe_compact()

    def earliest(self) -> float | None:
        """The earliest live deadline, dropping stale entries that hide it."""
        entries = self._entries
        while entries and not _live(entries[0]):
            heappop(entries)
            self._stale = max(0, self._stale - 1)
        return entries[0][0] if entries else None

    def pop_due(self, now: float) -> tuple[TimerOwner, Timer] | None:
        """Disarm and return the next timer due at `now`, or None when none is."""
        entries = self._entries
        while entries and entries[0][0] <= now:
            deadline, _, owner, timer = heappop(entries)
            if owner.timers.get(timer) == deadline:
                del owner.timers[timer]
                return owner, timer
            self._stale = max(0, self._stale - 1)
        return None

    def _maybe_compact(self) -> None:
        if self._stale > self.COMPACT_MIN and 2 * self._stale > len(self._entries):
            self._entries = [e for e in self._entries if _live(e)]
            heapify(self._entries)
            self._stale = 0


def _live(entry: _Entry) -> bool:
    return entry[2].timers.get(entry[3]) == entry[0]
