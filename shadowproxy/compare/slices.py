"""The report's ``slices`` section: where in the input space the two models part.

Slice membership goes into a scratch table: a SQL slice (a boolean expression over the
``pairs`` columns) holds whole requests, a feature slice family holds the rows of a batch
whose feature value falls in a bin (numeric) or equals a value (categorical, top 20), so it
needs the loaded ``Features``. Per slice the exact aggregates come from SQL over every
paired prediction; the test of the slice against the rest (``subgroup.slice_test``: does
|shadow − primary|, or disagreement, differ there, with the request as the unit) runs on a
seeded sample of whole requests, with Holm's correction across the slices; a slice is
flagged when it is significant and the models part more there than elsewhere. The test
across the bins of a feature slice family is information only.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NotRequired, TypedDict, cast

import asyncpg
import numpy as np

from shadowproxy.compare import stats
from shadowproxy.compare.config import SliceConfig
from shadowproxy.compare.extract import literal, square_sql, within_sql
from shadowproxy.compare.features import CURRENT, Features
from shadowproxy.compare.performance import LABEL_SQL, as_predicted, class_text, is_number
from shadowproxy.compare.predictions import Predictions, PredictionsSection
from shadowproxy.compare.shares import seed_for
from shadowproxy.compare.snapshot import PAIR_FILTER, Explain, Scratch, Snapshot
from shadowproxy.compare.subgroup import slice_test
from shadowproxy.errors import UsageError

SLICES = "_slice"
SCRATCH = (Scratch(SLICES, "id uuid, ord bigint, family text, slice text",
                   indexes=("(id)",)),)


class SliceEntry(TypedDict, total=False):
    family: str
    slice: str
    n: int
    mae: float | None
    rmse: float | None
    mean_diff: float | None
    within_tolerance: float | None
    agreement: float | None
    test: dict[str, Any]
    performance: dict[str, Any] | None
    flagged: bool
    flag_reason: str


class SlicesSection(TypedDict):
    slices: list[SliceEntry]
    why: NotRequired[str]
    min_size: NotRequired[int]
    whole: NotRequired[dict[str, Any]]
    families: NotRequired[dict[str, dict[str, Any]]]
    multiple_testing: NotRequired[dict[str, Any]]
    empty: NotRequired[list[str]]


def _rejected(family: str, spec: str) -> Explain:
    def explain(exc: asyncpg.PostgresError) -> UsageError:
        return UsageError(
            f"compare.slices.{family}: PostgreSQL rejects the condition {spec!r}: {exc}; "
            "a slice is a boolean SQL expression over the columns of shadowproxy.pairs, "
            "e.g. \"(request_body_json #>> '{features,sqft}')::float > 3000\"")
    return explain


def _failed(family: str, spec: str) -> Explain:
    def explain(exc: asyncpg.PostgresError) -> UsageError:
        return UsageError(f"compare.slices.{family}: PostgreSQL failed evaluating {spec!r}: "
                          f"{exc}")
    return explain


async def validate(db: Snapshot) -> None:
    """UsageError if PostgreSQL cannot use a SQL slice as a condition on the pairs."""
    for name, spec in db.compare.slices.items():
        if isinstance(spec, str):
            sql = f"SELECT ({spec})::boolean FROM shadowproxy.pairs LIMIT 0"
            # A "$1" would take one of the report's own values (PostgreSQL infers its type).
            if await db.parameters(sql, explain=_rejected(name, spec)):
                raise UsageError(
                    f"compare.slices.{name}: the condition {spec!r} has a parameter "
                    "placeholder ($1, $2, …); a slice takes no parameters: write the values "
                    "into the condition, e.g. \"request_body_json #>> '{model}' = 'gpt-4o'\"")


async def _load(db: Snapshot, features: Features) -> list[tuple[str, str]]:
    """Fill the slice table; return the (family, slice) pairs found."""
    for family, spec in db.compare.slices.items():
        if isinstance(spec, str):
            await db.execute(f"""
                INSERT INTO {SLICES} SELECT id, NULL, $5, $5 FROM {db.rows}
                WHERE {PAIR_FILTER} AND ({spec})""", *db.pair_args(), family,
                             explain=_failed(family, spec))
        else:
            await _feature_slices(db, features, family, spec)
    await db.execute(f"ANALYZE {SLICES}")
    rows = await db.fetch(f"SELECT DISTINCT family, slice FROM {SLICES} ORDER BY 1, 2")
    return [(r[0], r[1]) for r in rows]


async def _feature_slices(db: Snapshot, features: Features, family: str, spec: SliceConfig
                          ) -> None:
    if spec.bins:
        edges = spec.bins
        cases = []
        for i, (a, b) in enumerate(itertools.pairwise(edges)):
            last = i == len(edges) - 2
            op = "<=" if last else "<"
            label = f"{spec.feature} in [{a:g}, {b:g}{']' if last else ')'}"
            # As float8 literals: an open-ended bin's edge is 'inf' or '-inf', which bare
            # would be read as a column name.
            cases.append(f"WHEN num >= {literal(repr(float(a)))}::float8 "
                         f"AND num {op} {literal(repr(float(b)))}::float8 "
                         f"THEN {literal(label)}")
        expr = "CASE " + " ".join(cases) + " END"
        await db.execute(f"""
            INSERT INTO {SLICES} SELECT id, ord, $2, s FROM
            (SELECT id, ord, {expr} AS s FROM {features.table}
             WHERE name = $1 AND tag = '{CURRENT}') x
            WHERE s IS NOT NULL""", spec.feature, family)
    else:
        await db.execute(f"""
            INSERT INTO {SLICES} SELECT f.id, f.ord, $2, $1 || ' = ' || f.txt
            FROM {features.table} f
            JOIN (SELECT txt FROM {features.table} WHERE name = $1 AND tag = '{CURRENT}'
                    AND txt IS NOT NULL GROUP BY txt ORDER BY count(*) DESC, txt LIMIT 20) t
              ON t.txt = f.txt
            WHERE f.name = $1 AND f.tag = '{CURRENT}'""", spec.feature, family)


async def _summary(db: Snapshot, preds: Predictions, regression: bool) -> list[Any]:
    """Exact per-slice aggregates over every paired prediction."""
    join = (f"FROM {preds.table} p JOIN {SLICES} s "
            "ON s.id = p.id AND (s.ord IS NULL OR s.ord = p.ord)")
    if regression:
        def query(cast: str) -> str:
            pn, sn = "pn" + cast, "sn" + cast
            return f"""
            SELECT s.family, s.slice, count(*) AS n, avg(abs({sn} - {pn})) AS mae,
                   sqrt(avg({square_sql(f'{sn} - {pn}')})) AS rmse,
                   avg({sn} - {pn}) AS mean_diff,
                   avg(({within_sql('pn', 'sn', '$1', '$2', cast)})::int) AS within_tolerance
            {join} WHERE pn IS NOT NULL AND sn IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2"""

        return await db.fetch_wide(query, db.compare.abs_tolerance, db.compare.rel_tolerance)
    return await db.fetch(f"""
        SELECT s.family, s.slice, count(*) AS n, avg((pt = st)::int) AS agreement
        {join} WHERE pt IS NOT NULL AND st IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2""")


async def _rows(db: Snapshot, preds: Predictions, regression: bool) -> list[Any]:
    """Prediction rows of a seeded sample of whole requests, each with its request, its
    label and the slices it belongs to, as ``[family, slice]`` pairs: a slice's name is
    unique only in its family (a SQL slice may be named as another family's bin or value),
    and a row of one must not count as a row of the other."""
    value = "pn, sn" if regression else "pt, st"
    paired = ("pn IS NOT NULL AND sn IS NOT NULL" if regression
              else "pt IS NOT NULL AND st IS NOT NULL")
    return await db.fetch(f"""
        SELECT p.id::text AS request, {value}, {LABEL_SQL} AS y,
               coalesce((SELECT array_agg(DISTINCT ARRAY[s.family, s.slice]) FROM {SLICES} s
                         WHERE s.id = p.id AND (s.ord IS NULL OR s.ord = p.ord)),
                        '{{}}') AS slices
        FROM {preds.table} p LEFT JOIN shadowproxy.labels l ON l.request_id = p.request_id
        WHERE {paired} AND {db.sample_clause(preds.shape.n, "p.id::text")}""")


def _whole(pred: PredictionsSection, regression: bool, sampled: bool) -> dict[str, Any]:
    """The metrics over every pair the section reads: the window's, or the sample's when
    the window is sampled (``sampled``), as the slices' are."""
    if regression:
        return {"n": pred.get("n"), "mae": pred.get("mae"), "rmse": pred.get("rmse"),
                "within_tolerance": pred.get("within_tolerance"), "sampled": sampled}
    return {"n": pred.get("n"), "agreement": pred.get("agreement"), "sampled": sampled}


async def build(db: Snapshot, preds: Predictions, pred: PredictionsSection,
                features: Features) -> SlicesSection:
    """Per slice the shadow-vs-primary metrics, a test against the rest, and flags."""
    compare, th = db.compare, db.thresholds
    if not compare.slices:
        return SlicesSection(slices=[], why="no compare.slices configured")
    found = await _load(db, features)
    regression = preds.task == "regression"
    summary = {(r["family"], r["slice"]): dict(r)
               for r in await _summary(db, preds, regression)}
    rows = await _rows(db, preds, regression) if preds.shape.n else []
    scale = 1.0
    if regression:
        err = np.array([abs(r["sn"] - r["pn"]) for r in rows], dtype=np.float64)
        with np.errstate(over="ignore"):
            if not math.isfinite(float(err.sum())):
                # Near float8's largest numbers (1.7e308 against -1.7e308) a difference or
                # the sums of the tests overflow: read divided by a power of two (exact).
                scale = 2.0 ** math.ceil(math.log2(2 * err.size))
                err = np.array([abs(r["sn"] / scale - r["pn"] / scale) for r in rows],
                               dtype=np.float64)
    else:
        err = np.array([float(r["pt"] != r["st"]) for r in rows], dtype=np.float64)
    members = [{(f, name) for f, name in r["slices"]} for r in rows]
    requests = np.array([r["request"] for r in rows], dtype=object)
    labels = [r["y"] for r in rows]
    if not regression:  # 0/1 labels of boolean classes as the performance section reads them
        known = [i for i, y in enumerate(labels) if y is not None]
        predicted = {class_text(r[side]) for r in rows for side in ("pt", "st")}
        for i, y in zip(known, as_predicted([class_text(labels[i]) for i in known], predicted),
                        strict=True):
            labels[i] = y
    whole = _whole(pred, regression, db.window_sampled)
    out_slices: list[SliceEntry] = []
    family_groups: dict[str, list[np.ndarray]] = {}
    for family, name in found:
        agg = summary.get((family, name), {"n": 0})
        # The SQL names the metrics: mae, rmse, mean_diff, within_tolerance or agreement.
        entry = cast(SliceEntry, {"family": family, "slice": name, "n": int(agg["n"] or 0),
                                  **{k: stats.num(v) for k, v in agg.items()
                                     if k not in ("family", "slice", "n")}})
        mask = np.array([(family, name) in m for m in members], dtype=bool)
        if entry["n"] < th.min_slice_size or mask.sum() < th.min_slice_size \
                or (~mask).sum() < th.min_slice_size:
            entry["test"] = {"test": None,
                             "why": f"fewer than {th.min_slice_size} rows in the slice or outside"}
        else:
            entry["test"] = {**slice_test(err, mask, requests, binary=not regression,
                                          seed=seed_for(f"slice/{family}/{name}",
                                                        db.scope.seed), scale=scale),
                             "on": ("|shadow − primary|" if regression else "disagreement")
                             + ", slice vs rest"}
        if not isinstance(compare.slices[family], str) and mask.sum() >= 3:
            family_groups.setdefault(family, []).append(err[mask])
        entry["performance"] = _performance(rows, mask, labels, regression)
        out_slices.append(entry)
    # Holm, as for drift: a flag is a warning in the verdict, and slices overlap, so the
    # chance of any wrong flag is held at alpha under any dependence between the tests.
    tested = [s for s in out_slices if s["test"].get("p_value") is not None]
    for s, p_adj in zip(tested, stats.holm([s["test"]["p_value"] for s in tested]),
                        strict=True):
        s["test"]["p_value_adjusted"] = p_adj
        if p_adj < th.alpha and s["test"]["diff"] > 0:
            s["flagged"] = True
            what = "|shadow − primary|" if regression else "the disagreement rate"
            s["flag_reason"] = (f"the shadow departs from the primary more here than elsewhere "
                                f"({what} {s['test']['diff']:+.4g} against the rest, "
                                f"Holm-adjusted p = {p_adj:.3g})")
    families = {f: stats.groups_test(g, th.alpha) for f, g in family_groups.items()}
    # A configured family no pair falls in (a condition with a typo, a feature's name not
    # among the features) is named, not left out as if it had nothing to say.
    seen = {family for family, _ in found}
    return SlicesSection(min_size=th.min_slice_size, whole=whole, slices=out_slices,
                         families=families,
                         multiple_testing={"method": "holm", "tests": len(tested)},
                         empty=[f for f in compare.slices if f not in seen])


def _performance(rows: list[Any], mask: np.ndarray, labels: list[Any], regression: bool
                 ) -> dict[str, Any] | None:
    """Each side's error on the slice's labelled rows (MSE, or accuracy)."""
    idx = [i for i in np.flatnonzero(mask) if labels[i] is not None
           and (not regression or is_number(labels[i]))]
    if not idx:
        return None
    if regression:
        y = np.array([float(labels[i]) for i in idx])
        p = np.array([rows[i]["pn"] for i in idx])
        s = np.array([rows[i]["sn"] for i in idx])
        return {"n_labelled": len(idx), "primary_mse": float(np.mean((p - y) ** 2)),
                "shadow_mse": float(np.mean((s - y) ** 2))}
    y_t = [class_text(labels[i]) for i in idx]
    return {"n_labelled": len(idx),
            "primary_accuracy": float(np.mean([class_text(rows[i]["pt"]) == y for i, y in
                                               zip(idx, y_t, strict=True)])),
            "shadow_accuracy": float(np.mean([class_text(rows[i]["st"]) == y for i, y in
                                              zip(idx, y_t, strict=True)]))}
