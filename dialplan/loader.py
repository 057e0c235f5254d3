"""Load the operator's YAML into a :class:`~dialplan.models.Config`.

Why ruamel's round-trip loader rather than PyYAML: its nodes remember the
line of every key, value and list item, which is what lets each error name
the line the operator has to edit. Pydantic reports errors by path
(``("users", 1, "extension")``); :func:`_line_of` walks the same path through
the YAML tree to find the line.

That loader is pure Python and slow (7 s for 10,000 users), so a config is
first read by :mod:`dialplan.fastyaml` (libyaml), whose tree gives the same
lines; ruamel reads only what that reader gives up on, which includes every
YAML syntax error (docs/decisions.md D12).

Everything wrong with a config is collected into one :class:`ConfigError`:
YAML syntax errors stop the pass (there is no tree to validate), but type
errors and cross-reference errors are reported together, sorted by line.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import importlib.resources
import os
import re
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from dialplan import fastyaml
from dialplan.checks import Loc, Problem, all_problems, format_loc
from dialplan.errors import ConfigError, ConfigIssue
from dialplan.fields import Extension, Number
from dialplan.models import (
    CONTEXT_BASE_DIR,
    CONTEXT_DEFER_CHECKS,
    Config,
    Delegation,
    HostPort,
    Lines,
    ListenSpec,
    Media,
    User,
)

__all__ = [
    "default_config_path",
    "load_config",
    "load_config_text",
    "load_default_config",
]

#: The repository copy of the embedded default, used when the ``softswitch``
#: package does not ship ``default.yaml`` (a source checkout).
_REPO_DEFAULT = Path(__file__).resolve().parent.parent / "conf" / "softswitch.yaml"

_STANDARD_TAG = "tag:yaml.org,2002:"

#: How to name what was found where the top-level mapping belongs.
_KINDS: dict[type, str] = {list: "a list", str: "a string", int: "a number", float: "a number"}

#: Inputs of fields with these names are never echoed in messages.
_SECRET_FIELDS = frozenset({"password"})


def default_config_path() -> Path:
    """Path of the embedded default config.

    An installed package ships it as ``softswitch/default.yaml``; a source
    checkout has it at ``conf/softswitch.yaml`` (the former is a symlink to
    the latter in the repository).
    """
    try:
        resource = importlib.resources.files("softswitch") / "default.yaml"
    except ModuleNotFoundError:
        return _REPO_DEFAULT
    # A zipped install yields a non-filesystem Traversable: fall back rather
    # than hand out a path that cannot be opened.
    if isinstance(resource, Path) and resource.is_file():
        return resource
    return _REPO_DEFAULT


def load_default_config(data_dir_base: Path | None = None) -> Config:
    """Load the embedded default; a relative ``data_dir`` is under the cwd.

    The default may live in site-packages, which is not writable, so its
    ``data_dir`` must not resolve next to the file.
    """
    base = data_dir_base if data_dir_base is not None else Path.cwd()
    return load_config(default_config_path(), data_dir_base=base)


def load_config(path: str | os.PathLike[str], data_dir_base: Path | None = None) -> Config:
    """Load and validate the config file at ``path``.

    A relative ``data_dir`` resolves against ``data_dir_base`` if given,
    else against the directory of ``path`` (so a config and its data move
    together). Raises :class:`ConfigError` listing every problem found.
    """
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue(source, None, "", f"cannot read: {reason}")]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([ConfigIssue(source, line, "", "the file is not valid UTF-8")]) from exc
    base = data_dir_base if data_dir_base is not None else Path(source).parent
    return load_config_text(text, source=source, base_dir=base)


def load_config_text(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Load and validate config YAML given as text.

    ``source`` names the text in messages. A relative ``data_dir`` resolves
    against ``base_dir``, or the current directory when it is None.
    """
    base = base_dir if base_dir is not None else Path.cwd()
    with _cyclic_gc_paused():
        document = _read_fast(text)
        if document is None:
            return _load_with_lines(text, source, base)
        try:
            # Config runs the cross-reference checks itself when not deferred.
            return Config.model_validate(document.data, context={CONTEXT_BASE_DIR: base})
        except ValidationError:
            return _validate(document.data, document.line_of, source, base, [])


