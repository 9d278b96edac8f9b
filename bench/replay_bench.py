"""Replay throughput from one core, beside plain HTTP clients on the same machine.

Records ``--requests`` requests (a 1 KB JSON body each, the usual headers, a primary's
answer) in PostgreSQL, starts a fast upstream (a raw uvloop + httptools server answering a
fixed JSON body), then measures on the same core (``taskset -c --cpu``):

- ``shadowproxy replay`` of them all, unpaced, ``--concurrency`` calls in flight: requests
  per second as the command reports it (from the first send to the last answer stored in
  PostgreSQL), and the stored count checked against the database;
- a plain ``aiohttp.ClientSession`` client POSTing the same body with the same concurrency
  (no database, nothing recorded);
- ``wrk`` (one thread, the same connections, 5 s), when it is installed.

The upstream runs on the other core (``--upstream-cpu``); PostgreSQL is not pinned. The
database is the one at --database-url (or SHADOWPROXY_DATABASE_URL), else an embedded
PostgreSQL in a temporary folder.

    .venv/bin/python bench/replay_bench.py --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from localhost import serve_fixed  # bench/localhost.py

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"features": {f"f{i}": i * 1.5 for i in range(80)}})  # 1 KB
ANSWER = b'{"prediction": 1.0, "model_version": "bench"}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(ANSWER)) + ANSWER


# --- the fast upstream (run as `replay_bench.py --serve PORT`) ------------------------------

def serve(port: int) -> None:
    serve_fixed(port, RESPONSE, backlog=1024, ready=True)


# --- the plain client (run as `replay_bench.py --aiohttp URL N CONCURRENCY`) ----------------

def aiohttp_client(url: str, n: int, concurrency: int) -> None:
    import aiohttp
    import uvloop

    async def main() -> None:
        left = [n]
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    async with session.post(url, data=BODY, headers={
                            "Content-Type": "application/json"}) as resp:
                        await resp.read()

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            print(f"{n / (time.perf_counter() - started):.0f}")

    uvloop.run(main())


# --- the benchmark -------------------------------------------------------------------------

def _pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return (["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset")
            else []) + argv


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _record(url: str, n: int) -> None:
    from shadowproxy.store.migrate import migrate

    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("""
            INSERT INTO shadowproxy.requests (id, request_id, route, received_at, method, path,
                                              headers, body, body_json, body_size, client_addr)
            SELECT gen_random_uuid(), 'bench-' || i, 'bench',
                   now() - interval '1 hour' + make_interval(secs => i * 0.001), 'POST',
                   '/predict', $2::jsonb, convert_to($1, 'UTF8'), $1::jsonb,
                   octet_length($1), '127.0.0.1'
            FROM generate_series(1, $3) i;
            """, BODY, json.dumps({"host": "127.0.0.1:8080", "user-agent": "bench",
                                   "content-type": "application/json",
                                   "authorization": "[redacted]"}), n)
        await conn.execute("""
            INSERT INTO shadowproxy.responses (request, received_at, target, role, status,
                                               body, body_json)
            SELECT id, received_at, 'primary', 'primary', 200, $1, $2::jsonb
            FROM shadowproxy.requests""",
                           ANSWER, ANSWER.decode())
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def _wrk(url: str, connections: int, cpu: int | None) -> float | None:
    if not shutil.which("wrk"):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                     'wrk.headers["Content-Type"] = "application/json"\n')
    try:
        out = subprocess.run(_pinned(cpu, ["wrk", "-t1", f"-c{connections}", "-d5s", "-s",
                                           script.name, url]),
                             capture_output=True, text=True, timeout=60, check=True).stdout
    finally:
        os.unlink(script.name)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1)) if m else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cpu", type=int, default=0, help="the core the clients run on")
    parser.add_argument("--upstream-cpu", type=int, default=1)
    parser.add_argument("--database-url", default=os.environ.get("SHADOWPROXY_DATABASE_URL"))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--aiohttp", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.aiohttp is not None:
        aiohttp_client(args.aiohttp[0], int(args.aiohttp[1]), int(args.aiohttp[2]))
        return 0

    from shadowproxy.demo import free_port
    from shadowproxy.store.embedded import embedded_server

    tmp = Path(tempfile.mkdtemp(prefix="shadowproxy-replay-bench-"))
    tmp.chmod(0o755)  # as root, the embedded server runs as its own user
    servers = contextlib.ExitStack()
    server_url = args.database_url or servers.enter_context(embedded_server(tmp / "pg"))
    name = f"sp_replay_bench_{uuid.uuid4().hex[:8]}"
    upstream = None
    try:
        async def create() -> None:
            conn = await asyncpg.connect(server_url)
            await conn.execute(f'CREATE DATABASE "{name}"')
            await conn.close()

        asyncio.run(create())
        url = _with_database(server_url, name)
        asyncio.run(_record(url, args.requests))
        port = free_port()
        upstream = subprocess.Popen(
            _pinned(args.upstream_cpu, [sys.executable, __file__, "--serve", str(port)]),
            stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        target = f"http://127.0.0.1:{port}"

        config = tmp / "bench.yaml"
        config.write_text(f"data_dir: {str(tmp / 'data')!r}\ndatabase: {{url: {url!r}}}\n"
                          f"routes:\n  - name: bench\n    primary: {{url: {target!r}}}\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("SHADOWPROXY_DATABASE_URL", None)
        started = time.perf_counter()
        replay = subprocess.run(
            _pinned(args.cpu, [sys.executable, "-m", "shadowproxy", "replay", "-c", str(config),
                               "--route", "bench", "--to", target, "--as", "bench",
                               "--since", "1d", "--concurrency", str(args.concurrency)]),
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        wall = time.perf_counter() - started
        if replay.returncode != 0:
            print(replay.stdout, replay.stderr, file=sys.stderr)
            return 1
        m = re.search(r"done in ([\d.]+)s: (\d+) sent \((\d+)/s\)", replay.stdout)
        assert m, replay.stdout

        async def stored() -> int:
            conn = await asyncpg.connect(url)
            try:
                count: int = await conn.fetchval(
                    "SELECT count(*) FROM shadowproxy.responses WHERE target = 'bench'")
                return count
            finally:
                await conn.close()

        in_db = asyncio.run(stored())
        plain = subprocess.run(
            _pinned(args.cpu, [sys.executable, __file__, "--aiohttp", target + "/predict",
                               str(args.requests), str(args.concurrency)]),
            capture_output=True, text=True, timeout=600, check=True)
        wrk = _wrk(target + "/predict", args.concurrency, args.cpu)

        cpu_model = next((line.split(":", 1)[1].strip() for line in
                          Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), platform.processor())
        print(f"replay benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs "
              f"({cpu_model}), Python {platform.python_version()}; clients on CPU {args.cpu}, "
              f"upstream on CPU {args.upstream_cpu}, PostgreSQL unpinned")
        print(f"{args.requests} requests, 1 KB JSON bodies, concurrency {args.concurrency}")
        print(f"  shadowproxy replay   {int(m.group(3)):>8,} req/s  (sending to the last answer "
              f"stored: {m.group(1)} s; {wall:.1f} s with start-up and preflight; "
              f"{in_db} answers in the database)")
        print(f"  aiohttp client       {int(plain.stdout.strip()):>8,} req/s  (nothing recorded)")
        if wrk is not None:
            print(f"  wrk, 1 thread        {wrk:>8,.0f} req/s  (nothing recorded, 5 s)")
        return 0 if in_db == args.requests else 1
    finally:
        if upstream is not None:
            upstream.terminate()
            upstream.wait(10)

        async def drop() -> None:
            conn = await asyncpg.connect(server_url)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.close()

        asyncio.run(drop())
        servers.close()  # the embedded server stops before its folder goes
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
