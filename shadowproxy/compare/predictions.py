"""The report's ``predictions`` section: how the shadow's predictions compare with the primary's.

``load`` extracts the paired predictions of the comparable pairs (element by element for
batches) into a scratch table and returns a ``Predictions`` handle; the sections that join
predictions with labels or slices take that handle, so they cannot run before it exists.
``build`` does both and assembles the section: exact aggregates in SQL (errors, quantiles,
histograms, the binned scatter, the flip matrix), then the statistical tests on a seeded
sample of whole requests (about ``sample_max`` prediction rows).

The decision of the section is made in one place per task: ``regression_tests`` and
``classification_tests`` take the sampled rows (primary's and shadow's value or class, and
the request each row came from: a batch request gives several rows) and run the paired
test of ``paired.py`` (``mean_shift`` or ``flip_test``, the request as the unit), whose
result is ``paired`` and decides the verdict. The comparison of the two columns as
distributions (``distribution_test``) is information only. Both functions are pure: what
goes in is the sample, what comes out is JSON-ready.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, Required, TypedDict

import numpy as np

from shadowproxy.compare import stats
from shadowproxy.compare.config import CompareConfig, Thresholds
from shadowproxy.compare.drift import cdf_distances
from shadowproxy.compare.extract import (
    category_sql,
    float8_sql,
    literal,
    pearson_sql,
    square_sql,
    within_sql,
)
from shadowproxy.compare.paired import PairedPolicy, flip_test, mean_shift
from shadowproxy.compare.snapshot import COMPARABLE, PAIR_FILTER, Scratch, Snapshot
from shadowproxy.compare.stats import FLOAT8_MAX

Task = Literal["regression", "classification"]

LEVELS = [i / 100 for i in range(101)]
HIST_BINS = 30
SCATTER_BINS = 20
CLASSIFICATION_MAX_CLASSES = 10
PREDICTIONS, BASELINE = "_pred", "_base"
HALF_DIFF = "(sn * 0.5 - pn * 0.5)"
"""Half of shadow − primary, in float8's range for any two float8 values: a difference past
it (1.7e308 against -1.7e308) overflows, and PostgreSQL has no numeric ``percentile_cont``.
Halving is exact in binary floating point, so what is ordered and binned by its half is
ordered and binned as the difference, which is doubled back in Python (an infinity where it
is past float8's range)."""


def scratch(table: str) -> tuple[Scratch, ...]:
    """The scratch tables of one side-by-side extraction: ``{table}_src`` and ``{table}``."""
    return (
        Scratch(f"{table}_src", "id uuid, request_id text, received_at timestamptz, "
                                "pa jsonb, sa jsonb, psa jsonb, ssa jsonb"),
        Scratch(table, "id uuid, request_id text, received_at timestamptz, ord int, "
                       "p jsonb, s jsonb, pn float8, sn float8, pt text, st text, "
                       "ps float8, ss float8", indexes=("(request_id)",)),
    )


SCRATCH = scratch(PREDICTIONS) + scratch(BASELINE)


# -- types ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What the extracted predictions look like (how many, which types)."""

    pairs: int
    no_primary: int
    no_shadow: int
    length_mismatch: int
    n: int
    unpaired_elements: int
    n_numeric: int
    distinct_primary: int
    integral: bool


@dataclass(frozen=True)
class Predictions:
    """The paired predictions, loaded in the scratch table ``table`` (one row per element).

    Columns: ``id``, ``request_id``, ``received_at``, ``ord`` (1-based position in a batch),
    ``p``/``s`` (jsonb), ``pn``/``sn`` (numbers), ``pt``/``st`` (text: the class, a whole
    number without a fraction), ``ps``/``ss`` (scores).
    """

    table: str
    task: Task
    task_source: str
    shape: Shape


class Sides(TypedDict):
    primary: int
    shadow: int


class Quantiles(TypedDict):
    levels: list[float]
    primary: list[float | None]
    shadow: list[float | None]
    diff: list[float | None]


class Distribution(TypedDict):
    mean: float | None
    sd: float | None
    min: float | None
    p5: float | None
    p25: float | None
    median: float | None
    p75: float | None
    p95: float | None
    max: float | None


class Histogram(TypedDict):
    edges: list[float]
    primary: list[int]
    shadow: list[int]


class DiffHistogram(TypedDict):
    edges: list[float]
    counts: list[int]


class Scatter(TypedDict):
    x_edges: list[float]
    y_edges: list[float]
    counts: list[list[int]]
    x: str
    y: str


class Tolerance(TypedDict):
    abs: float
    rel: float
    configured: bool


class Sample(TypedDict):
    n: int
    of: int
    sampled: bool
    seed: int
    used_for: list[str]


class FlipMatrix(TypedDict):
    classes: list[str]
    rows: str
    columns: str
    counts: list[list[int]]


class Rates(TypedDict):
    primary: float
    shadow: float
    diff: float


class RegressionTests(TypedDict):
    pearson: dict[str, Any]
    spearman: dict[str, Any]
    distribution_test: dict[str, Any]
    paired: dict[str, Any]


class ClassificationTests(TypedDict):
    distribution_test: dict[str, Any]
    paired: dict[str, Any]


class NoiseSummary(TypedDict):
    shadow: str
    n: int | None
    agreement: float | None
    mae: float | None
    rmse: float | None
    max_abs_diff: float | None


class PredictionsSection(TypedDict, total=False):
    """The JSON ``predictions`` section; which keys are present depends on the task."""

    task: Required[Task]
    task_source: Required[str]
    path: Required[str]
    unpaired_elements: Required[int]
    pairs_without_prediction: Required[Sides]
    length_mismatch_pairs: Required[int]
    n: Required[int]
    # regression
    mae: float | None
    rmse: float | None
    max_abs_diff: float | None
    mean_diff: float | None
    sd_diff: float | None
    within_tolerance: float | None
    differences_beyond_float8: int
    pairs_not_numbers: int
    median_diff: float | None
    quantiles: Quantiles
    primary: Distribution
    shadow: Distribution
    histogram: Histogram
    diff_histogram: DiffHistogram
    scatter: Scatter
    pearson: dict[str, Any]
    spearman: dict[str, Any]
    tolerance: Tolerance
    # classification
    agreement: float
    kappa: float | None
    flip_matrix: FlipMatrix
    flips: list[dict[str, Any]]
    class_rates: dict[str, Rates]
    positive_class: str | None
    positive_rate: Rates
    # both
    paired: dict[str, Any]
    distribution_test: dict[str, Any]
    sample: Sample
    worst: list[dict[str, Any]]
    baseline_noise: NotRequired[NoiseSummary]


# -- the decisions -------------------------------------------------------------------------

def regression_tests(p: np.ndarray, s: np.ndarray, requests: np.ndarray, *, n: int,
                     pearson_r: float | None, th: Thresholds, seed: int) -> RegressionTests:
    """The paired test (decides), correlations and the two columns' distributions (information).

    ``p``/``s`` are the sampled rows and ``requests`` the request of each (rows of a batch
    share one); ``n`` and ``pearson_r`` are exact, computed in SQL over every pair.
    """
    pearson: dict[str, Any] = {"r": pearson_r, "p_value": None}
    if pearson_r is not None and n > 2:
        from scipy import stats as sps

        if abs(pearson_r) >= 1:
            pearson["p_value"] = 0.0
        else:
            t = pearson_r * math.sqrt((n - 2) / (1 - pearson_r * pearson_r))
            pearson["p_value"] = stats.num(2 * sps.t.sf(abs(t), n - 2))
    paired = mean_shift(p, s, requests, PairedPolicy.from_thresholds(th, seed))
    return RegressionTests(pearson=pearson, spearman=stats.correlation(p, s, "spearman"),
                           distribution_test=_columns_numeric(p, s),
                           paired=paired.to_json())


def _columns_numeric(p: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    """KS and the normalised Wasserstein distance of the two columns (information)."""
    if p.size == 0:
        return {"test": None, "why": "no paired numeric predictions", "decides": False}
    from scipy import stats as sps

    with warnings.catch_warnings():
        # Where its exact p-value does not converge (two close columns of a few hundred)
        # scipy gives the asymptotic one, which is the answer, and says so in a warning.
        warnings.filterwarnings("ignore", "ks_2samp: Exact calculation unsuccessful",
                                RuntimeWarning)
        ks = sps.ks_2samp(p, s)
    distance, _ = cdf_distances(p, s)
    return {"test": "ks", "statistic": stats.num(ks.statistic), "p_value": stats.num(ks.pvalue),
            "wasserstein_normed": stats.num(distance), "decides": False,
            "why": "information: the two columns compared as if they were independent "
                   "samples; the paired test decides"}


def classification_tests(classes: list[str], matrix: np.ndarray, primary: np.ndarray,
                         shadow: np.ndarray, requests: np.ndarray, *, th: Thresholds,
                         seed: int) -> ClassificationTests:
    """The paired flip test (decides) and the predicted classes' distributions (information).

    ``matrix[i, j]`` counts the pairs where the primary predicted ``classes[i]`` and the
    shadow ``classes[j]`` (every pair: the matrix is exact); ``primary``/``shadow`` are the
    sampled rows' classes and ``requests`` the request of each.
    """
    paired = flip_test(primary, shadow, requests, PairedPolicy.from_thresholds(th, seed))
    return ClassificationTests(distribution_test=_columns_classes(classes, matrix),
                               paired=paired.to_json())


def _columns_classes(classes: list[str], matrix: np.ndarray) -> dict[str, Any]:
    """χ² on the two columns' class counts and their total variation distance (information)."""
    counts = np.vstack([matrix.sum(axis=1), matrix.sum(axis=0)])
    counts = counts[:, counts.sum(axis=0) > 0]
    if counts.shape[1] < 2:
        return {"test": None, "why": "a single class on both sides", "decides": False}
    from scipy import stats as sps

    chi = sps.chi2_contingency(counts)
    shares = counts / counts.sum(axis=1, keepdims=True)
    return {"test": "chi2", "statistic": stats.num(chi.statistic),
            "p_value": stats.num(chi.pvalue),
            "total_variation": float(np.abs(shares[1] - shares[0]).sum() / 2),
            "decides": False,
            "why": "information: the class counts compared as if they were independent "
                   "samples; the paired flip test decides"}


# -- task ----------------------------------------------------------------------------------

def infer_task(compare: CompareConfig, shape: Shape) -> tuple[Task, str]:
    """regression or classification: from the config, else from the predictions' values."""
    if compare.task in ("regression", "classification"):
        return compare.task, "config"
    if shape.n and shape.n_numeric == shape.n:
        if shape.integral and shape.distinct_primary <= CLASSIFICATION_MAX_CLASSES:
            return "classification", (f"inferred: integers with at most "
                                      f"{CLASSIFICATION_MAX_CLASSES} distinct values")
        return "regression", "inferred: numeric predictions"
    return "classification", "inferred: not every prediction is a number"


def positive_class(compare: CompareConfig, classes: set[str]) -> str | None:
    """The configured positive class, else "1" or "true" when the classes are binary.

    A whole number configured as a float (``positive_class: 1.0`` in YAML) names class "1",
    as the number 1 is written in the predictions and labels; its Python text "1.0" named
    no class."""
    if compare.positive_class is not None:
        pc = compare.positive_class
        if isinstance(pc, bool):
            return "true" if pc else "false"
        if isinstance(pc, float) and pc.is_integer():
            return str(int(pc))
        return str(pc)
    if classes <= {"0", "1"}:
        return "1"
    if classes <= {"false", "true"}:
        return "true"
    return None


# -- extraction ----------------------------------------------------------------------------

async def validate(db: Snapshot) -> None:
    """UsageError if PostgreSQL cannot parse compare.prediction or compare.score."""
    await db.check_jsonpath("compare.prediction", db.compare.prediction)
    if db.compare.score is not None:
        await db.check_jsonpath("compare.score", db.compare.score)


async def load(db: Snapshot, *, shadow: str | None = None, table: str = PREDICTIONS) -> Shape:
    """Extract the paired predictions of ``shadow`` (default the report's) into ``table``."""
    compare = db.compare
    path = literal(compare.prediction)
    score = literal(compare.score) if compare.score else None
    score_cols = (f", jsonb_path_query_array(primary_body_json, {score}::jsonpath),"
                  f" jsonb_path_query_array(shadow_body_json, {score}::jsonpath)"
                  if score else ", NULL::jsonb, NULL::jsonb")
    await db.execute(f"""
        INSERT INTO {table}_src
        SELECT id, request_id, received_at,
               jsonb_path_query_array(primary_body_json, {path}::jsonpath),
               jsonb_path_query_array(shadow_body_json, {path}::jsonpath)
               {score_cols}
        FROM {db.rows} WHERE {PAIR_FILTER} AND {COMPARABLE}""",
                     *db.pair_args(shadow))
    await db.execute(f"""
        INSERT INTO {table}
        SELECT id, request_id, received_at, i + 1, pa -> i, sa -> i,
               {float8_sql('(pa -> i)')},
               {float8_sql('(sa -> i)')},
               {category_sql('(pa -> i)')}, {category_sql('(sa -> i)')},
               {float8_sql('(psa -> i)')},
               {float8_sql('(ssa -> i)')}
        FROM {table}_src,
             generate_series(0, greatest(jsonb_array_length(pa), jsonb_array_length(sa)) - 1)
             AS i;
        ANALYZE {table}""")
    src = await db.fetchrow(f"""
        SELECT count(*) AS pairs,
               count(*) FILTER (WHERE jsonb_array_length(pa) = 0) AS no_primary,
               count(*) FILTER (WHERE jsonb_array_length(sa) = 0) AS no_shadow,
               count(*) FILTER (WHERE jsonb_array_length(pa) <> jsonb_array_length(sa))
                 AS length_mismatch
        FROM {table}_src""")
    row = await db.fetchrow(f"""
        SELECT count(*) FILTER (WHERE p IS NOT NULL AND s IS NOT NULL) AS n,
               count(*) FILTER (WHERE (p IS NULL) <> (s IS NULL)) AS unpaired,
               count(*) FILTER (WHERE pn IS NOT NULL AND sn IS NOT NULL) AS n_numeric,
               count(DISTINCT pt) AS p_distinct,
               coalesce(bool_and(pn = trunc(pn)) FILTER (WHERE pn IS NOT NULL), true)
                 AS integral
        FROM {table}""")
    return Shape(pairs=int(src["pairs"]), no_primary=int(src["no_primary"]),
                 no_shadow=int(src["no_shadow"]), length_mismatch=int(src["length_mismatch"]),
                 n=int(row["n"]), unpaired_elements=int(row["unpaired"]),
                 n_numeric=int(row["n_numeric"]), distinct_primary=int(row["p_distinct"]),
                 integral=bool(row["integral"]))


# -- the section ---------------------------------------------------------------------------

async def build(db: Snapshot) -> tuple[Predictions, PredictionsSection]:
    """Load the predictions and assemble the section (and the baseline's noise floor)."""
    compare = db.compare
    shape = await load(db)
    task, task_source = infer_task(compare, shape)
    preds = Predictions(PREDICTIONS, task, task_source, shape)
    section = PredictionsSection(
        task=task, task_source=task_source, path=compare.prediction,
        unpaired_elements=shape.unpaired_elements,
        pairs_without_prediction=Sides(primary=shape.no_primary, shadow=shape.no_shadow),
        length_mismatch_pairs=shape.length_mismatch, n=0)
    if task == "regression":
        await _regression(db, preds, section)
    else:
        await _classification(db, preds, section)
    if compare.baseline_shadow:
        await load(db, shadow=compare.baseline_shadow, table=BASELINE)
        section["baseline_noise"] = await _noise(db, compare.baseline_shadow, BASELINE)
    return preds, section


def _floats(values: list[Any], scale: float = 1.0) -> list[float | None]:
    return [None if v is None else float(v) * scale for v in values]


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


async def _regression(db: Snapshot, preds: Predictions, out: PredictionsSection) -> None:
    compare, t = db.compare, preds.table
    def query(cast: str) -> str:
        pn, sn = "pn" + cast, "sn" + cast
        # Read as numeric (a float8 overflowed), the values may be near float8's largest and
        # their differences past it (counted): percentiles are taken of halves, since
        # percentile_cont interpolates in float8 (between -1.7e308 and 1.7e308 it gave
        # infinity), and doubled back.
        half, diff, beyond = ((" * 0.5", HALF_DIFF,
                               f"count(*) FILTER (WHERE abs({sn} - {pn}) > {FLOAT8_MAX})")
                              if cast else ("", "sn - pn", "0"))
        return f"""
        SELECT count(*) AS n, avg(abs({sn} - {pn})) AS mae,
               sqrt(avg({square_sql(f'{sn} - {pn}')})) AS rmse,
               max(abs({sn} - {pn})) AS max_abs_diff, avg({sn} - {pn}) AS mean_diff,
               stddev_samp({sn} - {pn}) AS sd_diff, {pearson_sql('pn', 'sn', cast)} AS pearson,
               avg(({within_sql('pn', 'sn', '$1', '$2', cast)})::int) AS within_tolerance,
               percentile_cont($3::float8[]) WITHIN GROUP (ORDER BY pn{half}) AS pq,
               percentile_cont($3::float8[]) WITHIN GROUP (ORDER BY sn{half}) AS sq,
               percentile_cont($3::float8[]) WITHIN GROUP (ORDER BY {diff}) AS dq,
               {2 if cast else 1} AS q_scale, {beyond} AS beyond,
               avg({pn}) AS pmean, stddev_samp({pn}) AS psd, avg({sn}) AS smean,
               stddev_samp({sn}) AS ssd
        FROM {t} WHERE pn IS NOT NULL AND sn IS NOT NULL"""

    row = await db.fetchrow_wide(query, compare.abs_tolerance, compare.rel_tolerance, LEVELS)
    n = int(row["n"])
    out["mae"], out["rmse"] = _opt(row["mae"]), _opt(row["rmse"])
    out["max_abs_diff"], out["mean_diff"] = _opt(row["max_abs_diff"]), _opt(row["mean_diff"])
    out["sd_diff"], out["within_tolerance"] = _opt(row["sd_diff"]), _opt(row["within_tolerance"])
    out["differences_beyond_float8"] = beyond = int(row["beyond"])
    # Paired values a side gave as no number (a string "0.5", a boolean, past float8's
    # range) are left out of the statistics, and said so: when every pair was such, "no
    # paired values" sent the operator to a jsonpath that matched.
    out["pairs_not_numbers"] = preds.shape.n - preds.shape.n_numeric
    out["n"] = n
    if not n:
        return
    pq, sq, dq = (_floats(row[k], row["q_scale"]) for k in ("pq", "sq", "dq"))
    out["median_diff"] = dq[50]
    out["quantiles"] = Quantiles(levels=LEVELS, primary=pq, shadow=sq, diff=dq)
    out["primary"] = _distribution(pq, row["pmean"], row["psd"])
    out["shadow"] = _distribution(sq, row["smean"], row["ssd"])
    lo, hi = min(pq[0] or 0, sq[0] or 0), max(pq[100] or 0, sq[100] or 0)
    edges = _edges(lo, hi, HIST_BINS)
    out["histogram"] = Histogram(edges=edges,
                                 primary=await _histogram(db, t, "pn", edges),
                                 shadow=await _histogram(db, t, "sn", edges))
    # Differences past float8's range are binned by their halves, in the end bins of edges
    # that stop at its largest numbers.
    diff_edges = _edges(max(dq[0] or 0, -FLOAT8_MAX), min(dq[100] or 0, FLOAT8_MAX), HIST_BINS)
    out["diff_histogram"] = DiffHistogram(
        edges=diff_edges, counts=await (
            _histogram(db, t, HALF_DIFF, [e * 0.5 for e in diff_edges]) if beyond
            else _histogram(db, t, "sn - pn", diff_edges)))
    out["scatter"] = await _scatter(db, t, lo, hi)
    diff, scale = (HALF_DIFF, 2.0) if beyond else ("sn - pn", 1.0)
    out["worst"] = [
        {"request_id": r["request_id"], "index": r["ord"], "primary": r["pn"],
         "shadow": r["sn"], "abs_diff": r["d"] * scale}
        for r in await db.fetch(f"""
            SELECT request_id, ord, pn, sn, abs({diff}) AS d FROM {t}
            WHERE pn IS NOT NULL AND sn IS NOT NULL
            ORDER BY abs({diff}) DESC, request_id LIMIT 10""")]
    rows = await _sample(db, t, "pn, sn", "pn IS NOT NULL AND sn IS NOT NULL", n)
    p = np.array([r[1] for r in rows], dtype=np.float64)
    s = np.array([r[2] for r in rows], dtype=np.float64)
    tests = regression_tests(p, s, np.array([r[0] for r in rows]), n=n,
                             pearson_r=_opt(row["pearson"]), th=db.thresholds,
                             seed=db.scope.seed)
    out["pearson"], out["spearman"] = tests["pearson"], tests["spearman"]
    out["distribution_test"], out["paired"] = tests["distribution_test"], tests["paired"]
    out["tolerance"] = Tolerance(abs=compare.abs_tolerance, rel=compare.rel_tolerance,
                                 configured=bool(compare.abs_tolerance
                                                 or compare.rel_tolerance))
    # Sampled: the rows are a sample of the window's, above sample_max or of a sampled
    # window (whose n rows are the sample's).
    out["sample"] = Sample(n=int(p.size), of=n, sampled=bool(p.size < n) or db.window_sampled,
                           seed=db.scope.seed,
                           used_for=["paired", "spearman", "distribution_test"])


async def _sample(db: Snapshot, table: str, columns: str, where: str, n: int) -> list[Any]:
    """The request id and ``columns`` of the rows of a seeded sample of whole requests.

    Requests, not rows, are drawn (all the rows of a batch request, or none), so that the
    paired tests can treat the request as the unit; about ``sample_max`` rows are kept.
    """
    return await db.fetch(f"SELECT id::text, {columns} FROM {table} "
                          f"WHERE {where} AND {db.sample_clause(n, 'id::text')}")


def _distribution(q: list[float | None], mean: Any, sd: Any) -> Distribution:
    return Distribution(mean=float(mean), sd=_opt(sd), min=q[0], p5=q[5], p25=q[25],
                        median=q[50], p75=q[75], p95=q[95], max=q[100])


def _edges(lo: float, hi: float, bins: int) -> list[float]:
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return stats.edges(lo, hi, bins)


async def _histogram(db: Snapshot, table: str, expr: str, edges: list[float]) -> list[int]:
    k = len(edges) - 1
    counts = [0] * k
    for b, n in await db.fetch(f"""
            SELECT least(greatest(width_bucket({expr}, $1, $2, {k}), 1), {k}), count(*)
            FROM {table} WHERE pn IS NOT NULL AND sn IS NOT NULL GROUP BY 1""",
                               edges[0], edges[-1]):
        counts[b - 1] += n
    return counts


async def _scatter(db: Snapshot, table: str, lo: float, hi: float) -> Scatter:
    edges = _edges(lo, hi, SCATTER_BINS)
    k = SCATTER_BINS
    counts = [[0] * k for _ in range(k)]
    for x, y, n in await db.fetch(f"""
            SELECT least(greatest(width_bucket(pn, $1, $2, {k}), 1), {k}),
                   least(greatest(width_bucket(sn, $1, $2, {k}), 1), {k}), count(*)
            FROM {table} WHERE pn IS NOT NULL AND sn IS NOT NULL GROUP BY 1, 2""",
                                  edges[0], edges[-1]):
        counts[y - 1][x - 1] += n
    return Scatter(x_edges=edges, y_edges=edges, counts=counts, x="primary", y="shadow")


async def _classification(db: Snapshot, preds: Predictions, out: PredictionsSection) -> None:
    t = preds.table
    cells = [(r[0], r[1], int(r[2])) for r in await db.fetch(
        f"SELECT pt, st, count(*) FROM {t} WHERE pt IS NOT NULL AND st IS NOT NULL "
        "GROUP BY 1, 2 ORDER BY 1, 2")]
    classes = sorted({c[0] for c in cells} | {c[1] for c in cells})
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for a, b, n in cells:
        matrix[index[a], index[b]] += n
    total = int(matrix.sum())
    out["n"] = total
    if not total:
        return
    pc = positive_class(db.compare, set(classes))
    p_counts, s_counts = matrix.sum(axis=1), matrix.sum(axis=0)
    out["agreement"] = float(np.trace(matrix) / total)
    out["kappa"] = stats.kappa(matrix)
    out["flip_matrix"] = FlipMatrix(classes=classes, rows="primary", columns="shadow",
                                    counts=matrix.astype(int).tolist())
    out["flips"] = [{"from": a, "to": b, "n": n, "share": n / total}
                    for a, b, n in sorted(cells, key=lambda c: -c[2]) if a != b][:20]
    out["class_rates"] = {c: Rates(primary=float(p_counts[i] / total),
                                   shadow=float(s_counts[i] / total),
                                   diff=float((s_counts[i] - p_counts[i]) / total))
                          for c, i in index.items()}
    out["positive_class"] = pc
    rows = await _sample(db, t, "pt, st", "pt IS NOT NULL AND st IS NOT NULL", total)
    ctests = classification_tests(
        classes, matrix, np.array([r[1] for r in rows], dtype=object),
        np.array([r[2] for r in rows], dtype=object), np.array([r[0] for r in rows]),
        th=db.thresholds, seed=db.scope.seed)
    out["distribution_test"], out["paired"] = ctests["distribution_test"], ctests["paired"]
    out["sample"] = Sample(n=len(rows), of=total,
                           sampled=len(rows) < total or db.window_sampled,
                           seed=db.scope.seed, used_for=["paired"])
    out["worst"] = [{"request_id": r[0], "index": r[1], "primary": r[2], "shadow": r[3]}
                    for r in await db.fetch(
                        f"SELECT request_id, ord, pt, st FROM {t} WHERE pt <> st "
                        "ORDER BY received_at, request_id, ord LIMIT 10")]
    if pc is not None and pc in index:
        pr, sr = p_counts[index[pc]] / total, s_counts[index[pc]] / total
        out["positive_rate"] = Rates(primary=float(pr), shadow=float(sr), diff=float(sr - pr))


async def _noise(db: Snapshot, shadow: str, table: str) -> NoiseSummary:
    """How far the baseline shadow's predictions are from the primary's: the noise floor."""
    def query(cast: str) -> str:
        pn, sn = "pn" + cast, "sn" + cast
        return f"""
        SELECT count(*) FILTER (WHERE pt IS NOT NULL AND st IS NOT NULL) AS n,
               avg((pt = st)::int) AS agreement, avg(abs({sn} - {pn})) AS mae,
               sqrt(avg({square_sql(f'{sn} - {pn}')})) AS rmse,
               max(abs({sn} - {pn})) AS max_abs_diff
        FROM {table}"""

    row = await db.fetchrow_wide(query)
    return NoiseSummary(shadow=shadow, n=int(row["n"]), agreement=_opt(row["agreement"]),
                        mae=_opt(row["mae"]), rmse=_opt(row["rmse"]),
                        max_abs_diff=_opt(row["max_abs_diff"]))
