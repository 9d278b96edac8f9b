"""Ages and retention periods written as a whole number and a unit: ``30d``, ``12h``, ``90m``;
and the one check of a number of seconds (``*_s`` keys, ``--timeout``) that it is finite.

One parser for ``prune --older-than`` and the config's ``storage.retention``, so that the
command line and the file accept the same spellings and say the same thing about the rest.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DAYS = 36_525
"""A hundred years: longer than any record can be old. The cutoff is computed by
PostgreSQL, whose timestamps end some 6,700 years back: a larger age would fail every
retention run, not be refused here."""
_AGE = re.compile(r"^(\d+)([smhdw])$")
EXAMPLE = "a whole number and a unit s, m, h, d or w, e.g. 30d, 12h or 90m"


def parse_age(text: str) -> timedelta:
    """``30d`` → 30 days; ValueError, saying what is expected, for anything else (zero too:
    an age of 0 would mean everything)."""
    m = _AGE.fullmatch(text.strip())
    if not m:
        if text.strip().startswith("-") and _AGE.fullmatch(text.strip()[1:]):
            raise ValueError(f"a negative age makes no sense: an age counts back from now "
                             f"(for records from before {text.strip()[1:]} ago, write "
                             f"{text.strip()[1:]}); expected {EXAMPLE} (got {text!r})")
        raise ValueError(f"expected {EXAMPLE} (got {text!r})")
    amount = int(m.group(1))
    if amount == 0:
        raise ValueError(f"an age of 0 would mean every record; expected {EXAMPLE} "
                         f"(got {text!r})")
    if amount * _SECONDS[m.group(2)] > MAX_DAYS * 86400:
        raise ValueError(f"too large an age: at most {MAX_DAYS}d (a hundred years); "
                         f"expected {EXAMPLE} (got {text!r})")
    return timedelta(**{_UNITS[m.group(2)]: amount})


def format_age(age: timedelta) -> str:
    """The shortest spelling ``parse_age`` reads back: 30 days → ``30d``."""
    seconds = int(age.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def finite_seconds(value: float, instead: str) -> float:
    """``value``, a number of seconds; ValueError for infinity, saying what to write
    (``instead``). YAML's ``.inf``, ``inf`` on a command line and ``1e400`` are read as
    infinity, which is above 0: every timeout and interval took it and waited without end
    (a stop, a silent upstream, a client that sends nothing), or ran once (an interval)."""
    if math.isinf(value):
        raise ValueError(f"expected a finite number of seconds (got {value:g}): {instead}")
    return value
