"""Body decoding for storage: decompression caps, JSON detection, JSON redaction."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.recorder.bodies import (
    ENCODING,
    INVALID_JSON,
    MAX_CODINGS,
    TOO_DEEP,
    BodyTooLarge,
    JsonRedactor,
    Unredactable,
    decompress,
    inspect_json,
    json_text,
    parse_json_path,
    redact_json,
)
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.streams import decode_arrivals

JSON = [(b"Content-Type", b"application/json")]


def test_gzip_deflate_and_brotli_are_undone() -> None:
    """Each supported content-encoding gives back the original bytes."""
    data = b'{"a": 1}' * 10
    assert decompress(gzip.compress(data), b"gzip", 1000) == data
    assert decompress(zlib.compress(data), b"deflate", 1000) == data
    raw = zlib.compressobj(wbits=-15)
    assert decompress(raw.compress(data) + raw.flush(), b"deflate", 1000) == data
    assert decompress(brotli.compress(data), b"br", 1000) == data


def test_every_member_of_a_gzip_body_is_undone_and_nothing_may_follow_a_stream() -> None:
    """A gzip body of several members (``cat a.gz b.gz``) is undone whole, zero padding
    between members allowed and the cap counting them all; bytes after a member that are
    no member, or after the end of a deflate or brotli stream, make the body corrupt."""
    first, second = gzip.compress(b'{"a": '), gzip.compress(b'1, "b": 2}')
    assert decompress(first + second, b"gzip", 1000) == b'{"a": 1, "b": 2}'
    assert decompress(first + b"\0\0" + second + b"\0", b"x-gzip", 1000) == \
        b'{"a": 1, "b": 2}'
    with pytest.raises(BodyTooLarge):
        decompress(first + second, b"gzip", 10)
    assert decompress(first + b"garbage", b"gzip", 1000) is None
    assert decompress(zlib.compress(b"[1]") + b"garbage", b"deflate", 1000) is None
    assert decompress(brotli.compress(b"[1]") + b"garbage", b"br", 1000) is None


def test_a_list_of_codings_is_undone_last_first() -> None:
    """``Content-Encoding: gzip, br`` (gzip applied, then br) is undone br first; with
    redaction rules, such a JSON body is redacted, not stored as its compressed bytes."""
    data = b'{"user": {"ssn": "078-05-1120"}, "x": 1}'
    assert decompress(brotli.compress(gzip.compress(data)), b"gzip, br", 1000) == data
    assert decompress(gzip.compress(gzip.compress(data)), b"gzip,gzip", 1000) == data
    assert decompress(gzip.compress(data), b"identity, gzip", 1000) == data
    assert decompress(gzip.compress(data), b"gzip, zstd", 1000) is None
    with pytest.raises(BodyTooLarge):  # each layer is capped, the last one too
        decompress(gzip.compress(gzip.compress(b"\0" * 5_000_000)), b"gzip, gzip", 1_000_000)
    headers = [(b"Content-Type", b"application/octet-stream"),
               (b"Content-Encoding", b"gzip, gzip")]
    text = json_text(gzip.compress(gzip.compress(data)), headers, 1000)
    assert text == data.decode()
    assert redact_json(text, ["$.user.ssn"]) == '{"user":{"ssn":"[redacted]"},"x":1}'


def test_the_steps_of_a_list_of_codings_share_one_cap() -> None:
    """The steps before the last share one cap, whose output a list cannot multiply:
    deflate listed 8 times over stored layers of 100 kB (each step well within the cap)
    raises BodyTooLarge; two steps each within the cap still decode."""
    data = b"\0" * 100_000
    layered = data
    for _ in range(MAX_CODINGS):
        layered = zlib.compress(layered, 0)
    codings = b", ".join([b"deflate"] * MAX_CODINGS)
    with pytest.raises(BodyTooLarge):
        decompress(layered, codings, 400_000)
    assert decompress(layered, codings, 1_000_000) == data
    twice = gzip.compress(gzip.compress(b"\0" * 1_000_000, 0))
    assert decompress(twice, b"gzip, gzip", 1_001_000) == b"\0" * 1_000_000
    # identity undoes nothing and takes none of the cap
    bomb = gzip.compress(gzip.compress(b"\0" * 50_000_000))
    with pytest.raises(BodyTooLarge):
        decompress(bomb, b"gzip, gzip" + b", identity" * 5, len(bomb) * 5 - 1)
    assert decompress(twice, b"gzip, identity, gzip" + b", identity" * 5, 1_001_000) == (
        b"\0" * 1_000_000)
    arrivals = [(0, 0.0), (len(layered) // 2, 1.0)]
    assert decode_arrivals(layered, arrivals, codings, 400_000) is None
    decoded = decode_arrivals(layered, arrivals, codings, 1_000_000)
    assert decoded is not None and decoded[0] == data
    decoded = decode_arrivals(bomb, arrivals[:1], b"gzip, gzip" + b", identity" * 5,
                              len(bomb) * 5 - 2)
    assert decoded is None


def test_a_list_of_more_than_max_codings_is_not_undone() -> None:
    """A list naming more than MAX_CODINGS codings is not undone, however small its steps:
    each step walks the whole body and a stream's every read, so thousands of them (a
    header line holds 1,600 `gzip`) held the recorder's loop for seconds. The body is
    treated as one of an unknown coding (no JSON; withheld under redaction if it claims
    JSON); a list of MAX_CODINGS is undone."""
    data = b'{"user": {"ssn": "078-05-1120"}}'
    layered = data
    for _ in range(MAX_CODINGS + 1):
        layered = gzip.compress(layered, mtime=0)
    assert decompress(layered, b",".join([b"gzip"] * (MAX_CODINGS + 1)), 1000) is None
    once = gzip.compress(data)
    assert decompress(once, b"gzip" + b", identity" * (MAX_CODINGS - 1), 1000) == data
    assert decompress(once, b"gzip" + b", identity" * MAX_CODINGS, 1000) is None
    assert decompress(once, b"gzip" + b"," * 8_000, 1000) is None
    arrivals = [(i, float(i)) for i in range(len(layered))]
    assert decode_arrivals(layered, arrivals, b",".join([b"gzip"] * (MAX_CODINGS + 1)),
                           1000) is None
    decoded = decode_arrivals(once, arrivals[:len(once)],
                              b"gzip" + b", identity" * (MAX_CODINGS - 1), 1000)
    assert decoded is not None and decoded[0] == data
    headers = [(b"Content-Type", b"application/json"),
               (b"Content-Encoding", b",".join([b"gzip"] * (MAX_CODINGS + 1)))]
    assert inspect_json(layered, headers, 1000) == (None, ENCODING)


class _Counted:
    """A zlib decompressor that counts the input bytes it is handed."""

    handed = 0

    def __init__(self, wbits: int = zlib.MAX_WBITS) -> None:
        self._d = _DECOMPRESSOBJ(wbits)

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        _Counted.handed += len(data)
        return self._d.decompress(data, max_length)

    def __getattr__(self, name: str) -> object:
        return getattr(self._d, name)


_DECOMPRESSOBJ = zlib.decompressobj


def test_a_body_of_many_gzip_members_is_undone_in_linear_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A megabyte of empty gzip members: what zlib is handed again at the end of each
    member is at most the slice the body is fed in (16 KiB), so the work grows with the
    body, not with its square: fed whole, the rest of the body was handed again at the end
    of each member (52,000 members, some 27 GB of copies, over a second of the loop for one
    record). Counted, not timed."""
    count = 52_000
    members = gzip.compress(b"", mtime=0) * count
    monkeypatch.setattr(zlib, "decompressobj", _Counted)
    _Counted.handed = 0
    assert decompress(members, b"gzip", 1_000_000) == b""
    assert _Counted.handed <= count * 16 * 1024, _Counted.handed


