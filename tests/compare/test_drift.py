"""The drift rule: significance after Holm and an effect threshold, at every sample size."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats as sps

from shadowproxy.compare import stats
from shadowproxy.compare.config import Thresholds
from shadowproxy.compare.drift import (
    DriftPolicy,
    Sample,
    cdf_distances,
    decide,
    feature_tests,
    numeric_levels,
    window_drift,
)

FAST = DriftPolicy(permutations=299)


def share_rate(run: Callable[[np.random.Generator], bool], windows: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return sum(run(rng) for _ in range(windows)) / windows


def test_policy_reads_the_thresholds() -> None:
    """Every drift threshold comes from compare.thresholds."""
    th = Thresholds(alpha=0.01, max_distance=0.2, max_tv_distance=0.1,
                    max_missing_share_change=0.03, max_drift_share=0.3)
    p = DriftPolicy.from_thresholds(th, seed=4)
    assert (p.alpha, p.max_distance, p.max_tv_distance, p.max_missing_share_change,
            p.max_drift_share, p.seed) == (0.01, 0.2, 0.1, 0.03, 0.3, 4)


def test_numbers_become_their_values_or_quantile_bins_and_ties_stay_together() -> None:
    """≤ 20 distinct values: one level each; more: 20 pooled-quantile bins, ties unsplit."""
    r, c, n, what = numeric_levels(np.array([1.0, 2, 2, 5]), np.array([5.0, 1]))
    assert (r.tolist(), c.tolist(), n, what) == ([0, 1, 1, 2], [2, 0], 3, "3 distinct values")
    rng = np.random.default_rng(1)
    ref = np.concatenate([np.zeros(300), rng.exponential(1, 700)])
    cur = np.concatenate([np.zeros(250), rng.exponential(1, 750)])
    r, c, n, what = numeric_levels(ref, cur)
    assert n <= 20 and what.endswith("bins at the pooled quantiles")
    assert len(set(r[ref == 0]) | set(c[cur == 0])) == 1


def test_cdf_distances_match_scipy() -> None:
    """Normalised Wasserstein and KS statistic equal scipy's on the same samples."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 2, 700), rng.normal(0.5, 2.5, 900)
    w, ks = cdf_distances(a, b)
    assert w == pytest.approx(sps.wasserstein_distance(a, b) / np.std(a))
    assert ks == pytest.approx(sps.ks_2samp(a, b).statistic)
    assert cdf_distances(np.zeros(5), np.zeros(3)) == (0.0, 0.0)


def _iid_window(rng: np.random.Generator, n: int, mean: float = 0.0,
                share_a: float = 0.4) -> dict[str, tuple[str, Sample, Sample]]:
    shares = np.cumsum([0.4, 0.3, 0.3])
    moved = np.cumsum([share_a, (1 - share_a) / 2, (1 - share_a) / 2])
    cats = np.array(["a", "b", "c"], dtype=object)
    return {
        "x": ("numeric", Sample(rng.normal(0, 1, n)), Sample(rng.normal(mean, 1, n))),
        "k": ("numeric", Sample(rng.poisson(3, n).astype(float)),
              Sample(rng.poisson(3, n).astype(float))),
        "c": ("categorical", Sample(cats[np.searchsorted(shares, rng.random(n))]),
              Sample(cats[np.minimum(np.searchsorted(moved, rng.random(n)), 2)])),
    }


def test_no_cliff_at_1000_rows() -> None:
    """No change, three features: false alarms stay ≤ 5% at 1,000 and at 1,001 rows."""
    for n in (1000, 1001):
        rate = share_rate(lambda rng, n=n: bool(window_drift(_iid_window(rng, n), FAST).drifted),
                          120, seed=n)
        assert rate <= 0.07, n


