"""Headers as stored (``RowEncoder.headers``): lower-cased names, Latin-1 values without
their ends' white space, repeats joined, redacted names, JSON escapes; on chosen header
sets and on random ones."""

from __future__ import annotations

import json
import random

import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.recorder.rows import RowEncoder

REDACTING = RecordingConfig(redact_headers=["authorization", "cookie"])


def expected(headers: list[tuple[bytes, bytes]], redact: set[str]) -> dict[str, str]:
    """The stored object by its definition: lower-cased names, Latin-1 values without the
    white space before their line's end, repeats joined with ", ", redacted names' values
    replaced."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1").lower()
        text = "[redacted]" if key in redact else value.rstrip(b" \t").decode("latin-1")
        out[key] = out[key] + ", " + text if key in out else text
    return out


@pytest.mark.parametrize("headers", [
    [],
    [(b"Host", b"model:8080"), (b"Content-Type", b"application/json")],
    [(b"Authorization", b"Bearer s3cret"), (b"Accept", b"*/*")],
    [(b"Accept", b"a"), (b"accept", b"b")],  # a repeat, in another case
    [(b"X-Quote", b'say "hi"'), (b"X-Slash", b"a\\b")],  # JSON escapes
    [(b"X-Inject", b'a","host":"evil'), (b"Host", b"h")],  # a value that looks like keys
    [(b"X-Latin", b"caf\xe9"), (b"X-Tab", b"a\tb"), (b"X-Del", b"\x7f")],
    [(b"Cookie", b"a=1"), (b"Cookie", b"b=2")],  # a redacted repeat
    [(b"X-Empty", b"")],
    [(b"X-Ws", b"v2 \t"), (b"X-Ws", b"a b "), (b"X-Ws", b" \t")],  # ends' white space
])
def test_headers_are_stored_as_defined(headers: list[tuple[bytes, bytes]]) -> None:
    text = RowEncoder(REDACTING).headers(headers)
    assert text is not None
    assert json.loads(text) == expected(headers, {"authorization", "cookie"})
    assert "s3cret" not in text


def test_random_header_sets_agree_with_the_definition() -> None:
    rng = random.Random(7)
    encoder = RowEncoder(REDACTING)  # one encoder: its name cache is exercised across sets
    names = [b"Host", b"host", b"Content-Type", b"Authorization", b"X-A", b"x-a", b"Accept"]
    alphabet = bytes(range(256))
    for _ in range(2000):
        headers = [(rng.choice(names),
                    bytes(rng.choice(alphabet if rng.random() < 0.3 else b"abc/;= 09")
                          for _ in range(rng.randrange(6))))
                   for _ in range(rng.randrange(5))]
        text = encoder.headers(headers)
        assert text is not None
        assert json.loads(text) == expected(headers, {"authorization", "cookie"}), headers


def test_the_name_cache_is_bounded() -> None:
    encoder = RowEncoder(RecordingConfig())
    for i in range(10_000):
        headers = [(b"X-Invented-%d" % i, b"v"), (b"Host", b"h")]
        assert json.loads(encoder.headers(headers) or "") == {f"x-invented-{i}": "v",
                                                               "host": "h"}
    assert len(encoder._names) <= 4097
