"""Writing batches to PostgreSQL with COPY.

Normal path: one COPY per table straight into ``shadowproxy.requests`` and ``responses``
(JSON was validated by the encoder, so PostgreSQL parses each body once), also for spool
replays. Safe path, for a batch the normal path refused (a replayed batch part of which is
stored already, a value PostgreSQL refuses): COPY into temporary tables, then
``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` that re-checks every JSON text, so a
record already stored is skipped and one odd value cannot block a batch. Last resort, for a
batch that even the checking path refuses for a value in it (a text PostgreSQL cannot hold,
a value a constraint forbids): each record on its own, and one still refused is stored again
without its bodies and headers (``rows.without_bodies``), so that a bad record costs at
most itself, never its batch, and a spooled batch can never block the replay. One
connection, owned by the recorder's writer task.

Nothing a record holds reaches the log: PostgreSQL's errors are described by
``describe_error``, which leaves out the values it would quote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from itertools import chain
from operator import itemgetter
from typing import Any, NoReturn

import asyncpg

from shadowproxy.errors import DatabaseError, MigrationError, MigrationsBusyError
from shadowproxy.recorder.copyrows import YieldingRows
from shadowproxy.recorder.pgtime import timestamptz_from_pg, timestamptz_to_pg
from shadowproxy.recorder.rows import (
    REQUEST_COLUMNS,
    RESPONSE_COLUMNS,
    Row,
    Withheld,
    without_bodies,
)
from shadowproxy.store import rollups
from shadowproxy.store.database import (
    RECORDER_LOCK_HINT,
    RECORDER_LOCK_TIMEOUT_S,
    ConnectionProblem,
    classify,
    describe,
    describe_error,
    quiet_cut_waiters,
)
from shadowproxy.store.migrate import apply as apply_migrations

log = logging.getLogger("shadowproxy.recorder")

_REQUEST_RECEIVED = itemgetter(REQUEST_COLUMNS.index("received_at"))
_RESPONSE_RECEIVED = itemgetter(RESPONSE_COLUMNS.index("received_at"))
_ROLE = RESPONSE_COLUMNS.index("role")
_TARGET = RESPONSE_COLUMNS.index("target")

# A replayed answer replaces the target's earlier replayed answer to the same request, in
# the transaction that stores it (``replay --force``): an earlier answer deleted ahead of
# its request's sending was lost when the run was stopped before the new one was stored.
# A live shadow's answers are never replaced. $3/$4 bound the partitions searched.
_REPLACE_REPLAYED = """
DELETE FROM shadowproxy.responses r
USING unnest($1::uuid[], $2::text[]) AS d(request, target)
WHERE r.request = d.request AND r.target = d.target AND r.role = 'replay'
  AND r.received_at BETWEEN $3 AND $4
"""

_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS _sp_requests (
    id uuid, request_id text, route text, received_at timestamptz, method text, path text,
    query text, headers text, body bytea, body_json text, body_size bigint,
    body_truncated boolean, client_addr text, config_version text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _sp_responses (
    request uuid, target text, role text, status int, headers text, body bytea,
    body_json text, body_size bigint, body_truncated boolean, latency_ms double precision,
    error text, started_at timestamptz, error_kind text, stream text, received_at timestamptz
) ON COMMIT DELETE ROWS;
"""

# PostgreSQL 16+ checks JSON validity inline (pg_input_is_valid); older servers call the
# migration's plpgsql try_jsonb, which catches the parse error instead.
_JSON_INLINE = "CASE WHEN pg_input_is_valid({0}, 'jsonb') THEN {0}::jsonb END"
_JSON_FUNCTION = "shadowproxy.try_jsonb({0})"

_INSERT_REQUESTS = """
INSERT INTO shadowproxy.requests ({columns})
SELECT id, request_id, route, received_at, method, path, query,
       COALESCE({headers}, '{{}}'::jsonb), body, {body_json}, body_size, body_truncated,
       client_addr, config_version
FROM _sp_requests
ON CONFLICT (id, received_at) DO NOTHING
"""

# A response row of a spool file from before partitioning whose request is not in its
# batch (a replayed answer) has no received_at: its request's, looked up (one probe of the
# primary key's leading column per partition); else the call's own start, so that the
# answer of a request pruned meanwhile is still stored rather than refused.
_INSERT_RESPONSES = """
INSERT INTO shadowproxy.responses ({columns})
SELECT request, target, role, status, {headers}, body, {body_json}, body_size,
       body_truncated, latency_ms, error, started_at, error_kind, {stream},
       COALESCE(r.received_at, (SELECT q.received_at FROM shadowproxy.requests q
                                WHERE q.id = r.request LIMIT 1), r.started_at, now())
FROM _sp_responses r
ON CONFLICT (request, target, received_at) DO NOTHING
"""


