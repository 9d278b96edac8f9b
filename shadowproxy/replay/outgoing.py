"""One recorded request → the bytes sent to the replay's target.

The request goes out as a live shadow would have received it: the same method, path, query,
body and headers, minus the hop-by-hop ones (RFC 9110 §7.6.1 and those named in
``Connection``), with ``Host`` the target's, ``X-Forwarded-For/-Proto/-Host`` as the proxy
adds them, and ``X-Request-Id`` the recorded request id. Then ``--set-header`` and
``--set-json`` apply.

What the recording could not keep is handled here: a header stored as ``"[redacted]"`` is
left out unless ``--set-header`` gives it a value (a redacted ``X-Forwarded-For`` or
``Host`` leaves out the part of ``X-Forwarded-For`` or ``X-Forwarded-Host`` it would have
given), and a body truncated at recording is not
sent at all (``Skip``). A request body whose JSON fields were redacted
(``recording.redact_json``) was stored as plain JSON even when the client compressed it;
it is sent uncompressed.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from shadowproxy import http1
from shadowproxy.jsonexact import loads_exact
from shadowproxy.recorder.bodies import BodyTooLarge, decompress
from shadowproxy.replay.options import JsonEdit, ReplayOptions

_REDACTED = re.compile(r"^\[redacted\](, \[redacted\])*$")
_SKIP = frozenset(name.decode() for name in http1.REQUEST_REWRITTEN) | {"content-encoding"}
NOT_CARRIED = frozenset(_SKIP - {"host", "x-forwarded-for", "content-encoding"})
"""Recorded headers never sent, nor carried into another (hop-by-hop ones such as
Proxy-Authorization, the proxy's own): whether their value was redacted does not matter.
Host and X-Forwarded-For are carried into X-Forwarded-Host and X-Forwarded-For (``_tail``)."""
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_DECODE_CAP = 64 * 1024 * 1024

TRUNCATED = "body truncated at recording"
NO_JSON_BODY = "--set-json needs a JSON body"
NOT_WRITABLE = ("--set-json: the edited body cannot be written as JSON (a number out of range, "
                "or nested too deeply)")


@dataclass(frozen=True)
class Skip:
    """A request that is not sent, and why (stored as an answer of kind ``skipped``)."""

    reason: str


@dataclass(frozen=True)
class Outgoing:
    """A request ready to send."""

    head: bytes
    body: bytes
    expect_no_body: bool
    dropped_redacted: bool
    """Headers stored as "[redacted]" were left out."""


def _set(node: Any, steps: tuple[str | int | None, ...], value: Any) -> bool:
    """Put ``value`` at ``steps`` under ``node``: missing object keys are created, list
    indexes must exist, ``[*]`` is every element. False when the path does not fit."""
    step, rest = steps[0], steps[1:]
    if isinstance(node, dict):
        if isinstance(step, int):
            return False
        keys: list[Any] = list(node) if step is None else [step]
    elif isinstance(node, list):
        if step is None:
            keys = list(range(len(node)))
        elif isinstance(step, int) and -len(node) <= step < len(node):
            keys = [step]
        else:
            return False
    else:
        return False
    for key in keys:
        if not rest:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {} if not isinstance(rest[0], int) else []
            if not _set(node[key], rest, value):
                return False
    return True


def edit_json(doc: Any, edits: tuple[JsonEdit, ...]) -> str | None:
    """Apply every edit to ``doc`` in place; the path of the first that does not fit."""
    for edit in edits:
        if not _set(doc, edit.steps, edit.value):
            return edit.path
    return None


class RequestBuilder:
    """Builds every request of one replay: what never changes is prepared once."""

    def __init__(self, options: ReplayOptions, host_header: bytes, base_path: bytes) -> None:
        given: dict[str, tuple[str, str]] = {}
        for name, value in options.set_headers:
            given[name.lower()] = (name, value)  # a later --set-header replaces an earlier one
        self._given = frozenset(given)
        self._given_lines = b"".join(f"{n}: {v}\r\n".encode("latin-1")
                                     for n, v in given.values())
        self._host_line = b"Host: " + host_header + b"\r\n"
        self._base_path = base_path
        self._edits = options.set_json

    def build(self, row: Any) -> Outgoing | Skip:
        """The request of one recorded row (``source.STREAM_COLUMNS``), or why it is not
        sent."""
        if row["body_truncated"]:
            return Skip(TRUNCATED)
        headers: dict[str, str] = orjson.loads(row["headers"])
        body: bytes = row["body"] or b""
        encoding = headers.get("content-encoding")
        if self._edits:
            read = _json_document(body, encoding, row["body_json"])
            if read is None:
                return Skip(NO_JSON_BODY)
            doc, exact = read
            failed = edit_json(doc, self._edits)
            if failed is not None:
                return Skip(f"--set-json {failed}: the body has no place for it")
            try:
                body = _dump(doc, exact)
            except (ValueError, RecursionError):  # 1e400 or NaN, read as a float
                return Skip(NOT_WRITABLE)
            encoding = None
        elif encoding is not None and _stored_plain(body, encoding):
            encoding = None
        skip = _SKIP | self._given
        connection = headers.get("connection")
        if connection is not None:
            skip = skip | {t.strip().lower() for t in connection.split(",")}
        lines = [self._host_line]
        dropped = False
        for name, value in headers.items():
            if name in skip:
                continue
            if _REDACTED.match(value):
                dropped = True
                continue
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if encoding is not None and "content-encoding" not in self._given:
            lines.append(f"content-encoding: {encoding}\r\n".encode("latin-1"))
        lines.append(self._given_lines)
        if self._tail(lines, headers, row):
            dropped = True
        method: str = row["method"]
        if body or method in _BODY_METHODS:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        query: str = row["query"]
        path_query = self._base_path + (row["path"] + ("?" + query if query else "")).encode(
            "latin-1")
        head = http1.request_head(method.encode("ascii"), path_query, b"".join(lines))
        return Outgoing(head, body, method == "HEAD", dropped)

    def _tail(self, lines: list[bytes], headers: dict[str, str], row: Any) -> bool:
        """The headers the proxy adds for every upstream, unless --set-header gives them;
        True when a recorded value they carry on was stored as "[redacted]" and left out
        (``recording.redact_headers`` may list X-Forwarded-For or Host: client addresses
        are personal data), rather than sent as that text."""
        given = self._given
        dropped = False
        if "x-forwarded-for" not in given:
            client = row["client_addr"] or "unknown"
            forwarded = headers.get("x-forwarded-for")
            if forwarded is not None and _REDACTED.match(forwarded):
                forwarded, dropped = None, True
            value = f"{forwarded}, {client}" if forwarded else client
            lines.append(f"X-Forwarded-For: {value}\r\n".encode("latin-1"))
        if "x-forwarded-proto" not in given:
            lines.append(b"X-Forwarded-Proto: http\r\n")
        host = headers.get("host")
        if host is not None and "x-forwarded-host" not in given:
            if _REDACTED.match(host):
                dropped = True
            else:
                lines.append(f"X-Forwarded-Host: {host}\r\n".encode("latin-1"))
        if "x-request-id" not in given:
            lines.append(f"X-Request-Id: {row['request_id']}\r\n".encode("latin-1"))
        return dropped


def _json_document(body: bytes, encoding: str | None,
                   stored_json: str | None) -> tuple[Any, bool] | None:
    """(the request's JSON document, True if the standard library read it), parsed from the
    bytes as sent when possible (keeping the client's key order), else from the recorder's
    ``body_json``; None if there is none.

    An encoded body is decoded here (up to ``_DECODE_CAP``): ``body_json`` is jsonb, whose
    keys come out reordered, and NULL past ``recording.max_decompressed_bytes``."""
    texts: list[bytes] = []
    if body:
        decoded: bytes | None = None
        if encoding is not None:
            with contextlib.suppress(BodyTooLarge):  # past 64 MiB: body_json, if any
                decoded = decompress(body, encoding.encode("latin-1"), _DECODE_CAP)
        # Not decoded: plain, stored decoded (redacted JSON), or a coding not undone here.
        texts.append(body if decoded is None else decoded)
    if stored_json is not None:
        texts.append(stored_json.encode("utf-8"))
    for text in texts:
        try:
            # 1e400 and NaN are read (by the standard library); _dump refuses them.
            return loads_exact(text)
        except ValueError:  # not JSON, not UTF-8, or nested too deeply
            continue
    return None


def _dump(doc: Any, exact: bool) -> bytes:
    """The edited document's bytes; ValueError for a number JSON cannot hold (what the
    standard library read from 1e400 or NaN), RecursionError past its nesting limit."""
    if not exact:
        try:
            return orjson.dumps(doc)
        except orjson.JSONEncodeError:
            pass  # an integer past 64 bits from --set-json, or nested past 254 levels
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, read from a \ud800 escape
        return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _stored_plain(body: bytes, encoding: str) -> bool:
    """True when a body recorded with a content-encoding was stored decoded: the recorder
    stores redacted JSON as plain text (the original bytes held the secret)."""
    if body.lstrip()[:1] not in (b"{", b"["):
        return False
    try:
        return decompress(body, encoding.encode("latin-1"), _DECODE_CAP) is None
    except BodyTooLarge:
        return False
