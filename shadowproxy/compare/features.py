"""The report's ``data_checks`` section: the live inputs against a reference.

``load`` extracts every configured feature of the window's requests (and, without a
reference file, of the window of the same length just before) into a scratch table and
returns a ``Features`` handle, which the slices section takes for its feature slices.
``build`` assembles the section: per feature, counts and value checks in SQL, the category
counts, the value checks of ``checks.py``, and every row's value with its request (a
seeded sample of whole requests, about ``sample_max`` rows; a reference file's whole
column, each row its own unit), which go to ``drift.window_drift`` together: the one place
where drift is decided. Then the histograms and quantiles for the plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, Required, TypedDict, cast

import numpy as np

from shadowproxy.compare import checks, stats
from shadowproxy.compare.config import FeatureConfig
from shadowproxy.compare.drift import DriftPolicy, Kind, Sample, window_drift
from shadowproxy.compare.extract import category_sql, feature_rows_sql, float8_sql
from shadowproxy.compare.operational import HIST_BINS
from shadowproxy.compare.reference import (
    FeatureData,
    category_text,
    column,
    from_summary,
    read_reference,
)
from shadowproxy.compare.sampling import requests_filter
from shadowproxy.compare.snapshot import VERSION_FILTER, Scratch, Snapshot
from shadowproxy.compare.window import Window

FEATURES = "_feat"
CURRENT, REFERENCE = "current", "reference"
SCRATCH = (Scratch(FEATURES, "tag text, id uuid, ord bigint, name text, v jsonb, num float8, "
                             "txt text", indexes=("(name, tag)",)),)


@dataclass(frozen=True)
class Features:
    """The configured features, loaded in the scratch table ``table``.

    One row per value: ``tag`` (``current``, or ``reference`` for the earlier window),
    ``id`` (the request), ``ord`` (the row of a batch request, from 1), ``name``, ``v``
    (jsonb), ``num`` (a number, else NULL) and ``txt`` (the value as text, NULL if missing).
    """

    table: str
    names: tuple[str, ...]


class ReferenceInfo(TypedDict):
    kind: str
    path: NotRequired[str]
    start: NotRequired[str]
    end: NotRequired[str]


class DataChecksSection(TypedDict, total=False):
    """The JSON ``data_checks`` section; without features only ``why`` explains."""

    features: Required[list[dict[str, Any]]]
    n_features: Required[int]
    reference: Required[ReferenceInfo | None]
    value_check_failures: Required[dict[str, list[str]]]
    drifted: Required[list[str]]
    why: str
    n_tested: int
    tests: int
    drift_share: float | None
    dataset_drift: bool
    alpha: float
    correction: str


async def validate(db: Snapshot) -> None:
    """UsageError if PostgreSQL cannot parse a feature's jsonpath."""
    for name, feature in db.compare.features.items():
        if feature.path is not None:
            await db.check_jsonpath(f"compare.features.{name}.path", feature.path)


async def _load(db: Snapshot, window: Window, tag: str) -> None:
    """Extract every configured feature of the route's requests in ``window`` under ``tag``
    (of the ``--config-version`` in the report's window; of any in the earlier one); of the
    requests under the sample's key cut-off when the report samples
    (``sampling.requests_filter``)."""
    fmt = db.compare.request_format
    version = VERSION_FILTER if tag == CURRENT else "true"
    sampled = requests_filter(db)
    for name, feature in db.compare.features.items():
        rows_sql = feature_rows_sql(feature, fmt, "q.body_json")
        await db.execute(f"""
            INSERT INTO {FEATURES}
            SELECT $4, q.id, coalesce(f.ord, 1), $5, f.v,
                   {float8_sql('f.v')},
                   {category_sql('f.v')}
            FROM shadowproxy.requests q LEFT JOIN LATERAL {rows_sql} f ON true
            WHERE q.route = $1 AND q.received_at >= $2 AND q.received_at < $3
              AND {version} AND {sampled}""",
                         db.scope.route, window.start, window.end, tag, name)


async def load(db: Snapshot, *, earlier: bool) -> Features:
    """The window's features (and the earlier window's, as the reference, if ``earlier``)."""
    await _load(db, db.scope.window, CURRENT)
    if earlier:
        await _load(db, db.scope.window.earlier(), REFERENCE)
    await db.execute(f"ANALYZE {FEATURES}")
    return Features(FEATURES, tuple(db.compare.features))


