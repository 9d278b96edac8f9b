"""Do the shares of rows in a few levels differ between two samples? The request is the unit.

Every drift test of the report reduces a feature to *levels* (its categories, its distinct
values, or bins of its values) and asks whether the share of rows in each level differs
between the reference and the current sample. Rows of one batch request are not
independent (they often share a user, a time, a source), so nothing here counts rows as
independent draws: each sample is kept as per-request counts, and the p-value comes from
one of three places, chosen by how much data there is:

- fewer than ``permutation_below`` requests on a side, and requests of similar size on both
  sides: a **permutation test by request** — whole requests are reshuffled between the two
  samples and the statistic recomputed; the p-value is the share of reshuffles at least as
  extreme (counting the observed one, so it is never 0). Exact in finite samples, whatever
  the correlation inside a request. (A file of independent rows against batched live
  requests are not interchangeable units: those go to the large-sample law at any size.)
- otherwise, every level with an expected count of 5 or more: the statistic's large-sample
  distribution, a weighted sum of χ²₁ variables whose weights are the **design effects**
  (how much more the shares vary because rows come in requests than if they were
  independent), estimated from the per-request counts (a cluster-robust covariance, the
  second-order Rao-Scott correction of survey statistics, with the tail computed by a
  saddlepoint approximation).
- two levels, one of them rare (an expected count under 5 on the smaller side): an **exact
  test by request** — the rare level's count in the current sample given the requests that
  hold it, each landing in the current sample with the current's share of rows.

Rare levels are pooled first when there are more than two (unordered levels into one
"rare" level, ordered levels into a neighbour) until every expected count is 5 or more, so
that no single sparse cell drives the statistic.

Statistics: for unordered levels Pearson's χ² on the shares; for ordered levels (numbers)
an Anderson-Darling statistic on the cumulative shares, most sensitive to a shift of
location, then of spread. No continuity correction is applied anywhere: where counts are
small the p-value is exact instead.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shadowproxy.compare.stats import Array, weighted_chi2_sf

MIN_EXPECTED = 5.0
PERMUTATIONS = 1999
PERMUTATION_BELOW = 1000
THIN_RATIO = 10
SIZE_RATIO = 1.5
_BATCH_CELLS = 4_000_000


@dataclass(frozen=True)
class Counts:
    """One sample's rows by level, grouped by request.

    ``multi`` has one row per request with more than one row (its count in each level);
    ``single`` counts the one-row requests by level (a file of training data is all of them).
    """

    multi: Array
    single: Array

    @property
    def totals(self) -> Array:
        return np.asarray(self.multi.sum(axis=0) + self.single, dtype=np.float64)

    @property
    def rows(self) -> float:
        return float(self.totals.sum())

    @property
    def requests(self) -> int:
        return int(self.multi.shape[0] + self.single.sum())

    def merged(self, into: NDArray[np.int64], n_levels: int) -> Counts:
        """The same rows with level ``i`` counted as level ``into[i]``."""
        m = np.zeros((self.single.size, n_levels))
        m[np.arange(self.single.size), into] = 1
        return Counts(self.multi @ m, self.single @ m)


def counts(levels: NDArray[np.int64], n_levels: int, requests: NDArray[np.generic] | None
           ) -> Counts:
    """Counts from the level of each row and the request it came from (None: one row each)."""
    levels = np.asarray(levels, dtype=np.int64)
    if requests is None or levels.size == 0:
        return Counts(np.zeros((0, n_levels)),
                      np.bincount(levels, minlength=n_levels).astype(np.float64))
    _, req = np.unique(np.asarray(requests), return_inverse=True)
    size = np.bincount(req)
    one = size[req] == 1
    single = np.bincount(levels[one], minlength=n_levels).astype(np.float64)
    multi_req = np.unique(req[~one])
    index = np.searchsorted(multi_req, req[~one])
    multi = np.zeros((multi_req.size, n_levels))
    np.add.at(multi, (index, levels[~one]), 1.0)
    return Counts(multi, single)


def from_totals(totals: Array) -> Counts:
    """Counts of a sample whose rows are independent (one row per request)."""
    t = np.asarray(totals, dtype=np.float64)
    return Counts(np.zeros((0, t.size)), t)


@dataclass(frozen=True)
class ShareTest:
    """The result of one share test: which statistic, its value, its p-value and how."""

    statistic: str
    value: float
    p_value: float
    method: str
    levels: int
    pooled: int
    requests: tuple[int, int]
    why: str


# -- pooling ---------------------------------------------------------------------------------

def _expected(ref: Counts, cur: Counts) -> Array:
    total = ref.totals + cur.totals
    return total * min(ref.rows, cur.rows) / (ref.rows + cur.rows)


def pool_rare(ref: Counts, cur: Counts, ordered: bool) -> tuple[Counts, Counts, int]:
    """Pool levels with an expected count under 5 (when there are more than two levels).

    Unordered: every rare level into one, and that into the smallest other level if it is
    still rare. Ordered: the rarest level into its smaller neighbour, until none is rare.
    Returns the pooled counts and how many levels disappeared.
    """
    n = ref.single.size
    into = np.arange(n)
    groups = n

    def apply(mapping: NDArray[np.int64]) -> None:
        nonlocal into, groups
        _, into = np.unique(mapping[into], return_inverse=True)
        groups = int(into.max()) + 1

    def expected() -> Array:
        e = np.zeros(groups)
        np.add.at(e, into, _expected(ref, cur))
        return e

    if ordered:
        while groups > 2:
            e = expected()
            low = int(np.argmin(e))
            if e[low] >= MIN_EXPECTED:
                break
            if low == 0:
                other = 1
            elif low == groups - 1:
                other = groups - 2
            else:
                other = low - 1 if e[low - 1] <= e[low + 1] else low + 1
            mapping = np.arange(groups)
            mapping[low] = other
            apply(mapping)
    elif groups > 2:
        e = expected()
        rare = e < MIN_EXPECTED
        if rare.sum() >= 2:
            mapping = np.arange(groups)
            mapping[rare] = int(np.flatnonzero(rare)[0])
            apply(mapping)
            e = expected()
            rare = e < MIN_EXPECTED
        if rare.any() and groups > 2:
            low = int(np.flatnonzero(rare)[0])
            others = np.where(rare, np.inf, e)
            mapping = np.arange(groups)
            mapping[low] = int(np.argmin(others))
            apply(mapping)
    pooled = n - groups
    if not pooled:
        return ref, cur, 0
    return ref.merged(into, groups), cur.merged(into, groups), pooled


# -- statistics ------------------------------------------------------------------------------

def _weights(pi: Array, ordered: bool) -> Array:
    """The quadratic form's diagonal: 1/π per level (Pearson), AD weights per boundary."""
    if not ordered:
        return 1 / pi
    h = np.cumsum(pi)[:-1]
    mass = (pi[:-1] + pi[1:]) / 2
    return mass / (h * (1 - h))


