"""The share tests by request: counts, pooling, and the three ways to a p-value."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from shadowproxy.compare import stats
from shadowproxy.compare.shares import (
    Counts,
    counts,
    design_weights,
    from_totals,
    pool_rare,
    share_test,
)


def test_counts_keep_multi_row_requests_apart_from_single_rows() -> None:
    """A request of several rows is one row of ``multi``; one-row requests are tallied."""
    c = counts(np.array([0, 1, 1, 2, 0]), 3, np.array(["a", "b", "b", "c", "b"]))
    assert c.single.tolist() == [1.0, 0.0, 1.0]
    assert c.multi.tolist() == [[1.0, 2.0, 0.0]]
    assert (c.rows, c.requests) == (5.0, 3)
    assert counts(np.array([0, 1, 1]), 2, None).single.tolist() == [1.0, 2.0]


def test_rare_levels_are_pooled_into_one_or_into_a_neighbour() -> None:
    """Unordered: rare levels become one (and join the smallest level if still rare);
    ordered: a rare level joins its smaller neighbour."""
    ref = from_totals(np.array([500.0, 300, 4, 5, 191]))
    cur = from_totals(np.array([480.0, 310, 3, 4, 203]))
    r, c, pooled = pool_rare(ref, cur, ordered=False)
    assert pooled == 1 and sorted(r.totals.tolist()) == [9.0, 191.0, 300.0, 500.0]
    assert sorted(c.totals.tolist()) == [7.0, 203.0, 310.0, 480.0]
    r, c, pooled = pool_rare(ref, cur, ordered=True)
    assert pooled == 1 and r.totals.tolist() == [500.0, 300.0, 9.0, 191.0]
    ref = from_totals(np.array([500.0, 300, 2, 1, 197]))
    cur = from_totals(np.array([480.0, 310, 1, 3, 206]))
    r, c, pooled = pool_rare(ref, cur, ordered=False)
    assert pooled == 2 and sorted(r.totals.tolist()) == [200.0, 300.0, 500.0]


def test_independent_rows_give_pearsons_chi2_test() -> None:
    """One row per request, large samples: the p-value of scipy's χ² contingency test."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, 3000), rng.integers(0, 4, 3000)
    res = share_test(counts(a, 4, None), counts(b, 4, None), ordered=False, seed=1)
    assert res is not None and res.method == "cluster_robust"
    table = [np.bincount(a, minlength=4), np.bincount(b, minlength=4)]
    chi = sps.chi2_contingency(table)
    assert res.value == pytest.approx(chi.statistic)
    assert res.p_value == pytest.approx(chi.pvalue, rel=0.02)
    lam = design_weights(counts(a, 4, None), counts(b, 4, None), ordered=False)
    assert lam == pytest.approx(np.ones(3), abs=0.05)


