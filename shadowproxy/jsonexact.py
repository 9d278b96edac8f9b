"""Reading a JSON text exactly as written, at orjson's speed where that is the same thing.

orjson is about ten times as fast as the standard library, but it reads an integer past 64
bits as a float (two order ids that differ by one become the same number) and refuses some
texts that are JSON (``1e999``, an escaped lone surrogate) or that Python's reader takes
(``NaN``, ``Infinity``). ``loads_exact`` uses orjson unless the text holds a run of 19
digits, and the standard library for what orjson would not read the same; the caller learns
which read it, so that it can write the document back with the same library. Every place
that reads a recorded or client-given JSON text and must keep its numbers reads it here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# A run of 19 digits may be an integer past 64 bits, which orjson would read as a float:
# 20 for the unsigned ones, 19 for those below -2**63 (-9223372036854775809).
_LONG_NUMBER_TEXT = re.compile(r"[0-9]{19}")
_LONG_NUMBER_BYTES = re.compile(rb"[0-9]{19}")


class NotFiniteNumber(ValueError):
    """The text holds ``NaN``, ``Infinity`` or ``-Infinity``, which are not JSON (PostgreSQL's
    jsonb has no room for them either), and the caller asked to refuse them."""


class TooDeep(ValueError):
    """The text nests past what the standard library can read (the interpreter's recursion
    limit); orjson refuses past 1024 levels."""


def _refuse_constant(name: str) -> Any:
    raise NotFiniteNumber(f"{name} is not a JSON number")


def loads_exact(text: str | bytes, *, allow_nan: bool = True) -> tuple[Any, bool]:
    """(the document, True when the standard library read it). Raises ValueError for a text
    that is not JSON (or not UTF-8), ``TooDeep`` (a ValueError) for one nested too deeply,
    and with ``allow_nan=False`` ``NotFiniteNumber`` (a ValueError) for ``NaN``/``Infinity``.
    A document the standard library read should be written by it too (``json.dumps``):
    orjson writes integers past 64 bits, and non-finite floats, differently."""
    long_number = (_LONG_NUMBER_BYTES.search(text) if isinstance(text, bytes)
                   else _LONG_NUMBER_TEXT.search(text))
    if long_number is None:
        try:
            return orjson.loads(text), False
        except orjson.JSONDecodeError:
            pass  # 1e999, NaN, a lone surrogate, deep nesting, or not JSON: ask the standard
    try:
        if allow_nan:
            return json.loads(text), True
        return json.loads(text, parse_constant=_refuse_constant), True
    except RecursionError:
        raise TooDeep("JSON nested too deeply to read") from None
