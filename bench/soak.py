"""Soak run: mixed traffic for a bounded time while faults happen on a schedule.

Starts its own PostgreSQL (embedded, in a scratch folder), a primary and a shadow model
(aiohttp, in this process), and `shadowproxy run` as a real process in front of them; sends
mixed traffic (JSON POSTs, GETs with query strings, error statuses, gzip responses, an
Authorization header) from several clients, and on a schedule makes the shadow hang, restarts
the shadow, and restarts the database. At the end it stops the proxy with SIGTERM, stores
what the stop left in the spool as the proxy's next start would (a database restarted
shortly before the stop can leave more than the grace stores), and compares the responses
the clients saw with the rows in the database: they must be equal, and the spool empty.

    .venv/bin/python bench/soak.py --seconds 60

Everything runs on 127.0.0.1; every loop is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from store_spool import store  # bench/store_spool.py: a next start's replay of a spool

from tests.pgcontrol import OwnPostgres  # the test suite's real-outage helper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Model:
    """A JSON model service whose behaviour the schedule can change."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.hanging = False
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if self.hanging:
            await asyncio.sleep(3600)
        status = int(request.query.get("status", "200"))
        value = len(raw) * (1.0 if self.name == "primary" else 1.1)
        body = json.dumps({"prediction": value, "model_version": self.name}).encode()
        if request.query.get("gzip"):
            return web.Response(body=gzip.compress(body), status=status,
                                headers={"Content-Encoding": "gzip",
                                         "Content-Type": "application/json"})
        return web.Response(body=body, status=status, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def traffic(port: int, deadline: float, seen: list[int], failures: list[str],
                  seed: int) -> None:
    rnd = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as http:
        while time.monotonic() < deadline:
            kind = rnd.random()
            url = f"http://127.0.0.1:{port}/predict"
            try:
                if kind < 0.6:
                    resp = await http.post(url, json={"features": {"x": rnd.random()}},
                                           headers={"Authorization": "Bearer soak-secret"})
                elif kind < 0.8:
                    resp = await http.get(url + f"?q={rnd.randint(0, 99)}&gzip=1")
                else:
                    resp = await http.get(url + f"?status={rnd.choice([400, 404, 500, 503])}")
                await resp.read()
                seen.append(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(repr(exc))
            await asyncio.sleep(rnd.uniform(0, 0.004))


async def run(seconds: float, clients: int) -> dict[str, Any]:
    pg = OwnPostgres()
    work = Path(tempfile.mkdtemp(prefix="shadowproxy-soak-"))
    primary, shadow = Model("primary", free_port()), Model("shadow", free_port())
    await primary.start()
    await shadow.start()
    port, admin = free_port(), free_port()
    config = work / "soak.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
        "data_dir": str(work / "data"), "database": {"url": pg.url},
        "routes": [{"name": "soak", "primary": {"url": f"http://127.0.0.1:{primary.port}"},
                    "shadows": [{"name": "candidate", "url": f"http://127.0.0.1:{shadow.port}",
                                 "timeout_s": 1, "max_in_flight": 200}]}]}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowproxy", "run", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=open(work / "proxy.log", "wb"),  # noqa: SIM115
        env={**os.environ, "SHADOWPROXY_DATABASE_URL": ""})
    events: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    if (await http.get(f"http://127.0.0.1:{admin}/readyz")).status == 200:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        started = time.monotonic()
        deadline = started + seconds
        seen: list[int] = []
        failures: list[str] = []
        load = asyncio.gather(*(traffic(port, deadline, seen, failures, k)
                                for k in range(clients)))

        async def at(fraction: float, what: str) -> None:
            await asyncio.sleep(max(0.0, started + seconds * fraction - time.monotonic()))
            events.append(f"{time.monotonic() - started:6.1f}s {what}")

        await at(0.15, "shadow hangs")
        shadow.hanging = True
        await at(0.25, "shadow answers again")
        shadow.hanging = False
        await at(0.35, "shadow stops")
        await shadow.stop()
        await at(0.42, "shadow starts")
        await shadow.start()
        await at(0.50, "database stops")
        await asyncio.to_thread(pg.stop)
        await at(0.60, "database starts")
        await asyncio.to_thread(pg.start)
        await at(0.75, "database restarts")
        await asyncio.to_thread(pg.stop)
        await asyncio.to_thread(pg.start)
        await load
        events.append(f"{time.monotonic() - started:6.1f}s traffic ends; SIGTERM to the proxy")
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGTERM)
        status = await asyncio.wait_for(proc.wait(), 60)
        # What the stop's grace did not store waits in the spool for the proxy's next start:
        # store it as that start would (the product's recorder replaying the folder), so
        # that "recorded" counts it, and say how much it was.
        left_by_stop = len(list((work / "data" / "spool").glob("*.spool")))
        stored_after = (await store(work / "data", pg.url, 60))[0] if left_by_stop else 0
        conn = await asyncpg.connect(pg.url)
        try:
            rows = await conn.fetchval("SELECT count(*) FROM shadowproxy.requests")
            pairs = await conn.fetch("SELECT coalesce(shadow_error_kind, 'ok') AS outcome, "
                                     "count(*) AS n FROM shadowproxy.pairs GROUP BY 1")
            leaked = await conn.fetchval(
                "SELECT count(*) FROM shadowproxy.requests WHERE headers::text LIKE "
                "'%soak-secret%'")
        finally:
            await conn.close()
        spool_left = len(list((work / "data" / "spool").glob("*.spool")))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await primary.stop()
        await shadow.stop()
        pg.close()
    return {
        "seconds": seconds, "clients": clients, "events": events,
        "responses_seen_by_clients": len(seen), "client_errors": len(failures),
        "statuses": {str(s): seen.count(s) for s in sorted(set(seen))},
        "rows_in_database": rows, "spool_files_left_by_the_stop": left_by_stop,
        "records_stored_from_them_afterwards": stored_after, "spool_files_left": spool_left,
        "shadow_outcomes": {r["outcome"]: r["n"] for r in pairs},
        "secret_in_database": leaked, "proxy_exit_status": status,
        "ok": rows == len(seen) and not failures and status == 0 and spool_left == 0
        and leaked == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    result = asyncio.run(run(args.seconds, args.clients))
    print(json.dumps(result, indent=2))
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