def _statistic(ref_tot: Array, cur_tot: Array, pi: Array, ordered: bool) -> Array:
    """Pearson's χ² or the Anderson-Darling statistic; rows of ``*_tot`` are samples."""
    m_r = ref_tot.sum(axis=-1, keepdims=True)
    m_c = cur_tot.sum(axis=-1, keepdims=True)
    diff = cur_tot / m_c - ref_tot / m_r
    if ordered:
        diff = np.cumsum(diff, axis=-1)[..., :-1]
    n_h = (m_r * m_c / (m_r + m_c))[..., 0]
    return np.asarray(n_h * (diff**2 @ _weights(pi, ordered)), dtype=np.float64)


def _cov(c: Counts) -> Array:
    """Cluster-robust covariance of one sample's share vector (residuals by request)."""
    tot = c.totals
    rows = tot.sum()
    p = tot / rows
    u = c.multi - c.multi.sum(axis=1, keepdims=True) * p
    s = c.single
    outer = u.T @ u + np.diag(s) - np.outer(s, p) - np.outer(p, s) + s.sum() * np.outer(p, p)
    r = c.requests
    return np.asarray(outer * (r / (r - 1) if r > 1 else 1.0) / rows**2, dtype=np.float64)


def design_weights(ref: Counts, cur: Counts, ordered: bool) -> Array:
    """The weights λ of the statistic's large-sample law Σ λ·χ²₁ (all 1 for independent
    rows and Pearson's χ²: then it is χ² with levels − 1 degrees of freedom)."""
    pi = (ref.totals + cur.totals) / (ref.rows + cur.rows)
    n_h = ref.rows * cur.rows / (ref.rows + cur.rows)
    v = _cov(ref) + _cov(cur)
    if ordered:
        c = np.tril(np.ones((pi.size - 1, pi.size)))
        v = c @ v @ c.T
    root = np.sqrt(n_h * _weights(pi, ordered))
    lam = np.linalg.eigvalsh(root[:, None] * v * root[None, :])
    return np.asarray(lam[lam > 1e-9 * max(float(lam.max()), 1e-300)], dtype=np.float64)