def test_decompression_bomb_stops_at_the_cap() -> None:
    """A small body that inflates past the cap raises instead of using the memory."""
    bomb = gzip.compress(b"\0" * 50_000_000)
    assert len(bomb) < 100_000
    with pytest.raises(BodyTooLarge):
        decompress(bomb, b"gzip", 1_000_000)
    with pytest.raises(BodyTooLarge):
        decompress(brotli.compress(b"\0" * 50_000_000), b"br", 1_000_000)


@pytest.mark.parametrize("coding", [b"gzip", b"deflate", b"br"])
def test_a_cut_stream_decodes_to_the_start_of_its_body(coding: bytes) -> None:
    """A stream cut short (a body stored cut at max_body_bytes) within the cap decodes to
    what it holds, for every coding; only output past the cap raises BodyTooLarge."""
    data = b'{"secret": "s", "pad": "%s"}' % bytes(range(256)).hex().encode() * 50
    compress = {b"gzip": gzip.compress, b"deflate": zlib.compress, b"br": brotli.compress}
    cut = compress[coding](data)[:-20]
    out = decompress(cut, coding, 1_000_000)
    assert out is not None and 0 < len(out) < len(data) and data.startswith(out)
    with pytest.raises(BodyTooLarge):
        decompress(cut, coding, 10)
    redacting = RowEncoder(RecordingConfig(redact_json=["$.secret"]))
    assert redacting.body(cut, [*JSON, (b"Content-Encoding", coding)]) == (
        None, None, "invalid_json")
    # Plain JSON said to be br that brotli reads as the start of a stream stays withheld
    # for its encoding (as mislabelled raw deflate is).
    text = [(b"Content-Type", b"text/plain"), (b"Content-Encoding", b"br")]
    assert decompress(b'["secret"]', b"br", 1000) == b""
    assert redacting.body(b'["secret"]', text) == (None, None, "encoding")


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


