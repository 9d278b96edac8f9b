"""Statistical tests on numbers already brought out of PostgreSQL (pure functions, no I/O).

The test-selection policy follows ``docs/report.md`` (section "Which test, and why"):
p-values while the smaller sample has at most ``large_sample`` values, distances above it,
a normality gate before choosing Welch's t-test or Kruskal-Wallis, a 2×2 test that switches to
Fisher's exact test when an expected count is under 5, and Benjamini-Hochberg across a family.
Every result is a plain dict of JSON-ready numbers; ``None`` stands for "not computable".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats
from scipy.spatial import distance

Array = NDArray[np.float64]


def num(value: Any) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def describe(x: Array) -> dict[str, Any]:
    """n, mean, median, SD (n-1), min and max of the finite values of ``x``."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"n": 0, "mean": None, "median": None, "sd": None, "min": None, "max": None}
    return {"n": int(x.size), "mean": num(np.mean(x)), "median": num(np.median(x)),
            "sd": num(np.std(x, ddof=1)) if x.size > 1 else None,
            "min": num(np.min(x)), "max": num(np.max(x))}


def normality(x: Array, alpha: float) -> dict[str, Any]:
    """Shapiro-Wilk up to 5000 values, D'Agostino-Pearson above; ``normal`` when p ≥ alpha."""
    if x.size < 3 or np.ptp(x) == 0:
        return {"test": None, "p_value": None, "normal": False}
    if x.size <= 5000:
        p = stats.shapiro(x).pvalue
        test = "shapiro"
    else:
        p = stats.normaltest(x).pvalue
        test = "normaltest"
    return {"test": test, "p_value": num(p), "normal": bool(p >= alpha)}


def location_test(ref: Array, cur: Array, alpha: float) -> dict[str, Any]:
    """Welch's t-test when both samples look normal, else Kruskal-Wallis; with effect sizes."""
    if ref.size < 3 or cur.size < 3:
        return {"test": None, "why": "fewer than 3 values on a side"}
    n_ref, n_cur = normality(ref, alpha), normality(cur, alpha)
    both_normal = n_ref["normal"] and n_cur["normal"]
    if np.ptp(np.concatenate([ref, cur])) == 0:
        return {"test": None, "why": "every value is the same"}
    if both_normal:
        res = stats.ttest_ind(ref, cur, equal_var=False)
        test, why = "welch_t", "both samples pass the normality test"
    else:
        res = stats.kruskal(ref, cur)
        test, why = "kruskal", "a sample fails the normality test"
    sd = math.sqrt((np.var(ref, ddof=1) + np.var(cur, ddof=1)) / 2)
    return {"test": test, "why": why, "statistic": num(res.statistic), "p_value": num(res.pvalue),
            "normality": {"reference": n_ref, "current": n_cur},
            "mean_diff": num(np.mean(cur) - np.mean(ref)),
            "median_diff": num(np.median(cur) - np.median(ref)),
            "cohen_d": num((np.mean(cur) - np.mean(ref)) / sd) if sd > 0 else None}


def groups_test(groups: Sequence[Array], alpha: float) -> dict[str, Any]:
    """One-way ANOVA when every group looks normal, else Kruskal-Wallis (k ≥ 2 groups)."""
    groups = [g for g in groups if g.size >= 3]
    if len(groups) < 2 or np.ptp(np.concatenate(groups)) == 0:
        return {"test": None, "why": "fewer than two groups with 3+ distinct values"}
    if all(normality(g, alpha)["normal"] for g in groups):
        res = stats.f_oneway(*groups)
        return {"test": "anova", "why": "every group passes the normality test",
                "statistic": num(res.statistic), "p_value": num(res.pvalue)}
    res = stats.kruskal(*groups)
    return {"test": "kruskal", "why": "a group fails the normality test",
            "statistic": num(res.statistic), "p_value": num(res.pvalue)}


def wasserstein_normed(ref: Array, cur: Array) -> float:
    """Wasserstein-1 distance divided by the reference's SD (floored at 0.001, as Evidently)."""
    return float(stats.wasserstein_distance(ref, cur) / max(float(np.std(ref)), 1e-3))


