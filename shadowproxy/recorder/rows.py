"""Exchange → database rows: header decoding and redaction, JSON detection, timestamps.

Rows have the column order of ``REQUEST_COLUMNS`` / ``RESPONSE_COLUMNS``, with the JSON
columns as text and the timestamps as Unix seconds (floats, which the writer's connection
encodes for ``timestamptz`` itself: see ``postgres.py``). A body that looks like JSON is not
parsed here: the normal path COPYs the text straight into the jsonb column, so PostgreSQL
parses each body exactly once, and the rare batch with a body that is not valid JSON after
all is refused as a whole and stored through the checking path (``postgres.py``). Only
redaction needs the parsed document.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from shadowproxy.config import RecordingConfig
from shadowproxy.failures import kind_of_legacy_error
from shadowproxy.models import Exchange, Headers
from shadowproxy.recorder.bodies import json_text, parse_json_path, redact_json

REQUEST_COLUMNS = ("id", "request_id", "route", "received_at", "method", "path", "query",
                   "headers", "body", "body_json", "body_size", "body_truncated", "client_addr",
                   "config_version")
RESPONSE_COLUMNS = ("request", "target", "role", "status", "headers", "body", "body_json",
                    "body_size", "body_truncated", "latency_ms", "error", "started_at",
                    "error_kind")

Row = tuple[Any, ...]
REDACTED = "[redacted]"


class RowEncoder:
    """Turns exchanges into (request rows, response rows) under the recording settings."""

    def __init__(self, recording: RecordingConfig) -> None:
        self._redact = frozenset(h.encode() for h in recording.redact_headers)
        self._json_paths = [parse_json_path(p) for p in recording.redact_json]
        self._cap = recording.max_decompressed_bytes
        self._names: dict[bytes, tuple[str, bool]] = {}
        """Header name as sent → (JSON key, redact?): names repeat on nearly every request."""

    def headers(self, headers: Headers | None) -> str | None:
        """Headers as a JSON object text: names lower-cased, repeats joined with ", "."""
        if headers is None:
            return None
        merged: dict[str, str] = {}
        names = self._names
        for name, value in headers:
            known = names.get(name)
            if known is None:
                lname = name.lower()
                known = names[name] = (lname.decode("latin-1"), lname in self._redact)
                if len(names) > 4096:  # a client inventing names must not grow this forever
                    names.clear()
            key, redacted = known
            text = REDACTED if redacted else value.decode("latin-1")
            merged[key] = merged[key] + ", " + text if key in merged else text
        return orjson.dumps(merged).decode()

    def body(self, body: bytes | None, headers: Headers | None) -> tuple[bytes | None,
                                                                        str | None]:
        """(bytes to store, JSON text or None), with configured JSON fields redacted."""
        if not body:
            return body, None
        text = json_text(body, headers or [], self._cap)
        if text is None:
            return body, None
        if self._json_paths:
            redacted = redact_json(text, self._json_paths)
            if redacted is not None:
                # The stored bytes must not keep the secret either: store the redacted JSON.
                return redacted.encode("utf-8"), redacted
        return body, text

    def encode(self, exchanges: Iterable[Exchange]) -> tuple[list[Row], list[Row]]:
        requests: list[Row] = []
        responses: list[Row] = []
        for ex in exchanges:
            if not ex.request_stored:
                body, text = self.body(ex.body, ex.headers)
                requests.append((
                    ex.id, ex.request_id, ex.route, ex.received_at,
                    ex.method, ex.path, ex.query, self.headers(ex.headers) or "{}", body, text,
                    ex.body_size, ex.body_truncated, ex.client_addr, ex.config_version))
            for r in ex.responses:
                rbody, rtext = self.body(r.body, r.headers)
                responses.append((
                    ex.id, r.target, r.role, r.status, self.headers(r.headers), rbody, rtext,
                    r.body_size if r.status is not None else None, r.body_truncated,
                    r.latency_ms, r.error, r.started_at, r.error_kind))
        return requests, responses


def upgrade_rows(requests: list[Row], responses: list[Row]) -> tuple[list[Row], list[Row]]:
    """Rows of a spool file written by an earlier version, in today's column layout."""
    if requests and len(requests[0]) == len(REQUEST_COLUMNS) - 1:
        requests = [(*row, None) for row in requests]  # before config versions
    if responses and len(responses[0]) == len(RESPONSE_COLUMNS) - 1:
        # Before error kinds: the kind is read from the error text, as the migration does.
        responses = [(*row, kind_of_legacy_error(row[10])) for row in responses]
    return requests, responses
