"""Body decoding for storage: undo content-encoding (with a cap), detect JSON, redact fields.

Runs in the recorder, never on the client's path. The decompressed size is capped, so a
compression bomb in a response costs at most ``max_decompressed_bytes`` of memory.

Redaction parses only a body that could hold a configured field (a substring test first),
with orjson, and falls back to the standard library for what orjson refuses; neither
recurses without bound. A body that claims or looks like JSON and still cannot be read
raises ``Unredactable``: its secret could be anywhere in it, so the recorder withholds it.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

import brotli
import orjson

from shadowproxy.jsonexact import TooDeep, loads_exact


class BodyTooLarge(Exception):
    """Decompressing would exceed the cap."""

    def __init__(self, head: bytes = b"") -> None:
        super().__init__()
        self.head = head
        """The first bytes of the output (what the body looks like, decompressed)."""


def decompress(data: bytes, encoding: bytes, cap: int) -> bytes | None:
    """``data`` with ``encoding`` (gzip, deflate, br, or a list of them such as
    ``gzip, br``) undone; None if one is unknown or corrupt. A stream cut short (a body
    stored cut at ``max_body_bytes``) gives what it holds.

    Raises BodyTooLarge when an output would exceed ``cap`` bytes.
    """
    if encoding.find(b",") < 0:
        return _undo(data, encoding, cap)
    if encoding.count(b",") >= MAX_CODINGS:
        return None  # see MAX_CODINGS: stored as sent, as a coding not undone here
    # A list names the codings in the order they were applied (RFC 9110, 8.4): undo the
    # last first. The last step's output is capped as one coding's; the steps before it
    # share one more cap, so that a list cannot multiply the work: each step capped alone,
    # `gzip` listed a thousand times over a body of stored layers inflated a thousand
    # times a few MB, seconds of the recorder's loop for one record.
    codings = encoding.split(b",")
    room = cap
    for coding in codings[:0:-1]:
        step = _undo(data, coding, room)
        if step is None:
            return None
        if step is not data:  # (identity outputs nothing new: room never goes below 0)
            room -= len(step)
            data = step
    return _undo(data, codings[0], cap)


MAX_CODINGS = 8
"""The most content-codings a list may name for a body to be decoded (``decompress``,
``streams.decode_arrivals``). RFC 9110 allows a list, but no server sends more than two or
three; each step walks the whole body (a streamed one's every noted read too), so a list of
thousands (a header line holds about 1,600 `gzip`, 8,000 empty ones) held the recorder's
loop seconds for one record. A longer list is not undone: its body is stored as sent, and
withheld under ``redact_json`` if it claims JSON, as a body of an unknown coding is."""


def _undo(data: bytes, encoding: bytes, cap: int) -> bytes | None:
    """``data`` with one content-coding undone (see ``decompress``)."""
    enc = encoding.strip().lower()
    try:
        if enc in (b"gzip", b"x-gzip", b"deflate"):
            return Inflater(enc, data).feed(data, cap)
        if enc == b"br":
            b = brotli.Decompressor()
            unbrotlied: bytes = b.process(data, output_buffer_limit=cap + 1)
            if len(unbrotlied) > cap:
                raise BodyTooLarge(unbrotlied[:_HEAD])
            # Unfinished within the cap: the input ran out (a body cut at max_body_bytes).
            # Its output is kept, as zlib keeps a cut gzip or deflate stream's: the start of
            # a document, not one that decompressed past the cap.
            return unbrotlied
        if enc in (b"", b"identity"):
            return data
    except (zlib.error, brotli.error):
        return None
    return None


_HEAD = 64
"""Bytes of a body past the decompression cap kept to tell whether it looks like JSON."""
_SLICE = 16 * 1024
"""Compressed bytes undone per step (``Inflater.feed``)."""


class Inflater:
    """Undoes gzip or deflate on a body given whole or read by read (``feed``).

    A gzip body may be several members one after the other (RFC 1952, 2.2; what
    ``cat a.gz b.gz`` makes): each is undone, with the zero padding gzip(1) and Python's
    gzip module accept between them; what follows a member and is no member is corrupt.
    So is anything after the end of a deflate stream (brotli refuses it the same way).
    """

    def __init__(self, encoding: bytes, first: bytes) -> None:
        """``encoding``: gzip, x-gzip or deflate (lower case); ``first``: the body's first
        bytes (a deflate body without a zlib header is raw deflate, as some servers send)."""
        self._gzip = encoding != b"deflate"
        wbits = -zlib.MAX_WBITS if not self._gzip and first[:1] != b"\x78" else (
            zlib.MAX_WBITS | 32)  # zlib or gzip header
        self._d: Any = zlib.decompressobj(wbits)

    def feed(self, data: bytes, room: int) -> bytes:
        """The output of ``data``. Raises BodyTooLarge past ``room`` bytes of it, and
        zlib.error for corrupt input."""
        if len(data) <= _SLICE:
            return self._feed(data, room)
        # Fed a slice at a time: at the end of each gzip member zlib copies what is left of
        # its input (``unused_data``), so a body of tiny members fed whole was copied once
        # per member (a megabyte of 20-byte members: 50,000 copies, over a second).
        view = memoryview(data)
        parts: list[bytes] = []
        try:
            for start in range(0, len(data), _SLICE):
                out = self._feed(view[start:start + _SLICE], room)
                parts.append(out)
                room -= len(out)
        except BodyTooLarge as exc:
            raise BodyTooLarge((b"".join(parts)[:_HEAD] + exc.head)[:_HEAD]) from None
        return b"".join(parts)

    def _feed(self, data: bytes | memoryview, room: int) -> bytes:
        parts: list[bytes] = []
        while data:
            d = self._d
            if d.eof:  # the stream (a member) ended: only another member may follow
                if not self._gzip:
                    raise zlib.error("data after the end of the deflate stream")
                data = bytes(data).lstrip(b"\x00")
                if not data:
                    break
                d = self._d = zlib.decompressobj(zlib.MAX_WBITS | 16)
            out = d.decompress(data, room + 1)
            parts.append(out)
            room -= len(out)
            if room < 0 or d.unconsumed_tail:
                raise BodyTooLarge(b"".join(parts)[:_HEAD])
            data = d.unused_data
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _looks_like_json(data: bytes) -> bool:
    """True for bytes that begin (after a UTF-8 byte-order mark and white space) as a JSON
    object or array does."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.lstrip()[:1] in (b"{", b"[")


# What made a body that claims or looks like JSON unreadable (``inspect_json``,
# ``Unredactable``): with redaction rules, such a body is withheld, since its secrets could
# not be found. The words appear in logs and in ``shadowproxy_bodies_withheld_total``.
ENCODING = "encoding"
"""Its content-encoding is unknown or corrupt, lists more than ``MAX_CODINGS`` codings, or
undoing it passes the cap."""
NOT_UTF8 = "not_utf8"
"""Not UTF-8 text (or it holds a NUL character, which no JSON text can)."""
INVALID_JSON = "invalid_json"
"""Not a JSON document (malformed, or cut at ``max_body_bytes``)."""
TOO_DEEP = "too_deep"
"""Nested deeper than the JSON readers' limit (about a thousand levels)."""
WITHHELD_REASONS = (ENCODING, NOT_UTF8, INVALID_JSON, TOO_DEEP)


def inspect_json(body: bytes, headers: list[tuple[bytes, bytes]],
                 cap: int) -> tuple[str | None, str | None]:
    """(the body as text if it may be JSON, else None; why a body that claims or looks like
    JSON cannot be read as text, else None). PostgreSQL makes the final call on JSON."""
    if not body:
        return None, None
    content_type = b""
    encoding = b""
    for name, value in headers:
        # By length first: lower-casing every name of every record was a tenth of this.
        size = len(name)
        if size == 12:
            if name == b"Content-Type" or name == b"content-type" or (
                    name.lower() == b"content-type"):
                content_type = value
        elif size == 16 and name.lower() == b"content-encoding":
            encoding = value
    # find, not `in`: bytes.__contains__ first tries the operand as an integer, and the
    # TypeError it makes and clears costs more than the search. Lower-cased only if needed.
    declared = content_type.find(b"json") >= 0 or (
        bool(content_type) and content_type.lower().find(b"json") >= 0)
    if encoding:
        head = b""
        try:
            decoded = decompress(body, encoding, cap)
        except BodyTooLarge as exc:
            decoded, head = None, exc.head
        if decoded is not None and not declared and _looks_like_json(body) and (
                not _looks_like_json(decoded)):
            # Plain JSON mislabelled: raw deflate and br read some such bytes (`["a"]`) as
            # the start of a stream, whose output is no JSON. The bytes as sent still are.
            decoded = None
        if decoded is None:
            # Mislabelled (plain JSON said to be gzip) or a coding not undone here: a body
            # whose bytes look like JSON may hold a field to redact all the same. Past the
            # cap, so may one whose decompressed text begins as JSON does; its stored bytes
            # are a decompression away from the field.
            looks = declared or _looks_like_json(body) or _looks_like_json(head)
            return None, ENCODING if looks else None
        body = decoded
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]  # a UTF-8 byte-order mark: not part of the JSON text (RFC 8259 §8.1)
    if not declared and not _looks_like_json(body):
        return None, None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None, NOT_UTF8
    if "\x00" in text:  # PostgreSQL text cannot hold NUL, and JSON text never does
        return None, NOT_UTF8
    return text, None


def json_text(body: bytes, headers: list[tuple[bytes, bytes]], cap: int) -> str | None:
    """The body as text if it may be JSON (PostgreSQL makes the final call), else None."""
    return inspect_json(body, headers, cap)[0]


# --- JSON redaction -------------------------------------------------------------------------

_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+|\*)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")
REDACTED = "[redacted]"


def parse_json_path(path: str) -> list[str | int | None]:
    """Steps of a simple JSON path: ``$.a.b``, ``$.a[0]``, ``$.items[*].ssn``, ``$['k']``.

    ``None`` stands for ``[*]``. Raises ValueError with what was expected.
    """
    if not path.startswith("$"):
        raise ValueError(f"a JSON path starts with '$' (got {path!r})")
    steps: list[str | int | None] = []
    pos = 1
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            raise ValueError(f"cannot read JSON path {path!r} at {path[pos:]!r}; "
                             "use $.field, $.list[0], $.list[*] or $['key']")
        name, index, quoted1, quoted2 = m.groups()
        if name is not None:
            steps.append(name)
        elif index is not None:
            steps.append(None if index == "*" else int(index))
        else:
            steps.append(quoted1 if quoted1 is not None else quoted2)
        pos = m.end()
    if not steps:
        raise ValueError("the JSON path '$' would redact the whole body; name a field")
    return steps


def _redact(node: Any, steps: list[str | int | None]) -> bool:
    step, rest = steps[0], steps[1:]
    keys: list[Any]
    if isinstance(node, dict):
        keys = list(node) if step is None else [step] if step in node else []
    elif isinstance(node, list):
        if step is None:
            keys = list(range(len(node)))
        else:
            keys = [step] if isinstance(step, int) and -len(node) <= step < len(node) else []
    else:
        return False
    changed = False
    for key in keys:
        if rest:
            changed |= _redact(node[key], rest)
        else:
            node[key] = REDACTED
            changed = True
    return changed


class Unredactable(Exception):
    """A body that looks like JSON could not be read, so the values to redact could not be
    found; ``reason`` is one of ``WITHHELD_REASONS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse(text: str) -> tuple[Any, bool]:
    """(the document, True if the standard library read it; see ``jsonexact``). orjson also
    refuses nesting past 1024 levels instead of recursing; the standard library's recursion
    is bounded by the interpreter's limit."""
    try:
        return loads_exact(text)
    except TooDeep:
        raise Unredactable(TOO_DEEP) from None
    except ValueError:
        raise Unredactable(INVALID_JSON) from None


def _serialize(doc: Any, standard: bool) -> tuple[bytes, str]:
    """(UTF-8 bytes, text) of a redacted document. A document the standard library read is
    written by it too, so that what orjson cannot write the same (``Infinity``, integers
    past 64 bits) is kept as read; an escaped lone surrogate stays escaped."""
    if not standard:
        try:
            data = orjson.dumps(doc)
            return data, data.decode("utf-8")
        except orjson.JSONEncodeError:
            pass  # nested past orjson's writing limit (254 levels)
    try:
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise Unredactable(TOO_DEEP) from None
    try:
        return text.encode("utf-8"), text
    except UnicodeEncodeError:  # a lone surrogate, read from a \ud800 escape
        text = json.dumps(doc, separators=(",", ":"))
        return text.encode("ascii"), text


class JsonRedactor:
    """Replaces the values at ``recording.redact_json`` paths by "[redacted]"."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = [parse_json_path(p) for p in paths]
        # A path can only match a text that holds each of its field names as a JSON key,
        # quotes included, unless the text has escapes (a key can be spelled with them).
        self._keys = [[f'"{step}"' for step in steps if isinstance(step, str)]
                      for steps in self.paths]

    def may_match(self, text: str) -> bool:
        """False when no path can match ``text``: the common case costs a substring search."""
        if "\\" in text:
            return True
        return any(all(key in text for key in keys) for keys in self._keys)

    def redact_document(self, doc: Any) -> bool:
        """Redact the values at the paths in a parsed document, in place; True when a value
        was found (and replaced)."""
        changed = False
        for steps in self.paths:
            changed |= _redact(doc, steps)
        return changed

    def redact(self, text: str) -> tuple[bytes, str] | None:
        """``text`` re-written with the values at the paths redacted, as (bytes, text); None
        when no path can match it (store it as it is). Raises Unredactable.

        A text that may match is always re-written, also when no value was found: of a key
        given twice the parsed document keeps only the last, and the first must not survive
        in the stored bytes.
        """
        if not self.may_match(text):
            return None
        doc, standard = _parse(text)
        for steps in self.paths:
            _redact(doc, steps)
        return _serialize(doc, standard)


def redact_json(text: str, paths: list[str]) -> str | None:
    """``text`` with every value at ``paths`` replaced by "[redacted]", or None when no path
    can match it; raises Unredactable for a text that cannot be read as JSON."""
    out = JsonRedactor(paths).redact(text)
    return None if out is None else out[1]
