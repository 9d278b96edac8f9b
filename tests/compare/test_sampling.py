"""The report's sample of whole requests (``--max-pairs``, ``--seed``) on a real PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from shadowproxy.cli import main
from shadowproxy.compare import options, sampling
from shadowproxy.compare.command import render
from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.report import SCRATCH, build_report
from shadowproxy.compare.snapshot import PAIRS, Scope, snapshot
from shadowproxy.compare.window import Window
from shadowproxy.errors import UsageError
from tests.compare.records import Call, Exchange, insert, write_config
from tests.compare.test_report import report as report_with
from tests.compare.test_report import window

COMPARE = {"prediction": "$.prediction", "ignore": ["$.model_version"],
           "baseline_shadow": "baseline",
           "features": {"sqft": {"path": "$.features.sqft", "min": 0}}}
N = 120


def exchanges(n: int = N) -> list[Exchange]:
    """``n`` requests, each with the candidate and the baseline; every 10th candidate call
    times out, so that counts can be checked against the sample's."""
    rng = np.random.default_rng(5)
    sqft = rng.uniform(500, 4000, n)
    out = []
    for i, x in enumerate(sqft):
        candidate = (Call(None, status=None, latency_ms=None, error="timeout") if i % 10 == 0
                     else Call({"prediction": 52 * x + i, "model_version": "v2"}))
        out.append(Exchange({"features": {"sqft": float(x)}},
                            Call({"prediction": 50 * x, "model_version": "v1"}),
                            {"candidate": candidate,
                             "baseline": Call({"prediction": 50 * x, "model_version": "v1"})}))
    return out


async def draw(url: str, max_pairs: int, seed: int) -> tuple[sampling.SampleInfo, list[str],
                                                             list[tuple[str, str]], str]:
    """The sample's info, its request ids, its pairs (id, shadow) and ``Snapshot.rows``."""
    conn = await asyncpg.connect(url)
    try:
        scope = Scope("house-prices", "candidate", window(),
                      CompareConfig.model_validate(COMPARE), seed)
        async with snapshot(conn, scope, SCRATCH) as db:
            population = (await db.fetchrow(
                "SELECT count(*) FROM shadowproxy.pairs WHERE shadow_name = 'candidate'"))[0]
            info = await sampling.draw(db, population, population, max_pairs)
            ids = [str(r[0]) for r in await db.fetch(
                f"SELECT id FROM {sampling.SAMPLE_TABLE} ORDER BY id")]
            pairs = [(str(r[0]), r[1]) for r in await db.fetch(
                f"SELECT id, shadow_name FROM {sampling.SAMPLED_PAIRS} ORDER BY 1, 2")]
            return info, ids, pairs, db.rows
    finally:
        await conn.close()


async def test_draws_exactly_n_requests_with_all_their_shadows(database_url: str) -> None:
    await insert(database_url, exchanges())
    info, ids, pairs, rows = await draw(database_url, 37, seed=1)
    assert (info["sampled"], info["population"], info["size"]) == (True, N, 37)
    assert len(ids) == len(set(ids)) == 37 and rows == sampling.SAMPLED_PAIRS
    # Each drawn request brings the pair of every shadow: the candidate's and the baseline's.
    assert pairs == sorted((i, s) for i in ids for s in ("baseline", "candidate"))
    conn = await asyncpg.connect(database_url)
    try:
        window_ids = {str(r[0]) for r in await conn.fetch("SELECT id FROM shadowproxy.requests")}
    finally:
        await conn.close()
    assert set(ids) <= window_ids


async def test_same_seed_same_sample_other_seed_other_sample(database_url: str) -> None:
    await insert(database_url, exchanges())
    first = (await draw(database_url, 40, seed=7))[1]
    again = (await draw(database_url, 40, seed=7))[1]
    other = (await draw(database_url, 40, seed=8))[1]
    assert first == again
    assert first != other and len(other) == 40


async def test_every_request_is_as_likely_to_be_drawn(database_url: str) -> None:
    """Over many seeds, each request lands in the sample about n/N of the time."""
    await insert(database_url, exchanges(60))
    hits: dict[str, int] = {}
    seeds = 150
    for seed in range(seeds):
        for i in (await draw(database_url, 20, seed))[1]:
            hits[i] = hits.get(i, 0) + 1
    assert len(hits) == 60
    # Binomial(150, 1/3): mean 50, sd 5.8; every one of 60 within 4 sd.
    assert all(27 <= h <= 73 for h in hits.values()), sorted(hits.values())


