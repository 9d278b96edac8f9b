"""A report is one snapshot: records landing while it runs appear in none of its sections."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np

from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.report import STEPS, build_report
from shadowproxy.compare.window import Window
from tests.compare.records import Call, Exchange, insert

COMPARE = {
    "prediction": "$.prediction",
    "features": {"sqft": {"path": "$.features.sqft"}},
    "slices": {"everything": "true", "size": {"feature": "sqft", "bins": [0, 2000, 5000]}},
}


def exchanges(rng: np.random.Generator, n: int) -> list[Exchange]:
    sqft = rng.uniform(500, 4000, n)
    return [Exchange({"features": {"sqft": float(x)}}, Call({"prediction": 50 * x}),
                     {"candidate": Call({"prediction": 51 * x})}) for x in sqft]


async def test_inserts_during_a_report_do_not_reach_it(database_url: str) -> None:
    """Pairs committed between two steps of a report: every section counts the same 100."""
    rng = np.random.default_rng(31)
    await insert(database_url, exchanges(rng, 100))
    late = exchanges(rng, 50)
    landed: list[str] = []

    def land() -> None:
        asyncio.run(insert(database_url, late))

    def progress(step: str) -> None:
        # Blocks the report between two of its steps until the late records are committed.
        if step == STEPS[1]:
            worker = threading.Thread(target=land)
            worker.start()
            worker.join(timeout=30)
            landed.append(step)

    now = datetime.now(UTC)
    window = Window(now - timedelta(hours=1), now + timedelta(minutes=1))
    conn = await asyncpg.connect(database_url)
    try:
        r = await build_report(conn, route="house-prices", shadow="candidate", window=window,
                               compare=CompareConfig.model_validate(COMPARE), progress=progress)
        after = await build_report(conn, route="house-prices", shadow="candidate",
                                   window=window, compare=CompareConfig.model_validate(COMPARE))
    finally:
        await conn.close()

    assert landed == [STEPS[1]]
    assert after["counts"]["pairs"] == 150  # the late records are in the window
    assert r["counts"]["requests"] == r["counts"]["pairs"] == 100
    assert r["predictions"]["n"] == r["counts"]["comparable_pairs"] == 100
    assert r["diff"]["compared_pairs"] == 100
    sqft = r["data_checks"]["features"][0]
    assert sqft["current"]["n"] == 100 and sum(sqft["histogram"]["current"]) == 100
    slices = {s["slice"]: s for s in r["slices"]["slices"]}
    assert slices["everything"]["n"] == 100
    assert sum(s["n"] for name, s in slices.items() if name.startswith("sqft in")) == 100
