"""The example model services: two real models behind a JSON prediction API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from examples.dataset import FEATURES, load, row_to_features
from examples.model_service import Model, build_app, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models() -> dict[str, Model]:
    return {kind: train(kind) for kind in ("linear", "gbm")}


async def _serve(model: Model) -> AsyncIterator[str]:
    runner = web.AppRunner(build_app(model))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def linear_url(models: dict[str, Model]) -> AsyncIterator[str]:
    async for url in _serve(models["linear"]):
        yield url


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


def test_models_differ_and_both_learn(models: dict[str, Model]) -> None:
    """Both models predict unseen patients better than the mean, yet disagree on many."""
    data = load()
    linear = models["linear"].regressor.predict(data.x_test)
    gbm = models["gbm"].regressor.predict(data.x_test)
    assert _r2(data.y_test, linear) > 0.3
    assert _r2(data.y_test, gbm) > 0.2
    assert np.mean(np.abs(linear - gbm)) > 10
    assert models["linear"].version != models["gbm"].version


def test_the_third_model_learns_and_disagrees_with_the_primary() -> None:
    """knn (replayed in the demo) predicts unseen patients better than the mean and differs
    from the primary."""
    data = load()
    knn = train("knn")
    linear = train("linear").regressor.predict(data.x_test)
    assert knn.version == "knn-v3"
    assert _r2(data.y_test, knn.regressor.predict(data.x_test)) > 0.3
    assert np.mean(np.abs(knn.regressor.predict(data.x_test) - linear)) > 5


def test_boosting_fits_training_rows_closer_but_generalises_worse(
        models: dict[str, Model]) -> None:
    """The candidate beats the primary on its training rows and loses on held-out ones."""
    data = load()
    train = {k: _r2(data.y_train, m.regressor.predict(data.x_train)) for k, m in models.items()}
    test = {k: _r2(data.y_test, m.regressor.predict(data.x_test)) for k, m in models.items()}
    assert train["gbm"] > train["linear"]
    assert test["gbm"] < test["linear"]


async def test_single_and_batch_forms_agree(linear_url: str) -> None:
    """A batch of rows gets the same predictions as the rows sent one at a time."""
    data = load()
    rows = [row_to_features(r) for r in data.x_test[:3]]
    async with aiohttp.ClientSession() as session:
        singles = []
        for row in rows:
            async with session.post(f"{linear_url}/predict", json={"features": row}) as resp:
                assert resp.status == 200
                body = await resp.json()
                assert body["model_version"] == "linear-v1"
                singles.append(body["prediction"])
        async with session.post(f"{linear_url}/predict", json={"instances": rows}) as resp:
            assert resp.status == 200
            batch = (await resp.json())["predictions"]
    assert batch == pytest.approx(singles)


@pytest.mark.parametrize(("body", "expected"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"features": {"age": 50}}', "missing ['sex'"),
    (json.dumps({"features": {**dict.fromkeys(FEATURES, 1.0), "zip": 1}}).encode(),
     "unknown ['zip']"),
    (json.dumps({"features": {**dict.fromkeys(FEATURES, 1.0), "bmi": True}}).encode(),
     "features.bmi: expected a finite number"),
    (json.dumps({"features": {**dict.fromkeys(FEATURES, 1.0), "bmi": "30"}}).encode(),
     "features.bmi: expected a finite number"),
    (b'{"features": {"age": NaN}}', "expected"),
    (b'{"instances": []}', "non-empty list"),
    (b'{"rows": []}', '"features" or "instances"'),
])
async def test_bad_input_is_a_400_saying_why(linear_url: str, body: bytes, expected: str) -> None:
    """Malformed or incomplete requests get a 400 whose error names the problem."""
    async with aiohttp.ClientSession() as session, session.post(
            f"{linear_url}/predict", data=body,
            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert expected in (await resp.json())["error"]


async def test_healthz_describes_the_model(linear_url: str) -> None:
    """/healthz reports the model, its version and the features it expects."""
    async with aiohttp.ClientSession() as session, session.get(f"{linear_url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "model": "linear",
                                     "model_version": "linear-v1", "features": list(FEATURES)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_module_runs_as_a_command_and_stops_on_sigterm() -> None:
    """`python -m examples.model_service` serves on the given port and exits 0 on SIGTERM."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.model_service", "--model", "gbm", "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the model service did not start"
                time.sleep(0.1)
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert f"gbm-v2 on http://127.0.0.1:{port}" in out.decode()


def test_bad_port_is_refused() -> None:
    """A port outside 1..65535 is a usage error, before any training."""
    proc = subprocess.run(
        [sys.executable, "-m", "examples.model_service", "--model", "gbm", "--port", "70000"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "expected 1..65535" in proc.stderr