# What a write locks on the records' parent tables (COPY and INSERT take ROW EXCLUSIVE),
# taken and let go at once: a lock that another session holds on them makes it wait, up to
# the lock wait given (milliseconds).
_WRITE_LOCKS = ("BEGIN; SET LOCAL lock_timeout = '{wait_ms}ms'; LOCK TABLE ONLY "
                "shadowproxy.requests, shadowproxy.responses IN ROW EXCLUSIVE MODE; ROLLBACK")

_CHECK_ANSWER_S = 1.0
"""Of a check's time, what is kept for the database's answers besides the lock's wait."""

_YIELD_EVERY = 32

# What PostgreSQL or the driver raise for a value in a record (not for the connection):
# data exceptions (22), constraint violations (23), program limits (54), and the driver's
# own encoding errors (ValueError, TypeError, UnicodeEncodeError).
_VALUE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError, ValueError, TypeError)
REFUSED = "refused"
"""Why a record was stored without its bodies: PostgreSQL refused a value in it."""

def _forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of a refusal the writer handled. The exception stays referenced
    by the driver's task that raised it, and its traceback's frames hold that task and the
    whole batch: a reference cycle per refused batch, which only the cyclic collector frees
    (``cycles.py`` runs it once a minute, and a minute of such batches made it stop the
    loop for about a second). Without the frames, reference counting frees it all at once."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__


def _records(rows: list[Row]) -> list[Row] | YieldingRows:
    """What to COPY: a batch of a few slices as it is (asyncpg encodes a list in one go, in
    well under a millisecond, and iterating costs more per row);
    a larger one, the backlog after a pause, a few rows per turn of the loop."""
    return rows if len(rows) <= 4 * _YIELD_EVERY else YieldingRows(rows, _YIELD_EVERY)


def _late_hours(requests: list[Row], responses: list[Row]) -> list[datetime]:
    """The hours whose summaries a batch makes wrong (``store/rollups.py``): none for a live
    batch, whose hours cannot have been summarized yet; checked on the oldest record with one
    pass at C speed, the hours themselves found only for a batch that has records of earlier
    hours (spooled, replayed). A response row of a spool file from before partitioning may carry no
    ``received_at`` (PostgreSQL takes its request's): it is skipped."""
    received = chain(map(_REQUEST_RECEIVED, requests), map(_RESPONSE_RECEIVED, responses))
    try:
        oldest = min(received, default=None)
    except TypeError:  # datetimes of older spool files beside Unix seconds, or None
        pass
    else:
        if oldest is None:
            return []
        seconds = oldest.timestamp() if isinstance(oldest, datetime) else oldest
        if not rollups.may_be_summarized(seconds, time.time()):
            return []
    return rollups.late_hours(
        at for at in chain(map(_REQUEST_RECEIVED, requests), map(_RESPONSE_RECEIVED, responses))
        if at is not None)


async def _replace_replayed(conn: asyncpg.Connection, responses: list[Row]) -> int:
    """Delete the earlier replayed answers the batch's replayed answers replace; how many.
    A batch without replayed answers (every live one) costs a scan of its roles."""
    replays = [row for row in responses if row[_ROLE] == "replay"]
    if not replays:
        return 0
    times = [t for t in map(_RESPONSE_RECEIVED, replays) if t is not None]
    if not times:  # rows of a spool file from before partitioning: nothing to bound by
        return 0
    result: str = await conn.execute(
        _REPLACE_REPLAYED, [row[0] for row in replays], [row[_TARGET] for row in replays],
        min(times), max(times))
    return int(result.rsplit(" ", 1)[1])