async def _summary(db: Snapshot, name: str, tag: str, cfg: FeatureConfig | None
                   ) -> dict[str, Any]:
    """Counts, missing values, basic statistics and (with ``cfg``) value-check counts.

    A number beyond float8 (``num`` NULL: 1e400) is outside any finite configured bound on
    its side, so the range check counts it rather than letting it pass as no number."""
    allowed = allowed_num = None
    lo, hi = -math.inf, math.inf
    if cfg is not None:
        if cfg.allowed is not None:
            allowed = [category_text(a) for a in cfg.allowed]
        if cfg.allowed and all(isinstance(a, int | float) and not isinstance(a, bool)
                               for a in cfg.allowed):
            allowed_num = [float(a) for a in cfg.allowed]
        lo = cfg.min if cfg.min is not None else -math.inf
        hi = cfg.max if cfg.max is not None else math.inf
    def query(cast: str) -> str:
        return f"""
        SELECT count(*) AS n_rows, count(*) FILTER (WHERE txt IS NULL) AS n_missing,
               count(num) AS n_numeric, count(DISTINCT txt) AS n_unique,
               avg(num{cast}) AS mean,
               {"2 * percentile_cont(0.5) WITHIN GROUP (ORDER BY num * 0.5)" if cast else
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY num)"} AS median,
               stddev_samp(num{cast}) AS sd, min(num) AS min, max(num) AS max,
               count(*) FILTER (WHERE num = 0) AS n_zero,
               count(*) FILTER (WHERE num < $3 OR num > $4
                                OR CASE WHEN num IS NULL AND jsonb_typeof(v) = 'number'
                                        -- CASE: the cast only ever sees a number
                                        THEN v::numeric > 0 AND $4 < 'Infinity'::float8
                                             OR v::numeric < 0 AND $3 > '-Infinity'::float8
                                        ELSE false END)
                 AS n_out_of_range,
               count(*) FILTER (WHERE txt IS NOT NULL AND $5::text[] IS NOT NULL
                                AND ($6::float8[] IS NULL OR num IS NULL
                                     OR num <> ALL($6::float8[]))
                                AND txt <> ALL($5::text[])) AS n_not_allowed
        FROM {FEATURES} WHERE name = $1 AND tag = $2"""

    row = await db.fetchrow_wide(query, name, tag, lo, hi, allowed, allowed_num)
    summary = dict(row)
    for key in ("mean", "sd"):  # numeric when float8 overflowed (fetchrow_wide)
        if summary[key] is not None:
            summary[key] = float(summary[key])
    return summary


async def _data(db: Snapshot, name: str, tag: str, summary: dict[str, Any]) -> FeatureData:
    """One feature's values under ``tag``: the summary and the category counts."""
    data = from_summary(summary)
    data.counts = {r[0]: int(r[1]) for r in await db.fetch(
        f"SELECT txt, count(*) FROM {FEATURES} WHERE name = $1 AND tag = $2 "
        "AND txt IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1000", name, tag)}
    return data


async def _rows(db: Snapshot, name: str, tag: str, data: FeatureData, kind: Kind) -> Sample:
    """Every row of a seeded sample of whole requests: its value and its request.

    Missing values are rows too (NaN, or None for categories), so that the missing share is
    tested; whole requests are drawn so that the tests can take the request as the unit.
    The numeric sample for the plots is the present values among them.
    """
    value = "num" if kind == "numeric" else "txt"
    rows = await db.fetch(f"SELECT id::text, {value} FROM {FEATURES} WHERE name = $1 AND "
                          f"tag = $2 AND {db.sample_clause(data.n_rows, 'id::text')}",
                          name, tag)
    requests = np.array([r[0] for r in rows], dtype=object)
    if kind == "numeric":
        values = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
        data.sample = values[np.isfinite(values)]
        return Sample(values, requests)
    return Sample(np.array([r[1] for r in rows], dtype=object), requests)


def _empty(kind: Kind) -> Sample:
    return Sample(np.zeros(0, dtype=np.float64 if kind == "numeric" else object))


