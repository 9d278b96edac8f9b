"""The report's exact counts over its window, from the hourly summaries where they exist.

A window is cut in two: the whole minutes of summarized hours (``rollup_hours``), read from
``pair_rollups`` and ``request_rollups``, and the rest (the partial minutes at both ends,
hours not summarized yet: the last quarter of an hour or so, or all of them where no proxy
runs the maintenance task), read from the rows. The two are grouped alike
(``store/rollups.py``'s ``PAIR_GROUPS``) and added up, so that the result is what one pass
over every pair would give, at the cost of the unsummarized part alone. Both are read in the
report's snapshot, which sees a summary and the rows it summarizes together
(``store/rollups.py`` says why a summary is never stale).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shadowproxy.compare.snapshot import VERSION_FILTER, Snapshot
from shadowproxy.store.rollups import HOUR, PAIR_GROUPS, PAIR_KEYS, PAIR_SUMS, ROLLED_SUMS

Group = dict[str, Any]
"""One group of pairs: the values of ``PAIR_KEYS``, ``n`` and the latency sums."""

_MINUTE = timedelta(minutes=1)
_SUMMED = ("n", "pn", "psum", "sn", "ssum")


@dataclass(frozen=True)
class Parts:
    """Where each part of the window is read from."""

    hours: list[datetime]
    """Summarized hours that overlap the window's whole minutes."""
    first_minute: datetime
    end_minute: datetime
    """The whole minutes of the window: ``first_minute`` ≤ minute < ``end_minute``."""
    rows: list[tuple[datetime, datetime]]
    """Ranges read from the rows, each [start, end)."""
    overlapping: list[datetime]
    """Summarized hours that overlap the window at all (their sample keys serve it)."""
    unsummarized: list[tuple[datetime, datetime]]
    """The window outside those hours, in ranges [start, end)."""

    @property
    def summarized(self) -> bool:
        return bool(self.hours)


def _floor_minute(at: datetime) -> datetime:
    seconds = at.timestamp()
    return datetime.fromtimestamp(seconds - seconds % 60, UTC)


def split(start: datetime, end: datetime, hours: list[datetime]) -> Parts:
    """The parts of [start, end) given the summarized hours (sorted)."""
    first = _floor_minute(start)
    if first < start:
        first += _MINUTE
    last = _floor_minute(end)
    covered: list[tuple[datetime, datetime]] = []
    used = []
    for hour in hours:
        a, b = max(hour, first), min(hour + HOUR, last)
        if a < b:
            used.append(hour)
            if covered and covered[-1][1] == a:
                covered[-1] = (covered[-1][0], b)
            else:
                covered.append((a, b))
    overlapping = [h for h in hours if h < end and h + HOUR > start]
    whole = [(max(h, start), min(h + HOUR, end)) for h in overlapping]
    return Parts(hours=used, first_minute=first, end_minute=max(last, first),
                 rows=_outside(start, end, covered), overlapping=overlapping,
                 unsummarized=_outside(start, end, whole))


def _outside(start: datetime, end: datetime, inside: list[tuple[datetime, datetime]]
             ) -> list[tuple[datetime, datetime]]:
    """[start, end) less the sorted, disjoint ranges ``inside``, merged into ranges."""
    out: list[tuple[datetime, datetime]] = []
    at = start
    for a, b in inside:
        if at < a:
            out.append((at, a))
        at = max(at, b)
    if at < end:
        out.append((at, end))
    return out


async def parts(db: Snapshot) -> Parts:
    """The parts of the report's window (looked up once per report)."""
    if db.parts is None:
        start, end = db.scope.window.start, db.scope.window.end
        # The hour before the start is PostgreSQL's to subtract: Python's datetime stops at
        # year 1, and a window from its first hour (--from 0001-01-01) overflowed.
        hours = [r[0] for r in await db.fetch(
            "SELECT hour FROM shadowproxy.rollup_hours "
            "WHERE hour > $1::timestamptz - interval '1 hour' AND hour < $2 "
            "ORDER BY hour", start, end)]
        db.parts = split(start, end, hours)
    return db.parts


async def pair_groups(db: Snapshot, shadow: str | None = None) -> list[Group]:
    """Every pair of the window with ``shadow`` (the report's by default), grouped by
    ``PAIR_KEYS`` with each group's size and latency sums."""
    p = await parts(db)
    route, shadow = db.scope.route, shadow or db.scope.shadow
    keys = ", ".join(PAIR_KEYS)
    found: list[Group] = []
    if p.hours:
        found += [dict(r) for r in await db.fetch(f"""
            SELECT {keys}, {ROLLED_SUMS} FROM shadowproxy.pair_rollups
            WHERE route = $1 AND shadow_name = $2 AND hour = ANY($3::timestamptz[])
              AND minute >= $4 AND minute < $5 AND {VERSION_FILTER}
            GROUP BY {keys}""", route, shadow, p.hours, p.first_minute, p.end_minute)]
    for a, b in p.rows:
        found += [dict(r) for r in await db.fetch(f"""
            SELECT {PAIR_GROUPS}, {PAIR_SUMS} FROM shadowproxy.pairs
            WHERE route = $1 AND shadow_name = $2 AND received_at >= $3 AND received_at < $4
              AND {VERSION_FILTER}
            GROUP BY {keys}""", route, shadow, a, b)]
    return merge(found)


def merge(found: list[Group]) -> list[Group]:
    """Groups with the same keys added up (sizes and sums added, extremes kept)."""
    merged: dict[tuple[Any, ...], Group] = {}
    for g in found:
        key = tuple(g[k] for k in PAIR_KEYS)
        into = merged.get(key)
        if into is None:
            merged[key] = dict(g)
            continue
        for col in _SUMMED:
            if g[col] is not None:
                into[col] = g[col] if into[col] is None else into[col] + g[col]
        for col, pick in (("pmin", min), ("smin", min), ("pmax", max), ("smax", max)):
            values = [v for v in (into[col], g[col]) if v is not None]
            into[col] = pick(values) if values else None
    return list(merged.values())


async def requests_by_version(db: Snapshot) -> list[tuple[str | None, int, datetime,
                                                          datetime]]:
    """The route's requests in the window per configuration version (all versions,
    whatever ``--config-version`` selects): version, count, first and last received."""
    p = await parts(db)
    route = db.scope.route
    found = []
    if p.hours:
        found += await db.fetch(
            "SELECT config_version, sum(requests), min(first_at), max(last_at) "
            "FROM shadowproxy.request_rollups WHERE route = $1 "
            "AND hour = ANY($2::timestamptz[]) AND minute >= $3 AND minute < $4 GROUP BY 1",
            route, p.hours, p.first_minute, p.end_minute)
    for a, b in p.rows:
        found += await db.fetch(
            "SELECT config_version, count(*), min(received_at), max(received_at) "
            "FROM shadowproxy.requests WHERE route = $1 AND received_at >= $2 "
            "AND received_at < $3 GROUP BY 1", route, a, b)
    merged: dict[str | None, tuple[int, datetime, datetime]] = {}
    for version, n, first, last in found:
        if version in merged:
            m = merged[version]
            merged[version] = (m[0] + int(n), min(m[1], first), max(m[2], last))
        else:
            merged[version] = (int(n), first, last)
    return [(v, n, first, last) for v, (n, first, last) in merged.items()]
