"""Benchmark: ``shadowproxy report`` over one million pairs.

    python bench/report_bench.py                 # embedded PostgreSQL in a temporary folder
    python bench/report_bench.py --url postgresql://...  --pairs 1000000

The pairs are generated straight into PostgreSQL with ``generate_series`` (one request row,
one primary and one shadow response row each, with JSON bodies, a 0.1% shadow timeout rate
and two input features), then the full report runs (counts, latency, field diff,
predictions, data checks against a 50,000-row reference file, two slices, verdict) and the
time of each part is printed. The database is a fresh one, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np

from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.report import build_report
from shadowproxy.compare.window import Window
from shadowproxy.store.migrate import migrate

GENERATE = """
INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path, body_json,
                                  body_size)
SELECT md5('bench' || g)::uuid, 'req-' || g, 'bench',
       now() - make_interval(secs => (g % 3500000) / 1000.0), 'POST', '/predict',
       jsonb_build_object('features', jsonb_build_object(
           'sqft', 400 + (g * 7919) % 3600, 'city', (ARRAY['north', 'south', 'east'])[1 + g % 3])),
       60
FROM generate_series(1::bigint, $1) g;

INSERT INTO shadowproxy.responses (request, target, role, status, body_json, body_size,
                                   latency_ms, error, started_at)
SELECT md5('bench' || g)::uuid, 'primary', 'primary', 200,
       jsonb_build_object('prediction', 50.0 * (400 + (g * 7919) % 3600) + (random() - 0.5) * 8000,
                          'model_version', 'v1'),
       45, 4 + random() * 8, NULL, now()
FROM generate_series(1::bigint, $1) g;

INSERT INTO shadowproxy.responses (request, target, role, status, body_json, body_size,
                                   latency_ms, error, started_at, error_kind)
SELECT md5('bench' || g)::uuid, 'candidate', 'shadow',
       CASE WHEN g % 1000 = 0 THEN NULL ELSE 200 END,
       CASE WHEN g % 1000 = 0 THEN NULL ELSE jsonb_build_object(
           'prediction', 52.0 * (400 + (g * 7919) % 3600) + (random() - 0.5) * 12000,
           'model_version', 'v2') END,
       45, CASE WHEN g % 1000 = 0 THEN NULL ELSE 5 + random() * 15 END,
       CASE WHEN g % 1000 = 0 THEN 'timeout' END, now(),
       CASE WHEN g % 1000 = 0 THEN 'timeout' END
FROM generate_series(1::bigint, $1) g;
ANALYZE shadowproxy.requests;
ANALYZE shadowproxy.responses;
"""

COMPARE = {
    "prediction": "$.prediction", "task": "regression", "ignore": ["$.model_version"],
    "rel_tolerance": 0.05,
    "features": {"sqft": {"path": "$.features.sqft", "min": 0},
                 "city": {"path": "$.features.city", "allowed": ["north", "south", "east"]}},
    "slices": {"big": "(request_body_json #>> '{features,sqft}')::float > 3000",
               "size": {"feature": "sqft", "bins": [0, 1000, 2000, 3000, 4000]}},
}


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def run(server_url: str, pairs: int, workdir: Path) -> None:
    name = f"sp_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(server_url, name)
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        started = time.perf_counter()
        await conn.execute(GENERATE.replace("$1", str(int(pairs))))
        print(f"generated {pairs:,} pairs in {time.perf_counter() - started:.1f} s")
        rng = np.random.default_rng(0)
        reference = workdir / "reference.csv"
        sqft = rng.integers(400, 4000, 50_000)
        city = rng.choice(["north", "south", "east"], 50_000)
        reference.write_text("sqft,city\n" + "".join(
            f"{s},{c}\n" for s, c in zip(sqft, city, strict=True)))
        marks: list[tuple[str, float]] = []
        now = datetime.now(UTC)
        started = time.perf_counter()
        report = await build_report(
            conn, route="bench", shadow="candidate",
            window=Window(now - timedelta(hours=1), now + timedelta(seconds=1)),
            compare=CompareConfig.model_validate(COMPARE), reference=reference,
            progress=lambda step: marks.append((step, time.perf_counter())))
        total = time.perf_counter() - started
        await conn.close()
        ends = [at for _, at in marks[1:]] + [started + total]
        for (step, at), end in zip(marks, ends, strict=True):
            print(f"  {step:<20} {end - at:6.1f} s")
        print(f"report over {report['counts']['pairs']:,} pairs "
              f"({report['predictions']['n']:,} paired predictions): {total:.1f} s; "
              f"verdict {report['verdict']['status']}")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a PostgreSQL server URL (default: embedded, temporary)")
    parser.add_argument("--pairs", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shadowproxy-bench-") as tmp:
        url = args.url
        if url is None:
            from shadowproxy.store.embedded import start_embedded

            url = start_embedded(Path(tmp) / "data", cleanup="delete")
        asyncio.run(run(url, args.pairs, Path(tmp)))


if __name__ == "__main__":
    main()
