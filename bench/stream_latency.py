"""What capturing streamed answers adds to each chunk's latency for the client.

A streaming server sends OpenAI-style chat chunks (``data: {...}\\n\\n``), ``--tokens`` per
answer, ``--delay-ms`` apart, each stamped with ``time.perf_counter()`` just before it is
written (Linux's monotonic clock, the same in every process of the machine). The client
stamps each chunk as it reads it; a chunk's latency is the difference. Three modes, in
alternating rounds of ``--concurrency`` answers at once, so that noise from the shared
machine falls on all three alike:

- ``direct``: the client reads the server itself;
- ``proxy, captured``: through ``shadowproxy run`` with ``Content-Type: text/event-stream``,
  so the proxy times each piece and the recorder assembles every answer (primary and shadow);
- ``proxy, not captured``: the same bytes through the same proxy as ``text/plain``, which the
  proxy relays and records raw without timing or assembly.

The route has a shadow (a second server process) that gets and streams every request too,
as in production: its capture and assembly share the proxy's event loop. The proxy records
to an embedded PostgreSQL in a scratch folder unless ``--database-url`` names one.

    python bench/stream_latency.py                                   # the measurement
    python bench/stream_latency.py --rounds 1 --tokens 20            # a quick check
    python bench/stream_latency.py --tree /tmp/compiled              # tools/compiled-tree.sh

It prints, per mode, the chunks timed and their latency percentiles, and what the proxy adds
to the direct p50/p99 with and without capture. Everything listens on 127.0.0.1 and stops
by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from localhost import free_port, stop, wait_for_port  # bench/localhost.py

MODES = ("direct", "proxy, captured", "proxy, not captured")


def serve(port: int, tokens: int, delay_s: float) -> None:
    """The streaming server: ``POST /v1/chat/completions[?plain=1]``."""
    import orjson
    import uvloop
    from aiohttp import web

    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "bench"}

    def event(choice: dict[str, object], **extra: object) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": [choice], **extra,
                                         "sent": time.perf_counter()}) + b"\n\n"

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        kind = "text/plain" if request.query.get("plain") else "text/event-stream"
        resp = web.StreamResponse(headers={"Content-Type": kind})
        await resp.prepare(request)
        await resp.write(event({"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None}))
        for i in range(tokens):
            await asyncio.sleep(delay_s)
            await resp.write(event({"index": 0, "delta": {"content": f" token{i}"},
                                    "finish_reason": None}))
        await resp.write(event({"index": 0, "delta": {}, "finish_reason": "stop"},
                               usage={"prompt_tokens": 9, "completion_tokens": tokens,
                                      "total_tokens": 9 + tokens}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                handle_signals=True)


async def one_answer(session: object, url: str, latencies: list[float],
                     start_after_s: float = 0.0) -> None:
    """Read one streamed answer, timing each chunk against its server stamp."""
    import aiohttp
    import orjson

    assert isinstance(session, aiohttp.ClientSession)
    await asyncio.sleep(start_after_s)
    async with session.post(url, json={"model": "bench", "stream": True,
                                       "messages": [{"role": "user", "content": "hi"}]}) as resp:
        if resp.status != 200:
            raise SystemExit(f"{url} answered {resp.status}")
        while True:
            event = await resp.content.readuntil(b"\n\n")
            now = time.perf_counter()
            if not event or event.startswith(b"data: [DONE]"):
                break
            latencies.append((now - orjson.loads(event[6:])["sent"]) * 1000.0)
        await resp.read()


async def measure(args: argparse.Namespace, server: int, proxy: int
                  ) -> dict[str, list[float]]:
    import aiohttp

    urls = {"direct": f"http://127.0.0.1:{server}/v1/chat/completions",
            "proxy, captured": f"http://127.0.0.1:{proxy}/v1/chat/completions",
            "proxy, not captured": f"http://127.0.0.1:{proxy}/v1/chat/completions?plain=1"}
    latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for mode in MODES:  # warm-up: connections, the proxy's pools
            await one_answer(session, urls[mode], [])
        # The answers of a round start a fraction of a chunk's delay apart, so that their
        # chunks do not all reach this one client at the same instant.
        spread = args.delay_ms / 1000.0 / args.concurrency
        for _ in range(args.rounds):
            for mode in MODES:
                await asyncio.gather(*(one_answer(session, urls[mode], latencies[mode],
                                                  i * spread)
                                       for i in range(args.concurrency)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=200, help="chunks of text per answer")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="between chunks")
    parser.add_argument("--concurrency", type=int, default=8, help="answers at once")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of each mode")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--tree", default=None, help="run the proxy from this source tree")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.tokens, args.delay_ms / 1000.0)
        return
    if min(args.tokens, args.concurrency, args.rounds) < 1 or args.delay_ms < 0:
        raise SystemExit("--tokens, --concurrency and --rounds: at least 1; --delay-ms >= 0")

    work = Path(tempfile.mkdtemp(prefix="shadowproxy-stream-latency-"))
    work.chmod(0o755)  # the embedded PostgreSQL may run as its own user
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for _ in range(2):  # the primary and the shadow
            port = free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port),
                                     "--tokens", str(args.tokens),
                                     "--delay-ms", str(args.delay_ms)])
            procs.append(proc)
            wait_for_port(port, 10, proc)
            ports.append(port)
        proxy_port = free_port()
        database = f'{{url: "{args.database_url}"}}' if args.database_url else "{url: null}"
        config = work / "proxy.yaml"
        config.write_text(f"""listen: "127.0.0.1:{proxy_port}"
