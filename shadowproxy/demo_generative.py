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
from pathlib import Path
from typing import Any

from shadowproxy.demo import Story, db_now, free_port, run_story, wait_http
from shadowproxy.errors import UsageError

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


def run_demo_generative(args: argparse.Namespace) -> int:
    """The ``demo --generative`` command."""
    return run_story(args, MAX_REQUESTS, examples_root, STEPS, _demo)


def _demo(story: Story) -> int:
    python, console, requests = story.python, story.console, story.requests
    db_url = story.start_database()
    ports = {name: free_port() for name in ("primary", SHADOW, "proxy", "admin")}
    config_path = story.write_config(demo_config(story.data_dir, ports),
                                     "shadowproxy demo --generative")

    story.say(f"chat services: primary = model 'small' on :{ports['primary']}, shadow "
              f"'{SHADOW}' = model 'large' on :{ports[SHADOW]} (OpenAI-compatible, streamed "
              "or not)")
    services = [story.children.start(name, [python, "-m", "examples.chat_service", "--port",
                                            str(ports[name]), "--model", model,
                                            "--ttft-ms", str(TTFT_MS),
                                            "--token-delay-ms", str(TOKEN_DELAY_MS)])
                for name, model in (("primary", "small"), (SHADOW, "large"))]
    for child in services:
        wait_http(child, f"http://127.0.0.1:{ports[child.name]}/healthz")

    proxy = story.start_proxy(config_path, ports)

    story.say(f"sending {requests} chat requests through the proxy, {DEMO_RATE} a second, "
              f"{STREAM_SHARE:.0%} of them streamed")
    window_start = asyncio.run(db_now(db_url))
    labels = story.data_dir / "labels.csv"
    summary = story.run(
        [python, "-m", "examples.chat_traffic",
         "--url", f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions",
         "--requests", str(requests), "--rate", str(DEMO_RATE),
         "--stream-share", str(STREAM_SHARE), "--labels", str(labels)],
        "sending traffic").strip()
    console.print(f"    {summary}")

    story.say("waiting for the records to reach PostgreSQL; importing the reference answers")
    window_end = story.wait_recorded(db_url, ROUTE, window_start, requests, proxy, "requests")
    story.import_labels(config_path, labels, "reference answers")

    story.say("the generation report")
    html = story.report([python, "-m", "shadowproxy", "report", "-c", str(config_path),
                         "--route", ROUTE, "--shadow", SHADOW,
                         "--from", window_start.isoformat(), "--to", window_end.isoformat()])

    return story.finish(
        "the proxy and the chat services", html, config_path,
        "SELECT primary_body_json #>> '{choices,0,message,content}' AS small, "
        "shadow_body_json #>> '{choices,0,message,content}' AS large FROM shadowproxy.pairs "
        "WHERE primary_body_json -> 'choices' <> shadow_body_json -> 'choices' LIMIT 5;")
