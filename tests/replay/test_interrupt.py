"""An interrupted replay (kill -9, Ctrl-C) resumes where it stopped and stores each answer once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import pytest
from aiohttp import web

from tests.db import execute, fetchval
from tests.replay.helpers import (
    ROUTE,
    answers,
    finish,
    replay,
    request,
    start_cli,
    store,
    write_config,
)
from tests.upstreams import Seen, model, serve, sleeping

pytestmark = pytest.mark.timeout(90)

N = 300


async def _started_replay(config: Path, to: str, *args: str) -> asyncio.subprocess.Process:
    return await start_cli("replay", "-c", str(config), "--route", ROUTE, "--to", to,
                           "--as", "cand", "--since", "1h", "--concurrency", "4", *args)


async def _wait_for_answers(url: str, n: int, proc: asyncio.subprocess.Process) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (count := await answers(url)) < n:
        assert proc.returncode is None, "the replay ended before it could be interrupted"
        assert loop.time() < deadline, f"only {count} answers stored"
        await asyncio.sleep(0.05)
    return count


def _ids(seen: list[Seen]) -> list[str]:
    return [s.headers["x-request-id"] for s in seen]


async def _stored_once_each(url: str) -> None:
    assert await fetchval(url, """
        SELECT count(*) = count(DISTINCT request) AND count(*) = $1
        FROM shadowproxy.responses WHERE target = 'cand'""", N) is True


async def test_after_kill_9_a_rerun_sends_only_what_was_not_stored(
        database_url: str, tmp_path: Path) -> None:
    """kill -9 mid-run loses only answers not yet stored; the rerun sends exactly the
    requests without an answer, and every request ends with one answer."""
    await store(database_url, [request(i) for i in range(N)])
    config = write_config(tmp_path, database_url)
    async with serve(sleeping(0.005, model("c"))) as target:
        proc = await _started_replay(config, target.url, "--rate", "150")
        await _wait_for_answers(database_url, 60, proc)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        stored = await answers(database_url)
        assert stored < N
        sent_before = len(target.seen)
        rerun = await replay(config, to=target.url)
        assert rerun.status == 0, rerun.err
        resent = _ids(target.seen[sent_before:])
    assert len(resent) == N - stored
    assert f"{stored} already answered by 'cand'" in rerun.out
    assert len(set(resent) | set(_ids(target.seen[:sent_before]))) == N
    await _stored_once_each(database_url)


async def test_ctrl_c_stores_what_was_sent_exits_130_and_the_rerun_finishes(
        database_url: str, tmp_path: Path) -> None:
    """SIGINT stops sending, stores the calls in flight, says how to resume and exits 130;
    the rerun sends only the rest."""
    await store(database_url, [request(i) for i in range(N)])
    config = write_config(tmp_path, database_url)
    async with serve(sleeping(0.005, model("c"))) as target:
        proc = await _started_replay(config, target.url, "--rate", "150")
        await _wait_for_answers(database_url, 30, proc)
        proc.send_signal(signal.SIGINT)
        result = await finish(proc)
        assert result.status == 130, result.err
        stored = await answers(database_url)
        assert len(target.seen) == stored  # every request sent was answered and stored
        rerun = await replay(config, to=target.url)
        assert rerun.status == 0, rerun.err
    assert "interrupted" in result.out and "to resume: the same command with --from" in result.out
    assert f"stored    {stored} answers" in result.out
    assert len(target.seen) == N
    await _stored_once_each(database_url)


async def test_a_second_ctrl_c_abandons_the_calls_in_flight_unstored(
        database_url: str, tmp_path: Path) -> None:
    """Twice Ctrl-C gives up calls the target does not answer: they are not stored (no
    'shutdown' answer in the database) and stay pending."""
    hung = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await request.read()
        hung.set()
        await asyncio.sleep(60)
        return web.Response()

    await store(database_url, [request(i) for i in range(5)])
    config = write_config(tmp_path, database_url)
    async with serve(hang) as target:
        proc = await _started_replay(config, target.url)
        await asyncio.wait_for(hung.wait(), 30)
        proc.send_signal(signal.SIGINT)
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        result = await finish(proc, timeout=30)
    assert result.status == 130, result.err
    assert "4 calls abandoned at the second Ctrl-C" in result.out
    assert await answers(database_url) == 0


async def test_a_second_replay_of_the_same_target_is_refused_while_one_runs(
        database_url: str, tmp_path: Path) -> None:
    """Two replays of one route as one name at once: the second exits 1 and says why."""
    await store(database_url, [request(i) for i in range(N)])
    config = write_config(tmp_path, database_url)
    async with serve(sleeping(0.005, model("c"))) as target:
        first = await _started_replay(config, target.url, "--rate", "20")
        await _wait_for_answers(database_url, 1, first)
        second = await replay(config, to=target.url)
        first.send_signal(signal.SIGINT)
        await finish(first)
    assert second.status == 1
    assert "another `shadowproxy replay` of route 'r' as 'cand' is running" in second.err


async def test_an_interrupted_force_redo_keeps_every_answer_and_runs_again_to_the_end(
        database_url: str, tmp_path: Path) -> None:
    """--force replaces an earlier answer in the transaction that stores the new one: Ctrl-C
    in the middle of redoing the failed answers (docs/replay.md's --where) leaves every
    request with one answer, new or as it was, and the same command run again redoes the
    rest. Deleted ahead of the send, the answers of the requests not yet sent were lost,
    and the rerun's --where, which reads them, found nothing."""
    await store(database_url, [request(i) for i in range(N)])
    config = write_config(tmp_path, database_url)
    redo = ("--force", "--where", "shadow_name = 'cand' AND shadow_error_kind IS NOT NULL")
    failed = ("SELECT count(*) FROM shadowproxy.responses "
              "WHERE target = 'cand' AND error_kind = 'timeout'")
    async with serve(model("c")) as target:
        first = await replay(config, to=target.url)
        assert first.status == 0, first.err
        await execute(database_url, "UPDATE shadowproxy.responses SET error_kind = 'timeout', "
                                    "error = 'timeout', status = NULL WHERE target = 'cand'")
        proc = await _started_replay(config, target.url, "--rate", "150", *redo)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while await fetchval(database_url, failed) > N - 30:
            assert proc.returncode is None and loop.time() < deadline
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        result = await finish(proc)
        assert result.status == 130, result.err
        await _stored_once_each(database_url)
        left = await fetchval(database_url, failed)
        assert 0 < left <= N - 30
        assert f"{N - left} earlier answers replaced (--force)" in result.out
        rerun = await replay(config, *redo, to=target.url)
        assert rerun.status == 0, rerun.err
    assert f"{left} requests selected" in rerun.out
    await _stored_once_each(database_url)
    assert await fetchval(database_url, failed) == 0


async def test_ctrl_c_pressed_again_and_again_ends_the_replay_without_a_traceback(
        database_url: str, tmp_path: Path) -> None:
    """An impatient operator: Ctrl-C, then Ctrl-C every 10 ms until the replay ends. The
    replay ends with its summary and exit status 130, and no Ctrl-C after the second
    interrupts its end (storing the answers) halfway with a KeyboardInterrupt."""
    await store(database_url, [request(i) for i in range(N)])
    config = write_config(tmp_path, database_url)
    async with serve(sleeping(0.005, model("c"))) as target:
        proc = await _started_replay(config, target.url, "--rate", "150")
        await _wait_for_answers(database_url, 30, proc)
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(ProcessLookupError):  # it ended between two
            while proc.returncode is None:
                await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGINT)
        result = await finish(proc)
    assert result.status == 130, result.err
    assert "Traceback" not in result.err, result.err
    assert "interrupted" in result.out