class PostgresWriter:
    """Writes (request rows, response rows) batches over one connection, reconnecting."""

    def __init__(self, url: str, *, timeout: float = 15.0) -> None:
        self.url = url
        self.timeout = timeout
        self._conn: asyncpg.Connection | None = None
        self._insert_requests = ""
        self._insert_responses = ""
        self.withheld: list[Withheld] = []
        """Records stored without their bodies, since the caller last emptied the list."""
        self.unstorable: list[str] = []
        """Request ids of records refused even without their bodies (not stored)."""
        self.replaced = 0
        """Earlier replayed answers replaced by the replayed answers written (``replay
        --force``), since this writer began."""
        self._busy: asyncpg.Connection | None = None
        """The connection a bounded piece of work (``_deadline``) waits on, if any."""
        self._cut_why: str | None = None
        """Why that work's connection was cut, once it was."""
        self.already_stored = 0
        """Records of the last batch written that the checking path skipped because the
        database held them already (a spooled batch replayed again after a stop between
        its COPY and the deletion of its segment): not stored, nor to be counted, twice."""

    @contextlib.contextmanager
    def _deadline(self, conn: asyncpg.Connection, timeout: float | None = None
                  ) -> Iterator[None]:
        """Bound the work of the block on ``conn`` by ``timeout`` (the writer's unless
        given): past it the connection is cut (``cut``), which fails whatever waits on it
        at once, and the block raises TimeoutError. Not a cancellation
        (``asyncio.wait_for``): a write cancelled inside its transaction rolls it back on
        the same connection, and a database that stopped answering (a network partition:
        the socket open, nothing coming back) never answers the ROLLBACK, so the cancelled
        write, and every batch behind it, waited for ever."""
        timeout = self.timeout if timeout is None else timeout
        self._busy, self._cut_why = conn, None
        timer = asyncio.get_running_loop().call_later(
            timeout, self.cut, f"no answer from the database within {timeout:g} s")
        try:
            yield
        except Exception as exc:
            if self._cut_why is not None:
                raise TimeoutError(self._cut_why) from exc
            raise
        finally:
            timer.cancel()
            self._busy = None

    def cut(self, why: str) -> None:
        """Drop the connection now: the work on it fails with TimeoutError(``why``) (a
        timeout, or a stop's grace that ran out), and the next use connects anew."""
        self._cut_why = why
        for conn in (self._busy, self._conn):
            if conn is not None and not conn.is_closed():
                quiet_cut_waiters(asyncio.get_running_loop())
                protocol = getattr(conn, "_protocol", None)  # (terminate lets go of it)
                conn.terminate()
                if protocol is not None:
                    # A COPY waiting for room to write (a database that stopped reading
                    # it, busy or behind a partition: the socket's buffers full) waits on
                    # the driver's flow control, which neither asyncpg nor the loop lifts
                    # when the connection is aborted: the COPY waited for ever, holding
                    # the writer, a stop, and every batch behind it. Lifted, it finds the
                    # connection gone and fails.
                    protocol.resume_writing()

    async def _connection(self, timeout: float | None = None) -> asyncpg.Connection:
        """The writer's connection, connected within ``timeout`` (the writer's unless given)
        when there is none. Making it ready (the migrations, on a new database) has the
        writer's whole timeout: a database that answered the connection is up, and a first
        migration on a slow disk can take a few seconds."""
        conn = self._conn
        if conn is None or conn.is_closed():
            try:
                conn = await asyncpg.connect(self.url, timeout=timeout or self.timeout)
            except TimeoutError as exc:  # (which says nothing of its own)
                raise TimeoutError("no answer from the database within "
                                   f"{timeout or self.timeout:g} s") from exc
            try:
                with self._deadline(conn):
                    await self._prepare(conn)
            except BaseException:
                conn.terminate()  # not kept, so never closed otherwise
                raise
            self._conn = conn
        return conn

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        """Make a new connection ready to write: the schema, codecs, temporary tables.
        Its statements wait ``RECORDER_LOCK_TIMEOUT_S`` at most for another session's
        lock (a statement, not a startup parameter, which PgBouncer refuses)."""
        await conn.execute(f"SET lock_timeout = '{round(RECORDER_LOCK_TIMEOUT_S * 1000)}ms'")
        # A database that was down at start-up may never have been migrated.
        try:
            await apply_migrations(conn)
        except (MigrationError, asyncpg.LockNotAvailableError) as exc:
            self._lock_waited(exc)
        await conn.set_type_codec("timestamptz", schema="pg_catalog", format="tuple",
                                  encoder=timestamptz_to_pg, decoder=timestamptz_from_pg)
        await conn.execute(_TEMP_TABLES)
        check = (_JSON_INLINE if conn.get_server_version().major >= 16
                 else _JSON_FUNCTION)
        self._insert_requests = _INSERT_REQUESTS.format(
            columns=", ".join(REQUEST_COLUMNS), headers=check.format("headers"),
            body_json=check.format("body_json"))
        self._insert_responses = _INSERT_RESPONSES.format(
            columns=", ".join(RESPONSE_COLUMNS), headers=check.format("headers"),
            body_json=check.format("body_json"), stream=check.format("stream"))

    def _lock_waited(self, exc: MigrationError | asyncpg.LockNotAvailableError) -> NoReturn:
        """Say which lock held the migrations up, and what becomes of the records; raise
        ``exc`` itself if it was not a lock's wait."""
        wait = f"{RECORDER_LOCK_TIMEOUT_S:g} s"
        if not isinstance(exc, MigrationsBusyError):  # a migration's statement waited
            lock = exc if isinstance(exc, asyncpg.LockNotAvailableError) else exc.__cause__
            if not isinstance(lock, asyncpg.LockNotAvailableError):
                raise exc
            raise DatabaseError(f"could not apply the schema migrations on {describe(self.url)}: "
                                f"{describe_error(lock)}: "
                                f"{RECORDER_LOCK_HINT.format(wait=RECORDER_LOCK_TIMEOUT_S)}"
                                ) from exc
        by = f" (PostgreSQL backend {exc.holder})" if exc.holder is not None else ""
        raise DatabaseError(
            f"another process{by} held the schema migrations' lock for longer than the "
            f"recorder waits for it ({wait}): `shadowproxy migrate`, or a proxy or replay "
            "starting, applying them; records go to the spool until it has finished, and are "
            "stored then") from exc

    async def write(self, requests: list[Row], responses: list[Row], *,
                    checked: bool = False) -> None:
        """Store one batch in one transaction; DatabaseError if it could not be stored.

        COPY straight into the tables first; a batch part of which is stored already (a
        spooled batch replayed twice) or which holds a value PostgreSQL refuses takes the
        checking path (COPY into temporary tables, then ``INSERT … ON CONFLICT DO NOTHING``).
        ``checked=True`` takes the checking path directly (the recorder's replays do not:
        COPY is the cheaper way for a batch none of which is stored yet). Whatever goes
        wrong with the database surfaces as DatabaseError with the connection dropped: the
        recorder then spools the batch, so an unexpected driver state can delay a record but
        never lose it. A value PostgreSQL refuses costs only its own record's bodies
        (``withheld``), or, refused even without them, that record (``unstorable``).
        """
        self.already_stored = 0
        if not checked:
            try:
                await self._copy(requests, responses)
                return
            except asyncpg.UniqueViolationError as exc:
                _forget_frames(exc)  # part of the batch is there already: the idempotent
                # path skips it
            except _VALUE_ERRORS as exc:
                # A JSON text PostgreSQL refused (a client's malformed body, say): keep the
                # batch, with that value's JSON left NULL, through the checking path. Not
                # an operator's concern, and a client could send one with every request.
                log.debug("a batch of %d records was refused by COPY (%s); storing it "
                          "through the checking path", len(requests), describe_error(exc))
                _forget_frames(exc)
            except Exception as exc:  # every failure means: spool the batch
                await self._failed(exc)
        try:
            self.already_stored += await self._insert_checked(requests, responses)
            return
        except _VALUE_ERRORS as exc:
            log.debug("a batch of %d records was refused by the checking path (%s); storing "
                      "its records one by one", len(requests), describe_error(exc))
            _forget_frames(exc)
        except Exception as exc:  # every failure means: spool the batch
            await self._failed(exc)
        try:
            await self._insert_each(requests, responses)
        except Exception as exc:  # every failure means: spool the batch (stored rows skip)
            await self._failed(exc)

    async def _insert_each(self, requests: list[Row], responses: list[Row]) -> None:
        """Each record in its own transaction; one still refused goes in without its bodies
        and headers, and one refused even so is given up (its request id is logged)."""
        answers: dict[Any, list[Row]] = {}
        for row in responses:
            answers.setdefault(row[0], []).append(row)
        for request in requests:
            mine = answers.get(request[0], [])
            try:
                self.already_stored += await self._insert_checked([request], mine)
                continue
            except _VALUE_ERRORS as exc:
                _forget_frames(exc)
            bare = without_bodies(request, REQUEST_COLUMNS)
            bare_answers = [without_bodies(row, RESPONSE_COLUMNS) for row in mine]
            request_id = str(bare[REQUEST_COLUMNS.index("request_id")])
            try:
                skipped = await self._insert_checked([bare], bare_answers)
                if skipped:  # stored so by an earlier replay of its batch: noted then
                    self.already_stored += skipped
                else:
                    self.withheld.append(Withheld(request_id, "request", REFUSED))
            except _VALUE_ERRORS as exc:
                log.error("a record refused by PostgreSQL even without its bodies was not "
                          "stored (%s)", describe_error(exc), extra={"request_id": request_id})
                self.unstorable.append(request_id)

    async def _failed(self, exc: BaseException) -> NoReturn:
        await self._drop_connection()
        hint = (f": {RECORDER_LOCK_HINT.format(wait=RECORDER_LOCK_TIMEOUT_S)}"
                if isinstance(exc, asyncpg.LockNotAvailableError) else "")
        raise DatabaseError(f"could not write to {describe(self.url)}: "
                            f"{describe_error(exc)}{hint}") from exc

    async def _copy(self, requests: list[Row], responses: list[Row]) -> None:
        conn = await self._connection()
        with self._deadline(conn):
            await self._copy_on(conn, requests, responses)

    async def _copy_on(self, conn: asyncpg.Connection, requests: list[Row],
                       responses: list[Row]) -> None:
        # At the summaries' isolation, named by the BEGIN itself: no round trip more.
        async with conn.transaction(isolation=rollups.ISOLATION):
            await conn.copy_records_to_table("requests", schema_name="shadowproxy",
                                             records=_records(requests),
                                             columns=REQUEST_COLUMNS)
            if responses:
                replaced = await _replace_replayed(conn, responses)
                await conn.copy_records_to_table("responses", schema_name="shadowproxy",
                                                 records=_records(responses),
                                                 columns=RESPONSE_COLUMNS)
            await rollups.invalidate(conn, _late_hours(requests, responses))
        if responses:
            self.replaced += replaced

    async def _insert_checked(self, requests: list[Row], responses: list[Row]) -> int:
        """Store a batch through temporary tables, skipping what is stored already; the
        number of requests skipped (counted once the transaction has committed)."""
        conn = await self._connection()
        with self._deadline(conn):
            return await self._insert_checked_on(conn, requests, responses)

    async def _insert_checked_on(self, conn: asyncpg.Connection, requests: list[Row],
                                 responses: list[Row]) -> int:
        async with conn.transaction(isolation=rollups.ISOLATION):
            await conn.copy_records_to_table("_sp_requests", records=requests,
                                             columns=REQUEST_COLUMNS)
            if responses:
                await conn.copy_records_to_table("_sp_responses", records=responses,
                                                 columns=RESPONSE_COLUMNS)
            inserted = await conn.execute(self._insert_requests)  # "INSERT 0 <rows>"
            replaced = 0
            if responses:
                replaced = await _replace_replayed(conn, responses)
                await conn.execute(self._insert_responses)
            await rollups.invalidate(conn, _late_hours(requests, responses))
        self.replaced += replaced
        return len(requests) - int(inserted.rsplit(" ", 1)[1])

    async def check(self, timeout: float | None = None) -> ConnectionProblem | None:
        """None if the database takes writes now (connected, migrated, and no other session
        holds a lock on the tables that a write needs), else why not; within ``timeout``
        for each step (the writer's unless given), the lock's wait included."""
        try:
            conn = await self._connection(timeout)
            # The locks a write takes first, in a transaction rolled back, waiting as a
            # write does (RECORDER_LOCK_TIMEOUT_S, less for a shorter check): `SELECT 1`
            # answered under another session's lock (an open transaction, a VACUUM FULL),
            # the replay said the database was back, and its first write failed on the lock
            # again, every few seconds for as long as it was held. One round trip; an
            # error leaves the transaction aborted, and the connection is dropped below.
            # Run by the replay's retries and at the start, never per batch.
            # The lock's wait fits in the check's time: a start waits START_CHECK_S at most
            # for a database that does not answer, whatever holds it up.
            bound = timeout or self.timeout
            wait = max(0.1, min(RECORDER_LOCK_TIMEOUT_S, bound - _CHECK_ANSWER_S))
            with self._deadline(conn, bound):
                try:
                    await conn.execute(_WRITE_LOCKS.format(wait_ms=round(wait * 1000)))
                except asyncpg.LockNotAvailableError as exc:
                    await self._failed(exc)  # said as a write's wait is: which lock, what to do
            return None
        except Exception as exc:  # any failure: not usable now; the kind says if it may pass
            await self._drop_connection()
            return classify(exc)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection politely within ``timeout`` seconds, else cut it."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):  # asyncpg cuts it if closing politely fails
                await conn.close(timeout=timeout)
