"""SQLite implementation of the store, with group commit.

One writer thread owns the connection. Callers enqueue a write and await its future (or, on the
REGISTER hot path, pass a plain callback: no task, no future); the thread takes everything
queued, runs it in one transaction, commits (WAL, synchronous=FULL: durable across power loss,
not just kill -9) and hands all the outcomes back to the loop in one `call_soon_threadsafe`.
Under load many REGISTERs share one fsync, which is how durability and thousands of writes per
second coexist. The event loop never blocks on the disk.

Binding writes queued together are merged into one DELETE and one INSERT `executemany` without
a savepoint each: their rows are plain values, so only the commit itself can fail, and then it
fails for all of them alike. Other jobs keep a savepoint, so one failing job does not take the
rest of its batch down.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from softswitch.logline import EventLog

from . import BindingKey, BindingRecord

log = EventLog(__name__)

T = TypeVar("T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (
    aor TEXT NOT NULL,
    uri TEXT NOT NULL,
    contact TEXT NOT NULL,
    expires_at REAL NOT NULL,
    call_id TEXT NOT NULL,
    cseq INTEGER NOT NULL,
    source TEXT NOT NULL,
    auth_user TEXT NOT NULL,
    user_agent TEXT NOT NULL DEFAULT '',
    q REAL,
    PRIMARY KEY (aor, uri)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_flags (
    user TEXT NOT NULL,
    flag TEXT NOT NULL,
    line TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user, flag, line)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '1');
"""

Done = Callable[[Any, BaseException | None], None]
"""Called on the event loop with (result, None) or (None, error) once a write is durable."""

_Job = tuple[Callable[[sqlite3.Connection], Any], Done]
_STOP = object()