async def test_no_sampling_at_or_below_max_pairs(database_url: str) -> None:
    await insert(database_url, exchanges())
    info, ids, pairs, rows = await draw(database_url, N, seed=1)
    assert (info["sampled"], info["size"], ids, pairs, rows) == (False, N, [], [], PAIRS)


async def report(url: str, win: Window, **kw: Any) -> dict[str, Any]:
    """The report over ``win``: two reports over one window differ only by their options."""
    conn = await asyncpg.connect(url)
    try:
        r = await build_report(conn, route="house-prices", shadow="candidate", window=win,
                               compare=CompareConfig.model_validate(COMPARE), **kw)
        return dict(r)
    finally:
        await conn.close()


def _without_time(r: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(r, default=str))
    out["meta"].pop("generated_at")
    out["meta"]["sample"].pop("max_pairs")
    return out


async def test_a_window_under_max_pairs_gives_the_whole_report(database_url: str) -> None:
    """At or under --max-pairs the report is the one on every pair, whatever the limit."""
    await insert(database_url, exchanges())
    win = window()
    default = await report(database_url, win)
    exact = await report(database_url, win, max_pairs=N)
    assert default["meta"]["sample"]["sampled"] is False
    assert _without_time(default) == _without_time(exact)


async def test_a_sampled_report_keeps_counts_exact_and_says_so(database_url: str) -> None:
    await insert(database_url, exchanges())
    win = window()
    whole = await report(database_url, win)
    sampled = await report(database_url, win, max_pairs=30, seed=3)
    s = sampled["meta"]["sample"]
    assert (s["sampled"], s["population"], s["size"], s["seed"]) == (True, N, 30, 3)
    # Counts and rates cover every pair; the row-level sections read the 30 sampled pairs.
    assert sampled["counts"] == whole["counts"]
    assert sampled["counts"]["shadow_timeouts"] == N // 10
    for key in ("error_rate", "n"):
        assert sampled["operational"]["shadow"][key] == whole["operational"]["shadow"][key]
    assert sampled["operational"]["status_agreement"] == whole["operational"][
        "status_agreement"]
    # The sampled pairs with the candidate's answer: the 30, less the timeouts the draw
    # took (the ids are random, so it may take none of the 12).
    assert sampled["predictions"]["n"] == s["comparable"]
    assert 30 - N // 10 <= s["comparable"] <= 30
    assert sampled["diff"]["compared_pairs"] == s["comparable"]
    # Every comparable pair differs (the candidate adds 2 per sqft): the estimate for the
    # window is every comparable pair, with an interval that holds it.
    e = s["estimates"]["pairs_differing"]
    assert e["estimate"] == whole["counts"]["comparable_pairs"] == s["population_comparable"]
    assert e["ci_low"] <= e["estimate"] <= e["ci_high"]
    text = f"sampled: 30 of {N} pairs"
    for fmt in ("text", "markdown", "html"):
        assert text in render(sampled, fmt), fmt
    assert "every pair of the window was read" in render(whole, "text")


async def test_a_sampled_diff_estimates_over_the_pairs_it_compares(database_url: str
                                                                   ) -> None:
    """Candidate answers cut short (a stream that timed out: 2xx, its JSON assembled as far
    as it went, ``error_kind`` set) stay comparable in the window's counts and are left out
    of the diff: the estimate of the pairs that differ scales the sample's share to the
    window's comparable pairs whose calls ended well, the only ones the diff compares."""
    ex = exchanges()
    for i, e in enumerate(ex):
        if i % 10 == 5:
            e.shadows["candidate"] = Call({"prediction": 1.0, "model_version": "v2"},
                                          error="timeout", kind="timeout")
    await insert(database_url, ex)
    sampled = await report(database_url, window(), max_pairs=30, seed=3)
    s, d = sampled["meta"]["sample"], sampled["diff"]
    cut = N // 10
    assert sampled["counts"]["comparable_pairs"] == s["population_comparable"] == N - cut
    assert d["cut_short"]["primary"] == 0
    assert d["compared_pairs"] + d["cut_short"]["shadow"] == s["comparable"]
    assert d["identical"] == 0
    # Every complete comparable pair differs (the candidate adds 2 per sqft).
    e = s["estimates"]["pairs_differing"]
    assert e["estimate"] == N - 2 * cut
    assert e["ci_low"] <= e["estimate"] <= e["ci_high"] <= N - 2 * cut