@pytest.mark.parametrize("name", [b"Content-Type", b"content-type", b"CONTENT-TYPE"])
@pytest.mark.parametrize("value", [b"application/json", b"Application/JSON",
                                   b"application/problem+json; charset=utf-8"])
def test_a_json_type_is_read_in_any_case(name: bytes, value: bytes) -> None:
    """The type is declared whatever the case of the header's name and value: "42" is JSON
    only when declared (it does not look like an object or a list)."""
    assert json_text(b"42", [(b"Host", b"h"), (name, value)], 1000) == "42"
    assert json_text(b"42", [(name, b"text/plain")], 1000) is None
    assert inspect_json(b"\xff", [(name, value)], 1000) == (None, "not_utf8")
    encoded = [(name, value), (b"CONTENT-ENCODING", b"gzip")]
    assert json_text(gzip.compress(b"42"), encoded, 1000) == "42"


def test_redact_json_replaces_values_at_paths() -> None:
    """Values at the configured paths become "[redacted]", wherever the lists go."""
    doc = {"customer": {"email": "a@b.c", "name": "A"},
           "items": [{"ssn": "1"}, {"ssn": "2", "k": 3}], "n": 1}
    paths = ["$.customer.email", "$.items[*].ssn", "$.missing.field"]
    out = json.loads(redact_json(json.dumps(doc), paths) or "null")
    assert out == {"customer": {"email": "[redacted]", "name": "A"},
                   "items": [{"ssn": "[redacted]"}, {"ssn": "[redacted]", "k": 3}], "n": 1}
    assert redact_json('{"n": 1}', paths) is None  # no key of any path: stored as sent
    with pytest.raises(Unredactable) as caught:
        redact_json('{"customer": {"email": ', paths)
    assert caught.value.reason == INVALID_JSON


def test_redaction_reads_what_orjson_refuses_and_gives_up_on_depth_without_recursing() -> None:
    """An escaped lone surrogate, 1e999 and integers past 64 bits are redacted and kept as
    read; nesting 10,000 deep is refused as too deep, not a RecursionError."""
    redactor = JsonRedactor(["$.secret"])
    out = redactor.redact('{"secret": "s", "x": "\\ud800", "big": 123456789012345678901234567890,'
                          ' "inf": 1e999}')
    assert out is not None
    data, text = out
    assert data == text.encode("ascii")
    assert '"secret":"[redacted]"' in text and "\\ud800" in text
    assert "123456789012345678901234567890" in text and "Infinity" in text
    out = redactor.redact('{"secret": "s", "low": -9223372036854775809}')
    assert out is not None and out[1] == '{"secret":"[redacted]","low":-9223372036854775809}'
    deep = '{"secret": 1, "x": ' + "[" * 10_000 + "]" * 10_000 + "}"
    with pytest.raises(Unredactable) as caught:
        redactor.redact(deep)
    assert caught.value.reason == TOO_DEEP


