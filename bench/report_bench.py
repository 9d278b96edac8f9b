"""Benchmark: ``shadowproxy report`` over a large window, sampled and whole.

    python bench/report_bench.py                          # 1M pairs, embedded PostgreSQL
    python bench/report_bench.py --pairs 10000000 --no-check
    python bench/report_bench.py --url postgresql://... --pairs 1000000
    python bench/report_bench.py --url URL --pairs 10000000 --no-check --keep  # then:
    python bench/report_bench.py --url URL --reuse sp_bench_1a2b3c4d --no-check

The pairs are generated straight into PostgreSQL with ``INSERT … SELECT generate_series``:
one request (two input features, ``sqft`` and ``city``) and two responses (the primary and
one shadow) each, whose JSON bodies carry a numeric ``prediction``, a ``class`` and a
``model_version``. The shadow predicts about 4% higher with more noise, flips the class of
about 3% of requests, is slower (p99 about 1.7× the primary's), times out on 0.1% of
requests, and the last fifth of the window drifts (``sqft`` grows by 900, ``city`` leans
north) against a 50,000-row reference file. When ``shadowproxy.responses`` has a
``received_at`` column (partitioned storage), it is filled with the request's. The pairs lie
in the last hour that has settled, and that hour is summarized for the report's counts
(``store/rollups.py``, what the proxy's maintenance task does on its own; timed and printed),
unless ``--no-summaries``.

Then ``report`` runs with the default ``--max-pairs`` (the time of each part is printed),
and, unless ``--no-check``, once more with ``--max-pairs`` above the window (every pair
read): the check passes when both verdicts have the same status and the same rules fire
(each reason's level and section, and the rule's words without their numbers). The database
is a fresh one, dropped afterwards; its size is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np

from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.options import DEFAULT_MAX_PAIRS
from shadowproxy.compare.report import build_report
from shadowproxy.compare.window import Window
from shadowproxy.store import rollups
from shadowproxy.store.migrate import migrate

SPAN_S = 3_500
"""The generated requests spread over this many seconds of the last settled hour (the
report's window), so that the maintenance task's summaries cover it."""

# $1: pairs. The features: g-derived so that the data are the same on every run; the last
# fifth of the requests (the most recent) drift.
REQUESTS = """
INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path, body_json,
                                  body_size)
SELECT md5('bench' || g)::uuid, 'req-' || g, 'bench',
       {received_at}, 'POST', '/predict',
       jsonb_build_object('features', jsonb_build_object(
           'sqft', 400 + (g * 7919) % 3600 + CASE WHEN g > $1 * 4 / 5 THEN 900 ELSE 0 END,
           'city', CASE WHEN g > $1 * 4 / 5 AND g % 5 < 2 THEN 'north'
                        ELSE (ARRAY['north', 'south', 'east'])[1 + g % 3] END)),
       60
FROM generate_series(1::bigint, $1) g
"""

RECEIVED_AT = ("'{anchor}'::timestamptz - make_interval(secs => {span} - (g::float8 / $1) "
               "* {span})")
"""A request's time, and its responses': one anchor for the three statements (each is a
transaction of its own, with its own now())."""

# The primary's value: 50 per square foot plus noise; its class by thresholds on the value.
PRIMARY = """
INSERT INTO shadowproxy.responses (request, target, role, status, body_json, body_size,
                                   latency_ms, error, started_at{extra_columns})
SELECT md5('bench' || g)::uuid, 'primary', 'primary', 200,
       jsonb_build_object('prediction', round(v::numeric, 2),
                          'class', CASE WHEN v < 80000 THEN 'low' WHEN v < 150000 THEN 'mid'
                                        ELSE 'high' END,
                          'model_version', 'v1'),
       70, 4 + 8 * random() + CASE WHEN random() < 0.02 THEN 20 * random() ELSE 0 END,
       NULL, now(){extra_values}
FROM (SELECT g, 50.0 * (400 + (g * 7919) % 3600) + (random() - 0.5) * 8000 AS v
      FROM generate_series(1::bigint, $1) g) x
"""

SHADOW = """
INSERT INTO shadowproxy.responses (request, target, role, status, body_json, body_size,
                                   latency_ms, error, started_at, error_kind{extra_columns})