@pytest.mark.parametrize("n_requests", [300, 3000])
@pytest.mark.parametrize("ordered", [False, True])
def test_a_request_of_five_copies_of_a_row_counts_as_one_row(n_requests: int,
                                                             ordered: bool) -> None:
    """Duplicating every row five times inside its request leaves the p-value unchanged."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, n_requests)
    b = np.minimum(rng.integers(0, 4, n_requests) + (rng.random(n_requests) < 0.05), 3)
    one = share_test(counts(a, 4, None), counts(b, 4, None), ordered=ordered, seed=1,
                     permutations=999)
    req = np.repeat(np.arange(n_requests), 5)
    five = share_test(counts(np.repeat(a, 5), 4, req),
                      counts(np.repeat(b, 5), 4, req + n_requests), ordered=ordered, seed=1,
                      permutations=999)
    assert one is not None and five is not None
    assert five.value == pytest.approx(5 * one.value)
    if one.method == "cluster_robust":
        assert five.p_value == pytest.approx(one.p_value, rel=1e-9)
    else:  # two independent sets of reshuffles
        assert five.p_value == pytest.approx(one.p_value, abs=0.05)


def _clustered(rng: np.random.Generator, requests: int, rho: float) -> np.ndarray:
    u = np.repeat(rng.standard_normal(requests), 5)
    return np.sqrt(rho) * u + np.sqrt(1 - rho) * rng.standard_normal(5 * requests)


@pytest.mark.parametrize("requests", [60, 1200])
def test_correlated_rows_of_a_request_do_not_raise_false_alarms(requests: int) -> None:
    """5-row requests correlated 0.5: ~5% rejections by request, far more by row."""
    rng = np.random.default_rng(4)
    edges = np.array([-0.8, -0.25, 0.25, 0.8])
    windows, by_request, by_row = 120, 0, 0
    req = np.repeat(np.arange(requests), 5)
    for _ in range(windows):
        a = np.searchsorted(edges, _clustered(rng, requests, 0.5))
        b = np.searchsorted(edges, _clustered(rng, requests, 0.5))
        ok = share_test(counts(a, 5, req), counts(b, 5, req + requests), ordered=False,
                        seed=1, permutations=199)
        naive = share_test(counts(a, 5, None), counts(b, 5, None), ordered=False, seed=1,
                           permutations=199)
        assert ok is not None and naive is not None
        by_request += ok.p_value < 0.05
        by_row += naive.p_value < 0.05
    assert by_request / windows <= 0.09
    assert by_row / windows >= 0.12


def test_one_rare_level_on_one_side_keeps_the_false_alarm_rate() -> None:
    """A 0.2% category, often seen on one side only, among 500 rows: ≤ 5% rejections."""
    rng = np.random.default_rng(5)
    shares = np.cumsum([0.5, 0.3, 0.198, 0.002])
    windows, rejected = 300, 0
    for _ in range(windows):
        a = np.searchsorted(shares, rng.random(500))
        b = np.searchsorted(shares, rng.random(500))
        res = share_test(counts(a, 4, None), counts(b, 4, None), ordered=False, seed=1,
                         permutations=199)
        assert res is not None
        rejected += res.p_value < 0.05
    assert rejected / windows <= 0.065


def test_a_rare_level_in_large_samples_gets_an_exact_test() -> None:
    """Two levels, one rare, one row per request: the exact binomial test of its split."""
    res = share_test(from_totals(np.array([2999.0, 1])), from_totals(np.array([2993.0, 7])),
                     ordered=False, seed=0)
    assert res is not None and res.method == "exact_by_request"
    assert res.p_value == pytest.approx(sps.binomtest(7, 8, 0.5).pvalue)
    # the rare rows of one request land together
    ref = Counts(np.array([[3.0, 3.0]]), np.array([2994.0, 0.0]))
    cur = Counts(np.zeros((0, 2)), np.array([2999.0, 1.0]))
    res = share_test(ref, cur, ordered=False, seed=0)
    assert res is not None and res.method == "exact_by_request"
    # the 3-row request lands in either sample with probability 1/2, the single row too:
    # current counts 0, 1, 3, 4 with probability 1/4 each; observed 1: p = 1
    assert res.p_value == pytest.approx(1.0)


def test_the_permutation_p_value_is_never_zero_and_finds_a_clear_change() -> None:
    """Reshuffles count the observed split: p ≥ 1/(B+1); a large change reaches that floor."""
    rng = np.random.default_rng(6)
    a = rng.integers(0, 3, 200)
    b = np.minimum(rng.integers(0, 3, 200) + 1, 2)
    res = share_test(counts(a, 3, None), counts(b, 3, None), ordered=True, seed=1,
                     permutations=499)
    assert res is not None and res.method == "permutation_by_request"
    assert res.p_value == pytest.approx(1 / 500)


def test_saddlepoint_law_is_used_with_the_estimated_design_effect() -> None:
    """Requests of 5 identical rows: weights ≈ 5, the p-value that of χ²/5."""
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 3, 2000), rng.integers(0, 3, 2000)
    req = np.repeat(np.arange(2000), 5)
    ca, cb = counts(np.repeat(a, 5), 3, req), counts(np.repeat(b, 5), 3, req + 2000)
    lam = design_weights(ca, cb, ordered=False)
    assert lam == pytest.approx([5.0, 5.0], rel=0.1)
    res = share_test(ca, cb, ordered=False, seed=0)
    assert res is not None
    assert res.p_value == pytest.approx(stats.weighted_chi2_sf(res.value, lam))
    assert "design effect 5.0" in res.why


def test_a_file_of_single_rows_against_batched_requests_is_not_reshuffled() -> None:
    """Training-file rows vs correlated 5-row requests: no reshuffling of unlike units,
    and false alarms stay near 5% (reshuffling gives about 8%)."""
    rng = np.random.default_rng(8)
    edges = np.array([-0.8, -0.25, 0.25, 0.8])
    windows, rejected = 300, 0
    req = np.repeat(np.arange(60), 5)
    for i in range(windows):
        ref = np.searchsorted(edges, rng.standard_normal(20_000))
        cur = np.searchsorted(edges, _clustered(rng, 60, 0.5))
        res = share_test(counts(ref, 5, None), counts(cur, 5, req), ordered=True, seed=i)
        assert res is not None and res.method == "cluster_robust"
        rejected += res.p_value < 0.05
    assert rejected / windows <= 0.065