def numeric_drift(ref: Array, cur: Array, *, alpha: float, large_sample: int,
                  max_distance: float) -> dict[str, Any]:
    """KS p-value for small samples, normalised Wasserstein distance for large ones."""
    n = min(ref.size, cur.size)
    if n == 0:
        return {"test": None, "why": "no values on one side", "drift": False}
    ks = stats.ks_2samp(ref, cur)
    if n <= large_sample:
        return {"test": "ks", "why": f"n = {n} ≤ {large_sample}: a p-value test",
                "statistic": num(ks.statistic), "p_value": num(ks.pvalue), "threshold": alpha}
    d = wasserstein_normed(ref, cur)
    return {"test": "wasserstein_normed",
            "why": f"n = {n} > {large_sample}: p-values flag trivial shifts, use a distance",
            "statistic": num(d), "p_value": None, "threshold": max_distance,
            "drift": bool(d >= max_distance),
            "info": {"ks_statistic": num(ks.statistic), "ks_p_value": num(ks.pvalue)}}


def two_by_two(table: Sequence[Sequence[int]]) -> dict[str, Any]:
    """A 2×2 homogeneity test: Fisher's exact test if an expected count is under 5."""
    t = np.asarray(table, dtype=np.int64)
    if (t.sum(axis=0) == 0).any() or (t.sum(axis=1) == 0).any():
        return {"test": None, "p_value": None, "why": "a row or column of the table is empty"}
    expected = stats.contingency.expected_freq(t)
    if (expected < 5).any():
        return {"test": "fisher_exact", "p_value": num(stats.fisher_exact(t).pvalue),
                "why": "an expected count is under 5"}
    res = stats.chi2_contingency(t)
    return {"test": "chi2", "statistic": num(res.statistic), "p_value": num(res.pvalue),
            "why": "every expected count is 5 or more"}


