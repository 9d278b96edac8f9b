"""Exchange → database rows: header decoding and redaction, JSON detection, timestamps.

Rows have the column order of ``REQUEST_COLUMNS`` / ``RESPONSE_COLUMNS``, with the JSON
columns as text and the timestamps as Unix seconds (floats, which the writer's connection
encodes for ``timestamptz`` itself: see ``postgres.py``). A body that looks like JSON is not
parsed here: the normal path COPYs the text straight into the jsonb column, so PostgreSQL
parses each body exactly once, and the rare batch with a body that is not valid JSON after
all is refused as a whole and stored through the checking path (``postgres.py``). Only
redaction needs the parsed document.

With ``recording.redact_json`` set, a body that claims or looks like JSON but cannot be read
(``bodies.WITHHELD_REASONS``) may hold a value to redact that cannot be found: it is
withheld, stored as ``body`` and ``body_json`` NULL with ``body_truncated`` true (the row and
its ``body_size`` are kept). Encoding is per record: whatever goes wrong with one exchange
costs that exchange's bodies, never the other records of its batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from shadowproxy.config import RecordingConfig
from shadowproxy.failures import kind_of_legacy_error
from shadowproxy.models import Exchange, Headers
from shadowproxy.recorder.bodies import JsonRedactor, Unredactable, inspect_json
from shadowproxy.recorder.query import QueryRedactor
from shadowproxy.recorder.streamed import StreamColumns

REQUEST_COLUMNS = ("id", "request_id", "route", "received_at", "method", "path", "query",
                   "headers", "body", "body_json", "body_size", "body_truncated", "client_addr",
                   "config_version")
RESPONSE_COLUMNS = ("request", "target", "role", "status", "headers", "body", "body_json",
                    "body_size", "body_truncated", "latency_ms", "error", "started_at",
                    "error_kind", "stream", "received_at")
"""``received_at`` is the request's (responses are partitioned with their request by it)."""

Row = tuple[Any, ...]
REDACTED = "[redacted]"
UNEXPECTED = "unexpected"
"""Why bodies were withheld when encoding an exchange failed in a way no check foresaw."""


class Withheld:
    """A body the encoder did not store, and why (for the recorder's log and metrics)."""

    __slots__ = ("reason", "request_id", "where")

    def __init__(self, request_id: str, where: str, reason: str) -> None:
        self.request_id = request_id
        self.where = where
        """'request', or the target whose response body it was."""
        self.reason = reason
        """One of ``bodies.WITHHELD_REASONS``, or ``UNEXPECTED``."""


class RowEncoder:
    """Turns exchanges into (request rows, response rows) under the recording settings."""

    def __init__(self, recording: RecordingConfig) -> None:
        self._redact = frozenset(h.encode() for h in recording.redact_headers)
        self._redactor = JsonRedactor(recording.redact_json) if recording.redact_json else None
        self._cap = recording.max_decompressed_bytes
        self.query = QueryRedactor(recording.redact_query)
        """The query string as stored and logged: secret parameters' values redacted."""
        self._names: dict[bytes, tuple[str, bool]] = {}
        """Header name as sent → (JSON key, redact?): names repeat on nearly every request."""
        self.withheld: list[Withheld] = []
        """Bodies withheld since the caller last emptied this list."""
        self.streams = StreamColumns(self._redactor, self._cap)
        """Event streams assembled into ``body_json`` and ``stream`` (``prepare`` ahead)."""

    def headers(self, headers: Headers | None) -> str | None:
        """Headers as a JSON object text: names lower-cased, repeats joined with ", "
        (Cookie's with "; ", RFC 6265 §5.4: a comma would make one cookie of two)."""
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
            # The parser keeps white space before the line's end, which is not part of the
            # value (RFC 9110 §5.5): stored without it, as upstreams read it.
            text = REDACTED if redacted else value.rstrip(b" \t").decode("latin-1")
            if key in merged:
                # A "[redacted]" Cookie stays joined with ", ", as replay recognizes it.
                sep = "; " if key == "cookie" and not redacted else ", "
                merged[key] = merged[key] + sep + text
            else:
                merged[key] = text
        return orjson.dumps(merged).decode()

    def body(self, body: bytes | None, headers: Headers | None
             ) -> tuple[bytes | None, str | None, str | None]:
        """(bytes to store, JSON text or None, None), with configured JSON fields redacted;
        or (None, None, reason) for a body withheld because it could not be redacted."""
        if not body:
            return body, None, None
        text, unreadable = inspect_json(body, headers or [], self._cap)
        redactor = self._redactor
        if redactor is None:
            return body, text, None
        if unreadable is not None:
            return None, None, unreadable
        if text is None:
            return body, None, None  # not JSON: redact_json does not apply
        try:
            redacted = redactor.redact(text)
        except Unredactable as exc:
            return None, None, exc.reason
        if redacted is None:
            return body, text, None
        # The stored bytes must not keep the secret either: store the redacted JSON.
        return redacted[0], redacted[1], None

    def encode(self, exchanges: Iterable[Exchange]) -> tuple[list[Row], list[Row]]:
        requests: list[Row] = []
        responses: list[Row] = []
        for ex in exchanges:
            try:
                request, answers = self._exchange(ex)
            except Exception:  # one exchange's surprise must not cost the batch
                request, answers = self._without_bodies(ex)
            if request is not None:
                requests.append(request)
            responses += answers
        self.streams.forget()
        return requests, responses

    def _exchange(self, ex: Exchange) -> tuple[Row | None, list[Row]]:
        """(request row, response rows); no request row for an exchange whose request is
        stored already (a replayed answer)."""
        request: Row | None = None
        if not ex.request_stored:
            body, text, reason = self.body(ex.body, ex.headers)
            if reason is not None:
                self.withheld.append(Withheld(ex.request_id, "request", reason))
            query = ex.query
            if query:  # (most model calls have none: spare them the call)
                query = self.query(query)
            request = (ex.id, ex.request_id, ex.route, ex.received_at, ex.method, ex.path,
                       query, self.headers(ex.headers) or "{}", body, text, ex.body_size,
                       ex.body_truncated or reason is not None, ex.client_addr,
                       ex.config_version)
        answers: list[Row] = []
        for r in ex.responses:
            streamed = None if r.stream is None else self.streams.columns(r)
            stream: str | None = None
            held = False
            if streamed is None:
                rbody, rtext, rreason = self.body(r.body, r.headers)
            else:
                rbody, rtext, stream, held = streamed
                rreason = None
            if rreason is not None:
                self.withheld.append(Withheld(ex.request_id, r.target, rreason))
            answers.append((
                ex.id, r.target, r.role, r.status, self.headers(r.headers), rbody, rtext,
                r.body_size if r.status is not None else None,
                r.body_truncated or rreason is not None or held, r.latency_ms, r.error,
                r.started_at, r.error_kind, stream, ex.received_at))
        return request, answers

    def _without_bodies(self, ex: Exchange) -> tuple[Row | None, list[Row]]:
        """The exchange's rows with every body and header withheld: what is left to store
        of an exchange whose encoding failed unexpectedly."""
        self.withheld.append(Withheld(ex.request_id, "request", UNEXPECTED))
        request = None if ex.request_stored else (
            ex.id, ex.request_id, ex.route, ex.received_at, ex.method, ex.path,
            self.query(ex.query), "{}", None, None, ex.body_size, True, ex.client_addr,
            ex.config_version)
        answers = [(ex.id, r.target, r.role, r.status, None, None, None,
                    r.body_size if r.status is not None else None, True, r.latency_ms,
                    r.error, r.started_at, r.error_kind, None, ex.received_at)
                   for r in ex.responses]
        return request, answers


