"""The hourly summaries of the report's counts: made for settled hours, read by the report
with the rows of the rest of its window, removed by whatever writes into or prunes their
hours. On a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
import pytest

from shadowproxy.compare import sampling, summaries
from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.report import SCRATCH, build_report
from shadowproxy.compare.snapshot import Scope, snapshot
from shadowproxy.compare.window import Window
from shadowproxy.config import StorageConfig
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.rows import REQUEST_COLUMNS, RESPONSE_COLUMNS
from shadowproxy.store import rollups
from shadowproxy.store.maintenance import run_once
from shadowproxy.store.prune import prune_before
from tests.compare.records import Call, Exchange, insert
from tests.db import execute

COMPARE = {"prediction": "$.prediction"}


def hours_ago(h: float) -> datetime:
    """A time ``h`` hours ago. Records of the last ``SETTLE`` (15 minutes) are never in a
    summarized hour, whatever the minute of the hour the test runs at: the tests' recent
    records lie in the last 12 minutes."""
    return datetime.now(UTC) - timedelta(hours=h)


def traffic(n: int, start: datetime, span: timedelta, seed: int) -> list[Exchange]:
    """``n`` exchanges spread over ``span`` from ``start``: answers, 5xx, timeouts, a
    replayed target, two configuration versions, so that every count has something."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        at = start + span * float(rng.uniform())
        if i % 7 == 0:
            shadow = Call(None, status=None, latency_ms=None, error="timeout", kind="timeout")
        elif i % 11 == 0:
            shadow = Call({"error": "boom"}, status=503, latency_ms=float(rng.uniform(1, 9)))
        else:
            shadow = Call({"prediction": float(rng.normal())},
                          latency_ms=float(rng.uniform(5, 50)))
        primary = (Call(None, status=None, latency_ms=None, error="reset", kind="reset")
                   if i % 29 == 0 else
                   Call({"prediction": float(rng.normal())}, latency_ms=float(rng.uniform(2, 40))))
        replays = {"again": Call({"prediction": 1.0}, latency_ms=3.0)} if i % 13 == 0 else {}
        out.append(Exchange({"x": i}, primary, {"candidate": shadow}, replays,
                            received_at=at, config_version="v1" if i % 3 else "v2"))
    return out


async def exact(url: str, win: Window, shadow: str = "candidate",
                version: str | None = None) -> dict[str, Any]:
    """The report's exact parts: counts, the operational section, the versions."""
    conn = await asyncpg.connect(url)
    try:
        r = await build_report(conn, route="house-prices", shadow=shadow, window=win,
                               compare=CompareConfig.model_validate(COMPARE),
                               config_version=version)
    finally:
        await conn.close()
    return {"counts": r["counts"], "operational": r["operational"],
            "versions": r["meta"]["config_versions"]}


async def summarized_hours(url: str) -> list[datetime]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch(
            "SELECT hour FROM shadowproxy.rollup_hours WHERE requests > 0 ORDER BY 1")]
    finally:
        await conn.close()


async def roll_up(url: str) -> rollups.Rolled:
    conn = await asyncpg.connect(url)
    try:
        return await rollups.roll_up(conn)
    finally:
        await conn.close()