def _read_fast(text: str) -> fastyaml.Document | None:
    """The document as libyaml reads it, or None if only ruamel's reading will do.

    ruamel's round-trip parser is pure Python (7 s for 10,000 users), so it
    only reads what the fast reader gives up on (docs/decisions.md D12),
    including every YAML error and a document that is not a mapping, whose
    messages come from ruamel.
    """
    try:
        document = fastyaml.read(text)
    except fastyaml.Unsupported:
        return None
    return document if isinstance(document.data, dict) else None


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Keep the cyclic collector from running while a big config is built.

    The hundreds of thousands of objects a large config makes hold no cycles,
    but their allocation triggers collections that scan them again and again:
    for 10,000 users that halved the load time (0.6 s to 0.3 s). Restored only
    if it was on, so a caller that turned it off keeps it off.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_with_lines(text: str, source: str, base_dir: Path) -> Config:
    """Parse with ruamel's round-trip loader, then validate as :func:`_validate` does."""
    tree = _parse_yaml(text, source)
    issues: list[ConfigIssue] = []
    data = _to_plain(tree, (), tree, source, issues)
    if not isinstance(data, dict):
        found = "an empty document" if data is None else _KINDS.get(type(data), "a scalar")
        raise ConfigError(
            [
                ConfigIssue(
                    source,
                    _line_of(tree, ()),
                    "",
                    f"the config must be a mapping with keys such as domain, listen and "
                    f"users; found {found}",
                )
            ]
        )

    def line_of(loc: Sequence[str | int], *, key_line: bool = False) -> int | None:
        return _line_of(tree, loc, key_line=key_line)

    return _validate(data, line_of, source, base_dir, issues)


class _LineOf(Protocol):
    """Finds the line of a path: :func:`_line_of` or :meth:`fastyaml.Document.line_of`."""

    def __call__(self, loc: Sequence[str | int], *, key_line: bool = False) -> int | None: ...


def _validate(
    data: dict[Any, Any], line_of: _LineOf, source: str, base_dir: Path, issues: list[ConfigIssue]
) -> Config:
    """Validate ``data``; raise one ConfigError with ``issues`` and every problem found."""
    context = {CONTEXT_BASE_DIR: base_dir, CONTEXT_DEFER_CHECKS: True}
    config: Config | None = None
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        issues += (_issue_from_error(error, line_of, source) for error in exc.errors())

    def where(loc: Loc) -> str:
        line = line_of(loc)
        return f"at line {line}" if line is not None else f"at {format_loc(loc)}"

    for problem in _cross_problems(config, data):
        issues.append(
            ConfigIssue(
                source, line_of(problem.loc), format_loc(problem.loc), problem.render(where)
            )
        )

    if issues:
        unique = list(dict.fromkeys(issues))
        unique.sort(key=lambda issue: (issue.line or 0, issue.column or 0))
        raise ConfigError(unique)
    assert config is not None  # no issues means validation succeeded
    return config


# --------------------------------------------------------------------------
# YAML


def _parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document into ruamel's line-carrying tree."""
    yaml = YAML(typ="rt")  # per call: YAML instances are not thread-safe
    try:
        return yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = _yaml_message(exc)
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        raise ConfigError([ConfigIssue(source, line, "", message, column)]) from exc
    except ReaderError as exc:  # a character YAML does not allow; has no mark
        line = text[: exc.position].count("\n") + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = f"character {exc.character!r} is not allowed in YAML: {exc.reason}"
        raise ConfigError([ConfigIssue(source, line, "", message, column)]) from exc
    except YAMLError as exc:
        raise ConfigError([ConfigIssue(source, None, "", f"invalid YAML: {exc}")]) from exc


def _yaml_message(exc: MarkedYAMLError) -> str:
    """The parser's message, made to stand alone and never to echo a value."""
    problem = exc.problem or exc.context or "invalid YAML"
    if isinstance(exc, DuplicateKeyError):
        # ruamel's text quotes both values, which may be passwords.
        match = re.search(r'duplicate key "(.*?)"', problem)
        key = match.group(1) if match else "?"
        return f'duplicate key "{key}": a key may appear only once in a mapping'
    message = problem
    if exc.context and exc.context_mark is not None and exc.context_mark != exc.problem_mark:
        message += f" ({exc.context} starting at line {exc.context_mark.line + 1})"
    if "undefined alias" in problem:
        message += '; values starting with * must be quoted, e.g. "*8"'
    return message


