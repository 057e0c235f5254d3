"""One event-loop reader for all the relay's sockets: an epoll set of our own.

A relay with 1,000 calls has 4,000+ sockets, each receiving 50 packets/s, so nearly every
readiness event carries exactly one packet. Registering each socket with `loop.add_reader`
costs, per packet, the loop's own dispatch: under uvloop a libuv poll handle, a `Handle` run in
a context, measured at ~1.5-2 us more per packet than uvloop's UDP transports (D14). Here the
loop watches a single epoll descriptor; when it is readable, `_dispatch` asks epoll for up to
`BATCH` ready sockets and calls their handlers in one Python loop: one loop callback per batch
instead of per packet. Level-triggered: a handler reads one packet, and a socket with more
queued is reported again by the next poll (or, when the relay is behind, drained at once).

Where `select.epoll` does not exist, sockets are registered with the loop directly.
"""

from __future__ import annotations

import asyncio
import select
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

BATCH: Final = 256
"""Ready sockets handled per loop callback: ~2.5 ms of relaying, then signalling gets a turn."""

LATER_BATCH: Final = 8
"""Deferred jobs (`Poller.later`) run per loop iteration: ~0.4 ms of socket setup at most."""

Handler = Callable[[], None]


class Poller:
    """Calls `handler()` whenever its socket is readable; bound to one running loop."""

    __slots__ = ("_drainers", "_epoll", "_handlers", "_later", "_later_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Indexed by fd (a list: cheaper per packet than a dict), None where nothing is watched.
        self._handlers: list[Handler | None] = []
        self._drainers: list[Handler | None] = []  # used when behind: see `_dispatch`
        self._later: deque[Handler] = deque()
        self._later_handle: asyncio.Handle | None = None
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        if self._epoll is not None:
            loop.add_reader(
                self._epoll.fileno(), _dispatch, self._epoll.poll, self._handlers, self._drainers
            )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add(self, fd: int, handler: Handler, drainer: Handler | None = None) -> None:
        """Watch `fd`: `handler` reads one packet, `drainer` (if given) several."""
        if self._epoll is None:
            self._loop.add_reader(fd, handler)
            return
        handlers, drainers = self._handlers, self._drainers
        if fd >= len(handlers):
            handlers.extend([None] * (fd + 1 - len(handlers)))
            drainers.extend([None] * (fd + 1 - len(drainers)))
        self._epoll.register(fd, select.EPOLLIN)
        handlers[fd] = handler
        drainers[fd] = drainer or handler

    def remove(self, fd: int) -> None:
        """Stop watching `fd`; call it before closing the socket. Idempotent."""
        if self._epoll is None:
            cast(Any, self._loop).remove_reader(fd)  # uvloop returns None, not a bool
        elif fd < len(self._handlers) and self._handlers[fd] is not None:
            self._handlers[fd] = self._drainers[fd] = None
            self._epoll.unregister(fd)

    def later(self, job: Handler) -> None:
        """Run `job` soon, but at most `LATER_BATCH` jobs per loop iteration: for costly setup
        work that arrives in bursts and must not stall the packets meanwhile."""
        self._later.append(job)
        if self._later_handle is None:
            self._later_handle = self._loop.call_soon(self._run_later)

    def _run_later(self) -> None:
        self._later_handle = None
        for _ in range(min(LATER_BATCH, len(self._later))):
            self._later.popleft()()
        if self._later:
            self._later_handle = self._loop.call_soon(self._run_later)

    def close(self) -> None:
        if self._later_handle is not None:
            self._later_handle.cancel()
            self._later_handle = None
        self._later.clear()
        if self._epoll is not None:
            cast(Any, self._loop).remove_reader(self._epoll.fileno())  # None under uvloop
            self._epoll.close()
            self._handlers.clear()


def _dispatch(
    poll: Callable[[float, int], list[tuple[int, int]]],
    handlers: list[Handler | None],
    drainers: list[Handler | None],
) -> None:
    """The loop callback: run the handler of every ready socket (a handler may close sockets,
    so one closed during this batch is skipped).

    A full batch means the relay is behind: sockets then hold several packets each, and their
    drainers read them in one go instead of one epoll round per packet. Otherwise a socket
    rarely holds two, and trying for a second would cost a failed system call and an exception.
    """
    events = poll(0, BATCH)
    table = drainers if len(events) == BATCH else handlers
    for fd, _ in events:
        handler = table[fd]
        if handler is not None:
            handler()
