"""The verdict's rules on hand-made report sections."""

from __future__ import annotations

from typing import Any

from shadowproxy.compare.config import Thresholds
from shadowproxy.compare.verdict import reaches, verdict


def base() -> dict[str, Any]:
    side = {"error_rate": 0.0, "latency_ms": {"p99": 10.0}}
    return {
        "counts": {"pairs": 100, "pair_completeness": 1.0, "comparable_pairs": 100},
        "operational": {"primary": side, "shadow": dict(side), "status_agreement": 1.0},
        "predictions": {"task": "classification", "n": 100, "agreement": 0.99, "kappa": 0.95},
        "performance": {}, "data_checks": {}, "slices": {},
    }


def test_a_clean_report_passes() -> None:
    """No rule fires: pass, with no reasons."""
    assert verdict(base(), Thresholds()) == {"status": "pass", "reasons": []}


def test_each_rule_raises_its_level() -> None:
    """Low agreement warns; more shadow errors or a significantly worse shadow fail."""
    r = base()
    r["predictions"]["agreement"] = 0.9
    assert verdict(r, Thresholds())["status"] == "warn"
    r = base()
    r["operational"]["shadow"] = {"error_rate": 0.05, "latency_ms": {"p99": 10.0}}
    assert verdict(r, Thresholds())["status"] == "fail"
    r = base()
    r["performance"] = {"paired_test": {"test": "mcnemar_exact", "p_value": 0.001},
                        "shadow_better": True}
    out = verdict(r, Thresholds())
    assert out["status"] == "pass" and out["reasons"][0]["level"] == "info"
    r["performance"]["shadow_better"] = False
    assert verdict(r, Thresholds())["status"] == "fail"
    r = base()
    r["counts"]["pair_completeness"] = 0.9
    assert verdict(r, Thresholds())["reasons"][0]["section"] == "counts"


def test_fail_on_levels() -> None:
    """--fail-on warn fires on warn and fail; --fail-on fail only on fail."""
    assert reaches("warn", "warn") and reaches("fail", "warn")
    assert not reaches("warn", "fail") and not reaches("pass", "warn")


def test_a_replayed_latency_is_information_not_a_warning() -> None:
    """A slow p99 warns for a live shadow; measured under replay it is only shown."""
    r = base()
    r["operational"]["shadow"] = {"error_rate": 0.0, "latency_ms": {"p99": 50.0}}
    assert verdict(r, Thresholds())["status"] == "warn"
    r["operational"]["latency_compared"] = False
    r["operational"]["latency_note"] = "measured under replay load"
    assert verdict(r, Thresholds()) == {"status": "pass", "reasons": [
        {"level": "info", "section": "operational", "message": "measured under replay load"}]}


def test_too_little_evidence_fails() -> None:
    """No pairs, or fewer comparable pairs than min_pairs, is a fail: no gate passes on it."""
    r = base()
    r["counts"] = {"pairs": 0, "pair_completeness": None, "comparable_pairs": 0}
    assert verdict(r, Thresholds())["status"] == "fail"
    r["counts"] = {"pairs": 100, "pair_completeness": 1.0, "comparable_pairs": 99}
    out = verdict(r, Thresholds())
    assert out["status"] == "fail" and "min_pairs (100)" in out["reasons"][0]["message"]
    assert verdict(r, Thresholds(min_pairs=99))["status"] == "pass"


def regression(paired: dict[str, Any] | None) -> dict[str, Any]:
    r = base()
    r["predictions"] = {"task": "regression", "n": 500, "within_tolerance": None,
                        "tolerance": {"configured": False},
                        "distribution_test": {"test": "ks", "p_value": 0.001, "drift": True}}
    if paired is not None:
        r["predictions"]["paired"] = paired
    return r


def test_the_paired_test_decides_the_predictions_not_the_distribution_test() -> None:
    """A systematic paired shift warns; a column distribution difference alone does not."""
    shift = {"decision": True, "explanation": "the shadow is systematically higher: …"}
    out = verdict(regression(shift), Thresholds())
    assert out["status"] == "warn"
    assert out["reasons"] == [{"level": "warn", "section": "predictions",
                               "message": "the shadow is systematically higher: …"}]
    out = verdict(regression({"decision": False, "explanation": "no systematic difference"}),
                  Thresholds())
    assert out == {"status": "pass", "reasons": []}


def test_one_way_flips_warn_for_classifiers() -> None:
    """A classifier with high agreement but significant one-way flips warns."""
    r = base()
    r["predictions"]["paired"] = {"decision": True,
                                  "explanation": "the shadow flips predictions one way: …"}
    out = verdict(r, Thresholds())
    assert out["status"] == "warn" and out["reasons"][0]["message"].startswith(
        "the shadow flips predictions one way")


def test_drift_reasons_name_each_feature_and_why() -> None:
    """Input drift names the features, with the drift rule's explanation when given."""
    r = base()
    r["data_checks"] = {"drifted": ["x", "y"], "features": [
        {"name": "x", "drift": True,
         "distribution": {"drift": True, "explanation": "drift: wasserstein_normed 0.3 > 0.1"},
         "missing": {"drift": False, "explanation": "no significant change"}},
        {"name": "y", "drift": True, "distribution": {"drift": True}}]}
    out = verdict(r, Thresholds())
    assert out["reasons"][0]["message"] == (
        "input drift in x (drift: wasserstein_normed 0.3 > 0.1), y")