def _to_plain(node: Any, loc: Loc, tree: Any, source: str, issues: list[ConfigIssue]) -> Any:
    """Convert ruamel's node types to plain dict/list/str/float.

    Integer subclasses are kept on purpose: they tell the extension validator
    that YAML rewrote the number (``0123``), see :mod:`dialplan.fields`.
    Custom tags are reported, not silently dropped.
    """
    tag = getattr(node, "tag", None)
    tag_value = getattr(tag, "value", None)
    if isinstance(tag_value, str) and not tag_value.startswith(_STANDARD_TAG):
        issues.append(
            ConfigIssue(
                source,
                _line_of(tree, loc),
                format_loc(loc),
                f"YAML tag {tag_value} is not supported",
            )
        )
    if isinstance(node, dict):
        return {
            key: _to_plain(value, (*loc, key), tree, source, issues) for key, value in node.items()
        }
    if isinstance(node, list):
        return [_to_plain(value, (*loc, i), tree, source, issues) for i, value in enumerate(node)]
    if isinstance(node, TaggedScalar):
        return str(node.value)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, float):
        return float(node)
    return node


def _line_of(tree: Any, loc: Sequence[str | int], *, key_line: bool = False) -> int | None:
    """1-based line of the deepest node on ``loc`` that the YAML tree has.

    A key whose value is a scalar reports the value's line (they differ
    when the value is on the next line); a key whose value is a mapping,
    a list or empty reports the key's line. With ``key_line`` the last step always
    reports the key (used for unknown keys). A path that leaves the tree
    (a missing key) stops at the parent, which is where the key belongs.
    """
    node = tree
    line: int | None = None
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(node, CommentedMap):
            key = _find_key(node, part)
            if key is _NOT_FOUND:
                break
            child = node[key]
            try:
                # An empty (null) value has no position of its own.
                if (key_line and last) or child is None or isinstance(child, dict | list):
                    pos = node.lc.key(key)
                else:
                    pos = node.lc.value(key)
            except (KeyError, TypeError):  # a key merged in via '<<'
                pos = (node.lc.line, node.lc.col)
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            child = node[part]
            try:
                pos = node.lc.item(part)
            except (KeyError, TypeError):
                pos = (node.lc.line, node.lc.col)
        else:
            break
        if pos[0] is not None:
            line = pos[0] + 1
        node = child
    return line


_NOT_FOUND = object()


def _find_key(node: CommentedMap, part: str | int) -> Any:
    if part in node:
        return part
    for key in node:  # pydantic may report a non-string key as its str()
        if str(key) == str(part):
            return key
    return _NOT_FOUND


# --------------------------------------------------------------------------
# Pydantic errors


def _issue_from_error(error: ErrorDetails, line_of: _LineOf, source: str) -> ConfigIssue:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "value_error":
        # Our validators' messages are written for operators; drop pydantic's
        # "Value error, " prefix.
        message = str(error.get("ctx", {}).get("error", error["msg"]))
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "extra_forbidden":
        message = _unknown_key_message(loc)
    elif kind == "invalid_key":
        message = "keys must be strings"
    else:
        message = error["msg"] + _echo(error.get("input"), loc)
    line = line_of(loc, key_line=kind == "extra_forbidden")
    return ConfigIssue(source, line, format_loc(loc), message)


def _echo(value: Any, loc: Loc) -> str:
    """`` (got 'tls')`` for short scalar inputs, never for secrets."""
    if any(part in _SECRET_FIELDS for part in loc):
        return ""
    if value is None or isinstance(value, str | int | float | bool):
        text = repr(value)
        if len(text) > 60:
            text = text[:57] + "..."
        return f" (got {text})"
    return ""


def _unknown_key_message(loc: Loc) -> str:
    key = str(loc[-1]) if loc else "?"
    allowed = _model_keys(loc[:-1])
    message = f"unknown key {key!r}"
    if not allowed:
        return message
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    return f"{message}; expected one of: {', '.join(allowed)}"


