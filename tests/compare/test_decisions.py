"""The report's decisions on windows with a known answer, end to end on a real PostgreSQL.

Each case is a window where the report's rule and a naive one (the two columns compared as
distributions, or rows counted as independent) part: the records are written into the
fixture database as the proxy writes them (records.py), the report is built on them, and
its verdict and the decision behind it are checked, together with what the naive rule says.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial import distance

from shadowproxy.compare.window import Window
from tests.compare.records import Call, Exchange, insert
from tests.compare.test_report import report


def reasons(r: dict[str, Any], section: str) -> list[str]:
    return [x["message"] for x in r["verdict"]["reasons"] if x["section"] == section]


async def test_a_shadow_higher_by_005_on_every_request_warns(database_url: str) -> None:
    """Shadow = primary + 0.05: the paired test warns although the columns' KS passes."""
    rng = np.random.default_rng(1)
    p = rng.normal(0, 1, 500)
    s = p + 0.05 + rng.normal(0, 0.02, 500)
    await insert(database_url, [
        Exchange({"x": i}, Call({"prediction": p[i]}), {"candidate": Call({"prediction": s[i]})})
        for i in range(500)])
    r = await report(database_url, {"prediction": "$.prediction"})
    assert r["verdict"]["status"] == "warn"
    assert reasons(r, "predictions")[0].startswith("the shadow is systematically higher")
    pr = r["predictions"]
    assert pr["distribution_test"]["test"] == "ks"
    assert pr["distribution_test"]["p_value"] == sps.ks_2samp(p, s).pvalue > 0.05
    assert pr["paired"]["decision"] is True and pr["paired"]["requests"] == 500
    assert pr["paired"]["p_value"] < 1e-50


async def test_twenty_one_way_flips_of_500_warn(database_url: str) -> None:
    """20 answers turned 0 → 1 and none back: McNemar warns, χ² on the class counts passes."""
    rng = np.random.default_rng(2)
    p = rng.permutation(np.repeat([0, 1], 250))
    s = p.copy()
    s[np.flatnonzero(p == 0)[:20]] = 1
    await insert(database_url, [
        Exchange({"x": i}, Call({"label": int(p[i])}), {"candidate": Call({"label": int(s[i])})})
        for i in range(500)])
    r = await report(database_url, {"prediction": "$.label"})
    assert r["verdict"]["status"] == "warn"
    pr = r["predictions"]
    assert pr["task"] == "classification" and pr["agreement"] == 0.96
    assert pr["distribution_test"]["p_value"] > 0.2  # χ² on the counts 250/250 vs 230/270
    paired = pr["paired"]
    assert paired["test"] == "mcnemar_exact" and paired["decision"] is True
    assert paired["p_value"] == sps.binomtest(20, 20).pvalue
    assert paired["largest"] == {"a": "0", "b": "1", "a_to_b": 20, "b_to_a": 0,
                                 "net_share": 0.04}
    assert reasons(r, "predictions") == [paired["explanation"]]


async def test_batch_requests_are_sampled_and_tested_whole(database_url: str) -> None:
    """Above sample_max whole requests are drawn, and the paired test counts requests."""
    rng = np.random.default_rng(3)
    exchanges = []
    for _ in range(600):
        p = rng.normal(0, 1, 5)
        s = p + rng.normal(0, 0.5) + rng.normal(0, 0.1, 5)  # a request effect, no shift
        exchanges.append(Exchange({"instances": [[0]] * 5}, Call({"predictions": list(p)}),
                                  {"candidate": Call({"predictions": list(s)})}))
    await insert(database_url, exchanges)
    r = await report(database_url, {"prediction": "$.predictions[*]", "task": "regression",
                                    "thresholds": {"sample_max": 1000}})
    pr = r["predictions"]
    assert pr["n"] == 3000 and pr["sample"]["sampled"] is True
    assert pr["sample"]["n"] % 5 == 0
    paired = pr["paired"]
    assert paired["n"] == pr["sample"]["n"] == 5 * paired["requests"]
    assert 150 < paired["requests"] < 250
    # No shift: the sample (ids are random, so is the draw) raises a false alarm at the test's
    # 5% rate, but a request-level test almost never goes below 0.001; rows counted as
    # independent would (their standard error is about half the true one here).
    assert paired["p_value"] > 0.001


def write_csv(path: Path, columns: dict[str, list[Any]]) -> Path:
    """A reference file: one column per feature, one row per training example."""
    names = list(columns)
    rows = zip(*(columns[n] for n in names), strict=True)
    path.write_text(",".join(names) + "\n" + "".join(
        ",".join(repr(float(v)) if isinstance(v, float) else str(v) for v in row) + "\n"
        for row in rows))
    return path


