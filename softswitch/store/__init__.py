"""Storage interface: what the service persists, independent of the database behind it.

Callers (registrar, later history and voicemail) depend only on `Store`; `SqliteStore` is the
embedded default and a PostgreSQL implementation can be added without touching them. Writes are
acknowledged only once they are durable, so a response that says "registered" is never a lie
after a kill -9.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .records import BindingKey, BindingRecord

__all__ = ["BindingKey", "BindingRecord", "Store"]


class Store(Protocol):
    """The persistence the service needs. Every write returns once it is durable."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def load_bindings(self, now: float) -> list[BindingRecord]:
        """Every unexpired binding (expired ones are purged as a side effect)."""
        ...

    async def save_bindings(self, upserts: list[BindingRecord], deletes: list[BindingKey]) -> None:
        """Apply one REGISTER's changes atomically and durably."""
        ...

    def save_bindings_then(
        self,
        upserts: list[BindingRecord],
        deletes: list[BindingKey],
        done: Callable[[Any, BaseException | None], None],
    ) -> None:
        """`save_bindings` without a coroutine: `done(None, error)` runs on the event loop
        once the write is durable (error None) or failed. The REGISTER hot path uses it."""
        ...

    async def purge_expired_bindings(self, now: float) -> int: ...

    async def load_user_flags(self) -> list[tuple[str, str, str]]:
        """(user, flag, line) rows: run-time settings users change with feature codes."""
        ...

    async def set_user_flag(self, user: str, flag: str, line: str, on: bool) -> None: ...
