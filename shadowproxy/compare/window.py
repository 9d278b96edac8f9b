"""The report's time window and the durations that name one (``--since 15m``).

No numpy or database here: the command resolves the window before anything heavy is
imported, so that a bad ``--since`` is answered at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from shadowproxy.errors import UsageError


@dataclass(frozen=True)
class Window:
    """A half-open time window [start, end) of recorded requests."""

    start: datetime
    end: datetime

    def earlier(self) -> Window:
        """The window of the same length just before this one, from year 1 at the earliest
        (no record is older, and no datetime is: a window longer than the time from year 1
        to its start, ``--from 1000-01-01`` or a far ``--to``, stopped the report with an
        OverflowError)."""
        length = self.end - self.start
        if self.start - EARLIEST <= length:
            return Window(EARLIEST, self.start)
        return Window(self.start - length, self.start)


EARLIEST = datetime.min.replace(tzinfo=UTC)
"""The earliest time a window can start at (year 1)."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``15m``, ``1h``, ``7d``; UsageError otherwise."""
    m = _DURATION.match(text)
    if not m and _DURATION.match(text.replace("-", "", 1)) and text.strip().startswith("-"):
        raise UsageError(f"a negative duration makes no sense: a window reaches back from "
                         f"its end (for the last {text.strip()[1:].strip()}, write "
                         f"{text.strip()[1:].strip()}); expected a duration such as 30s, "
                         f"15m, 1h, 7d or 2w (got {text!r})")
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"expected a duration such as 30s, 15m, 1h, 7d or 2w (got {text!r})")
    return float(m.group(1)) * _UNITS[m.group(2)]
