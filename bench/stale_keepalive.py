"""POSTs through the proxy to a real uvicorn upstream, with pauses spread around uvicorn's
keep-alive timeout: how many fail (502) and how many reach the model twice?

uvicorn (as under MLServer, KServe and most FastAPI model services) closes a keep-alive
connection after 5 s without a request. A proxy that reuses such a connection just as
uvicorn closes it sees the request fail before any byte of a response; a POST cannot then
be sent again safely, so it becomes a 502 — unless idle upstream connections are closed
first (``limits.upstream_idle_s``, 1.5 s by default). Each configuration sends ``--requests``
POSTs, each with a unique id, from ``--concurrency`` clients that each pause a random
0.5-1.5 times uvicorn's keep-alive timeout before every request. The uvicorn app counts
the ids it receives: an id seen twice is a duplicate.

    python bench/stale_keepalive.py                         # 10,000 POSTs, idle 1.5 s and off
    python bench/stale_keepalive.py --requests 500 --idle 1.5   # a quick look

``--idle off`` keeps idle connections for an hour (no expiry, for comparison);
``--retry-non-idempotent`` sets the route's opt-in. Everything listens on 127.0.0.1; the
records go to an embedded PostgreSQL in a scratch folder unless ``--database-url`` names one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from localhost import free_port, stop, wait_for_port  # bench/localhost.py


def serve(port: int, keep_alive: float) -> None:
    """The upstream: uvicorn with a bare ASGI app that counts the ids it is sent."""
    import uvicorn

    seen: Counter[str] = Counter()
    ports: set[int] = set()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        pieces = []
        while True:
            message = await receive()
            pieces.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(pieces)
        if scope["path"] == "/stats":
            payload = {"requests": sum(seen.values()), "ids": len(seen),
                       "duplicates": sum(n - 1 for n in seen.values()),
                       "connections": len(ports)}
        else:
            seen[json.loads(body)["id"]] += 1
            ports.add(scope["client"][1])
            payload = {"prediction": 1.0}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})

    uvicorn.run(app, host="127.0.0.1", port=port, timeout_keep_alive=keep_alive,
                http="httptools", ws="none", lifespan="off", proxy_headers=False,
                log_level="warning", access_log=False)


async def load(port: int, args: argparse.Namespace, label: str) -> Counter[str]:
    """Every client: pause, POST a new id, note the outcome; until --requests are sent."""
    outcomes: Counter[str] = Counter()
    ids = iter(range(args.requests))
    timeout = aiohttp.ClientTimeout(total=60)

    async def client() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                         timeout=timeout) as http:
            for n in ids:
                await asyncio.sleep(random.uniform(0.5, 1.5) * args.keep_alive)
                try:
                    async with http.post(f"http://127.0.0.1:{port}/predict",
                                         json={"id": f"{label}-{n}"}) as resp:
                        await resp.read()
                        outcomes[str(resp.status)] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcomes[type(exc).__name__] += 1

    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return outcomes


def run(idle: str, args: argparse.Namespace, work: Path, upstream: int) -> dict[str, Any]:
    port = free_port()
    idle_s = 3600.0 if idle == "off" else float(idle)
    database = f'{{url: "{args.database_url}"}}' if args.database_url else "{url: null}"
    config = work / f"idle-{idle}.yaml"
    config.write_text(f"""listen: "127.0.0.1:{port}"
admin_listen: null
data_dir: "{work / 'data'}"
database: {database}
limits: {{upstream_idle_s: {idle_s}}}
routes:
  - name: model
    retry_non_idempotent: {str(args.retry_non_idempotent).lower()}
    primary: {{url: "http://127.0.0.1:{upstream}", timeout_s: 30}}
""")
    with open(work / f"idle-{idle}.log", "wb") as log:
        proxy = subprocess.Popen([sys.executable, "-m", "shadowproxy", "run", "-c", str(config)],
                                 cwd=work, stderr=log)
    try:
        wait_for_port(port, 60, proxy)
        started = time.monotonic()
        outcomes = asyncio.run(load(port, args, f"idle-{idle}"))
        elapsed = time.monotonic() - started
    finally:
        stop(proxy)
    return {"outcomes": outcomes, "seconds": elapsed}


async def stats(port: int) -> dict[str, int]:
    async with aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{port}/stats", data=b"") as resp:
        result: dict[str, int] = await resp.json()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=250)
    parser.add_argument("--keep-alive", type=float, default=5.0,
                        help="uvicorn's timeout_keep_alive (its default: 5 s)")
    parser.add_argument("--idle", default="1.5,off",
                        help="limits.upstream_idle_s values to run, comma-separated")
    parser.add_argument("--retry-non-idempotent", action="store_true")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.keep_alive)
        return

    work = Path(tempfile.mkdtemp(prefix="shadowproxy-stale-keepalive-"))
    work.chmod(0o755)  # the embedded PostgreSQL may run as its own user
    print(f"{args.requests} POSTs per configuration, {args.concurrency} clients, uvicorn "
          f"keep-alive {args.keep_alive:g} s, pauses {0.5 * args.keep_alive:g}-"
          f"{1.5 * args.keep_alive:g} s, retry_non_idempotent "
          f"{str(args.retry_non_idempotent).lower()}")
    print("| upstream_idle_s | requests | 200 | 502 | other | upstream saw | duplicates | "
          "distinct upstream ports | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for idle in args.idle.split(","):
        upstream_port = free_port()
        upstream = subprocess.Popen([sys.executable, __file__, "--serve", str(upstream_port),
                                     "--keep-alive", str(args.keep_alive)])
        try:
            wait_for_port(upstream_port, 10, upstream)
            result = run(idle, args, work, upstream_port)
            seen = asyncio.run(stats(upstream_port))
        finally:
            upstream.terminate()
            upstream.wait()
        outcomes = result["outcomes"]
        other = sum(n for k, n in outcomes.items() if k not in ("200", "502"))
        print(f"| {idle} | {sum(outcomes.values()):,} | {outcomes['200']:,} | "
              f"{outcomes['502']:,} | {other:,} | {seen['requests']:,} | "
              f"{seen['duplicates']:,} | {seen['connections']:,} | {result['seconds']:.0f} |",
              flush=True)
    if os.environ.get("SHADOWPROXY_BENCH_KEEP") is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
