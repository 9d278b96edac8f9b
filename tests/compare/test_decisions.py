"""The report's decisions on windows with a known answer, end to end on a real PostgreSQL.

Each case of issue 18: the records are written into the fixture database as the proxy
writes them (records.py), the report is built on them, and its verdict and the decision
behind it are checked, together with what the rule it replaces would have said.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats as sps

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
    assert paired["decision"] is False
