"""The paired prediction tests: systematic shifts and one-way flips, by request."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from shadowproxy.compare.config import Thresholds
from shadowproxy.compare.paired import (
    PairedPolicy,
    _sign_flip_exact,
    flip_test,
    mean_shift,
)

POLICY = PairedPolicy()


def test_policy_reads_the_thresholds() -> None:
    """alpha and the effect thresholds come from compare.thresholds."""
    p = PairedPolicy.from_thresholds(Thresholds(alpha=0.01, max_mean_shift=0.2,
                                                max_rel_mean_shift=0.01, max_flip_share=0.02))
    assert (p.alpha, p.max_mean_shift, p.max_rel_mean_shift, p.max_flip_share) == (
        0.01, 0.2, 0.01, 0.02)


def test_a_constant_offset_is_a_systematic_difference() -> None:
    """Shadow = primary + 0.05: Wilcoxon on the differences decides (KS on columns did not)."""
    rng = np.random.default_rng(1)
    p = rng.normal(0, 1, 500)
    s = p + 0.05 + rng.normal(0, 0.02, 500)
    assert sps.ks_2samp(p, s).pvalue > 0.05
    res = mean_shift(p, s, None, POLICY)
    assert res.decision and res.p_value == pytest.approx(sps.wilcoxon(s - p).pvalue)
    assert res.ci_low is not None and res.ci_high is not None
    assert res.ci_low < 0.05 < res.ci_high
    assert res.share_higher == pytest.approx(np.mean(s > p))
    assert res.explanation.startswith("the shadow is systematically higher: mean shift +0.0")
    assert res.to_json()["decision"] is True


def test_the_mean_shift_threshold_keeps_negligible_shifts_out() -> None:
    """Significant but under max_mean_shift (or relative to |primary|): no decision."""
    rng = np.random.default_rng(2)
    p = rng.normal(100, 10, 5000)
    s = p + 0.05 + rng.normal(0, 0.1, 5000)
    res = mean_shift(p, s, None, PairedPolicy(max_mean_shift=0.1))
    assert res.p_value is not None and res.p_value < 1e-10 and not res.decision
    assert res.explanation.startswith("a significant but negligible shift")
    res = mean_shift(p, s, None, PairedPolicy(max_rel_mean_shift=0.001))
    assert res.threshold == pytest.approx(0.001 * np.mean(np.abs(p))) and not res.decision
    assert mean_shift(p, s, None, PairedPolicy(max_mean_shift=0.01)).decision


def test_identical_predictions_and_empty_input_are_no_difference() -> None:
    """Every pair equal: no test, no decision; nothing paired: said so."""
    p = np.arange(20.0)
    assert mean_shift(p, p.copy(), None, POLICY).explanation == (
        "every pair of predictions is identical")
    assert mean_shift(np.array([np.nan]), np.array([1.0]), None, POLICY).n == 0
    with pytest.raises(ValueError, match="3 primary predictions but 2 request ids"):
        mean_shift(np.zeros(3), np.zeros(3), np.zeros(2), POLICY)
    with pytest.raises(ValueError, match="3 primary predictions but 2 shadow predictions"):
        flip_test(np.zeros(3), np.zeros(2), None, POLICY)


def _batched_pairs(rng: np.random.Generator, requests: int, rho: float, offset: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = rng.normal(10, 1, 5 * requests)
    u = np.repeat(rng.standard_normal(requests), 5)
    noise = np.sqrt(rho) * u + np.sqrt(1 - rho) * rng.standard_normal(5 * requests)
    return p, p + offset + 0.1 * noise, np.repeat(np.arange(requests), 5)


def test_batch_rows_correlated_do_not_raise_false_alarms_in_the_paired_test() -> None:
    """5-row requests with correlated differences (ρ = 0.5): ≤ 5% by request, more by row."""
    rng = np.random.default_rng(3)
    windows, by_request, by_row = 300, 0, 0
    for _ in range(windows):
        p, s, req = _batched_pairs(rng, 100, 0.5, 0.0)
        by_request += mean_shift(p, s, req, POLICY).decision
        by_row += mean_shift(p, s, None, POLICY).decision
    assert by_request / windows <= 0.065
    assert by_row / windows >= 0.15


def test_the_confidence_interval_counts_requests_not_rows() -> None:
    """With correlated batch rows the 95% interval is wider than the by-row one, and covers."""
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(200):
        p, s, req = _batched_pairs(rng, 60, 0.5, 0.02)
        res = mean_shift(p, s, req, POLICY)
        assert res.ci_low is not None and res.ci_high is not None
        covered += res.ci_low <= 0.02 <= res.ci_high
    assert covered / 200 >= 0.92
    naive = mean_shift(p, s, None, POLICY)
    assert naive.ci_high is not None and naive.ci_low is not None
    assert (res.ci_high - res.ci_low) > 1.4 * (naive.ci_high - naive.ci_low)


def test_one_way_flips_get_the_exact_mcnemar_test() -> None:
    """20 of 500 answers turned 0 → 1 and none back: exact McNemar p = 2·0.5²⁰ (χ² missed)."""
    p = np.array([0] * 300 + [1] * 200)
    s = p.copy()
    s[:20] = 1
    res = flip_test(p, s, None, POLICY)
    assert res.test == "mcnemar_exact" and res.method == "exact"
    assert res.p_value == pytest.approx(2 * 0.5**20)
    assert res.decision and res.largest is not None
    assert (res.largest.a, res.largest.b, res.largest.a_to_b, res.largest.b_to_a) == (
        "0", "1", 20, 0)
    assert res.largest.net_share == pytest.approx(0.04)
    assert not flip_test(p, s, None, PairedPolicy(max_flip_share=0.05)).decision
    table = [[np.sum(p == 0), np.sum(p == 1)], [np.sum(s == 0), np.sum(s == 1)]]
    assert sps.chi2_contingency(table).pvalue > 0.05


def test_flips_both_ways_are_no_finding() -> None:
    """As many flips each way: p = 1 for equal counts, no decision."""
    p = np.array([0] * 50 + [1] * 50)
    s = p.copy()
    s[:5] = 1
    s[50:55] = 0
    res = flip_test(p, s, None, POLICY)
    assert res.p_value == pytest.approx(1.0) and not res.decision
    assert flip_test(p, p.copy(), None, POLICY).explanation.startswith("the shadow predicts")


def test_the_sign_flip_distribution_is_exact() -> None:
    """Σ ±aᵣ: the convolution equals enumerating every sign pattern."""
    mags = np.array([1, 1, 2, 3, 1, 2], dtype=np.int64)
    sums = [sum(s * a for s, a in zip(signs, mags, strict=True))
            for signs in itertools.product([-1, 1], repeat=mags.size)]
    for observed in (0, 2, 5, 8, 10):
        expected = np.mean([abs(x) >= observed for x in sums])
        assert _sign_flip_exact(mags, observed) == pytest.approx(expected)


def test_flips_in_batches_count_by_request() -> None:
    """Three requests each flip 4 rows 0 → 1: exact p = 2·0.5³ = 0.25, not 2·0.5¹²."""
    p = np.zeros(30, dtype=int)
    s = p.copy()
    req = np.repeat(np.arange(6), 5)
    for r in range(3):
        s[5 * r: 5 * r + 4] = 1
    res = flip_test(p, s, req, POLICY)
    assert res.method == "exact_sign_flip_by_request"
    assert res.p_value == pytest.approx(0.25)
    assert flip_test(p, s, None, POLICY).p_value == pytest.approx(2 * 0.5**12)


def test_k_classes_use_bowker_by_request() -> None:
    """A cycle of one-way flips a → b → c → a: Bowker finds it, Stuart-Maxwell cannot."""
    rng = np.random.default_rng(5)
    p = rng.choice(np.array(["a", "b", "c"]), 900)
    s = p.copy()
    for src, dst in (("a", "b"), ("b", "c"), ("c", "a")):
        s[np.flatnonzero(p == src)[:15]] = dst
    res = flip_test(p, s, None, POLICY)
    assert res.test == "bowker" and res.df == 3 and res.decision
    assert res.statistic == pytest.approx(45.0)  # Σ (nᵢⱼ − nⱼᵢ)² / (nᵢⱼ + nⱼᵢ) = 3 · 15
    assert res.p_value == pytest.approx(1 / (POLICY.permutations + 1))
    assert res.marginal is not None and res.marginal["statistic"] == pytest.approx(0.0)
    assert res.largest is not None and res.largest.net_share == pytest.approx(15 / 900)


def test_bowker_p_value_agrees_with_chi2_for_many_flips() -> None:
    """Symmetric flips in large numbers: the sign-flip p-value is close to χ²'s."""
    rng = np.random.default_rng(6)
    p = rng.integers(0, 3, 6000)
    s = np.where(rng.random(6000) < 0.2, rng.integers(0, 3, 6000), p)
    res = flip_test(p, s, None, PairedPolicy(permutations=4999))
    assert res.method == "sign_flip_by_request" and res.statistic is not None
    assert res.p_value == pytest.approx(sps.chi2.sf(res.statistic, res.df), abs=0.03)
