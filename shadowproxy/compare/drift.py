"""Input drift: one policy for every feature and every sample size (pure decision code).

A feature is flagged as drifted when two things hold at once:

1. **the change is real**: its test's p-value, adjusted by Holm's method across the whole
   family (every feature's distribution test and missing-share test in the window), is
   below ``alpha``; so the chance that a window where nothing changed flags anything at all
   stays at ``alpha`` or below, however many features there are;
2. **the change is large enough to matter**: its effect size exceeds a threshold the team
   sets — normalised Wasserstein distance for numbers (``max_distance``), total variation
   distance for categories (``max_tv_distance``), the change of the missing share
   (``max_missing_share_change``).

The significance test keeps small samples from flagging noise; the effect threshold keeps
large samples from flagging negligible shifts. Both only get surer as n grows, so a real
change above the threshold is found at least as often with more data, and there is no
sample size where the rule switches.

Each feature is reduced to levels (``shares.py`` tests them with the request as the unit):
categories for categorical features; for numbers their distinct values when there are at
most 20 (integer-valued and discrete features are tested as what they are, ties included),
else 20 bins at the pooled quantiles (a tie is never split across bins), fewer when a side
has under 100 values, so that each bin expects at least 5 rows a side.

Holm rather than Benjamini-Hochberg: the report names the features that drifted, and Holm
keeps the chance of naming *any* unchanged feature under ``alpha`` whether or not other
features changed (Benjamini-Hochberg bounds only the expected share of wrong names, and
needs the tests to be positively dependent, which features of the same requests need not
be). Holm is valid under any dependence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from shadowproxy.compare.config import Thresholds
from shadowproxy.compare.shares import (
    PERMUTATION_BELOW,
    PERMUTATIONS,
    Counts,
    ShareTest,
    counts,
    seed_for,
    share_test,
)
from shadowproxy.compare.stats import holm, num

MAX_LEVELS = 20
MIN_PER_BIN = 5
Kind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class DriftPolicy:
    """The thresholds of the drift rule (from ``compare.thresholds``) and the test settings."""

    alpha: float = 0.05
    max_distance: float = 0.1
    max_tv_distance: float = 0.05
    max_missing_share_change: float = 0.01
    max_drift_share: float = 0.5
    permutations: int = PERMUTATIONS
    permutation_below: int = PERMUTATION_BELOW
    seed: int = 0

    @classmethod
    def from_thresholds(cls, th: Thresholds, seed: int = 0) -> DriftPolicy:
        return cls(alpha=th.alpha, max_distance=th.max_distance,
                   max_tv_distance=th.max_tv_distance,
                   max_missing_share_change=th.max_missing_share_change,
                   max_drift_share=th.max_drift_share, seed=seed)


@dataclass(frozen=True)
class Sample:
    """One feature's rows in one sample: a value per row (NaN or None where missing) and
    the request each row came from (None: every row is its own request, as in a file)."""

    values: NDArray[Any]
    requests: NDArray[Any] | None = None

    def __post_init__(self) -> None:
        if self.requests is not None and len(self.requests) != len(self.values):
            raise ValueError(f"{len(self.values)} values but {len(self.requests)} request ids")


@dataclass(frozen=True)
class Check:
    """One test of the family: a feature's distribution, or its share of missing values."""

    feature: str
    check: Literal["distribution", "missing_share"]
    test: ShareTest | None
    effect: str
    size: float | None
    threshold: float
    p_adjusted: float | None = None
    significant: bool = False
    drift: bool = False
    explanation: str = ""


@dataclass(frozen=True)
class FeatureDrift:
    """What the drift rule found for one feature."""

    name: str
    kind: Kind
    levels: str
    distribution: Check
    missing: Check
    info: dict[str, float | None] = field(default_factory=dict)
    drift: bool = False