def _model_keys(loc: Loc) -> list[str] | None:
    """The keys the model at ``loc`` accepts, by walking Config's types."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(part, int):
            if get_origin(annotation) not in (list, tuple, set, frozenset):
                return None
            annotation = get_args(annotation)[0]
        elif _is_model(annotation) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        else:
            return None
    annotation = _unwrap(annotation)
    return list(annotation.model_fields) if _is_model(annotation) else None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` to reach the model or container."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


# --------------------------------------------------------------------------
# Cross-reference checks


def _adapter(annotation: Any) -> Callable[[Any], Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    return adapter.validate_python


#: Validators for the parts the cross-reference checks need, used one by one
#: when the whole config failed so that the valid parts can still be checked.
#: Lists are validated item by item (see :func:`_items`).
_SECTIONS: dict[str, Callable[[Any], Any]] = {
    "users": _adapter(User),
    "delegations": _adapter(Delegation),
    "listen": _adapter(ListenSpec),
    "lines": _adapter(Lines),
    "http": _adapter(HostPort),
    "media": _adapter(Media),
}


def _validated(name: str, value: Any) -> Any:
    try:
        return _SECTIONS[name](value)
    except ValidationError:
        return None


def _section(data: dict[Any, Any], name: str) -> Any:
    """Section ``name`` validated on its own, its default, or None if invalid."""
    if name not in data:
        field = Config.model_fields[name]
        return None if field.is_required() else field.get_default(call_default_factory=True)
    return _validated(name, data[name])


#: Whole-list validators for :func:`_items`: one call for 10,000 users instead
#: of 10,000 calls (0.17 s of a 10,000-user error report, profiled).
_LISTS: dict[str, Callable[[Any], list[Any]]] = {
    "users": _adapter(list[User]),
    "delegations": _adapter(list[Delegation]),
    "listen": _adapter(list[ListenSpec]),
}


def _items(data: dict[Any, Any], name: str) -> list[Any] | None:
    """List section ``name`` validated item by item; None marks an invalid item.

    The list is validated whole; when that fails, the items its errors do not
    name are validated together again, and only if that fails too one by one.
    """
    value = data.get(name, [])
    if not isinstance(value, list):
        return None
    try:
        return _LISTS[name](value)
    except ValidationError as exc:
        bad = {error["loc"][0] for error in exc.errors() if error["loc"]}
    good = [item for i, item in enumerate(value) if i not in bad]
    try:
        valid = iter(_LISTS[name](good))
    except ValidationError:
        return [_validated(name, item) for item in value]
    return [None if i in bad else next(valid) for i in range(len(value))]


_EXTENSION: Callable[[Any], str] = _adapter(Extension)
_NUMBER: Callable[[Any], str] = _adapter(Number)


def _salvage_user(raw: Any) -> User | None:
    """The identity of a user entry that failed validation, if it has one.

    A user with, say, a typo'd key still owns its extension: without it the
    checks would skip every "unknown delegate" test (or report the user's
    extension as unknown) and miss a duplicate extension. The placeholder is
    built with ``model_construct`` (no validation, no name or password) and
    only ever reaches the cross-reference checks, which read ``extension``
    and ``number`` alone.
    """
    if not isinstance(raw, dict):
        return None
    try:
        extension = _EXTENSION(raw.get("extension"))
    except ValidationError:
        return None
    try:
        number: str | None = _NUMBER(raw["number"]) if "number" in raw else None
    except ValidationError:
        number = None
    return User.model_construct(extension=extension, number=number)


def _users(data: dict[Any, Any]) -> list[User | None] | None:
    users = _items(data, "users")
    raw = data.get("users")
    if users is None or not isinstance(raw, list):
        return None
    return [u if u is not None else _salvage_user(r) for u, r in zip(users, raw, strict=True)]


def _cross_problems(config: Config | None, data: dict[Any, Any]) -> list[Problem]:
    if config is not None:
        return all_problems(
            users=config.users,
            delegations=config.delegations,
            ring_time=config.lines.ring_time,
            listen=config.listen,
            http=config.http,
            media=config.media,
        )
    lines: Lines | None = _section(data, "lines")
    return all_problems(
        users=_users(data),
        delegations=_items(data, "delegations"),
        ring_time=lines.ring_time if lines is not None else None,
        listen=_items(data, "listen"),
        http=_section(data, "http"),
        media=_section(data, "media"),
    )
