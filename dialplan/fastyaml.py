"""A fast YAML reader for configs that are plain data.

Why: ruamel's round-trip loader is pure Python and takes about 0.7 ms per
user line (7 s for 10,000 users), nearly all of it in its scanner and parser.
libyaml, PyYAML's C extension, composes the same text some twenty times
faster, and its nodes carry marks from which :meth:`Document.line_of` finds
the same lines ruamel's tree gives (docs/decisions.md D12).

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.scalarint import ScalarInt

try:  # PyYAML is only a speed-up: without its C extension every config takes the slow path.
    from yaml import YAMLError as _PyYAMLError  # type: ignore[import-untyped, unused-ignore]
    from yaml._yaml import CParser as _CParser  # type: ignore[import-untyped, unused-ignore]
except ImportError:  # pragma: no cover - depends on the install
    _CParser = None
    _PyYAMLError = Exception

__all__ = ["AVAILABLE", "Document", "Unsupported", "read", "read_plain"]

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
    """``text`` as plain dicts, lists, str, int, bool and None; see :func:`read`."""
    return read(text).data


def read(text: str) -> Document:
    """Read ``text`` into plain data that still knows its lines.

    Raises :class:`Unsupported` when the text needs the round-trip loader:
    it is not valid YAML, or uses something listed in the module docstring.
    """
    if _CParser is None or _GUARD.search(text):
        raise Unsupported
    try:
        root = _Composer(text).get_single_node()
    except _PyYAMLError as exc:
        raise Unsupported from exc
    if root is None:  # an empty document
        raise Unsupported
    return Document(_Walk().value(root), root)


@dataclass(frozen=True, slots=True)
class Document:
    """Plain data and the libyaml tree it came from, kept for line numbers."""

    data: Any
    root: Any

    def line_of(self, loc: Sequence[str | int], *, key_line: bool = False) -> int | None:
        """The line ``loader._line_of`` finds in ruamel's tree for ``loc``.

        The deepest node on ``loc`` that exists: a key whose value is a
        scalar reports the value's line, one whose value is a collection or
        null (or with ``key_line``, the last key) the key's line.
        """
        node = self.root
        line: int | None = None
        for index, part in enumerate(loc):
            if node.id == "mapping":
                pair = _pair(node, str(part))
                if pair is None:
                    break
                key, child = pair
                at_key = (key_line and index == len(loc) - 1) or not _is_scalar_value(child)
                mark = key.start_mark if at_key else child.start_mark
            elif node.id == "sequence" and isinstance(part, int) and 0 <= part < len(node.value):
                child = node.value[part]
                mark = child.start_mark
            else:
                break
            line = mark.line + 1
            node = child
        return line


def _pair(mapping: Any, key: str) -> tuple[Any, Any] | None:
    """The (key, value) nodes of ``key``; keys are strings (:class:`_Walk` made sure)."""
    for pair in mapping.value:
        if pair[0].value == key:
            return pair  # type: ignore[no-any-return]
    return None


def _is_scalar_value(node: Any) -> bool:
    return node.id == "scalar" and _scalar(node.value, node.style) is not None


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
