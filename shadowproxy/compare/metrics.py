"""Model metrics on labelled predictions, and the paired comparison of two models (pure).

``performance`` is the report's section of the same name: each side's metrics on the rows
labelled for both, a paired test (McNemar for classification correctness, Wilcoxon on the
absolute errors for regression), and paired bootstrap 95% intervals when n ≥ 200.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats as sps

from shadowproxy.compare.stats import Array, bootstrap_ci, mcnemar, num, wilcoxon

BOOTSTRAP_MIN_N = 200


def regression_metrics(y: Array, pred: Array) -> dict[str, Any]:
    """MSE, RMSE, MAE and R² of ``pred`` against the labels ``y``."""
    err = pred - y
    mse = float(np.mean(err**2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {"mse": num(mse), "rmse": num(np.sqrt(mse)), "mae": num(np.mean(np.abs(err))),
            "r2": num(1 - float(np.sum(err**2)) / ss_tot) if ss_tot > 0 else None}


def roc_auc(y_true: NDArray[np.bool_], score: Array) -> float | None:
    """Area under the ROC curve: the Mann-Whitney U of the scores, over n_pos·n_neg."""
    n_pos = int(y_true.sum())
    n_neg = int(y_true.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = sps.rankdata(score)
    u = ranks[y_true].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def classification_metrics(y: NDArray[np.str_], pred: NDArray[np.str_], positive: str | None,
                           score: Array | None) -> dict[str, Any]:
    """Accuracy; precision, recall, F1 of the positive class (else macro); ROC-AUC if binary."""
    out: dict[str, Any] = {"accuracy": num(np.mean(y == pred))}
    classes = [positive] if positive is not None else sorted(set(y) | set(pred))
    precisions, recalls, f1s = [], [], []
    for c in classes:
        tp = int(np.sum((pred == c) & (y == c)))
        fp = int(np.sum((pred == c) & (y != c)))
        fn = int(np.sum((pred != c) & (y == c)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    out["average"] = "binary" if positive is not None else "macro"
    out["precision"] = num(np.mean(precisions))
    out["recall"] = num(np.mean(recalls))
    out["f1"] = num(np.mean(f1s))
    if positive is not None:
        truth = y == positive
        out["roc_auc"] = roc_auc(truth, score if score is not None
                                 else (pred == positive).astype(np.float64))
        out["roc_auc_from"] = "score" if score is not None else "predicted labels"
        if out["roc_auc"] is None:
            out["roc_auc_why"] = _no_roc_auc(y, positive)
    else:
        out["roc_auc"] = None
        out["roc_auc_why"] = "more than two classes: set compare.positive_class"
    return out


def _no_roc_auc(y: NDArray[np.str_], positive: str) -> str:
    """Why the labels give no ROC-AUC: it ranks the positive labels against the others,
    and the labels hold only one of the two (all labels one class, on a small window)."""
    classes = set(y.tolist())
    if len(classes) == 1:
        return f"one class in the labels: {next(iter(classes))}"
    return f"no label is the positive class, {positive}"


def _mse(y: Array, p: Array, axis: int = -1) -> Any:
    return np.mean((p - y) ** 2, axis=axis)


def _mae(y: Array, p: Array, axis: int = -1) -> Any:
    return np.mean(np.abs(p - y), axis=axis)


def regression_performance(y: Array, primary: Array, shadow: Array, *, seed: int
                           ) -> dict[str, Any]:
    """Both sides' metrics, Wilcoxon on |e_shadow| − |e_primary|, bootstrap CIs if n ≥ 200;
    ``shadow_better`` is the direction of that test (its rank sums)."""
    out: dict[str, Any] = {
        "n_labelled_both": int(y.size),
        "primary": regression_metrics(y, primary),
        "shadow": regression_metrics(y, shadow),
        "paired_test": {**wilcoxon(np.abs(shadow - y) - np.abs(primary - y)),
                        "on": "|shadow error| - |primary error|"},
    }
    if y.size >= BOOTSTRAP_MIN_N:
        out["confidence_intervals"] = {
            "level": 0.95, "method": "paired percentile bootstrap, 1000 resamples",
            "primary_mse": bootstrap_ci(_mse, [y, primary], seed=seed),
            "shadow_mse": bootstrap_ci(_mse, [y, shadow], seed=seed),
            "mse_diff": bootstrap_ci(lambda a, b, c, axis=-1: _mse(a, c, axis) - _mse(a, b, axis),
                                     [y, primary, shadow], seed=seed),
            "mae_diff": bootstrap_ci(lambda a, b, c, axis=-1: _mae(a, c, axis) - _mae(a, b, axis),
                                     [y, primary, shadow], seed=seed),
        }
    else:
        out["confidence_intervals"] = {"why": f"n < {BOOTSTRAP_MIN_N}: too few for a bootstrap"}
    out["shadow_better"] = _smaller_errors(np.abs(shadow - y) - np.abs(primary - y))
    return out


def _smaller_errors(d: Array) -> bool:
    """Whether the Wilcoxon test's own evidence leans to the shadow: the ranks of |d| where
    the shadow's absolute error is smaller outweigh those where it is larger.

    The direction of a significant result must be the test's: judged by the MSE instead, a
    shadow worse on most rows (and by MAE) was called "significantly better" when a few
    large errors of the primary's made the primary's MSE the larger.
    """
    d = d[d != 0]
    if d.size == 0:
        return False
    ranks = sps.rankdata(np.abs(d))
    return bool(ranks[d < 0].sum() > ranks[d > 0].sum())


def _acc(c_primary: Array, c_shadow: Array, axis: int = -1) -> Any:
    return np.mean(c_shadow, axis=axis) - np.mean(c_primary, axis=axis)


def classification_performance(y: NDArray[np.str_], primary: NDArray[np.str_],
                               shadow: NDArray[np.str_], positive: str | None,
                               primary_score: Array | None, shadow_score: Array | None, *,
                               seed: int) -> dict[str, Any]:
    """Both sides' metrics, exact McNemar on correctness, bootstrap CIs if n ≥ 200."""
    ok_p = primary == y
    ok_s = shadow == y
    out: dict[str, Any] = {
        "n_labelled_both": int(y.size),
        "primary": classification_metrics(y, primary, positive, primary_score),
        "shadow": classification_metrics(y, shadow, positive, shadow_score),
        "paired_test": mcnemar(int(np.sum(ok_p & ~ok_s)), int(np.sum(~ok_p & ok_s))),
    }
    if y.size >= BOOTSTRAP_MIN_N:
        fp, fs = ok_p.astype(np.float64), ok_s.astype(np.float64)
        out["confidence_intervals"] = {
            "level": 0.95, "method": "paired percentile bootstrap, 1000 resamples",
            "primary_accuracy": bootstrap_ci(lambda a, axis=-1: np.mean(a, axis=axis), [fp],
                                             seed=seed),
            "shadow_accuracy": bootstrap_ci(lambda a, axis=-1: np.mean(a, axis=axis), [fs],
                                            seed=seed),
            "accuracy_diff": bootstrap_ci(_acc, [fp, fs], seed=seed),
        }
    else:
        out["confidence_intervals"] = {"why": f"n < {BOOTSTRAP_MIN_N}: too few for a bootstrap"}
    out["shadow_better"] = bool(np.mean(ok_s) > np.mean(ok_p))
    return out
