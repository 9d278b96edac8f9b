"""Data checks of the live inputs: value checks, the feature's type, then the drift finding.

Pure functions over ``FeatureData`` (see ``reference.py``): deterministic value checks
(allowed values, range, missing values) that fail the report when a configured constraint
is broken; the feature's type, which says how ``drift.py`` tests it (``drift_kind``:
categories as categories, numbers — sparse ones included — on their distinct values or
quantile bins); and ``finish``, which puts each feature's drift finding beside its checks.
Drift itself is decided in one place, ``drift.window_drift`` (Holm across every feature's
tests, and an effect above its threshold), with the request as the unit.
"""

from __future__ import annotations

from typing import Any

from shadowproxy.compare import stats
from shadowproxy.compare.config import FeatureConfig
from shadowproxy.compare.drift import DriftResult, Kind
from shadowproxy.compare.reference import FeatureData

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


def drift_kind(ftype: str) -> Kind:
    """How the drift rule tests a feature of this type: sparse features are numbers."""
    return "categorical" if ftype == "categorical" else "numeric"


def feature_check(name: str, cfg: FeatureConfig, cur: FeatureData, ref: FeatureData | None,
                  *, n_not_allowed: int = 0, n_out_of_range: int = 0,
                  n_outside_reference_range: int | None = None) -> dict[str, Any]:
    """Everything the report says about one feature but drift (``finish`` adds it)."""
    ftype, type_source = infer_type(cfg, cur, ref)
    return {
        "name": name, "type": ftype, "type_source": type_source,
        "current": _side(cur), "reference": _side(ref) if ref is not None else None,
        "checks": value_checks(cfg, cur, ref, n_not_allowed=n_not_allowed,
                               n_out_of_range=n_out_of_range,
                               n_outside_reference_range=n_outside_reference_range),
    }


def finish(features: list[dict[str, Any]], drift: DriftResult) -> dict[str, Any]:
    """Each feature's drift finding beside its checks; the window's drift summary.

    ``drift`` holds the features in the order of ``features``; each gets its ``kind``,
    ``levels``, the ``distribution`` and ``missing`` checks (test, effect, threshold,
    Holm-adjusted p-value, decision, explanation), ``info`` and ``drift``.
    """
    found = drift.to_json()
    for f, d in zip(features, found.pop("features"), strict=True):
        if f["name"] != d["name"]:
            raise ValueError(f"drift findings out of order: {d['name']} for {f['name']}")
        f.update({k: v for k, v in d.items() if k != "name"})
    failed = {f["name"]: f["checks"]["failed"] for f in features if f["checks"]["failed"]}
    return {"features": features, "n_features": len(features), **found,
            "value_check_failures": failed}


def histogram_edges(cur: FeatureData, ref: FeatureData | None, bins: int = 30) -> list[float]:
    """Shared bin edges over both samples' range."""
    lows = [d.stats["min"] for d in (cur, ref) if d is not None and d.stats["min"] is not None]
    highs = [d.stats["max"] for d in (cur, ref) if d is not None and d.stats["max"] is not None]
    lo, hi = (min(lows), max(highs)) if lows else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return stats.edges(lo, hi, bins)
