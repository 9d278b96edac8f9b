"""Do the two models part more in a slice than in the rest? The request is the unit (pure).

A slice holds prediction rows: whole requests (a SQL slice), or the rows of batch requests
whose feature falls in a bin or equals a value (a feature slice). Each row carries ``e``,
how far the two models are apart on it: |shadow − primary| (regression) or 1 where they
disagree (classification). The test asks whether ``e`` is larger in the slice than in the
rest, and never counts the rows of one request as independent answers:

- **disagreement**, no request with rows on both sides: the share of disagreeing rows in
  the slice against the rest by ``shares.share_test`` (the drift rule's test of two levels:
  a permutation by request under 1,000 requests a side, an exact test by request when
  disagreements are rare, the design-effect law otherwise);
- **|shadow − primary|**, no request with rows on both sides: the difference of the mean
  ``e`` (over rows) in the slice and in the rest; its p-value from a permutation by request
  (whole requests reshuffled between the slice and the rest, 1,999 times) when a side has
  fewer than 1,000 requests and the requests are of similar size on both sides, else from
  the large-sample law below;
- otherwise — large samples, or a feature slice that splits batch requests, so that the
  slice and the rest share requests and are not independent samples — the same difference
  of means with a **cluster-robust** standard error (a request's rows in the slice and in
  the rest form one cluster), against Student's t with (requests − 1) degrees of freedom.

Every p-value is two-sided; ``diff`` (slice − rest) says in which direction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats as sps

from shadowproxy.compare.shares import (
    PERMUTATION_BELOW,
    PERMUTATIONS,
    SIZE_RATIO,
    THIN_RATIO,
    counts,
    share_test,
)
from shadowproxy.compare.stats import num

_BATCH_CELLS = 2_000_000


def slice_test(e: NDArray[np.float64], in_slice: NDArray[np.bool_], requests: NDArray[Any],
               *, binary: bool, seed: int, permutations: int = PERMUTATIONS,
               permutation_below: int = PERMUTATION_BELOW, scale: float = 1.0
               ) -> dict[str, Any]:
    """Whether ``e`` differs between the rows ``in_slice`` and the others, by request.

    ``e`` may come divided by ``scale`` (a power of two: differences near float8's largest
    numbers, whose sums would overflow); the tests are the same on it, and the difference
    of means is given scaled back."""
    e = np.asarray(e, dtype=np.float64)
    mask = np.asarray(in_slice, dtype=bool)
    _, inv = np.unique(np.asarray(requests), return_inverse=True)
    r = int(inv.max()) + 1 if inv.size else 0
    s_sum = np.bincount(inv[mask], weights=e[mask], minlength=r).astype(np.float64)
    s_n = np.bincount(inv[mask], minlength=r).astype(np.float64)
    o_sum = np.bincount(inv[~mask], weights=e[~mask], minlength=r).astype(np.float64)
    o_n = np.bincount(inv[~mask], minlength=r).astype(np.float64)
    if not s_n.sum() or not o_n.sum():
        return {"test": None, "why": "no rows in the slice or outside it"}
    diff = float(s_sum.sum() / s_n.sum() - o_sum.sum() / o_n.sum())
    sizes = [int(np.sum(s_n > 0)), int(np.sum(o_n > 0))]
    split = bool(np.any((s_n > 0) & (o_n > 0)))
    out: dict[str, Any] = {"diff": diff * scale, "requests": sizes, "split_requests": split}
    if binary and not split:
        test = share_test(counts(e[~mask].astype(np.int64), 2, inv[~mask]),
                          counts(e[mask].astype(np.int64), 2, inv[mask]),
                          ordered=False, seed=seed, permutations=permutations,
                          permutation_below=permutation_below)
        if test is None:
            return {**out, "test": None, "why": "no disagreement in the slice or outside it"}
        return {**out, "test": test.statistic, "statistic": test.value,
                "p_value": test.p_value, "method": test.method, "why": test.why}
    slice_rows, rest_rows = s_n[s_n > 0], o_n[o_n > 0]
    alike = (max(slice_rows.mean(), rest_rows.mean())
             <= SIZE_RATIO * min(slice_rows.mean(), rest_rows.mean()))
    if not split and min(sizes) < permutation_below and alike:
        p, note = _permutation_p(s_sum[s_n > 0], slice_rows, o_sum[o_n > 0], rest_rows, diff,
                                 permutations, np.random.default_rng(seed))
        return {**out, "test": "mean_difference", "statistic": diff * scale, "p_value": p,
                "method": "permutation_by_request",
                "why": f"fewer than {permutation_below} requests on a side: {permutations} "
                       f"reshuffles of whole requests{note}"}
    t_stat, df, p_robust = _cluster_robust(s_sum, s_n, o_sum, o_n, diff)
    why = ("requests with rows in the slice and outside it" if split
           else f"{permutation_below} or more requests a side, or requests of different sizes")
    return {**out, "test": "mean_difference", "statistic": num(t_stat), "df": df,
            "p_value": p_robust,
            "method": "cluster_robust", "why": f"{why}: cluster-robust standard error by "
                                               "request, Student's t"}


def _permutation_p(s_sum: NDArray[np.float64], s_n: NDArray[np.float64],
                   o_sum: NDArray[np.float64], o_n: NDArray[np.float64], observed: float,
                   permutations: int, rng: np.random.Generator) -> tuple[float, str]:
    """Share of reshuffles of whole requests whose |difference of means| is at least the
    observed one (counting the observed split, so never 0)."""
    note = ""
    k, m = s_sum.size, o_sum.size
    if max(k, m) > THIN_RATIO * min(k, m):
        # a side far larger than the other adds little precision but costs reshuffles
        keep = THIN_RATIO * min(k, m)
        if k > m:
            pick = rng.choice(k, keep, replace=False)
            s_sum, s_n, k = s_sum[pick], s_n[pick], keep
        else:
            pick = rng.choice(m, keep, replace=False)
            o_sum, o_n = o_sum[pick], o_n[pick]
        note = f"; the larger side thinned to {keep} random requests"
        observed = float(s_sum.sum() / s_n.sum() - o_sum.sum() / o_n.sum())
    sums, rows = np.concatenate([s_sum, o_sum]), np.concatenate([s_n, o_n])
    total_sum, total_rows = float(sums.sum()), float(rows.sum())
    batch = max(1, _BATCH_CELLS // sums.size)
    at_least = done = 0
    while done < permutations:
        b = min(batch, permutations - done)
        idx = np.argpartition(rng.random((b, sums.size)), k - 1, axis=1)[:, :k]
        a_sum, a_rows = sums[idx].sum(axis=1), rows[idx].sum(axis=1)
        d = a_sum / a_rows - (total_sum - a_sum) / (total_rows - a_rows)
        at_least += int(np.sum(np.abs(d) >= abs(observed) * (1 - 1e-9)))
        done += b
    return (1 + at_least) / (permutations + 1), note


def _cluster_robust(s_sum: NDArray[np.float64], s_n: NDArray[np.float64],
                    o_sum: NDArray[np.float64], o_n: NDArray[np.float64], diff: float
                    ) -> tuple[float | None, int, float | None]:
    """t, degrees of freedom and p of the difference of means, clustered by request.

    Each request's contribution to the difference (its slice rows' residuals over the
    slice's rows, minus its other rows' over the rest's) is one cluster's score; the
    variance is the sum of their squares times G / (G − 1) (CR1).
    """
    n1, n0 = s_n.sum(), o_n.sum()
    m1, m0 = s_sum.sum() / n1, o_sum.sum() / n0
    u = (s_sum - m1 * s_n) / n1 - (o_sum - m0 * o_n) / n0
    g = int(np.sum((s_n + o_n) > 0))
    if g < 2:
        return None, 0, None
    # The scores' root sum of squares taken by their largest: squared as they are, scores
    # past about 1e154 (a diverged candidate's values) overflow to an infinite variance.
    scale = float(np.max(np.abs(u)))
    if scale == 0:
        # no variation between requests at all: any difference is certain
        return None, g - 1, 1.0 if diff == 0 else 0.0
    sd = scale * float(np.sqrt(g / (g - 1) * np.sum((u / scale) ** 2)))
    t = diff / sd
    return float(t), g - 1, float(2 * sps.t.sf(abs(t), g - 1))
