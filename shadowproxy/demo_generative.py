"""``shadowproxy demo --generative``: the story of a generative model, on one machine.

It starts the embedded PostgreSQL under ``--data-dir``, two example OpenAI-compatible chat
services of ``examples/chat_service.py`` (the "small" model as the primary, the "large" one
as the candidate shadow: they agree on most prompts and not on some, and "large" is slower
to its first token), and ``shadowproxy run`` in front of them; sends ``--requests`` chat
requests through the proxy (``examples/chat_traffic.py``: questions, weather questions with a
tool offered, long prompts, requests for JSON; some streamed); waits until every exchange is
in the database; imports the reference answers as labels; prints the generation report and
writes its HTML version; says where everything is; and stops every process it started,
whatever happened. The report's semantic similarity comes from the primary service's own
``/v1/embeddings`` (hashed bag-of-words vectors).

The processes are handled as in ``shadowproxy demo`` (``shadowproxy/demo.py``): each in its
own process group, logging to ``DATA_DIR/logs/``, stopped in reverse order of start.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from shadowproxy.demo import STOP_TIMEOUT_S, Processes, _db_now, _run_step, free_port, wait_http
from shadowproxy.errors import DemoError, UsageError

ROUTE = "chat"
SHADOW = "large"
MAX_REQUESTS = 100_000
DEMO_RATE = 50
"""Requests per second: the pace of users, so that neither service is flooded."""
STREAM_SHARE = 0.3
TTFT_MS, TOKEN_DELAY_MS = 20, 2
"""The small model's time to first token and per-token delay (the large one is slower)."""
PRICES = {"primary": {"input_per_million": 0.15, "output_per_million": 0.60},
          SHADOW: {"input_per_million": 2.50, "output_per_million": 10.00}}
"""Illustrative prices per million tokens of a small and a large hosted model."""
STEPS = 7
RECORD_TIMEOUT_S = 60.0


def examples_root() -> Path:
    """The source checkout holding ``examples/``; UsageError when it cannot be found."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "examples" / "chat_service.py").is_file():
        raise UsageError(
            "shadowproxy demo --generative runs the example chat services of the source tree, "
            f"and there is no examples/ folder next to the package (looked in {root}); run it "
            "from a checkout: git clone the repository, then pip install -e '.[examples]'")
    missing = [name for name in ("rapidfuzz", "matplotlib", "numpy", "scipy")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the demo needs {', '.join(missing)}; install them with: "
                         "pip install -e '.[examples]'")
    return root


def demo_config(data_dir: Path, ports: dict[str, int]) -> dict[str, Any]:
    """The configuration the demo's proxy runs with (written to DATA_DIR/shadowproxy.yaml)."""
    primary = f"http://127.0.0.1:{ports['primary']}"
    return {
        "listen": f"127.0.0.1:{ports['proxy']}",
        "admin_listen": f"127.0.0.1:{ports['admin']}",
        "workers": 1,
        "data_dir": str(data_dir),
        "database": {"url": None},  # the embedded PostgreSQL under data_dir
        "routes": [{
            "name": ROUTE,
            "match": {"path_prefix": "/v1/", "methods": ["POST"]},
            "primary": {"url": primary, "timeout_s": 30},
            "shadows": [{"name": SHADOW, "url": f"http://127.0.0.1:{ports[SHADOW]}",
                         "timeout_s": 30}],
            "compare": {
                "task": "generation",
                "ignore": ["$.id", "$.created", "$.model", "$.system_fingerprint"],
                "generation": {
                    "prices": PRICES,
                    "embeddings": {"url": f"{primary}/v1/embeddings",
                                   "model": "hashed-words"},
                    "most_different": 5,
                },
            },
        }],
    }


async def _wait_records(url: str, since: datetime, expected: int, timeout_s: float) -> int:
    """Poll until ``expected`` exchanges of this run are in the database (or the time is up)."""
    from shadowproxy.store.database import connection

    async with connection(url) as conn:
        deadline = time.monotonic() + timeout_s
        while True:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM shadowproxy.requests "
                "WHERE route = $1 AND received_at >= $2", ROUTE, since)
            if count >= expected or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.2)


def run_demo_generative(args: argparse.Namespace) -> int:
    """The ``demo --generative`` command."""
    if not 1 <= args.requests <= MAX_REQUESTS:
        raise UsageError(f"--requests: expected 1 to {MAX_REQUESTS} (got {args.requests})")
    root = examples_root()
    data_dir = Path(args.data_dir).resolve()
    try:
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--data-dir {data_dir}: cannot create it: {exc.strerror}") from exc
    console = Console(highlight=False)
    env = {k: v for k, v in os.environ.items()
           # The demo's own embedded database, never one a variable points at.
           if k not in ("SHADOWPROXY_DATABASE_URL", "PYTHONPATH")}
    env["PYTHONPATH"] = str(root)
    children = Processes(data_dir / "logs", env, root)
    try:
        return _demo(args.requests, data_dir, console, sys.executable, env, root, children)
    finally:
        killed = children.close()
        if killed:
            console.print(f"[yellow]had to kill {', '.join(killed)} (no exit within "
                          f"{STOP_TIMEOUT_S:.0f}s of SIGTERM)[/]")


