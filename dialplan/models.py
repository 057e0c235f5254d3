"""Pydantic models of the operator config (``conf/softswitch.yaml``).

The models are the single description of what a valid config is: field types,
ranges and defaults live here, next to a docstring that says why. They are
frozen because the running switch shares one ``Config`` between tasks; a
reload builds a new one instead of mutating the old.

Every model forbids unknown keys: an operator who types ``ring_tme`` must get
an error, not a silently ignored setting.

Rules that relate several parts of the config (an unknown delegate, a
duplicate extension) are in :mod:`dialplan.checks`; :class:`Config` runs them
after its fields validate so that a ``Config`` built in code is as trustworthy
as one loaded from YAML. The YAML loader asks the model to defer them (see
:data:`CONTEXT_DEFER_CHECKS`) so it can report each one at its own line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dialplan.checks import MAX_DELEGATES, MAX_DELEGATORS, all_problems, format_loc
from dialplan.fields import (
    Extension,
    FeatureCode,
    Int,
    IPAddress,
    IPNetwork,
    Number,
    Text,
    parse_host_port,
)

__all__ = [
    "ALL_PERMISSIONS",
    "CONTEXT_BASE_DIR",
    "CONTEXT_DEFER_CHECKS",
    "MAX_DELEGATES",
    "MAX_DELEGATORS",
    "Algorithm",
    "Auth",
    "Config",
    "Delegate",
    "Delegation",
    "FeatureCodes",
    "HostPort",
    "Lines",
    "ListenSpec",
    "Log",
    "Media",
    "Permission",
    "Policy",
    "PortRange",
    "Registrar",
    "User",
]

#: Validation-context key: directory that a relative ``data_dir`` is relative
#: to. The loader passes the config file's directory; without it, the current
#: working directory is used.
CONTEXT_BASE_DIR = "dialplan.base_dir"

#: Validation-context key: when true, :class:`Config` does not raise for
#: cross-reference problems; the caller promises to run
#: :func:`dialplan.checks.all_problems` itself.
CONTEXT_DEFER_CHECKS = "dialplan.defer_checks"

#: Seconds; bounds of any ring time. 600 s is far beyond any sane ring and
#: catches ``ring_time: 3000`` typos (the operator meant 30).
MIN_RING_TIME = 1
MAX_RING_TIME = 600


class _Model(BaseModel):
    """Base of every config model: immutable, unknown keys are errors."""

    # hide_input_in_errors: a ValidationError that ends up in a log must not
    # carry the passwords of the config it was validating.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


# --------------------------------------------------------------------------
# Addresses


def _parse_string_form(value: Any, parse: Callable[[str], dict[str, Any]]) -> Any:
    """Run ``parse`` on strings; pass mappings through for field validation."""
    if isinstance(value, str):
        return parse(value.strip())
    return value


def _split_port(text: str) -> int | str:
    # Left as text when not digits so the int field reports it with the input.
    return int(text) if text.isascii() and text.isdigit() else text


class ListenSpec(_Model):
    """A SIP listening socket, written ``udp:ADDR:PORT`` or ``tcp:[IPV6]:PORT``.

    The host must be an IP literal: there is no DNS, and binding to a name
    would hide which interface the switch really listens on. ``0.0.0.0`` and
    ``::`` are allowed here (bind to all) but not as the SIP domain.
    """

    transport: Literal["udp", "tcp"]
    host: IPAddress
    port: Annotated[Int, Field(ge=1, le=65535)]

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        def parse(text: str) -> dict[str, Any]:
            transport, sep, rest = text.partition(":")
            if not sep or not transport.isalpha():
                raise ValueError(
                    f"expected TRANSPORT:ADDRESS:PORT such as udp:127.0.0.1:5060, got {text!r}"
                )
            host, port = parse_host_port(rest)
            return {"transport": transport.lower(), "host": host, "port": _split_port(port)}

        return _parse_string_form(value, parse)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` as asyncio's ``create_server``/``bind`` want it."""
        return str(self.host), self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{self.transport}:{host}:{self.port}"


