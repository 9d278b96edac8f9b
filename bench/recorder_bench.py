"""Recorder throughput: exchanges pushed through the real recorder into a real PostgreSQL.

Builds realistic exchanges (a 1 KB JSON request, a primary and a shadow JSON response, the
usual headers), submits them as fast as the writer drains them (the queue stays bounded:
submission waits while it is over a quarter full, below the mark where batches would overflow
to the spool), and reports records per second stored in PostgreSQL, the
peak queue depth, the writer's CPU and, when the server runs on this machine, the server's
CPU per record (all its processes, from /proc). The database is the one at --database-url,
or an embedded PostgreSQL in a temporary folder.

    .venv/bin/python bench/recorder_bench.py --records 200000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
from pathlib import Path

import asyncpg
from localhost import scratch_database, server_cpu_seconds  # bench/localhost.py

from shadowproxy.config import RecordingConfig
from shadowproxy.metrics import Metrics
from shadowproxy.models import CapturedResponse, Exchange
from shadowproxy.recorder.recorder import Recorder
from shadowproxy.store.migrate import migrate

BODY = json.dumps({"features": {f"f{i}": i * 1.5 for i in range(60)}}).encode()[:1024]
REQ_HEADERS = [(b"Host", b"127.0.0.1:8080"), (b"User-Agent", b"bench"),
               (b"Content-Type", b"application/json"), (b"Content-Length", b"1024"),
               (b"Authorization", b"Bearer secret")]
RESP_HEADERS = [(b"Content-Type", b"application/json"), (b"Content-Length", b"40"),
                (b"Server", b"model")]


def exchange(i: int) -> Exchange:
    now = time.time()
    ex = Exchange("bench", now, "POST", "/predict", "", REQ_HEADERS, "127.0.0.1", None)
    ex.body, ex.body_size = BODY, len(BODY)
    for target, role, value in (("primary", "primary", 0.5), ("shadow", "shadow", 0.7)):
        r = CapturedResponse(target, role, now)
        r.status, r.headers, r.latency_ms = 200, RESP_HEADERS, 1.25
        r.body = json.dumps({"prediction": value + i % 7, "model_version": role}).encode()
        r.body_size = len(r.body)
        ex.responses.append(r)
    return ex


def copy_of(src: Exchange) -> Exchange:
    """A new exchange (its own record id) with the request and answers of ``src``."""
    ex = Exchange(src.route, src.received_at, src.method, src.path, src.query, src.headers,
                  src.client_addr, None)
    ex.body, ex.body_size, ex.responses = src.body, src.body_size, src.responses
    return ex


async def data_directory(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW data_directory"))  # superuser or pg_read_all_settings
    except asyncpg.PostgresError:
        return ""
    finally:
        await conn.close()


async def run(url: str, records: int, batch: int) -> dict[str, float]:
    await migrate(url)
    pgdata = await data_directory(url)
    server0 = server_cpu_seconds(pgdata) if pgdata else None
    metrics = Metrics()
    config = RecordingConfig(batch_max_records=batch, queue_max_records=50_000,
                             flush_interval_ms=200)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Recorder(config, url, Path(tmp), metrics)
        await recorder.start()
        template = [exchange(i) for i in range(1000)]
        peak = 0
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        for i in range(records):
            recorder.submit(copy_of(template[i % 1000]))
            if i % 500 == 0:
                peak = max(peak, len(recorder.queue))
                # Stay under the overflow mark (half the queue): this measures the direct
                # path into PostgreSQL, not the spool.
                while len(recorder.queue) > 12_500:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0)
        await recorder.drained()
        while metrics.records["written"] < records - metrics.records["dropped"]:
            await asyncio.sleep(0.01)  # spooled records count once they are in the database
        elapsed = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        server1 = server_cpu_seconds(pgdata) if pgdata else None
        await recorder.close()
    conn = await asyncpg.connect(url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM shadowproxy.requests")
    finally:
        await conn.close()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result = {"records": records, "stored": stored, "seconds": elapsed,
              "records_per_s": records / elapsed, "peak_queue": peak,
              "writer_cpu_us_per_record": cpu / records * 1e6,
              "spooled": metrics.records["spooled"], "dropped": metrics.records["dropped"]}
    if server0 is not None and server1 is not None:
        # A record is one exchange: the request and the primary's and the shadow's answers.
        result["postgres_cpu_us_per_record"] = (server1 - server0) / records * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--database-url", help="an empty database (default: embedded)")
    args = parser.parse_args()
    url = args.database_url or scratch_database("sp-recorder-bench-")
    result = asyncio.run(run(url, args.records, args.batch))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
