"""Timestamps for the recorder's COPY: Unix seconds to PostgreSQL's ``timestamptz``.

Rows carry Unix seconds (floats); the writer's connection encodes them with
``timestamptz_to_pg`` as PostgreSQL stores them, microseconds since 2000-01-01 UTC, which
asyncpg writes without building a ``datetime`` (building one, then encoding it, was a
quarter of the recorder's CPU). The driver calls the encoder for every timestamp of every
row (five per mirrored request), so this module is compiled (``build.py``) and takes the
float first; datetimes still come from spool files written by earlier versions and from
queries on the writer's connection.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Final

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
PG_EPOCH_UNIX_S: Final = 946_684_800.0
_MICROSECOND: Final = timedelta(microseconds=1)


def micros_since_pg_epoch(seconds: float) -> int:
    """Unix ``seconds`` as whole microseconds since 2000-01-01 UTC, rounded half to even as
    ``round`` does (whose call, not compiled, cost more than the rest of the conversion)."""
    exact = (seconds - PG_EPOCH_UNIX_S) * 1_000_000.0
    whole = math.floor(exact)
    rest = exact - whole  # exact for any timestamp a double holds to the microsecond
    if rest > 0.5 or (rest == 0.5 and whole % 2 == 1):
        whole += 1
    return whole


def timestamptz_to_pg(value: object) -> tuple[int]:
    """``value`` (Unix seconds, or an aware datetime) as microseconds since 2000-01-01 UTC,
    in the tuple form asyncpg's ``format="tuple"`` codec takes."""
    if isinstance(value, float):  # the common case, checked first
        return (micros_since_pg_epoch(value),)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime cannot be stored as timestamptz: {value!r}")
        return ((value - PG_EPOCH) // _MICROSECOND,)
    if isinstance(value, int):
        return (micros_since_pg_epoch(float(value)),)
    raise TypeError(f"a timestamptz is stored from Unix seconds or an aware datetime, "
                    f"not {type(value).__name__}")


def timestamptz_from_pg(value: tuple[int]) -> datetime:
    return PG_EPOCH + timedelta(microseconds=value[0])
