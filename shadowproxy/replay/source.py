"""The replay's SQL: which recorded requests, what they hold, streamed with a cursor.

The selection is the route's requests in the window, oldest first (by ``received_at``, then
``id``), that match ``--where``, cut after the first ``--limit``; of these, the *pending*
ones have no answer from the target yet (all of them with ``--force``). Applying the limit
before the pending filter is what makes a rerun resume the same selection instead of taking
the next N.

The selection is fixed when the replay starts (``Selection.fix``): the keys of its requests,
as the database holds them then, go to a temporary table of the replay's session, and the
preflight and the stream read through it. Requests recorded while the replay runs are not
part of it, whether new traffic (a ``--to`` later than now) or a request received before
the start whose record arrives later (a slow shadow, the spool): the stream renews its
transaction and would see them, and the run would handle more than the preflight counted.
The table costs the database one row per selected request (a key, about 60 bytes with its
index, in the session's temporary buffers and files) for the replay's duration.

``--where`` is the operator's own SQL, a condition over the columns of ``shadowproxy.pairs``.
It runs inside a READ ONLY transaction (a write anywhere in it is refused by PostgreSQL), in
one prepared statement (no second statement can follow it), on its own line (a ``--``
comment in it ends there). A request matches when any of its rows does; requests without
any shadow or replayed answer have one row, with the shadow columns NULL, so that
``primary_status = 200`` also selects requests of a route that never had a shadow.

Streaming: a server-side cursor in a READ ONLY transaction, fetched a bounded number of
bytes at a time. The transaction is renewed every ``RENEW_AFTER_S`` seconds, continuing after
the last row read, so that a replay of days holds no snapshot (and no vacuum) for long.

The pending filter is one probe of the ``responses`` primary key (request, target,
received_at) per request of the window, in the partition of the request's time (responses
carry their request's ``received_at``): its cost follows the window, not the table.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from shadowproxy.errors import DatabaseError, UsageError
from shadowproxy.replay.options import ReplayOptions
from shadowproxy.replay.outgoing import NOT_CARRIED
from shadowproxy.store.database import CONNECTION_ERRORS, placeholders, reason

REDACTED_RE = r"^\[redacted\](, \[redacted\])*$"
"""A header value the recorder redacted (repeated headers are joined with ", ")."""
REDACTED_QUERY_RE = r"(^|[&;])[^&;=]*=\[redacted\]($|[&;])"
"""A query parameter whose value the recorder redacted (``recorder/query.py``)."""

SELECTION_TABLE = "pg_temp.shadowproxy_replay_selection"
"""The keys of the selection's requests, fixed at the start (``Selection.fix``)."""

RENEW_AFTER_S = 30.0
READ_AHEAD_BYTES = 8 * 1024 * 1024
MAX_FETCH_ROWS = 1000
LOCK_WAIT_S = 5.0
_FIRST_ROW_GUESS = 16 * 1024

# The columns of shadowproxy.pairs (migration 005), with a LEFT JOIN for the shadows so that
# a request without any shadow answer has a row too. tests/replay check that the columns
# are those of the view.
PAIRS_ROWS = """
SELECT q.id, q.request_id, q.route, q.received_at, q.method, q.path,
       q.body_json AS request_body_json,
       p.status AS primary_status, p.body_json AS primary_body_json,
       p.latency_ms AS primary_latency_ms, p.error AS primary_error,
       s.target AS shadow_name, s.status AS shadow_status, s.body_json AS shadow_body_json,
       s.latency_ms AS shadow_latency_ms, s.error AS shadow_error,
       q.config_version, p.error_kind AS primary_error_kind, s.role AS shadow_role,
       s.error_kind AS shadow_error_kind
FROM shadowproxy.requests q
LEFT JOIN shadowproxy.responses s
    ON s.request = q.id AND s.received_at = q.received_at AND s.role IN ('shadow', 'replay')
LEFT JOIN shadowproxy.responses p
    ON p.request = q.id AND p.received_at = q.received_at AND p.role = 'primary'
"""

STREAM_COLUMNS = ("_sp_q.id, _sp_q.request_id, _sp_q.received_at, _sp_q.method, _sp_q.path, "
                  "_sp_q.query, _sp_q.headers, _sp_q.body, _sp_q.body_json, "
                  "_sp_q.body_truncated, _sp_q.client_addr")

