"""``shadowproxy replay`` to a target that streams: its answers are assembled and timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.db import fetch
from tests.proxy.test_stream_capture import chat, chat_service
from tests.replay.helpers import replay, request, store, write_config

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
