"""The report on traffic recorded through the real proxy from two scikit-learn models.

The example services (examples/model_service.py) serve a ridge regression (primary) and
gradient-boosted trees (shadow) trained on scikit-learn's diabetes data; the example traffic
generator sends held-out patients through the proxy and writes their true outcomes as a
labels file. Every number of the report is then recomputed from the models themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from examples.dataset import FEATURES, write_training_csv
from examples.model_service import Model, build_app, train
from examples.traffic import send
from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.labels import import_labels, read_labels
from shadowproxy.compare.report import build_report
from shadowproxy.compare.window import Window
from tests.conftest import StartProxy
from tests.proxy.test_data_path import wait_for_rows
from tests.upstreams import serve_app

N = 240
COMPARE = {
    "prediction": "$.prediction", "ignore": ["$.model_version"],
    "features": {"bmi": {"path": "$.features.bmi", "min": 10, "max": 60},
                 "sex": {"path": "$.features.sex", "allowed": [1, 2]},
                 "glu": {"path": "$.features.glu"}},
    "slices": {"obese": "(request_body_json #>> '{features,bmi}')::float >= 30",
               "age": {"feature": "age", "bins": [0, 50, 100]}},
}


@asynccontextmanager
async def serve_model(model: Model) -> AsyncIterator[str]:
    async with serve_app(build_app(model)) as url:
        yield url


@pytest.mark.slow
async def test_report_on_two_real_models_through_the_proxy(
        start_proxy: StartProxy, database_url: str, tmp_path: Path) -> None:
    """Linear vs boosted trees through the proxy: the report's numbers equal the models'."""
    linear, gbm = train("linear"), train("gbm")
    compare = {**COMPARE, "features": {**COMPARE["features"], "age": {"path": "$.features.age"}}}
    async with serve_model(linear) as primary, serve_model(gbm) as shadow, start_proxy(
            [{"name": "diabetes", "primary": {"url": primary},
              "shadows": [{"name": "candidate", "url": shadow}], "compare": compare}]
    ) as proxy:
        labels = tmp_path / "labels.csv"
        result = await send(f"http://127.0.0.1:{proxy.port}/predict", N, concurrency=8,
                            seed=3, labels=labels)
        assert result.ok == N
        await wait_for_rows(database_url, "responses", 2 * N)

    conn = await asyncpg.connect(database_url)
    try:
        await import_labels(conn, *read_labels(labels))
        reference = tmp_path / "train.csv"
        write_training_csv(str(reference))
        rows = await conn.fetch("SELECT request_id, body_json::text FROM shadowproxy.requests")
        now = datetime.now(UTC)
        report = await build_report(
            conn, route="diabetes", shadow="candidate",
            window=Window(now - timedelta(minutes=10), now + timedelta(seconds=1)),
            compare=CompareConfig.model_validate(compare), reference=reference)
    finally:
        await conn.close()

    import json

    bodies = {r[0]: json.loads(r[1])["features"] for r in rows}
    truth = {rid: float(y) for rid, y in (line.split(",") for line in
                                          labels.read_text().splitlines()[1:])}
    ids = sorted(bodies)
    x = np.array([[bodies[i][f] for f in FEATURES] for i in ids], dtype=np.float64)
    p, s = linear.regressor.predict(x), gbm.regressor.predict(x)
    y = np.array([truth[i] for i in ids])

    assert report["counts"]["pairs"] == N and report["counts"]["pair_completeness"] == 1
    pred = report["predictions"]
    assert pred["task"] == "regression" and pred["n"] == N
    assert pred["mae"] == pytest.approx(np.mean(np.abs(s - p)))
    assert pred["rmse"] == pytest.approx(np.sqrt(np.mean((s - p) ** 2)))
    assert pred["pearson"]["r"] == pytest.approx(sps.pearsonr(p, s).statistic)
    assert pred["spearman"]["r"] == pytest.approx(sps.spearmanr(p, s).statistic)
    assert pred["paired"]["p_value"] == pytest.approx(sps.wilcoxon(s - p).pvalue)
    assert pred["distribution_test"]["p_value"] == pytest.approx(sps.ks_2samp(p, s).pvalue)
    assert report["diff"]["identical"] == 0  # the models really differ

    perf = report["performance"]
    assert perf["n_labelled"] == {"primary": N, "shadow": N}
    assert perf["primary"]["mse"] == pytest.approx(skm.mean_squared_error(y, p))
    assert perf["shadow"]["mae"] == pytest.approx(skm.mean_absolute_error(y, s))
    assert perf["shadow"]["r2"] == pytest.approx(skm.r2_score(y, s))
    assert perf["paired_test"]["p_value"] == pytest.approx(
        sps.wilcoxon(np.abs(s - y) - np.abs(p - y)).pvalue)
    assert "mse_diff" in perf["confidence_intervals"]

    checks = {f["name"]: f for f in report["data_checks"]["features"]}
    from examples.dataset import load

    train_x = load().x_train
    bmi = x[:, FEATURES.index("bmi")]
    train_bmi = train_x[:, FEATURES.index("bmi")]
    assert checks["bmi"]["distribution"]["size"] == pytest.approx(
        sps.wasserstein_distance(train_bmi, bmi) / np.std(train_bmi))
    assert checks["sex"]["type"] == "categorical" and checks["sex"]["checks"]["failed"] == []
    obese = next(sl for sl in report["slices"]["slices"] if sl["slice"] == "obese")
    assert obese["n"] == int(np.sum(bmi >= 30))
    assert obese["performance"]["shadow_mse"] == pytest.approx(
        np.mean((s[bmi >= 30] - y[bmi >= 30]) ** 2))
