"""Shadow-only request edits (shadowproxy.bodyedit.set_json)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from shadowproxy.bodyedit import JsonEdits, parse_path, set_json

CHAT = {"model": "primary-model", "stream": True,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}],
        "stream_options": {"continuous": False}}


def _edit(body: Any, edits: dict[str, Any]) -> tuple[Any, bool]:
    raw = orjson.dumps(body)
    out, applied = set_json(raw, edits)
    return orjson.loads(out), applied


def test_model_is_replaced_and_nested_objects_merge() -> None:
    """A name is replaced; an object value merges into the object already there."""
    out, applied = _edit(CHAT, {"model": "candidate-model",
                                "stream_options": {"include_usage": True}})
    assert applied
    assert out == {**CHAT, "model": "candidate-model",
                   "stream_options": {"continuous": False, "include_usage": True}}


def test_dotted_paths_create_missing_objects() -> None:
    """A dotted path creates the objects on its way, or fills a null one."""
    body = {"model": "m", "metadata": None}
    out, applied = _edit(body, {"stream_options.include_usage": True,
                                "$.metadata.experiment": "b", "a.b.c": [1, 2]})
    assert applied
    assert out == {"model": "m", "metadata": {"experiment": "b"},
                   "stream_options": {"include_usage": True}, "a": {"b": {"c": [1, 2]}}}


def test_list_indexes_and_quoted_names() -> None:
    """[n] and [-1] address list items; ["a.b"] is one name holding a dot."""
    out, applied = _edit(CHAT, {"messages[0].content": "Be terse.",
                                "messages[-1]": {"name": "tester"},
                                'extra_body["x.y"]': 1, "extra_body['z']": 2})
    assert applied
    assert out["messages"] == [{"role": "system", "content": "Be terse."},
                               {"role": "user", "content": "Hi", "name": "tester"}]
    assert out["extra_body"] == {"x.y": 1, "z": 2}


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"3",
                                  b'{"a": NaN}', b"\xff\xfe{}", b'{"a": 1'])
def test_bodies_that_are_not_a_json_object_are_returned_as_they_were(body: bytes) -> None:
    """Anything but a JSON object comes back as the same bytes, with the flag False."""
    out, applied = set_json(body, {"model": "x"})
    assert out is body
    assert applied is False


@pytest.mark.parametrize("edits", [
    {"messages[5].content": "x"},         # past the end of the list
    {"model.name": "x"},                  # into a string
    {"missing[0]": "x"},                  # a list cannot be made up
    {"model": "ok", "messages.x": "y"},   # the second fails: none is applied
])
def test_edits_that_do_not_fit_leave_the_body_as_it_was(edits: dict[str, Any]) -> None:
    """All or none: a path that cannot be followed leaves the body unchanged, flag False."""
    raw = orjson.dumps(CHAT)
    out, applied = set_json(raw, edits)
    assert out is raw
    assert applied is False


def test_original_bytes_and_configured_values_are_never_changed() -> None:
    """The input bytes stay as they were, and a merge never changes the configured value."""
    raw = orjson.dumps(CHAT)
    copy = bytes(raw)
    edits = JsonEdits({"stream_options": {"include_usage": True}, "stream_options.x": 1})
    first, _ = edits.apply(raw)
    second, _ = edits.apply(orjson.dumps({"model": "m"}))
    assert raw == copy
    assert orjson.loads(first)["stream_options"] == {"continuous": False,
                                                     "include_usage": True, "x": 1}
    assert orjson.loads(second) == {"model": "m",
                                    "stream_options": {"include_usage": True, "x": 1}}
    assert edits.edits[0][1] == {"include_usage": True}


def test_integers_past_64_bits_stay_exact() -> None:
    """A body holding a 30-digit integer keeps it digit for digit."""
    raw = b'{"seed": 123456789012345678901234567890, "model": "a", "t": "\xc3\xa9"}'
    out, applied = set_json(raw, {"model": "b"})
    assert applied
    assert json.loads(out) == {"seed": 123456789012345678901234567890, "model": "b",
                               "t": "é"}
    assert b"123456789012345678901234567890" in out


@pytest.mark.parametrize(("text", "expected"), [
    ("model", ("model",)), ("$.model", ("model",)), ("$model", ("model",)),
    ("stream_options.include_usage", ("stream_options", "include_usage")),
    ("messages[0].content", ("messages", 0, "content")), ("a[-1][2]", ("a", -1, 2)),
    ('a["x.y"].b', ("a", "x.y", "b")), ("a['q']", ("a", "q")), ('["a\\"b"]', ('a"b',)),
    ("max-tokens", ("max-tokens",)),
])
def test_paths_are_read_into_steps(text: str, expected: tuple[Any, ...]) -> None:
    """Dotted names, [n] indexes and quoted names are read into steps."""
    assert parse_path(text) == expected


@pytest.mark.parametrize("text", ["", "$", "$.", "a..b", "a.", "[0]x", "a[x]", "a.[0]",
                                  'a["x]', "a b[0"])
def test_bad_paths_are_refused_saying_what_is_accepted(text: str) -> None:
    """A path that cannot be read is a ValueError naming the accepted forms."""
    with pytest.raises(ValueError, match="set_json"):
        parse_path(text)


def test_unserialisable_values_are_refused() -> None:
    """A value that cannot be JSON is refused when the edits are built."""
    with pytest.raises(ValueError, match="model: the value cannot be written as JSON"):
        JsonEdits({"model": {1, 2}})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"a": [1.0, float("-inf")]}])
def test_nan_and_infinities_are_refused(value: Any) -> None:
    """YAML's .nan and .inf are not JSON numbers: refused when the edits are built, rather
    than sent to the shadow as null."""
    with pytest.raises(ValueError, match="t: NaN and infinities are not JSON numbers"):
        JsonEdits({"t": value})
