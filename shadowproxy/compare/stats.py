"""Statistics on numbers already brought out of PostgreSQL (pure functions, no I/O).

The building blocks the report's sections share: descriptive statistics, correlations,
Cohen's κ, the paired tests on labelled rows (Wilcoxon signed-rank, exact McNemar),
bootstrap intervals, the tests of the slices, Holm's correction and the tail of a weighted
sum of χ² variables that ``shares.py`` uses. The report's decisions on predictions and on
input drift are made in ``paired.py`` and ``drift.py`` (docs/report.md, "Deciding").
Every result is a plain dict of JSON-ready numbers; ``None`` stands for "not computable".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats

Array = NDArray[np.float64]


FLOAT8_MAX = 1.7976931348623157e308
NEAR_MAX = FLOAT8_MAX / 4
"""Past this magnitude, a span of values or an interpolation between them may overflow
float8 (1.7e308 against -1.7e308): ``edges`` and ``quantiles`` then work on halves (halving
is exact in binary floating point) and double back."""


def edges(lo: float, hi: float, bins: int) -> list[float]:
    """``bins + 1`` evenly spaced edges from ``lo`` to ``hi`` (``lo < hi``)."""
    if max(abs(lo), abs(hi)) > NEAR_MAX:
        return [float(2 * x) for x in np.linspace(lo * 0.5, hi * 0.5, bins + 1)]
    return [float(x) for x in np.linspace(lo, hi, bins + 1)]


def quantiles(x: Array, levels: Array | Sequence[float]) -> list[float]:
    """``np.quantile`` of ``x`` at ``levels``, whose interpolation between -1.7e308 and
    1.7e308 gives an infinity (or NaN) rather than the value between them."""
    if x.size and float(np.max(np.abs(x))) > NEAR_MAX:
        return [float(2 * v) for v in np.quantile(x * 0.5, levels)]
    return [float(v) for v in np.quantile(x, levels)]


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


def groups_test(groups: Sequence[Array], alpha: float) -> dict[str, Any]:
    """One-way ANOVA when every group looks normal, else Kruskal-Wallis (k ≥ 2 groups)."""
    groups = [g for g in groups if g.size >= 3]
    if len(groups) < 2:
        return {"test": None, "why": "fewer than two groups with 3 or more values"}
    if np.ptp(np.concatenate(groups)) == 0:
        return {"test": None, "why": "every value is the same in every group"}
    if all(normality(g, alpha)["normal"] for g in groups):
        res = stats.f_oneway(*groups)
        return {"test": "anova", "why": "every group passes the normality test",
                "statistic": num(res.statistic), "p_value": num(res.pvalue)}
    res = stats.kruskal(*groups)
    return {"test": "kruskal", "why": "a group fails the normality test",
            "statistic": num(res.statistic), "p_value": num(res.pvalue)}


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
