"""Client text cannot forge or reorder log lines (text and JSON formats)."""

from __future__ import annotations

import json
import logging
import sys

from recon_server.ops import logs

HOSTILE = "M1\n2026-01-01 00:00:00,000 ERROR forged\r\x1b[31m\x85\u202eevil\u2028"


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"bad header {HOSTILE}")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("recon_server.test", logging.ERROR, __file__, 1, msg, args, exc_info)
    record.measurement_id = HOSTILE
    record.peer = "10.0.0.5:4711"
    return record


def test_text_lines_escape_every_control_and_bidi_character() -> None:
    line = logs.TextFormatter().format(_record("configuration %r from %s", HOSTILE, HOSTILE))
    assert "\n" not in line and "\r" not in line
    assert not any(ch in line for ch in "\x1b\x85\u202e\u2028")
    assert "M1\\n2026-01-01" in line and "\\x1b[31m\\x85\\u202eevil\\u2028" in line
    assert line.count("[meas=M1\\n2026") == 1


def test_a_traceback_follows_on_indented_lines() -> None:
    text = logs.TextFormatter().format(_record("stream failed", exc=True))
    first, *rest = text.split("\n")
    assert first.endswith("stream failed") and rest
    assert all(line.startswith("    ") for line in rest), rest
    assert not any(ch in text for ch in "\r\x1b\x85\u202e\u2028")


def test_json_lines_keep_the_text_and_escape_it() -> None:
    line = logs.JsonFormatter().format(_record("configuration %s", HOSTILE, exc=True))
    assert "\n" not in line and not any(ch in line for ch in "\r\x1b\x85\u202e\u2028")
    doc = json.loads(line)
    assert doc["message"] == f"configuration {HOSTILE}" and doc["measurement_id"] == HOSTILE
    assert HOSTILE in doc["exception"]


def test_the_record_is_not_changed_for_other_handlers() -> None:
    record = _record("x %s", HOSTILE)
    logs.TextFormatter().format(record)
    assert record.measurement_id == HOSTILE  # type: ignore[attr-defined]
    assert record.getMessage() == f"x {HOSTILE}"
