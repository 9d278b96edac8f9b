"""Model metrics and paired comparisons against scikit-learn and scipy on the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from shadowproxy.compare import metrics


def test_regression_metrics_match_scikit_learn() -> None:
    """MSE, RMSE, MAE and R² equal scikit-learn's."""
    rng = np.random.default_rng(3)
    y = rng.normal(100, 20, 300)
    p = y + rng.normal(2, 5, 300)
    m = metrics.regression_metrics(y, p)
    assert m["mse"] == pytest.approx(skm.mean_squared_error(y, p))
    assert m["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, p)))
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, p))
    assert m["r2"] == pytest.approx(skm.r2_score(y, p))


def test_binary_classification_metrics_match_scikit_learn() -> None:
    """Accuracy, precision, recall, F1 and ROC-AUC (from scores) equal scikit-learn's."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 500)
    score = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
    pred = (score > 0.5).astype(int)
    m = metrics.classification_metrics(y.astype(str), pred.astype(str), "1", score)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score))


def test_multiclass_metrics_are_macro_averages() -> None:
    """Without a positive class, precision, recall and F1 are scikit-learn's macro averages."""
    rng = np.random.default_rng(5)
    y = rng.choice(["a", "b", "c"], 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.choice(["a", "b", "c"], 300))
    m = metrics.classification_metrics(y, pred, None, None)
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["roc_auc"] is None


def test_regression_performance_pairs_the_absolute_errors() -> None:
    """The paired test is Wilcoxon on |e_shadow| − |e_primary|; CIs appear from n = 200."""
    rng = np.random.default_rng(6)
    y = rng.normal(0, 1, 250)
    p = y + rng.normal(0, 0.5, 250)
    s = y + rng.normal(0, 0.3, 250)
    out = metrics.regression_performance(y, p, s, seed=1)
    d = np.abs(s - y) - np.abs(p - y)
    assert out["paired_test"]["p_value"] == pytest.approx(sps.wilcoxon(d).pvalue)
    assert out["shadow_better"] is True
    low, high = out["confidence_intervals"]["mse_diff"]
    assert low <= np.mean((s - y) ** 2) - np.mean((p - y) ** 2) <= high
    few = metrics.regression_performance(y[:50], p[:50], s[:50], seed=1)
    assert "why" in few["confidence_intervals"]


def test_a_shadow_worse_on_most_rows_is_not_called_better_for_a_lower_mse() -> None:
    """The direction of a significant Wilcoxon is the test's: a shadow whose absolute error
    is larger on most rows (and whose MAE is larger) is worse, and the verdict fails, even
    when a few large errors of the primary's give the primary the larger MSE."""
    from shadowproxy.compare.config import Thresholds
    from shadowproxy.compare.verdict import verdict

    rng = np.random.default_rng(1)
    y = rng.normal(0, 1, 300)
    s = y + rng.normal(0, 1.0, 300)
    p = y + rng.normal(0, 0.5, 300)
    p[:3] += 10
    out = metrics.regression_performance(y, p, s, seed=1)
    d = np.abs(s - y) - np.abs(p - y)
    assert sps.wilcoxon(d, alternative="greater").pvalue < 1e-10
    assert out["shadow"]["mae"] > out["primary"]["mae"]
    assert out["shadow"]["mse"] < out["primary"]["mse"]
    assert out["shadow_better"] is False
    side = {"error_rate": 0.0, "latency_ms": {"p99": 10.0}}
    report = {"counts": {"pairs": 300, "pair_completeness": 1.0, "comparable_pairs": 300},
              "operational": {"primary": side, "shadow": side, "status_agreement": 1.0},
              "performance": out, "data_checks": {}, "slices": {}}
    assert verdict(report, Thresholds())["status"] == "fail"
    better = metrics.regression_performance(y, s, p, seed=1)
    assert better["shadow_better"] is True


def test_classification_performance_uses_mcnemar_on_correctness() -> None:
    """McNemar counts primary-only-correct (b) and shadow-only-correct (c) rows."""
    y = np.array(["1", "0", "1", "1", "0", "1"] * 40)
    p = np.array(["1", "0", "0", "0", "0", "1"] * 40)
    s = np.array(["1", "1", "1", "1", "0", "1"] * 40)
    out = metrics.classification_performance(y, p, s, "1", None, None, seed=1)
    assert out["paired_test"]["b"] == 40 and out["paired_test"]["c"] == 80
    assert out["paired_test"]["p_value"] == pytest.approx(sps.binomtest(40, 120).pvalue)
    assert out["primary"]["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert out["confidence_intervals"]["accuracy_diff"][0] > 0
