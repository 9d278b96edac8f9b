"""What one batch of records costs, by its size: the proxy's CPU and PostgreSQL's.

A batch is one transaction of two COPYs (requests, answers). Its fixed part (the round
trips, asyncio's and asyncpg's Python around them, PostgreSQL's statements and commit) is
paid once per batch however few records it holds: at a model's pace batches are small
(``recording.write_after_records``), so that part is a larger share of each record's cost
than at full load, where batches gather hundreds of records. Writes the batches through the
recorder's own ``PostgresWriter``, one after another with a 2 ms pause between them (as a
live writer at a model's pace), into an embedded PostgreSQL in a temporary folder or the
one at --database-url, and prints CPU per batch and per record for each size.

    python bench/batch_cost.py --sizes 1,16,64 --batches 200
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop
from localhost import scratch_database, server_cpu_seconds  # bench/localhost.py
from recorder_bench import data_directory, exchange  # bench/recorder_bench.py

from shadowproxy.config import RecordingConfig
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.rows import RowEncoder
from shadowproxy.store.migrate import migrate


async def measure(url: str, sizes: list[int], batches: int) -> None:
    await migrate(url)
    pgdata = await data_directory(url)
    encoder = RowEncoder(RecordingConfig())
    writer = PostgresWriter(url)
    if await writer.check() is not None:
        raise SystemExit(f"cannot write to {url}")
    print("| records per batch | proxy CPU µs per batch | per record | PostgreSQL CPU µs per "
          "batch | per record |\n|---:|---:|---:|---:|---:|")
    try:
        for size in sizes:
            rows = [encoder.encode([exchange(i) for i in range(size)]) for _ in range(batches)]
            await writer.write(*encoder.encode([exchange(0)]))  # connected, warm
            server = server_cpu_seconds(pgdata) if pgdata else None
            cpu = time.process_time()
            for requests, responses in rows:
                await writer.write(requests, responses)
                await asyncio.sleep(0.002)
            cpu = (time.process_time() - cpu) / batches * 1e6
            line = f"| {size} | {cpu:.0f} | {cpu / size:.1f} |"
            if server is not None:
                after = server_cpu_seconds(pgdata) or 0.0
                spent = (after - server) / batches * 1e6
                line += f" {spent:.0f} | {spent / size:.1f} |"
            else:
                line += " – | – |"
            print(line)
    finally:
        await writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,64")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--database-url", help="an empty database (default: embedded)")
    args = parser.parse_args()
    url = args.database_url or scratch_database("sp-batch-cost-")
    uvloop.run(measure(url, [int(size) for size in args.sizes.split(",")], args.batches))


if __name__ == "__main__":
    main()
