"""Overload control for UDP: drop new-work requests that waited too long in the socket queue.

When more SIP arrives than the service can handle, datagrams queue in the kernel's receive
buffer. A request that waited longer than T1 (500 ms) there has already been retransmitted by
its sender, and the copies are queued behind it: answering the stale original and then parsing
each retransmission only to absorb it is how an overloaded server spends its CPU on work nobody
waits for, falls further behind and ends up answering everything seconds late (measured: at 4x
capacity every REGISTER took ~4 retransmissions and the 99th percentile reached 12 s). Refusing
with 503 does not help either: the refusal costs a parse and a response for each queued copy.

So the transport measures each datagram's age (the kernel's receive timestamp) and this policy
drops, unparsed, the requests that start new work and waited longer than `max_delay`; their
senders retransmit, and the copy that is fresh enough is handled. Dropping costs a few
microseconds, so the queue drains to `max_delay` and the service keeps answering at its full
rate with a bounded delay.

A stale INVITE that starts a call is not dropped but refused: a `503` built from its raw
bytes (no parse, no transaction) costs a small fraction of setting up the call, and it ends
the caller's retransmissions at once, where a dropped INVITE is sent again after 0.5, 1, 2, 4 s
and may lose the race each time (measured: at 1.3x the call capacity, dropping took the 99th
percentile of call set-up to 7.5 s).

What finishes work already paid for is never dropped, however late: responses, ACK, CANCEL,
BYE, and requests that answer our challenge (they carry Authorization or Proxy-Authorization).
A registration or a call is two requests, the second one authenticated; dropping the second
would waste the 401 spent on the first and leave the phone waiting longest (measured in
docs/benchmarks.md), so under overload the service refuses new work at the door and completes
what it has started.

Sans-I/O: the caller supplies the age and the clock; the policy only counts and decides.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

#: Messages that finish or free work already done: never dropped, however late.
_ALWAYS = (b"SIP/", b"ACK ", b"CANCEL ", b"BYE ")

#: In "Authorization:" and "Proxy-Authorization:" whatever the case of the first letter.
_CREDENTIALS = (b"uthorization:", b"UTHORIZATION:")


class Verdict(Enum):
    """What to do with one received datagram."""

    __hash__ = object.__hash__

    ADMIT = "admit"
    DROP = "drop"  # unread: the sender retransmits, and a fresher copy is handled
    REFUSE = "refuse"  # a stale new INVITE: answer 503 statelessly, the caller stops at once


#: Branches of refused INVITEs remembered (to drop the ACKs of our 503s): 64·T1 (32 s, the
#: INVITE's retransmission window) at 2,000 refusals a second.
_REMEMBERED_INVITES = 65536


def _remember(branches: dict[bytes, None], branch: bytes) -> None:
    branches[branch] = None
    if len(branches) > _REMEMBERED_INVITES:
        del branches[next(iter(branches))]


def _branch(data: bytes) -> bytes:
    """The first Via's branch parameter, found without parsing (b"" if there is none)."""
    found = _BRANCH.search(data)
    return found.group(1) if found else b""


_BRANCH = re.compile(rb"branch=([^;,\s]*)")

#: Seconds between two `OverloadReport`s while datagrams are being dropped.
REPORT_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class OverloadReport:
    """What was dropped since the last report, for one structured log event."""

    dropped: int
    refused: int  # stale new INVITEs answered 503
    oldest: float  # seconds: the largest age among the dropped and refused
    kernel_drops: int  # datagrams the kernel dropped (receive buffer full) since the last report


