"""The report end to end on a real PostgreSQL: every number against numpy, scipy, sklearn.

Records are written into the fixture database as the proxy writes them (see records.py);
the expected values are computed independently from the same numbers in Python.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from shadowproxy.compare.command import clean, render
from shadowproxy.compare.config import CompareConfig, SliceConfig
from shadowproxy.compare.labels import import_labels, read_labels
from shadowproxy.compare.report import build_report
from shadowproxy.compare.window import Window
from tests.compare.records import Call, Exchange, insert


def window() -> Window:
    now = datetime.now(UTC)
    return Window(now - timedelta(hours=1), now)


async def report(url: str, compare: dict[str, Any], *, shadow: str = "candidate",
                 reference: Path | None = None, win: Window | None = None,
                 **kw: Any) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        return await build_report(conn, route="house-prices", shadow=shadow,
                                  window=win or window(),
                                  compare=CompareConfig.model_validate(compare),
                                  reference=reference, **kw)
    finally:
        await conn.close()


def house(rng: np.random.Generator, n: int) -> tuple[list[dict[str, Any]], np.ndarray,
                                                     np.ndarray]:
    """Requests and two models that really differ: the shadow overprices big houses."""
    sqft = rng.uniform(400, 4000, n)
    city = rng.choice(["north", "south"], n)
    primary = 50 * sqft + rng.normal(0, 8000, n)
    shadow = primary * np.where(sqft > 3000, 1.15, 1.0) + rng.normal(0, 3000, n)
    requests = [{"features": {"sqft": float(s), "city": str(c)}}
                for s, c in zip(sqft, city, strict=True)]
    return requests, primary, shadow


async def test_regression_report_matches_independent_computation(database_url: str) -> None:
    """Counts, latency, errors and every regression statistic equal numpy/scipy's."""
    rng = np.random.default_rng(11)
    requests, p, s = house(rng, 300)
    p_lat, s_lat = rng.gamma(4, 5, 300), rng.gamma(4, 8, 300)
    exchanges = []
    for i in range(300):
        shadow = Call({"prediction": s[i], "model_version": "v2"}, latency_ms=s_lat[i])
        if i % 50 == 0:
            shadow = Call(None, status=None, latency_ms=None, error="timeout")
        elif i % 50 == 1:
            shadow = Call(None, status=None, latency_ms=None, error="dropped: overload")
        elif i % 50 == 2:
            shadow = Call({"error": "boom"}, status=500, latency_ms=s_lat[i])
        exchanges.append(Exchange(requests[i], Call({"prediction": p[i], "model_version": "v1"},
                                                    latency_ms=p_lat[i]),
                                  {"candidate": shadow}))
    exchanges.append(Exchange(requests[0], Call({"prediction": 1.0}),
                              received_at=datetime.now(UTC) - timedelta(hours=3)))
    await insert(database_url, exchanges)
    r = await report(database_url, {"prediction": "$.prediction", "abs_tolerance": 5000,
                                    "ignore": ["$.model_version"]})

    c = r["counts"]
    assert (c["requests"], c["pairs"], c["shadow_timeouts"], c["shadow_drops"]) == (
        300, 300, 6, 6)
    assert c["complete_pairs"] == 288 and c["comparable_pairs"] == 282
    assert c["shadow_5xx"] == 6 and c["pair_completeness"] == pytest.approx(288 / 300)

    ok = np.array([i % 50 not in (0, 1, 2) for i in range(300)])
    answered = np.array([i % 50 not in (0, 1) for i in range(300)])
    op = r["operational"]
    assert op["primary"]["latency_ms"]["p95"] == pytest.approx(np.percentile(p_lat, 95))
    assert op["shadow"]["latency_ms"]["p99"] == pytest.approx(np.percentile(s_lat[answered], 99))
    assert op["shadow"]["latency_ms"]["p50"] == pytest.approx(np.median(s_lat[answered]))
    assert op["shadow"]["error_rate"] == pytest.approx(12 / 294)  # timeouts + 5xx; drops aside
    assert op["primary"]["error_rate"] == 0
    assert op["status_agreement"] == pytest.approx(282 / 288)
    assert sum(op["latency_histogram"]["primary"]) == 300

    pr, d = r["predictions"], s[ok] - p[ok]
    assert pr["task"] == "regression" and pr["n"] == 282
    assert pr["mae"] == pytest.approx(np.mean(np.abs(d)))
    assert pr["rmse"] == pytest.approx(np.sqrt(np.mean(d**2)))
    assert pr["max_abs_diff"] == pytest.approx(np.max(np.abs(d)))
    assert pr["mean_diff"] == pytest.approx(np.mean(d))
    assert pr["median_diff"] == pytest.approx(np.median(d))
    assert pr["sd_diff"] == pytest.approx(np.std(d, ddof=1))
    pearson = sps.pearsonr(p[ok], s[ok])
    assert pr["pearson"]["r"] == pytest.approx(pearson.statistic)
    assert pr["pearson"]["p_value"] == pytest.approx(pearson.pvalue, rel=1e-6)
    assert pr["spearman"]["r"] == pytest.approx(sps.spearmanr(p[ok], s[ok]).statistic)
    assert pr["paired"]["test"] == "wilcoxon_signed_rank" and pr["paired"]["requests"] == 282
    assert pr["paired"]["p_value"] == pytest.approx(sps.wilcoxon(d).pvalue)
    assert pr["paired"]["mean_shift"] == pytest.approx(np.mean(d))
    assert pr["distribution_test"]["test"] == "ks"
    assert pr["distribution_test"]["p_value"] == pytest.approx(sps.ks_2samp(p[ok], s[ok]).pvalue)
    assert pr["within_tolerance"] == pytest.approx(np.mean(np.abs(d) <= 5000))
    assert pr["primary"]["p75"] == pytest.approx(np.percentile(p[ok], 75))
    assert sum(pr["histogram"]["shadow"]) == 282
    assert sum(map(sum, pr["scatter"]["counts"])) == 282
    worst = pr["worst"][0]
    assert worst["abs_diff"] == pytest.approx(np.max(np.abs(d)))
    assert r["verdict"]["status"] == "fail"  # the shadow errs 4 points more than the primary
    assert any(x["section"] == "operational" for x in r["verdict"]["reasons"])


