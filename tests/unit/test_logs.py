"""The JSON log writer: one line per event, and a dead log never breaks the caller."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest
import structlog

from softswitch import logline, logs
from softswitch.logs import LineWriter, _render, _stamp


def test_a_line_is_one_json_object_with_level_and_time() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(os.fdopen(w, "w", closefd=False))
        event = _stamp(None, "info", {"event": "register_ok", "user": "1001"})
        writer.msg(_render(None, "info", event))
        line = os.read(r, 4096).decode()
    finally:
        os.close(r)
        os.close(w)
    assert line.endswith("\n") and line.count("\n") == 1
    obj = json.loads(line)
    assert obj["event"] == "register_ok" and obj["level"] == "info" and obj["ts"] > 0


def test_a_closed_log_pipe_drops_the_line_instead_of_raising() -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone: write(2) fails with EPIPE
    try:
        writer = LineWriter(os.fdopen(w, "w", closefd=False))
        writer.msg('{"event":"x"}')
    finally:
        os.close(w)
    assert writer.dropped == 1


def test_a_stream_without_a_descriptor_is_written_and_flushed() -> None:
    stream = io.StringIO()
    writer = LineWriter(stream)
    writer.msg('{"event":"x"}')
    assert stream.getvalue() == '{"event":"x"}\n'


def _configured_lines(level: str, emit: Callable[[], None]) -> list[dict[str, object]]:
    """Configure the JSON chain on a pipe, run `emit`, return the JSON lines written."""
    r, w = os.pipe()
    saved = sys.stderr
    try:
        sys.stderr = os.fdopen(w, "w", closefd=False)
        logs.configure(level, "json")
        emit()
        os.close(w)
        w = -1
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        sys.stderr = saved
        structlog.reset_defaults()
        logline.set_sink(None, logging.INFO)
        if w >= 0:
            os.close(w)
        os.close(r)
    return [json.loads(line) for line in data.decode().splitlines()]


def test_the_outcome_event_written_directly_matches_the_structlog_chain() -> None:
    odd = 'c"1\\é\x01'  # a Call-ID may hold quotes and backslashes; escaping must agree
    fields = {"method": "REGISTER", "status": 401, "call_id": odd, "user": None, "peer": "p"}

    def emit() -> None:
        logs.outcome("register_challenged", "REGISTER", 401, odd, None, "p")
        structlog.get_logger("softswitch").info("register_challenged", **fields)
        logs.outcome("register_refused", "REGISTER", 403, "c1", "1002", "p", "not a delegate")

    direct, chained, detailed = _configured_lines("info", emit)
    assert direct.keys() == chained.keys()
    assert {k: v for k, v in direct.items() if k != "ts"} == {
        k: v for k, v in chained.items() if k != "ts"
    }
    assert direct["call_id"] == odd
    assert detailed["detail"] == "not a delegate" and detailed["user"] == "1002"


def test_the_outcome_event_honours_the_configured_level() -> None:
    def emit() -> None:
        logs.outcome("register_ok", "REGISTER", 200, "c1", "1001", "p")
        structlog.get_logger("softswitch").warning("still_written")

    assert [line["event"] for line in _configured_lines("warning", emit)] == ["still_written"]


def test_the_json_logger_honours_level_bind_and_exceptions() -> None:
    def emit() -> None:
        log = structlog.get_logger("softswitch.test")
        log.debug("not_written")
        log.info("plain", call_id="c1")
        log.bind(line="1001").warning("bound", party="1002")
        log.warn("warned")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", user="1001")

    plain, bound, warned, failed = _configured_lines("info", emit)
    assert plain["event"] == "plain" and plain["level"] == "info" and plain["call_id"] == "c1"
    assert bound["line"] == "1001" and bound["party"] == "1002" and bound["level"] == "warning"
    assert warned["level"] == "warning"
    assert failed["level"] == "error" and "ValueError: boom" in str(failed["exception"])
    assert "exc_info" not in failed


def test_a_line_built_field_by_field_is_the_encoders_text() -> None:
    import enum

    class State(enum.StrEnum):
        HELD = "held"

    fields = {
        "call": 'c"1\\é\x01',
        "n": 7,
        "big": -(2**70),
        "none": None,
        "yes": True,
        "no": False,
        "ratio": 0.1,
        "stats": {"a_to_b": {"rtp_packets": 3}, "b": [1, "x", None]},
        "state": State.HELD,
        "forks": [{"party": "1002", "dest": "udp:127.0.0.1:5070"}, {"party": 'q"'}],
        "empty": [],
        "long": [{"party": str(n)} for n in range(16)],
        "nested": [[1, 2.5], {"k": (1, 2)}, State.HELD, {1: "int key"}],
        "event": "call_media",
    }
    flat = logline.flat_line(dict(fields), "info")
    chained = _render(None, "info", _stamp(None, "info", dict(fields)))
    assert flat.rsplit(',"ts":', 1)[0] == chained.rsplit(',"ts":', 1)[0]
    assert abs(json.loads(flat)["ts"] - json.loads(chained)["ts"]) < 5


def test_the_time_stamp_text_is_the_microsecond_float(monkeypatch: pytest.MonkeyPatch) -> None:
    for us in (0, 1, 999_999, 1_795_821_474_727_800, 1_795_821_474_000_001):
        monkeypatch.setattr(time, "time_ns", lambda us=us: us * 1000 + 999)
        assert float(logline.ts_text()) == logline.now_us() == us / 1e6


def test_a_module_logger_writes_the_chains_line_directly() -> None:
    """`EventLog` (what the modules log with) and the structlog chain give the same lines."""
    odd = 'c"1\\é\x01'

    def emit() -> None:
        chain = structlog.get_logger("softswitch.test")
        log = logline.EventLog("softswitch.test")
        for logger in (chain, log):
            logger.debug("not_written")
            logger.info("plain", call_id=odd, n=3, ok=True, none=None)
            logger.warning("formatted %s", "x", line="1001")
            logger.info("stamped", level="custom")
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed", user="1001")

    lines = _configured_lines("info", emit)
    assert len(lines) == 8
    chained, direct = lines[:4], lines[4:]
    for a, b in zip(chained, direct, strict=True):
        assert list(a) == list(b)  # same keys in the same order
        assert {k: v for k, v in a.items() if k != "ts"} == {
            k: v for k, v in b.items() if k != "ts"
        }
    assert direct[1]["event"] == "formatted x" and direct[3]["level"] == "error"
    assert "ValueError: boom" in str(direct[3]["exception"])


def test_a_module_logger_goes_through_structlog_when_no_json_sink_is_set() -> None:
    seen: list[dict[str, object]] = []

    def keep(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
        seen.append(dict(event))
        raise structlog.DropEvent

    structlog.configure(processors=[keep])
    try:
        logline.EventLog("softswitch.test").info("via_structlog", line="1001")
    finally:
        structlog.reset_defaults()
    assert seen == [{"event": "via_structlog", "line": "1001"}]