@dataclass(frozen=True)
class DriftResult:
    """The drift findings of a window: per feature, and what the family says together."""

    features: list[FeatureDrift]
    drifted: list[str]
    n_tested: int
    tests: int
    drift_share: float | None
    dataset_drift: bool
    alpha: float
    correction: str = "holm"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and infinities as None)."""
        out: dict[str, Any] = _clean(asdict(self))
        return out


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float | np.floating):
        return num(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# -- levels ----------------------------------------------------------------------------------

def _numeric(s: Sample) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    v = np.asarray(s.values, dtype=np.float64)
    return v, np.isfinite(v)


def _categorical(s: Sample) -> tuple[NDArray[Any], NDArray[np.bool_]]:
    v = np.asarray(s.values, dtype=object)
    present = (v != None) & (v == v)  # noqa: E711 - elementwise: None and NaN are missing
    return v, np.asarray(present, dtype=bool)


def _requests(s: Sample, keep: NDArray[np.bool_]) -> NDArray[Any] | None:
    return None if s.requests is None else np.asarray(s.requests)[keep]


def numeric_levels(ref: NDArray[np.float64], cur: NDArray[np.float64]
                   ) -> tuple[NDArray[np.int64], NDArray[np.int64], int, str]:
    """Each value's level: its distinct value (≤ 20 of them) or its pooled-quantile bin."""
    pooled = np.sort(np.concatenate([ref, cur]))
    starts = np.flatnonzero(np.diff(pooled)) + 1
    if starts.size + 1 <= MAX_LEVELS:
        distinct = pooled[np.concatenate([[0], starts])]
        return (np.searchsorted(distinct, ref), np.searchsorted(distinct, cur), distinct.size,
                f"{distinct.size} distinct values")
    bins = int(min(MAX_LEVELS, max(2, min(ref.size, cur.size) // MIN_PER_BIN)))
    # the inverted-CDF quantiles j/bins of the pooled values; equal edges collapse
    at = np.ceil(np.arange(1, bins) / bins * pooled.size).astype(np.int64) - 1
    edges = np.unique(pooled[at])
    n_levels = edges.size + 1
    return (np.searchsorted(edges, ref, side="right"), np.searchsorted(edges, cur, side="right"),
            n_levels, f"{n_levels} bins at the pooled quantiles")


def categorical_levels(ref: NDArray[Any], cur: NDArray[Any]
                       ) -> tuple[NDArray[np.int64], NDArray[np.int64], int, list[str]]:
    """Each value's category index (categories compared as text)."""
    names, index = np.unique(np.concatenate([ref, cur]).astype(str), return_inverse=True)
    return index[: ref.size], index[ref.size:], int(names.size), [str(n) for n in names]


# -- effect sizes ----------------------------------------------------------------------------

def cdf_distances(ref: NDArray[np.float64], cur: NDArray[np.float64]) -> tuple[float, float]:
    """Normalised Wasserstein distance and the Kolmogorov-Smirnov statistic.

    Wasserstein-1 (the area between the two empirical CDFs: how far values move on
    average to turn one sample into the other) over the reference's SD, or the pooled SD
    when the reference is constant; KS is the largest vertical gap between the CDFs.
    """
    r, c = np.sort(ref), np.sort(cur)
    pooled = np.sort(np.concatenate([r, c]))
    r, c, pooled = (r, c, pooled) if pooled.size == 0 else _within_squares(r, c, pooled)
    gap = (np.searchsorted(r, pooled[:-1], side="right") / r.size
           - np.searchsorted(c, pooled[:-1], side="right") / c.size)
    w1 = float(np.sum(np.abs(gap) * np.diff(pooled)))
    ks = float(np.max(np.abs(gap))) if gap.size else 0.0
    scale = float(np.std(r))
    if scale <= 0:
        scale = float(np.std(pooled))
    return (w1 / scale if scale > 0 else 0.0), ks


def _within_squares(*values: NDArray[np.float64]) -> tuple[NDArray[np.float64], ...]:
    """``values`` scaled by one power of two (exact) when their largest magnitude is past
    1e150, where a variance's squares overflow (a diverged model's 1e200); a ratio of their
    spreads is unchanged."""
    factor = _square_factor(*values)
    return values if factor == 1.0 else tuple(v * factor for v in values)


def _square_factor(*values: NDArray[np.float64]) -> float:
    """The power of two ``_within_squares`` scales ``values`` by (1 when it does not)."""
    top = max(float(np.max(np.abs(v))) if v.size else 0.0 for v in values)
    if not top > 1e150 or math.isinf(top):
        return 1.0
    return 2.0 ** -math.frexp(top)[1]


def total_variation(ref: Counts, cur: Counts) -> float:
    """Half the sum of the absolute share differences: the share of rows that would have
    to change category to turn one sample's shares into the other's."""
    return float(np.abs(cur.totals / cur.rows - ref.totals / ref.rows).sum() / 2)


# -- one feature -----------------------------------------------------------------------------

def _missing_check(name: str, ref: Sample, cur: Sample, ref_present: NDArray[np.bool_],
                   cur_present: NDArray[np.bool_], policy: DriftPolicy) -> Check:
    r = counts((~ref_present).astype(np.int64), 2, ref.requests)
    c = counts((~cur_present).astype(np.int64), 2, cur.requests)
    if r.rows == 0 or c.rows == 0:
        return Check(name, "missing_share", None, "missing_share_change", None,
                     policy.max_missing_share_change, explanation="no rows on a side")
    change = float(c.totals[1] / c.rows - r.totals[1] / r.rows)
    test = share_test(r, c, ordered=False, seed=seed_for(f"{name}/missing", policy.seed),
                      permutations=policy.permutations,
                      permutation_below=policy.permutation_below)
    none = r.totals[1] + c.totals[1] == 0
    return Check(name, "missing_share", test, "missing_share_change", change,
                 policy.max_missing_share_change,
                 explanation="" if test else ("no missing values on either side" if none
                                              else "every value missing on both sides"))


def feature_tests(name: str, kind: Kind, ref: Sample, cur: Sample, policy: DriftPolicy
                  ) -> FeatureDrift:
    """One feature's distribution and missing-share tests (p-values not yet adjusted)."""
    if kind == "numeric":
        rv, rp = _numeric(ref)
        cv, cp = _numeric(cur)
    else:
        rv, rp = _categorical(ref)
        cv, cp = _categorical(cur)
    missing = _missing_check(name, ref, cur, rp, cp, policy)
    info: dict[str, float | None] = {}
    if not rp.any() or not cp.any():
        dist = Check(name, "distribution", None,
                     "wasserstein_normed" if kind == "numeric" else "total_variation", None,
                     policy.max_distance if kind == "numeric" else policy.max_tv_distance,
                     explanation="no values on a side")
        return FeatureDrift(name, kind, "", dist, missing, info)
    if kind == "numeric":
        r, c = rv[rp], cv[cp]
        rl, cl, n_levels, described = numeric_levels(r, c)
        size, ks = cdf_distances(r, c)
        effect, threshold = "wasserstein_normed", policy.max_distance
        # Scaled, so that sums of values near float8's largest (1.7e308) do not overflow.
        factor = _square_factor(r, c)
        rs, cs = (r, c) if factor == 1.0 else (r * factor, c * factor)
        r_sd, c_sd = float(np.std(rs)), float(np.std(cs))
        with np.errstate(over="ignore"):
            mean_diff = (np.mean(cs) - np.mean(rs)) / factor
        info = {"ks_statistic": ks,
                "mean_diff": num(mean_diff),
                "sd_ratio": num(c_sd / r_sd) if r_sd > 0 else None,
                "zero_share_reference": float(np.mean(r == 0)),
                "zero_share_current": float(np.mean(c == 0))}
    else:
        rl, cl, n_levels, _ = categorical_levels(rv[rp], cv[cp])
        described = f"{n_levels} categories"
        effect, threshold = "total_variation", policy.max_tv_distance
        unseen = np.setdiff1d(np.unique(cl), np.unique(rl))
        info = {"unseen_share": float(np.isin(cl, unseen).mean()) if cl.size else None}
    r_counts = counts(rl, n_levels, _requests(ref, rp))
    c_counts = counts(cl, n_levels, _requests(cur, cp))
    if kind == "categorical":
        size = total_variation(r_counts, c_counts)
    test = share_test(r_counts, c_counts, ordered=kind == "numeric",
                      seed=seed_for(name, policy.seed), permutations=policy.permutations,
                      permutation_below=policy.permutation_below)
    dist = Check(name, "distribution", test, effect, size, threshold,
                 explanation="" if test else "a single level on both sides")
    return FeatureDrift(name, kind, described, dist, missing, info)


# -- the family ------------------------------------------------------------------------------

def _explain(ch: Check, alpha: float) -> str:
    if ch.test is None:
        return ch.explanation
    p = f"{ch.test.statistic} p = {ch.test.p_value:.3g}, Holm-adjusted {ch.p_adjusted:.3g}"
    size = f"{ch.effect} {abs(ch.size or 0):.3g}"
    if not ch.significant:
        return f"no significant change ({p} ≥ {alpha})"
    if not ch.drift:
        return f"significant but negligible: {size} ≤ {ch.threshold} ({p})"
    return f"drift: {size} > {ch.threshold} and {p} < {alpha}"


def decide(features: Sequence[FeatureDrift], policy: DriftPolicy) -> DriftResult:
    """Holm's correction over every test of every feature, then the drift flags."""
    family = [(i, which) for i, f in enumerate(features) for which in ("distribution", "missing")
              if getattr(f, which).test is not None]
    adjusted = holm([getattr(features[i], w).test.p_value for i, w in family])
    out = list(features)
    for (i, which), p_adj in zip(family, adjusted, strict=True):
        ch: Check = getattr(out[i], which)
        significant = p_adj < policy.alpha
        drift = significant and abs(ch.size or 0.0) > ch.threshold
        ch = replace(ch, p_adjusted=p_adj, significant=significant, drift=drift)
        ch = replace(ch, explanation=_explain(ch, policy.alpha))
        out[i] = (replace(out[i], distribution=ch) if which == "distribution"
                  else replace(out[i], missing=ch))
    out = [replace(f, drift=f.distribution.drift or f.missing.drift) for f in out]
    # A feature with a test of either kind is tested: one whose values all went missing
    # has no distribution test but drifts by its missing share, and counting it in
    # ``drifted`` but not here made the share exceed 1.
    n_tested = sum(1 for f in out
                   if f.distribution.test is not None or f.missing.test is not None)
    drifted = [f.name for f in out if f.drift]
    share = len(drifted) / n_tested if n_tested else None
    return DriftResult(out, drifted, n_tested, len(family), share,
                       bool(share is not None and share >= policy.max_drift_share),
                       policy.alpha)


def window_drift(features: Mapping[str, tuple[Kind, Sample, Sample]], policy: DriftPolicy
                 ) -> DriftResult:
    """Every feature of a window: ``{name: (kind, reference, current)}``."""
    return decide([feature_tests(name, kind, ref, cur, policy)
                   for name, (kind, ref, cur) in features.items()], policy)