def test_a_duplicated_key_cannot_hide_a_secret_in_the_stored_bytes() -> None:
    """Of a key given twice the parsed document keeps the last; the first occurrence's value
    is not left in the stored bytes either."""
    text = '{"customer": {"email": "jane@example.com"}, "customer": {"name": "J"}}'
    out = JsonRedactor(["$.customer.email"]).redact(text)
    assert out is not None and b"jane@example.com" not in out[0]


def test_with_redaction_rules_an_unreadable_json_body_is_withheld() -> None:
    """A body that claims or looks like JSON but cannot be read is not stored when redaction
    rules are set (its secret could not be found), and is stored as sent when none are."""
    secret = b'{"secret": "s", "cut": "' + b"x" * 50  # cut at max_body_bytes, say
    bodies = [secret, b'{"secret": "s\xff"}', b"not gzip at all"]
    headers = [JSON, JSON, [*JSON, (b"Content-Encoding", b"gzip")]]
    redacting = RowEncoder(RecordingConfig(redact_json=["$.secret"]))
    plain = RowEncoder(RecordingConfig())
    for body, head in zip(bodies, headers, strict=True):
        assert redacting.body(body, head)[:2] == (None, None)
        assert plain.body(body, head)[0] == body
    assert [r[2] for r in (redacting.body(b, h) for b, h in zip(bodies, headers, strict=True))
            ] == ["invalid_json", "not_utf8", "encoding"]
    # Not JSON at all (a form post): outside what redact_json covers, stored as sent.
    form = [(b"Content-Type", b"application/x-www-form-urlencoded")]
    assert redacting.body(b"secret=s", form) == (b"secret=s", None, None)
    assert inspect_json(b"secret=s", form, 100) == (None, None)


@pytest.mark.parametrize("coding", [b"gzip", b"zstd"])
def test_a_body_that_looks_like_json_under_a_coding_not_undone_is_withheld(
        coding: bytes) -> None:
    """Plain JSON said to be gzip (mislabelled), or under a coding not undone here, with no
    JSON type: its bytes look like JSON and may hold a redacted field, so with redaction
    rules it is withheld; without them it is stored as sent. Bytes that do not look like
    JSON under such a coding are outside what redact_json covers."""
    headers = [(b"Content-Type", b"text/plain"), (b"Content-Encoding", coding)]
    body = b' {"patient": {"name": "SECRET"}}'
    assert inspect_json(body, headers, 1000) == (None, "encoding")
    redacting = RowEncoder(RecordingConfig(redact_json=["$.patient.name"]))
    assert redacting.body(body, headers) == (None, None, "encoding")
    assert RowEncoder(RecordingConfig()).body(body, headers)[0] == body
    assert inspect_json(b"\x28\xb5\x2f\xfd binary", headers, 1000) == (None, None)


def test_plain_json_that_decodes_as_a_raw_deflate_stream_is_withheld() -> None:
    """Plain JSON said to be raw deflate, whose bytes zlib reads as the start of a stream
    (to bytes that are no JSON): with redaction rules it is withheld, not stored as sent."""
    headers = [(b"Content-Type", b"text/plain"), (b"Content-Encoding", b"deflate")]
    body = b'["secret"]'
    assert decompress(body, b"deflate", 1000) not in (None, body)
    assert inspect_json(body, headers, 1000) == (None, "encoding")
    redacting = RowEncoder(RecordingConfig(redact_json=["$[0]"]))
    assert redacting.body(body, headers) == (None, None, "encoding")


@pytest.mark.parametrize("path", ["customer.email", "$..x", "$", "$.a[", "$[?(@.a)]"])
def test_unsupported_json_paths_are_refused_with_guidance(path: str) -> None:
    """A JSON path outside the supported subset is refused with what to write instead."""
    with pytest.raises(ValueError, match=r"\$"):
        parse_json_path(path)
