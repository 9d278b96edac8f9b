"""Data checks of the live inputs: value checks first, then one distribution test per feature.

Pure functions over ``FeatureData`` (see ``reference.py``). The order follows the policy in
``docs/report.md``: deterministic value checks (allowed values, range, missing values) that
fail the report when a configured constraint is broken; the missing-share test; the
distribution test chosen by the feature's type and the sample size; a location test
(Welch's t or Kruskal-Wallis, by a normality gate) for numeric features; Benjamini-Hochberg
across the features' p-values; and a drift flag per feature.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shadowproxy.compare.config import FeatureConfig, Thresholds
from shadowproxy.compare.reference import FeatureData
from shadowproxy.compare.stats import (
    benjamini_hochberg,
    categorical_drift,
    location_test,
    numeric_drift,
    two_by_two,
)

SPARSE_ZERO_SHARE = 0.5
DISCRETE_MAX_UNIQUE = 5


def infer_type(cfg: FeatureConfig, cur: FeatureData, ref: FeatureData | None
               ) -> tuple[str, str]:
    """The feature's type and where it came from (the config, or the values)."""
    if cfg.type is not None:
        return cfg.type, "config"
    both = [d for d in (cur, ref) if d is not None and d.n_present]
    if not both or any(d.n_numeric < d.n_present for d in both):
        return "categorical", "inferred: not every value is a number"
    if max(d.n_unique for d in both) <= DISCRETE_MAX_UNIQUE:
        return "categorical", f"inferred: numbers with at most {DISCRETE_MAX_UNIQUE} values"
    basis = ref if ref is not None and ref.n_present else cur
    if basis.n_zero / max(basis.n_present, 1) >= SPARSE_ZERO_SHARE:
        return "sparse", f"inferred: at least {SPARSE_ZERO_SHARE:.0%} zeros"
    return "numeric", "inferred: numbers with more than 5 distinct values"


