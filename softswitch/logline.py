"""The per-event half of logging, compiled with mypyc (D17): the modules' loggers and the
JSON text of one event, built field by field.

logs.py holds the set-up (structlog, console or JSON, the line writer) and points the sink
here at the writer. An answered call logs eight to eleven events; through structlog each
cost a lazy proxy's `__getattr__`, a bound logger and a processor loop, all interpreted, and
`JSONEncoder.encode`: ~17 % of the call's CPU (cProfile). `EventLog` writes the same line
directly while the JSON chain is configured, and is an ordinary structlog logger otherwise
(console on a TTY, tests). The text is exactly what the chain's encoder gives (same keys,
order, escaping), which tests/unit/test_logs.py checks.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

import structlog

ENCODER: Final = json.JSONEncoder(separators=(",", ":"), default=repr)
json_str: Final = json.encoder.encode_basestring_ascii  # what ENCODER uses for str values


def ts_text() -> str:
    """`_now_us()` as the JSON text the encoder would give it, without a float.

    float's repr (David Gay's shortest-digits algorithm) cost ~6,400 instructions a line, a
    quarter of an event's encoding (callgrind). Printed from the integer microseconds, the
    text may keep trailing zeros (`.250000`), but it denotes the same number, and a JSON reader
    gets the same float: both are the double nearest to microseconds / 10**6.
    """
    digits = str(time.time_ns() // 1000).zfill(7)  # `:06d` formatting cost 4,000 instructions
    return f"{digits[:-6]}.{digits[-6:]}"


def now_us() -> float:
    """Seconds since the epoch to the microsecond, as a float.

    `round(time.time(), 6)` did the same through two float-to-decimal conversions (round's,
    then the encoder's repr): ~4 % of an answered call's instructions (callgrind). Integer
    division leaves one, in the encoder.
    """
    return time.time_ns() // 1000 / 1e6


# '"key":' for each field name seen: names come from the code, a few dozen in all; bounded all
# the same, so that a caller passing odd names cannot grow it.
_KEY_TEXT: dict[str, str] = {}
_KEY_TEXT_MAX = 512


def _key_text(key: str) -> str:
    text = _KEY_TEXT.get(key)
    if text is None:
        text = json_str(key) + ":"
        if len(_KEY_TEXT) < _KEY_TEXT_MAX:
            _KEY_TEXT[key] = text
    return text


def _value_text(value: Any) -> str:
    """One field value as the encoder renders it; the encoder itself for anything nested."""
    kind = type(value)
    if kind is str:
        return json_str(value)
    if kind is int:
        return str(value)  # exactly int: no IntEnum, whose str() is its name
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is dict and all(type(k) is str for k in value):
        return "{" + ",".join([_key_text(k) + _value_text(v) for k, v in value.items()]) + "}"
    if kind is list and len(value) <= 4:
        # A short list (one call's forks): `JSONEncoder.encode` costs ~10,000 instructions of
        # interpreted set-up before its C walk, which only pays for itself on longer lists.
        return "[" + ",".join([_value_text(v) for v in value]) + "]"
    if isinstance(value, str):  # a StrEnum member: the encoder writes its text
        return json_str(value)
    return ENCODER.encode(value)


def flat_line(fields: dict[str, Any], level: str) -> str:
    """The JSON line `_render(_stamp(fields))` gives, built field by field.

    `JSONEncoder.encode` builds a new C encoder object for every call and walks the dict
    through Python-level wrappers: ~26,000 instructions for a line of eight fields, and an
    answered call logs eight. Most values are plain strings and ints whose text is one call
    away. Same keys, order, escaping (json's own ASCII string encoder) and numbers.
    """
    parts = [_key_text(k) + _value_text(v) for k, v in fields.items()]
    return "{" + ",".join(parts) + f',"level":"{level}","ts":{ts_text()}}}'


# --- where events go ----------------------------------------------------------------------------

# The JSON chain's line writer (logs.LineWriter) and its level, set by `logs.configure`; while
# the writer is None (console, tests) every event goes through structlog.
_sink_writer: Any = None
_sink_level: int = logging.INFO

DEBUG: Final = logging.DEBUG
INFO: Final = logging.INFO
WARNING: Final = logging.WARNING
ERROR: Final = logging.ERROR
CRITICAL: Final = logging.CRITICAL


def set_sink(writer: Any, min_level: int) -> None:
    """Write JSON lines to `writer` (anything with `msg(str)`) from now on; None: structlog."""
    global _sink_writer, _sink_level
    _sink_writer = writer
    _sink_level = min_level


def sink() -> tuple[Any, int]:
    """The writer (or None) and the level `set_sink` last set."""
    return _sink_writer, _sink_level


def write_event(
    writer: Any, level: str, event: str, args: tuple[Any, ...], kw: dict[str, Any]
) -> None:
    """Render one event as the JSON chain does (`logs._stamp` then `logs._render`) and write it."""
    kw["event"] = event % args if args else event
    if "exc_info" in kw or "level" in kw or "ts" in kw:
        # A traceback to format, or a field the stamp overwrites in place: the chain's steps.
        kw["level"] = level
        kw["ts"] = now_us()
        fields = structlog.processors.format_exc_info(None, level, kw) if "exc_info" in kw else kw
        writer.msg(ENCODER.encode(fields))
    else:
        writer.msg(flat_line(kw, level))


class EventLog:
    """A module's logger: `log = EventLog(__name__)`, then `log.info("event", field=value)`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._structlog: Any = structlog.get_logger(name)

    def _log(
        self, method: str, level: int, event: str, args: tuple[Any, ...], kw: dict[str, Any]
    ) -> None:
        writer = _sink_writer
        if writer is None:
            getattr(self._structlog, method)(event, *args, **kw)
        elif _sink_level <= level:
            if method == "exception":  # an error with the exception being handled
                kw.setdefault("exc_info", True)
                method = "error"
            write_event(writer, method, event, args, kw)

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("debug", DEBUG, event, args, kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("info", INFO, event, args, kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("warning", WARNING, event, args, kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("error", ERROR, event, args, kw)

    def critical(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("critical", CRITICAL, event, args, kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> None:
        """An error with the exception being handled (its traceback in `exception`)."""
        self._log("exception", ERROR, event, args, kw)


_outcome_log = EventLog("softswitch")


def outcome(
    event: str,
    method: str,
    status: int,
    call_id: str,
    user: str | None,
    peer: str,
    detail: str | None = None,
) -> None:
    """The one event per SIP transaction outcome (issue 2): thousands a second under load.

    Its fields in a fixed order (`detail` only when there is one), written like every other
    event; compiled, and handed to the logger without a keyword splat.
    """
    fields: dict[str, Any] = {
        "method": method,
        "status": status,
        "call_id": call_id,
        "user": user,
        "peer": peer,
    }
    if detail:
        fields["detail"] = detail
    _outcome_log._log("info", INFO, event, (), fields)
