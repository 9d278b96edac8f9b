"""Shadow calls: sampling, the in-flight bound, and capturing each shadow's answer.

A shadow never touches the client's response: its call starts after the primary's request
is written, runs on its own connection pool under its own timeout (and ``max_duration_s``
for the whole call, however long its body flows), and its outcome is only data on the
exchange record. Over ``max_in_flight`` a call is dropped and counted at once, never
queued.
"""

from __future__ import annotations

import random
import time
import zlib

from shadowproxy import http1
from shadowproxy.bodyedit import JsonEdits
from shadowproxy.config import FORWARDING_HEADERS, Shadow
from shadowproxy.failures import ErrorKind
from shadowproxy.metrics import Metrics, ShadowCounters
from shadowproxy.models import CapturedResponse, Exchange, Headers
from shadowproxy.upstream import UpstreamCall, UpstreamPool


class CompiledShadow:
    """One configured shadow of one route, compiled for the data path."""

    __slots__ = ("counters", "custom_skip", "edits", "extra_lines", "max_duration",
                 "max_in_flight", "name", "pool", "sample_header", "sample_rate", "tail_skip",
                 "timeout")

    def __init__(self, route: str, shadow: Shadow, pool: UpstreamPool, metrics: Metrics) -> None:
        self.name = shadow.name
        self.pool = pool
        self.timeout = shadow.timeout_s
        self.max_duration = shadow.max_duration_s
        self.max_in_flight = shadow.max_in_flight
        self.sample_rate = shadow.sample_rate
        self.sample_header = (shadow.sample_key.partition(":")[2].lower().encode()
                              if shadow.sample_key else None)
        removed = {h.lower().encode() for h in shadow.remove_headers}
        removed |= {h.lower().encode() for h in shadow.set_headers}
        # None: the shadow gets the primary's header lines unchanged (the common case).
        self.custom_skip = (http1.REQUEST_REWRITTEN | removed) if removed else None
        tail_skip = removed & {h.encode() for h in FORWARDING_HEADERS}
        self.tail_skip = frozenset(tail_skip) if tail_skip else None
        """The proxy's forwarding lines (X-Forwarded-*, X-Request-Id) this shadow's
        ``remove_headers`` names, or None: they are written for every upstream in the
        request's shared tail (``proxy._head_parts``), so this shadow's copy leaves them out."""
        self.extra_lines = b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in shadow.set_headers.items())
        self.counters: ShadowCounters = metrics.shadow(route, shadow.name)
        self.edits = JsonEdits(shadow.set_json) if shadow.set_json else None
        """``set_json``: fields set in this shadow's copy of a JSON request body."""

    def edit(self, body: bytes, tail_lines: bytes) -> tuple[bytes, bytes]:
        """(body, tail lines) for this shadow with its ``set_json`` applied: a new body and
        its Content-Length. A body the edits do not fit (not a JSON object, a path that
        cannot be followed) goes unchanged and is counted."""
        edits = self.edits
        assert edits is not None
        edited, applied = edits.apply(body)
        # The tail ends with the primary's Content-Length (proxy._head_parts); a body that
        # can be edited always has one, since it is neither empty nor streamed.
        length = b"Content-Length: %d\r\n" % len(body)
        if not applied or not tail_lines.endswith(length):
            self.counters.set_json_skipped += 1
            return body, tail_lines
        return edited, tail_lines[:-len(length)] + b"Content-Length: %d\r\n" % len(edited)

    def trimmed(self, tail_lines: bytes) -> bytes:
        """The request's tail lines without those this shadow removes (``tail_skip``)."""
        skip = self.tail_skip
        assert skip is not None
        return b"".join(line + http1.CRLF for line in tail_lines.split(http1.CRLF)[:-1]
                        if line.partition(b":")[0].lower() not in skip)

    def sampled(self, headers: Headers) -> bool:
        rate = self.sample_rate
        if rate >= 1.0:
            return True
        if rate <= 0.0:
            return False
        if self.sample_header is not None:
            value = http1.header_value(headers, self.sample_header)
            if value is not None:
                # Sticky: the same key is always in or always out at a given rate; white
                # space before the line's end is the parser's, not the key's (RFC 9110 §5.5).
                return zlib.crc32(value.rstrip(b" \t")) < rate * 4294967296.0
        return random.random() < rate


class ShadowCall(UpstreamCall):
    """A call to a shadow: its response is captured for the record, never returned."""

    __slots__ = ("shadow",)

    def __init__(self, shadow: CompiledShadow, exchange: Exchange, record: CapturedResponse,
                 head: bytes, body: bytes, head_only: bool, may_resend: bool,
                 capture_cap: int) -> None:
        super().__init__(exchange, record, head, body, shadow.timeout, head_only, may_resend,
                         capture_cap)
        self.max_duration = shadow.max_duration
        self.shadow = shadow

    def on_response_end(self) -> None:
        self._close(None)

    def on_failure(self, kind: ErrorKind, detail: str) -> None:
        self._close(kind)

    def _close(self, kind: ErrorKind | None) -> None:
        latency = self.close_record()
        counters = self.shadow.counters
        counters.in_flight -= 1
        counters.finish(kind, latency)


def start_shadows(shadows: list[CompiledShadow], exchange: Exchange, method: bytes,
                  path_query: bytes, request_headers: Headers, common_lines: bytes,
                  tail_lines: bytes, body: bytes, skip_reason: str | None,
                  may_resend: bool, capture_cap: int, connection: bytes | None) -> None:
    """Fire the exchange's request at every sampled shadow; returns at once.

    ``path_query``: the request's path and query as forwarded (origin-form), which each
    shadow's URL path prefixes. ``connection``: the request's Connection value (its lines
    joined), or None; the headers it names are left out of every shadow's lines."""
    head_only = method == b"HEAD"
    now = time.time()
    for shadow in shadows:
        if not shadow.sampled(request_headers):
            continue
        record = CapturedResponse(shadow.name, "shadow", now)
        if skip_reason is not None:
            record.error_kind = ErrorKind.SKIPPED
            record.error = f"skipped: {skip_reason}"
            exchange.responses.append(record)
            shadow.counters.not_called(ErrorKind.SKIPPED)
            continue
        # The calls in flight of every configuration version count (the counters outlive
        # reloads), so that a reload never lets more than max_in_flight through.
        if shadow.counters.in_flight >= shadow.max_in_flight:
            record.error_kind = ErrorKind.DROPPED
            record.error = "dropped: overload"
            exchange.responses.append(record)
            shadow.counters.not_called(ErrorKind.DROPPED)
            continue
        tail = tail_lines
        custom_skip = shadow.custom_skip
        if custom_skip is None:
            lines = common_lines  # the primary's: Connection's tokens are out already
        else:
            if connection is not None and http1.lists_extra_tokens(connection):
                custom_skip = custom_skip | http1.connection_tokens(request_headers)
            lines = http1.header_lines(request_headers, custom_skip)
            if shadow.tail_skip is not None:
                # Only a shadow removing a forwarding header pays for a copy of the tail.
                tail = shadow.trimmed(tail)
        shadow_body, tail = (body, tail) if shadow.edits is None else shadow.edit(body, tail)
        pool = shadow.pool
        head = http1.request_head(
            method, pool.base_path + path_query,
            b"Host: " + pool.host_header + b"\r\n" + lines + shadow.extra_lines + tail)
        shadow.counters.in_flight += 1
        pool.start(ShadowCall(shadow, exchange, record, head, shadow_body, head_only,
                              may_resend, capture_cap))
