"""A fast YAML reader for configs that are plain data, without line numbers.

Why: ruamel's round-trip loader is pure Python and takes about 0.7 ms per
user line (7 s for 10,000 users), nearly all of it in its scanner and parser.
libyaml, PyYAML's C extension, composes the same text some twenty times
faster. Line numbers are only needed when something is wrong, so the loader
reads with this module first and validates the result; a config with any
problem is read again with the round-trip loader, which reports it exactly
as before (docs/decisions.md D12).

The result must equal what the round-trip loader gives after
``loader._to_plain``, in value *and* type, or the two readers could accept
different configs. libyaml speaks YAML 1.1 and ruamel 1.2, so plain scalars
are resolved here with ruamel's own 1.2 rules, and anything this module does
not mirror exactly raises :class:`Unsupported` so the caller falls back:
tags, anchors and aliases, merge keys, floats, timestamps, integers written
with ``_`` or a base prefix, duplicate keys, directives, tabs and the line
breaks only YAML 1.1 knows.
"""

from __future__ import annotations

import re
from typing import Any

from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.scalarint import ScalarInt

try:  # PyYAML is only a speed-up: without its C extension every config takes the slow path.
    from yaml import YAMLError as _PyYAMLError  # type: ignore[import-untyped, unused-ignore]
    from yaml._yaml import CParser as _CParser  # type: ignore[import-untyped, unused-ignore]
except ImportError:  # pragma: no cover - depends on the install
    _CParser = None
    _PyYAMLError = Exception

__all__ = ["AVAILABLE", "Unsupported", "read_plain"]

#: Whether libyaml is importable; tests skip the fast-path checks without it.
AVAILABLE = _CParser is not None


class Unsupported(Exception):
    """The text is not one this reader mirrors exactly; use the round-trip loader."""


#: Text the two parsers may read differently, or that needs the marks only
#: the round-trip tree keeps: an anchor or non-specific tag at the start of a
#: node, a directive, a tab, a byte-order mark, or a YAML 1.1 line break.
#: A false match only costs speed.
_GUARD = re.compile(r"(?:^|[\s\[\]{},:])[&!]|^%|[\t\ufeff\x85\u2028\u2029]", re.MULTILINE)

#: What :meth:`_Composer.resolve` tags every untagged node with; an explicit tag
#: leaves another value on the node.
_IMPLICIT = "?"

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"

#: ruamel's YAML 1.2 implicit resolvers, by first character (``""`` for empty).
_RESOLVERS: dict[Any, list[tuple[str, re.Pattern[str]]]] = VersionedResolver(
    version=(1, 2)
).versioned_resolver

#: A decimal integer without '_' (ruamel keeps formatting of anything else).
_DECIMAL = re.compile(r"[-+]?[0-9]+")


if _CParser is not None:

    class _Composer(_CParser):  # type: ignore[misc, unused-ignore]
        """libyaml's composer with tag resolution left to :func:`_scalar`."""

        def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
            return _IMPLICIT

        def descend_resolver(self, current_node: Any, current_index: Any) -> None:
            pass

        def ascend_resolver(self) -> None:
            pass


def read_plain(text: str) -> Any:
    """``text`` as plain dicts, lists, str, int, bool and None.

    Raises :class:`Unsupported` when the text needs the round-trip loader:
    it is not valid YAML, or uses something listed in the module docstring.
    """
    if _CParser is None or _GUARD.search(text):
        raise Unsupported
    try:
        node = _Composer(text).get_single_node()
    except _PyYAMLError as exc:
        raise Unsupported from exc
    if node is None:  # an empty document
        raise Unsupported
    return _Walk().value(node)


class _Walk:
    """Converts one composed tree, refusing a node met twice (an alias)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def value(self, node: Any) -> Any:
        if node.tag is not _IMPLICIT or id(node) in self._seen:
            raise Unsupported
        self._seen.add(id(node))
        if node.id == "scalar":
            return _scalar(node.value, node.style)
        if node.id == "sequence":
            return [self.value(item) for item in node.value]
        return self._mapping(node.value)

    def _mapping(self, pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in pairs:
            key = self.value(key_node)
            if not isinstance(key, str) or key in result:
                raise Unsupported  # non-string keys and duplicates are reported with lines
            result[key] = self.value(value_node)
        return result


def _scalar(value: str, style: str | None) -> Any:
    """A scalar as ruamel's round-trip constructor (YAML 1.2) gives it."""
    if style:  # quoted or block: always a string
        return value
    for tag, pattern in _RESOLVERS.get(value[:1], ()):
        if pattern.match(value):
            return _resolved(tag, value)
    return value


def _resolved(tag: str, value: str) -> Any:
    if tag == _NULL:
        return None
    if tag == _BOOL:
        return value.lower() == "true"
    if tag == _INT and _DECIMAL.fullmatch(value):
        return _decimal(value)
    raise Unsupported  # floats, timestamps, merge keys, formatted integers


def _decimal(value: str) -> int:
    """ruamel keeps a leading zero (``0``, ``007``) as a ScalarInt with its width."""
    digits = value.lstrip("+-")
    number = int(value)
    if digits[0] == "0":
        kept: int = ScalarInt(number, width=len(digits))
        return kept
    return number