_INSERT_BINDING = (
    "INSERT OR REPLACE INTO bindings (aor, uri, contact, expires_at, call_id, cseq,"
    " source, auth_user, user_agent, q) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_DELETE_BINDING = "DELETE FROM bindings WHERE aor = ? AND uri = ?"


class _BindingWrite:
    """One REGISTER's rows, merged with its neighbours in the batch by the writer thread."""

    __slots__ = ("done", "keys", "rows")

    def __init__(self, rows: list[tuple[Any, ...]], keys: list[tuple[str, str]], done: Done):
        self.rows = rows
        self.keys = keys
        self.done = done


class StoreError(Exception):
    """The database refused a write or could not be opened."""


class SqliteStore:
    """`Store` on one SQLite file in WAL mode."""

    def __init__(self, path: Path, max_batch: int = 1000) -> None:
        self.path = path
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | _BindingWrite | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0  # for benchmarks: writes per commit = jobs / commits
        self.jobs = 0

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(
            target=self._run, args=(ready,), name="sqlite-writer", daemon=True
        )
        self._writer.start()
        await ready

    async def close(self) -> None:
        if self._writer is None:
            return
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._writer = None

    # --- the writer thread ----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            self._loop.call_soon_threadsafe(_fail, ready, StoreError(f"{self.path}: {exc}"))
            return
        self._loop.call_soon_threadsafe(_resolve, ready, None)
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch: list[_Job | _BindingWrite] = [first]  # type: ignore[list-item]
                stop = False
                while len(batch) < self.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)  # type: ignore[arg-type]
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job | _BindingWrite]) -> None:
        assert self._loop is not None
        results: list[tuple[Done, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            writes = [job for job in batch if isinstance(job, _BindingWrite)]
            if writes:
                self._write_bindings(conn, writes)
                results += [(w.done, None, None) for w in writes]
            for job in batch:
                if not isinstance(job, _BindingWrite):
                    results.append(self._run_job(conn, *job))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("store_commit_failed", error=str(exc), jobs=len(batch))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(str(exc))
            results = [(_done_of(job), None, error) for job in batch]
        self.commits += 1
        self.jobs += len(batch)
        self._loop.call_soon_threadsafe(_settle_all, results)

    @staticmethod
    def _write_bindings(conn: sqlite3.Connection, writes: list[_BindingWrite]) -> None:
        """The batch's net effect per (aor, uri), in queue order: a later REGISTER's delete
        beats an earlier one's upsert of the same contact, and the other way round."""
        final: dict[tuple[str, str], tuple[Any, ...] | None] = {}
        for w in writes:
            for key in w.keys:
                final[key] = None
            for row in w.rows:
                final[(row[0], row[1])] = row
        deletes = [key for key, row in final.items() if row is None]
        if deletes:
            conn.executemany(_DELETE_BINDING, deletes)
        rows = [row for row in final.values() if row is not None]
        if rows:
            conn.executemany(_INSERT_BINDING, rows)

    @staticmethod
    def _run_job(
        conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any], done: Done
    ) -> tuple[Done, Any, BaseException | None]:
        conn.execute("SAVEPOINT job")
        try:
            value = fn(conn)
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            return done, None, StoreError(str(exc))
        conn.execute("RELEASE job")
        return done, value, None

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._writer is None or self._loop is None:
            raise StoreError("store is not open")
        return self._loop

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        fut: asyncio.Future[T] = self._check_open().create_future()
        self._queue.put((fn, _future_done(fut)))
        return await fut

    # --- bindings -------------------------------------------------------------------------
    async def load_bindings(self, now: float) -> list[BindingRecord]:
        def load(conn: sqlite3.Connection) -> list[BindingRecord]:
            conn.execute("DELETE FROM bindings WHERE expires_at <= ?", (now,))
            rows = conn.execute(
                "SELECT aor, contact, uri, expires_at, call_id, cseq, source, auth_user,"
                " user_agent, q FROM bindings ORDER BY aor"
            ).fetchall()
            return [BindingRecord(*row) for row in rows]

        return await self._submit(load)

    async def save_bindings(self, upserts: list[BindingRecord], deletes: list[BindingKey]) -> None:
        fut: asyncio.Future[None] = self._check_open().create_future()
        self.save_bindings_then(upserts, deletes, _future_done(fut))
        await fut

    def save_bindings_then(
        self, upserts: list[BindingRecord], deletes: list[BindingKey], done: Done
    ) -> None:
        """`save_bindings` for the REGISTER hot path: `done(None, error)` runs on the loop once
        the rows are durable (error None) or the commit failed. No task, no future."""
        self._check_open()
        rows = [
            (b.aor, b.uri, b.contact, b.expires_at, b.call_id, b.cseq, b.source, b.auth_user,
             b.user_agent, b.q)
            for b in upserts
        ]  # fmt: skip
        keys = [(k.aor, k.uri) for k in deletes]
        self._queue.put(_BindingWrite(rows, keys, done))

    async def purge_expired_bindings(self, now: float) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM bindings WHERE expires_at <= ?", (now,)).rowcount

        return await self._submit(purge)

    # --- user flags (DND, ring opt-out) ---------------------------------------------------
    async def load_user_flags(self) -> list[tuple[str, str, str]]:
        def load(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
            return conn.execute("SELECT user, flag, line FROM user_flags").fetchall()

        return await self._submit(load)

    async def set_user_flag(self, user: str, flag: str, line: str, on: bool) -> None:
        def save(conn: sqlite3.Connection) -> None:
            if on:
                conn.execute(
                    "INSERT OR IGNORE INTO user_flags VALUES (?, ?, ?)", (user, flag, line)
                )
            else:
                conn.execute(
                    "DELETE FROM user_flags WHERE user = ? AND flag = ? AND line = ?",
                    (user, flag, line),
                )

        await self._submit(save)


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _future_done(fut: asyncio.Future[Any]) -> Done:
    def done(value: Any, exc: BaseException | None) -> None:
        if exc is None:
            _resolve(fut, value)
        else:
            _fail(fut, exc)

    return done


def _done_of(job: _Job | _BindingWrite) -> Done:
    return job.done if isinstance(job, _BindingWrite) else job[1]


def _settle_all(results: list[tuple[Done, Any, BaseException | None]]) -> None:
    for done, value, exc in results:
        try:
            done(value, exc)
        except Exception:  # one caller's bug must not strand the others' responses
            log.exception("store_callback_failed")