class StaleFilter:
    """Admit or drop each received UDP datagram by its age.

    `max_delay` in seconds; 0 turns the filter off (everything is admitted). `retransmits`
    says whether a datagram repeats a request the transaction layer already has (asked only
    for a stale INVITE about to be refused; None: never).
    """

    __slots__ = (
        "_dropped_reported",
        "_kernel_drops",
        "_last_kernel",
        "_oldest",
        "_refused_invites",
        "_refused_reported",
        "dropped",
        "max_delay",
        "refused",
        "retransmits",
    )  # fmt: skip

    def __init__(
        self, max_delay: float, retransmits: Callable[[bytes], bool] | None = None
    ) -> None:
        self.max_delay = max_delay
        self.retransmits = retransmits
        self.dropped = 0  # in total, for stats
        self._dropped_reported = 0  # ... of which the reports have told
        self.refused = 0  # stale new INVITEs answered 503, in total
        #: Top-Via branches of the INVITEs answered 503, oldest first (insertion order).
        self._refused_invites: dict[bytes, None] = {}
        self._refused_reported = 0
        self._oldest = 0.0
        self._kernel_drops = 0  # cumulative count the kernel last told us
        self._last_kernel = 0  # ... and what the last report included

    def judge(self, data: bytes, age: float) -> Verdict:
        """ADMIT unless `data` is a new-work request that waited longer than `max_delay`; then
        REFUSE (503) for a new INVITE, DROP for anything else."""
        if not self.max_delay:
            return Verdict.ADMIT
        if data.startswith(b"INVITE "):
            return self._judge_invite(data, age)
        if self._refused_invites and data.startswith(b"ACK ") and self._acks_refusal(data):
            self.dropped += 1
            return Verdict.DROP  # the ACK for our stateless 503: nothing to do with it
        if age <= self.max_delay or data.startswith(_ALWAYS):
            return Verdict.ADMIT
        if _CREDENTIALS[0] in data or _CREDENTIALS[1] in data:
            return Verdict.ADMIT  # answers our challenge: the second half of work already begun
        return self._drop(age)

    def _judge_invite(self, data: bytes, age: float) -> Verdict:
        """A stale INVITE is refused, unless it retransmits one we admitted: that call is under
        way (its 100 Trying was late), and a 503 would kill it on the caller's side while we
        go on answering it. Such a copy goes to the transaction layer, which repeats the 100
        Trying and stops the caller's retransmissions. The other way round, a copy of an
        INVITE we refused is refused again however fresh: set up now, its call would be
        answered to a caller that already gave it up on our 503."""
        refused = self._refused_invites
        if refused and _branch(data) in refused:
            return self._refuse(data, age)  # a copy of one we refused: the same answer again
        if age <= self.max_delay or _CREDENTIALS[0] in data or _CREDENTIALS[1] in data:
            return Verdict.ADMIT
        if self.retransmits is not None and self.retransmits(data):
            return Verdict.ADMIT
        return self._refuse(data, age)

    def _refuse(self, data: bytes, age: float) -> Verdict:
        if age > self._oldest:
            self._oldest = age
        self.refused += 1
        _remember(self._refused_invites, _branch(data))
        return Verdict.REFUSE

    def _acks_refusal(self, ack: bytes) -> bool:
        """An ACK for a non-2xx answer carries the INVITE's branch (RFC 3261 §17.1.1.3): one
        with the branch of an INVITE we refused acknowledges our 503, which has no transaction
        to stop, and need not be parsed at all (under overload there is one per refusal)."""
        return _branch(ack) in self._refused_invites

    def _drop(self, age: float) -> Verdict:
        if age > self._oldest:
            self._oldest = age
        self.dropped += 1
        return Verdict.DROP

    def kernel_dropped(self, total: int) -> None:
        """The kernel's cumulative drop count for the socket (SO_RXQ_OVFL), when it changes."""
        self._kernel_drops = total

    def report(self) -> OverloadReport | None:
        """The drops since the last report, or None if there were none. The caller paces the
        reports (one every `REPORT_INTERVAL` s): the log must not add work to an overload."""
        if not self._oldest and self._kernel_drops == self._last_kernel:
            return None
        report = OverloadReport(
            self.dropped - self._dropped_reported,
            self.refused - self._refused_reported,
            self._oldest,
            self._kernel_drops - self._last_kernel,
        )
        self._dropped_reported = self.dropped
        self._refused_reported = self.refused
        self._oldest = 0.0
        self._last_kernel = self._kernel_drops
        return report
