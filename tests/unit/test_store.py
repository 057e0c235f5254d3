"""The SQLite store: durable bindings, group commit, purge."""

from __future__ import annotations

import asyncio
from pathlib import Path

from softswitch.store import BindingKey, BindingRecord
from softswitch.store.sqlite import SqliteStore, StoreError


def record(aor: str, uri: str, expires_at: float) -> BindingRecord:
    return BindingRecord(
        aor=aor,
        contact=f"<{uri}>",
        uri=uri,
        expires_at=expires_at,
        call_id="c",
        cseq=1,
        source="udp:127.0.0.1:5090",
        auth_user=aor,
    )


async def test_bindings_survive_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    await store.save_bindings(
        [record("1001", "sip:a", 2000.0), record("1002", "sip:b", 2000.0)], []
    )
    await store.save_bindings([], [BindingKey("1002", "sip:b")])
    await store.close()
    again = SqliteStore(tmp_path / "db.sqlite")
    await again.open()
    loaded = await again.load_bindings(1000.0)
    await again.close()
    assert [(b.aor, b.uri, b.contact) for b in loaded] == [("1001", "sip:a", "<sip:a>")]


async def test_expired_bindings_are_not_loaded(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    await store.save_bindings([record("1001", "sip:a", 10.0), record("1001", "sip:b", 99.0)], [])
    assert [b.uri for b in await store.load_bindings(50.0)] == ["sip:b"]
    assert await store.purge_expired_bindings(100.0) == 1
    await store.close()


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    await asyncio.gather(
        *(store.save_bindings([record(f"{i}", "sip:x", 1e12)], []) for i in range(500))
    )
    assert store.jobs == 500
    assert store.commits < 500  # group commit: many writes per fsync
    assert len(await store.load_bindings(0.0)) == 500
    await store.close()


async def test_wal_mode_is_on(tmp_path: Path) -> None:
    import sqlite3

    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_later_write_of_the_same_contact_wins_within_a_batch(tmp_path: Path) -> None:
    """Binding writes of one batch are merged; the merge must keep queue order per contact."""
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    outcomes: list[BaseException | None] = []
    done = asyncio.Event()

    def settle(_: object, exc: BaseException | None) -> None:
        outcomes.append(exc)
        if len(outcomes) == 4:
            done.set()

    key = BindingKey("1001", "sip:a")
    # Queued back to back: the writer thread usually takes them as one batch.
    store.save_bindings_then([record("1001", "sip:a", 1e12)], [], settle)
    store.save_bindings_then([], [key], settle)  # the delete comes last: unbound
    store.save_bindings_then([], [BindingKey("1002", "sip:b")], settle)
    store.save_bindings_then([record("1002", "sip:b", 1e12)], [], settle)  # re-added: bound
    await asyncio.wait_for(done.wait(), 5)
    assert outcomes == [None] * 4
    assert [(b.aor, b.uri) for b in await store.load_bindings(0.0)] == [("1002", "sip:b")]
    await store.close()


async def test_a_failed_commit_reaches_every_callback(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    await store._submit(lambda conn: conn.execute("DROP TABLE bindings"))
    errors: list[BaseException | None] = []
    done = asyncio.Event()

    def settle(_: object, exc: BaseException | None) -> None:
        errors.append(exc)
        done.set()

    store.save_bindings_then([record("1001", "sip:a", 1e12)], [], settle)
    await asyncio.wait_for(done.wait(), 5)
    assert len(errors) == 1 and isinstance(errors[0], StoreError)
    await store.close()