async def test_batch_predictions_pair_element_by_element(database_url: str) -> None:
    """An instances request's predictions pair by position; a length mismatch is counted."""
    exchanges = [
        Exchange({"instances": [{"x": 1}, {"x": 2}, {"x": 3}]},
                 Call({"predictions": [1.0, 2.0, 3.0]}),
                 {"candidate": Call({"predictions": [1.5, 2.0, 2.0]})}),
        Exchange({"instances": [{"x": 4}, {"x": 5}]}, Call({"predictions": [4.0, 5.0]}),
                 {"candidate": Call({"predictions": [4.0]})}),
    ]
    await insert(database_url, exchanges)
    r = await report(database_url, {"prediction": "$.predictions[*]", "task": "regression"})
    pr = r["predictions"]
    assert pr["n"] == 4 and pr["unpaired_elements"] == 1 and pr["length_mismatch_pairs"] == 1
    d = np.array([0.5, 0.0, -1.0, 0.0])
    assert pr["mae"] == pytest.approx(np.mean(np.abs(d)))
    assert pr["worst"][0]["index"] == 3


async def test_a_class_written_1_or_1_0_is_one_class_in_the_predictions(
        database_url: str) -> None:
    """A candidate that writes its classes as floats (1.0, as numpy does) agrees with a
    primary that writes 1 where the numbers are equal: agreement and flips compare classes
    by value, as the labels' classes and the features' categories are."""
    rng = np.random.default_rng(21)
    n = 200
    p = rng.integers(0, 3, n)
    s = np.where(rng.random(n) < 0.85, p, (p + 1) % 3)
    await insert(database_url, [
        Exchange({"features": {"x": float(i)}}, Call({"label": int(p[i])}),
                 {"candidate": Call({"label": float(s[i])})}) for i in range(n)])
    r = await report(database_url, {"prediction": "$.label", "task": "classification"})
    pr = r["predictions"]
    assert pr["agreement"] == pytest.approx(np.mean(p == s))
    assert pr["flip_matrix"]["counts"] == skm.confusion_matrix(p, s).tolist()


async def _stored_binary_classes(url: str, rng: np.random.Generator, n: int
                                 ) -> tuple[list[Exchange], np.ndarray, np.ndarray,
                                            np.ndarray, np.ndarray]:
    """``n`` stored exchanges of a two-class model: (exchanges, truth, primary's classes,
    candidate's classes, candidate's scores); the candidate is right more often."""
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.8, y, 1 - y)
    s = np.where(rng.random(n) < 0.9, y, 1 - y)
    score = np.clip(s * 0.6 + rng.random(n) * 0.4, 0, 1)
    exchanges = [Exchange({"features": {"x": float(i)}},
                          Call({"label": int(p[i]), "proba": float(p[i])}),
                          {"candidate": Call({"label": int(s[i]), "proba": float(score[i])})})
                 for i in range(n)]
    await insert(url, exchanges)
    return exchanges, y, p, s, score


async def _labels(url: str, tmp_path: Path, labels: list[tuple[str, Any]]) -> None:
    """Import (request id, label) pairs through a CSV file, as `labels import` does."""
    csv = tmp_path / "labels.csv"
    csv.write_text("request_id,label\n" + "".join(f"{rid},{label}\n" for rid, label in labels))
    conn = await asyncpg.connect(url)
    try:
        await import_labels(conn, *read_labels(csv))
    finally:
        await conn.close()


async def test_classification_report_and_labels_match_scikit_learn(
        database_url: str, tmp_path: Path) -> None:
    """Agreement, kappa, flips and, once labels arrive, metrics and McNemar equal sklearn's."""
    rng = np.random.default_rng(12)
    n = 400
    exchanges, y, p, s, score = await _stored_binary_classes(database_url, rng, n)
    compare = {"prediction": "$.label", "score": "$.proba"}
    r = await report(database_url, compare)
    pr = r["predictions"]
    assert pr["task"] == "classification" and pr["task_source"].startswith("inferred")
    assert pr["agreement"] == pytest.approx(np.mean(p == s))
    assert pr["kappa"] == pytest.approx(skm.cohen_kappa_score(p, s))
    assert pr["flip_matrix"]["counts"] == skm.confusion_matrix(p, s).tolist()
    assert pr["positive_rate"]["diff"] == pytest.approx(np.mean(s) - np.mean(p))
    assert "why" in r["performance"]

    labelled = rng.permutation(n)[:300]
    await _labels(database_url, tmp_path, [(exchanges[i].request_id, y[i]) for i in labelled])
    r = await report(database_url, compare)
    perf = r["performance"]
    yl, pl, sl = y[labelled], p[labelled], s[labelled]
    assert perf["n_labelled"] == {"primary": 300, "shadow": 300}
    assert perf["primary"]["accuracy"] == pytest.approx(skm.accuracy_score(yl, pl))
    assert perf["shadow"]["precision"] == pytest.approx(skm.precision_score(yl, sl))
    assert perf["shadow"]["recall"] == pytest.approx(skm.recall_score(yl, sl))
    assert perf["shadow"]["roc_auc"] == pytest.approx(skm.roc_auc_score(yl, score[labelled]))
    b = int(np.sum((pl == yl) & (sl != yl)))
    c = int(np.sum((pl != yl) & (sl == yl)))
    assert perf["paired_test"]["p_value"] == pytest.approx(sps.binomtest(b, b + c).pvalue)
    assert perf["shadow_better"] is True
    assert perf["confidence_intervals"]["accuracy_diff"][1] > 0


async def test_a_positive_class_written_as_a_float_names_the_class_of_that_number(
        database_url: str, tmp_path: Path) -> None:
    """positive_class: 1.0 (a YAML float) or "1.0" is class 1: precision, recall, F1 and
    ROC-AUC of the labels equal sklearn's, and the predictions give the positive rate."""
    exchanges, y, p, s, score = await _stored_binary_classes(
        database_url, np.random.default_rng(21), 300)
    await _labels(database_url, tmp_path, [(ex.request_id, y[i]) for i, ex in enumerate(exchanges)])
    for positive in (1.0, "1.0"):
        r = await report(database_url, {"prediction": "$.label", "score": "$.proba",
                                        "task": "classification",
                                        "positive_class": positive})
        perf = r["performance"]
        assert perf["positive_class"] == "1"
        assert perf["shadow"]["precision"] == pytest.approx(skm.precision_score(y, s))
        assert perf["shadow"]["recall"] == pytest.approx(skm.recall_score(y, s))
        assert perf["primary"]["f1"] == pytest.approx(skm.f1_score(y, p))
        assert perf["shadow"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score))
    r = await report(database_url, {"prediction": "$.label", "task": "classification",
                                    "positive_class": 1.0})
    assert r["predictions"]["positive_class"] == "1"
    assert r["predictions"]["positive_rate"]["shadow"] == pytest.approx(np.mean(s))


