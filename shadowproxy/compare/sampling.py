"""The report's sample of whole requests, drawn in PostgreSQL when the window is large.

Counts and rates are cheap aggregates and always cover every pair of the window. What needs
rows (tests, percentiles, histograms, the field diff, data checks, slices, generation) reads
``Snapshot.rows``: ``shadowproxy.pairs`` itself while the window holds at most
``--max-pairs`` pairs of the shadow, else the ``report_pairs`` scratch table that ``draw``
fills with the pairs of a sample of exactly ``--max-pairs`` requests.

The unit is the request: a sampled request brings all its pairs (the shadow's, the
baseline's), so paired tests and the baseline's noise see the same requests. Each request of
the window gets the key ``hashtextextended(id::text, seed)`` and the sample is the ``n``
smallest keys: a uniform draw of exactly ``n`` requests (every subset of ``n`` is as likely,
as far as the hash is random), the same for the same seed and window, another for another
seed. ``TABLESAMPLE`` is not used: ``SYSTEM`` draws whole pages (rows recorded together come
together, a sample that is not uniform over requests), ``BERNOULLI`` draws a random count
and scans the whole table, not only the window, and neither can drive the index on
``received_at``. Sorting every key of a window of 100 million requests would be the slow
part, so the keys are first filtered by a cut-off that keeps a little more than ``n`` of
them: the ``n`` smallest keys under the cut-off are the ``n`` smallest of all (the cut-off is
doubled and the draw repeated in the rare case it kept fewer than ``n``).

For the default seed the keys need not be computed for every request of the window: each
summarized hour kept its requests' smallest keys (``store/rollups.py``), and the ``n``
smallest keys of the window that have a pair are among them as far as every hour that kept
only some of its keys kept them (the cut-off is lowered to the smallest such last key). The
draw reads those kept keys for the summarized hours and computes keys only for the rest of
the window; if they end before ``n`` requests with a pair are found (many requests without
one), it draws from every request instead. The sample is the same either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict

from shadowproxy.compare import summaries
from shadowproxy.compare.snapshot import (
    COMPARABLE,
    PAIR_FILTER,
    PAIRS,
    VERSION_FILTER,
    Scratch,
    Snapshot,
)
from shadowproxy.store import rollups

SAMPLE_TABLE, SAMPLED_PAIRS = "report_sample", "report_pairs"
SCRATCH = (Scratch(SAMPLE_TABLE, "id uuid PRIMARY KEY, received_at timestamptz, k bigint"),
           Scratch(SAMPLED_PAIRS, f"LIKE {PAIRS}"))

_KEY = "hashtextextended(q.id::text, $5)"
_SPAN = 2.0 ** 64
_MIN_KEY, _MAX_KEY = -(2 ** 63), 2 ** 63 - 1

_Z95 = 1.959963984540054


class SampleInfo(TypedDict):
    """``meta.sample`` of the report: what the row-level sections were computed on."""

    sampled: bool
    population: int
    """Pairs of the shadow in the window (``counts.pairs``)."""
    size: int
    """Pairs the row-level sections read: the population, or the sampled requests' pairs."""
    max_pairs: int
    seed: int
    unit: str
    method: str
    fraction: float
    comparable: int
    """Comparable pairs among ``size`` (``counts.comparable_pairs`` when not sampled)."""
    population_comparable: int
    """Comparable pairs of the window (``counts.comparable_pairs``)."""
    estimates: dict[str, Estimate]
    """Counts of the population estimated from the sample, with 95% intervals."""


class Estimate(TypedDict):
    in_sample: int
    of_sample: int
    estimate: int
    ci_low: int
    ci_high: int
    ci_level: float


def _cutoff(fraction: float) -> int:
    """The largest key kept by a filter that keeps ``fraction`` of uniform 64-bit keys."""
    if fraction >= 1:
        return _MAX_KEY
    return min(_MAX_KEY, int(_MIN_KEY + fraction * _SPAN))


async def draw(db: Snapshot, population: int, comparable: int, max_pairs: int
               ) -> SampleInfo:
    """Sample ``max_pairs`` requests if the window holds more pairs; point ``db.rows`` at
    the sampled pairs. ``population`` and ``comparable`` are the window's exact counts."""
    info = SampleInfo(sampled=False, population=population, size=population,
                      max_pairs=max_pairs, seed=db.scope.seed, unit="request",
                      method="the requests with the smallest hashtextextended(id, seed)",
                      fraction=1.0, comparable=comparable,
                      population_comparable=comparable, estimates={})
    db.sample = info
    if population <= max_pairs:
        return info
    # Keys are uniform: the number under the cut-off is binomial(population, f); six
    # standard deviations above n leaves a shortfall (and a second pass) practically never.
    fraction = (max_pairs + 6 * math.sqrt(max_pairs) + 50) / population
    kept = await _kept_keys(db, max_pairs)
    while True:
        cutoff = _cutoff(fraction)
        if kept is not None:
            cutoff = min(cutoff, kept.last_k)
        await db.execute(f"DELETE FROM {SAMPLE_TABLE}")
        await db.execute(f"""
            INSERT INTO {SAMPLE_TABLE} (id, received_at, k)
            SELECT id, received_at, k FROM ({_candidates(db, kept)}) c
            WHERE EXISTS (SELECT 1 FROM shadowproxy.responses s
                          WHERE s.request = c.id AND s.received_at = c.received_at
                            AND s.target = $2
                            AND s.role IN ('shadow', 'replay'))
            ORDER BY k, id LIMIT $7""",
                         *db.pair_args(), db.scope.seed, cutoff, max_pairs)
        got = (await db.fetchrow(f"SELECT count(*) FROM {SAMPLE_TABLE}"))[0]
        if got >= max_pairs or (fraction >= 1 and kept is None):
            break
        if kept is not None and cutoff >= kept.last_k:
            kept = None  # the kept keys end before n were found: draw from every request
            continue
        fraction *= 2
    await db.execute(f"ANALYZE {SAMPLE_TABLE}")
    await db.execute(f"INSERT INTO {SAMPLED_PAIRS} SELECT p.* FROM {SAMPLE_TABLE} r "
                     f"JOIN {PAIRS} p ON p.id = r.id AND p.received_at = r.received_at")
    await db.execute(f"ANALYZE {SAMPLED_PAIRS}")
    db.rows, db.sample = SAMPLED_PAIRS, info
    row = await db.fetchrow(f"SELECT count(*), count(*) FILTER (WHERE {COMPARABLE}) "
                            f"FROM {db.rows} WHERE {PAIR_FILTER}", *db.pair_args())
    info["sampled"], info["size"], info["comparable"] = True, int(row[0]), int(row[1])
    info["fraction"] = info["size"] / population
    return info


