"""Type inference, value checks and the multiple-testing step of the data checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from shadowproxy.compare.checks import feature_check, finish, infer_type
from shadowproxy.compare.config import FeatureConfig, Thresholds
from shadowproxy.compare.reference import FeatureData


def data(values: list[float | str | None]) -> FeatureData:
    present = [v for v in values if v is not None]
    nums = np.array([v for v in present if isinstance(v, float | int)], dtype=np.float64)
    counts: dict[str, int] = {}
    for v in present:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return FeatureData(n_rows=len(values), n_missing=len(values) - len(present),
                       n_numeric=nums.size, n_unique=len(counts), n_zero=int(np.sum(nums == 0)),
                       stats={"mean": float(nums.mean()) if nums.size else None, "median": None,
                              "sd": None, "min": float(nums.min()) if nums.size else None,
                              "max": float(nums.max()) if nums.size else None},
                       counts=counts, sample=nums)


def test_types_are_inferred_from_the_values() -> None:
    """Strings: categorical; ≤ 5 numbers: categorical; mostly zeros: sparse; else numeric."""
    cfg = FeatureConfig(path="$.x")
    assert infer_type(cfg, data(["a", "b"]), None)[0] == "categorical"
    assert infer_type(cfg, data([1.0, 2.0, 1.0, 3.0]), None)[0] == "categorical"
    assert infer_type(cfg, data([0.0] * 10 + [float(i) for i in range(1, 8)]), None)[0] == \
        "sparse"
    assert infer_type(cfg, data([float(i) for i in range(20)]), None)[0] == "numeric"
    assert infer_type(FeatureConfig(path="$.x", type="numeric"), data(["a"]), None) == (
        "numeric", "config")


def test_sparse_features_test_the_zero_share_then_the_non_zero_values() -> None:
    """Sparse: a 2×2 test on zero vs non-zero, and KS on the non-zero values."""
    rng = np.random.default_rng(1)
    ref = [0.0] * 300 + list(rng.exponential(1, 200))
    cur = [0.0] * 200 + list(rng.exponential(1.5, 300))
    out = feature_check("x", FeatureConfig(path="$.x", type="sparse"), data(cur), data(ref),
                        Thresholds())
    dist = out["distribution"]
    assert dist["test"] == "zero_share_chi2"
    assert dist["p_value"] == pytest.approx(
        sps.chi2_contingency([[300, 200], [200, 300]]).pvalue)
    nz_ref, nz_cur = np.array(ref[300:]), np.array(cur[200:])
    assert dist["nonzero"]["p_value"] == pytest.approx(sps.ks_2samp(nz_ref, nz_cur).pvalue)
    summary = finish([out], Thresholds())
    assert summary["drifted"] == ["x"] and summary["multiple_testing"]["tests"] == 2


def test_value_checks_list_the_broken_constraints() -> None:
    """Configured allowed values, range and na_allowed each produce a failure line."""
    cfg = FeatureConfig(path="$.x", allowed=["a"], na_allowed=False)
    out = feature_check("x", cfg, data(["a", "b", None]), None, Thresholds(), n_not_allowed=1)
    assert out["checks"]["failed"] == ["1 values outside the allowed list",
                                       "1 missing values where none are allowed"]
    assert out["distribution"]["why"] == "no reference values"
    cfg = FeatureConfig(path="$.x", min=0, max=10)
    out = feature_check("x", cfg, data([1.0, 11.0]), None, Thresholds(), n_out_of_range=1)
    assert out["checks"]["failed"] == ["1 values outside [0.0, 10.0]"]