# -- p-values --------------------------------------------------------------------------------

def _thin(c: Counts, keep: int, rng: np.random.Generator) -> Counts:
    """A random subset of ``keep`` of the sample's requests."""
    n_multi = c.multi.shape[0]
    total = c.requests
    if keep >= total:
        return c
    picked = rng.choice(total, size=keep, replace=False)
    multi = c.multi[np.sort(picked[picked < n_multi])]
    k_single = int(np.sum(picked >= n_multi))
    single = rng.multivariate_hypergeometric(c.single.astype(np.int64), k_single)
    return Counts(multi, single.astype(np.float64))


def _reshuffled_totals(ref: Counts, cur: Counts, b: int, rng: np.random.Generator) -> Array:
    """The current sample's level totals in ``b`` reshuffles of whole requests.

    Requests of one row are interchangeable within a level, so how many of them land in
    the current sample is drawn level by level (hypergeometric); requests of several rows
    are assigned one by one.
    """
    multi = np.vstack([ref.multi, cur.multi]).astype(np.float32)
    single = (ref.single + cur.single).astype(np.int64)
    n_multi, n_single = multi.shape[0], int(single.sum())
    r_cur = cur.requests
    out = np.zeros((b, single.size))
    if n_single == 0:
        k_multi = np.full(b, r_cur)
        labels = np.zeros((b, n_multi), dtype=np.int8)
        labels[:, :r_cur] = 1
        out += rng.permuted(labels, axis=1).astype(np.float32) @ multi
        return out
    k_multi = (rng.hypergeometric(n_multi, n_single, r_cur, size=b) if n_multi
               else np.zeros(b, dtype=np.int64))
    if n_multi:
        keys = rng.random((b, n_multi), dtype=np.float32)
        kth = np.sort(keys, axis=1)[np.arange(b), np.maximum(k_multi - 1, 0)]
        chosen = (keys <= kth[:, None]) & (k_multi[:, None] > 0)
        out += chosen.astype(np.float32) @ multi
    left = r_cur - k_multi
    remaining = n_single
    for level, c in enumerate(single):
        if c:
            x = rng.hypergeometric(c, remaining - c, left) if remaining > c else left
            out[:, level] += x
            left = left - x
            remaining -= int(c)
    return out