@dataclass(frozen=True)
class KeptKeys:
    """The summarized hours whose kept sample keys serve the draw, and where they end."""

    hours: list[datetime]
    ranges: list[tuple[datetime, datetime]]
    """The rest of the window, drawn from every request."""
    last_k: int
    """Keys up to this one are all kept (for every hour that kept only some)."""


async def _kept_keys(db: Snapshot, max_pairs: int) -> KeptKeys | None:
    """The kept keys that serve this draw, if they do: the default seed, at most
    ``SAMPLE_KEYS`` requests, and summarized hours in the window."""
    if db.scope.seed != rollups.SAMPLE_SEED or max_pairs > rollups.SAMPLE_KEYS:
        return None
    parts = await summaries.parts(db)
    if not parts.overlapping:
        return None
    limits = await db.fetch(
        "SELECT hour, complete, last_k FROM shadowproxy.sample_key_limits "
        "WHERE route = $1 AND hour = ANY($2::timestamptz[])",
        db.scope.route, parts.overlapping)
    last_k = min([int(r["last_k"]) for r in limits if not r["complete"]], default=_MAX_KEY)
    return KeptKeys(parts.overlapping, parts.unsummarized, last_k)


def _candidates(db: Snapshot, kept: KeptKeys | None) -> str:
    """The window's requests of the selected configuration version with their keys, up to
    the cut-off $6: from the kept keys of summarized hours and the rows elsewhere, or from
    every request of the window."""
    rows = (f"SELECT q.id, q.received_at, {_KEY} AS k FROM shadowproxy.requests q "
            f"WHERE q.route = $1 AND q.received_at >= {{a}} AND q.received_at < {{b}} "
            f"AND {VERSION_FILTER} AND {_KEY} <= $6")
    if kept is None:
        return rows.format(a="$3", b="$4")
    hours = ", ".join(f"'{h.isoformat()}'::timestamptz" for h in kept.hours)
    # The request row is read only for a --config-version (every version is taken else).
    version = ("" if db.scope.config_version is None else
               f"""AND EXISTS (SELECT 1 FROM shadowproxy.requests q WHERE q.id = s.id
                               AND q.received_at = s.received_at AND {VERSION_FILTER})""")
    parts = [f"""
        SELECT s.id, s.received_at, s.k FROM shadowproxy.sample_keys s
        WHERE s.route = $1 AND s.hour IN ({hours}) AND s.received_at >= $3
          AND s.received_at < $4 AND s.k <= $6 {version}
          AND $5::bigint IS NOT NULL"""]  # (the seed, which the kept keys were made with)
    for a, b in kept.ranges:
        parts.append(rows.format(a=f"'{a.isoformat()}'::timestamptz",
                                 b=f"'{b.isoformat()}'::timestamptz"))
    return " UNION ALL ".join(parts)


def requests_filter(db: Snapshot) -> str:
    """A WHERE condition on ``shadowproxy.requests q`` that keeps the requests the data
    checks read when the report samples: in either window (the report's, and the earlier
    one that serves as the reference), every request whose seeded key is at most the
    largest drawn key. Both windows are cut at the same key over the same population, every
    request of the route as an unsampled report reads them: the drawn requests alone are
    those with a pair for the shadow, which a shadow's ``sample_rate`` or a sticky
    ``sample_key`` makes a share of the requests (and of the users), while the earlier
    window had every request; the drawn requests are among those kept, so feature slices
    still find theirs. ``true`` when the report does not sample."""
    info = db.sample
    if info is None or not info["sampled"]:
        return "true"
    key = f"hashtextextended(q.id::text, {int(db.scope.seed)})"
    return f"{key} <= (SELECT max(k) FROM {SAMPLE_TABLE})"


def estimate(k: int, n: int, population: int) -> Estimate:
    """How many of ``population`` units have a property that ``k`` of a uniform sample of
    ``n`` have: the scaled count and a 95% Wilson interval, narrowed by the finite-population
    correction (the sample is drawn without replacement)."""
    if n <= 0:
        return Estimate(in_sample=k, of_sample=n, estimate=0, ci_low=0, ci_high=population,
                        ci_level=0.95)
    p = k / n
    fpc = math.sqrt(max(population - n, 0) / max(population - 1, 1))
    z = _Z95 * fpc
    if z == 0:
        lo = hi = p
    else:
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = max(centre - half, 0.0), min(centre + half, 1.0)
    return Estimate(in_sample=k, of_sample=n, estimate=round(p * population),
                    ci_low=math.floor(lo * population), ci_high=math.ceil(hi * population),
                    ci_level=0.95)
