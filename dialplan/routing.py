"""Routing: what a dialled string means, who rings, and who may call as whom.

Pure functions of the config plus the little runtime state that users change with feature codes
(do-not-disturb, opting out of a line's ringing). The B2BUA asks; nothing here knows SIP.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from dialplan.models import Config, Permission


class Role(StrEnum):
    OWNER = "owner"  # the user whose number was dialled (a delegator, or anyone)
    DELEGATE = "delegate"


@dataclass(frozen=True, slots=True, init=False)
class RingTarget:
    extension: str
    role: Role
    delay: int = 0  # seconds after the call starts ringing

    def __init__(self, extension: str, role: Role, delay: int = 0) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18): one per delegate
        # per call.
        object.__setattr__(self, "extension", extension)
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "delay", delay)


@dataclass(frozen=True, slots=True, init=False)
class CallRoute:
    """Ring `targets` for the line of `line` (the dialled user's extension)."""

    line: str
    line_name: str
    targets: tuple[RingTarget, ...]
    ring_time: int
    shared: bool  # True when delegates ring too: phones should show the line

    def __init__(
        self,
        line: str,
        line_name: str,
        targets: tuple[RingTarget, ...],
        ring_time: int,
        shared: bool,
    ) -> None:
        object.__setattr__(self, "line", line)
        object.__setattr__(self, "line_name", line_name)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "ring_time", ring_time)
        object.__setattr__(self, "shared", shared)


@dataclass(frozen=True, slots=True)
class FeatureRoute:
    """A feature code: `feature` is the FeatureCodes field name, `argument` the digits after."""

    feature: str
    argument: str


@dataclass(frozen=True, slots=True)
class NoRoute:
    reason: str


Route = CallRoute | FeatureRoute | NoRoute


def route_call(
    cfg: Config,
    dialled: str,
    *,
    opted_out: Collection[tuple[str, str]] = (),
    dnd: Collection[str] = (),
) -> Route:
    """Route `dialled` (a Request-URI user part: extension, number or feature code).

    `opted_out` holds (line, delegate) pairs whose delegate asked not to ring for that line;
    `dnd` the users who set do-not-disturb at run time (the config's `dnd:` counts as well).
    """
    if dialled[:1] in ("*", "#"):
        return _feature(cfg, dialled)
    user = cfg.user(dialled) or cfg.user_by_number(dialled) or cfg.user_by_number("+" + dialled)
    if user is None:
        return NoRoute(f"no user or number {dialled!r}")
    line = user.extension
    targets = [RingTarget(line, Role.OWNER)]
    if cfg.policy.delegation:
        for d in cfg.delegates_of(line):
            if d.can(Permission.ANSWER) and (line, d.extension) not in opted_out:
                targets.append(RingTarget(d.extension, Role.DELEGATE, d.ring_delay))
    targets = [t for t in targets if not _dnd(cfg, t.extension, dnd)]
    return CallRoute(
        line,
        user.name,
        tuple(targets),
        cfg.ring_time_for(line),
        len(targets) > 1 or any(t.role is Role.DELEGATE for t in targets),
    )


def _dnd(cfg: Config, extension: str, dnd: Collection[str]) -> bool:
    if extension in dnd:
        return True
    user = cfg.user(extension)
    return user is not None and user.dnd


def _feature(cfg: Config, dialled: str) -> Route:
    # Longest code first, so "*9" does not swallow a hypothetical "*91".
    for code, name in sorted(cfg.feature_codes.by_code().items(), key=lambda kv: -len(kv[0])):
        if dialled.startswith(code):
            argument = dialled[len(code) :]
            if argument and not argument.isdigit():
                return NoRoute(f"feature code {code} takes digits, got {argument!r}")
            return FeatureRoute(name, argument)
    return NoRoute(f"unknown feature code {dialled!r}")


def may_act_as(cfg: Config, user: str, identity: str, permission: Permission) -> bool:
    """May `user` use `identity`'s line with `permission` (place, answer, pickup, voicemail)?

    Everyone may act as themselves; a delegate as its delegator only with the permission and
    while the delegation policy is on.
    """
    if user == identity:
        return True
    if not cfg.policy.delegation:
        return False
    return any(d.extension == user and d.can(permission) for d in cfg.delegates_of(identity))


def lines_of(cfg: Config, user: str) -> tuple[str, ...]:
    """The shared lines `user` belongs to: their own, and those of their delegators."""
    if not cfg.policy.delegation:
        return (user,)
    return (user, *cfg.delegators_of(user))
