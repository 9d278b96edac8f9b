"""Streamed answers in the recorder: an event stream assembled into ``body_json`` and
``responses.stream``.

The data path keeps only the arrival of each piece of a ``text/event-stream`` response
(``models.StreamArrivals``); here, off the client's path, the captured body (content-encoding
undone piece by piece) and those arrivals become the answer in the unstreamed shape and its
timing (``streams.assemble``). A stream that is not OpenAI-compatible, whose encoding
cannot be undone (or undone gives no event stream from bytes that are one as sent: a
plain stream mislabelled), or whose events cannot be folded (indexes of different kinds), is
left to the usual body path (stored as it is), unless redaction rules are set and its events
may hold a redacted field, or cannot be read to tell: then its bytes are withheld.

Assembly costs a few microseconds per event, so a long answer is milliseconds of work on the
event loop the data path shares: ``prepare`` assembles a batch's streams ahead of encoding,
giving the loop back after each one.

With ``recording.redact_json``, the configured paths are redacted in the assembled answer.
The raw bytes cannot be redacted (a value is split across events, in the deltas' shape), so
they are not stored (``body`` NULL, ``body_truncated`` true) when a path matched the
assembled answer or may match the raw events (``JsonRedactor.may_match``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson

from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.recorder.bodies import JsonRedactor
from shadowproxy.streams import assemble, body_json_text, decode_arrivals, looks_like_events

Columns = tuple[bytes | None, str | None, str | None, bool]
"""(``body``, ``body_json`` text, ``stream`` text, raw bytes withheld for redaction)."""


def _encoding(headers: list[tuple[bytes, bytes]] | None) -> bytes:
    for name, value in headers or ():
        if name.lower() == b"content-encoding":
            return value
    return b""


class StreamColumns:
    """The response columns of streamed answers, under one recording configuration."""

    def __init__(self, redactor: JsonRedactor | None, decompressed_cap: int) -> None:
        self._redactor = redactor
        self._cap = decompressed_cap
        self._ready: dict[int, tuple[CapturedResponse, Columns | None]] = {}
        """Columns assembled by ``prepare``, by ``id()`` of the response, until ``forget``
        (the response is kept with them, so that its id cannot be reused meanwhile)."""

    def columns(self, r: CapturedResponse) -> Columns | None:
        """The columns of a streamed response; None when it is left to the body path."""
        ready = self._ready.pop(id(r), None)
        if ready is not None and ready[0] is r:
            return ready[1]
        return self.assemble(r)

    async def prepare(self, exchanges: Iterable[Exchange]) -> None:
        """Assemble the streams of ``exchanges`` for ``columns``, yielding to the event loop
        after each one."""
        for ex in exchanges:
            for r in ex.responses:
                if r.stream is None:
                    continue
                try:
                    self._ready[id(r)] = (r, self.assemble(r))
                except Exception:  # left to the encoder, which guards each record
                    continue
                await asyncio.sleep(0)

    def forget(self) -> None:
        """Drop what ``prepare`` assembled (the batch is encoded)."""
        self._ready.clear()

    def assemble(self, r: CapturedResponse) -> Columns | None:
        stream = r.stream
        body = r.body
        if stream is None or not body:
            return None
        arrivals: list[tuple[int, float]] = stream.arrivals
        encoding = _encoding(r.headers)
        if encoding:
            decoded = decode_arrivals(body, arrivals, encoding, self._cap)
            if decoded is not None and looks_like_events(body) and (
                    not looks_like_events(decoded[0])):
                # A plain stream mislabelled: raw deflate and br read some such bytes
                # (`: ping` ...) as the start of a stream, whose output is no event stream
                # and holds none of its fields. Its events are in the bytes as sent.
                decoded = None
            if decoded is None:
                return self._unassembled(None)
            text, arrivals = decoded
        else:
            text = body
        try:
            out = assemble(text, arrivals, stream.sent_at, head_at=stream.head_at,
                           truncated=r.body_truncated, failed=r.error_kind is not None)
        except Exception:
            # Events of a shape the folding cannot take (choice or tool-call indexes that
            # are null beside numbers, or lists): this stream is stored as it is. Raised on
            # to the encoder, it would cost the whole exchange its bodies and headers, the
            # request's and the primary's included.
            out = None
        if out is None:
            return self._unassembled(text)
        answer, timing = out
        raw: bytes | None = body
        redactor = self._redactor
        if redactor is not None and (redactor.redact_document(answer)
                                     or redactor.may_match(text.decode("utf-8", "replace"))):
            raw = None
        return raw, body_json_text(answer), _dumps(timing), raw is None

    def _unassembled(self, text: bytes | None) -> Columns | None:
        """A stream left unassembled: None (the body path stores it as it is), or its bytes
        withheld when redaction rules are set and its events, ``text`` (None: they could
        not be decoded), may hold a redacted field. The body path would store them: it
        does not read event-stream text as JSON."""
        redactor = self._redactor
        if redactor is None or (
                text is not None and not redactor.may_match(text.decode("utf-8", "replace"))):
            return None
        return None, None, None, True


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