def test_a_category_share_moving_40_to_50_is_found_more_often_with_more_rows() -> None:
    """Category a moves from 40% to 50%: found at 5,000 rows at least as often as at 500."""
    def found(n: int) -> float:
        return share_rate(lambda rng: "c" in window_drift(_iid_window(rng, n, share_a=0.5),
                                                          FAST).drifted, 25, seed=n)

    small, large = found(500), found(5000)
    assert large >= small and large == 1.0 and small > 0.3


def test_large_samples_do_not_flag_negligible_shifts_unless_asked() -> None:
    """A 0.03 SD shift at 100,000 rows is significant but under max_distance: no drift."""
    rng = np.random.default_rng(3)
    ref, cur = Sample(rng.normal(0, 1, 100_000)), Sample(rng.normal(0.03, 1, 100_000))
    res = window_drift({"x": ("numeric", ref, cur)}, DriftPolicy())
    check = res.features[0].distribution
    assert check.significant and not check.drift and res.drifted == []
    assert check.explanation.startswith("significant but negligible")
    res = window_drift({"x": ("numeric", ref, cur)}, DriftPolicy(max_distance=0.0))
    assert res.drifted == ["x"] and res.features[0].distribution.explanation.startswith("drift")


def test_small_samples_do_not_flag_noise_however_large_the_effect_looks() -> None:
    """Ten rows a side: the effect can exceed the threshold by chance, the test holds it."""
    rate = share_rate(lambda rng: bool(window_drift(_iid_window(rng, 10), FAST).drifted),
                      100, seed=4)
    assert rate <= 0.06


def test_holm_controls_the_window_false_alarm_rate_over_many_features() -> None:
    """Eight unchanged numeric features: a flag in ≤ 5% of windows (not 1 − 0.95⁸)."""
    def any_flag(rng: np.random.Generator) -> bool:
        feats = {f"f{i}": ("numeric", Sample(rng.normal(size=200)),
                           Sample(rng.normal(size=200))) for i in range(8)}
        res = window_drift(feats, DriftPolicy(permutations=299, max_distance=0.0))
        return bool(res.drifted)

    assert share_rate(any_flag, 100, seed=5) <= 0.06


def _batched(rng: np.random.Generator, requests: int, rho: float, shift: float = 0.0
             ) -> tuple[np.ndarray, np.ndarray]:
    u = np.repeat(rng.standard_normal(requests), 5)
    x = np.sqrt(rho) * u + np.sqrt(1 - rho) * rng.standard_normal(5 * requests) + shift
    return x, np.repeat(np.arange(requests), 5)


@pytest.mark.parametrize("rho", [0.2, 0.5])
def test_correlated_batch_rows_do_not_raise_false_alarms(rho: float) -> None:
    """5-row requests correlated 0.2 or 0.5: false alarms stay ≤ 5% (request as the unit)."""
    def flagged(rng: np.random.Generator, by_request: bool) -> bool:
        x, req = _batched(rng, 100, rho)
        y, req2 = _batched(rng, 100, rho)
        levels = np.array(["a", "b", "c"], dtype=object)
        cats = levels[np.digitize(_batched(rng, 100, rho)[0], [-0.4, 0.4])]
        cats2 = levels[np.digitize(_batched(rng, 100, rho)[0], [-0.4, 0.4])]
        r1, r2 = (req, req2 + 1000) if by_request else (None, None)
        res = window_drift({"x": ("numeric", Sample(x, r1), Sample(y, r2)),
                            "c": ("categorical", Sample(cats, r1), Sample(cats2, r2))},
                           DriftPolicy(permutations=299, max_distance=0.0,
                                       max_tv_distance=0.0))
        return bool(res.drifted)

    assert share_rate(lambda rng: flagged(rng, True), 120, seed=6) <= 0.07
    if rho == 0.5:  # the same windows with rows counted as independent
        assert share_rate(lambda rng: flagged(rng, False), 120, seed=6) >= 0.12