def without_bodies(row: Row, columns: tuple[str, ...]) -> Row:
    """``row`` without bodies and headers, flagged truncated, with its texts made storable
    (invalid UTF-8 and NUL replaced): what is left of a record PostgreSQL refused."""
    out: list[Any] = []
    for name, value in zip(columns, row, strict=True):
        if name in ("body", "body_json", "headers"):
            value = None
        elif name == "body_truncated":
            value = True
        elif isinstance(value, str):
            value = value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
        out.append(value)
    return tuple(out)


def frame_rows(payload: Any) -> tuple[list[Row], list[Row]]:
    """The rows of a spool frame in today's column layout (``upgrade_rows``); ValueError,
    saying what it holds, for a frame that is not a batch of a layout this version knows
    (one written by a newer version, whose columns it would drop or misplace)."""
    if not (isinstance(payload, tuple | list) and len(payload) == 2
            and isinstance(payload[0], list) and isinstance(payload[1], list)):
        raise ValueError(f"a frame that holds a {type(payload).__name__}, not a batch of rows")
    requests, responses = upgrade_rows(*payload)
    for rows, columns, what in ((requests, REQUEST_COLUMNS, "request"),
                                (responses, RESPONSE_COLUMNS, "response")):
        widths = set(map(len, rows))
        if widths - {len(columns)}:
            raise ValueError(
                f"{what} rows of {', '.join(map(str, sorted(widths)))} columns where this "
                f"version has {len(columns)} (written by a newer version of shadowproxy: "
                "to store them, give the file set aside its .spool suffix back in the spool "
                "of a proxy of that version, which adopts it at its next start)")
    return requests, responses


def upgrade_rows(requests: list[Row], responses: list[Row]) -> tuple[list[Row], list[Row]]:
    """Rows of a spool file written by an earlier version, in today's column layout.

    Response rows before partitioning carry no ``received_at``: it is their request's, taken
    from the same batch; a replayed answer's request is stored already and not in the batch,
    so its ``received_at`` stays None for the writer to look up (``postgres.py``).
    """
    if requests and len(requests[0]) == len(REQUEST_COLUMNS) - 1:
        requests = [(*row, None) for row in requests]  # before config versions
    if not responses:
        return requests, responses
    width = len(responses[0])
    if width == _BEFORE_ERROR_KINDS:
        # Before error kinds: the kind is read from the error text, as the migration does.
        responses = [(*row, kind_of_legacy_error(row[10])) for row in responses]
        width += 1
    if width == _BEFORE_STREAMS:
        responses = [(*row, None) for row in responses]  # before stream timing
        width += 1
    if width == _BEFORE_PARTITIONS:
        received = {row[0]: row[3] for row in requests}
        responses = [(*row, received.get(row[0])) for row in responses]
    return requests, responses


_BEFORE_PARTITIONS = len(RESPONSE_COLUMNS) - 1
_BEFORE_STREAMS = _BEFORE_PARTITIONS - 1
_BEFORE_ERROR_KINDS = _BEFORE_STREAMS - 1