def _permutation_p(ref: Counts, cur: Counts, ordered: bool, observed: float, pi: Array,
                   permutations: int, rng: np.random.Generator) -> float:
    """Share of reshuffles of whole requests with a statistic at least the observed one."""
    total = ref.totals + cur.totals
    batch = max(1, _BATCH_CELLS // max(ref.multi.shape[0] + cur.multi.shape[0], 1))
    at_least = 0
    done = 0
    while done < permutations:
        b = min(batch, permutations - done)
        cur_tot = _reshuffled_totals(ref, cur, b, rng)
        t = _statistic(total - cur_tot, cur_tot, pi, ordered)
        at_least += int(np.sum(t >= observed * (1 - 1e-9)))
        done += b
    return (1 + at_least) / (permutations + 1)


def _rare_exact_p(ref: Counts, cur: Counts, rare: int) -> float:
    """Exact two-sided p of the rare level's current count, requests landing at random.

    Each request holding the rare level is in the current sample with the current's share
    of rows; the count is the sum of the landed requests' counts (a binomial when each
    holds one such row). Two-sided as scipy's binomtest: the total probability of counts
    no more likely than the observed one.
    """
    from scipy import stats

    held = np.concatenate([ref.multi[:, rare], cur.multi[:, rare]])
    held = held[held > 0].astype(np.int64)
    ones = int(ref.single[rare] + cur.single[rare])
    share = cur.rows / (ref.rows + cur.rows)
    pmf = stats.binom.pmf(np.arange(ones + 1), ones, share)
    for size, k in zip(*np.unique(held, return_counts=True), strict=True):
        part = np.zeros(int(size) * int(k) + 1)
        part[:: int(size)] = stats.binom.pmf(np.arange(k + 1), k, share)
        pmf = np.convolve(pmf, part)
    observed = round(float(cur.totals[rare]))
    return float(min(1.0, pmf[pmf <= pmf[observed] * (1 + 1e-7)].sum()))


def seed_for(name: str, seed: int) -> int:
    """A reproducible seed per test: the report's seed and the test's name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


def alike(ref: Counts, cur: Counts) -> bool:
    """Whether the two samples come in requests of similar size (mean rows per request
    within a factor 1.5): only then are their requests interchangeable under no change."""
    a, b = ref.rows / ref.requests, cur.rows / cur.requests
    return max(a, b) <= SIZE_RATIO * min(a, b)


def share_test(ref: Counts, cur: Counts, *, ordered: bool, seed: int,
               permutations: int = PERMUTATIONS, permutation_below: int = PERMUTATION_BELOW
               ) -> ShareTest | None:
    """Whether the level shares of ``cur`` differ from ``ref``; None when nothing to test."""
    keep = (ref.totals + cur.totals) > 0
    ref = Counts(ref.multi[:, keep], ref.single[keep])
    cur = Counts(cur.multi[:, keep], cur.single[keep])
    if keep.sum() < 2 or ref.rows == 0 or cur.rows == 0:
        return None
    sizes = (ref.requests, cur.requests)
    few = min(sizes) < permutation_below and alike(ref, cur)
    rng = np.random.default_rng(seed)
    note = ""
    if few and max(sizes) > THIN_RATIO * min(sizes):
        # a sample far larger than the other adds little precision but costs reshuffles
        keep_n = THIN_RATIO * min(sizes)
        ref, cur = ((_thin(ref, keep_n, rng), cur) if ref.requests > cur.requests
                    else (ref, _thin(cur, keep_n, rng)))
        note = f"; the larger sample thinned to {keep_n} random requests"
    pooled_ref, pooled_cur, pooled = pool_rare(ref, cur, ordered)
    if pooled_ref.single.size >= 2 or not few:
        ref, cur = pooled_ref, pooled_cur
    else:
        pooled = 0  # too few rows for any level to be common: reshuffling needs no pooling
    n_levels = ref.single.size
    if n_levels < 2:
        return None
    name = "anderson_darling" if ordered else "pearson_chi2"
    pi = (ref.totals + cur.totals) / (ref.rows + cur.rows)
    observed = float(_statistic(ref.totals[None], cur.totals[None], pi, ordered)[0])
    if few:
        p = _permutation_p(ref, cur, ordered, observed, pi, permutations, rng)
        return ShareTest(name, observed, p, "permutation_by_request", n_levels, pooled, sizes,
                         f"fewer than {permutation_below} requests on a side: {permutations} "
                         f"reshuffles of whole requests{note}")
    e = _expected(ref, cur)
    if e.min() < MIN_EXPECTED:
        rare = int(np.argmin(e))
        p = _rare_exact_p(ref, cur, rare)
        return ShareTest(name, observed, p, "exact_by_request", n_levels, pooled, sizes,
                         "two levels, one with an expected count under 5: exact test of its "
                         "count, requests landing at random")
    lam = design_weights(ref, cur, ordered)
    # no weights: no variation between requests at all, so any difference is certain
    p = weighted_chi2_sf(observed if observed > 1e-12 else 0.0, lam)
    # Σλ over its value for independent rows: how much requests inflate the variance.
    independent = float(np.sum((pi[:-1] + pi[1:]) / 2)) if ordered else n_levels - 1.0
    deff = float(lam.sum()) / independent
    return ShareTest(name, observed, p, "cluster_robust", n_levels, pooled, sizes,
                     f"{permutation_below} or more requests a side, expected counts ≥ 5: "
                     "large-sample law from the per-request covariance (design effect "
                     f"{deff:.2f})")
