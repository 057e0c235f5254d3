"""The rows the store keeps, apart from the store itself so that they can be compiled.

The registrar builds a `BindingRecord` for every REGISTER it accepts: as an interpreted
dataclass its generated `__init__` was a Python-level call inside the compiled message path
(docs/decisions.md, D17); here mypyc compiles it with the registrar.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, init=False)
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

    def __init__(
        self,
        aor: str,
        contact: str,
        uri: str,
        expires_at: float,
        call_id: str,
        cseq: int,
        source: str,
        auth_user: str,
        user_agent: str = "",
        q: float | None = None,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        self.aor = aor
        self.contact = contact
        self.uri = uri
        self.expires_at = expires_at
        self.call_id = call_id
        self.cseq = cseq
        self.source = source
        self.auth_user = auth_user
        self.user_agent = user_agent
        self.q = q


@dataclass(frozen=True, slots=True, init=False)
class BindingKey:
    aor: str
    uri: str

    def __init__(self, aor: str, uri: str) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "aor", aor)
        object.__setattr__(self, "uri", uri)