def exchanges(features: dict[str, list[Any]], minutes_ago: float) -> list[Exchange]:
    """One request per row with these features; both models answer the same."""
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    n = len(next(iter(features.values())))
    return [Exchange({"features": {k: v[i] for k, v in features.items()}},
                     Call({"prediction": 1.0}), {"candidate": Call({"prediction": 1.0})},
                     received_at=at) for i in range(n)]


def paths(*names: str) -> dict[str, Any]:
    return {"prediction": "$.prediction",
            "features": {n: {"path": f"$.features.{n}"} for n in names}}


async def test_no_change_passes_at_1000_and_at_1001_rows(database_url: str,
                                                         tmp_path: Path) -> None:
    """No change: 1,000 and 1,001 rows both pass (a category of 80 levels included)."""
    rng = np.random.default_rng(0)
    stores = [f"s{i:02d}" for i in range(80)]
    now = datetime.now(UTC)
    found = {}
    for n, hours_ago in ((1000, 3), (1001, 1)):
        def side(n: int = n) -> dict[str, list[Any]]:
            return {"store": list(rng.choice(stores, n)),
                    "amount": [float(v) for v in rng.lognormal(3, 1, n)]}
        ref = write_csv(tmp_path / f"ref{n}.csv", side())
        await insert(database_url, exchanges(side(), minutes_ago=60 * hours_ago - 10))
        win = Window(now - timedelta(hours=hours_ago), now - timedelta(hours=hours_ago - 1))
        found[n] = await report(database_url, paths("store", "amount"), reference=ref, win=win)
    assert {n: r["verdict"]["status"] for n, r in found.items()} == {1000: "pass", 1001: "pass"}
    for n, r in found.items():
        assert r["verdict"] == {"status": "pass", "reasons": []}
        dc = r["data_checks"]
        assert [f["current"]["n"] for f in dc["features"]] == [n, n]
        assert dc["drifted"] == [] and dc["tests"] == 2  # nothing missing: no missing tests
        store = dc["features"][0]
        assert store["levels"] == "80 categories"
        assert store["distribution"]["threshold"] == 0.05


async def test_a_category_moving_from_40_to_50_percent_is_found_at_5000_rows(
        database_url: str, tmp_path: Path) -> None:
    """A share 40% → 50% at n = 5,000: drift (its Jensen-Shannon distance is under 0.12)."""
    rng = np.random.default_rng(4)
    names = np.array(["a", "b", "c", "d"])
    ref = list(rng.choice(names, 5000, p=[0.4, 0.3, 0.2, 0.1]))
    cur = list(rng.choice(names, 5000, p=[0.5, 0.25, 0.5 / 3, 0.25 / 3]))
    await insert(database_url, exchanges({"kind": cur}, minutes_ago=5))
    r = await report(database_url, paths("kind"),
                     reference=write_csv(tmp_path / "ref.csv", {"kind": ref}))
    assert r["verdict"]["status"] == "warn"
    assert r["data_checks"]["drifted"] == ["kind"]
    kind = r["data_checks"]["features"][0]
    shares = [[x.count(c) / 5000 for c in names] for x in (ref, cur)]
    assert kind["distribution"]["size"] == pytest.approx(
        np.abs(np.subtract(*shares)).sum() / 2)
    assert kind["distribution"]["size"] > 0.09 and kind["distribution"]["p_adjusted"] < 1e-10
    assert distance.jensenshannon(*shares, base=2) < 0.12
    assert reasons(r, "data_checks") == [
        f"input drift in kind ({kind['distribution']['explanation']}) (dataset drift)"]


async def test_batch_requests_with_correlated_rows_do_not_raise_drift(database_url: str) -> None:
    """40 requests of 20 rows correlated 0.8, no change: no drift (KS on rows would flag)."""
    rng = np.random.default_rng(1)
    values = {}
    for tag, minutes_ago in (("reference", 80), ("current", 5)):
        effect = np.repeat(rng.standard_normal(40), 20)
        values[tag] = np.sqrt(0.8) * effect + np.sqrt(0.2) * rng.standard_normal(800)
        at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
        await insert(database_url, [
            Exchange({"instances": [[float(v)] for v in values[tag][20 * i:20 * i + 20]]},
                     Call({"predictions": [1.0] * 20}),
                     {"candidate": Call({"predictions": [1.0] * 20})}, received_at=at)
            for i in range(40)])
    assert sps.ks_2samp(values["reference"], values["current"]).pvalue < 0.05
    r = await report(database_url, {"prediction": "$.predictions[*]", "task": "regression",
                                    "request_format": "instances",
                                    "features": {"x": {"column": 0}},
                                    "thresholds": {"min_pairs": 40}})
    assert r["verdict"] == {"status": "pass", "reasons": []}
    x = r["data_checks"]["features"][0]
    assert x["current"]["n"] == 800 and x["reference"]["n"] == 800
    assert x["distribution"]["test"]["requests"] == [40, 40]
    assert x["distribution"]["test"]["method"] == "permutation_by_request"
    assert x["drift"] is False


