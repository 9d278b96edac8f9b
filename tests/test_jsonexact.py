"""The exact JSON read shared by the recorder's redaction, replay, set_json, labels and the
generation comparison: orjson where it reads the same, the standard library elsewhere."""

from __future__ import annotations

import math

import pytest

from shadowproxy.jsonexact import NotFiniteNumber, TooDeep, loads_exact


@pytest.mark.parametrize("text", ['{"a": [1, 2.5, "x"]}', b'{"a": [1, 2.5, "x"]}'])
def test_plain_json_is_read_by_orjson(text: str | bytes) -> None:
    assert loads_exact(text) == ({"a": [1, 2.5, "x"]}, False)


@pytest.mark.parametrize("number", [18446744073709551617, -9223372036854775809,
                                    9007199254740993])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_integers_past_64_bits_stay_exact(number: int, as_bytes: bool) -> None:
    text = f'{{"id": {number}, "next": {number + 1}}}'
    doc, standard = loads_exact(text.encode() if as_bytes else text)
    assert doc == {"id": number, "next": number + 1}
    assert type(doc["id"]) is int
    assert standard is (len(str(abs(number))) >= 19)


def test_what_orjson_refuses_but_json_holds_is_read_by_the_standard_library() -> None:
    doc, standard = loads_exact('[1e999, "\\ud800"]')
    assert standard and doc[0] == math.inf and doc[1] == "\ud800"


def test_nan_is_read_unless_refused() -> None:
    doc, standard = loads_exact('{"x": NaN}')
    assert standard and math.isnan(doc["x"])
    with pytest.raises(NotFiniteNumber):
        loads_exact('{"x": NaN}', allow_nan=False)
    with pytest.raises(NotFiniteNumber):
        loads_exact(b"[-Infinity]", allow_nan=False)
    # A number too large for a float is JSON, not a constant: read, also when refusing NaN.
    assert loads_exact("1e999", allow_nan=False) == (math.inf, True)


def test_deep_nesting_is_too_deep_not_a_recursion_error() -> None:
    with pytest.raises(TooDeep):
        loads_exact("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize("text", ["{", "", "nope", b"\xff{}", '{"a": 1} x'])
def test_what_is_not_json_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError) as caught:
        loads_exact(text)
    assert not isinstance(caught.value, (TooDeep, NotFiniteNumber))
