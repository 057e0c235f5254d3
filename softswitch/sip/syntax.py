"""Lexical helpers shared by the header and URI parsers (RFC 3261 §25.1).

They work on `str` slices and never allocate more than the result: the parser is a hot path, and
most of its cost is in scanning for separators that may hide inside quoted strings or `<...>`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from .errors import ParseError

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

_TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
#: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
TOKEN_CHARS = frozenset(_TOKEN)
#: The same set as a regex character class, for the grammars in the header and URI parsers.
TOKEN_RE = r"[A-Za-z0-9\-.!%*_+`'~]"
WS = " \t"
#: A quoted-string: quoted-pairs (backslash and any character) or anything but `"` and `\`.
#: Written "unrolled" (runs of plain characters between quoted-pairs): the same language as
#: `"(?:[^"\\]|\\.)*"`, without one alternation per character.
QUOTED_RE = r'"[^"\\]*(?:\\.[^"\\]*)*"'

# One parameter, the `;` before it already consumed: name, optional value, then `;` or the end.
# Values are a token, a host (`[::1]`, `a.b:5060` in received/maddr) or a quoted-string; LWS
# around names and `=` is legal (RFC 4475 `wsinv`).
_PARAM = re.compile(
    rf"[ \t]*({TOKEN_RE}+)[ \t]*(?:=[ \t]*({QUOTED_RE}|[^ \t\";,<>]+)[ \t]*)?(;|\Z)", re.S
)
# Where split_outside must look: the separator or something that may hide one.
_SPLIT_SPECIALS = {sep: re.compile(rf'["<>{re.escape(sep)}]') for sep in ",;"}


def is_token(s: str) -> bool:
    """True if `s` is a non-empty RFC 3261 token.

    `strip` with the token alphabet leaves nothing exactly when every character is in it; it is
    several times faster than a per-character test, and names are checked on every header line.
    """
    return bool(s) and not s.strip(_TOKEN)


def check_token(s: str, what: str) -> str:
    """Return `s` if it is a token, else raise a 400 naming `what`."""
    if not is_token(s):
        raise ParseError(f"invalid {what}: {s!r}")
    return s


def quoted_end(s: str, start: int) -> int:
    """Index just past the quoted-string that opens at `s[start]` (a double quote).

    Backslash escapes one character (quoted-pair). An unterminated string is a 400: RFC 4475's
    `quotbal` is exactly that.
    """
    close = s.find('"', start + 1)
    if close >= 0 and s.find("\\", start + 1, close) < 0:
        return close + 1  # the usual case, no escapes before the closing quote: two C searches
    i = start + 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    raise ParseError("unterminated quoted string")


def unquote(s: str) -> str:
    """The content of a quoted-string (with its quotes), quoted-pairs resolved."""
    inner = s[1:-1]
    if "\\" not in inner:
        return inner
    out: list[str] = []
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\" and i + 1 < len(inner):
            out.append(inner[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def quote(s: str) -> str:
    """A quoted-string holding `s`."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_outside(s: str, sep: str) -> Iterator[str]:
    """Split `s` on `sep`, ignoring separators inside quoted strings and `<...>`.

    Used for comma-separated header lists (Via, Contact, Route) and for `;` parameters, where a
    display name or a bracketed URI may legitimately contain the separator. Most values hold no
    separator at all, or nothing that could hide one; both cases cost one `in` test.
    """
    if sep not in s:
        return iter((s,))
    if '"' not in s and "<" not in s:
        return iter(s.split(sep))
    specials = _SPLIT_SPECIALS.get(sep) or re.compile(rf'["<>{re.escape(sep)}]')
    out: list[str] = []
    start = 0
    depth = 0
    m = specials.search(s)
    while m is not None:
        i = m.start()
        c = s[i]
        if c == '"':
            m = specials.search(s, quoted_end(s, i))
            continue
        if c == "<":
            depth += 1
        elif c == ">":
            if depth:
                depth -= 1
        elif not depth:
            out.append(s[start:i])
            start = i + 1
        m = specials.search(s, i + 1)
    out.append(s[start:])
    return iter(out)


def parse_params(s: str, what: str) -> list[tuple[str, str | None]]:
    """Parse `;name[=value]` parameters (the leading `;` already stripped).

    Whitespace around names, `=` and values is tolerated (RFC 4475 `wsinv`); an empty parameter
    (`;;`) or a non-token name is a 400 (`badinv01`). Values keep their case and quotes.
    """
    plain = plain_params(s)
    return plain if plain is not None else _grammar_params(s, what)


def plain_params(s: str) -> list[tuple[str, str | None]] | None:
    """The parameters as `_grammar_params` reads them, when they hold no whitespace or quotes.

    Such parameters (`branch=z9hG4bK..;rport`, `tag=..`: nearly all) are split on `;` and `=`
    with string methods; the regex took ~1 µs a parameter. Anything else (whitespace, quotes,
    an empty or odd parameter) is None: the grammar decides, and reports the error.
    """
    if " " in s or "\t" in s or '"' in s:
        return None
    out: list[tuple[str, str | None]] = []
    for part in s.split(";"):
        eq = part.find("=")
        if eq < 0:
            if not is_token(part):
                return None
            out.append((part, None))
            continue
        name, value = part[:eq], part[eq + 1 :]
        if not is_token(name) or not value or "," in value or "<" in value or ">" in value:
            return None
        out.append((name, value))
    return out


def _grammar_params(s: str, what: str) -> list[tuple[str, str | None]]:
    """`parse_params` by the full grammar (`_PARAM`): whitespace, quoted values, errors."""
    out: list[tuple[str, str | None]] = []
    match = _PARAM.match
    pos = 0
    while True:
        m = match(s, pos)
        if m is None:
            raise ParseError(f"invalid {what} parameter in {s!r}")
        out.append((m[1], m[2]))
        if not m[3]:  # matched the end of the string rather than a `;`
            return out
        pos = m.end()


def format_params(params: list[tuple[str, str | None]] | tuple[tuple[str, str | None], ...]) -> str:
    """Serialise parameters back, each with its leading `;`."""
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def find_param(
    params: list[tuple[str, str | None]] | tuple[tuple[str, str | None], ...], name: str
) -> tuple[bool, str | None]:
    """Case-insensitive parameter lookup: (present, value)."""
    lname = name.lower()
    for k, v in params:
        if k.lower() == lname:
            return True, v
    return False, None


class ParseCache(Generic[K, T]):
    """Successful parses of header values and URIs by their text, emptied when full.

    The same few strings come back all day (a phone's Contact on every refresh, a user's AoR in
    From and To, our own Via in the responses to our requests), and parsed values are frozen, so
    a hit can be shared. Failures are not kept. Emptying a full cache bounds it without the
    bookkeeping of an LRU. The key is usually the text; peers' socket addresses (tuples) are
    turned into `Address`es the same way.
    """

    __slots__ = ("_items", "_limit", "_parse")

    def __init__(self, parse: Callable[[K], T], limit: int) -> None:
        self._items: dict[K, T] = {}
        self._parse = parse
        self._limit = limit

    def __call__(self, text: K) -> T:
        value = self._items.get(text)
        if value is None:
            value = self._parse(text)
            if len(self._items) >= self._limit:
                self._items.clear()
            self._items[text] = value
        return value

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget everything (benchmarks measuring uncached parses use it)."""
        self._items.clear()
