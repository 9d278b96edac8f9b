"""The slice-against-the-rest test: requests as the unit, whatever the correlation inside."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from shadowproxy.compare.subgroup import slice_test


def batch(rng: np.random.Generator, requests: int, rows: int, rho: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """|shadow − primary| of ``requests`` requests of ``rows`` rows correlated ``rho``."""
    req = np.repeat(np.arange(requests), rows)
    z = np.sqrt(rho) * rng.standard_normal(requests)[req] + np.sqrt(1 - rho) * \
        rng.standard_normal(req.size)
    return np.abs(z), req


def test_single_rows_give_about_welchs_t_on_large_samples() -> None:
    """One row per request, 1,000+ a side: the cluster-robust t is Welch's (to G/(G−1))."""
    rng = np.random.default_rng(1)
    e = rng.exponential(1, 3000)
    mask = rng.random(3000) < 0.4
    e[mask] += 0.1
    res = slice_test(e, mask, np.arange(3000), binary=False, seed=1)
    welch = sps.ttest_ind(e[mask], e[~mask], equal_var=False)
    assert res["method"] == "cluster_robust" and res["df"] == 2999
    assert res["statistic"] == pytest.approx(welch.statistic, rel=2e-3)
    assert res["p_value"] == pytest.approx(welch.pvalue, rel=2e-2)
    assert res["diff"] == pytest.approx(e[mask].mean() - e[~mask].mean())


@pytest.mark.parametrize("split", [False, True])
def test_correlated_rows_of_a_request_do_not_raise_false_alarms(split: bool) -> None:
    """Requests of 10 rows correlated 0.6: ≤ 5% false alarms by request (rows: far more)."""
    rng = np.random.default_rng(2)
    alarms = row_alarms = 0
    windows = 200
    for _ in range(windows):
        e, req = batch(rng, 120, 10, 0.6)
        # a SQL slice holds whole requests; a feature slice can take some rows of each
        mask = (rng.random(e.size) < 0.3) if split else (rng.random(120) < 0.3)[req]
        res = slice_test(e, mask, req, binary=False, seed=int(rng.integers(1 << 31)),
                         permutations=199)
        assert res["method"] == ("cluster_robust" if split else "permutation_by_request")
        alarms += res["p_value"] < 0.05
        row_alarms += sps.ttest_ind(e[mask], e[~mask], equal_var=False).pvalue < 0.05
    assert alarms / windows <= 0.08
    if not split:
        assert row_alarms / windows > 0.25


def test_disagreement_in_whole_requests_is_a_share_test_by_request() -> None:
    """0/1 disagreement, a SQL slice: the drift rule's two-level test finds a clear excess."""
    rng = np.random.default_rng(3)
    req = np.repeat(np.arange(400), 2)
    mask = (np.arange(400) < 100)[req]
    e = (rng.random(800) < np.where(mask, 0.15, 0.03)).astype(float)
    res = slice_test(e, mask, req, binary=True, seed=1)
    assert res["test"] == "pearson_chi2" and res["method"] == "permutation_by_request"
    assert res["requests"] == [100, 300] and res["p_value"] <= 0.001
    assert res["diff"] == pytest.approx(e[mask].mean() - e[~mask].mean())
    none = slice_test(np.zeros(800), mask, req, binary=True, seed=1)
    assert none["test"] is None and none["why"].startswith("no disagreement")


def test_a_side_much_larger_is_thinned_and_the_p_value_is_never_zero() -> None:
    """A slice of 20 requests against 2,000: 200 of them reshuffled; p ≥ 1/(B + 1)."""
    rng = np.random.default_rng(4)
    e = np.concatenate([rng.normal(5, 0.1, 20), rng.normal(0, 0.1, 2000)])
    mask = np.arange(2020) < 20
    res = slice_test(e, mask, np.arange(2020), binary=False, seed=1, permutations=999)
    assert res["method"] == "permutation_by_request"
    assert res["why"].endswith("the larger side thinned to 200 random requests")
    assert res["p_value"] == 1 / 1000


def test_the_clustered_test_is_the_same_at_any_scale_of_the_values() -> None:
    """t is a ratio: the clustered test of values around 1e200 (a diverged candidate) is
    that of the same values scaled down. The squares of the requests' scores overflowed
    past about 1e154, the variance was infinite and the test said t = 0, p = 1."""
    from shadowproxy.compare.subgroup import _cluster_robust

    rng = np.random.default_rng(3)
    s_n = rng.integers(0, 3, 40).astype(np.float64)
    o_n = rng.integers(1, 4, 40).astype(np.float64)
    s_sum = s_n * 1.5 + rng.normal(size=40) * 0.3 * s_n
    o_sum = o_n * 1.0 + rng.normal(size=40) * 0.3 * o_n
    diff = s_sum.sum() / s_n.sum() - o_sum.sum() / o_n.sum()
    small = _cluster_robust(s_sum, s_n, o_sum, o_n, diff)
    big = _cluster_robust(s_sum * 1e200, s_n, o_sum * 1e200, o_n, diff * 1e200)
    assert small[0] is not None and small[2] is not None and small[2] < 0.05
    assert big[1] == small[1]
    assert big[0] == pytest.approx(small[0], rel=1e-9)
    assert big[2] == pytest.approx(small[2], rel=1e-6)
