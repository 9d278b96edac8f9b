"""Each statistic of stats.py against an independent computation on the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import cohen_kappa_score

from shadowproxy.compare import stats


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_describe_matches_numpy(rng: np.random.Generator) -> None:
    """describe reports numpy's mean, median, n-1 SD, min and max, ignoring NaN."""
    x = rng.normal(3, 2, 101)
    d = stats.describe(np.append(x, np.nan))
    assert d["n"] == 101
    assert d["mean"] == pytest.approx(np.mean(x))
    assert d["median"] == pytest.approx(np.median(x))
    assert d["sd"] == pytest.approx(np.std(x, ddof=1))
    assert (d["min"], d["max"]) == (pytest.approx(x.min()), pytest.approx(x.max()))


def test_kappa_matches_scikit_learn(rng: np.random.Generator) -> None:
    """Cohen's kappa from the flip matrix equals scikit-learn's on the label vectors."""
    a = rng.integers(0, 3, 400)
    b = np.where(rng.random(400) < 0.7, a, rng.integers(0, 3, 400))
    m = np.zeros((3, 3))
    for i, j in zip(a, b, strict=True):
        m[i, j] += 1
    assert stats.kappa(m) == pytest.approx(cohen_kappa_score(a, b))


def test_mcnemar_is_the_exact_binomial_test() -> None:
    """Exact McNemar equals a two-sided binomial test of b successes in b + c at 1/2."""
    for b, c in [(3, 12), (40, 25), (7, 7), (0, 9)]:
        expected = sps.binomtest(b, b + c, 0.5).pvalue
        assert stats.mcnemar(b, c)["p_value"] == pytest.approx(expected)


def test_groups_test_is_anova_for_normal_groups(rng: np.random.Generator) -> None:
    """Several normal groups: one-way ANOVA equal to scipy's f_oneway."""
    groups = [rng.normal(m, 1, 100) for m in (0, 0.2, 0.5)]
    res = stats.groups_test(groups, 0.05)
    assert res["test"] == "anova"
    assert res["p_value"] == pytest.approx(sps.f_oneway(*groups).pvalue)


def test_groups_test_says_why_it_runs_no_test() -> None:
    """No test on fewer than two groups of 3+ values, nor on values all equal: and the
    reason says which (groups of 3+ values, some equal, are not "no distinct values")."""
    few = stats.groups_test([np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0])], 0.05)
    assert few == {"test": None, "why": "fewer than two groups with 3 or more values"}
    same = stats.groups_test([np.full(4, 2.0), np.full(3, 2.0)], 0.05)
    assert same == {"test": None, "why": "every value is the same in every group"}
    tied = stats.groups_test([np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 2.0])], 0.05)
    assert tied["test"] == "kruskal"


def test_wilcoxon_and_correlations_match_scipy(rng: np.random.Generator) -> None:
    """Wilcoxon signed-rank, Pearson and Spearman are scipy's numbers."""
    a = rng.normal(0, 1, 150)
    b = a + rng.normal(0.1, 0.3, 150)
    assert stats.wilcoxon(b - a)["p_value"] == pytest.approx(sps.wilcoxon(b - a).pvalue)
    assert stats.correlation(a, b, "pearson")["r"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert stats.correlation(a, b, "spearman")["r"] == pytest.approx(
        np.corrcoef(sps.rankdata(a), sps.rankdata(b))[0, 1])
    assert stats.wilcoxon(np.zeros(5))["p_value"] is None


def test_bootstrap_ci_matches_a_numpy_bootstrap(rng: np.random.Generator) -> None:
    """The percentile interval of the mean agrees with a hand-rolled numpy bootstrap."""
    x = rng.exponential(2, 500)
    low, high = stats.bootstrap_ci(lambda a, axis=-1: np.mean(a, axis=axis), [x], seed=1,
                                   n_resamples=4000)
    own = np.random.default_rng(2)
    means = x[own.integers(0, x.size, (4000, x.size))].mean(axis=1)
    assert low == pytest.approx(np.percentile(means, 2.5), rel=0.02)
    assert high == pytest.approx(np.percentile(means, 97.5), rel=0.02)


def test_holm_matches_the_step_down_definition() -> None:
    """Holm: sorted p_(i)·(m − i + 1), made non-decreasing, capped at 1, in input order."""
    p = [0.01, 0.04, 0.03, 0.2, 0.005]
    assert stats.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.2, 0.025])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_weighted_chi2_tail_is_a_chi2_for_equal_weights_and_matches_simulation() -> None:
    """Σ wᵢχ²₁: equal weights give scipy's scaled χ²; unequal ones agree with a simulation."""
    assert stats.weighted_chi2_sf(9.0, np.full(3, 2.0)) == pytest.approx(
        sps.chi2.sf(4.5, 3), rel=1e-12)
    assert stats.weighted_chi2_sf(0.0, np.array([1.0, 2.0])) == 1.0
    assert stats.weighted_chi2_sf(1.0, np.zeros(0)) == 0.0
    rng = np.random.default_rng(3)
    for w in (np.array([0.5, 1 / 6, 1 / 12, 1 / 20]), np.array([4.0, 1.0, 0.3])):
        draws = (rng.chisquare(1, (400_000, w.size)) * w).sum(axis=1)
        for tail in (0.2, 0.05, 0.01, 0.002):
            x = float(np.quantile(draws, 1 - tail))
            assert stats.weighted_chi2_sf(x, w) == pytest.approx(tail, rel=0.1)


def test_the_distribution_test_of_two_close_columns_needs_no_warning() -> None:
    """Two columns a half-step apart (109 values each): scipy's exact KS p-value does not
    converge there and it falls back to the asymptotic one with a RuntimeWarning, which the
    report printed on its standard error (and which fails a run with warnings as errors).
    The fallback is the answer; the report takes it without the warning."""
    from shadowproxy.compare.predictions import _columns_numeric

    p = np.arange(109, dtype=np.float64)
    out = _columns_numeric(p, p + 0.5)
    assert out["test"] == "ks" and out["p_value"] == pytest.approx(1.0)
