"""``shadowproxy replay`` to a target that streams: its answers are assembled and timed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.db import fetch
from tests.proxy.test_stream_capture import chat, chat_service
from tests.replay.helpers import replay, request, store, write_config
from tests.upstreams import serve

pytestmark = pytest.mark.timeout(60)


async def test_a_replayed_streamed_answer_is_assembled_and_timed(
        database_url: str, tmp_path: Path) -> None:
    """Recorded streamed chat requests replayed to the example chat service: each stored
    answer has the unstreamed shape in ``body_json`` and its timing in ``stream``."""
    prompts = ["How should I think about caching?", "Give me one tip about queues."]
    await store(database_url, [
        request(i, path="/v1/chat/completions", body=chat(prompt, stream=True))
        for i, prompt in enumerate(prompts)])
    config = write_config(tmp_path, database_url)
    async with chat_service() as target:
        result = await replay(config, to=target, name="cand")
        assert result.status == 0, result.err
    rows = await fetch(database_url, """
        SELECT request_id, shadow_body_json::text AS j, r.stream::text AS s, r.body
        FROM shadowproxy.pairs p JOIN shadowproxy.responses r
             ON r.request = p.id AND r.target = p.shadow_name
        WHERE p.shadow_name = 'cand' ORDER BY request_id""")
    assert len(rows) == len(prompts)
    for row in rows:
        answer, timing = json.loads(row["j"]), json.loads(row["s"])
        assert row["body"].startswith(b"data: ")
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert timing["token_chunks"] == answer["usage"]["completion_tokens"] > 0
        assert timing["ttft_ms"] >= 20.0 and timing["interrupted"] is False


async def test_a_target_streaming_without_end_is_cut_at_max_duration(
        database_url: str, tmp_path: Path) -> None:
    """A target whose stream never ends (a piece every 0.1 s, within ``--timeout``) is cut
    at ``--max-duration``: the replay ends with the answer stored as a timeout, instead of
    waiting as long as the stream goes on."""
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):  # cut by the replay
            for i in range(300):  # 30 s: the test's bound, far past the replay's
                await resp.write(b'data: {"i": %d}\n\n' % i)
                await asyncio.sleep(0.1)
        return resp

    await store(database_url, [request(0)])
    config = write_config(tmp_path, database_url)
    async with serve(endless) as target:
        started = time.monotonic()
        result = await replay(config, "--timeout", "0.5", "--max-duration", "1.5",
                              to=target.url, timeout=20.0)
        assert result.status == 0, result.err
        assert time.monotonic() - started < 15
    rows = await fetch(database_url, "SELECT error_kind, error, body FROM shadowproxy.responses"
                                     " WHERE target = 'cand'")
    assert [(r["error_kind"], r["error"]) for r in rows] == [
        ("timeout", "timeout: still answering after max_duration_s (1.5 s)")]
    assert rows[0]["body"].startswith(b'data: {"i": 0}')


async def test_max_duration_shorter_than_timeout_is_refused(
        database_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, database_url)
    result = await replay(config, "--timeout", "30", "--max-duration", "10",
                          to="http://127.0.0.1:9")
    assert result.status == 2
    assert ("--max-duration (10) is shorter than --timeout (30): it bounds each whole call, "
            "so it is at least the time allowed to the answer's head") in result.err


async def test_a_max_duration_that_is_not_a_number_is_refused(
        database_url: str, tmp_path: Path) -> None:
    """--max-duration nan is a usage error, as --timeout nan is; it passed the check against
    --timeout and cut every streamed answer at its first quiet --timeout, stored as
    "still answering after max_duration_s (nan s)"."""
    config = write_config(tmp_path, database_url)
    result = await replay(config, "--max-duration", "nan", to="http://127.0.0.1:9")
    assert result.status == 2
    assert "--max-duration: expected a number above 0 (got nan)" in result.err


@pytest.mark.parametrize(("flag", "expected"), [
    ("--timeout", "--timeout: expected a finite number of seconds (got inf): a target that "
                  "never answers would hold its call for ever"),
    ("--max-duration", "--max-duration: expected a finite number of seconds (got inf)"),
    ("--rate", "--rate: expected a finite number (got inf); leave --rate out to send as "
               "fast as --concurrency allows"),
    ("--speed", "--speed: expected a finite number (got inf); leave --speed out"),
])
@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_an_infinite_bound_or_pace_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              flag: str, expected: str, value: str) -> None:
    """Infinity is a usage error, naming the flag and what to write: a call of --timeout or
    --max-duration inf waited for a silent target for ever; a --rate or --speed of it is
    no pace at all."""
    from shadowproxy.cli import main

    argv = ["replay", "-c", str(tmp_path / "unread.yaml"), "--route", "r",
            "--to", "http://127.0.0.1:9", "--as", "cand", flag, value]
    if flag == "--timeout":
        argv += ["--max-duration", "1e300"]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