def categorical_drift(ref: Mapping[str, int], cur: Mapping[str, int], *, alpha: float,
                      large_sample: int, max_js_distance: float) -> dict[str, Any]:
    """χ² on the 2×k table (unseen categories as columns) small, Jensen-Shannon (base 2) large."""
    categories = sorted(set(ref) | set(cur))
    r = np.array([ref.get(c, 0) for c in categories], dtype=np.float64)
    c = np.array([cur.get(k, 0) for k in categories], dtype=np.float64)
    n = int(min(r.sum(), c.sum()))
    if n == 0:
        return {"test": None, "why": "no values on one side", "drift": False}
    js = float(distance.jensenshannon(r / r.sum(), c / c.sum(), base=2))
    if len(categories) == 1:
        return {"test": None, "why": "a single category on both sides", "drift": False,
                "info": {"js_distance": 0.0}}
    if n <= large_sample:
        if len(categories) == 2:
            res = two_by_two(np.vstack([r, c]).astype(np.int64).tolist())
        else:
            chi = stats.chi2_contingency(np.vstack([r, c]))
            res = {"test": "chi2", "statistic": num(chi.statistic), "p_value": num(chi.pvalue)}
        return {**res, "why": f"n = {n} ≤ {large_sample}: a p-value test "
                              + (f"({res['why']})" if "why" in res else "on the 2×k table"),
                "threshold": alpha, "info": {"js_distance": num(js)}}
    return {"test": "jensen_shannon", "statistic": num(js), "p_value": None,
            "why": f"n = {n} > {large_sample}: p-values flag trivial shifts, use a distance",
            "threshold": max_js_distance, "drift": bool(js >= max_js_distance)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (valid under any dependence).

    Sorted p_(1) ≤ … ≤ p_(m) become max over j ≤ i of min(1, (m − j + 1)·p_(j)); a test is
    significant at level α after the correction when its adjusted p-value is below α.
    """
    if not p_values:
        return []
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(stepped)
    return [float(a) for a in adjusted]


def weighted_chi2_sf(x: float, weights: Array) -> float:
    """P(Σ wᵢ·χ²₁ > x) for independent χ²₁ variables and weights wᵢ ≥ 0.

    One distinct weight is a scaled χ² (exact); otherwise the Lugannani-Rice saddlepoint
    approximation (Kuonen 1999, Biometrika 86:929), accurate to a few per cent of the
    p-value far into the tail. Near the mean, where the formula is singular, the two-moment
    (Satterthwaite) scaled χ² is used instead: there p-values are large and never decide.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w[w > 0]
    if w.size == 0:
        return 1.0 if x <= 0 else 0.0
    if x <= 0:
        return 1.0
    if np.ptp(w) <= 1e-9 * w.max():
        return float(stats.chi2.sf(x / w.mean(), w.size))
    from scipy.optimize import brentq

    def k1(t: float) -> float:
        return float(np.sum(w / (1 - 2 * w * t)))

    w_max = float(w.max())
    if x > w.sum():
        lo, hi = 0.0, (1 - 0.5 * w_max / (x + float(w.sum()))) / (2 * w_max)
    else:
        lo, hi = -w.size / x, 0.0
    t = float(brentq(lambda s: k1(s) - x, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=500))
    cgf = float(-0.5 * np.sum(np.log1p(-2 * w * t)))
    k2 = float(np.sum(2 * w**2 / (1 - 2 * w * t) ** 2))
    r = math.copysign(math.sqrt(max(2 * (t * x - cgf), 0.0)), t)
    v = t * math.sqrt(k2)
    if abs(r) < 1e-2 or abs(v) < 1e-2:
        scale = float(np.sum(w**2) / np.sum(w))
        return float(stats.chi2.sf(x / scale, float(np.sum(w)) / scale))
    p = float(stats.norm.sf(r) + stats.norm.pdf(r) * (1 / v - 1 / r))
    return min(max(p, 0.0), 1.0)


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values, in the input order."""
    if not p_values:
        return []
    return [float(p) for p in stats.false_discovery_control(np.asarray(p_values), method="bh")]


def kappa(matrix: Array) -> float | None:
    """Cohen's κ from a square confusion matrix (rows: one rater, columns: the other)."""
    total = matrix.sum()
    if total == 0:
        return None
    p_o = np.trace(matrix) / total
    p_e = float((matrix.sum(axis=0) * matrix.sum(axis=1)).sum()) / total**2
    if p_e == 1:
        return 1.0 if p_o == 1 else None
    return float((p_o - p_e) / (1 - p_e))


def mcnemar(primary_only: int, shadow_only: int) -> dict[str, Any]:
    """Exact McNemar test on the discordant pairs: primary-only-correct vs shadow-only-correct."""
    n = primary_only + shadow_only
    if n == 0:
        return {"test": "mcnemar_exact", "b": 0, "c": 0, "p_value": 1.0}
    p = min(1.0, 2 * stats.binom.cdf(min(primary_only, shadow_only), n, 0.5))
    return {"test": "mcnemar_exact", "b": primary_only, "c": shadow_only, "p_value": num(p)}


def wilcoxon(d: Array) -> dict[str, Any]:
    """Wilcoxon signed-rank test on paired differences (zeros dropped, Pratt not used)."""
    d = d[d != 0]
    if d.size < 10:
        return {"test": "wilcoxon", "n": int(d.size), "statistic": None, "p_value": None,
                "why": "fewer than 10 non-zero differences"}
    res = stats.wilcoxon(d)
    return {"test": "wilcoxon", "n": int(d.size), "statistic": num(res.statistic),
            "p_value": num(res.pvalue)}


def correlation(a: Array, b: Array, kind: str) -> dict[str, Any]:
    """Pearson or Spearman correlation with its p-value."""
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"r": None, "p_value": None}
    res = stats.pearsonr(a, b) if kind == "pearson" else stats.spearmanr(a, b)
    return {"r": num(res.statistic), "p_value": num(res.pvalue)}


def bootstrap_ci(statistic: Callable[..., Any], arrays: Sequence[Array], *, seed: int,
                 n_resamples: int = 1000) -> list[float | None]:
    """A paired percentile bootstrap 95% confidence interval of ``statistic(*arrays)``."""
    res = stats.bootstrap(tuple(arrays), statistic, paired=True, vectorized=True,
                          n_resamples=n_resamples, method="percentile", batch=100,
                          confidence_level=0.95, rng=np.random.default_rng(seed))
    return [num(res.confidence_interval.low), num(res.confidence_interval.high)]