def _demo(requests: int, data_dir: Path, console: Console, python: str, env: dict[str, str],
          root: Path, children: Processes) -> int:
    from shadowproxy.store.embedded import start_embedded
    from shadowproxy.store.migrate import migrate

    started = time.monotonic()
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        console.print(f"[bold cyan][{step}/{STEPS}][/] {text}")

    say(f"PostgreSQL (embedded) in {data_dir / 'postgres'}")
    db_url = start_embedded(data_dir, cleanup="stop")
    asyncio.run(migrate(db_url))

    ports = {name: free_port() for name in ("primary", SHADOW, "proxy", "admin")}
    config_path = data_dir / "shadowproxy.yaml"
    config_path.write_text(
        "# Written by `shadowproxy demo --generative`; ports are chosen afresh on every run.\n"
        + yaml.safe_dump(demo_config(data_dir, ports), sort_keys=False), encoding="utf-8")

    say(f"chat services: primary = model 'small' on :{ports['primary']}, shadow '{SHADOW}' = "
        f"model 'large' on :{ports[SHADOW]} (OpenAI-compatible, streamed or not)")
    services = [children.start(name, [python, "-m", "examples.chat_service", "--port",
                                      str(ports[name]), "--model", model,
                                      "--ttft-ms", str(TTFT_MS),
                                      "--token-delay-ms", str(TOKEN_DELAY_MS)])
                for name, model in (("primary", "small"), (SHADOW, "large"))]
    for child in services:
        wait_http(child, f"http://127.0.0.1:{ports[child.name]}/healthz")

    say(f"shadowproxy on 127.0.0.1:{ports['proxy']} (admin :{ports['admin']})")
    proxy = children.start("shadowproxy", [python, "-m", "shadowproxy", "run",
                                           "-c", str(config_path)])
    wait_http(proxy, f"http://127.0.0.1:{ports['admin']}/readyz")

    say(f"sending {requests} chat requests through the proxy, {DEMO_RATE} a second, "
        f"{STREAM_SHARE:.0%} of them streamed")
    window_start = asyncio.run(_db_now(db_url))
    labels = data_dir / "labels.csv"
    summary = _run_step(
        [python, "-m", "examples.chat_traffic",
         "--url", f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions",
         "--requests", str(requests), "--rate", str(DEMO_RATE),
         "--stream-share", str(STREAM_SHARE), "--labels", str(labels)],
        env, root, "sending traffic").strip()
    console.print(f"    {summary}")

    say("waiting for the records to reach PostgreSQL; importing the reference answers")
    recorded = asyncio.run(_wait_records(db_url, window_start, requests, RECORD_TIMEOUT_S))
    if recorded < requests:
        if proxy.proc.poll() is not None:
            raise proxy.failed(f"exited with status {proxy.proc.returncode}")
        raise proxy.failed(f"recorded {recorded} of {requests} requests within "
                           f"{RECORD_TIMEOUT_S:.0f}s")
    window_end = asyncio.run(_db_now(db_url))
    console.print(f"    {recorded} exchanges recorded")
    imported = _run_step([python, "-m", "shadowproxy", "labels", "import", "-c",
                          str(config_path), str(labels)], env, root, "importing labels")
    console.print(f"    reference answers as labels: {imported.strip().splitlines()[0]}"
                  if imported.strip() else "    reference answers imported as labels")

    say("the generation report")
    report = [python, "-m", "shadowproxy", "report", "-c", str(config_path), "--route", ROUTE,
              "--shadow", SHADOW, "--from", window_start.isoformat(),
              "--to", window_end.isoformat()]
    sys.stdout.flush()
    _run_step(report, env, root, "the report", stdout=None)  # to the terminal
    html = data_dir / "report.html"
    _run_step(report + ["--format", "html", "-o", str(html)], env, root, "the HTML report")

    say("stopping the proxy and the chat services")
    killed = children.close()
    if killed:
        raise DemoError(f"{', '.join(killed)} did not stop within {STOP_TIMEOUT_S:.0f}s of "
                        f"SIGTERM and was killed; see {data_dir / 'logs'}")
    elapsed = time.monotonic() - started
    console.print(f"\n[bold green]Done in {elapsed:.0f}s.[/] Everything is under {data_dir}:")
    for label, where in (
            ("HTML report", str(html)),
            ("database", f'psql "$(shadowproxy db-url -c {config_path})"'),
            ("", "(the embedded PostgreSQL stopped with the demo; db-url starts it again)"),
            ("try in psql", "SELECT primary_body_json #>> '{choices,0,message,content}' AS "
                            "small, shadow_body_json #>> '{choices,0,message,content}' AS "
                            "large FROM shadowproxy.pairs WHERE primary_body_json -> "
                            "'choices' <> shadow_body_json -> 'choices' LIMIT 5;"),
            ("config", str(config_path)),
            ("logs", str(data_dir / "logs"))):
        console.print(f"  [bold]{label:<12}[/] {where}", soft_wrap=True)
    return 0