class HostPort(_Model):
    """An ``ADDR:PORT`` (``[IPV6]:PORT``) endpoint, e.g. the HTTP API's."""

    host: IPAddress
    port: Annotated[Int, Field(ge=1, le=65535)]

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        def parse(text: str) -> dict[str, Any]:
            host, port = parse_host_port(text)
            return {"host": host, "port": _split_port(port)}

        return _parse_string_form(value, parse)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` as asyncio's ``create_server`` wants it."""
        return str(self.host), self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{host}:{self.port}"


class PortRange(_Model):
    """An inclusive UDP port range for RTP, written ``20000-20999``.

    Ports below 1024 are refused: they need privileges and collide with
    well-known services. An even ``low`` is recommended (RTP on even ports,
    RTCP on the next odd one) but not required.
    """

    low: Annotated[Int, Field(ge=1024, le=65535)]
    high: Annotated[Int, Field(ge=1024, le=65535)]

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        def parse(text: str) -> dict[str, Any]:
            low, sep, high = text.partition("-")
            if not sep:
                raise ValueError(f"expected LOW-HIGH such as 20000-20999, got {text!r}")
            return {"low": _split_port(low.strip()), "high": _split_port(high.strip())}

        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"expected LOW-HIGH such as 20000-20999, got {value}")
        return _parse_string_form(value, parse)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.low >= self.high:
            raise ValueError(
                f"the low port {self.low} must be below the high port {self.high} "
                "(a call needs at least an RTP and an RTCP port)"
            )
        return self

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


class Media(_Model):
    """Where RTP is sent and received.

    ``address`` is written into SDP, so it must be an address phones can reach:
    the unspecified ``0.0.0.0``/``::`` is refused.
    """

    address: IPAddress
    ports: PortRange

    @field_validator("address")
    @classmethod
    def _reachable(
        cls, value: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if value.is_unspecified:
            raise ValueError(f"{value} cannot be sent in SDP; use the address phones reach")
        return value


# --------------------------------------------------------------------------
# Users and delegation


class Permission(StrEnum):
    """What a delegate may do on behalf of its delegator."""

    PLACE = "place"  # place calls as the delegator
    ANSWER = "answer"  # be alerted and answer the delegator's calls
    PICKUP = "pickup"  # pick up a call ringing at the delegator
    VOICEMAIL = "voicemail"  # listen to the delegator's voicemail


#: A delegate written as a plain extension gets every permission.
ALL_PERMISSIONS: frozenset[Permission] = frozenset(Permission)


class User(_Model):
    """A subscriber: an extension that registers and is called."""

    extension: Extension
    name: Text
    password: Annotated[Text, Field(repr=False)]  # never in logs via repr()
    number: Number | None = None
    dnd: bool = False
    voicemail: bool = False


class Delegate(_Model):
    """One delegate of a delegator, whichever YAML form it was written in.

    ``"1002"`` is shorthand for ``{extension: "1002"}``: every permission,
    no ring delay. ``ring_delay`` is how many seconds after the delegator's
    phones start ringing the delegate's phones join in.
    """

    extension: Extension
    permissions: frozenset[Permission] = ALL_PERMISSIONS
    ring_delay: Annotated[Int, Field(ge=0)] = 0

    @model_validator(mode="before")
    @classmethod
    def _from_extension(cls, value: Any) -> Any:
        if isinstance(value, str | int) and not isinstance(value, bool):
            return {"extension": value}
        if not isinstance(value, dict | Delegate):
            raise ValueError(
                'a delegate is an extension such as "1002" or a mapping '
                '{extension: "1002", permissions: [answer], ring_delay: 0}'
            )
        return value

    @field_validator("permissions", mode="before")
    @classmethod
    def _permissions_list(cls, value: Any) -> Any:
        # YAML has no sets: look at the list so duplicates can be reported.
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError(
                "a delegate needs at least one permission; remove the delegate instead"
            )
        result: list[Any] = []
        for item in value:
            name = item.strip().lower() if isinstance(item, str) else item
            if name in result:
                raise ValueError(f"permission {name!r} is listed twice")
            result.append(name)
        return result

    def can(self, permission: Permission) -> bool:
        """True when this delegate holds ``permission``."""
        return permission in self.permissions


class Delegation(_Model):
    """A delegator and the delegates who share its line.

    Each delegator has at most one delegation (a second one is an error, not
    merged: two blocks for one person are more likely a copy-paste slip than
    intent, and merging would make ``ring_time`` ambiguous).
    """

    delegator: Extension
    delegates: tuple[Delegate, ...]
    ring_time: Annotated[Int, Field(ge=MIN_RING_TIME, le=MAX_RING_TIME)] | None = None

    @field_validator("delegates")
    @classmethod
    def _not_empty(cls, value: tuple[Delegate, ...]) -> tuple[Delegate, ...]:
        # Not Field(min_length=1): pydantic would also report "0 items" when
        # an item is merely invalid, burying the real error.
        if not value:
            raise ValueError("list at least one delegate, or remove the delegation")
        return value


# --------------------------------------------------------------------------
# Settings sections


class Policy(_Model):
    """Switches for whole features; ``delegation: false`` ignores delegations."""

    delegation: bool = True


class Lines(_Model):
    """Defaults for ringing a line; a delegation can override ``ring_time``."""

    ring_time: Annotated[Int, Field(ge=MIN_RING_TIME, le=MAX_RING_TIME)] = 30


#: The Expires header is a 32-bit unsigned count of seconds (RFC 3261 20.19).
_Expires = Annotated[Int, Field(ge=1, le=2**32 - 1)]


class Registrar(_Model):
    """Registration lifetimes in seconds (RFC 3261 section 10.3).

    ``min_expires`` is what a 423 Interval Too Brief demands, ``max_expires``
    caps what a phone asks for, ``default_expires`` applies when it asks for
    nothing; hence ``min_expires <= default_expires <= max_expires``.
    """

    # Defaults are validated too: min_expires: 5000 alone must be refused,
    # since the default default_expires (3600) would then lie below it.
    model_config = ConfigDict(validate_default=True)

    min_expires: _Expires = 60
    max_expires: _Expires = 7200
    default_expires: _Expires = 3600

    @field_validator("max_expires")
    @classmethod
    def _max_above_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_expires")
        if low is not None and value < low:
            raise ValueError(f"max_expires {value} is below min_expires {low}")
        return value

    @field_validator("default_expires")
    @classmethod
    def _default_within(cls, value: int, info: ValidationInfo) -> int:
        low, high = info.data.get("min_expires"), info.data.get("max_expires")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(
                f"default_expires {value} must lie between min_expires {low} and max_expires {high}"
            )
        return value


class Algorithm(StrEnum):
    """Digest algorithms (RFC 8760); values are as sent in the challenge."""

    MD5 = "MD5"
    SHA_256 = "SHA-256"


class Auth(_Model):
    """Digest authentication and brute-force throttling.

    ``algorithms`` is the order challenges are offered in. The default is MD5
    alone: baresip 1.0.0 fails a REGISTER whose 401 carries any SHA-256
    challenge, and SIPp 3.6.1 answers only the first challenge and knows only
    MD5 (docs/decisions.md D3). Sites whose phones all do RFC 8760 list
    ``[SHA-256, MD5]``. After ``max_failures``
    failed attempts from one source IP within ``failure_window`` seconds, that
    source is refused for ``block_time`` seconds (0 disables blocking).
    """

    realm: Text | None = None
    algorithms: tuple[Algorithm, ...] = (Algorithm.MD5,)
    nonce_ttl: Annotated[Int, Field(ge=10, le=86400)] = 300
    qop: Literal["auth"] = "auth"
    max_failures: Annotated[Int, Field(ge=1)] = 10
    failure_window: Annotated[Int, Field(ge=1)] = 60
    block_time: Annotated[Int, Field(ge=0)] = 60

    @field_validator("realm")
    @classmethod
    def _quotable(cls, value: str | None) -> str | None:
        # The realm is sent as a quoted-string; refusing quotes and
        # backslashes avoids escaping bugs in every phone that parses it.
        if value is not None and ('"' in value or "\\" in value):
            raise ValueError('the realm must not contain " or \\')
        return value

    @field_validator("algorithms", mode="before")
    @classmethod
    def _algorithm_names(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("list at least one algorithm")
        names = {a.value.upper(): a.value for a in Algorithm}
        result: list[Any] = []
        for item in value:
            canonical = names.get(item.upper(), item) if isinstance(item, str) else item
            if canonical in result:
                raise ValueError(f"algorithm {canonical} is listed twice")
            result.append(canonical)
        return result


class FeatureCodes(_Model):
    """Star codes a phone dials to trigger a feature instead of a call.

    Codes must be unique. They start with ``*`` or ``#``, so they can never
    collide with an extension (extensions are digits only). In YAML they must
    be quoted: an unquoted ``*8`` is an alias and ``#78`` a comment.
    """

    # Defaults are validated too, so an operator code that collides with a
    # default is caught.
    model_config = ConfigDict(validate_default=True)

    pickup: FeatureCode = "*8"
    retrieve: FeatureCode = "*9"
    dnd_on: FeatureCode = "*78"
    dnd_off: FeatureCode = "*79"
    ring_opt_out: FeatureCode = "*21"
    ring_opt_in: FeatureCode = "*22"
    private_hold: FeatureCode = "*7"

    @field_validator("*")
    @classmethod
    def _unique(cls, value: str, info: ValidationInfo) -> str:
        for name, other in info.data.items():
            if other == value:
                raise ValueError(f"code {value!r} is already used by {name}")
        return value

    def by_code(self) -> dict[str, str]:
        """Map dialled code -> feature name, for matching a Request-URI."""
        return {code: name for name, code in self.model_dump().items()}


class Overload(_Model):
    """Overload control for SIP over UDP (see ``softswitch.overload``).

    A request that starts new work (INVITE, REGISTER, SUBSCRIBE, ...) and
    waited longer than ``max_queue_delay_ms`` in the receive queue is dropped
    unread: its sender has retransmitted it by then (T1 is 500 ms), and the
    fresher copy is answered. 0 turns this off.
    """

    max_queue_delay_ms: Annotated[Int, Field(ge=0, le=32000)] = 500


class Tcp(_Model):
    """Bounds on SIP over TCP.

    At most ``max_connections`` accepted connections at once (more are closed
    at once, so a connection flood cannot take the descriptors calls need); a
    connection holding an incomplete message, or connected and silent, for
    ``message_timeout`` seconds is closed (slow senders, silent scanners).
    """

    max_connections: Annotated[Int, Field(ge=1, le=1_000_000)] = 10000
    message_timeout: Annotated[Int, Field(ge=1, le=3600)] = 30


class Log(_Model):
    """Logging; ``format: auto`` means console on a TTY, JSON otherwise."""

    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


# --------------------------------------------------------------------------
# The whole config

#: Reusable so the loader can validate one section on its own.
ListenList = Annotated[list[ListenSpec], Field(min_length=1)]

_HOSTNAME_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"


class _ConfigIndex:
    """Lookups over one frozen config's users and delegations, built once."""

    __slots__ = ("by_extension", "by_number", "delegation_of", "delegators_of", "trusted_cache")

    def __init__(self, users: list[User], delegations: list[Delegation]) -> None:
        self.by_extension = {u.extension: u for u in users}
        self.by_number = {u.number: u for u in users if u.number is not None}
        self.delegation_of = {d.delegator: d for d in delegations}
        delegators: dict[str, list[str]] = {}
        for delegation in delegations:
            for delegate in delegation.delegates:
                delegators.setdefault(delegate.extension, []).append(delegation.delegator)
        self.delegators_of = {k: tuple(v) for k, v in delegators.items()}
        # Source address -> trusted?: every INVITE asks about its source, one of a few phones
        # and trunks, and parsing an address costs ~10 µs. Bounded; the config is immutable.
        self.trusted_cache: dict[str, bool] = {}


class Config(_Model):
    """The validated operator config. Build it with :func:`dialplan.load_config`.

    Lookups (:meth:`user`, :meth:`delegates_of`, ...) are served from indexes
    built once at construction, because the SIP stack asks them per request.
    """

    domain: str
    listen: ListenList
    http: HostPort = HostPort(host=ipaddress.IPv4Address("127.0.0.1"), port=8080)
    data_dir: Path = Field(default=Path("var"), validate_default=True)
    media: Media
    users: list[User]
    delegations: list[Delegation] = []
    policy: Policy = Policy()
    lines: Lines = Lines()
    registrar: Registrar = Registrar()
    auth: Auth = Auth()
    trusted: list[IPNetwork] = []
    feature_codes: FeatureCodes = FeatureCodes()
    log: Log = Log()
    overload: Overload = Overload()
    tcp: Tcp = Tcp()
    max_message_size: Annotated[Int, Field(ge=1024, le=1 << 20)] = 65535

    @field_validator("domain", mode="before")
    @classmethod
    def _domain(cls, value: Any) -> Any:
        """A SIP domain is a host name or an IP literal; compared case-insensitively."""
        if not isinstance(value, str):
            return value
        text = value.strip().lower()
        try:
            parsed = ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
        except ValueError:
            if not re.fullmatch(rf"{_HOSTNAME_LABEL}(\.{_HOSTNAME_LABEL})*\.?", text):
                raise ValueError(f"{value!r} is neither a host name nor an IP address") from None
            return text.rstrip(".")
        if parsed.is_unspecified:
            raise ValueError(f"{value!r} cannot be a SIP domain; use the switch's address")
        return f"[{parsed}]" if parsed.version == 6 else str(parsed)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, value: Any, info: ValidationInfo) -> Any:
        """Resolve against the config file's directory, so the config is portable."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        if not isinstance(value, str | Path):
            return value
        path = Path(value).expanduser()
        if not path.is_absolute():
            context = info.context if isinstance(info.context, dict) else {}
            base = context.get(CONTEXT_BASE_DIR)
            path = (Path(base) if base is not None else Path.cwd()) / path
        return Path(path).absolute()

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Self:
        context = info.context if isinstance(info.context, dict) else {}
        if context.get(CONTEXT_DEFER_CHECKS):
            return self
        problems = all_problems(
            users=self.users,
            delegations=self.delegations,
            ring_time=self.lines.ring_time,
            listen=self.listen,
            http=self.http,
            media=self.media,
        )
        if problems:
            raise ValueError(
                "; ".join(
                    f"{format_loc(p.loc)}: {p.render(lambda loc: 'at ' + format_loc(loc))}"
                    for p in problems
                )
            )
        return self

    def model_post_init(self, context: Any, /) -> None:
        """Build the lookup indexes once; the model is frozen so they stay valid."""
        _ = self._index

    @cached_property
    def _index(self) -> _ConfigIndex:
        """The lookups, kept in the instance `__dict__` by `cached_property`.

        Pydantic keeps private attributes in `__pydantic_private__` and reads them through a
        Python-level `__getattr__` (~1,500 instructions a read): the call path reads these
        dozens of times per INVITE, and callgrind counted 9 % of a 16-way fork there.
        """
        return _ConfigIndex(self.users, self.delegations)

    @property
    def realm(self) -> str:
        """The digest realm: ``auth.realm`` if set, else the domain."""
        return self.auth.realm if self.auth.realm is not None else self.domain

    def user(self, extension: str) -> User | None:
        """The user with this extension, or None."""
        return self._index.by_extension.get(extension)

    def user_by_number(self, number: str) -> User | None:
        """The user with this E.164 number, or None."""
        return self._index.by_number.get(number)

    def delegation_of(self, delegator: str) -> Delegation | None:
        """The delegation whose delegator is ``delegator``, or None."""
        return self._index.delegation_of.get(delegator)

    def delegates_of(self, delegator: str) -> tuple[Delegate, ...]:
        """The delegates of ``delegator`` in config order; empty if none."""
        delegation = self._index.delegation_of.get(delegator)
        return delegation.delegates if delegation is not None else ()

    def delegators_of(self, delegate: str) -> tuple[str, ...]:
        """Extensions that ``delegate`` is a delegate of, in config order."""
        return self._index.delegators_of.get(delegate, ())

    def ring_time_for(self, extension: str) -> int:
        """Seconds to ring ``extension``'s line: its delegation's or the default."""
        delegation = self._index.delegation_of.get(extension)
        if delegation is not None and delegation.ring_time is not None:
            return delegation.ring_time
        return self.lines.ring_time

    def is_trusted(self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True when ``address`` lies in one of the ``trusted`` networks."""
        if not isinstance(address, str):
            return _in_networks(self.trusted, address)
        cache = self._index.trusted_cache
        known = cache.get(address)
        if known is None:
            known = _in_networks(self.trusted, ipaddress.ip_address(address))
            if len(cache) >= 4096:
                cache.clear()
            cache[address] = known
        return known


def _in_networks(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)
