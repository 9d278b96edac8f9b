"""An example model service, as a user of shadowproxy would have one: a JSON prediction API.

    python -m examples.model_service --model linear --port 9001   # the primary, v1
    python -m examples.model_service --model gbm --port 9002      # the candidate, v2
    python -m examples.model_service --model knn --port 9003      # a later candidate, v3

It trains at start on scikit-learn's bundled diabetes data (see ``examples/dataset.py``):
``linear`` is a ridge regression on standardised inputs, ``gbm`` gradient-boosted trees,
``knn`` the mean outcome of the 20 nearest training patients (standardised inputs), so they
really disagree, more on some patients than on others. The demo mirrors live traffic to
``gbm`` and replays the recorded traffic to ``knn`` (``shadowproxy replay``). The service
knows nothing of shadowproxy; that is the point.

    POST /predict  {"features": {"age": 59, "sex": 2, "bmi": 32.1, ...}}
                   → {"prediction": 211.3, "model_version": "linear-v1"}
    POST /predict  {"instances": [{...}, {...}]}
                   → {"predictions": [211.3, 98.0], "model_version": "linear-v1"}
    GET  /healthz  → {"status": "ok", "model": "linear", "model_version": ..., "features": [...]}

Bad input gets a 400 with ``{"error": ...}`` saying what was expected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiohttp import web
from numpy.typing import NDArray

from examples.dataset import FEATURES, load

MODEL_VERSIONS = {"linear": "linear-v1", "gbm": "gbm-v2", "knn": "knn-v3"}
MAX_BATCH = 1000


class Regressor(Protocol):
    def predict(self, x: NDArray[np.float64]) -> NDArray[np.float64]: ...


@dataclass(frozen=True)
class Model:
    """A trained regressor and the names that describe it."""

    kind: str
    version: str
    regressor: Regressor
    extra_latency_s: float = 0.0


def train(kind: str) -> Model:
    """Fit the named model on the training split; deterministic for a given scikit-learn."""
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import Ridge
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load()
    regressor: Any
    if kind == "linear":
        regressor = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    elif kind == "gbm":
        regressor = GradientBoostingRegressor(
            n_estimators=300, learning_rate=0.05, max_depth=3, subsample=0.8, random_state=0)
    elif kind == "knn":
        regressor = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=20))
    else:
        raise ValueError(f"expected model 'linear', 'gbm' or 'knn' (got {kind!r})")
    regressor.fit(data.x_train, data.y_train)
    return Model(kind=kind, version=MODEL_VERSIONS[kind], regressor=regressor)


class InputError(ValueError):
    """The request body is not a valid prediction request; the message says why."""


def _row(features: Any, where: str) -> list[float]:
    if not isinstance(features, dict):
        raise InputError(f"{where}: expected an object of features (got {type(features).__name__})")
    missing = [name for name in FEATURES if name not in features]
    unknown = sorted(set(features) - set(FEATURES))
    if missing or unknown:
        raise InputError(f"{where}: expected exactly the features {list(FEATURES)}"
                         + (f"; missing {missing}" if missing else "")
                         + (f"; unknown {unknown}" if unknown else ""))
    row = []
    for name in FEATURES:
        value = features[name]
        # bool is an int subclass; a true/false feature is a client bug, not the number 1/0.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise InputError(f"{where}.{name}: expected a finite number (got {value!r})")
        row.append(float(value))
    return row


def parse_request(body: Any) -> tuple[list[list[float]], bool]:
    """The feature rows of a request body, and whether it was the batch form."""
    if not isinstance(body, dict):
        raise InputError('expected a JSON object: {"features": {...}} or {"instances": [...]}')
    if "features" in body:
        return [_row(body["features"], "features")], False
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InputError("instances: expected a non-empty list of feature objects")
        if len(instances) > MAX_BATCH:
            raise InputError(f"instances: at most {MAX_BATCH} per request "
                             f"(got {len(instances)})")
        return [_row(item, f"instances[{i}]") for i, item in enumerate(instances)], True
    raise InputError('expected a JSON object with "features" or "instances"')


MODEL = web.AppKey("model", Model)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def predict(request: web.Request) -> web.Response:
    model = request.app[MODEL]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "the request body is not valid JSON")
    try:
        rows, batch = parse_request(body)
    except InputError as exc:
        return _error(400, str(exc))
    if model.extra_latency_s:
        await asyncio.sleep(model.extra_latency_s)
    predictions = [float(p) for p in model.regressor.predict(np.asarray(rows))]
    if batch:
        return web.json_response({"predictions": predictions, "model_version": model.version})
    return web.json_response({"prediction": predictions[0], "model_version": model.version})


async def healthz(request: web.Request) -> web.Response:
    model = request.app[MODEL]
    return web.json_response({"status": "ok", "model": model.kind,
                              "model_version": model.version, "features": list(FEATURES)})


def build_app(model: Model) -> web.Application:
    app = web.Application()
    app[MODEL] = model
    app.router.add_post("/predict", predict)
    app.router.add_get("/healthz", healthz)
    return app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.model_service",
        description="Serve a scikit-learn model trained at start on the diabetes data set.")
    parser.add_argument("--model", required=True, choices=sorted(MODEL_VERSIONS))
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--extra-latency-ms", type=float, default=0.0,
                        help="sleep this long before each answer (to play a slower model)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port: expected 1..65535 (got {args.port})")
    if args.extra_latency_ms < 0:
        parser.error(f"--extra-latency-ms: expected 0 or more (got {args.extra_latency_ms})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model = train(args.model)
    model = Model(model.kind, model.version, model.regressor, args.extra_latency_ms / 1000)
    print(f"model_service: {model.version} on http://{args.host}:{args.port}", flush=True)
    # No access log: the proxy in front records every exchange already.
    web.run_app(build_app(model), host=args.host, port=args.port, access_log=None,
                print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
