"""Appearance numbers of shared lines: which call sits on which line key of every SCA phone.

BroadWorks Shared Call Appearance (and the Yealink, Polycom and Cisco firmware built against it)
numbers the calls of a line 1, 2, 3...: `appearance-index=N` in `Call-Info` says "line key N".
Every phone of the line must agree on the numbers, so they are assigned here, once per line:

- an inbound call takes the lowest free index when it first shows on the line;
- an SCA phone *seizes* an index before dialling (the `line-seize` package): the index is held
  for it, with no call yet, until it dials (the call then takes that very index), unseizes, or
  the seizure lapses;
- a call keeps its index while it is answered, held, retrieved by another phone or transferred
  under the same call id, and frees it when it ends.

Indices run from 1 to `size` (24 by default: the line keys of a Yealink T5x with its side car,
and more simultaneous calls than one line carries in practice). A call that finds every index
taken has no appearance: it still rings, SCA phones just do not get a key for it. Bounding the
table by a constant rather than by "members + calls" keeps the numbers stable when a member is
added or a call ends, which is what users see.

This is bookkeeping only (sans-I/O, time passed in): `sca.ScaManager` decides when to seize,
bind and release and tells the phones; the state shown for an appearance (alerting, held...)
comes from the line model, never from here, so there is one source of truth for line state.
Nothing is persisted: after a restart there are no calls and the table starts empty.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

#: Appearances per line unless configured otherwise.
DEFAULT_SIZE = 24


@dataclass(eq=False, slots=True)
class Appearance:
    """One busy appearance: seized for a phone, or carrying a call.

    `deadline` (on the caller's clock) is when it lapses unless something happens first: a
    seizure lapses unless the phone dials or refreshes; a *provisional* call binding (an index
    handed out for a call before the line knows of it, see `Appearances.bind`) lapses unless
    the call shows on the line. A confirmed call appearance has no deadline: only the call's
    end frees it.
    """

    line: str
    index: int
    call_id: str | None = None  # None: seized, no call yet
    owner: Hashable | None = None  # who seized it (the line-seize subscription's key)
    deadline: float | None = None

    @property
    def seized(self) -> bool:
        return self.call_id is None


class AppearanceStats(NamedTuple):
    """Table sizes, for metrics and leak tests."""

    lines: int
    appearances: int
    seized: int
    deadlines: int  # heap entries, stale ones included


class Appearances:
    """Appearance indices of every line (see the module docstring)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a line needs at least one appearance, not {size}")
        self.size = size
        self._lines: dict[str, dict[int, Appearance]] = {}
        self._calls: dict[tuple[str, str], Appearance] = {}
        # (deadline, seq, appearance); an entry is stale once the appearance's deadline moved
        # or it was released: skipped when it comes up, compacted when they pile up.
        self._deadlines: list[tuple[float, int, Appearance]] = []
        self._seq = itertools.count()
        self._count = 0

    # --- queries ----------------------------------------------------------------------------
    def at(self, line: str, index: int) -> Appearance | None:
        return self._lines.get(line, {}).get(index)

    def of_call(self, line: str, call_id: str) -> Appearance | None:
        return self._calls.get((line, call_id))

    def index_of(self, line: str, call_id: str) -> int | None:
        app = self._calls.get((line, call_id))
        return None if app is None else app.index

    def of_line(self, line: str) -> list[Appearance]:
        """The line's busy appearances, by index."""
        return sorted(self._lines.get(line, {}).values(), key=lambda a: a.index)

    def __iter__(self) -> Iterator[Appearance]:
        for apps in self._lines.values():
            yield from apps.values()

    def __len__(self) -> int:
        return self._count

    def stats(self) -> AppearanceStats:
        seized = sum(a.seized for a in self)
        return AppearanceStats(len(self._lines), self._count, seized, len(self._deadlines))

    # --- seizing (line-seize) -----------------------------------------------------------------
    def seize(
        self, line: str, owner: Hashable, until: float, index: int | None = None
    ) -> Appearance | None:
        """Hold `index` (or the lowest free one) for `owner` until `until`; None if taken.

        Seizing an index that is in use fails rather than falling back to another: the phone
        asked for that key and shows the call it dials there (BroadWorks answers 480, and the
        phone tries again or picks another key).
        """
        if index is None:
            index = self._lowest_free(line)
            if index is None:
                return None
        elif not self._free(line, index):
            return None
        app = Appearance(line, index, None, owner)
        self._put(app)
        self._set_deadline(app, until)
        return app

    def extend(self, app: Appearance, until: float) -> bool:
        """Push a seizure's deadline (a line-seize refresh); False if it is no longer seized."""
        if not app.seized or not self._holds(app):
            return False
        self._set_deadline(app, until)
        return True

    def unseize(self, app: Appearance, owner: Hashable) -> bool:
        """Free a seizure of `owner`; False (and nothing done) if it became a call meanwhile."""
        if not app.seized or app.owner != owner or not self._holds(app):
            return False
        self._remove(app)
        return True

    def take(self, app: Appearance, call_id: str) -> Appearance:
        """The seized `app` now carries `call_id`: the phone dialled on the key it seized."""
        if not app.seized or not self._holds(app):
            raise ValueError(f"appearance {app.index} of {app.line} is not seized")
        old = self._calls.get((app.line, call_id))
        if old is not None:  # the call already had an index (a provisional one): move it
            self._remove(old)
        app.call_id = call_id
        app.owner = None
        app.deadline = None
        self._calls[(app.line, call_id)] = app
        return app

    # --- calls --------------------------------------------------------------------------------
    def bind(
        self, line: str, call_id: str, index: int | None = None, *, until: float | None = None
    ) -> Appearance | None:
        """The appearance of `call_id` on `line`, given one if it has none.

        `index` is the one the call should get (the phone dialled on it): used when free,
        otherwise the lowest free index is (the call must show somewhere rather than nowhere).
        `until`: a provisional binding that lapses then unless `confirm`ed or bound again
        without `until`; an existing binding is confirmed by a call without `until`.
        None when every index of the line is taken.
        """
        app = self._calls.get((line, call_id))
        if app is not None:
            if until is None:
                app.deadline = None
            return app
        if index is None or not self._free(line, index):
            index = self._lowest_free(line)
            if index is None:
                return None
        app = Appearance(line, index, call_id)
        self._put(app)
        self._calls[(line, call_id)] = app
        if until is not None:
            self._set_deadline(app, until)
        return app

    def confirm(self, line: str, call_id: str) -> None:
        """The call showed on the line: its appearance no longer lapses."""
        app = self._calls.get((line, call_id))
        if app is not None:
            app.deadline = None

    def release(self, line: str, call_id: str) -> Appearance | None:
        """The call left the line: free its index. Returns what was freed, if anything."""
        app = self._calls.get((line, call_id))
        if app is not None:
            self._remove(app)
        return app

    # --- time ---------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and not self._due_entry(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float) -> list[Appearance]:
        """Free every seizure and provisional binding whose deadline has passed."""
        heap = self._deadlines
        gone: list[Appearance] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._due_entry(entry):
                self._remove(entry[2])
                gone.append(entry[2])
        return gone

    def clear(self) -> None:
        self._count = 0
        self._lines.clear()
        self._calls.clear()
        self._deadlines.clear()

    # --- internals ----------------------------------------------------------------------------
    def _free(self, line: str, index: int) -> bool:
        return 1 <= index <= self.size and index not in self._lines.get(line, {})

    def _lowest_free(self, line: str) -> int | None:
        used = self._lines.get(line, {})
        return next((i for i in range(1, self.size + 1) if i not in used), None)

    def _holds(self, app: Appearance) -> bool:
        return self._lines.get(app.line, {}).get(app.index) is app

    def _put(self, app: Appearance) -> None:
        self._lines.setdefault(app.line, {})[app.index] = app
        self._count += 1

    def _remove(self, app: Appearance) -> None:
        apps = self._lines.get(app.line)
        if apps is not None and apps.get(app.index) is app:
            del apps[app.index]
            self._count -= 1
            if not apps:
                del self._lines[app.line]
        if app.call_id is not None and self._calls.get((app.line, app.call_id)) is app:
            del self._calls[(app.line, app.call_id)]
        app.deadline = None

    def _set_deadline(self, app: Appearance, until: float) -> None:
        app.deadline = until
        heapq.heappush(self._deadlines, (until, next(self._seq), app))
        if len(self._deadlines) > 64 + 2 * self._count:
            self._compact()

    def _due_entry(self, entry: tuple[float, int, Appearance]) -> bool:
        app = entry[2]
        return app.deadline == entry[0] and self._holds(app)

    def _compact(self) -> None:
        """Drop stale heap entries (refreshed seizures push a new entry each time)."""
        self._deadlines = [e for e in self._deadlines if self._due_entry(e)]
        heapq.heapify(self._deadlines)