def test_integer_valued_features_are_tested_on_their_levels() -> None:
    """Poisson counts, no change: ~5% rejections (KS on such ties rejects ~1%)."""
    rng = np.random.default_rng(7)
    windows, ours, ks = 300, 0, 0
    for _ in range(windows):
        a, b = rng.poisson(2, 500).astype(float), rng.poisson(2, 500).astype(float)
        f = feature_tests("k", "numeric", Sample(a), Sample(b), FAST)
        assert f.levels.endswith("distinct values")
        assert f.distribution.test is not None
        ours += f.distribution.test.p_value < 0.05
        ks += sps.ks_2samp(a, b).pvalue < 0.05
    assert 0.025 <= ours / windows <= 0.08
    assert ks / windows < 0.025


def test_missing_values_are_a_test_of_their_own_with_a_threshold() -> None:
    """Missing share 2% → 10%: flagged, with its change; under 1 point: never flagged."""
    rng = np.random.default_rng(8)
    ref = rng.normal(size=2000)
    cur = rng.normal(size=2000)
    ref[rng.random(2000) < 0.02] = np.nan
    cur[rng.random(2000) < 0.10] = np.nan
    res = window_drift({"x": ("numeric", Sample(ref), Sample(cur))}, DriftPolicy())
    miss = res.features[0].missing
    assert miss.drift and miss.size == pytest.approx(np.isnan(cur).mean() - np.isnan(ref).mean())
    assert res.drifted == ["x"] and res.tests == 2
    cur = rng.normal(size=2000)
    cur[rng.random(2000) < 0.025] = np.nan
    res = window_drift({"x": ("numeric", Sample(ref), Sample(cur))},
                       DriftPolicy(max_missing_share_change=0.05))
    assert not res.features[0].missing.drift


def test_categories_report_total_variation_and_unseen_share() -> None:
    """Total variation is half the summed share change; unseen categories are counted."""
    ref = Sample(np.array(["a"] * 60 + ["b"] * 40, dtype=object))
    cur = Sample(np.array(["a"] * 50 + ["b"] * 40 + ["z"] * 10 + [None] * 5, dtype=object))
    f = feature_tests("c", "categorical", ref, cur, FAST)
    assert f.distribution.size == pytest.approx(0.5 * (abs(50 / 100 - 0.6) + 0 + 0.1))
    assert f.info["unseen_share"] == pytest.approx(0.1)
    assert f.missing.size == pytest.approx(5 / 105)


def test_decide_adjusts_by_holm_and_reports_the_family() -> None:
    """Adjusted p-values are Holm's over every test; the result says so and is JSON-ready."""
    rng = np.random.default_rng(9)
    feats = [feature_tests(f"f{i}", "numeric", Sample(rng.normal(size=300)),
                           Sample(rng.normal(0.3 * i, 1, 300)), FAST) for i in range(3)]
    res = decide(feats, FAST)
    raw = [f.distribution.test.p_value for f in feats if f.distribution.test]
    assert [f.distribution.p_adjusted for f in res.features] == pytest.approx(stats.holm(raw))
    out = res.to_json()
    assert out["correction"] == "holm" and out["tests"] == 3
    assert out["features"][2]["distribution"]["test"]["method"] == "permutation_by_request"
    assert res.drifted == ["f1", "f2"] or res.drifted == ["f2"]


def test_samples_without_values_or_with_one_level_are_not_tested() -> None:
    """No values on a side, or one value everywhere: no test, no drift, a reason given."""
    f = feature_tests("x", "numeric", Sample(np.array([np.nan, np.nan])),
                      Sample(np.array([1.0])), FAST)
    assert f.distribution.test is None and f.distribution.explanation == "no values on a side"
    f = feature_tests("x", "numeric", Sample(np.ones(50)), Sample(np.ones(40)), FAST)
    assert f.distribution.test is None
    res = decide([f], FAST)
    assert res.n_tested == 0 and res.drifted == [] and not res.dataset_drift
    with pytest.raises(ValueError, match="3 values but 2 request ids"):
        Sample(np.zeros(3), np.zeros(2))