async def test_labels_0_and_1_are_the_classes_of_a_model_that_answers_booleans(
        database_url: str, tmp_path: Path) -> None:
    """A yes/no model answering JSON booleans, labelled 0 and 1 (or one answering 0 and 1,
    labelled true and false): the labels are its two classes, so the metrics, McNemar and
    the verdict are sklearn's and scipy's on them. Compared as text, no label matched a
    prediction: accuracy 0 on both sides, no ROC-AUC, and a worse shadow passed the labels."""
    rng = np.random.default_rng(24)
    n = 240
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.9, y, 1 - y)  # the shadow is worse
    s = np.where(rng.random(n) < 0.7, y, 1 - y)
    score = np.clip(s * 0.5 + rng.random(n) * 0.5, 0, 1)
    exchanges = [Exchange({"features": {"x": float(i)}},
                          Call({"fraud": bool(p[i]), "bit": int(p[i]), "proba": float(p[i])}),
                          {"candidate": Call({"fraud": bool(s[i]), "bit": int(s[i]),
                                              "proba": float(score[i])})})
                 for i in range(n)]
    await insert(database_url, exchanges)
    await _labels(database_url, tmp_path,
                  [(ex.request_id, int(y[i])) for i, ex in enumerate(exchanges)])
    compare = {"prediction": "$.fraud", "score": "$.proba",
               "slices": {"first": "(request_body_json #>> '{features,x}')::float < 100"}}
    r = await report(database_url, compare)
    perf = r["performance"]
    assert perf["positive_class"] == "true"
    assert perf["primary"]["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert perf["shadow"]["accuracy"] == pytest.approx(skm.accuracy_score(y, s))
    assert perf["shadow"]["f1"] == pytest.approx(skm.f1_score(y, s))
    assert perf["shadow"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score))
    b = int(np.sum((p == y) & (s != y)))
    c = int(np.sum((p != y) & (s == y)))
    assert perf["paired_test"]["p_value"] == pytest.approx(sps.binomtest(b, b + c).pvalue)
    assert perf["paired_test"]["p_value"] < 0.05 and perf["shadow_better"] is False
    assert "performance" in {reason["section"] for reason in r["verdict"]["reasons"]}
    first = next(x for x in r["slices"]["slices"] if x["slice"] == "first")
    assert first["performance"]["shadow_accuracy"] == pytest.approx(np.mean((s == y)[:100]))

    # The other way round: 0/1 answers, labels true and false.
    await _labels(database_url, tmp_path,
                  [(ex.request_id, "true" if y[i] else "false") for i, ex in enumerate(exchanges)])
    r = await report(database_url, {**compare, "prediction": "$.bit"})
    assert r["performance"]["positive_class"] == "1"
    assert r["performance"]["shadow"]["accuracy"] == pytest.approx(skm.accuracy_score(y, s))


async def test_labels_true_and_false_in_any_case_are_the_classes_of_a_yes_no_model(
        database_url: str, tmp_path: Path) -> None:
    """Labels `True` and `False` (as pandas writes booleans; stored as strings) or `TRUE`
    and `FALSE` are the classes of a model answering JSON booleans, or 0 and 1, as `true`
    and `false` labels are; so are the labels of a file that mixes `1`, `true` and `True`.
    Compared as text, none matched a prediction: accuracy 0 on both sides."""
    rng = np.random.default_rng(25)
    n = 80
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.9, y, 1 - y)
    s = np.where(rng.random(n) < 0.7, y, 1 - y)
    exchanges = [Exchange({"features": {"x": float(i)}},
                          Call({"fraud": bool(p[i]), "bit": int(p[i])}),
                          {"candidate": Call({"fraud": bool(s[i]), "bit": int(s[i])})})
                 for i in range(n)]
    await insert(database_url, exchanges)
    compare = {"prediction": "$.fraud",
               "slices": {"first": "(request_body_json #>> '{features,x}')::float < 40"}}
    mixed = ("1", "true", "True")
    for spell, prediction in (({1: "True", 0: "False"}, "$.fraud"),
                              ({1: "TRUE", 0: "FALSE"}, "$.bit"),
                              ({1: "True", 0: "False"}, "$.bit"),
                              ({0: "0"}, "$.fraud")):
        await _labels(database_url, tmp_path, [
            (ex.request_id, spell.get(int(y[i])) or mixed[i % 3])
            for i, ex in enumerate(exchanges)])
        r = await report(database_url, {**compare, "prediction": prediction})
        perf = r["performance"]
        assert perf["primary"]["accuracy"] == pytest.approx(skm.accuracy_score(y, p)), spell
        assert perf["shadow"]["accuracy"] == pytest.approx(skm.accuracy_score(y, s)), spell
        first = next(x for x in r["slices"]["slices"] if x["slice"] == "first")
        assert first["performance"]["shadow_accuracy"] == pytest.approx(
            np.mean((s == y)[:40]))


