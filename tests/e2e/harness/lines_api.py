"""Clients for the service's HTTP Lines API: ``GET /api/lines`` and the ``/api/events`` stream.

Why raw sockets and asyncio rather than an HTTP library: the event stream is a long-lived
``text/event-stream`` response read incrementally while the test drives phones, and the test
must see each ``event: line`` as it arrives, in order, without buffering or reconnects hiding
anything. ``EventStream`` runs one asyncio loop in a daemon thread, parses server-sent events
as they come and keeps them in a list the test waits on; everything is loopback and bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .ports import LOOPBACK


def _auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _request(path: str, user: str, password: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nAuthorization: {_auth(user, password)}\r\n"
        "Accept: application/json, text/event-stream\r\nConnection: close\r\n\r\n"
    ).encode()


async def _get(port: int, path: str, user: str, password: str, timeout: float) -> tuple[int, bytes]:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(_request(path, user, password))
            await writer.drain()
            data = await reader.read()  # Connection: close: the body ends with the stream
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def get_lines(port: int, user: str, password: str, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /api/lines`` as ``user`` (HTTP Basic); the decoded JSON (asserts a 200)."""
    status, body = asyncio.run(_get(port, "/api/lines", user, password, timeout))
    if status != 200:
        raise AssertionError(f"GET /api/lines as {user}: {status}\n{body!r}")
    result: dict[str, Any] = json.loads(body)
    return result


def line_calls(view: dict[str, Any], line: str) -> list[dict[str, Any]]:
    """The calls of ``line`` in a ``/api/lines`` body (or snapshot)."""
    for entry in view.get("lines", []):
        if entry.get("line") == line:
            calls: list[dict[str, Any]] = entry.get("calls", [])
            return calls
    raise AssertionError(f"line {line} not in {view}")


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event: its type (``snapshot``, ``line``), id and decoded JSON data."""

    event: str
    id: str
    data: dict[str, Any]
    received_at: float


class EventStream:
    """``GET /api/events`` as ``user``, read in a background thread until ``close()``."""

    def __init__(self, port: int, user: str, password: str, *, timeout: float = 5.0) -> None:
        self.port = port
        self.user = user
        self.password = password
        self.events: list[ServerEvent] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.closed = False  # the server ended the stream
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sse-{user}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("event stream thread did not start")
        self.wait_for(lambda e: e.event == "snapshot", timeout, what="the snapshot")

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._task = self._loop.create_task(self._read())
            self._started.set()
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported through wait_for
            self.error = exc
        finally:
            self._loop.close()
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    async def _read(self) -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        try:
            writer.write(_request("/api/events", self.user, self.password))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            self.status = int(head.split(b" ", 2)[1])
            buf = b""
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buf += chunk.replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    self._on_block(block.decode("utf-8", "replace"))
        finally:
            writer.close()

    def _on_block(self, block: str) -> None:
        fields: dict[str, str] = {}
        data: list[str] = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue  # keep-alive comment
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
        if not data and "event" not in fields:
            return
        event = ServerEvent(
            fields.get("event", "message"),
            fields.get("id", ""),
            json.loads("\n".join(data)) if data else {},
            time.monotonic(),
        )
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(
        self,
        predicate: Callable[[ServerEvent], bool],
        timeout: float = 5.0,
        *,
        since: int = 0,
        what: str = "a matching event",
    ) -> ServerEvent:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[since:]:
                    if predicate(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise AssertionError(
                        f"/api/events as {self.user}: no {what} within {timeout}s "
                        f"(status {self.status}, error {self.error!r}, closed {self.closed}); "
                        f"events: {self.describe()}"
                    )
                self._cond.wait(left)

    def line_events(self, line: str) -> list[ServerEvent]:
        with self._cond:
            return [e for e in self.events if e.event == "line" and e.data.get("line") == line]

    def states(self, line: str) -> list[str]:
        """The ``state`` of every ``line`` event of ``line``, in order."""
        return [str(e.data.get("state")) for e in self.line_events(line)]

    def describe(self) -> str:
        with self._cond:
            evs = list(self.events)
        return "; ".join(
            f"{e.event}:{e.data.get('line', '')}:{e.data.get('state', '')}"
            f":{e.data.get('party', '')}"
            for e in evs
        )

    def close(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(3.0)
