"""Fields set in a JSON request body before it goes to a shadow (``set_json``); pure.

A shadow can be sent the primary's request with a few fields changed, so that one proxy
points the same traffic at another model name, another prompt setting or another option on
the same server::

    set_json:
      model: candidate-model
      stream_options: {include_usage: true}      # merged into an existing object
      messages[0].content: "You are terse."      # a path into lists too

Each key is a path: dotted names (``stream_options.include_usage``), ``[n]`` list indexes
(``-1`` the last), ``["odd.key"]`` for names with dots or brackets, an optional leading
``$.``. Objects on the way are created when missing (or null). An object value is merged
key by key into an object already there (recursively); any other value replaces what is
there. The edits apply all or none: when the body is not a JSON object, or a path cannot be
followed (an index past the end of a list, a name inside a string), the body is returned as
it was, and the flag says so, for the caller to count. The primary's bytes are never touched:
the edited body is a new ``bytes`` (its Content-Length is the caller's to set).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

from shadowproxy.jsonexact import loads_exact

Step = str | int
Path = tuple[Step, ...]

_STEP = re.compile(r"""\.?([^.\[\]"']+)|\[(-?\d+)\]|\["((?:[^"\\]|\\.)*)"\]|\['([^']*)'\]""")


def parse_path(text: str) -> Path:
    """The steps of a ``set_json`` path; ValueError saying what is accepted otherwise."""
    path = text.strip()
    if path.startswith("$"):
        path = path[1:]
    if path.startswith("."):
        path = path[1:]
    if not path:
        raise ValueError(f"set_json: the path {text!r} names no field; "
                         "use e.g. model, stream_options.include_usage or messages[0].content")
    steps: list[Step] = []
    pos = 0
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None or (m.group(1) is not None and pos > 0 and path[pos] != "."):
            raise ValueError(f"set_json: cannot read the path {text!r} at {path[pos:]!r}; "
                             "use names joined by dots, [n] for a list index and "
                             '["name"] for a name with dots or brackets')
        name, index, quoted, single = m.groups()
        if name is not None:
            steps.append(name)
        elif index is not None:
            steps.append(int(index))
        elif quoted is not None:
            steps.append(orjson.loads(f'"{quoted}"'))
        else:
            steps.append(single)
        pos = m.end()
    return tuple(steps)


def _copy(value: Any) -> Any:
    """A private copy of a configured value, so that requests never share (or change) it."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _merge(target: dict[str, Any], value: Mapping[str, Any]) -> None:
    for key, v in value.items():
        old = target.get(key)
        if isinstance(v, dict) and isinstance(old, dict):
            _merge(old, v)
        else:
            target[key] = _copy(v)


class _Skip(Exception):
    """A path cannot be followed in this body."""


def _apply(doc: dict[str, Any], path: Path, value: Any) -> None:
    node: Any = doc
    for i, step in enumerate(path):
        last = i == len(path) - 1
        if isinstance(step, str):
            if not isinstance(node, dict):
                raise _Skip
            if last:
                old = node.get(step)
                if isinstance(value, dict) and isinstance(old, dict):
                    _merge(old, value)
                else:
                    node[step] = _copy(value)
                return
            child = node.get(step)
            if child is None:
                if not isinstance(path[i + 1], str):
                    raise _Skip  # a list cannot be made up to hold an index
                child = node[step] = {}
            node = child
        else:
            if not isinstance(node, list) or not -len(node) <= step < len(node):
                raise _Skip
            if last:
                old = node[step]
                if isinstance(value, dict) and isinstance(old, dict):
                    _merge(old, value)
                else:
                    node[step] = _copy(value)
                return
            node = node[step]


def _non_finite(value: Any) -> bool:
    """Whether ``value`` holds a float that is NaN or infinite (YAML's ``.nan``, ``.inf``)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


class JsonEdits:
    """Validated ``set_json`` edits, applied in the order given."""

    __slots__ = ("edits",)

    def __init__(self, edits: Mapping[str, Any]) -> None:
        """Raises ValueError naming the path whose form or value is not acceptable."""
        parsed: list[tuple[Path, Any]] = []
        for key, value in edits.items():
            if not isinstance(key, str):
                raise ValueError(f"set_json: a path is text (got {key!r})")
            path = parse_path(key)
            try:
                orjson.dumps(value)
            except orjson.JSONEncodeError as exc:
                raise ValueError(f"set_json: {key}: the value cannot be written as JSON "
                                 f"({exc})") from exc
            if _non_finite(value):
                # orjson would write null in its place, not what the operator asked for.
                raise ValueError(f"set_json: {key}: NaN and infinities are not JSON numbers; "
                                 "give a number, or null")
            parsed.append((path, _copy(value)))
        self.edits = tuple(parsed)

    def apply(self, body: bytes) -> tuple[bytes, bool]:
        """(the edited body, True), or (``body`` itself, False) when it cannot be edited."""
        if not self.edits:
            return body, True
        try:
            doc, exact = loads_exact(body)
        except ValueError:  # not JSON, bad UTF-8, or nested too deeply
            return body, False
        if not isinstance(doc, dict):
            return body, False
        try:
            for path, value in self.edits:
                _apply(doc, path, value)
            if exact:
                return json.dumps(doc, ensure_ascii=False, separators=(",", ":"),
                                  allow_nan=False).encode(), True
            return orjson.dumps(doc), True
        except (_Skip, ValueError, TypeError):  # JSONEncodeError is a TypeError
            return body, False


def set_json(body: bytes, edits: Mapping[str, Any] | JsonEdits) -> tuple[bytes, bool]:
    """``body`` with ``edits`` applied (see the module's doc); the flag is False when the
    body was left as it was because it is not a JSON object or a path does not fit it."""
    if not isinstance(edits, JsonEdits):
        edits = JsonEdits(edits)
    return edits.apply(body)
