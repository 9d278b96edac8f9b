"""The report's only reader of the store: counting, percentiles, histograms and joins in SQL.

One ``ReportQuery`` holds one connection for one report. It extracts what the report needs
into session temporary tables (``_src``/``_pred`` predictions, ``_feat`` features, ``_slice``
slice membership, ``_fd`` per-field differences) and answers aggregate questions on them;
only samples that a statistical test needs (at most ``thresholds.sample_max`` rows, chosen by
a seeded hash of the record id, so a report is reproducible) come back to Python.

asyncpg errors are translated here: a jsonpath or slice expression PostgreSQL rejects becomes
a ``UsageError`` naming the configuration key; anything else a ``DatabaseError``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from shadowproxy.compare.config import CompareConfig, SliceConfig
from shadowproxy.compare.extract import (
    configured_jsonpaths,
    feature_rows_sql,
    flatten_cte,
    ignore_regex,
    literal,
)
from shadowproxy.errors import DatabaseError, UsageError

LEVELS = [i / 100 for i in range(101)]
HIST_BINS = 30
SCATTER_BINS = 20
_SAMPLE_BASE = 1_000_000


@dataclass(frozen=True)
class Window:
    """A half-open time window [start, end) of recorded requests."""

    start: datetime
    end: datetime

    def earlier(self) -> Window:
        """The window of the same length just before this one."""
        return Window(self.start - (self.end - self.start), self.start)


def _pair_filter() -> str:
    return "route = $1 AND shadow_name = $2 AND received_at >= $3 AND received_at < $4"


_COMPARABLE = ("primary_status BETWEEN 200 AND 299 AND shadow_status BETWEEN 200 AND 299 "
               "AND primary_body_json IS NOT NULL AND shadow_body_json IS NOT NULL")


def _floats(values: Sequence[Any]) -> list[float | None]:
    return [None if v is None else float(v) for v in values]


class ReportQuery:
    """Aggregates over the pairs of one route and shadow in one window."""

    def __init__(self, conn: asyncpg.Connection, route: str, shadow: str, window: Window,
                 compare: CompareConfig, *, seed: int = 0) -> None:
        self.conn = conn
        self.route = route
        self.shadow = shadow
        self.window = window
        self.compare = compare
        self.seed = seed
        self._sample_max = compare.thresholds.sample_max

    # -- plumbing --------------------------------------------------------------------------

    def _args(self, shadow: str | None = None) -> tuple[Any, ...]:
        return (self.route, shadow or self.shadow, self.window.start, self.window.end)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return list(await self.conn.fetch(sql, *args))
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"a report query failed: {exc}") from exc

    async def _execute(self, sql: str, *args: Any) -> None:
        try:
            await self.conn.execute(sql, *args)
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"a report query failed: {exc}") from exc

    def _sample_clause(self, n: int, key: str) -> str:
        """A WHERE fragment keeping about sample_max of n rows, by a seeded hash of ``key``."""
        if n <= self._sample_max:
            return "true"
        keep = int(_SAMPLE_BASE * self._sample_max / n)
        return (f"abs(hashtextextended({key}, {int(self.seed)}) % {_SAMPLE_BASE}) < {keep}")

    # -- validation ------------------------------------------------------------------------

    async def validate(self) -> None:
        """Ask PostgreSQL to parse every configured jsonpath and slice before any real work."""
        for key, path in configured_jsonpaths(self.compare).items():
            try:
                await self.conn.fetchval("SELECT $1::text::jsonpath", path)
            except asyncpg.PostgresError as exc:
                raise UsageError(
                    f"{key}: PostgreSQL rejects the jsonpath {path!r}: {exc}; write it in "
                    "PostgreSQL's SQL/JSON path syntax, e.g. '$.prediction' or "
                    "'$.predictions[*]'") from exc
        for i, path in enumerate(self.compare.ignore):
            ignore_regex(path, f"compare.ignore[{i}]")
        for name, spec in self.compare.slices.items():
            if isinstance(spec, str):
                try:
                    await self.conn.fetch(
                        f"SELECT ({spec})::boolean FROM shadowproxy.pairs LIMIT 0")
                except asyncpg.PostgresError as exc:
                    raise UsageError(
                        f"compare.slices.{name}: PostgreSQL rejects the condition {spec!r}: "
                        f"{exc}; a slice is a boolean SQL expression over the columns of "
                        "shadowproxy.pairs, e.g. "
                        "\"(request_body_json #>> '{features,sqft}')::float > 3000\"") from exc

    async def known_shadows(self) -> list[str]:
        """Shadow names recorded for the route (any time), to explain an unknown --shadow."""
        rows = await self._fetch(
            "SELECT DISTINCT r.target FROM shadowproxy.responses r JOIN shadowproxy.requests q "
            "ON q.id = r.request WHERE q.route = $1 AND r.role = 'shadow' ORDER BY 1",
            self.route)
        return [r[0] for r in rows]

    # -- counts and operational ------------------------------------------------------------

    async def counts(self) -> dict[str, Any]:
        """How many requests, pairs and complete pairs; how the shadow calls failed."""
        row = (await self._fetch(f"""
            SELECT
              (SELECT count(*) FROM shadowproxy.requests
                WHERE route = $1 AND received_at >= $3 AND received_at < $4) AS requests,
              count(*) AS pairs,
              count(*) FILTER (WHERE primary_status IS NOT NULL AND shadow_status IS NOT NULL)
                AS complete_pairs,
              count(*) FILTER (WHERE {_COMPARABLE}) AS comparable_pairs,
              count(*) FILTER (WHERE shadow_error LIKE 'timeout%') AS shadow_timeouts,
              count(*) FILTER (WHERE shadow_error LIKE 'dropped%') AS shadow_drops,
              count(*) FILTER (WHERE shadow_error LIKE 'skipped%') AS shadow_skips,
              count(*) FILTER (WHERE shadow_error IS NOT NULL AND shadow_error NOT LIKE 'timeout%'
                               AND shadow_error NOT LIKE 'dropped%'
                               AND shadow_error NOT LIKE 'skipped%') AS shadow_errors,
              count(*) FILTER (WHERE shadow_status >= 500) AS shadow_5xx,
              count(*) FILTER (WHERE primary_status IS NULL) AS primary_failures
            FROM shadowproxy.pairs WHERE {_pair_filter()}""", *self._args()))[0]
        out: dict[str, Any] = {k: int(v) for k, v in dict(row).items()}
        out["requests_without_pair"] = max(out["requests"] - out["pairs"], 0)
        out["pair_completeness"] = (out["complete_pairs"] / out["pairs"]) if out["pairs"] else None
        return out

    async def operational(self) -> dict[str, Any]:
        """Latency percentiles and error rates per side; status-code agreement; histograms."""
        row = (await self._fetch(f"""
            SELECT
              percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY primary_latency_ms)
                AS pq,
              percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY shadow_latency_ms)
                AS sq,
              avg(primary_latency_ms) AS pmean, avg(shadow_latency_ms) AS smean,
              max(primary_latency_ms) AS pmax, max(shadow_latency_ms) AS smax,
              count(primary_latency_ms) AS pn, count(shadow_latency_ms) AS sn,
              min(least(primary_latency_ms, shadow_latency_ms)) AS lo,
              max(greatest(primary_latency_ms, shadow_latency_ms)) AS hi,
              count(*) AS n,
              avg((primary_status IS NULL OR primary_status >= 500)::int) AS perr,
              count(*) FILTER (WHERE coalesce(shadow_error, '') NOT LIKE 'dropped%'
                               AND coalesce(shadow_error, '') NOT LIKE 'skipped%') AS s_called,
              count(*) FILTER (WHERE (shadow_status IS NULL OR shadow_status >= 500)
                               AND coalesce(shadow_error, '') NOT LIKE 'dropped%'
                               AND coalesce(shadow_error, '') NOT LIKE 'skipped%') AS s_failed,
              avg((primary_status = shadow_status)::int)
                FILTER (WHERE primary_status IS NOT NULL AND shadow_status IS NOT NULL)
                AS status_agreement
            FROM shadowproxy.pairs WHERE {_pair_filter()}""", *self._args()))[0]

        def side(q: Sequence[float | None] | None, mean: Any, mx: Any, n: int, err: Any
                 ) -> dict[str, Any]:
            q = q or [None, None, None]
            return {"n": n, "latency_ms": {"p50": q[0], "p95": q[1], "p99": q[2],
                                           "mean": mean, "max": mx}, "error_rate": err}

        s_err = row["s_failed"] / row["s_called"] if row["s_called"] else None
        out: dict[str, Any] = {
            "primary": side(row["pq"], row["pmean"], row["pmax"], row["pn"],
                            float(row["perr"]) if row["perr"] is not None else None),
            "shadow": side(row["sq"], row["smean"], row["smax"], row["sn"], s_err),
            "status_agreement": (float(row["status_agreement"])
                                 if row["status_agreement"] is not None else None),
        }
        out["status_pairs"] = [
            {"primary": r[0], "shadow": r[1], "n": r[2]} for r in await self._fetch(
                f"SELECT primary_status, shadow_status, count(*) FROM shadowproxy.pairs "
                f"WHERE {_pair_filter()} GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 20",
                *self._args())]
        lo, hi = row["lo"], row["hi"]
        if lo is not None and hi is not None:
            lo, hi = max(float(lo), 0.01), max(float(hi), 0.01)
            edges = list(np.geomspace(lo, hi * 1.000001 if hi > lo else lo * 1.01, HIST_BINS + 1))
            counts = await self._fetch(f"""
                SELECT side, least(width_bucket(ln(greatest(v, 0.01)), ln($5), ln($6), {HIST_BINS}),
                                   {HIST_BINS}) AS b, count(*)
                FROM (SELECT 'primary' AS side, primary_latency_ms AS v FROM shadowproxy.pairs
                      WHERE {_pair_filter()}
                      UNION ALL
                      SELECT 'shadow', shadow_latency_ms FROM shadowproxy.pairs
                      WHERE {_pair_filter()}) x
                WHERE v IS NOT NULL GROUP BY 1, 2""", *self._args(), edges[0], edges[-1])
            series: dict[str, list[int]] = {"primary": [0] * HIST_BINS,
                                             "shadow": [0] * HIST_BINS}
            for side_name, b, n in counts:
                series[side_name][max(b, 1) - 1] += n
            out["latency_histogram"] = {"edges": [float(e) for e in edges], **series,
                                        "scale": "log"}
        return out

    # -- predictions -----------------------------------------------------------------------

    async def load_predictions(self, shadow: str | None = None, table: str = "_pred") -> None:
        """Extract the paired predictions (element by element for batches) into ``table``."""
        path = literal(self.compare.prediction)
        score = literal(self.compare.score) if self.compare.score else None
        score_cols = (f", jsonb_path_query_array(primary_body_json, {score}::jsonpath) AS psa,"
                      f" jsonb_path_query_array(shadow_body_json, {score}::jsonpath) AS ssa"
                      if score else ", NULL::jsonb AS psa, NULL::jsonb AS ssa")
        await self._execute(f"DROP TABLE IF EXISTS {table}_src; DROP TABLE IF EXISTS {table}")
        await self._execute(f"""
            CREATE TEMP TABLE {table}_src AS
            SELECT id, request_id, received_at,
                   jsonb_path_query_array(primary_body_json, {path}::jsonpath) AS pa,
                   jsonb_path_query_array(shadow_body_json, {path}::jsonpath) AS sa
                   {score_cols}
            FROM shadowproxy.pairs WHERE {_pair_filter()} AND {_COMPARABLE}""",
            *self._args(shadow))
        await self._execute(f"""
            CREATE TEMP TABLE {table} AS
            SELECT id, request_id, received_at, i + 1 AS ord, pa -> i AS p, sa -> i AS s,
                   CASE WHEN jsonb_typeof(pa -> i) = 'number' THEN (pa ->> i)::float8 END AS pn,
                   CASE WHEN jsonb_typeof(sa -> i) = 'number' THEN (sa ->> i)::float8 END AS sn,
                   pa ->> i AS pt, sa ->> i AS st,
                   CASE WHEN jsonb_typeof(psa -> i) = 'number' THEN (psa ->> i)::float8 END AS ps,
                   CASE WHEN jsonb_typeof(ssa -> i) = 'number' THEN (ssa ->> i)::float8 END AS ss
            FROM {table}_src,
                 generate_series(0, greatest(jsonb_array_length(pa), jsonb_array_length(sa)) - 1)
                 AS i;
            CREATE INDEX ON {table} (request_id);
            ANALYZE {table}""")

    async def prediction_shape(self) -> dict[str, Any]:
        """What the predictions look like: counts, types, distinct values (for the task)."""
        src = (await self._fetch("""
            SELECT count(*) AS pairs,
                   count(*) FILTER (WHERE jsonb_array_length(pa) = 0) AS no_primary,
                   count(*) FILTER (WHERE jsonb_array_length(sa) = 0) AS no_shadow,
                   count(*) FILTER (WHERE jsonb_array_length(pa) <> jsonb_array_length(sa))
                     AS length_mismatch
            FROM _pred_src"""))[0]
        row = (await self._fetch("""
            SELECT count(*) FILTER (WHERE p IS NOT NULL AND s IS NOT NULL) AS n,
                   count(*) FILTER (WHERE (p IS NULL) <> (s IS NULL)) AS unpaired,
                   count(*) FILTER (WHERE pn IS NOT NULL AND sn IS NOT NULL) AS n_numeric,
                   count(DISTINCT pt) AS p_distinct,
                   coalesce(bool_and(pn = trunc(pn)) FILTER (WHERE pn IS NOT NULL), true)
                     AS integral
            FROM _pred"""))[0]
        return {**{k: int(v) for k, v in dict(src).items()}, "n": int(row["n"]),
                "unpaired_elements": int(row["unpaired"]), "n_numeric": int(row["n_numeric"]),
                "distinct_primary": int(row["p_distinct"]), "integral": bool(row["integral"])}

    async def regression_summary(self) -> dict[str, Any]:
        """Exact aggregates of the numeric pairs: errors, correlation, quantiles, histograms."""
        at, rt = self.compare.abs_tolerance, self.compare.rel_tolerance
        row = (await self._fetch("""
            SELECT count(*) AS n, avg(abs(sn - pn)) AS mae, sqrt(avg((sn - pn) ^ 2)) AS rmse,
                   max(abs(sn - pn)) AS max_abs_diff, avg(sn - pn) AS mean_diff,
                   stddev_samp(sn - pn) AS sd_diff, corr(pn, sn) AS pearson,
                   avg((abs(sn - pn) <= greatest($1, $2 * greatest(abs(pn), abs(sn))))::int)
                     AS within_tolerance,
                   percentile_cont($3::float8[]) WITHIN GROUP (ORDER BY pn) AS pq,
                   percentile_cont($3::float8[]) WITHIN GROUP (ORDER BY sn) AS sq,
                   percentile_cont($3::float8[]) WITHIN GROUP (ORDER BY sn - pn) AS dq,
                   avg(pn) AS pmean, stddev_samp(pn) AS psd, avg(sn) AS smean,
                   stddev_samp(sn) AS ssd
            FROM _pred WHERE pn IS NOT NULL AND sn IS NOT NULL""", at, rt, LEVELS))[0]
        out: dict[str, Any] = {k: (float(row[k]) if row[k] is not None else None)
                               for k in ("mae", "rmse", "max_abs_diff", "mean_diff", "sd_diff",
                         "within_tolerance")}
        out["n"] = int(row["n"])
        out["pearson_sql"] = float(row["pearson"]) if row["pearson"] is not None else None
        if not out["n"]:
            return out
        pq, sq, dq = _floats(row["pq"]), _floats(row["sq"]), _floats(row["dq"])
        out["median_diff"] = dq[50]
        out["quantiles"] = {"levels": LEVELS, "primary": pq, "shadow": sq, "diff": dq}
        for name, q, mean, sd in (("primary", pq, row["pmean"], row["psd"]),
                                  ("shadow", sq, row["smean"], row["ssd"])):
            out[name] = {"mean": float(mean), "sd": None if sd is None else float(sd),
                         "min": q[0], "p5": q[5], "p25": q[25], "median": q[50], "p75": q[75],
                         "p95": q[95], "max": q[100]}
        lo, hi = min(pq[0] or 0, sq[0] or 0), max(pq[100] or 0, sq[100] or 0)
        out["histogram"] = await self._histogram2("pn", "sn", lo, hi)
        out["diff_histogram"] = await self._histogram1("sn - pn", dq[0] or 0, dq[100] or 0)
        out["scatter"] = await self._scatter(lo, hi)
        out["worst"] = [
            {"request_id": r["request_id"], "index": r["ord"], "primary": r["pn"],
             "shadow": r["sn"], "abs_diff": r["d"]}
            for r in await self._fetch("""
                SELECT request_id, ord, pn, sn, abs(sn - pn) AS d FROM _pred
                WHERE pn IS NOT NULL AND sn IS NOT NULL
                ORDER BY abs(sn - pn) DESC, request_id LIMIT 10""")]
        return out

    def _edges(self, lo: float, hi: float, bins: int) -> list[float]:
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        return [float(x) for x in np.linspace(lo, hi, bins + 1)]

    async def _histogram1(self, expr: str, lo: float, hi: float) -> dict[str, Any]:
        edges = self._edges(lo, hi, HIST_BINS)
        counts = [0] * HIST_BINS
        for b, n in await self._fetch(f"""
                SELECT least(greatest(width_bucket({expr}, $1, $2, {HIST_BINS}), 1), {HIST_BINS}),
                       count(*) FROM _pred WHERE pn IS NOT NULL AND sn IS NOT NULL GROUP BY 1""",
                                      edges[0], edges[-1]):
            counts[b - 1] += n
        return {"edges": edges, "counts": counts}

    async def _histogram2(self, a: str, b: str, lo: float, hi: float) -> dict[str, Any]:
        edges = self._edges(lo, hi, HIST_BINS)
        out: dict[str, Any] = {"edges": edges}
        for name, expr in (("primary", a), ("shadow", b)):
            out[name] = (await self._histogram1(expr, lo, hi))["counts"]
        return out

    async def _scatter(self, lo: float, hi: float) -> dict[str, Any]:
        edges = self._edges(lo, hi, SCATTER_BINS)
        counts = [[0] * SCATTER_BINS for _ in range(SCATTER_BINS)]
        k = SCATTER_BINS
        for x, y, n in await self._fetch(f"""
                SELECT least(greatest(width_bucket(pn, $1, $2, {k}), 1), {k}),
                       least(greatest(width_bucket(sn, $1, $2, {k}), 1), {k}), count(*)
                FROM _pred WHERE pn IS NOT NULL AND sn IS NOT NULL GROUP BY 1, 2""",
                                         edges[0], edges[-1]):
            counts[y - 1][x - 1] += n
        return {"x_edges": edges, "y_edges": edges, "counts": counts,
                "x": "primary", "y": "shadow"}

    async def regression_sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Paired numeric predictions for the tests: all, or a seeded sample of sample_max."""
        rows = await self._fetch(
            "SELECT pn, sn FROM _pred WHERE pn IS NOT NULL AND sn IS NOT NULL AND "
            + self._sample_clause(n, "id::text || ':' || ord"))
        arr = np.array([(r[0], r[1]) for r in rows], dtype=np.float64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    async def flip_matrix(self) -> list[tuple[str, str, int]]:
        """(primary class, shadow class, count) over the paired predictions."""
        rows = await self._fetch(
            "SELECT pt, st, count(*) FROM _pred WHERE pt IS NOT NULL AND st IS NOT NULL "
            "GROUP BY 1, 2 ORDER BY 1, 2")
        return [(r[0], r[1], int(r[2])) for r in rows]

    async def disagreements(self, limit: int = 10) -> list[dict[str, Any]]:
        """Example pairs whose predicted classes differ, with request ids."""
        return [{"request_id": r[0], "index": r[1], "primary": r[2], "shadow": r[3]}
                for r in await self._fetch(
                    "SELECT request_id, ord, pt, st FROM _pred WHERE pt <> st "
                    f"ORDER BY received_at, request_id, ord LIMIT {int(limit)}")]

    # -- labels ----------------------------------------------------------------------------

    _LABEL = ("CASE WHEN jsonb_typeof(l.label) = 'array' THEN l.label ->> (p.ord::int - 1) "
              "WHEN p.ord = 1 THEN l.label #>> '{}' END")

    async def label_counts(self) -> dict[str, int]:
        """How many predictions have a label (per side and for both)."""
        row = (await self._fetch(f"""
            SELECT count(*) AS n,
                   count(y) FILTER (WHERE p IS NOT NULL) AS primary_labelled,
                   count(y) FILTER (WHERE s IS NOT NULL) AS shadow_labelled,
                   count(y) FILTER (WHERE p IS NOT NULL AND s IS NOT NULL) AS both_labelled
            FROM (SELECT p.p, p.s, {self._LABEL} AS y FROM _pred p
                  LEFT JOIN shadowproxy.labels l ON l.request_id = p.request_id) x"""))[0]
        return {k: int(v) for k, v in dict(row).items()}

    async def labelled_rows(self, n: int) -> list[asyncpg.Record]:
        """(y, pt, st, pn, sn, ps, ss) of rows labelled for both sides (sampled if many)."""
        return await self._fetch(f"""
            SELECT y, pt, st, pn, sn, ps, ss FROM (
              SELECT {self._LABEL} AS y, p.* FROM _pred p
              JOIN shadowproxy.labels l ON l.request_id = p.request_id) x
            WHERE y IS NOT NULL AND pt IS NOT NULL AND st IS NOT NULL
              AND {self._sample_clause(n, "id::text || ':' || ord")}""")

    # -- features --------------------------------------------------------------------------

    async def load_features(self, window: Window, tag: str) -> None:
        """Extract every configured feature of the route's requests in ``window`` into _feat."""
        await self._execute("""
            CREATE TEMP TABLE IF NOT EXISTS _feat (
                tag text, id uuid, ord bigint, name text, v jsonb, num float8, txt text)""")
        fmt = self.compare.request_format
        for name, feature in self.compare.features.items():
            rows_sql = feature_rows_sql(feature, fmt, "q.body_json")
            await self._execute(f"""
                INSERT INTO _feat
                SELECT $4, q.id, coalesce(f.ord, 1), $5, f.v,
                       CASE WHEN jsonb_typeof(f.v) = 'number' THEN (f.v #>> '{{}}')::float8 END,
                       CASE WHEN f.v IS NOT NULL AND f.v <> 'null'::jsonb THEN f.v #>> '{{}}'
                       END
                FROM shadowproxy.requests q LEFT JOIN LATERAL {rows_sql} f ON true
                WHERE q.route = $1 AND q.received_at >= $2 AND q.received_at < $3""",
                                self.route, window.start, window.end, tag, name)

    async def index_features(self) -> None:
        await self._execute("CREATE INDEX IF NOT EXISTS _feat_name ON _feat (name, tag); "
                            "ANALYZE _feat")

    async def feature_summary(self, name: str, tag: str, *, allowed: list[str] | None,
                              allowed_numeric: list[float] | None, lo: float | None,
                              hi: float | None) -> dict[str, Any]:
        """Counts, missing values, basic statistics and value-check counts of one feature."""
        row = (await self._fetch("""
            SELECT count(*) AS n_rows, count(*) FILTER (WHERE txt IS NULL) AS n_missing,
                   count(num) AS n_numeric, count(DISTINCT txt) AS n_unique,
                   avg(num) AS mean, percentile_cont(0.5) WITHIN GROUP (ORDER BY num) AS median,
                   stddev_samp(num) AS sd, min(num) AS min, max(num) AS max,
                   count(*) FILTER (WHERE num = 0) AS n_zero,
                   count(*) FILTER (WHERE num < $3 OR num > $4) AS n_out_of_range,
                   count(*) FILTER (WHERE txt IS NOT NULL AND $5::text[] IS NOT NULL
                                    AND ($6::float8[] IS NULL OR num IS NULL
                                         OR num <> ALL($6::float8[]))
                                    AND txt <> ALL($5::text[])) AS n_not_allowed
            FROM _feat WHERE name = $1 AND tag = $2""",
            name, tag, lo, hi, allowed, allowed_numeric))[0]
        return dict(row)

    async def feature_counts(self, name: str, tag: str, limit: int = 1000
                             ) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT txt, count(*) FROM _feat WHERE name = $1 AND tag = $2 AND txt IS NOT NULL "
            f"GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {int(limit)}", name, tag)
        return {r[0]: int(r[1]) for r in rows}

    async def feature_sample(self, name: str, tag: str, n: int) -> np.ndarray:
        rows = await self._fetch(
            "SELECT num FROM _feat WHERE name = $1 AND tag = $2 AND num IS NOT NULL AND "
            + self._sample_clause(n, "id::text || ':' || ord"), name, tag)
        return np.array([r[0] for r in rows], dtype=np.float64)

    async def feature_histogram(self, name: str, tag: str, edges: list[float]) -> list[int]:
        k = len(edges) - 1
        counts = [0] * k
        for b, n in await self._fetch(f"""
                SELECT least(greatest(width_bucket(num, $3, $4, {k}), 1), {k}), count(*)
                FROM _feat WHERE name = $1 AND tag = $2 AND num IS NOT NULL GROUP BY 1""",
                                      name, tag, edges[0], edges[-1]):
            counts[b - 1] += n
        return counts

    async def count_outside(self, name: str, tag: str, lo: float, hi: float) -> int:
        return int((await self._fetch(
            "SELECT count(*) FROM _feat WHERE name = $1 AND tag = $2 AND (num < $3 OR num > $4)",
            name, tag, lo, hi))[0][0])

    # -- slices ----------------------------------------------------------------------------

    async def load_slices(self) -> list[tuple[str, str]]:
        """Fill _slice(id, ord, family, slice); return the (family, slice) pairs found."""
        await self._execute("DROP TABLE IF EXISTS _slice; CREATE TEMP TABLE _slice "
                            "(id uuid, ord bigint, family text, slice text)")
        for family, spec in self.compare.slices.items():
            if isinstance(spec, str):
                try:
                    await self.conn.execute(f"""
                        INSERT INTO _slice SELECT id, NULL, $5, $5 FROM shadowproxy.pairs
                        WHERE {_pair_filter()} AND ({spec})""", *self._args(), family)
                except asyncpg.PostgresError as exc:
                    raise UsageError(f"compare.slices.{family}: PostgreSQL failed evaluating "
                                     f"{spec!r}: {exc}") from exc
            else:
                await self._feature_slices(family, spec)
        await self._execute("CREATE INDEX ON _slice (id); ANALYZE _slice")
        rows = await self._fetch("SELECT DISTINCT family, slice FROM _slice ORDER BY 1, 2")
        return [(r[0], r[1]) for r in rows]

    async def _feature_slices(self, family: str, spec: SliceConfig) -> None:
        if spec.bins:
            edges = spec.bins
            cases = []
            for i, (a, b) in enumerate(itertools.pairwise(edges)):
                last = i == len(edges) - 2
                op = "<=" if last else "<"
                label = f"{spec.feature} in [{a:g}, {b:g}{']' if last else ')'}"
                cases.append(f"WHEN num >= {float(a)!r} AND num {op} {float(b)!r} "
                             f"THEN {literal(label)}")
            expr = "CASE " + " ".join(cases) + " END"
            await self._execute(f"""
                INSERT INTO _slice SELECT id, ord, $2, s FROM
                (SELECT id, ord, {expr} AS s FROM _feat WHERE name = $1 AND tag = 'current') x
                WHERE s IS NOT NULL""", spec.feature, family)
        else:
            await self._execute("""
                INSERT INTO _slice SELECT f.id, f.ord, $2, $1 || ' = ' || f.txt FROM _feat f
                JOIN (SELECT txt FROM _feat WHERE name = $1 AND tag = 'current'
                        AND txt IS NOT NULL GROUP BY txt ORDER BY count(*) DESC, txt LIMIT 20) t
                  ON t.txt = f.txt
                WHERE f.name = $1 AND f.tag = 'current'""", spec.feature, family)

    async def slice_rows(self, n: int, regression: bool) -> list[asyncpg.Record]:
        """Sampled prediction rows with their label and the slices each belongs to."""
        value = "pn, sn" if regression else "pt, st"
        return await self._fetch(f"""
            SELECT {value}, {self._LABEL} AS y,
                   coalesce((SELECT array_agg(DISTINCT s.slice) FROM _slice s
                             WHERE s.id = p.id AND (s.ord IS NULL OR s.ord = p.ord)),
                            '{{}}') AS slices
            FROM _pred p LEFT JOIN shadowproxy.labels l ON l.request_id = p.request_id
            WHERE {"pn IS NOT NULL AND sn IS NOT NULL" if regression
                   else "pt IS NOT NULL AND st IS NOT NULL"}
              AND {self._sample_clause(n, "p.id::text || ':' || p.ord")}""")

    async def slice_summary(self, regression: bool) -> list[asyncpg.Record]:
        """Exact per-slice aggregates over every paired prediction."""
        join = ("FROM _pred p JOIN _slice s ON s.id = p.id AND (s.ord IS NULL OR s.ord = p.ord)")
        if regression:
            return await self._fetch(f"""
                SELECT s.family, s.slice, count(*) AS n, avg(abs(sn - pn)) AS mae,
                       sqrt(avg((sn - pn) ^ 2)) AS rmse, avg(sn - pn) AS mean_diff,
                       avg((abs(sn - pn) <= greatest($1, $2 * greatest(abs(pn), abs(sn))))::int)
                         AS within_tolerance
                {join} WHERE pn IS NOT NULL AND sn IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2""",
                self.compare.abs_tolerance, self.compare.rel_tolerance)
        return await self._fetch(f"""
            SELECT s.family, s.slice, count(*) AS n, avg((pt = st)::int) AS agreement
            {join} WHERE pt IS NOT NULL AND st IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2""")

    async def noise_summary(self, table: str) -> dict[str, Any]:
        """How far the baseline shadow's predictions are from the primary's: the noise floor."""
        row = (await self._fetch(f"""
            SELECT count(*) FILTER (WHERE pt IS NOT NULL AND st IS NOT NULL) AS n,
                   avg((pt = st)::int) AS agreement, avg(abs(sn - pn)) AS mae,
                   sqrt(avg((sn - pn) ^ 2)) AS rmse, max(abs(sn - pn)) AS max_abs_diff
            FROM {table}"""))[0]
        return {k: (None if v is None else (int(v) if k == "n" else float(v)))
                for k, v in dict(row).items()}

    # -- field diff ------------------------------------------------------------------------

    async def load_field_diff(self, tag: str, n: int, shadow: str | None = None) -> int:
        """Flatten both responses of the comparable pairs and record which fields differ.

        Above ``sample_max`` pairs a seeded hash sample of them is compared (flattening JSON
        is the report's most expensive step); returns how many pairs were compared.
        """
        regexes = [ignore_regex(p) for p in self.compare.ignore]
        sample = self._sample_clause(n, "id::text")
        await self._execute(
            "CREATE TEMP TABLE IF NOT EXISTS _fd (tag text, id uuid, field text, d boolean)")
        await self._execute(f"""
            WITH RECURSIVE
            base AS (SELECT id, primary_body_json AS pj, shadow_body_json AS sj
                     FROM shadowproxy.pairs
                     WHERE {_pair_filter()} AND {_COMPARABLE} AND {sample}),
            src AS (SELECT id, 'p' AS side, pj AS doc FROM base
                    UNION ALL SELECT id, 's', sj FROM base),
            {flatten_cte("src")},
            kept AS (SELECT * FROM leaves WHERE NOT (path ~ ANY($5::text[]))),
            cmp AS (
                SELECT coalesce(a.id, b.id) AS id, coalesce(a.field, b.field) AS field,
                  CASE WHEN a.v IS NULL OR b.v IS NULL THEN true
                       WHEN jsonb_typeof(a.v) = 'number' AND jsonb_typeof(b.v) = 'number' THEN
                         abs((a.v #>> '{{}}')::numeric - (b.v #>> '{{}}')::numeric)
                         > greatest($6::numeric, $7::numeric * greatest(
                             abs((a.v #>> '{{}}')::numeric), abs((b.v #>> '{{}}')::numeric)))
                       ELSE a.v <> b.v END AS differs
                FROM (SELECT * FROM kept WHERE side = 'p') a
                FULL JOIN (SELECT * FROM kept WHERE side = 's') b
                  ON a.id = b.id AND a.path = b.path)
            INSERT INTO _fd SELECT $8, id, field, bool_or(differs) FROM cmp GROUP BY id, field
            """, *self._args(shadow), regexes, self.compare.abs_tolerance,
            self.compare.rel_tolerance, tag)
        if n <= self._sample_max:
            return n
        return int((await self._fetch(
            f"SELECT count(*) FROM shadowproxy.pairs WHERE {_pair_filter()} AND {_COMPARABLE} "
            f"AND {sample}", *self._args(shadow)))[0][0])

    async def field_diff(self, tag: str) -> list[asyncpg.Record]:
        """Per field: pairs where it is present, pairs where it differs, example request ids."""
        await self._execute("CREATE INDEX IF NOT EXISTS _fd_tag ON _fd (tag, id); ANALYZE _fd")
        return await self._fetch("""
            SELECT f.field, count(*) AS n_present, count(*) FILTER (WHERE f.d) AS n_differ,
                   (array_agg(q.request_id ORDER BY q.received_at, q.request_id)
                      FILTER (WHERE f.d))[1:3] AS examples
            FROM _fd f JOIN shadowproxy.requests q ON q.id = f.id
            WHERE f.tag = $1 GROUP BY 1 ORDER BY 3 DESC, 1""", tag)

    async def pairs_differing(self, tag: str, exclude: list[str]) -> tuple[int, int]:
        """Pairs with any differing field, and with any outside the ``exclude`` (noise) fields."""
        row = (await self._fetch("""
            SELECT count(DISTINCT id) FILTER (WHERE d),
                   count(DISTINCT id) FILTER (WHERE d AND field <> ALL($2::text[]))
            FROM _fd WHERE tag = $1""", tag, exclude))[0]
        return int(row[0]), int(row[1])

    async def worst_diff_pairs(self, tag: str, exclude: list[str], limit: int = 5
                               ) -> list[dict[str, Any]]:
        rows = await self._fetch(f"""
            SELECT q.request_id, count(*) AS n, array_agg(f.field ORDER BY f.field) AS fields
            FROM _fd f JOIN shadowproxy.requests q ON q.id = f.id
            WHERE f.tag = $1 AND f.d AND f.field <> ALL($2::text[])
            GROUP BY q.request_id, q.id ORDER BY 2 DESC, 1 LIMIT {int(limit)}""", tag, exclude)
        return [{"request_id": r[0], "fields_differing": int(r[1]), "fields": list(r[2])[:20]}
                for r in rows]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``15m``, ``1h``, ``7d``; UsageError otherwise."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"expected a duration such as 30s, 15m, 1h, 7d or 2w (got {text!r})")
    return float(m.group(1)) * _UNITS[m.group(2)]