async def forget_all(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM shadowproxy.rollup_hours")
    finally:
        await conn.close()


def close(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-9 relative (sums added in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)
    return bool(a == b)


async def test_the_report_counts_the_same_from_summaries_and_from_rows(
        database_url: str) -> None:
    """Windows whose ends fall inside minutes and hours, across summarized hours and the
    unsummarized last hour: every count, rate, latency extreme and version is what the rows
    alone give, for every version selection and for the replayed target."""
    base = hours_ago(5).replace(minute=0, second=0, microsecond=0)
    await insert(database_url, traffic(1500, base, timedelta(hours=4), seed=1))
    await insert(database_url, traffic(200, hours_ago(0.2), timedelta(minutes=10), seed=2))
    rolled = await roll_up(database_url)
    assert rolled.hours >= 4 and rolled.requests == 1500
    windows = [Window(base + timedelta(minutes=17, seconds=31), hours_ago(0)),
               Window(base + timedelta(hours=1, seconds=0.5),
                      base + timedelta(hours=3, minutes=59, seconds=59.9)),
               Window(base + timedelta(minutes=61, seconds=7), base + timedelta(minutes=61,
                                                                               seconds=40))]
    cases = [(w, s, v) for w in windows for s, v in (("candidate", None), ("candidate", "v2"))]
    cases.append((windows[0], "candidate", "v1"))
    from_summaries = [await exact(database_url, w, s, v) for w, s, v in cases]
    await forget_all(database_url)
    from_rows = [await exact(database_url, w, s, v) for w, s, v in cases]
    for (w, s, v), a, b in zip(cases, from_summaries, from_rows, strict=True):
        assert close(a, b), (w, s, v, a, b)
    assert from_rows[0]["counts"]["pairs"] > 1000  # the windows hold what was inserted
    assert from_rows[0]["counts"]["replayed_pairs"] == 0


async def test_replayed_targets_are_counted_from_summaries_too(database_url: str) -> None:
    base = hours_ago(4).replace(minute=0, second=0, microsecond=0)
    await insert(database_url, traffic(600, base, timedelta(hours=2), seed=3))
    await roll_up(database_url)
    win = Window(base + timedelta(seconds=90), base + timedelta(hours=2, seconds=-45))
    a = await exact(database_url, win, "again")
    await forget_all(database_url)
    b = await exact(database_url, win, "again")
    assert close(a, b) and a["counts"]["replayed_pairs"] == a["counts"]["pairs"] > 20
    conn = await asyncpg.connect(database_url)
    try:
        replayed = await conn.fetchval("SELECT count(*) FROM shadowproxy.pairs "
                                       "WHERE shadow_role = 'replay'")
    finally:
        await conn.close()
    assert replayed > 0


async def test_only_settled_hours_are_summarized_once(database_url: str) -> None:
    """An hour is summarized once it ended ``SETTLE`` ago; the hour in progress is not;
    a second run finds nothing left; a summary that is wrong can be told from a test that
    reads the summary (a count written into the summary shows in the report)."""
    old = hours_ago(3).replace(minute=10)
    await insert(database_url, traffic(50, old, timedelta(minutes=30), seed=4))
    await insert(database_url, traffic(20, hours_ago(0.2), timedelta(minutes=10), seed=5))
    first = await roll_up(database_url)
    assert first.requests == 50
    assert await summarized_hours(database_url) == [rollups.hour_of(old)]
    second = await roll_up(database_url)
    assert (second.hours, second.requests) == (0, 0)
    win = Window(rollups.hour_of(old), rollups.hour_of(old) + timedelta(hours=1))
    await execute(database_url, "UPDATE shadowproxy.request_rollups SET requests = "
                                "requests + 1000 WHERE ctid = (SELECT min(ctid) FROM "
                                "shadowproxy.request_rollups)")
    assert (await exact(database_url, win))["counts"]["requests"] == 1050


def _rows(received_at: float, *, with_request: bool = True
          ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """A batch as the recorder writes it: a request and its primary's and shadow's answers
    (or, without the request, a replayed answer to a stored request)."""
    rid = uuid.uuid4()
    request = {"id": rid, "request_id": str(rid), "route": "house-prices",
               "received_at": received_at, "method": "POST", "path": "/predict", "query": "",
               "headers": "{}", "body": b"{}", "body_json": "{}", "body_size": 2,
               "body_truncated": False, "client_addr": None, "config_version": None}
    answers = []
    for target, role in ([("primary", "primary"), ("candidate", "shadow")] if with_request
                         else [("again", "replay")]):
        answers.append({"request": rid, "target": target, "role": role, "status": 200,
                        "headers": "{}", "body": b'{"prediction": 1}',
                        "body_json": '{"prediction": 1}', "body_size": 17,
                        "body_truncated": False, "latency_ms": 5.0, "error": None,
                        "started_at": received_at, "error_kind": None, "stream": None,
                        "received_at": received_at})
    return ([tuple(request[c] for c in REQUEST_COLUMNS)] if with_request else [],
            [tuple(a[c] for c in RESPONSE_COLUMNS) for a in answers])


async def test_a_late_batch_removes_the_summary_of_its_hour(database_url: str) -> None:
    """A batch with a record of a summarized hour (a spooled batch, a replayed answer)
    removes that hour's summary as it is written, through either of the writer's paths;
    the next run summarizes it again, with the record; a live batch leaves summaries be."""
    old = hours_ago(3).replace(minute=20)
    other = hours_ago(5).replace(minute=20)
    await insert(database_url, traffic(40, old, timedelta(minutes=5), seed=6))
    await insert(database_url, traffic(40, other, timedelta(minutes=5), seed=7))
    await roll_up(database_url)
    hour = rollups.hour_of(old)
    win = Window(hour, hour + timedelta(hours=1))
    before = (await exact(database_url, win))["counts"]["requests"]
    replayed_before = (await exact(database_url, win, "again"))["counts"]["pairs"]
    writer = PostgresWriter(database_url)
    try:
        await writer.write(*_rows(time.time()))  # live: nothing to remove
        assert len(await summarized_hours(database_url)) == 2
        await writer.write(*_rows(old.timestamp() + 60))
        assert await summarized_hours(database_url) == [rollups.hour_of(other)]
        assert (await exact(database_url, win))["counts"]["requests"] == before + 1
        await roll_up(database_url)
        await writer.write(*_rows(old.timestamp() + 61), checked=True)  # the checking path
        assert await summarized_hours(database_url) == [rollups.hour_of(other)]
        await roll_up(database_url)
        stored = await _a_request(database_url, hour)
        replayed = _rows(stored[1].timestamp(), with_request=False)[1]
        replayed = [(stored[0], *row[1:]) for row in replayed]
        await writer.write([], replayed)  # a replayed answer alone
        assert await summarized_hours(database_url) == [rollups.hour_of(other)]
    finally:
        await writer.close()
    rolled = await roll_up(database_url)
    assert rolled.hours == 1
    counts = (await exact(database_url, win, "again"))["counts"]
    assert counts["pairs"] == counts["replayed_pairs"] == replayed_before + 1
    assert (await exact(database_url, win))["counts"]["requests"] == before + 2


async def _waiting_for_locks(conn: asyncpg.Connection, n: int) -> None:
    """Until ``n`` sessions wait for an advisory lock."""
    for _ in range(500):
        if await conn.fetchval("SELECT count(*) FROM pg_locks "
                               "WHERE locktype = 'advisory' AND NOT granted") == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} sessions never waited for an advisory lock")


@pytest.mark.parametrize("first", ["batch", "summary"])
async def test_a_late_batch_and_a_summary_of_its_hour_see_each_other_under_repeatable_read(
        database_url: str, first: str) -> None:
    """With the database's default_transaction_isolation at REPEATABLE READ, a late batch
    (a spooled record of an hour that has just settled) written while the hour is being
    summarized is counted by the summary, or removes it, whichever of the two takes the
    lock first: the report counts the hour's requests as the rows do."""
    old = hours_ago(3).replace(minute=20)
    await insert(database_url, traffic(20, old, timedelta(minutes=5), seed=30))
    holder = await asyncpg.connect(database_url)
    summarizer: asyncpg.Connection | None = None
    writer = PostgresWriter(database_url)
    try:
        await holder.execute(
            f'ALTER DATABASE "{await holder.fetchval("SELECT current_database()")}" '
            "SET default_transaction_isolation = 'repeatable read'")
        summarizer = await asyncpg.connect(database_url)
        assert await summarizer.fetchval("SHOW transaction_isolation") == "repeatable read"
        tasks = {"batch": lambda: writer.write(*_rows(old.timestamp() + 60)),
                 "summary": lambda: rollups.roll_up(summarizer)}
        then = "summary" if first == "batch" else "batch"
        async with holder.transaction():  # both wait for the lock, `first` first
            await holder.execute("SELECT pg_advisory_xact_lock($1)", rollups.ROLLUP_LOCK)
            one = asyncio.create_task(tasks[first]())
            await _waiting_for_locks(holder, 1)
            two = asyncio.create_task(tasks[then]())
            await _waiting_for_locks(holder, 2)
        await asyncio.gather(one, two)
    finally:
        await writer.close()
        if summarizer is not None:
            await summarizer.close()
        await holder.close()
    hour = rollups.hour_of(old)
    counts = (await exact(database_url, Window(hour, hour + rollups.HOUR)))["counts"]
    assert counts["requests"] == 21 and counts["pairs"] == 21


async def _a_request(url: str, hour: datetime) -> tuple[uuid.UUID, datetime]:
    """A request of ``hour`` that has no answer of the replayed target ``again`` yet."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow("""
            SELECT id, received_at FROM shadowproxy.requests q
            WHERE received_at >= $1 AND received_at < $2
              AND NOT EXISTS (SELECT 1 FROM shadowproxy.responses r WHERE r.request = q.id
                              AND r.received_at = q.received_at AND r.target = 'again')
            LIMIT 1""", hour, hour + timedelta(hours=1))
    finally:
        await conn.close()
    assert row is not None
    return row[0], row[1]


async def test_prune_removes_the_summaries_of_what_it_removes(database_url: str) -> None:
    old = hours_ago(6).replace(minute=30)
    kept = hours_ago(2).replace(minute=30)
    await insert(database_url, traffic(30, old, timedelta(minutes=5), seed=8))
    await insert(database_url, traffic(30, kept, timedelta(minutes=5), seed=9))
    await roll_up(database_url)
    assert len(await summarized_hours(database_url)) == 2
    conn = await asyncpg.connect(database_url)
    try:
        await prune_before(conn, hours_ago(4))
    finally:
        await conn.close()
    assert await summarized_hours(database_url) == [rollups.hour_of(kept)]
    win = Window(hours_ago(8), hours_ago(1))
    assert (await exact(database_url, win))["counts"]["requests"] == 30


async def test_a_prune_cut_short_leaves_no_summary_of_what_it_removed(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prune` stopped by a partition it cannot lock (a long query on it: exit 1, "run it
    again") has dropped the partitions before that one: their hours' summaries went with
    them, so the report counts the records that are left, not those of the summaries."""
    from shadowproxy.errors import DatabaseError
    from shadowproxy.store.partitions import ensure, partitions, period_start
    from shadowproxy.store.prune import prune

    monkeypatch.setattr("shadowproxy.store.prune.LOCK_TIMEOUT", "200ms")
    conn = await asyncpg.connect(database_url)
    try:
        now = await conn.fetchval("SELECT now()")
        await ensure(conn, "day", now=now - timedelta(days=4), ahead=4)
    finally:
        await conn.close()
    for d in (4, 3, 2):  # a day's partition each
        await insert(database_url, traffic(10, period_start(now - timedelta(days=d), "day")
                                           + timedelta(hours=6), timedelta(minutes=5),
                                           seed=20 + d))
    await roll_up(database_url)
    held = await asyncpg.connect(database_url)
    try:
        third = [p.name for p in await partitions(held)][2]
        async with held.transaction():
            await held.execute(f"SELECT 1 FROM shadowproxy.{third} LIMIT 1")  # a report
            with pytest.raises(DatabaseError, match="lock timeout"):
                await prune(database_url, timedelta(days=1))
        stored = await held.fetchval("SELECT count(*) FROM shadowproxy.requests")
    finally:
        await held.close()
    assert stored == 10  # the two oldest partitions were dropped, the third one was not
    win = Window(now - timedelta(days=5), now)
    assert (await exact(database_url, win))["counts"]["requests"] == stored


async def test_the_maintenance_run_summarizes_settled_hours(database_url: str) -> None:
    old = hours_ago(3).replace(minute=5)
    await insert(database_url, traffic(25, old, timedelta(minutes=5), seed=10))
    outcome = await run_once(database_url, StorageConfig())
    assert outcome.rolled is not None and outcome.rolled.requests == 25
    assert await summarized_hours(database_url) == [rollups.hour_of(old)]


async def test_a_row_at_infinity_holds_no_summary_back(database_url: str) -> None:
    """A request at -infinity (or +infinity), in no hour, is left out: the hours of the
    others are summarized. The maintenance run failed on it (ValueError), every time."""
    old = hours_ago(3).replace(minute=5)
    await insert(database_url, traffic(25, old, timedelta(minutes=5), seed=10))
    await execute(database_url,
                  "INSERT INTO shadowproxy.requests (id, request_id, route, received_at, "
                  "method, path) VALUES (gen_random_uuid(), 'a', 'house-prices', '-infinity', "
                  "'GET', '/'), (gen_random_uuid(), 'b', 'house-prices', 'infinity', 'GET', '/')")
    outcome = await run_once(database_url, StorageConfig())
    assert outcome.rolled is not None and outcome.rolled.requests == 25
    assert await summarized_hours(database_url) == [rollups.hour_of(old)]


async def test_the_documented_query_of_hours_not_summarized_yet_in_any_time_zone(
        database_url: str) -> None:
    """docs/sql.md's query of the hours not summarized yet, in a session of a zone half an
    hour off UTC, lists only the hours that have not settled, not every hour of the day."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "sql.md").read_text()
    query = text[text.index("-- Hours not summarized yet"):]
    query = query[:query.index(";")]
    start = hours_ago(26)
    await insert(database_url, traffic(100, start, timedelta(hours=26), seed=40))
    await roll_up(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET TimeZone = 'Asia/Kolkata'")
        hours = [r[0] for r in await conn.fetch(query)]
        now = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    assert 1 <= len(hours) <= 2  # this hour, and the last one until it has settled
    assert all(h >= rollups.hour_of(now) - rollups.HOUR for h in hours)


def test_split_reads_whole_minutes_of_summarized_hours_and_rows_for_the_rest() -> None:
    from shadowproxy.compare.summaries import split

    h = datetime(2026, 12, 1, 10, tzinfo=UTC)
    start, end = h + timedelta(minutes=3, seconds=20), h + timedelta(hours=2, minutes=7)
    p = split(start, end, [h, h + timedelta(hours=1)])
    assert (p.first_minute, p.end_minute) == (h + timedelta(minutes=4),
                                              h + timedelta(hours=2, minutes=7))
    assert p.rows == [(start, h + timedelta(minutes=4)), (h + timedelta(hours=2), end)]
    p = split(start, end, [h + timedelta(hours=1)])
    assert p.hours == [h + timedelta(hours=1)]
    assert p.rows == [(start, h + timedelta(hours=1)), (h + timedelta(hours=2), end)]
    p = split(start, start + timedelta(seconds=20), [h])
    assert (p.hours, p.rows) == ([], [(start, start + timedelta(seconds=20))])


async def drawn(url: str, win: Window, max_pairs: int, seed: int = rollups.SAMPLE_SEED,
                version: str | None = None) -> list[str]:
    """The request ids of the report's sample of ``win`` (``sampling.draw``)."""
    conn = await asyncpg.connect(url)
    try:
        scope = Scope("house-prices", "candidate", win, CompareConfig.model_validate(COMPARE),
                      seed, version)
        async with snapshot(conn, scope, SCRATCH) as db:
            groups = await summaries.pair_groups(db)
            population = sum(int(g["n"]) for g in groups)
            await sampling.draw(db, population, population, max_pairs)
            return [str(r[0]) for r in await db.fetch(
                f"SELECT id FROM {sampling.SAMPLE_TABLE} ORDER BY k, id")]
    finally:
        await conn.close()


def draws_from_kept_keys(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """A list that says, for each draw from now on, whether it read the kept keys."""
    used: list[bool] = []
    candidates = sampling._candidates

    def spy(db: Any, kept: Any) -> str:
        used.append(kept is not None)
        return candidates(db, kept)

    monkeypatch.setattr(sampling, "_candidates", spy)
    return used


async def test_the_sample_from_kept_keys_is_the_sample_from_every_request(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each summarized hour keeps its smallest sample keys; the default sample of a window is
    drawn from them (and from the rows of its unsummarized part) and is exactly the sample
    drawn from every request: when the kept keys suffice, when an hour kept only some of its
    keys, and when they end before enough requests with a pair were found (half the
    requests of one hour have no pair with the shadow: the draw then reads every request)."""
    monkeypatch.setattr(rollups, "SAMPLE_KEYS", 300)
    base = hours_ago(5).replace(minute=0, second=0, microsecond=0)
    exchanges = traffic(2400, base, timedelta(hours=3), seed=11)
    for i, ex in enumerate(exchanges):
        if ex.received_at < base + timedelta(hours=1) and i % 2:
            ex.shadows = {}
    await insert(database_url, exchanges)
    await insert(database_url, traffic(300, hours_ago(0.2), timedelta(minutes=10), seed=12))
    await roll_up(database_url)
    used = draws_from_kept_keys(monkeypatch)
    cases = [(Window(base + timedelta(hours=1, minutes=13), hours_ago(0)), 200),
             (Window(base + timedelta(hours=1), base + timedelta(hours=3)), 250),
             (Window(base + timedelta(minutes=7), base + timedelta(minutes=50)), 280)]
    kept = [await drawn(database_url, w, n) for w, n in cases]
    v2 = await drawn(database_url, cases[1][0], 150, version="v2")
    uses = list(used)
    await forget_all(database_url)
    used.clear()
    every = [await drawn(database_url, w, n) for w, n in cases]
    assert v2 == await drawn(database_url, cases[1][0], 150, version="v2")
    assert used == [False] * len(used)
    for (w, n), a, b in zip(cases, kept, every, strict=True):
        assert a == b and len(a) == n, (w, n)
    # The first two from kept keys alone; the third fell back to every request.
    assert uses == [True, True, True, False, True]
    other_seed = await drawn(database_url, cases[0][0], 200, seed=7)
    assert len(other_seed) == 200 and other_seed != every[0]


async def test_kept_keys_are_read_only_as_far_as_each_hour_kept_them(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An hour that kept only its smallest keys, most of whose requests have no pair with
    the shadow, beside a small hour that kept all: the requests with a pair among the kept
    keys are too few, and the draw goes to every request rather than take the small hour's
    larger keys in place of the big hour's keys that were not kept."""
    monkeypatch.setattr(rollups, "SAMPLE_KEYS", 300)
    base = hours_ago(5).replace(minute=0, second=0, microsecond=0)
    big = traffic(2000, base, timedelta(minutes=50), seed=13)
    for i, ex in enumerate(big):
        if i % 10:
            ex.shadows = {}
    await insert(database_url, big)
    await insert(database_url, traffic(250, base + timedelta(hours=1), timedelta(minutes=50),
                                       seed=14))
    await roll_up(database_url)
    used = draws_from_kept_keys(monkeypatch)
    win = Window(base, base + timedelta(hours=2))
    kept = await drawn(database_url, win, 200)
    assert used == [True, False]
    await forget_all(database_url)
    assert kept == await drawn(database_url, win, 200)


def test_only_records_of_hours_that_may_be_summarized_are_late() -> None:
    """A record of an hour that ended less than 14 minutes before it is written (a long
    streamed answer, a slow batch) is not late: that hour cannot have been summarized, and
    is summarized after the write; one of an hour that ended longer ago is."""
    h = datetime(2026, 12, 1, 10, tzinfo=UTC).timestamp()
    now = h + 3600 + 13 * 60  # 10:00-11:00 ended 13 minutes ago
    assert rollups.late_hours([h + 5, h + 3599, now - 1], now=now) == []
    now = h + 3600 + 14 * 60
    assert rollups.late_hours([h + 5, h + 3599, now - 1], now=now) == [
        datetime(2026, 12, 1, 10, tzinfo=UTC)]
    assert rollups.late_hours([datetime(2026, 12, 1, 8, 30, tzinfo=UTC)], now=now) == [
        datetime(2026, 12, 1, 8, tzinfo=UTC)]
    assert not rollups.may_be_summarized(time.time() - 600, time.time() - 600 + 60)


async def test_a_run_summarizes_within_its_limits_and_the_next_goes_on(
        database_url: str) -> None:
    """At most ``max_hours`` per run, and no new hour once the budget is spent (at least
    one is always done); what is left is said (``more``) and done by the next runs."""
    for h in (9, 7, 5, 3):
        await insert(database_url, traffic(10, hours_ago(h).replace(minute=15),
                                           timedelta(minutes=5), seed=h))
    conn = await asyncpg.connect(database_url)
    try:
        first = await rollups.roll_up(conn, max_hours=2)
        second = await rollups.roll_up(conn, budget_s=0.0)
        rest = await rollups.roll_up(conn)
        again = await rollups.roll_up(conn)
    finally:
        await conn.close()
    assert (first.hours, first.more) == (2, True)  # 9 and 8 hours ago (8: no request)
    assert (second.hours, second.more) == (1, True)
    assert not rest.more and first.requests + second.requests + rest.requests == 40
    assert (again.hours, again.requests, again.more) == (0, 0, False)
    assert len(await summarized_hours(database_url)) == 4
