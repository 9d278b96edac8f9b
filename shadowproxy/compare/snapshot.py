"""The report's one door to PostgreSQL: one connection, the report's scope, scratch tables.

Every section of the report reads the store through a ``Snapshot``: ``fetch``/``execute``
translate asyncpg errors (a ``DatabaseError``, or the section's own ``UsageError`` when
PostgreSQL rejects something the configuration wrote), ``pair_args`` and ``PAIR_FILTER``
select the pairs of the report's route, shadow and window, ``rows`` names the relation that
holds the pairs the row-level sections read (every pair, or a sample: see ``sampling``), and
``sample_clause`` keeps a seeded hash sample of rows (at most ``thresholds.sample_max``), so
that a report is reproducible.

A report is one snapshot: ``snapshot()`` runs every statement in one read-only REPEATABLE
READ transaction, so counts and samples agree however many records land meanwhile.
Sections extract what they aggregate into temporary tables. Each section declares its tables
as ``Scratch`` values; ``snapshot()`` creates them all, empty, before the first read, so
that a section only ever inserts into them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from shadowproxy.compare.config import CompareConfig, Thresholds
from shadowproxy.compare.window import Window
from shadowproxy.errors import DatabaseError, ShadowProxyError, UsageError
from shadowproxy.store import rollups
from shadowproxy.store.database import placeholders, reason

if TYPE_CHECKING:
    from shadowproxy.compare.sampling import SampleInfo
    from shadowproxy.compare.summaries import Parts

SELECTED_VERSION = "nullif(current_setting('shadowproxy.config_version', true), '')"
"""The ``--config-version`` of the report (NULL for all), set for the snapshot's transaction."""

VERSION_FILTER = (f"coalesce({SELECTED_VERSION}, config_version) "
                  "IS NOT DISTINCT FROM config_version")
"""True for a row of the selected configuration version, or for every row without one."""

PAIRS = "shadowproxy.pairs"
"""The view of every pair; ``Snapshot.rows`` names where the row-level sections read them."""

PAIR_FILTER = ("route = $1 AND shadow_name = $2 AND received_at >= $3 AND received_at < $4 "
               f"AND {VERSION_FILTER}")
"""The pairs of the report: ``shadowproxy.pairs`` filtered with ``Snapshot.pair_args()``
(and by ``--config-version``, which every section so honours without an argument)."""

COMPARABLE = rollups.COMPARABLE
"""Pairs whose responses can be compared: both 2xx with JSON bodies."""

_SAMPLE_BASE = 1_000_000

Explain = Callable[[asyncpg.PostgresError], ShadowProxyError]


@dataclass(frozen=True)
class Scope:
    """What one report is about: a route, a shadow, a window, how to compare, a seed."""

    route: str
    shadow: str
    window: Window
    compare: CompareConfig
    seed: int
    config_version: str | None = None
    """Only requests handled under this configuration version (``--config-version``)."""


@dataclass(frozen=True)
class Scratch:
    """A temporary table a section fills: its name, column definitions and indexes."""

    name: str
    columns: str
    indexes: tuple[str, ...] = ()


