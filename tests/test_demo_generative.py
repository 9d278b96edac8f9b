"""`shadowproxy demo --generative`: two chat models, the proxy, traffic, the generation report."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import psutil
import pytest
import yaml

from shadowproxy.store.embedded import start_embedded
from tests.test_demo import _listening, _stop_embedded

N = 120


def _demo(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "shadowproxy", "demo", "--generative", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


async def _recorded(url: str) -> dict[str, object]:
    conn = await asyncpg.connect(url)
    try:
        return {
            "requests": await conn.fetchval("SELECT count(*) FROM shadowproxy.requests"),
            "streamed requests": await conn.fetchval(
                "SELECT count(*) FROM shadowproxy.requests WHERE body_json -> 'stream' = "
                "'true'::jsonb") > 0,
            "models": {tuple(r) for r in await conn.fetch(
                "SELECT DISTINCT primary_body_json ->> 'model', shadow_body_json ->> 'model' "
                "FROM shadowproxy.pairs WHERE primary_body_json IS NOT NULL")},
            "labels": await conn.fetchval("SELECT count(*) FROM shadowproxy.labels") > 0,
            "streams timed and assembled": {tuple(r) for r in await conn.fetch(
                "SELECT role, (stream ->> 'ttft_ms')::float > 0 AND body_json IS NOT NULL "
                "FROM shadowproxy.responses WHERE headers ->> 'content-type' LIKE "
                "'text/event-stream%' GROUP BY 1, 2")},
        }
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_generative_demo_runs_the_whole_story_and_cleans_up(demo_dir: Path) -> None:
    """From any directory: two chat models behind the proxy, chat traffic (some streamed,
    each side's streams assembled and timed), the reference answers imported, the generation
    report printed and written as HTML, everything stopped, exit 0."""
    started = time.monotonic()
    proc = _demo("--requests", str(N), "--data-dir", str(demo_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started < 150
    out = proc.stdout
    assert f"{N} answered 2xx" in out
    for phrase in ("Verdict: ", "Generation: texts", "finish_reason agreement",
                   "semantic similarity (hashed-words)", "against the reference answers",
                   "Generation: timing and usage", "cost per 1,000",
                   "Generation: most different pairs", "→ get_weather("):
        assert phrase in out, phrase
    assert "stored without an assembled body" not in out
    assert "streamed answers: primary 0," not in out
    html = (demo_dir / "report.html").read_text()
    assert "Generation: most different pairs" in html and "<ins>" in html and "<svg" in html

    config = yaml.safe_load((demo_dir / "shadowproxy.yaml").read_text())
    route = config["routes"][0]
    ports = [int(config[k].rsplit(":", 1)[1]) for k in ("listen", "admin_listen")]
    ports += [int(u.rsplit(":", 1)[1]) for u in
              [route["primary"]["url"], *(s["url"] for s in route["shadows"])]]
    assert not [p for p in ports if _listening(p)]
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if str(demo_dir) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []

    url = start_embedded(demo_dir, cleanup="stop")
    try:
        assert asyncio.run(_recorded(url)) == {
            "requests": N, "streamed requests": True, "models": {("small", "large")},
            "labels": True, "streams timed and assembled": {("primary", True),
                                                            ("shadow", True)}}
    finally:
        _stop_embedded(demo_dir)


def test_generative_demo_refuses_a_bad_request_count(tmp_path: Path) -> None:
    """--requests 0 is a usage error (exit 2) before anything starts."""
    proc = _demo("--requests", "0", "--data-dir", str(tmp_path / "d"), timeout=30)
    assert proc.returncode == 2
    assert "--requests: expected 1 to" in proc.stderr
    assert not (tmp_path / "d").exists()
