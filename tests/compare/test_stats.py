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


def test_benjamini_hochberg_matches_the_step_up_definition() -> None:
    """Adjusted p-values equal min over k ≥ i of p_(k)·m/k, capped at 1, in input order."""
    p = [0.01, 0.04, 0.03, 0.2, 0.005]
    order = np.argsort(p)
    m = len(p)
    ranked = np.array(p)[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1)
    expected = np.empty(m)
    expected[order] = adjusted
    assert stats.benjamini_hochberg(p) == pytest.approx(list(expected))


def test_two_by_two_switches_to_fisher_for_small_expected_counts() -> None:
    """Fisher's exact test when an expected count is under 5; χ² contingency otherwise."""
    small = stats.two_by_two([[1, 20], [6, 15]])
    assert small["test"] == "fisher_exact"
    assert small["p_value"] == pytest.approx(sps.fisher_exact([[1, 20], [6, 15]]).pvalue)
    big = stats.two_by_two([[30, 70], [55, 45]])
    assert big["test"] == "chi2"
    assert big["p_value"] == pytest.approx(sps.chi2_contingency([[30, 70], [55, 45]]).pvalue)


def test_numeric_drift_uses_ks_when_small_and_wasserstein_when_large(
        rng: np.random.Generator) -> None:
    """KS p-value up to large_sample values; normalised Wasserstein distance above."""
    a, b = rng.normal(0, 1, 300), rng.normal(0.4, 1, 300)
    small = stats.numeric_drift(a, b, alpha=0.05, large_sample=1000, max_distance=0.1)
    assert small["test"] == "ks"
    assert small["p_value"] == pytest.approx(sps.ks_2samp(a, b).pvalue)
    a, b = rng.normal(0, 2, 3000), rng.normal(0.5, 2, 3000)
    large = stats.numeric_drift(a, b, alpha=0.05, large_sample=1000, max_distance=0.1)
    assert large["test"] == "wasserstein_normed"
    assert large["statistic"] == pytest.approx(sps.wasserstein_distance(a, b) / np.std(a))
    assert large["drift"] is True


def test_categorical_drift_uses_chi2_contingency_then_jensen_shannon() -> None:
    """χ² on the 2×k table (unseen categories included) when small, JS base 2 when large."""
    ref, cur = {"a": 50, "b": 30, "c": 20}, {"a": 30, "b": 30, "c": 30, "d": 10}
    res = stats.categorical_drift(ref, cur, alpha=0.05, large_sample=1000, max_js_distance=0.12)
    table = [[50, 30, 20, 0], [30, 30, 30, 10]]
    assert res["test"] == "chi2"
    assert res["p_value"] == pytest.approx(sps.chi2_contingency(table).pvalue)
    big_ref = {k: v * 100 for k, v in ref.items()}
    big_cur = {k: v * 100 for k, v in cur.items()}
    res = stats.categorical_drift(big_ref, big_cur, alpha=0.05, large_sample=1000,
                                  max_js_distance=0.12)
    p = np.array([5000, 3000, 2000, 0]) / 10000
    q = np.array([3000, 3000, 3000, 1000]) / 10000
    m = (p + q) / 2
    kl = lambda x, y: np.sum(np.where(x > 0, x * np.log2(np.where(x > 0, x, 1) / y), 0))  # noqa: E731
    assert res["test"] == "jensen_shannon"
    assert res["statistic"] == pytest.approx(np.sqrt((kl(p, m) + kl(q, m)) / 2))


def test_location_test_picks_welch_for_normal_samples_and_kruskal_otherwise(
        rng: np.random.Generator) -> None:
    """Both normal: Welch's t (scipy's equal_var=False); a skewed sample: Kruskal-Wallis."""
    a, b = rng.normal(0, 1, 200), rng.normal(0.3, 2, 200)
    res = stats.location_test(a, b, 0.05)
    assert res["test"] == "welch_t"
    assert res["p_value"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    c = rng.exponential(1, 200)
    res = stats.location_test(a, c, 0.05)
    assert res["test"] == "kruskal"
    assert res["p_value"] == pytest.approx(sps.kruskal(a, c).pvalue)
    assert res["p_value"] == pytest.approx(sps.mannwhitneyu(a, c).pvalue, rel=1e-6)


def test_groups_test_is_anova_for_normal_groups(rng: np.random.Generator) -> None:
    """Several normal groups: one-way ANOVA equal to scipy's f_oneway."""
    groups = [rng.normal(m, 1, 100) for m in (0, 0.2, 0.5)]
    res = stats.groups_test(groups, 0.05)
    assert res["test"] == "anova"
    assert res["p_value"] == pytest.approx(sps.f_oneway(*groups).pvalue)


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