async def test_the_same_seed_gives_the_same_intervals_whatever_order_rows_lie_in(
        database_url: str) -> None:
    """The labels' bootstrap intervals, of a sampled report and of a whole one, are the same
    for the same seed and records after the records were written again in another order
    (as a restore, VACUUM FULL or CLUSTER leaves them): the bootstrap resamples the rows in
    a fixed order, not in the order the scan and the join with the labels gave them."""
    ex = exchanges(600)
    await insert(database_url, ex)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO shadowproxy.labels (request_id, label) VALUES ($1, $2)",
            [(e.request_id, json.dumps(51 * e.request["features"]["sqft"] + i % 7))
             for i, e in enumerate(ex)])
        win = window()
        before = [await report(database_url, win, max_pairs=m) for m in (400, 600)]
        await conn.execute("""
            CREATE TEMP TABLE q AS SELECT * FROM shadowproxy.requests;
            CREATE TEMP TABLE r AS SELECT * FROM shadowproxy.responses;
            DELETE FROM shadowproxy.responses;
            DELETE FROM shadowproxy.requests;
            INSERT INTO shadowproxy.requests SELECT * FROM q ORDER BY md5(id::text);
            INSERT INTO shadowproxy.responses SELECT * FROM r
                ORDER BY md5(request::text || target)""")
    finally:
        await conn.close()
    after = [await report(database_url, win, max_pairs=m) for m in (400, 600)]
    assert [r["meta"]["sample"]["sampled"] for r in after] == [True, False]
    for b, a in zip(before, after, strict=True):
        intervals = b["performance"]["confidence_intervals"]
        assert intervals["mse_diff"][0] is not None
        assert a["performance"]["confidence_intervals"] == intervals


def test_estimate_interval() -> None:
    e = sampling.estimate(10, 100, 10_000)
    assert e["estimate"] == 1000 and e["ci_low"] < 1000 < e["ci_high"]
    assert e["ci_low"] > 500 and e["ci_high"] < 1800
    # A census has no sampling error; none found is an interval from 0.
    assert sampling.estimate(10, 100, 100)["ci_low"] == sampling.estimate(10, 100, 100)[
        "ci_high"] == 10
    assert sampling.estimate(0, 100, 10_000)["ci_low"] == 0


@pytest.mark.parametrize("text", ["0", "-5", "ten", "1.5", ""])
def test_max_pairs_must_be_a_positive_whole_number(text: str) -> None:
    with pytest.raises(UsageError, match="--max-pairs: expected a positive whole number"):
        options.max_pairs(text)
    assert options.max_pairs("250000") == 250_000


def test_seed_must_be_a_whole_number() -> None:
    with pytest.raises(UsageError, match="--seed: expected a whole number"):
        options.seed("x")
    with pytest.raises(UsageError, match="--seed"):
        options.seed(str(2 ** 64))
    assert options.seed("-3") == -3