class Snapshot:
    """Statements of one report on one connection, over one scope."""

    def __init__(self, conn: asyncpg.Connection, scope: Scope) -> None:
        self._conn = conn
        self.scope = scope
        self.rows = PAIRS
        """Where the tests, percentiles, diffs, data checks and slices read pairs (with
        ``PAIR_FILTER``): ``shadowproxy.pairs``, or the sampled pairs (``sampling.draw``)."""
        self.sample: SampleInfo | None = None
        """What ``sampling.draw`` decided (None before it ran)."""
        self.parts: Parts | None = None
        """Which parts of the window are read from summaries (``summaries.parts``)."""

    @property
    def compare(self) -> CompareConfig:
        return self.scope.compare

    @property
    def window_sampled(self) -> bool:
        """Whether the row-level sections read a sample of the window's pairs
        (``--max-pairs``), not every pair."""
        return self.sample is not None and self.sample["sampled"]

    @property
    def thresholds(self) -> Thresholds:
        return self.scope.compare.thresholds

    def pair_args(self, shadow: str | None = None) -> tuple[object, ...]:
        """The arguments $1-$4 of ``PAIR_FILTER`` (another shadow's pairs with ``shadow``)."""
        s = self.scope
        return (s.route, shadow or s.shadow, s.window.start, s.window.end)

    async def fetch(self, sql: str, *args: object, explain: Explain | None = None
                    ) -> list[asyncpg.Record]:
        try:
            return list(await self._conn.fetch(sql, *args))
        except asyncpg.PostgresError as exc:
            raise _translate(exc, explain) from exc

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record:
        """The one row of an aggregate query."""
        return (await self.fetch(sql, *args))[0]

    async def fetch_wide(self, build: Callable[[str], str], *args: object
                         ) -> list[asyncpg.Record]:
        """The rows of an aggregate query over float8 columns, ``build(cast)`` with each
        column read as ``column + cast``: first with ``cast`` empty; where PostgreSQL's
        float8 arithmetic overflows, again with ``"::numeric"``, exact and many times
        slower (its figures come back as ``Decimal``). avg and stddev of float8 keep a sum
        of squares, which overflows for values past about 1e154: a diverged model's
        predictions (1e200) stopped the report. The first try runs in a savepoint, so that
        its error leaves the snapshot usable."""
        try:
            async with self._conn.transaction():
                return list(await self._conn.fetch(build(""), *args))
        except asyncpg.NumericValueOutOfRangeError:
            pass
        except asyncpg.PostgresError as exc:
            raise _translate(exc, None) from exc
        return await self.fetch(build("::numeric"), *args)

    async def fetchrow_wide(self, build: Callable[[str], str], *args: object) -> asyncpg.Record:
        """The one row of an aggregate query (see ``fetch_wide``)."""
        return (await self.fetch_wide(build, *args))[0]

    async def execute(self, sql: str, *args: object, explain: Explain | None = None) -> None:
        try:
            await self._conn.execute(sql, *args)
        except asyncpg.PostgresError as exc:
            raise _translate(exc, explain) from exc

    async def parameters(self, sql: str, explain: Explain | None = None) -> int:
        """``store.database.placeholders`` of ``sql``, its errors explained."""
        try:
            return await placeholders(self._conn, sql)
        except asyncpg.PostgresError as exc:
            raise _translate(exc, explain) from exc

    async def check_jsonpath(self, key: str, path: str) -> None:
        """UsageError naming the configuration ``key`` if PostgreSQL cannot parse ``path``."""
        await self.fetch("SELECT $1::text::jsonpath", path, explain=lambda exc: UsageError(
            f"{key}: PostgreSQL rejects the jsonpath {path!r}: {exc}; write it in "
            "PostgreSQL's SQL/JSON path syntax, e.g. '$.prediction' or '$.predictions[*]'"))

    def sample_clause(self, n: int, key: str) -> str:
        """A WHERE fragment keeping about sample_max of n rows, by a seeded hash of ``key``."""
        sample_max = self.thresholds.sample_max
        if n <= sample_max:
            return "true"
        keep = int(_SAMPLE_BASE * sample_max / n)
        return f"abs(hashtextextended({key}, {int(self.scope.seed)}) % {_SAMPLE_BASE}) < {keep}"


def _translate(exc: asyncpg.PostgresError, explain: Explain | None) -> ShadowProxyError:
    if explain is not None:
        return explain(exc)
    return DatabaseError(f"a report query failed: {reason(exc)}")


@asynccontextmanager
async def snapshot(conn: asyncpg.Connection, scope: Scope, scratch: Sequence[Scratch]
                   ) -> AsyncIterator[Snapshot]:
    """A ``Snapshot`` on ``conn`` in one read-only REPEATABLE READ transaction.

    Every statement of the report sees the same committed data, while proxies keep
    inserting and spools replay into its window. The ``scratch`` tables are created first,
    in the same transaction (``ON COMMIT DROP``), because a read-only transaction may
    insert into temporary tables but not create them; it turns read-only before the first
    section reads.
    """
    db = Snapshot(conn, scope)
    try:
        transaction = conn.transaction(isolation="repeatable_read")
        await transaction.start()
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"the report could not start its transaction: {reason(exc)}") \
            from exc
    try:
        for table in scratch:
            await db.execute(f"CREATE TEMP TABLE {table.name} ({table.columns}) ON COMMIT DROP")
            for columns in table.indexes:
                await db.execute(f"CREATE INDEX ON {table.name} {columns}")
        # Transaction-local: read by VERSION_FILTER in every section's statements.
        await db.execute("SELECT set_config('shadowproxy.config_version', $1, true)",
                         scope.config_version or "")
        await db.execute("SET TRANSACTION READ ONLY")
        yield db
    finally:
        # Nothing to keep (the scratch tables go with the transaction); a connection lost
        # meanwhile has ended the transaction already.
        with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await transaction.rollback()