async def test_one_unseen_category_among_500_rows_does_not_warn(database_url: str,
                                                               tmp_path: Path) -> None:
    """A single row of a new category in 500: no drift; the reference value check shows it."""
    rng = np.random.default_rng(22)
    cities = np.array(["north", "south", "east"])
    ref = list(rng.choice(cities, 2000, p=[0.5, 0.3, 0.2]))
    cur = list(rng.choice(cities, 500, p=[0.5, 0.3, 0.2]))
    cur[0] = "west"
    await insert(database_url, exchanges({"city": cur}, minutes_ago=5))
    r = await report(database_url, paths("city"),
                     reference=write_csv(tmp_path / "ref.csv", {"city": ref}))
    table = [[ref.count(c) for c in [*cities, "west"]], [cur.count(c) for c in [*cities, "west"]]]
    assert sps.chi2_contingency(table).pvalue < 0.05  # the 2×k χ² would call it drift
    assert r["verdict"] == {"status": "pass", "reasons": []}
    city = r["data_checks"]["features"][0]
    assert city["info"]["unseen_share"] == 1 / 500
    assert city["distribution"]["test"]["pooled"] == 1
    assert city["checks"]["allowed"]["examples"] == ["west"]


async def test_integer_valued_features_are_tested_as_discrete(database_url: str,
                                                             tmp_path: Path) -> None:
    """Counts are tested on their values: 4% of ones turned into sevens is found (KS misses it)."""
    rng = np.random.default_rng(2)
    ref = rng.poisson(3, 1000)
    cur = rng.poisson(3, 1000)
    cur[np.flatnonzero(cur == 1)[:40]] = 7
    await insert(database_url, exchanges({"visits": [int(v) for v in cur]}, minutes_ago=5))
    r = await report(database_url, paths("visits"),
                     reference=write_csv(tmp_path / "ref.csv", {"visits": list(ref)}))
    assert sps.ks_2samp(ref, cur).pvalue > 0.05
    visits = r["data_checks"]["features"][0]
    assert visits["drift"] is True and r["verdict"]["status"] == "warn"
    distinct = len(set(ref) | set(cur))
    assert visits["type"] == "numeric" and visits["levels"] == f"{distinct} distinct values"
    assert visits["distribution"]["test"]["statistic"] == "anderson_darling"


async def test_a_slice_is_not_flagged_for_requests_whose_rows_err_together(
        database_url: str) -> None:
    """60 batch requests whose rows err together, a slice unrelated to the errors: no flag."""
    rng = np.random.default_rng(12)
    north = rng.random(60) < 0.5
    effect = rng.normal(0, 1, 60)
    p = rng.normal(0, 1, (60, 10))
    s = p + effect[:, None] + rng.normal(0, 0.1, (60, 10))
    await insert(database_url, [
        Exchange({"region": "north" if north[i] else "south", "instances": [[0]] * 10},
                 Call({"predictions": list(p[i])}),
                 {"candidate": Call({"predictions": list(s[i])})})
        for i in range(60)])
    err, rows = np.abs(s - p), np.repeat(north, 10)
    assert sps.kruskal(err[~north].ravel(), err[north].ravel()).pvalue < 0.001  # rows as units
    r = await report(database_url, {"prediction": "$.predictions[*]", "task": "regression",
                                    "slices": {"north": "request_body_json ->> 'region' = 'north'"},
                                    "thresholds": {"min_pairs": 50}})
    north_slice = r["slices"]["slices"][0]
    assert north_slice["n"] == rows.sum() and north_slice["mae"] == pytest.approx(
        err[north].mean())
    assert north_slice.get("flagged") is None and reasons(r, "slices") == []
    test = north_slice["test"]
    assert test["method"] == "permutation_by_request"
    assert test["requests"] == [north.sum(), 60 - north.sum()]
    assert test["diff"] == pytest.approx(err[north].mean() - err[~north].mean())
    assert test["p_value"] > 0.2