def test_cli_max_pairs_and_seed(sync_database_url: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --max-pairs exits 2 with what to do; a good one samples, with the seed given."""
    import asyncio

    asyncio.run(insert(sync_database_url, exchanges(60)))
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.prediction"')
    base = ["report", "-c", str(config), "--route", "house-prices", "--shadow", "candidate",
            "--since", "1h"]
    assert main([*base, "--max-pairs", "0"]) == 2
    assert "--max-pairs: expected a positive whole number" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert main([*base, "--max-pairs", "25", "--seed", "9", "--format", "json",
                 "-o", str(out)]) == 0
    sample = json.loads(out.read_text())["meta"]["sample"]
    assert (sample["sampled"], sample["size"], sample["population"], sample["seed"]) == (
        True, 25, 60, 9)


async def test_a_sample_below_min_pairs_is_too_little_evidence(database_url: str) -> None:
    """The window holds enough comparable pairs, but the comparisons read a sample of 30:
    with thresholds.min_pairs 100 the gate fails on the sample's evidence, as it would on
    the window's; a sample of at least min_pairs does not."""
    await insert(database_url, exchanges())
    win = window()
    whole = await report(database_url, win)
    sampled = await report(database_url, win, max_pairs=30, seed=3)
    comparable = sampled["meta"]["sample"]["comparable"]
    assert whole["counts"]["comparable_pairs"] >= 100 > comparable
    message = (f"the sample holds {comparable} comparable pairs, fewer than "
               "thresholds.min_pairs (100): the comparisons read the sample; raise --max-pairs")
    assert not any(r["message"] == message for r in whole["verdict"]["reasons"])
    assert {"level": "fail", "section": "counts", "message": message} in [
        dict(r) for r in sampled["verdict"]["reasons"]]
    assert sampled["verdict"]["status"] == "fail"
    enough = await report(database_url, win, max_pairs=118, seed=3)  # >= 106 comparable
    assert enough["meta"]["sample"]["sampled"] is True
    assert enough["meta"]["sample"]["comparable"] >= 100
    assert not any("the sample holds" in r["message"] for r in enough["verdict"]["reasons"])


async def test_a_sampled_window_checks_its_data_on_the_same_population_as_the_earlier(
        database_url: str) -> None:
    """A shadow mirrors a tenth of the requests, always of the same users (a sticky
    ``sample_key``): only those have a pair. The data checks of a sampled report read, in
    the window and in the earlier one, every request under the same key cut-off, mirrored
    or not, as the whole report reads every request: they read only the drawn (mirrored)
    requests in the window against a sample of every request in the earlier one, about ten
    times as many, and the share of mirrored users drifted from 10% to 100%."""
    now = datetime.now(UTC)
    ex = []
    for back in (0, 1):  # the window's hour, and the earlier one
        for i in range(2000):
            mirrored = i % 10 == 0
            ex.append(Exchange(
                {"features": {"sqft": 500.0 + i}, "mirrored": mirrored},
                Call({"prediction": 1.5 * i}),
                {"candidate": Call({"prediction": 1.5 * i})} if mirrored else {},
                received_at=now - timedelta(minutes=30 + 60 * back, seconds=-i)))
    await insert(database_url, ex)
    compare = {"prediction": "$.prediction",
               "features": {"mirrored": {"path": "$.mirrored", "type": "categorical"}}}
    win = Window(now - timedelta(hours=1), now)
    reports = [await report_with(database_url, compare, win=win, **kw)
               for kw in ({}, {"max_pairs": 100})]
    whole, sampled = (r["data_checks"] for r in reports)
    assert reports[1]["meta"]["sample"]["sampled"] is True
    assert whole["drifted"] == sampled["drifted"] == []
    cur, ref = sampled["features"][0]["current"], sampled["features"][0]["reference"]
    # Half the pairs are drawn: about half of each window's 2,000 requests, a tenth of them
    # mirrored in both.
    assert 0.8 < cur["n"] / ref["n"] < 1.25 and 600 < cur["n"] < 1400
    shares = [{t["value"]: t["n"] / side["n"] for t in side["top"]} for side in (cur, ref)]
    assert all(0.8 < s["false"] < 0.97 for s in shares), shares


async def test_a_sampled_classification_report_estimates_its_disagreements(
        database_url: str) -> None:
    """A classification's disagreements are estimated for the window: the report stopped
    with asyncpg's InterfaceError (the tolerances passed to a query that has no place for
    them) on every sampled window of a classification."""
    ex = [Exchange({"x": i}, Call({"label": "a" if i % 3 else "b"}),
                   {"candidate": Call({"label": "a" if i % 4 else "b"})}) for i in range(300)]
    await insert(database_url, ex)
    r = await report_with(database_url, {"prediction": "$.label"}, max_pairs=100)
    assert r["predictions"]["task"] == "classification"
    e = r["meta"]["sample"]["estimates"]["pairs_with_disagreeing_predictions"]
    assert e["of_sample"] == 100 and 0 < e["in_sample"] < 100
    assert e["estimate"] == round(e["in_sample"] / 100 * 300)
    assert e["ci_low"] <= e["estimate"] <= e["ci_high"]


async def test_the_sections_on_a_sampled_window_say_they_read_a_sample(
        database_url: str) -> None:
    """On a sampled window the predictions' ``sample`` and the slices' ``whole`` say the
    rows are a sample (the rendered row is ``(whole sample)``); they said ``sampled``
    false and ``(whole)``, as if the window had been read whole, since the predictions'
    flag only told of ``sample_max`` and the slices' whole had none."""
    await insert(database_url, exchanges())
    compare = {**COMPARE, "slices": {"big": "(request_body_json #>> '{features,sqft}')"
                                            "::float > 2000"}}
    win = window()
    reports = [await report_with(database_url, compare, win=win, **kw)
               for kw in ({}, {"max_pairs": 60})]
    for r, sampled in zip(reports, (False, True), strict=True):
        assert r["meta"]["sample"]["sampled"] is sampled
        assert r["predictions"]["sample"]["sampled"] is sampled
        assert r["slices"]["whole"]["sampled"] is sampled
        assert r["slices"]["whole"]["n"] == r["predictions"]["n"]
        text = render(r, "text")
        assert ("(whole sample)" in text) is sampled and ("(whole)" in text) is not sampled