async def _histogram(db: Snapshot, name: str, tag: str, edges: list[float]) -> list[int]:
    k = len(edges) - 1
    counts = [0] * k
    for b, n in await db.fetch(f"""
            SELECT least(greatest(width_bucket(num, $3, $4, {k}), 1), {k}), count(*)
            FROM {FEATURES} WHERE name = $1 AND tag = $2 AND num IS NOT NULL GROUP BY 1""",
                               name, tag, edges[0], edges[-1]):
        counts[b - 1] += n
    return counts


async def build(db: Snapshot, reference: Path | None) -> tuple[Features, DataChecksSection]:
    """Load the features and check each against the reference file or the earlier window."""
    compare, th = db.compare, db.thresholds
    if not compare.features:
        return Features(FEATURES, ()), DataChecksSection(
            features=[], n_features=0, reference=None, why="no compare.features configured",
            value_check_failures={}, drifted=[])
    features = await load(db, earlier=reference is None)
    ref_file: dict[str, FeatureData] | None = None
    if reference is not None:
        ref_file = read_reference(reference, compare.features, sample_max=th.sample_max,
                                  seed=db.scope.seed)
        ref_info = ReferenceInfo(kind="file", path=str(reference))
    else:
        earlier = db.scope.window.earlier()
        ref_info = ReferenceInfo(kind="earlier_window", start=earlier.start.isoformat(),
                                 end=earlier.end.isoformat())
    results = []
    rows: dict[str, tuple[Kind, Sample, Sample]] = {}
    for name, cfg in compare.features.items():
        summary = await _summary(db, name, CURRENT, cfg)
        cur = await _data(db, name, CURRENT, summary)
        ref: FeatureData | None
        if ref_file is not None:
            ref = ref_file[name]
        else:
            ref = await _data(db, name, REFERENCE, await _summary(db, name, REFERENCE, None))
            if not ref.n_rows:
                ref = None
        outside = None
        if ref is not None and ref.stats["min"] is not None and cur.n_numeric:
            row = await db.fetchrow(
                f"SELECT count(*) FROM {FEATURES} WHERE name = $1 AND tag = $2 "
                "AND (num < $3 OR num > $4)", name, CURRENT, ref.stats["min"], ref.stats["max"])
            outside = int(row[0])
        check = checks.feature_check(
            name, cfg, cur, ref, n_not_allowed=int(summary["n_not_allowed"]),
            n_out_of_range=int(summary["n_out_of_range"]), n_outside_reference_range=outside)
        kind = checks.drift_kind(check["type"])
        current = await _rows(db, name, CURRENT, cur, kind)
        if ref is None:
            earlier_rows = _empty(kind)
        elif ref.values is not None:
            earlier_rows = Sample(column(ref.values, kind == "numeric"))
        else:
            earlier_rows = await _rows(db, name, REFERENCE, ref, kind)
        rows[name] = (kind, earlier_rows, current)
        if check["type"] in ("numeric", "sparse") and cur.n_numeric:
            await _plots(db, check, cur, ref, from_file=ref_file is not None)
        results.append(check)
    drift = window_drift(rows, DriftPolicy.from_thresholds(th, db.scope.seed))
    out = cast(DataChecksSection, checks.finish(results, drift))
    out["reference"] = ref_info
    return features, out


async def _plots(db: Snapshot, check: dict[str, Any], cur: FeatureData,
                 ref: FeatureData | None, *, from_file: bool) -> None:
    """The histogram (exact counts in SQL) and the quantiles (of the samples) of a feature."""
    name = check["name"]
    edges = checks.histogram_edges(cur, ref, HIST_BINS)
    hist: dict[str, Any] = {"edges": edges,
                            "current": await _histogram(db, name, CURRENT, edges)}
    if ref is not None and from_file:
        counts, _ = np.histogram(np.clip(ref.sample, edges[0], edges[-1]), bins=edges)
        hist["reference"] = [int(c) for c in counts]
        hist["reference_from"] = "sample" if ref.sample.size < ref.n_numeric else "all"
    elif ref is not None:
        hist["reference"] = await _histogram(db, name, REFERENCE, edges)
    check["histogram"] = hist
    levels = np.linspace(0, 1, 101)
    check["quantiles"] = {
        "levels": [float(x) for x in levels],
        "current": stats.quantiles(cur.sample, levels) if cur.sample.size else None,
        "reference": (stats.quantiles(ref.sample, levels)
                      if ref is not None and ref.sample.size else None)}