async def test_whole_number_classes_past_2_53_stay_apart_on_labels(
        database_url: str, tmp_path: Path) -> None:
    """Item ids 2^53, 2^53 + 1 and 2^53 + 2 as classes: each prediction is right only for
    its own id, so the accuracy and McNemar's counts are sklearn's and scipy's."""
    base = 2**53
    rng = np.random.default_rng(22)
    n = 200
    y = rng.integers(0, 3, n)
    p = np.where(rng.random(n) < 0.6, y, (y + 1) % 3)
    s = np.where(rng.random(n) < 0.9, y, (y + 2) % 3)
    exchanges = [Exchange({"features": {"x": float(i)}}, Call({"item": base + int(p[i])}),
                          {"candidate": Call({"item": base + int(s[i])})})
                 for i in range(n)]
    await insert(database_url, exchanges)
    await _labels(database_url, tmp_path,
                  [(ex.request_id, base + int(y[i])) for i, ex in enumerate(exchanges)])
    perf = (await report(database_url, {"prediction": "$.item",
                                        "task": "classification"}))["performance"]
    assert perf["primary"]["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert perf["shadow"]["accuracy"] == pytest.approx(skm.accuracy_score(y, s))
    assert perf["primary"]["f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    b = int(np.sum((p == y) & (s != y)))
    c = int(np.sum((p != y) & (s == y)))
    assert (perf["paired_test"]["b"], perf["paired_test"]["c"]) == (b, c)
    assert perf["paired_test"]["p_value"] == pytest.approx(sps.binomtest(b, b + c).pvalue)


async def test_predictions_written_as_strings_are_counted_not_taken_for_a_wrong_path(
        database_url: str) -> None:
    """task: regression over a service that writes some of its numbers as strings ("0.5"):
    those pairs are counted as not numbers and left out, the statistics are numpy's on the
    others; when every pair is such, the verdict says so. It said that the jsonpath matched
    no paired values, which sent the operator to a path that matched every response."""
    rng = np.random.default_rng(25)
    p, s = rng.normal(10, 2, 150), rng.normal(10.5, 2, 150)
    written = [(float(a), float(b)) if i < 100 else (f"{a:.3f}", f"{b:.3f}")
               for i, (a, b) in enumerate(zip(p, s, strict=True))]
    await insert(database_url, [
        Exchange({"features": {"x": float(i)}}, Call({"prediction": a}),
                 {"candidate": Call({"prediction": b})}) for i, (a, b) in enumerate(written)])
    r = await report(database_url, {"prediction": "$.prediction", "task": "regression"})
    pr = r["predictions"]
    assert (pr["n"], pr["pairs_not_numbers"]) == (100, 50)
    assert pr["mae"] == pytest.approx(np.mean(np.abs(s[:100] - p[:100])))
    assert "50 paired predictions at $.prediction are not numbers" in render(r, "text")

    route = "strings"
    await insert(database_url, [
        Exchange({"features": {"x": float(i)}}, Call({"prediction": f"{a:.3f}"}),
                 {"candidate": Call({"prediction": f"{b:.3f}"})}, route=route)
        for i, (a, b) in enumerate(zip(p, s, strict=True))])
    conn = await asyncpg.connect(database_url)
    try:
        r = dict(await build_report(conn, route=route, shadow="candidate", window=window(),
                                    compare=CompareConfig.model_validate(
                                        {"prediction": "$.prediction", "task": "regression"})))
    finally:
        await conn.close()
    assert (r["predictions"]["n"], r["predictions"]["pairs_not_numbers"]) == (0, 150)
    messages = [x["message"] for x in r["verdict"]["reasons"] if x["section"] == "predictions"]
    assert len(messages) == 1 and "matched 150 paired values, none a number" in messages[0]


async def test_diff_counts_differing_fields_after_ignore_and_tolerance(database_url: str) -> None:
    """Per field how often it differs, Diffy-style; ignored paths and tolerated numbers aside."""
    def body(pred: float, ts: str, extra: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"prediction": pred, "model_version": "x",
                               "items": [{"score": 1, "ts": ts}, {"score": 2, "ts": ts}]}
        if extra:
            out["debug"] = {"k": 1}
        return out

    exchanges = []
    for i in range(20):
        exchanges.append(Exchange(
            {"x": i}, Call(body(10.0, "t1", False)),
            {"candidate": Call(body(10.0 + (0.5 if i < 5 else 0.001), f"t{i}", i < 3))}))
    await insert(database_url, exchanges)
    r = await report(database_url, {"prediction": "$.prediction", "abs_tolerance": 0.01,
                                    "ignore": ["$.model_version", "$.items[*].ts"]})
    d = r["diff"]
    fields = {f["field"]: f for f in d["fields"]}
    assert "$.model_version" not in fields and "$.items[*].ts" not in fields
    assert fields["$.prediction"]["n_differ"] == 5
    assert fields["$.debug.k"]["n_differ"] == 3 and fields["$.debug.k"]["n_present"] == 3
    assert fields["$.items[*].score"]["n_differ"] == 0
    assert d["identical"] == 15 and d["identical_share"] == pytest.approx(0.75)
    assert len(fields["$.prediction"]["examples"]) == 3
    assert d["worst"][0]["fields_differing"] == 2


async def test_baseline_shadow_noise_is_reported_and_excluded(database_url: str) -> None:
    """A field the baseline (same model) also changes is noise; the real change remains."""
    exchanges = []
    for i in range(40):
        exchanges.append(Exchange(
            {"x": i}, Call({"prediction": float(i), "served_at": f"p{i}"}),
            {"candidate": Call({"prediction": float(i) + (1 if i % 4 == 0 else 0),
                                "served_at": f"c{i}"}),
             "baseline": Call({"prediction": float(i), "served_at": f"b{i}"})}))
    await insert(database_url, exchanges)
    r = await report(database_url, {"prediction": "$.prediction",
                                    "baseline_shadow": "baseline"})
    d = r["diff"]
    fields = {f["field"]: f for f in d["fields"]}
    assert d["noise_fields"] == ["$.served_at"]
    assert fields["$.served_at"]["noise"] is True and fields["$.served_at"]["noise_rate"] == 1
    assert fields["$.prediction"]["noise"] is False
    assert d["identical_share"] == 0
    assert d["identical_share_excluding_noise"] == pytest.approx(30 / 40)
    assert r["predictions"]["baseline_noise"]["mae"] == 0


def _feature_exchanges(rng: np.random.Generator, n: int, shift: float, *,
                       minutes_ago: float = 5) -> tuple[list[Exchange], np.ndarray, list[str]]:
    sqft = rng.normal(2000 + shift, 300, n)
    city = list(rng.choice(["north", "south", "east"], n, p=[0.5, 0.3, 0.2]))
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    exchanges = [Exchange({"features": {"sqft": float(sqft[i]), "city": city[i]}},
                          Call({"prediction": float(sqft[i])}),
                          {"candidate": Call({"prediction": float(sqft[i]) * 1.01})},
                          received_at=at) for i in range(n)]
    return exchanges, sqft, city


FEATURES = {"sqft": {"path": "$.features.sqft"}, "city": {"path": "$.features.city"}}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
async def test_data_checks_against_a_reference_file(database_url: str, tmp_path: Path,
                                                    suffix: str) -> None:
    """Live inputs vs training data: effects and levels on the same numbers, Holm, flags."""
    import pyarrow as pa

    rng = np.random.default_rng(13)
    exchanges, sqft, city = _feature_exchanges(rng, 400, shift=150)
    exchanges[0].request["features"]["sqft"] = None
    exchanges[1].request["features"]["city"] = "west"
    city[1] = "west"
    await insert(database_url, exchanges)
    ref_sqft = rng.normal(2000, 300, 600)
    ref_city = rng.choice(["north", "south", "east"], 600, p=[0.5, 0.3, 0.2])
    table = pa.table({"sqft": ref_sqft, "city": ref_city})
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    r = await report(database_url, {"prediction": "$.prediction", "features": FEATURES},
                     reference=path)
    dc = r["data_checks"]
    assert dc["reference"]["kind"] == "file"
    f = {x["name"]: x for x in dc["features"]}
    live = sqft[1:]
    assert f["sqft"]["type"] == "numeric" and f["sqft"]["current"]["missing"] == 1
    assert f["sqft"]["current"]["mean"] == pytest.approx(np.mean(live))
    assert f["sqft"]["current"]["sd"] == pytest.approx(np.std(live, ddof=1))
    assert f["sqft"]["reference"]["median"] == pytest.approx(np.median(ref_sqft))
    dist = f["sqft"]["distribution"]
    assert dist["effect"] == "wasserstein_normed"
    assert dist["size"] == pytest.approx(
        sps.wasserstein_distance(ref_sqft, live) / np.std(ref_sqft))
    assert f["sqft"]["levels"] == "20 bins at the pooled quantiles"
    assert dist["test"]["statistic"] == "anderson_darling"
    assert dist["test"]["method"] == "permutation_by_request"
    assert dist["test"]["requests"] == [600, 399]
    assert f["sqft"]["info"]["mean_diff"] == pytest.approx(np.mean(live) - np.mean(ref_sqft))
    assert f["sqft"]["missing"]["size"] == pytest.approx(1 / 400)
    cats = ["east", "north", "south", "west"]
    ref_share = np.array([np.mean(ref_city == c) for c in cats])
    cur_share = np.array([city.count(c) / 400 for c in cats])
    assert f["city"]["type"] == "categorical" and f["city"]["levels"] == "4 categories"
    assert f["city"]["distribution"]["size"] == pytest.approx(
        np.abs(cur_share - ref_share).sum() / 2)
    assert f["city"]["info"]["unseen_share"] == pytest.approx(1 / 400)
    assert f["city"]["checks"]["allowed"] == {"source": "reference", "violations": 1,
                                              "share": pytest.approx(1 / 400),
                                              "examples": ["west"]}
    assert f["city"]["missing"]["test"] is None  # none missing on either side
    family = [f["sqft"]["distribution"], f["sqft"]["missing"], f["city"]["distribution"]]
    assert dc["tests"] == 3 and dc["correction"] == "holm"
    ps = np.array([c["test"]["p_value"] for c in family])
    order = np.argsort(ps)
    holm = np.maximum.accumulate(np.minimum(1, (3 - np.arange(3)) * ps[order]))
    for c, p_adj in zip([family[i] for i in order], holm, strict=True):
        assert c["p_adjusted"] == pytest.approx(p_adj)
    assert f["sqft"]["drift"] is True and dc["drifted"] == ["sqft"]
    assert r["verdict"]["status"] == "warn"


async def test_whole_numbers_are_one_category_however_written(database_url: str,
                                                             tmp_path: Path) -> None:
    """A rating sent as 1, 2, 3, 4 by the clients and written 1.0, 2.0, 3.0, 4.0 in the
    training file (a float column) has the same four categories on both sides: no unseen
    values, and the drift test compares the shares of the same levels."""
    rng = np.random.default_rng(17)
    rating = rng.choice([1, 2, 3, 4], 400)
    exchanges = [Exchange({"features": {"rating": int(v)}}, Call({"prediction": 1.0}),
                          {"candidate": Call({"prediction": 1.0})}) for v in rating]
    exchanges[0].request["features"]["rating"] = 2.0  # a client that writes floats
    rating[0] = 2
    await insert(database_url, exchanges)
    ref = rng.choice([1, 2, 3, 4], 600)
    path = tmp_path / "train.csv"
    path.write_text("rating\n" + "".join(f"{float(v)}\n" for v in ref))
    r = await report(database_url, {"prediction": "$.prediction", "features": {
        "rating": {"path": "$.features.rating", "allowed": [1, 2, 3, 4.0]}}}, reference=path)
    f = r["data_checks"]["features"][0]
    assert f["type"] == "categorical" and f["levels"] == "4 categories"
    assert f["current"]["n_unique"] == 4
    assert {t["value"] for t in f["current"]["top"]} == {"1", "2", "3", "4"}
    assert {t["value"] for t in f["reference"]["top"]} == {"1", "2", "3", "4"}
    assert f["checks"]["failed"] == [] and f["info"]["unseen_share"] == 0.0
    shares = [(np.mean(ref == c), np.mean(rating == c)) for c in (1, 2, 3, 4)]
    assert f["distribution"]["size"] == pytest.approx(sum(abs(a - b) for a, b in shares) / 2)
    assert r["data_checks"]["drifted"] == []


async def test_configured_value_checks_fail_the_report(database_url: str) -> None:
    """Values outside allowed/min/max, or missing where not allowed, give a fail verdict."""
    rng = np.random.default_rng(14)
    exchanges, _, _ = _feature_exchanges(rng, 50, shift=0)
    exchanges[0].request["features"]["sqft"] = -5
    exchanges[1].request["features"]["city"] = "atlantis"
    del exchanges[2].request["features"]["sqft"]
    await insert(database_url, exchanges)
    features = {"sqft": {"path": "$.features.sqft", "min": 0, "na_allowed": False},
                "city": {"path": "$.features.city", "allowed": ["north", "south", "east"]}}
    r = await report(database_url, {"prediction": "$.prediction", "features": features})
    f = {x["name"]: x for x in r["data_checks"]["features"]}
    assert f["sqft"]["checks"]["range"]["violations"] == 1
    assert f["sqft"]["checks"]["missing"]["count"] == 1
    assert f["city"]["checks"]["allowed"]["violations"] == 1
    assert r["verdict"]["status"] == "fail"
    assert sorted(r["data_checks"]["value_check_failures"]) == ["city", "sqft"]


async def test_numbers_beyond_float8_break_a_configured_range(database_url: str) -> None:
    """A number too large for float8 (1e400, -1e400) is outside a configured finite min or
    max: the range check counts it and the report fails. It was not counted (its float8 is
    NULL), and the verdict passed; a bound of .inf is no bound, and it stays within it."""
    rng = np.random.default_rng(19)
    exchanges, _, _ = _feature_exchanges(rng, 50, shift=0)
    exchanges[0].request["features"]["sqft"] = 10**400
    exchanges[1].request["features"]["sqft"] = -(10**400)
    await insert(database_url, exchanges)
    features = {"sqft": {"path": "$.features.sqft", "min": 0, "max": 100_000},
                "open": {"path": "$.features.sqft", "max": float("inf")}}
    r = await report(database_url, {"prediction": "$.prediction", "features": features})
    f = {x["name"]: x for x in r["data_checks"]["features"]}
    assert f["sqft"]["checks"]["range"]["violations"] == 2
    assert f["open"]["checks"]["range"]["violations"] == 0
    assert r["data_checks"]["value_check_failures"] == {
        "sqft": ["2 values outside [0.0, 100000.0]"]}
    assert r["verdict"]["status"] == "fail"


async def test_numbers_beyond_float8_do_not_stop_the_report(database_url: str) -> None:
    """JSON numbers float8 cannot hold (1e400 in a feature and a prediction, 1e-400 in a
    feature) are legal JSON: a number too large is left out of the statistics like a value
    that is not a number, one too small is 0, and the report is produced."""
    rng = np.random.default_rng(16)
    exchanges, sqft, _ = _feature_exchanges(rng, 150, shift=0)
    exchanges[0].request["features"]["sqft"] = 10**400
    exchanges[1].shadows["candidate"] = Call({"prediction": -(10**400)})
    await insert(database_url, exchanges)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("""UPDATE shadowproxy.requests
                              SET body_json = '{"features": {"sqft": 1e-400}}'
                              WHERE request_id = $1""", exchanges[2].request_id)
    finally:
        await conn.close()
    features = {"sqft": {"path": "$.features.sqft", "type": "numeric"}}
    r = await report(database_url, {"prediction": "$.prediction", "task": "regression",
                                    "features": features})
    f = r["data_checks"]["features"][0]
    assert f["current"]["n"] == 150 and f["current"]["missing"] == 0
    assert f["current"]["min"] == 0.0
    assert f["current"]["mean"] == pytest.approx(np.mean([sqft[1], *sqft[3:], 0.0]))
    assert r["predictions"]["n"] == 149
    assert r["predictions"]["mae"] == pytest.approx(np.mean(np.abs(
        np.delete(sqft * 0.01, 1))))


async def _insert_with_big_feature(database_url: str, p: np.ndarray, s: np.ndarray,
                                   big: np.ndarray, earlier_big: np.ndarray) -> None:
    """Pairs of predictions ``p`` (primary) and ``s`` (shadows "candidate" and "base") with
    the features ``sqft`` (the index) and ``big``, and the window 90 minutes before (the
    drift check's reference) with ``big`` as ``earlier_big``."""
    await insert(database_url, [
        Exchange({"features": {"sqft": float(i), "big": float(big[i])}},
                 Call({"prediction": float(p[i])}),
                 {"candidate": Call({"prediction": float(s[i])}),
                  "base": Call({"prediction": float(s[i])})})
        for i in range(len(p))])
    earlier = datetime.now(UTC) - timedelta(minutes=90)
    await insert(database_url, [
        Exchange({"features": {"sqft": float(i), "big": float(earlier_big[i])}},
                 Call({"prediction": 1.0}), {"candidate": Call({"prediction": 1.0})},
                 received_at=earlier) for i in range(len(p))])


async def test_tiny_predictions_do_not_stop_the_report(database_url: str) -> None:
    """Predictions 1e-200 apart (probabilities from an exp that went that far): their
    squared difference is below float8's smallest number, and PostgreSQL raised
    "value out of range: underflow" for it, so the report stopped (exit status 1). It
    counts as 0 in the RMSE, as in numpy's float64, in every section that squares."""
    rng = np.random.default_rng(20)
    p, s = rng.uniform(0, 1, 150), rng.uniform(0, 1, 150)
    p[:20], s[:20] = 1e-200, 3e-200
    await insert(database_url, [
        Exchange({"features": {"sqft": float(i)}}, Call({"prediction": p[i]}),
                 {"candidate": Call({"prediction": s[i]}), "base": Call({"prediction": s[i]})})
        for i in range(150)])
    r = await report(database_url, {
        "prediction": "$.prediction", "task": "regression", "baseline_shadow": "base",
        "features": {"sqft": {"path": "$.features.sqft"}},
        "slices": {"first": {"feature": "sqft", "bins": [0, 50, 150]}}})
    pred = r["predictions"]
    assert pred["n"] == 150
    assert pred["mae"] == pytest.approx(np.mean(np.abs(s - p)))
    assert pred["rmse"] == pytest.approx(np.sqrt(np.mean((s - p) ** 2)))
    assert pred["baseline_noise"]["rmse"] == pytest.approx(pred["rmse"])
    first = next(x for x in r["slices"]["slices"] if x["slice"] == "sqft in [0, 50)")
    assert first["rmse"] == pytest.approx(np.sqrt(np.mean((s - p)[:50] ** 2)))


async def test_a_candidate_that_diverged_to_huge_values_is_reported(database_url: str) -> None:
    """A shadow whose predictions blew up (1e200, a diverged model: what shadowing is for)
    and a feature as large: squares, variances and correlations past float8's range made
    PostgreSQL raise "value out of range: overflow", and the report stopped (exit status
    1). The figures are reported, as large as they are, and the verdict says so."""
    rng = np.random.default_rng(21)
    p = rng.uniform(0, 1, 150)
    s = p.copy()
    s[:30] = rng.uniform(1e199, 1e200, 30)
    big = rng.uniform(1e199, 1e200, 150)
    # The window before (the drift check's reference): the feature three times as large.
    await _insert_with_big_feature(database_url, p, s, big, 3 * big)
    r = await report(database_url, {
        "prediction": "$.prediction", "task": "regression", "baseline_shadow": "base",
        "features": {"sqft": {"path": "$.features.sqft"}, "big": {"path": "$.features.big"}},
        "slices": {"first": {"feature": "sqft", "bins": [0, 50, 150]}}})
    pred = r["predictions"]
    assert pred["n"] == 150
    assert pred["mae"] == pytest.approx(np.mean(np.abs(s - p)))
    assert pred["rmse"] == pytest.approx(np.sqrt(np.mean(((s - p) / 1e200) ** 2)) * 1e200)
    assert pred["max_abs_diff"] == pytest.approx(np.max(np.abs(s - p)))
    assert pred["baseline_noise"]["rmse"] == pytest.approx(pred["rmse"])
    first = next(x for x in r["slices"]["slices"] if x["slice"] == "sqft in [0, 50)")
    assert first["rmse"] == pytest.approx(
        np.sqrt(np.mean(((s - p)[:50] / 1e200) ** 2)) * 1e200)
    feature = next(x for x in r["data_checks"]["features"] if x["name"] == "big")
    assert feature["current"]["mean"] == pytest.approx(np.mean(big))
    assert feature["current"]["sd"] == pytest.approx(np.std(big / 1e200, ddof=1) * 1e200)
    assert feature["reference"]["mean"] == pytest.approx(np.mean(3 * big))
    assert feature["drift"] is True
    assert r["verdict"]["status"] == "warn"
    assert "the shadow is systematically higher" in r["verdict"]["reasons"][0]["message"]
    for fmt in ("text", "markdown", "html"):
        assert "e+199" in render(r, fmt)


async def test_predictions_at_the_ends_of_float8_are_reported(database_url: str) -> None:
    """Pairs of predictions 1.7e308 (primary) and -1.7e308 (shadow), and a feature spread
    over ±1.7e308: their differences, and percentiles interpolated between them, are past
    float8's range, and the report stopped with "value out of range: overflow" (exit status
    1), the numeric retry too. Every figure that fits a float is reported as computed on
    the exact values; the differences past the range are counted and shown as null."""
    rng = np.random.default_rng(23)
    p = rng.uniform(0, 1, 150)
    s = p.copy()
    p[:5], s[:5] = 1.7e308, -1.7e308
    big = rng.uniform(-1, 1, 150) * 1.7e308
    await _insert_with_big_feature(database_url, p, s, big, -big / 3)
    compare = {"prediction": "$.prediction", "task": "regression", "baseline_shadow": "base",
               "features": {"sqft": {"path": "$.features.sqft"},
                            "big": {"path": "$.features.big"}},
               "slices": {"first": {"feature": "sqft", "bins": [0, 50, 150]}}}
    r = clean(await report(database_url, compare))
    # Expected values from the exact differences (Decimal: past float8's range too).
    exact = [Decimal(float(b)) - Decimal(float(a)) for a, b in zip(p, s, strict=True)]
    half = s / 2 - p / 2  # the differences, halved: in range, for quantiles
    pred = r["predictions"]
    assert pred["n"] == 150 and pred["differences_beyond_float8"] == 5
    assert pred["mae"] == pytest.approx(float(sum(abs(d) for d in exact) / 150))
    assert pred["mean_diff"] == pytest.approx(float(sum(exact) / 150))
    assert pred["rmse"] == pytest.approx(float((sum(d * d for d in exact) / 150).sqrt()))
    assert pred["max_abs_diff"] is None  # 3.4e308
    assert pred["within_tolerance"] == pytest.approx(145 / 150)
    assert pred["baseline_noise"]["mae"] == pytest.approx(pred["mae"])
    q = pred["quantiles"]
    assert q["primary"] == pytest.approx(list(np.quantile(p / 2, q["levels"]) * 2))
    assert q["shadow"] == pytest.approx(list(np.quantile(s / 2, q["levels"]) * 2))
    levels = [2 * float(x) for x in np.quantile(half, q["levels"])]  # ±inf past the range
    assert q["diff"] == [None if math.isinf(x) else pytest.approx(x) for x in levels]
    assert q["diff"][:4] == [None] * 4 and None not in q["diff"][4:]
    assert pred["median_diff"] == 0.0
    assert pred["diff_histogram"]["counts"][0] == 5 and sum(pred["diff_histogram"]["counts"]) == 150
    assert [w["abs_diff"] for w in pred["worst"][:6]] == [None] * 5 + [0.0]
    assert pred["paired"]["mean_shift"] == pytest.approx(pred["mean_diff"])
    assert pred["paired"]["median_shift"] == 0.0
    first = next(x for x in r["slices"]["slices"] if x["slice"] == "sqft in [0, 50)")
    assert first["mae"] == pytest.approx(float(sum(abs(d) for d in exact[:50]) / 50))
    assert first["test"]["diff"] == pytest.approx(first["mae"])
    assert first["flagged"] is True
    feature = next(x for x in r["data_checks"]["features"] if x["name"] == "big")
    big_mean = float(sum(Decimal(float(x)) for x in big) / 150)
    assert feature["current"]["mean"] == pytest.approx(big_mean)
    assert feature["current"]["median"] == pytest.approx(np.median(big))
    assert feature["quantiles"]["current"] == pytest.approx(
        list(np.quantile(big / 2, feature["quantiles"]["levels"]) * 2))
    assert feature["info"]["mean_diff"] == pytest.approx(big_mean * 4 / 3)
    assert feature["drift"] is True
    assert all(np.isfinite(feature["histogram"]["edges"]))
    text = render(r, "text")
    assert "5 differences of paired predictions are past float8's range" in text
    assert "× 1e308" in render(r, "html")
    # Sampled, the estimate of the disagreeing pairs reads the same values.
    sampled = clean(await report(database_url, compare, max_pairs=100))
    e = sampled["meta"]["sample"]["estimates"]["pairs_with_disagreeing_predictions"]
    assert e["in_sample"] == sampled["predictions"]["differences_beyond_float8"]


async def test_without_reference_the_earlier_window_is_the_reference(database_url: str) -> None:
    """No --reference: the same-length window just before is compared, on its values."""
    rng = np.random.default_rng(15)
    now_ex, now_sqft, _ = _feature_exchanges(rng, 200, shift=0, minutes_ago=10)
    old_ex, old_sqft, _ = _feature_exchanges(rng, 200, shift=400, minutes_ago=80)
    await insert(database_url, now_ex + old_ex)
    r = await report(database_url, {"prediction": "$.prediction", "features": FEATURES})
    dc = r["data_checks"]
    assert dc["reference"]["kind"] == "earlier_window"
    sqft = next(x for x in dc["features"] if x["name"] == "sqft")
    assert sqft["reference"]["n"] == 200 and sqft["current"]["n"] == 200
    assert sqft["distribution"]["size"] == pytest.approx(
        sps.wasserstein_distance(old_sqft, now_sqft) / np.std(old_sqft))
    assert sqft["distribution"]["test"]["requests"] == [200, 200]
    assert sqft["drift"] is True
    assert sum(sqft["histogram"]["reference"]) == 200
    assert r["counts"]["pairs"] == 200


async def test_a_feature_gone_missing_counts_among_the_tested(database_url: str) -> None:
    """A feature whose values all went missing is tested (its missing share) and drifts:
    it counts among the tested features, so the drift share stays a share of them. It was
    left out of n_tested while counted in drifted: 2 drifted of 1 tested, a share of 2.0."""
    rng = np.random.default_rng(17)
    now_ex, _, _ = _feature_exchanges(rng, 200, shift=600, minutes_ago=10)
    old_ex, _, _ = _feature_exchanges(rng, 200, shift=0, minutes_ago=80)
    for ex in now_ex:
        del ex.request["features"]["city"]
    await insert(database_url, now_ex + old_ex)
    r = await report(database_url, {"prediction": "$.prediction", "features": FEATURES})
    dc = r["data_checks"]
    city = next(x for x in dc["features"] if x["name"] == "city")
    assert city["distribution"]["test"] is None and city["missing"]["drift"] is True
    assert dc["drifted"] == ["sqft", "city"]
    assert (dc["n_tested"], dc["drift_share"], dc["dataset_drift"]) == (2, 1.0, True)


async def _stored_houses(url: str, *, seed: int, n: int = 400
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` house-price exchanges stored: (sqft, primary's, candidate's predictions)."""
    requests, p, s = house(np.random.default_rng(seed), n)
    await insert(url, [
        Exchange(requests[i], Call({"prediction": p[i]}), {"candidate": Call({"prediction": s[i]})})
        for i in range(n)])
    return np.array([r["features"]["sqft"] for r in requests]), p, s


async def test_slices_by_sql_and_by_feature_bins(database_url: str) -> None:
    """Per-slice metrics equal numpy's on the slice; the departing slice is flagged."""
    sqft, p, s = await _stored_houses(database_url, seed=16)
    compare = {"prediction": "$.prediction",
               "features": {"sqft": {"path": "$.features.sqft"}},
               "slices": {"big": "(request_body_json #>> '{features,sqft}')::float > 3000",
                          "tiny": "(request_body_json #>> '{features,sqft}')::float < 420",
                          "size": {"feature": "sqft", "bins": [0, 2000, 4000]},
                          "huge": "(request_body_json #>> '{features,sqft}')::float > 1e6",
                          "far": {"feature": "sqft", "bins": [1e6, 2e6]}}}
    r = await report(database_url, compare)
    sl = {x["slice"]: x for x in r["slices"]["slices"]}
    # Configured slices no pair falls in are named, in the JSON and in the rendered report.
    assert r["slices"]["empty"] == ["huge", "far"]
    assert {x["family"] for x in r["slices"]["slices"]} == {"big", "tiny", "size"}
    assert "no pair in the window falls in huge, far (compare.slices)" in render(r, "text")
    big = sqft > 3000
    err = np.abs(s - p)
    assert sl["big"]["n"] == int(big.sum())
    assert sl["big"]["mae"] == pytest.approx(np.mean(err[big]))
    test = sl["big"]["test"]
    assert test["method"] == "permutation_by_request"
    assert test["requests"] == [int(big.sum()), int((~big).sum())]
    assert test["diff"] == pytest.approx(np.mean(err[big]) - np.mean(err[~big]))
    assert test["p_value"] < 0.001  # the smallest of the 3 slices' p-values: Holm's 3 × p
    assert test["p_value_adjusted"] == pytest.approx(3 * test["p_value"])
    assert sl["big"]["flagged"] is True and r["slices"]["multiple_testing"]["method"] == "holm"
    assert sl["tiny"]["test"]["test"] is None  # under min_size
    low = sqft < 2000
    assert sl["sqft in [0, 2000)"]["n"] == int(low.sum())
    assert sl["sqft in [2000, 4000]"]["rmse"] == pytest.approx(
        np.sqrt(np.mean((s - p)[~low] ** 2)))
    fam = r["slices"]["families"]["size"]
    assert fam["test"] == "kruskal"
    assert fam["p_value"] == pytest.approx(sps.kruskal(err[low], err[~low]).pvalue)


async def test_open_ended_bins_slice_every_value(database_url: str) -> None:
    """Bins with infinite outer edges (``bins: [-.inf, 2000, .inf]`` in YAML) hold every
    value below and above; the edges went into the SQL as ``inf``, which PostgreSQL read as
    a column name, and the report stopped (exit status 1)."""
    sqft, p, s = await _stored_houses(database_url, seed=18)
    compare = {"prediction": "$.prediction",
               "features": {"sqft": {"path": "$.features.sqft"}},
               "slices": {"size": {"feature": "sqft",
                                   "bins": [float("-inf"), 2000, float("inf")]}}}
    r = await report(database_url, compare)
    sl = {x["slice"]: x for x in r["slices"]["slices"]}
    low = sqft < 2000
    assert sl["sqft in [-inf, 2000)"]["n"] == int(low.sum())
    assert sl["sqft in [2000, inf]"]["n"] == int((~low).sum())
    assert sl["sqft in [2000, inf]"]["mae"] == pytest.approx(np.mean(np.abs(s - p)[~low]))


def test_slice_bins_refuse_nan() -> None:
    """A NaN edge orders with nothing: refused like edges out of order, every time (a set
    places a NaN by its identity, so the order test passed it or not by chance)."""
    for _ in range(20):
        for bins in ([0, float("nan")], [0, float("nan"), 1]):
            with pytest.raises(ValueError, match="increasing edges"):
                SliceConfig(feature="sqft", bins=bins)


async def test_tests_run_on_a_seeded_sample_above_sample_max(database_url: str) -> None:
    """Above sample_max the tests see a reproducible hash sample; SQL aggregates see all."""
    rng = np.random.default_rng(17)
    p = rng.normal(0, 1, 3000)
    s = p + rng.normal(0, 0.1, 3000)
    await insert(database_url, [
        Exchange({"x": 1}, Call({"prediction": p[i]}), {"candidate": Call({"prediction": s[i]})})
        for i in range(3000)])
    compare = {"prediction": "$.prediction", "thresholds": {"sample_max": 1000}}
    first = await report(database_url, compare)
    again = await report(database_url, compare)
    sample = first["predictions"]["sample"]
    assert sample["sampled"] is True and 800 < sample["n"] < 1200
    assert first["predictions"]["mae"] == pytest.approx(np.mean(np.abs(s - p)))
    assert first["predictions"]["spearman"] == again["predictions"]["spearman"]
    assert first["predictions"]["paired"] == again["predictions"]["paired"]
    assert first["predictions"]["paired"]["n"] == sample["n"]
    diff = first["diff"]
    assert diff["sampled"] is True and 800 < diff["compared_pairs"] < 1200
    assert diff["fields"][0]["n_present"] == diff["compared_pairs"]
    assert diff["identical"] == 0


async def test_a_slice_named_as_another_familys_slice_is_tested_on_its_own_rows(
        database_url: str) -> None:
    """A SQL slice named as a bin of a feature slice family: each slice's test compares its
    own rows with the rest (a slice name is unique only in its family)."""
    sqft, p, s = await _stored_houses(database_url, seed=18)
    compare = {"prediction": "$.prediction",
               "features": {"sqft": {"path": "$.features.sqft"}},
               "slices": {"sqft in [0, 2000)":
                          "(request_body_json #>> '{features,sqft}')::float > 3000",
                          "size": {"feature": "sqft", "bins": [0, 2000, 4000]}}}
    r = await report(database_url, compare)
    sl = {(x["family"], x["slice"]): x for x in r["slices"]["slices"]}
    err = np.abs(s - p)
    for key, rows in [(("sqft in [0, 2000)", "sqft in [0, 2000)"), sqft > 3000),
                      (("size", "sqft in [0, 2000)"), sqft < 2000)]:
        test = sl[key]["test"]
        assert sl[key]["n"] == int(rows.sum())
        assert test["requests"] == [int(rows.sum()), int((~rows).sum())]
        assert test["diff"] == pytest.approx(np.mean(err[rows]) - np.mean(err[~rows]))
    assert sl[("sqft in [0, 2000)", "sqft in [0, 2000)")]["flagged"] is True