SELECT md5('bench' || g)::uuid, 'candidate', 'shadow',
       CASE WHEN g % 1000 = 0 THEN NULL ELSE 200 END,
       CASE WHEN g % 1000 = 0 THEN NULL ELSE jsonb_build_object(
           'prediction', round(v::numeric, 2),
           'class', CASE WHEN g % 33 = 0 THEN 'mid'
                         WHEN v < 80000 THEN 'low' WHEN v < 150000 THEN 'mid'
                         ELSE 'high' END,
           'model_version', 'v2') END,
       70, CASE WHEN g % 1000 = 0 THEN NULL
                ELSE 5 + 12 * random() + CASE WHEN random() < 0.02 THEN 40 * random()
                                              ELSE 0 END END,
       CASE WHEN g % 1000 = 0 THEN 'timeout' END, now(),
       CASE WHEN g % 1000 = 0 THEN 'timeout' END{extra_values}
FROM (SELECT g, 52.0 * (400 + (g * 7919) % 3600) + (random() - 0.5) * 12000 AS v
      FROM generate_series(1::bigint, $1) g) x
"""

COMPARE = {
    "prediction": "$.prediction", "task": "regression", "ignore": ["$.model_version"],
    "rel_tolerance": 0.05,
    "features": {"sqft": {"path": "$.features.sqft", "min": 0},
                 "city": {"path": "$.features.city", "allowed": ["north", "south", "east"]}},
    "slices": {"big": "(request_body_json #>> '{features,sqft}')::float > 3000",
               "size": {"feature": "sqft", "bins": [0, 1000, 2000, 3000, 4000, 5000]}},
}


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def settled_hour(now: datetime) -> Window:
    """The last hour that the maintenance task summarizes at ``now``."""
    end = rollups.hour_of(now - rollups.SETTLE)
    return Window(end - rollups.HOUR, end)


async def generate(conn: asyncpg.Connection, pairs: int, window: Window) -> None:
    """The requests and both sides' responses (``received_at`` on responses if it exists),
    in the last ``SPAN_S`` seconds of ``window`` but the last 50."""
    n = str(int(pairs))
    anchor = (window.end - timedelta(seconds=50)).isoformat()
    received_at = RECEIVED_AT.format(anchor=anchor, span=SPAN_S)
    partitioned = await conn.fetchval(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'shadowproxy' "
        "AND table_name = 'responses' AND column_name = 'received_at'")
    columns, values = (", received_at", ", " + received_at) if partitioned else ("", "")
    for sql in (REQUESTS.format(received_at=received_at), PRIMARY, SHADOW):
        sql = sql.format(extra_columns=columns, extra_values=values) if sql != REQUESTS \
            else sql
        await conn.execute(sql.replace("$1", n))
    await conn.execute("ANALYZE shadowproxy.requests")
    await conn.execute("ANALYZE shadowproxy.responses")


def write_reference(path: Path) -> None:
    rng = np.random.default_rng(0)
    sqft = rng.integers(400, 4000, 50_000)
    city = rng.choice(["north", "south", "east"], 50_000)
    path.write_text("sqft,city\n" + "".join(
        f"{s},{c}\n" for s, c in zip(sqft, city, strict=True)))


async def timed_report(conn: asyncpg.Connection, reference: Path, max_pairs: int,
                       label: str, window: Window) -> dict[str, Any]:
    marks: list[tuple[str, float]] = []
    started = time.perf_counter()
    report = await build_report(
        conn, route="bench", shadow="candidate", window=window,
        compare=CompareConfig.model_validate(COMPARE), reference=reference,
        progress=lambda step: marks.append((step, time.perf_counter())), max_pairs=max_pairs)
    total = time.perf_counter() - started
    ends = [at for _, at in marks[1:]] + [started + total]
    print(f"report ({label}, --max-pairs {max_pairs:,}):")
    print(f"  {'setup':<20} {marks[0][1] - started:6.1f} s")
    for (step, at), end in zip(marks, ends, strict=True):
        print(f"  {step:<20} {end - at:6.1f} s")
    sample = report["meta"]["sample"]
    print(f"  total {total:.1f} s over {report['counts']['pairs']:,} pairs; read "
          f"{sample['size']:,} ({'sampled' if sample['sampled'] else 'every pair'}); "
          f"verdict {report['verdict']['status']}")
    for name, e in sample["estimates"].items():
        print(f"  estimated {name}: {e['estimate']:,} [{e['ci_low']:,}, {e['ci_high']:,}]")
    report["elapsed_s"] = total
    return report


def rules(report: dict[str, Any]) -> Counter[tuple[str, str, str]]:
    """Each reason of the verdict as (level, section, its words without numbers)."""
    return Counter((r["level"], r["section"], re.sub(r"[-+]?\d[\d,.]*(e[-+]?\d+)?", "#",
                                                     r["message"]))
                   for r in report["verdict"]["reasons"])


def check(sampled: dict[str, Any], whole: dict[str, Any]) -> bool:
    """Same status and the same rules fired on the sample as on every pair."""
    same = (sampled["verdict"]["status"] == whole["verdict"]["status"]
            and rules(sampled) == rules(whole))
    print(f"verdict check: sample {sampled['verdict']['status']}, every pair "
          f"{whole['verdict']['status']}: {'SAME' if same else 'DIFFERENT'}")
    for label, r in (("sample", sampled), ("every pair", whole)):
        for reason in r["verdict"]["reasons"]:
            print(f"  {label:<10} {reason['level']:<5} {reason['section']:<12} "
                  f"{reason['message'][:110]}")
    return same


async def run(server_url: str, pairs: int, workdir: Path, max_pairs: int, do_check: bool,
              summarize: bool, keep: bool, reuse: str | None) -> bool:
    name = reuse or f"sp_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    if reuse is None:
        await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(server_url, name)
    ok = True
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        if reuse is None:
            started = time.perf_counter()
            window = settled_hour(await conn.fetchval("SELECT now()"))
            await generate(conn, pairs, window)
            await conn.execute("CREATE TABLE bench_window AS SELECT $1::timestamptz AS s, "
                               "$2::timestamptz AS e", window.start, window.end)
            size = await conn.fetchval("SELECT pg_database_size(current_database())")
            print(f"generated {pairs:,} pairs in {time.perf_counter() - started:.1f} s; "
                  f"database {size / 1e9:.2f} GB")
        else:
            row = await conn.fetchrow("SELECT s, e FROM bench_window")
            window = Window(row["s"], row["e"])
            pairs = await conn.fetchval("SELECT count(*) FROM shadowproxy.requests")
            print(f"reusing database {name}: {pairs:,} pairs")
        if summarize and reuse is None:
            started = time.perf_counter()
            rolled = await rollups.roll_up(conn)
            print(f"summarized {rolled.hours} hour(s) of {rolled.requests:,} requests in "
                  f"{time.perf_counter() - started:.1f} s (what the proxy's maintenance task "
                  "does once an hour has settled)")
        reference = workdir / "reference.csv"
        write_reference(reference)
        sampled = await timed_report(conn, reference, max_pairs, "default", window)
        if do_check:
            whole = await timed_report(conn, reference, pairs + 1, "every pair", window)
            ok = check(sampled, whole)
        await conn.close()
    finally:
        if keep:
            print(f"kept database {name} (--reuse {name} --url {server_url})")
        else:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a PostgreSQL server URL (default: embedded, temporary)")
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--max-pairs", type=int, default=DEFAULT_MAX_PAIRS)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the report over every pair and the verdict check")
    parser.add_argument("--no-summaries", dest="summarize", action="store_false",
                        help="leave the window unsummarized (the report reads every pair "
                             "for its counts)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated database (with --url: the default embedded "
                             "server goes at exit)")
    parser.add_argument("--reuse", metavar="NAME",
                        help="report on a database an earlier --keep run generated")
    parser.add_argument("--data-dir", type=Path,
                        help="where the embedded PostgreSQL keeps its files (default: a "
                             "temporary folder)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="shadowproxy-bench-", dir=args.data_dir))
        url = args.url
        if url is None:
            from shadowproxy.store.embedded import embedded_server

            url = stack.enter_context(embedded_server(Path(tmp) / "data"))
        ok = asyncio.run(run(url, args.pairs, Path(tmp), args.max_pairs, args.check,
                             args.summarize, args.keep, args.reuse))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
