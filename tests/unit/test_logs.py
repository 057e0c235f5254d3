"""The JSON log writer: one line per event, and a dead log never breaks the caller."""

from __future__ import annotations

import io
import json
import os

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
