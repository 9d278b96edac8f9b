"""Type inference, value checks and where the drift findings land in the data checks."""

from __future__ import annotations

import numpy as np
import pytest

from shadowproxy.compare.checks import drift_kind, feature_check, finish, infer_type
from shadowproxy.compare.config import FeatureConfig
from shadowproxy.compare.drift import DriftPolicy, Sample, window_drift
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


def test_finish_puts_each_drift_finding_beside_the_features_checks() -> None:
    """Sparse features are tested as numbers; each finding lands on its own feature."""
    rng = np.random.default_rng(1)
    ref = [0.0] * 300 + list(rng.exponential(1, 200))
    cur = [0.0] * 200 + list(rng.exponential(1.5, 300))
    cfg = FeatureConfig(path="$.x", type="sparse")
    found = [feature_check("x", cfg, data(cur), data(ref)),
             feature_check("c", FeatureConfig(path="$.c"), data(["a", "b"] * 100),
                           data(["a", "b"] * 100))]
    kinds = [drift_kind(f["type"]) for f in found]
    assert kinds == ["numeric", "categorical"]
    drift = window_drift({"x": ("numeric", Sample(np.array(ref)), Sample(np.array(cur))),
                          "c": ("categorical", Sample(np.array(["a", "b"] * 100, dtype=object)),
                                Sample(np.array(["a", "b"] * 100, dtype=object)))},
                         DriftPolicy())
    summary = finish(found, drift)
    assert summary["drifted"] == ["x"] and summary["correction"] == "holm"
    x, c = summary["features"]
    assert x["drift"] is True and x["distribution"]["explanation"].startswith("drift: ")
    assert x["info"]["zero_share_reference"] == 0.6 and x["checks"]["failed"] == []
    assert c["drift"] is False and c["distribution"]["test"]["p_value"] == 1.0
    with pytest.raises(ValueError, match="out of order"):
        finish(list(reversed(found)), drift)


def test_value_checks_list_the_broken_constraints() -> None:
    """Configured allowed values, range and na_allowed each produce a failure line."""
    cfg = FeatureConfig(path="$.x", allowed=["a"], na_allowed=False)
    out = feature_check("x", cfg, data(["a", "b", None]), None, n_not_allowed=1)
    assert out["checks"]["failed"] == ["1 values outside the allowed list",
                                       "1 missing values where none are allowed"]
    assert out["reference"] is None
    cfg = FeatureConfig(path="$.x", min=0, max=10)
    out = feature_check("x", cfg, data([1.0, 11.0]), None, n_out_of_range=1)
    assert out["checks"]["failed"] == ["1 values outside [0.0, 10.0]"]