Key = tuple[datetime, UUID]
"""A request's place in the replay order: (received_at, id)."""


class _Params:
    """Numbered query parameters, added as the SQL is written."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


@dataclass(frozen=True)
class Preflight:
    """What the selection holds, said before anything is sent."""

    selected: int
    answered: int
    """Requests of the selection that already have an answer from the target."""
    live: int
    """Of those, requests answered by a live shadow of that name: never redone."""
    pending: int
    """Requests this run will handle (not answered yet; with --force all but ``live``)."""
    truncated: int
    """Pending requests whose body was truncated at recording: they cannot be replayed."""
    no_json: int
    """Pending requests without a JSON body (they matter with --set-json)."""
    redacted_json: int
    """Pending requests whose JSON body holds "[redacted]" values (recording.redact_json)."""
    redacted_requests: int
    """Pending requests with a header stored as "[redacted]" that --set-header does not give."""
    redacted_headers: dict[str, int] = field(default_factory=dict)
    """Header name → pending requests that have it stored as "[redacted]"."""
    redacted_query: int = 0
    """Pending requests whose query holds a parameter stored as "[redacted]"
    (recording.redact_query): sent as stored, nothing can give it a value."""
    encoded_no_json: int = 0
    """Pending requests with a content-encoded body but no ``body_json``: JSON only if it
    decodes to JSON (the recorder's decoding stops at ``max_decompressed_bytes``)."""
    unread_json: int = 0
    """Pending requests with a plain body that begins as JSON does but no ``body_json``
    (jsonb refused it: a ``\\u0000`` escape, a lone surrogate; or it is malformed): --set-json
    reads the bytes and edits them if they are JSON."""


def _translate(exc: BaseException, where: str | None, what: str) -> Exception:
    """An asyncpg error as ours: the operator's --where gets the blame when there is one."""
    if isinstance(exc, asyncpg.PostgresError) and where is not None \
            and not isinstance(exc, asyncpg.PostgresConnectionError
                               | asyncpg.LockNotAvailableError):
        readonly = isinstance(exc, asyncpg.ReadOnlySQLTransactionError)
        return UsageError(
            f"--where: PostgreSQL rejects {where!r}: {exc}"
            + ("; --where runs in a READ ONLY transaction and cannot change anything"
               if readonly else "")

            + "; give a boolean SQL condition over the columns of shadowproxy.pairs, e.g. "
              "--where \"primary_status = 200 AND request_body_json ? 'features'\"")
    return DatabaseError(f"{what}: {reason(exc)}")


class Selection:
    """The SQL of one replay's selection, and the queries over it."""

    def __init__(self, options: ReplayOptions) -> None:
        self.options = options

    def _window(self, p: _Params) -> str:
        o = self.options
        return (f"_sp_q.route = {p(o.route)} AND _sp_q.received_at >= {p(o.window.start)} "
                f"AND _sp_q.received_at < {p(o.window.end)}")

    def select_sql(self) -> tuple[str, list[Any]]:
        """The keys of the selection's requests, in replay order: the window, --where and
        --limit over the requests recorded so far."""
        o = self.options
        p = _Params()
        sql = (f"SELECT _sp_q.received_at, _sp_q.id FROM shadowproxy.requests _sp_q "
               f"WHERE {self._window(p)}")
        if o.where is not None:
            # On lines of its own: a trailing "-- comment" must not swallow the query's rest.
            # The window again, on the pairs' own received_at: it keeps the subquery to the
            # window's partitions (the outer query's bounds do not carry into it).
            sql += (f"\n  AND EXISTS (SELECT 1 FROM ({PAIRS_ROWS}) AS pairs "
                    "WHERE pairs.id = _sp_q.id AND pairs.received_at = _sp_q.received_at "
                    f"AND pairs.received_at >= {p(o.window.start)} "
                    f"AND pairs.received_at < {p(o.window.end)} AND (\n{o.where}\n))\n")
        sql += " ORDER BY _sp_q.received_at, _sp_q.id"
        if o.limit is not None:
            sql += f" LIMIT {p(o.limit)}"
        return sql, p.values

    def _conditions(self, p: _Params, *, pending: bool, after: Key | None = None) -> str:
        """The requests of the fixed selection (``fix``); the window's bounds stay, to keep
        the query to the window's partitions."""
        o = self.options
        sql = (f"{self._window(p)} AND EXISTS (SELECT 1 FROM {SELECTION_TABLE} _sp_s "
               "WHERE _sp_s.id = _sp_q.id AND _sp_s.received_at = _sp_q.received_at)")
        if after is not None:
            sql += f" AND (_sp_q.received_at, _sp_q.id) > ({p(after[0])}, {p(after[1])})"
        if pending:
            # --force redoes replayed answers only: an answer a live shadow of that name
            # recorded is never replaced (PostgresWriter replaces replayed answers only).
            # The window again, on the answers' own received_at: whatever the plan's shape,
            # only the window's partitions of responses are probed.
            sql += (" AND NOT EXISTS (SELECT 1 FROM shadowproxy.responses _sp_d "
                    "WHERE _sp_d.request = _sp_q.id AND _sp_d.received_at = _sp_q.received_at "
                    f"AND _sp_d.received_at >= {p(o.window.start)} "
                    f"AND _sp_d.received_at < {p(o.window.end)} "
                    f"AND _sp_d.target = {p(o.name)}"
                    + (" AND _sp_d.role <> 'replay'" if o.force else "") + ")")
        return sql

    def stream_sql(self, after: Key | None) -> tuple[str, list[Any]]:
        """The pending requests after ``after``, in replay order (``fix`` first)."""
        p = _Params()
        sql = (f"SELECT {STREAM_COLUMNS} FROM shadowproxy.requests _sp_q "
               f"WHERE {self._conditions(p, pending=True, after=after)} "
               "ORDER BY _sp_q.received_at, _sp_q.id")
        return sql, p.values

    async def check(self, conn: asyncpg.Connection) -> None:
        """Have PostgreSQL parse and plan the selection's query: a bad --where fails here."""
        sql, _ = self.select_sql()
        try:
            async with conn.transaction(readonly=True):
                # --where on its own first: inside the selection's query a "$1" would
                # silently take one of the replay's own values.
                where = self.options.where
                if where is not None and await placeholders(
                        conn, f"SELECT 1 FROM ({PAIRS_ROWS}) AS pairs WHERE (\n{where}\n)"):
                    raise UsageError(
                        f"--where: {where!r} has a parameter placeholder ($1, $2, …); "
                        "--where takes no parameters: write the values into the condition, "
                        "e.g. --where \"route = 'scoring'\"")
                await conn.prepare(sql)
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise _translate(exc, self.options.where, "checking the selection failed") from exc

    async def fix(self, conn: asyncpg.Connection) -> None:
        """Fix the selection: the keys of its requests as recorded now, in this session's
        temporary table, which the preflight and the stream then read through."""
        sql, args = self.select_sql()
        try:
            await conn.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {SELECTION_TABLE.split('.')[1]} "
                "(received_at timestamptz NOT NULL, id uuid NOT NULL, "
                "PRIMARY KEY (received_at, id))")
        except asyncpg.InsufficientPrivilegeError as exc:
            database, role = await conn.fetchrow(
                "SELECT quote_ident(current_database()), quote_ident(current_user)")
            raise DatabaseError(
                "the replay keeps its selection in a temporary table, and the role "
                f"{role} may not create one ({exc}); give it the privilege: GRANT "
                f"TEMPORARY ON DATABASE {database} TO {role}") from exc
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise DatabaseError(f"selecting the requests failed: {reason(exc)}") from exc
        try:
            await conn.execute(f"TRUNCATE {SELECTION_TABLE}")
            # --where is the operator's SQL: read only, as everywhere (a temporary table is
            # the one thing a READ ONLY transaction may write).
            async with conn.transaction(readonly=True):
                await conn.execute(f"INSERT INTO {SELECTION_TABLE} {sql}", *args)
            # Autovacuum never analyzes a temporary table: the planner needs its size.
            await conn.execute(f"ANALYZE {SELECTION_TABLE}")
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise _translate(exc, self.options.where, "selecting the requests failed") from exc

    async def preflight(self, conn: asyncpg.Connection) -> Preflight:
        """Counts over the selection: how much is pending, and what cannot be sent as is."""
        o = self.options
        p = _Params()
        name = p(o.name)
        redacted_re = p(REDACTED_RE)
        sql = f"""
WITH sel AS (
    SELECT _sp_q.body_truncated AS truncated,
           _sp_q.body_json IS NULL AS no_json,
           _sp_q.body_json IS NULL AND coalesce(octet_length(_sp_q.body), 0) > 0
               AND _sp_q.headers ? 'content-encoding' AS encoded,
           -- A plain body that begins as JSON does but has no body_json: jsonb refused it
           -- (a NUL escape, a lone surrogate) or it is malformed. Replay reads the bytes.
           _sp_q.body_json IS NULL AND NOT _sp_q.headers ? 'content-encoding'
               AND substring(btrim(substring(_sp_q.body FOR 256), decode('20090a0d', 'hex'))
                             FOR 1) IN ('{{', '[') AS unread,
           coalesce(strpos(_sp_q.body_json::text, '"[redacted]"') > 0, false) AS redacted_json,
           _sp_q.query ~ {p(REDACTED_QUERY_RE)} AS redacted_query,
           ARRAY(SELECT h.key FROM jsonb_each_text(_sp_q.headers) h
                 WHERE h.value ~ {redacted_re}
                   -- Never sent anyway (outgoing.py): hop-by-hop, the proxy's own, and
                   -- those the request's Connection header names.
                   AND h.key <> ALL({p(sorted(NOT_CARRIED))}::text[])
                   AND h.key <> ALL(SELECT lower(btrim(t)) FROM unnest(string_to_array(
                       _sp_q.headers->>'connection', ',')) t)) AS redacted,
           EXISTS (SELECT 1 FROM shadowproxy.responses _sp_d
                   WHERE _sp_d.request = _sp_q.id AND _sp_d.received_at = _sp_q.received_at
                     AND _sp_d.target = {name}) AS done,
           EXISTS (SELECT 1 FROM shadowproxy.responses _sp_d
                   WHERE _sp_d.request = _sp_q.id AND _sp_d.received_at = _sp_q.received_at
                     AND _sp_d.target = {name} AND _sp_d.role <> 'replay') AS live
    FROM shadowproxy.requests _sp_q
    WHERE {self._conditions(p, pending=False)}
), todo AS (
    SELECT * FROM sel WHERE ({p(o.force)}::boolean AND NOT live) OR NOT done
)
SELECT (SELECT count(*) FROM sel) AS selected,
       (SELECT count(*) FROM sel WHERE done) AS answered,
       (SELECT count(*) FROM sel WHERE live) AS live,
       (SELECT count(*) FROM todo) AS pending,
       (SELECT count(*) FROM todo WHERE truncated) AS truncated,
       (SELECT count(*) FROM todo WHERE NOT truncated AND no_json AND NOT encoded
            AND NOT unread) AS no_json,
       (SELECT count(*) FROM todo WHERE NOT truncated AND unread) AS unread_json,
       (SELECT count(*) FROM todo WHERE NOT truncated AND encoded) AS encoded_no_json,
       (SELECT count(*) FROM todo WHERE NOT truncated AND redacted_json) AS redacted_json,
       (SELECT count(*) FROM todo WHERE NOT truncated AND redacted_query) AS redacted_query,
       (SELECT count(*) FROM todo WHERE NOT truncated AND EXISTS (
            SELECT 1 FROM unnest(todo.redacted) n
            WHERE n <> ALL({p(sorted(o.set_header_names()))}::text[]))) AS redacted_requests,
       (SELECT coalesce(jsonb_object_agg(n, c), '{{}}')::text FROM (
            SELECT n, count(*) AS c FROM todo, unnest(todo.redacted) n
            WHERE NOT todo.truncated GROUP BY n) x) AS redacted_headers
"""
        row = await self._fetchrow(conn, sql, p.values, "counting the selection")
        assert row is not None  # aggregates always return one row
        return Preflight(
            selected=row["selected"], answered=row["answered"], live=row["live"],
            pending=row["pending"],
            truncated=row["truncated"], no_json=row["no_json"],
            redacted_json=row["redacted_json"], redacted_requests=row["redacted_requests"],
            redacted_headers=dict(sorted(orjson.loads(row["redacted_headers"]).items())),
            redacted_query=row["redacted_query"], encoded_no_json=row["encoded_no_json"],
            unread_json=row["unread_json"])

    async def stored_since(self, conn: asyncpg.Connection, since: datetime) -> int:
        """Answers of the target stored for the route's requests in the window by calls
        started at ``since`` or later: what this run stored (it holds the lock on replaying
        the route as the name, ``lock_target``; a fresh connection, without the selection's
        table, may count)."""
        o = self.options
        p = _Params()
        sql = (f"SELECT count(*) FROM shadowproxy.requests _sp_q "
               "JOIN shadowproxy.responses _sp_d ON _sp_d.request = _sp_q.id "
               "AND _sp_d.received_at = _sp_q.received_at "
               f"AND _sp_d.target = {p(o.name)} AND _sp_d.role = 'replay' "
               f"AND _sp_d.started_at >= {p(since)} "
               f"WHERE _sp_q.route = {p(o.route)} AND _sp_q.received_at >= {p(o.window.start)} "
               f"AND _sp_q.received_at < {p(o.window.end)}")
        try:
            count: int = await conn.fetchval(sql, *p.values)
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise DatabaseError(f"counting the stored answers failed: {exc}") from exc
        return count

    async def _fetchrow(self, conn: asyncpg.Connection, sql: str, args: list[Any],
                        what: str) -> asyncpg.Record | None:
        try:
            async with conn.transaction(readonly=True):
                return await conn.fetchrow(sql, *args)
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise _translate(exc, self.options.where, what) from exc


