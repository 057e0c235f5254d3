"""The user directory the signalling layer consults, derived once from each loaded config.

It turns the operator's YAML (plain passwords, delegation lists) into what the hot path needs:
precomputed digest HA1 values and O(1) answers to "may X act for line Y". A reload builds a new
directory and swaps it in whole, so a request never sees half of an old config.
"""

from __future__ import annotations

from dataclasses import dataclass

from dialplan import Config

from .sip.digest import Algorithm, Credentials, credentials_for


@dataclass(frozen=True, slots=True)
class Directory:
    realm: str
    algorithms: tuple[Algorithm, ...]
    credentials: dict[str, Credentials]
    names: dict[str, str]
    #: line (delegator extension) -> the delegates who may register and use it
    line_members: dict[str, frozenset[str]]

    @classmethod
    def from_config(cls, cfg: Config) -> Directory:
        algorithms = tuple(Algorithm(a) for a in cfg.auth.algorithms)
        creds = {
            u.extension: credentials_for(u.extension, u.password, cfg.realm, algorithms)
            for u in cfg.users
        }
        members: dict[str, frozenset[str]] = {}
        if cfg.policy.delegation:
            for d in cfg.delegations:
                members[d.delegator] = frozenset(x.extension for x in d.delegates)
        return cls(cfg.realm, algorithms, creds, {u.extension: u.name for u in cfg.users}, members)

    def may_register(self, auth_user: str, aor: str) -> bool:
        """A user registers their own AoR; a delegate may also register the delegator's line
        (the shared-line account of a desk phone), if delegation is enabled."""
        if aor == auth_user:
            return True
        return auth_user in self.line_members.get(aor, frozenset())

    def is_user(self, extension: str) -> bool:
        return extension in self.credentials
