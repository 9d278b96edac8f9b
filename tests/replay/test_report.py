"""The report over a replayed target equals the report over the same candidate as a live
shadow of the same requests: predictions and model metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartProxy, route
from tests.proxy.test_data_path import wait_for_rows
from tests.replay.helpers import ROUTE, cli, replay, write_config
from tests.upstreams import model, serve

N = 120
COMPARE = {"prediction": "$.prediction", "task": "regression", "ignore": ["$.model_version"],
           "features": {"x": {"path": "$.features.x"}}}


@pytest.mark.timeout(120)
async def test_a_replayed_candidate_gets_the_report_of_the_same_live_shadow(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """Live shadow 'live' and a replay of the same requests to the same service as
    'replayed': `shadowproxy report --format json` gives both the same predictions and
    performance sections, and the same comparable pairs."""
    rng = random.Random(5)
    labels = ["request_id,label"]
    async with serve(model("v1")) as primary, serve(model("v2", scale=1.1)) as candidate:
        async with start_proxy([route(primary.url, name=ROUTE) | {
                    "shadows": [{"name": "live", "url": candidate.url, "timeout_s": 10}]}]
                ) as proxy, aiohttp.ClientSession() as http:
            for i in range(N):
                x = rng.uniform(0, 100)
                resp = await http.post(f"http://127.0.0.1:{proxy.port}/predict",
                                       json={"features": {"x": x}},
                                       headers={"X-Request-Id": f"r{i}"})
                assert resp.status == 200
                labels.append(f"r{i},{1.05 * x + rng.gauss(0, 3):.4f}")
            await wait_for_rows(database_url, "responses", 2 * N)
        # Only the live shadow is configured: the report finds the replayed target in the
        # window.
        config = write_config(tmp_path, database_url, primary.url, compare=COMPARE, shadows=[
            {"name": "live", "url": candidate.url}])
        result = await replay(config, to=candidate.url, name="replayed")
        assert result.status == 0, result.err
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    imported = await cli("labels", "import", "-c", str(config), str(tmp_path / "labels.csv"))
    assert imported.status == 0, imported.err

    reports = {}
    for name in ("live", "replayed"):
        out = await cli("report", "-c", str(config), "--route", ROUTE, "--shadow", name,
                        "--since", "1h", "--format", "json", timeout=90)
        assert out.status == 0, out.err
        reports[name] = json.loads(out.out)
    live, replayed = reports["live"], reports["replayed"]
    assert live["counts"]["comparable_pairs"] == replayed["counts"]["comparable_pairs"] == N
    assert replayed["predictions"] == live["predictions"]
    assert replayed["performance"] == live["performance"]
    assert replayed["performance"]["n_labelled"] == {"primary": N, "shadow": N}


@pytest.mark.timeout(120)
async def test_replaying_to_the_primary_gives_the_baseline_shadow_offline(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """The noise floor without a third live deployment: the primary's own answers replayed
    as 'primary-replay' serve as compare.baseline_shadow, and a deterministic primary shows
    no noise."""
    async with serve(model("v1")) as primary, serve(model("v2", scale=1.1)) as candidate:
        async with start_proxy([route(primary.url, name=ROUTE) | {
                    "shadows": [{"name": "live", "url": candidate.url, "timeout_s": 10}]}]
                ) as proxy, aiohttp.ClientSession() as http:
            for i in range(40):
                await http.post(f"http://127.0.0.1:{proxy.port}/predict",
                                json={"features": {"x": i}})
            await wait_for_rows(database_url, "responses", 80)
        config = write_config(
            tmp_path, database_url, primary.url,
            compare={**COMPARE, "baseline_shadow": "primary-replay"},
            shadows=[{"name": "live", "url": candidate.url}])
        result = await replay(config, to=primary.url, name="primary-replay")
        assert result.status == 0, result.err
    out = await cli("report", "-c", str(config), "--route", ROUTE, "--since", "1h",
                    "--format", "json", timeout=90)
    assert out.status == 0, out.err
    report = json.loads(out.out)
    assert report["meta"]["shadow"] == "live"
    assert report["meta"]["baseline_shadow"] == "primary-replay"
    noise = report["predictions"]["baseline_noise"]
    assert noise["shadow"] == "primary-replay" and noise["max_abs_diff"] == 0