def _side(d: FeatureData) -> dict[str, Any]:
    return {"n": d.n_rows, "missing": d.n_missing,
            "missing_share": d.n_missing / d.n_rows if d.n_rows else None,
            "n_unique": d.n_unique,
            "zero_share": d.n_zero / d.n_present if d.n_present and d.n_numeric else None,
            **d.stats,
            "top": [{"value": k, "n": v} for k, v in sorted(
                d.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]}


def value_checks(cfg: FeatureConfig, cur: FeatureData, ref: FeatureData | None, *,
                 n_not_allowed: int, n_out_of_range: int, n_outside_reference_range: int | None,
                 ) -> dict[str, Any]:
    """Allowed values, range and missing values; ``failed`` lists the broken constraints."""
    failed = []
    out: dict[str, Any] = {}
    if cfg.allowed is not None:
        out["allowed"] = {"source": "config", "values": cfg.allowed,
                          "violations": n_not_allowed,
                          "share": n_not_allowed / cur.n_present if cur.n_present else None}
        if n_not_allowed:
            failed.append(f"{n_not_allowed} values outside the allowed list")
    elif ref is not None and ref.counts and cur.counts and ref.n_unique <= 1000:
        unseen = {k: v for k, v in cur.counts.items() if k not in ref.counts}
        n_unseen = sum(unseen.values())
        out["allowed"] = {"source": "reference", "violations": n_unseen,
                          "share": n_unseen / cur.n_present if cur.n_present else None,
                          "examples": sorted(unseen, key=lambda k: -unseen[k])[:5]}
    if cfg.min is not None or cfg.max is not None:
        out["range"] = {"source": "config", "min": cfg.min, "max": cfg.max,
                        "violations": n_out_of_range,
                        "share": n_out_of_range / cur.n_present if cur.n_present else None}
        if n_out_of_range:
            failed.append(f"{n_out_of_range} values outside [{cfg.min}, {cfg.max}]")
    elif n_outside_reference_range is not None and ref is not None:
        out["range"] = {"source": "reference", "min": ref.stats["min"], "max": ref.stats["max"],
                        "violations": n_outside_reference_range,
                        "share": (n_outside_reference_range / cur.n_present
                                  if cur.n_present else None)}
    out["missing"] = {"na_allowed": cfg.na_allowed, "count": cur.n_missing}
    if not cfg.na_allowed and cur.n_missing:
        failed.append(f"{cur.n_missing} missing values where none are allowed")
    out["failed"] = failed
    return out


def feature_check(name: str, cfg: FeatureConfig, cur: FeatureData, ref: FeatureData | None,
                  th: Thresholds, *, n_not_allowed: int = 0, n_out_of_range: int = 0,
                  n_outside_reference_range: int | None = None) -> dict[str, Any]:
    """Everything the report says about one feature; p-values are adjusted by ``finish``."""
    ftype, type_source = infer_type(cfg, cur, ref)
    out: dict[str, Any] = {
        "name": name, "type": ftype, "type_source": type_source,
        "current": _side(cur), "reference": _side(ref) if ref is not None else None,
        "checks": value_checks(cfg, cur, ref, n_not_allowed=n_not_allowed,
                               n_out_of_range=n_out_of_range,
                               n_outside_reference_range=n_outside_reference_range),
    }
    tests: list[dict[str, Any]] = []
    if ref is None or not ref.n_rows or not cur.n_rows:
        out["distribution"] = {"test": None, "why": "no reference values", "drift": False}
        out["tests"] = tests
        return out
    miss = two_by_two([[ref.n_missing, ref.n_present], [cur.n_missing, cur.n_present]])
    miss["share_diff"] = cur.n_missing / cur.n_rows - ref.n_missing / ref.n_rows
    out["checks"]["missing_share_test"] = miss
    if miss.get("p_value") is not None:
        tests.append(miss)
    if ftype == "categorical":
        dist = categorical_drift(ref.counts, cur.counts, max_js_distance=th.max_js_distance,
                                 alpha=th.alpha, large_sample=th.large_sample)
    elif ftype == "sparse":
        rz, cz = ref.n_zero, cur.n_zero
        dist = two_by_two([[rz, ref.n_numeric - rz], [cz, cur.n_numeric - cz]])
        dist["test"] = f"zero_share_{dist['test']}" if dist["test"] else None
        dist["why"] = "sparse: compare the share of zeros, then the non-zero values"
        dist["zero_share"] = {"reference": rz / ref.n_numeric if ref.n_numeric else None,
                              "current": cz / cur.n_numeric if cur.n_numeric else None}
        nonzero = numeric_drift(ref.sample[ref.sample != 0], cur.sample[cur.sample != 0],
                                max_distance=th.max_distance, alpha=th.alpha,
                                large_sample=th.large_sample)
        dist["nonzero"] = nonzero
        if nonzero.get("p_value") is not None and nonzero["test"]:
            tests.append(nonzero)
    else:
        dist = numeric_drift(ref.sample, cur.sample, max_distance=th.max_distance,
                             alpha=th.alpha, large_sample=th.large_sample)
        out["location"] = location_test(ref.sample, cur.sample, th.alpha)
    out["distribution"] = dist
    if dist.get("p_value") is not None and dist.get("test"):
        tests.insert(0, dist)
    out["tests"] = tests
    return out


def finish(features: list[dict[str, Any]], th: Thresholds) -> dict[str, Any]:
    """Benjamini-Hochberg across every feature test's p-value; drift flags; the summary."""
    family = [t for f in features for t in f.pop("tests", [])]
    adjusted = benjamini_hochberg([t["p_value"] for t in family])
    for test, p_adj in zip(family, adjusted, strict=True):
        test["p_value_adjusted"] = p_adj
        test["drift"] = bool(p_adj < th.alpha)
    for f in features:
        dist = f["distribution"]
        drift = bool(dist.get("drift"))
        nonzero = dist.get("nonzero")
        if nonzero is not None:
            drift = drift or bool(nonzero.get("drift"))
        miss = f["checks"].get("missing_share_test") or {}
        missing_drift = bool(miss.get("drift")) and abs(miss.get("share_diff", 0)) >= 0.01
        miss["drift"] = missing_drift
        f["drift"] = drift or missing_drift
    n_tested = sum(1 for f in features if f["distribution"].get("test"))
    drifted = [f["name"] for f in features if f["drift"]]
    failed = {f["name"]: f["checks"]["failed"] for f in features if f["checks"]["failed"]}
    return {"features": features, "n_features": len(features), "n_tested": n_tested,
            "drifted": drifted,
            "drift_share": len(drifted) / n_tested if n_tested else None,
            "dataset_drift": bool(n_tested and len(drifted) / n_tested >= th.max_drift_share),
            "value_check_failures": failed,
            "multiple_testing": {"method": "benjamini-hochberg", "tests": len(family),
                                 "alpha": th.alpha}}


def histogram_edges(cur: FeatureData, ref: FeatureData | None, bins: int = 30) -> list[float]:
    """Shared bin edges over both samples' range."""
    lows = [d.stats["min"] for d in (cur, ref) if d is not None and d.stats["min"] is not None]
    highs = [d.stats["max"] for d in (cur, ref) if d is not None and d.stats["max"] is not None]
    lo, hi = (min(lows), max(highs)) if lows else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [float(x) for x in np.linspace(lo, hi, bins + 1)]
