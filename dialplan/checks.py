"""Rules that relate several parts of the config to each other.

Pydantic validates each value on its own; it cannot say "this extension is
already used at line 7". These checks take the already-typed sections and
return *all* problems, each with the path (``loc``) of the offending value,
so the loader can turn paths into YAML line numbers and :class:`Config` can
still refuse a bad config built in code.

Every argument may be ``None``, and list items may be ``None``: when part of
the config failed its own validation the loader still runs the checks on the
parts that passed (keeping list positions, so paths stay right), so one pass
over a config reports type errors and cross-reference errors together.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the models import this module; avoid the cycle at runtime
    from dialplan.models import Delegation, HostPort, ListenSpec, Media, User

__all__ = ["MAX_DELEGATES", "MAX_DELEGATORS", "Loc", "Problem", "all_problems", "format_loc"]

#: A delegator may have at most this many delegates, and a delegate at most
#: this many delegators: parallel forking to more phones than that floods the
#: switch and the people, and keeps per-call state bounded.
MAX_DELEGATES = 15
MAX_DELEGATORS = 15

#: Path of a value in the config, as in pydantic's error ``loc``.
Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One cross-reference problem at ``loc``.

    ``message`` may contain ``{where}``, which :meth:`render` replaces with a
    description of ``refers_to`` (the loader says "at line 7"; code that has
    no file says "at users[0]").
    """

    loc: Loc
    message: str
    refers_to: Loc | None = None

    def render(self, where: Callable[[Loc], str]) -> str:
        """The message with ``{where}`` filled in by ``where(refers_to)``."""
        if self.refers_to is None:
            return self.message
        return self.message.replace("{where}", where(self.refers_to))


def format_loc(loc: Sequence[str | int]) -> str:
    """Render a path as operators write it: ``users[1].extension``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def all_problems(
    *,
    users: Sequence[User | None] | None,
    delegations: Sequence[Delegation | None] | None,
    ring_time: int | None,
    listen: Sequence[ListenSpec | None] | None,
    http: HostPort | None,
    media: Media | None,
) -> list[Problem]:
    """Every cross-reference problem among the sections that are given."""
    problems: list[Problem] = []
    if users is not None:
        problems += _user_problems(users)
    if delegations is not None:
        problems += _delegation_problems(delegations, users, ring_time)
    problems += _socket_problems(listen, http, media)
    return problems


def _user_problems(users: Sequence[User | None]) -> list[Problem]:
    problems: list[Problem] = []
    by_extension: dict[str, int] = {}
    by_number: dict[str, int] = {}
    for i, user in enumerate(users):
        if user is None:
            continue
        first = by_extension.setdefault(user.extension, i)
        if first != i:
            problems.append(
                Problem(
                    ("users", i, "extension"),
                    f"extension {user.extension} is already used by the user {{where}}",
                    ("users", first, "extension"),
                )
            )
        if user.number is None:
            continue
        first = by_number.setdefault(user.number, i)
        if first != i:
            problems.append(
                Problem(
                    ("users", i, "number"),
                    f"number {user.number} is already used by the user {{where}}",
                    ("users", first, "number"),
                )
            )
    return problems


def _delegation_problems(
    delegations: Sequence[Delegation | None],
    users: Sequence[User | None] | None,
    ring_time: int | None,
) -> list[Problem]:
    """Unknown or repeated parties, self-delegation, the 15/15 limits, ring delays.

    When any user is invalid (or the users section is), the checks that need
    to know who exists are skipped rather than reporting the broken user's
    extension as unknown everywhere.
    """
    problems: list[Problem] = []
    known: set[str] | None = None
    if users is not None and all(u is not None for u in users):
        known = {u.extension for u in users if u is not None}
    first_delegation: dict[str, int] = {}
    delegator_count: dict[str, int] = {}
    for i, delegation in enumerate(delegations):
        if delegation is None:
            continue
        here: Loc = ("delegations", i)
        delegator = delegation.delegator
        if known is not None and delegator not in known:
            problems.append(
                Problem((*here, "delegator"), f"unknown delegator {delegator}: no user has it")
            )
        first = first_delegation.setdefault(delegator, i)
        if first != i:
            problems.append(
                Problem(
                    (*here, "delegator"),
                    f"delegator {delegator} already has a delegation {{where}}; "
                    "list all of its delegates there",
                    ("delegations", first, "delegator"),
                )
            )
        if len(delegation.delegates) > MAX_DELEGATES:
            problems.append(
                Problem(
                    (*here, "delegates"),
                    f"{len(delegation.delegates)} delegates for {delegator}; "
                    f"at most {MAX_DELEGATES} are allowed",
                )
            )
        line_ring_time = delegation.ring_time if delegation.ring_time is not None else ring_time
        position: dict[str, int] = {}
        for j, delegate in enumerate(delegation.delegates):
            at: Loc = (*here, "delegates", j)
            extension = delegate.extension
            if extension == delegator:
                problems.append(
                    Problem((*at, "extension"), f"{extension} cannot be its own delegate")
                )
            elif known is not None and extension not in known:
                problems.append(
                    Problem((*at, "extension"), f"unknown delegate {extension}: no user has it")
                )
            first = position.setdefault(extension, j)
            if first != j:
                problems.append(
                    Problem(
                        (*at, "extension"),
                        f"{extension} is already a delegate of {delegator} {{where}}",
                        (*here, "delegates", first),
                    )
                )
                continue
            delegator_count[extension] = delegator_count.get(extension, 0) + 1
            if delegator_count[extension] > MAX_DELEGATORS:
                problems.append(
                    Problem(
                        (*at, "extension"),
                        f"{extension} would be a delegate of more than {MAX_DELEGATORS} delegators",
                    )
                )
            if line_ring_time is not None and delegate.ring_delay >= line_ring_time:
                problems.append(
                    Problem(
                        (*at, "ring_delay"),
                        f"ring_delay {delegate.ring_delay} is not shorter than the ring time "
                        f"{line_ring_time} s, so this delegate would never ring",
                    )
                )
    return problems


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _overlap(a: _Address, b: _Address) -> bool:
    """Whether binding both addresses on one port would clash."""
    return a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified)


def _socket_problems(
    listen: Sequence[ListenSpec | None] | None, http: HostPort | None, media: Media | None
) -> list[Problem]:
    """Sockets that could not all be bound: caught here, not at 3 a.m. start-up."""
    problems: list[Problem] = []
    specs = [(i, spec) for i, spec in enumerate(listen or ()) if spec is not None]
    for n, (i, spec) in enumerate(specs):
        for j, other in specs[:n]:
            if spec.transport == other.transport and spec.port == other.port:
                if spec.host == other.host:
                    message = f"{spec} is already listed {{where}}"
                elif _overlap(spec.host, other.host):
                    message = f"{spec} would clash with {other} {{where}}"
                else:
                    continue
                problems.append(Problem(("listen", i), message, ("listen", j)))
                break
    if http is not None:
        for i, spec in specs:
            if (
                spec.transport == "tcp"
                and spec.port == http.port
                and _overlap(spec.host, http.host)
            ):
                problems.append(
                    Problem(
                        ("http",),
                        f"{http} clashes with the SIP listener {spec} {{where}}",
                        ("listen", i),
                    )
                )
    if media is not None:
        for i, spec in specs:
            if (
                spec.transport == "udp"
                and spec.port in media.ports
                and _overlap(spec.host, media.address)
            ):
                problems.append(
                    Problem(
                        ("media", "ports"),
                        f"the RTP range {media.ports} includes the SIP port of {spec} {{where}}",
                        ("listen", i),
                    )
                )
    return problems
