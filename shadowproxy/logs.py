"""Logging set-up: human-readable text, or one JSON object per line for log shippers.

Lines about a request carry its id (``extra={"request_id": ...}``), never its content:
no body, header or query value is ever formatted into a log line (THREAT_MODEL.md). Events
a client can cause at will are logged through a ``Throttle``, so that no client can fill
the log.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import UTC, datetime

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One line per event: time, level, logger, message, pid, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class TextFormatter(logging.Formatter):
    """Plain lines; a line about one request ends with its request id.

    A line's time (``%(asctime)s``) is the JSON format's ``time``: UTC, with its offset.
    logging's default is the local time without a zone, which the lines of an operator's
    laptop and of a UTC server did not share, which said nothing of the UTC times in the
    messages (a retention's cutoff), and which ran an hour back, the same hour twice,
    when the local clocks were put back."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} request_id={_text_value(str(request_id))}" if request_id else line


def _text_value(value: str) -> str:
    """``value`` as is, or JSON-quoted if it holds a space, a quote, a backslash, ``=`` or a
    character that is not printable: the client chooses its X-Request-Id, and bare it could
    add fields of its own to the line (``X-Request-Id: a status=200 request_id=b``)."""
    if value.isprintable() and not any(c in value for c in ' "\\='):
        return value
    return json.dumps(value)


class Throttle:
    """At most ``limit`` lines per ``period_s`` for one kind of event; the lines held back
    are counted, and the next line let through says how many there were."""

    def __init__(self, limit: int = 10, period_s: float = 60.0) -> None:
        self.limit = limit
        self.period_s = period_s
        self._window_start = -period_s
        self._in_window = 0
        self._held_back = 0

    def allow(self, now: float | None = None) -> tuple[bool, int]:
        """(log this event?, events held back since the last one logged)."""
        now = time.monotonic() if now is None else now
        if now - self._window_start >= self.period_s:
            self._window_start = now
            self._in_window = 0
        if self._in_window >= self.limit:
            self._held_back += 1
            return False, 0
        self._in_window += 1
        held, self._held_back = self._held_back, 0
        return True, held


def setup_logging(log_format: str = "text", level: str | None = None) -> None:
    """Configure the root logger once, for ``shadowproxy run`` and its workers."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(
            "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("SHADOWPROXY_LOG_LEVEL", "INFO"))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
