"""Paired tests of the shadow's predictions against the primary's (pure decision code).

Both models answer the same requests, so the question is not whether the two columns of
predictions look alike as distributions (two very different models can produce the same
histogram) but whether, request by request, the shadow answers differently in a systematic
way. Each test here is paired, treats the request as the unit (the rows of a batch request
are not independent answers), and is read together with an effect size a team sets:

- **regression**: the Wilcoxon signed-rank test on each request's mean shadow − primary
  difference (rows of a batch averaged first); the effect is the mean shift over all rows,
  with a 95% confidence interval whose standard error comes from the spread between
  requests. A *systematic difference* is flagged when p < ``alpha`` and
  |mean shift| > max(``max_mean_shift``, ``max_rel_mean_shift`` × mean |primary|).
  Wilcoxon rather than a paired t-test chosen by a normality pre-test: it needs no
  normality, loses about 5% of efficiency when the differences are normal, and a pre-test
  would change the error rates of the test it chooses.
- **classification**: the flip matrix (primary's class × shadow's class). For two classes
  the exact McNemar test on the flips one way against the other; for more, Bowker's test
  of symmetry (every pair of classes flips as often one way as the other). By request:
  a request's flips count together and the p-value comes from flipping the direction of
  whole requests (exact McNemar when every request has one flip, as with single-row
  requests). The effect is the largest net one-way flip between two classes, as a share
  of the pairs; flagged when p < ``alpha`` and that share > ``max_flip_share``.
  Stuart-Maxwell's test of equal class rates is given beside it as information.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats as sps

from shadowproxy.compare.config import Thresholds
from shadowproxy.compare.stats import num

PERMUTATIONS = 1999
EXACT_MAX_SPAN = 200_000


@dataclass(frozen=True)
class PairedPolicy:
    """Significance level and effect thresholds of the paired prediction tests."""

    alpha: float = 0.05
    max_mean_shift: float = 0.0
    max_rel_mean_shift: float = 0.0
    max_flip_share: float = 0.0
    permutations: int = PERMUTATIONS
    seed: int = 0

    @classmethod
    def from_thresholds(cls, th: Thresholds, seed: int = 0) -> PairedPolicy:
        return cls(alpha=th.alpha, max_mean_shift=th.max_mean_shift,
                   max_rel_mean_shift=th.max_rel_mean_shift,
                   max_flip_share=th.max_flip_share, seed=seed)


def _json(obj: Any) -> dict[str, Any]:
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, float | np.floating):
            return num(x)
        if isinstance(x, np.integer):
            return int(x)
        return x

    return dict(clean(asdict(obj)))


def _check(n: int, other: NDArray[Any] | None, what: str) -> None:
    if other is not None and len(other) != n:
        raise ValueError(f"{n} primary predictions but {len(other)} {what}")


def _request_index(requests: NDArray[Any] | None, n: int) -> tuple[NDArray[np.int64], int]:
    if requests is None:
        return np.arange(n), n
    _, inv = np.unique(np.asarray(requests), return_inverse=True)
    return inv.astype(np.int64), int(inv.max()) + 1 if n else 0


# -- regression ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeanShift:
    """Is the shadow systematically higher or lower than the primary?"""

    n: int
    requests: int
    mean_shift: float | None
    ci_low: float | None
    ci_high: float | None
    median_shift: float | None
    share_higher: float | None
    share_lower: float | None
    test: str
    on: str
    statistic: float | None
    p_value: float | None
    threshold: float
    decision: bool
    explanation: str
    ci_level: float = 0.95

    def to_json(self) -> dict[str, Any]:
        return _json(self)


def _mean_abs(x: NDArray[np.float64]) -> float:
    """The mean of |x|, also where the sum overflows (values near float8's largest)."""
    with np.errstate(over="ignore"):
        mean = float(np.mean(np.abs(x)))
    if math.isfinite(mean):
        return mean
    top = float(np.max(np.abs(x)))
    return top * float(np.mean(np.abs(x) / top))


def mean_shift(primary: NDArray[np.float64], shadow: NDArray[np.float64],
               requests: NDArray[Any] | None, policy: PairedPolicy) -> MeanShift:
    """Wilcoxon signed-rank on per-request mean differences; the mean shift with its CI."""
    p = np.asarray(primary, dtype=np.float64)
    s = np.asarray(shadow, dtype=np.float64)
    _check(p.size, s, "shadow predictions")
    _check(p.size, requests, "request ids")
    keep = np.isfinite(p) & np.isfinite(s)
    req = None if requests is None else np.asarray(requests)[keep]
    p, s = p[keep], s[keep]
    scale = 1.0
    with np.errstate(over="ignore"):
        d = s - p
        if not math.isfinite(float(np.abs(d).sum())):
            # Near float8's largest numbers (1.7e308 against -1.7e308) the differences or
            # their sums overflow: they are read divided by a power of two that keeps any
            # sum of them in range (exact), and the shift, its interval and the median are
            # scaled back (an infinity only where they are past the range themselves). The
            # test reads ranks and signs, which scaling keeps.
            scale = 2.0 ** math.ceil(math.log2(2 * d.size))
            d = s / scale - p / scale
    inv, r = _request_index(req, d.size)
    test, on = "wilcoxon_signed_rank", "the mean shadow − primary difference of each request"
    if d.size == 0:
        return MeanShift(0, 0, None, None, None, None, None, None, test, on, None, None, 0.0,
                         False, "no paired numeric predictions")
    threshold = max(policy.max_mean_shift, policy.max_rel_mean_shift * _mean_abs(p))
    sums = np.bincount(inv, weights=d, minlength=r)
    sizes = np.bincount(inv, minlength=r).astype(np.float64)
    shift = float(d.mean())
    low = high = None
    if r > 1:
        resid = sums - sizes * shift
        # hypot, not sqrt(sum(resid**2)): it scales, so residuals past 1e154 (a diverged
        # model's predictions) give their size instead of an overflow to inf.
        se = math.sqrt(r / (r - 1)) * math.hypot(*resid.tolist()) / d.size
        half = float(sps.t.ppf(0.975, r - 1)) * se
        low, high = scale * (shift - half), scale * (shift + half)
    shift *= scale
    means = sums / sizes
    nonzero = means[means != 0]
    base = MeanShift(n=int(d.size), requests=r, mean_shift=shift, ci_low=low, ci_high=high,
                     median_shift=scale * float(np.median(d)),
                     share_higher=float(np.mean(d > 0)),
                     share_lower=float(np.mean(d < 0)), test=test, on=on, statistic=None,
                     p_value=None, threshold=threshold, decision=False,
                     explanation="every pair of predictions is identical")
    if nonzero.size == 0:
        return base
    res = sps.wilcoxon(nonzero)
    pv = float(res.pvalue)
    significant = pv < policy.alpha
    decision = significant and abs(shift) > threshold
    ci = f" (95% CI {low:+.4g} to {high:+.4g})" if low is not None and high is not None else ""
    what = (f"mean shift {shift:+.4g}{ci}, shadow higher in {np.mean(d > 0):.1%} of pairs and "
            f"lower in {np.mean(d < 0):.1%}; Wilcoxon signed-rank on {nonzero.size} request "
            f"means p = {pv:.3g}")
    if decision:
        direction = "higher" if shift > 0 else "lower"
        limit = f" and |shift| > {threshold:.4g}" if threshold > 0 else ""
        explanation = f"the shadow is systematically {direction}: {what} < {policy.alpha}{limit}"
    elif significant:
        explanation = f"a significant but negligible shift (|shift| ≤ {threshold:.4g}): {what}"
    else:
        # "not significant", not "no difference": on a few pairs a real shift goes
        # unnoticed, and the absence of evidence must not read as evidence of absence.
        explanation = f"systematic difference not significant: {what} ≥ {policy.alpha}"
    return replace(base, statistic=float(res.statistic), p_value=pv, decision=decision,
                   explanation=explanation)


# -- classification --------------------------------------------------------------------------

@dataclass(frozen=True)
class Flip:
    """Flips between two classes: how many each way, and the net one-way share."""

    a: str
    b: str
    a_to_b: int
    b_to_a: int
    net_share: float


@dataclass(frozen=True)
class FlipTest:
    """Does the shadow turn one class into another more often than back?"""

    n: int
    requests: int
    classes: list[str]
    test: str
    method: str
    statistic: float | None
    df: int
    p_value: float | None
    largest: Flip | None
    threshold: float
    decision: bool
    explanation: str
    marginal: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return _json(self)


def _sign_flip_exact(magnitudes: NDArray[np.int64], observed: int) -> float:
    """P(|Σ ±aᵣ| ≥ |observed|) with independent fair signs: exact, by convolution."""
    values, count = np.unique(magnitudes, return_counts=True)
    pmf = np.ones(1)
    for a, k in zip(values, count, strict=True):
        part = np.zeros(2 * int(a) * int(k) + 1)
        part[:: 2 * int(a)] = sps.binom.pmf(np.arange(k + 1), k, 0.5)
        pmf = (np.convolve(pmf, part) if pmf.size * part.size < 5e7
               else np.clip(_fftconvolve(pmf, part), 0, None))
    span = (pmf.size - 1) // 2
    grid = np.arange(-span, span + 1)
    return float(min(1.0, pmf[np.abs(grid) >= abs(observed)].sum()))


def _fftconvolve(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    from scipy.signal import fftconvolve

    return np.asarray(fftconvolve(a, b), dtype=np.float64)


def flip_test(primary: NDArray[Any], shadow: NDArray[Any], requests: NDArray[Any] | None,
              policy: PairedPolicy) -> FlipTest:
    """Exact McNemar (two classes) or Bowker (more), by request; the largest one-way flip."""
    p = np.asarray(primary).astype(str)
    s = np.asarray(shadow).astype(str)
    _check(p.size, s, "shadow predictions")
    _check(p.size, requests, "request ids")
    classes, codes = np.unique(np.concatenate([p, s]), return_inverse=True)
    k = classes.size
    pc, sc = codes[: p.size], codes[p.size:]
    inv, r = _request_index(requests, p.size)
    names = [str(c) for c in classes]
    two = k <= 2
    test = "mcnemar_exact" if two else "bowker"
    if p.size == 0:
        return FlipTest(0, 0, names, test, "none", None, 0, None, None, policy.max_flip_share,
                        False, "no paired predictions")
    flips = pc != sc
    lo, hi = np.minimum(pc, sc)[flips], np.maximum(pc, sc)[flips]
    sign = np.where(pc[flips] < sc[flips], 1.0, -1.0)
    pair_ids, pair = np.unique(lo * k + hi, return_inverse=True)
    n_pairs = pair_ids.size
    if n_pairs == 0:
        return FlipTest(int(p.size), r, names, test, "none", 0.0, 0, 1.0, None,
                        policy.max_flip_share, False,
                        "the shadow predicts the same class as the primary on every pair")
    # d[request, pair]: flips low→high minus high→low within each request
    fr, d_idx = np.unique(inv[flips], return_inverse=True)
    d = np.zeros((fr.size, n_pairs))
    np.add.at(d, (d_idx, pair), sign)
    d = d[np.any(d != 0, axis=1)]
    total = d.sum(axis=0)
    forward = np.bincount(pair, weights=(sign > 0).astype(float), minlength=n_pairs)
    back = np.bincount(pair, weights=(sign < 0).astype(float), minlength=n_pairs)
    j = int(np.argmax(np.abs(forward - back)))
    a, b = divmod(int(pair_ids[j]), k)
    fwd, bwd = int(forward[j]), int(back[j])
    if bwd > fwd:
        a, b, fwd, bwd = b, a, bwd, fwd
    largest = Flip(names[a], names[b], fwd, bwd, (fwd - bwd) / p.size)
    if d.shape[0] == 0:
        pv, stat, df, method = 1.0, 0.0, n_pairs, "exact"
    elif n_pairs == 1:
        mags = np.abs(d[:, 0]).astype(np.int64)
        stat, df = float(total[0] ** 2 / np.sum(d[:, 0] ** 2)), 1
        if np.all(mags == 1):
            pv = float(sps.binomtest(int(np.sum(d[:, 0] > 0)), mags.size, 0.5).pvalue)
            method = "exact"
        elif int(mags.sum()) <= EXACT_MAX_SPAN:
            pv, method = _sign_flip_exact(mags, int(total[0])), "exact_sign_flip_by_request"
        else:
            pv, method = float(sps.chi2.sf(stat, 1)), "chi2_by_request"
    else:
        stat, df, pv, method = _bowker_by_request(d, total, policy)
    significant = pv < policy.alpha
    decision = significant and abs(largest.net_share) > policy.max_flip_share
    what = (f"{largest.a} → {largest.b} in {fwd} pairs and back in {bwd} (net "
            f"{largest.net_share:.2%} of {p.size}); {test} p = {pv:.3g}")
    if decision:
        limit = (f" and net share > {policy.max_flip_share:.2%}"
                 if policy.max_flip_share > 0 else "")
        explanation = (f"the shadow flips predictions one way: {what} < {policy.alpha}{limit}")
    elif significant:
        explanation = (f"one-way flips significant but negligible (net share ≤ "
                       f"{policy.max_flip_share:.2%}): {what}")
    else:
        explanation = f"one-way flips not significant: {what} ≥ {policy.alpha}"
    return FlipTest(int(p.size), r, names, test, method, stat, df, pv, largest,
                    policy.max_flip_share, decision, explanation,
                    None if two else _stuart_maxwell(pc, sc, inv, k))


def _bowker_by_request(d: NDArray[np.float64], total: NDArray[np.float64],
                       policy: PairedPolicy) -> tuple[float, int, float, str]:
    """Bowker's statistic with the covariance from requests; p by flipping whole requests.

    Requests with one flip are interchangeable within their pair of classes, so their signs
    are drawn as binomials; requests with several flips get a random sign each.
    """
    v = d.T @ d
    inv_v = np.linalg.pinv(v)
    df = int(np.linalg.matrix_rank(v))
    stat = float(total @ inv_v @ total)
    single = (np.abs(d).sum(axis=1) == 1)
    n_single = np.abs(d[single]).sum(axis=0).astype(np.int64)
    multi = d[~single]
    rng = np.random.default_rng(policy.seed)
    b = policy.permutations
    draws = 2.0 * rng.binomial(n_single, 0.5, size=(b, n_single.size)) - n_single
    if multi.shape[0]:
        draws += rng.choice([-1.0, 1.0], size=(b, multi.shape[0])) @ multi
    t = np.einsum("bi,ij,bj->b", draws, inv_v, draws)
    pv = (1 + int(np.sum(t >= stat * (1 - 1e-9)))) / (b + 1)
    return stat, df, pv, "sign_flip_by_request"


def _stuart_maxwell(pc: NDArray[np.int64], sc: NDArray[np.int64], inv: NDArray[np.int64],
                    k: int) -> dict[str, Any]:
    """Stuart-Maxwell test of equal class rates (information), covariance from requests."""
    r = int(inv.max()) + 1
    diff = np.zeros((r, k))
    np.add.at(diff, (inv, sc), 1.0)
    np.add.at(diff, (inv, pc), -1.0)
    diff = diff[:, :-1]
    total = diff.sum(axis=0)
    v = diff.T @ diff
    rank = int(np.linalg.matrix_rank(v))
    if rank == 0:
        return {"test": "stuart_maxwell", "statistic": 0.0, "df": 0, "p_value": 1.0}
    stat = float(total @ np.linalg.pinv(v) @ total)
    return {"test": "stuart_maxwell", "statistic": stat, "df": rank,
            "p_value": float(sps.chi2.sf(stat, rank))}