admin_listen: null
data_dir: "{work / 'data'}"
database: {database}
routes:
  - name: chat
    primary: {{url: "http://127.0.0.1:{ports[0]}", timeout_s: 60}}
    shadows:
      - {{name: shadow, url: "http://127.0.0.1:{ports[1]}", timeout_s: 60}}
""")
        env = dict(os.environ)
        if args.tree:
            env["PYTHONPATH"] = args.tree
        with open(work / "proxy.log", "wb") as log:
            proxy = subprocess.Popen([sys.executable, "-m", "shadowproxy", "run", "-c",
                                      str(config)], cwd=work, env=env, stderr=log)
        procs.append(proxy)
        wait_for_port(proxy_port, 120, proxy)
        build = subprocess.run(
            [sys.executable, "-c", "import shadowproxy.build as b; print(b.describe())"],
            env=env, cwd=work, capture_output=True, text=True, check=True).stdout.strip()
        import uvloop

        latencies = uvloop.run(measure(args, ports[0], proxy_port))
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.rounds} rounds x {args.concurrency} answers at once per mode, {args.tokens} "
          f"tokens {args.delay_ms:g} ms apart; proxy {build}, with a streaming shadow")
    print("| mode | chunks | p50 ms | p90 ms | p99 ms | max ms | mean ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        v = latencies[mode]
        print(f"| {mode} | {len(v)} | {percentile(v, 0.5):.3f} | {percentile(v, 0.9):.3f} | "
              f"{percentile(v, 0.99):.3f} | {max(v):.3f} | {sum(v) / len(v):.3f} |")
    direct = latencies["direct"]
    for mode in MODES[1:]:
        v = latencies[mode]
        print(f"{mode}: adds {percentile(v, 0.5) - percentile(direct, 0.5):+.3f} ms at p50, "
              f"{percentile(v, 0.99) - percentile(direct, 0.99):+.3f} ms at p99")
    captured, plain = latencies["proxy, captured"], latencies["proxy, not captured"]
    print(f"capture itself: {percentile(captured, 0.5) - percentile(plain, 0.5):+.3f} ms at "
          f"p50, {percentile(captured, 0.99) - percentile(plain, 0.99):+.3f} ms at p99")


if __name__ == "__main__":
    main()
