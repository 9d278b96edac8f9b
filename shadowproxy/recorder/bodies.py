"""Body decoding for storage: undo content-encoding (with a cap), detect JSON, redact fields.

Runs in the recorder, never on the client's path. The decompressed size is capped, so a
compression bomb in a response costs at most ``max_decompressed_bytes`` of memory.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

import brotli


class BodyTooLarge(Exception):
    """Decompressing would exceed the cap."""


def decompress(data: bytes, encoding: bytes, cap: int) -> bytes | None:
    """``data`` with ``encoding`` (gzip, deflate, br) undone; None if unknown or corrupt.

    Raises BodyTooLarge when the output would exceed ``cap`` bytes.
    """
    enc = encoding.strip().lower()
    try:
        if enc in (b"gzip", b"x-gzip", b"deflate"):
            if enc == b"deflate" and data[:1] != b"\x78":
                d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send
            else:
                d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip header
            out = d.decompress(data, cap + 1)
            if len(out) > cap or d.unconsumed_tail:
                raise BodyTooLarge
            return out
        if enc == b"br":
            b = brotli.Decompressor()
            out = b.process(data, output_buffer_limit=cap + 1)
            if len(out) > cap or not b.is_finished():
                raise BodyTooLarge
            return out
        if enc in (b"", b"identity"):
            return data
    except (zlib.error, brotli.error):
        return None
    return None


def json_text(body: bytes, headers: list[tuple[bytes, bytes]], cap: int) -> str | None:
    """The body as text if it may be JSON (PostgreSQL makes the final call), else None."""
    if not body:
        return None
    content_type = b""
    encoding = b""
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-type":
            content_type = value.lower()
        elif lname == b"content-encoding":
            encoding = value
    if encoding:
        try:
            decoded = decompress(body, encoding, cap)
        except BodyTooLarge:
            return None
        if decoded is None:
            return None
        body = decoded
    if b"json" not in content_type:
        first = body.lstrip()[:1]
        if first not in (b"{", b"["):
            return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:  # PostgreSQL text cannot hold NUL
        return None
    return text


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


def redact_json(text: str, paths: list[list[str | int | None]]) -> str | None:
    """``text`` with every value at ``paths`` replaced by "[redacted]"; None if unchanged."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    changed = False
    for steps in paths:
        changed |= _redact(doc, steps)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")) if changed else None
