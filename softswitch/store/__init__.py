"""Storage interface: what the service persists, independent of the database behind it.

Callers (registrar, later history and voicemail) depend only on `Store`; `SqliteStore` is the
embedded default and a PostgreSQL implementation can be added without touching them. Writes are
acknowledged only once they are durable, so a response that says "registered" is never a lie
after a kill -9.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class BindingRecord:
    """One contact bound to an address-of-record (RFC 3261 §10.3), as stored."""

    aor: str
    contact: str  # the Contact header value as received (URI in <>, header params)
    uri: str  # the contact URI alone: the binding's identity within the AoR
    expires_at: float  # wall-clock seconds since the epoch
    call_id: str
    cseq: int
    source: str  # "udp:127.0.0.1:5090": where the REGISTER came from (NAT-safe routing)
    auth_user: str  # who authenticated (a delegate may register a delegator's line)
    user_agent: str = ""
    q: float | None = None


@dataclass(frozen=True, slots=True)
class BindingKey:
    aor: str
    uri: str


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
