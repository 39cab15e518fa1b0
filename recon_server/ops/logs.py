"""Structured logs: every line carries the measurement id of the scan being handled.

The connection handlers (``service.server``, ``service.gadget``) call :func:`set_measurement` once the
ISMRMRD header is parsed (and :func:`set_peer` when a connection starts); the value lives in a
:class:`contextvars.ContextVar`, so each connection thread has its own. :class:`ContextFilter`,
attached to the root handlers by :func:`configure_logging`, copies it onto every record as
``record.measurement_id`` and ``record.peer`` ("-" outside a connection).

Formats:

``text``  ``2025-01-01 12:00:00,000 INFO recon_server.service.server [meas=MID_1 peer=10.0.0.5:4711]: msg``
``json``  one object per line: ``{"time", "level", "logger", "message", "measurement_id",
          "peer", "thread"}`` (+ ``"exception"`` when there is a traceback)

Measurement ids, configuration names and texts quoted in messages come from clients: in ``text``
lines every control character (C0, C1, DEL, U+2028/2029) and bidirectional control is escaped
(``\n``, ``\x1b``, ``\u202e``), so one record is one line; a traceback follows on lines indented
by four spaces, which no record line starts with. ``json`` escapes the same characters inside
its strings (``\u0085``), so a log shipper gets the text back unchanged.
"""

from __future__ import annotations

import contextvars
import copy
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

NONE = "-"
_MEASUREMENT: contextvars.ContextVar[str] = contextvars.ContextVar("measurement_id", default=NONE)
_PEER: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default=NONE)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [meas=%(measurement_id)s peer=%(peer)s]: %(message)s"

#: What a client controls (measurement ids, configuration names, texts in error messages) must not
#: forge or reorder log lines: C0 and C1 controls, DEL, the Unicode line and paragraph separators
#: and the bidirectional controls are escaped in every line (:func:`escape_controls`).
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: What JSON leaves as it is (``json.dumps`` escapes C0 controls itself).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_one(match: re.Match[str]) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def escape_controls(text: str) -> str:
    r"""``text`` with every :data:`UNSAFE` character written as an escape (``\n``, ``\x1b``, ``\u202e``)."""
    return UNSAFE.sub(_escape_one, text)


def set_measurement(measurement_id: str) -> None:
    """Tag this thread's (context's) log lines with a scan's measurement id."""
    _MEASUREMENT.set(measurement_id or NONE)


def set_peer(peer: object) -> None:
    """Tag this context's log lines with the connection's peer (``host:port``)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        peer = f"{peer[0]}:{peer[1]}"
    _PEER.set(str(peer) if peer else NONE)


def current_measurement() -> str:
    return _MEASUREMENT.get()


@contextmanager
def connection_context(peer: object) -> Iterator[None]:
    """Scope a connection: peer set, measurement id cleared, both restored afterwards."""
    tokens = (_PEER.set(NONE), _MEASUREMENT.set(NONE))
    set_peer(peer)
    try:
        yield
    finally:
        _PEER.reset(tokens[0])
        _MEASUREMENT.reset(tokens[1])


class ContextFilter(logging.Filter):
    """Adds ``measurement_id`` and ``peer`` from the context to every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "measurement_id"):
            record.measurement_id = _MEASUREMENT.get()
        if not hasattr(record, "peer"):
            record.peer = _PEER.get()
        return True


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT` with client text escaped (module docstring): one record, one line; a
    traceback's lines follow indented."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        safe = copy.copy(record)  # other handlers see the record unchanged
        safe.message = escape_controls(record.message)
        safe.measurement_id = escape_controls(str(getattr(record, "measurement_id", NONE)))
        safe.peer = escape_controls(str(getattr(record, "peer", NONE)))
        return super().formatMessage(safe)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        head, sep, tail = text.partition("\n")  # the first line is escaped: this is the traceback
        if not sep:
            return text
        return head + "".join("\n    " + escape_controls(line) for line in tail.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line (UTC ISO time), for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc = {
            "time": f"{created}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "measurement_id": getattr(record, "measurement_id", NONE),
            "peer": getattr(record, "peer", NONE),
            "thread": record.threadName,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes C0 controls; the rest of UNSAFE is escaped here (inside strings only:
        # none of these characters can occur outside one).
        return _JSON_UNSAFE.sub(_json_escape, json.dumps(doc, ensure_ascii=False))


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def configure_logging(log_format: str = "text", level: str = "INFO") -> None:
    """Root logger: one stderr handler (created if absent) with the context filter and format.

    Called by ``recon-server serve`` after the CLI's ``basicConfig``; safe to call twice.
    """
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {log_format!r}")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
    root.setLevel(getattr(logging, level))