async def lock_target(conn: asyncpg.Connection, route: str, name: str,
                      wait_s: float = LOCK_WAIT_S) -> bool:
    """Take the session's lock on replaying ``route`` as ``name``; False if another replay
    holds it for ``wait_s``. The lock goes with the connection, also when its process is
    killed (the wait covers the moment PostgreSQL takes to notice)."""
    deadline = time.monotonic() + wait_s
    try:
        while True:
            locked: bool = await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                f"shadowproxy replay {route} as {name}")
            if locked or time.monotonic() >= deadline:
                return locked
            await asyncio.sleep(0.2)
    except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
        raise DatabaseError(f"taking the replay lock failed: {exc}") from exc


class RequestStream:
    """The pending requests, a bounded number of bytes at a time, through a server-side
    cursor in a READ ONLY transaction renewed every ``renew_after_s``."""

    def __init__(self, conn: asyncpg.Connection, selection: Selection, *,
                 read_ahead_bytes: int = READ_AHEAD_BYTES,
                 renew_after_s: float = RENEW_AFTER_S) -> None:
        self.conn = conn
        self.selection = selection
        self._budget = read_ahead_bytes
        self._renew_after = renew_after_s
        self._transaction: Any = None
        self._cursor: Any = None
        self._opened = 0.0
        self._after: Key | None = None
        self._rows = max(1, min(MAX_FETCH_ROWS, read_ahead_bytes // _FIRST_ROW_GUESS))
        """Rows per fetch: as many as fit the byte budget, by the sizes seen so far."""
        self._done = False

    async def _open(self) -> None:
        sql, args = self.selection.stream_sql(self._after)
        self._transaction = self.conn.transaction(readonly=True)
        await self._transaction.start()
        self._cursor = await self.conn.cursor(sql, *args)
        self._opened = time.monotonic()

    async def _end_transaction(self) -> None:
        transaction, self._transaction, self._cursor = self._transaction, None, None
        if transaction is not None and not self.conn.is_closed():
            await transaction.rollback()  # read only: nothing to commit

    async def next_rows(self) -> list[asyncpg.Record]:
        """The next rows in replay order; an empty list at the end."""
        if self._done:
            return []
        try:
            if self._cursor is not None and \
                    time.monotonic() - self._opened > self._renew_after:
                await self._end_transaction()
            if self._cursor is None:
                await self._open()
            rows: list[asyncpg.Record] = await self._cursor.fetch(self._rows)
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise DatabaseError(f"reading the recorded requests failed: {exc}") from exc
        if not rows:
            self._done = True
            await self.close()
            return []
        last = rows[-1]
        self._after = (last["received_at"], last["id"])
        size = sum(len(r["body"] or b"") + len(r["headers"]) + 200 for r in rows)
        self._rows = max(1, min(MAX_FETCH_ROWS, self._budget * len(rows) // max(size, 1)))
        return rows

    async def close(self) -> None:
        try:
            await self._end_transaction()
        except (asyncpg.PostgresError, *CONNECTION_ERRORS):
            pass  # the connection is going away anyway
