"""Body decoding for storage: decompression caps, JSON detection, JSON redaction."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest

from shadowproxy.recorder.bodies import (
    BodyTooLarge,
    decompress,
    json_text,
    parse_json_path,
    redact_json,
)

JSON = [(b"Content-Type", b"application/json")]


def test_gzip_deflate_and_brotli_are_undone() -> None:
    """Each supported content-encoding gives back the original bytes."""
    data = b'{"a": 1}' * 10
    assert decompress(gzip.compress(data), b"gzip", 1000) == data
    assert decompress(zlib.compress(data), b"deflate", 1000) == data
    raw = zlib.compressobj(wbits=-15)
    assert decompress(raw.compress(data) + raw.flush(), b"deflate", 1000) == data
    assert decompress(brotli.compress(data), b"br", 1000) == data


def test_decompression_bomb_stops_at_the_cap() -> None:
    """A small body that inflates past the cap raises instead of using the memory."""
    bomb = gzip.compress(b"\0" * 50_000_000)
    assert len(bomb) < 100_000
    with pytest.raises(BodyTooLarge):
        decompress(bomb, b"gzip", 1_000_000)
    with pytest.raises(BodyTooLarge):
        decompress(brotli.compress(b"\0" * 50_000_000), b"br", 1_000_000)


def test_corrupt_or_unknown_encoding_is_not_json() -> None:
    """A corrupt gzip body or an unknown encoding yields no JSON text."""
    assert json_text(b"not gzip", [(b"Content-Encoding", b"gzip")], 1000) is None
    assert json_text(b"{}", [(b"Content-Encoding", b"zstd")], 1000) is None


def test_json_detection() -> None:
    """JSON-typed or JSON-looking UTF-8 bodies become text; binary and NUL bodies do not."""
    assert json_text(b'{"a":1}', [], 1000) == '{"a":1}'
    assert json_text(b"[1]", [], 1000) == "[1]"
    assert json_text(b"42", JSON, 1000) == "42"
    assert json_text(b"hello", [], 1000) is None
    assert json_text(b"\xff\xfe{", JSON, 1000) is None
    assert json_text(b'{"a":"\x00"}', JSON, 1000) is None
    assert json_text(gzip.compress(b'{"x":2}'), [(b"Content-Encoding", b"gzip")], 1000) == \
        '{"x":2}'


def test_redact_json_replaces_values_at_paths() -> None:
    """Values at the configured paths become "[redacted]", wherever the lists go."""
    doc = {"customer": {"email": "a@b.c", "name": "A"},
           "items": [{"ssn": "1"}, {"ssn": "2", "k": 3}], "n": 1}
    paths = [parse_json_path("$.customer.email"), parse_json_path("$.items[*].ssn"),
             parse_json_path("$.missing.field")]
    out = json.loads(redact_json(json.dumps(doc), paths) or "null")
    assert out == {"customer": {"email": "[redacted]", "name": "A"},
                   "items": [{"ssn": "[redacted]"}, {"ssn": "[redacted]", "k": 3}], "n": 1}
    assert redact_json('{"n": 1}', paths) is None
    assert redact_json("not json", paths) is None


@pytest.mark.parametrize("path", ["customer.email", "$..x", "$", "$.a[", "$[?(@.a)]"])
def test_unsupported_json_paths_are_refused_with_guidance(path: str) -> None:
    """A JSON path outside the supported subset is refused with what to write instead."""
    with pytest.raises(ValueError, match=r"\$"):
        parse_json_path(path)
