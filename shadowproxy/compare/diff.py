"""The report's ``diff`` section: which response fields differ between primary and shadow.

Both JSON responses of each comparable pair are flattened into leaf fields in PostgreSQL
(``extract.flatten_cte``), the ``ignore`` paths are dropped, numbers are compared within the
tolerance, and one row per pair and field says whether it differs. Above ``sample_max``
comparable pairs a seeded hash sample of them is compared (flattening JSON is the report's
most expensive step). With a ``baseline_shadow`` the same is done for the baseline, and a
field the baseline changes about as often is noise (Diffy's rule).

A pair where either call failed (``error_kind``) is left out and counted per side
(``cut_short``), as in the generation section: a stream cut short (the client left, a
timeout, a reset) is stored 2xx with its answer assembled as far as it went, and compared it
would show the text and ``finish_reason`` the call never finished as differences of the
shadow's. The window's counts keep such pairs comparable (``COMPARABLE``, shared with the
hourly summaries, is unchanged); ``complete_comparable`` gives those the diff compares.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NotRequired, TypedDict

from shadowproxy.compare.extract import flatten_cte, ignore_regex
from shadowproxy.compare.snapshot import COMPARABLE, PAIR_FILTER, Scratch, Snapshot
from shadowproxy.compare.summaries import Group

COMPLETE = "primary_error_kind IS NULL AND shadow_error_kind IS NULL"
"""Pairs whose two calls ended well: a comparable pair that is not is left out of the diff."""

SCRATCH = (Scratch("_fd", "tag text, id uuid, request_id text, received_at timestamptz, "
                          "field text, d boolean", indexes=("(tag, id)",)),)
"""The compared fields of each pair, with its request's id and time: the sections below
read no other table (a join back to ``shadowproxy.requests`` on a window of tens of millions
of requests read all of them)."""


class Field(TypedDict):
    field: str
    n_present: int
    n_differ: int
    rate: float
    examples: list[str]
    noise_rate: NotRequired[float]
    noise: NotRequired[bool]


class WorstPair(TypedDict):
    request_id: str
    fields_differing: int
    fields: list[str]


class Tolerance(TypedDict):
    abs: float
    rel: float


class CutShort(TypedDict):
    primary: int
    shadow: int


class DiffSection(TypedDict):
    comparable_pairs: int
    compared_pairs: int
    sampled: bool
    cut_short: CutShort
    identical: int
    identical_share: float | None
    ignore: list[str]
    tolerance: Tolerance
    fields: list[Field]
    n_fields: int
    worst: list[WorstPair]
    baseline_shadow: NotRequired[str]
    noise_fields: NotRequired[list[str]]
    identical_excluding_noise: NotRequired[int]
    identical_share_excluding_noise: NotRequired[float | None]


async def validate(db: Snapshot) -> None:
    """UsageError if an ``ignore`` path is not a jsonpath, or not a plain field path."""
    for i, path in enumerate(db.compare.ignore):
        await db.check_jsonpath(f"compare.ignore[{i}]", path)
    for i, path in enumerate(db.compare.ignore):
        ignore_regex(path, f"compare.ignore[{i}]")


def complete_comparable(groups: Iterable[Group]) -> int:
    """The comparable pairs of ``groups`` (``operational.scan``) whose two calls ended well:
    those the diff compares, of the whole window."""
    return sum(int(g["n"]) for g in groups
               if g["comparable"] and g["po"] == "ok" and g["so"] == "ok")


async def _load(db: Snapshot, tag: str, n: int, shadow: str | None = None
                ) -> tuple[int, int, CutShort]:
    """Compare the fields of ``shadow``'s comparable pairs whose calls ended well (a sample
    above sample_max) into _fd under ``tag``; return how many pairs were read, how many
    compared, and per side how many answers were cut short (their pairs not compared)."""
    compare = db.compare
    regexes = [ignore_regex(p) for p in compare.ignore]
    sample = db.sample_clause(n, "id::text")
    await db.execute(f"""
        WITH RECURSIVE
        base AS (SELECT id, request_id, received_at, primary_body_json AS pj,
                        shadow_body_json AS sj
                 FROM {db.rows}
                 WHERE {PAIR_FILTER} AND {COMPARABLE} AND {COMPLETE} AND {sample}),
        src AS (SELECT id, 'p' AS side, pj AS doc FROM base
                UNION ALL SELECT id, 's', sj FROM base),
        {flatten_cte("src")},
        kept AS (SELECT * FROM leaves WHERE NOT (path ~ ANY($5::text[]))),
        cmp AS (
            SELECT coalesce(a.id, b.id) AS id, coalesce(a.field, b.field) AS field,
              CASE WHEN a.v IS NULL OR b.v IS NULL THEN true
                   WHEN jsonb_typeof(a.v) = 'number' AND jsonb_typeof(b.v) = 'number' THEN
                     abs((a.v #>> '{{}}')::numeric - (b.v #>> '{{}}')::numeric)
                     > greatest($6::numeric, $7::numeric * greatest(
                         abs((a.v #>> '{{}}')::numeric), abs((b.v #>> '{{}}')::numeric)))
                   ELSE a.v <> b.v END AS differs
            FROM (SELECT * FROM kept WHERE side = 'p') a
            FULL JOIN (SELECT * FROM kept WHERE side = 's') b
              ON a.id = b.id AND a.path = b.path)
        INSERT INTO _fd
        SELECT $8, c.id, b.request_id, b.received_at, c.field, c.d
        FROM (SELECT id, field, bool_or(differs) AS d FROM cmp GROUP BY id, field) c
        JOIN base b ON b.id = c.id
        """, *db.pair_args(shadow), regexes, compare.abs_tolerance, compare.rel_tolerance, tag)
    row = await db.fetchrow(
        f"SELECT count(*), count(*) FILTER (WHERE {COMPLETE}), "
        f"count(*) FILTER (WHERE primary_error_kind IS NOT NULL), "
        f"count(*) FILTER (WHERE shadow_error_kind IS NOT NULL) "
        f"FROM {db.rows} WHERE {PAIR_FILTER} AND {COMPARABLE} AND {sample}",
        *db.pair_args(shadow))
    return int(row[0]), int(row[1]), CutShort(primary=int(row[2]), shadow=int(row[3]))


async def _fields(db: Snapshot, tag: str) -> list[Any]:
    """Per field: pairs where it is present, pairs where it differs, example request ids."""
    return await db.fetch("""
        SELECT f.field, count(*) AS n_present, count(*) FILTER (WHERE f.d) AS n_differ,
               (array_agg(f.request_id ORDER BY f.received_at, f.request_id)
                  FILTER (WHERE f.d))[1:3] AS examples
        FROM _fd f WHERE f.tag = $1 GROUP BY 1 ORDER BY 3 DESC, 1""", tag)


def _beyond_noise(rate: float, noise_rate: float) -> bool:
    """Diffy's rule: a difference counts only if it clearly exceeds the noise."""
    return (rate > noise_rate and abs(rate - noise_rate) / (rate + noise_rate) * 100 > 20
            and abs(rate - noise_rate) * 100 > 0.03)


async def build(db: Snapshot, comparable: int) -> DiffSection:
    """The field diff of the ``comparable`` pairs (``counts.comparable_pairs``)."""
    compare = db.compare
    baseline = compare.baseline_shadow
    read, compared, cut = await _load(db, "shadow", comparable)
    if baseline:
        await _load(db, "baseline", comparable, baseline)
    await db.execute("ANALYZE _fd")
    noise = {r["field"]: r for r in await _fields(db, "baseline")} if baseline else {}
    fields: list[Field] = []
    noise_fields: list[str] = []
    for r in await _fields(db, "shadow"):
        rate = r["n_differ"] / r["n_present"] if r["n_present"] else 0.0
        entry = Field(field=r["field"], n_present=r["n_present"], n_differ=r["n_differ"],
                      rate=rate, examples=list(r["examples"] or []))
        if baseline:
            nr = noise.get(r["field"])
            n_rate = nr["n_differ"] / nr["n_present"] if nr and nr["n_present"] else 0.0
            entry["noise_rate"] = n_rate
            entry["noise"] = bool(n_rate > 0 and not _beyond_noise(rate, n_rate))
            if entry["noise"]:
                noise_fields.append(r["field"])
        fields.append(entry)
    differing, differing_real = await _pairs_differing(db, noise_fields)
    out = DiffSection(
        comparable_pairs=comparable, compared_pairs=compared, sampled=read < comparable,
        cut_short=cut,
        identical=compared - differing,
        identical_share=(compared - differing) / compared if compared else None,
        ignore=list(compare.ignore),
        tolerance=Tolerance(abs=compare.abs_tolerance, rel=compare.rel_tolerance),
        fields=fields[:200], n_fields=len(fields),
        worst=await _worst(db, noise_fields))
    if baseline:
        out["baseline_shadow"] = baseline
        out["noise_fields"] = noise_fields
        out["identical_excluding_noise"] = compared - differing_real
        out["identical_share_excluding_noise"] = ((compared - differing_real) / compared
                                                  if compared else None)
    return out


async def _pairs_differing(db: Snapshot, noise_fields: list[str]) -> tuple[int, int]:
    """Pairs with any differing field, and with any outside the noise fields."""
    row = await db.fetchrow("""
        SELECT count(DISTINCT id) FILTER (WHERE d),
               count(DISTINCT id) FILTER (WHERE d AND field <> ALL($1::text[]))
        FROM _fd WHERE tag = 'shadow'""", noise_fields)
    return int(row[0]), int(row[1])


async def _worst(db: Snapshot, noise_fields: list[str], limit: int = 5) -> list[WorstPair]:
    """The pairs with the most differing fields (noise fields aside)."""
    rows = await db.fetch(f"""
        SELECT f.request_id, count(*) AS n, array_agg(f.field ORDER BY f.field) AS fields
        FROM _fd f WHERE f.tag = 'shadow' AND f.d AND f.field <> ALL($1::text[])
        GROUP BY f.request_id, f.id ORDER BY 2 DESC, 1 LIMIT {int(limit)}""", noise_fields)
    return [WorstPair(request_id=r[0], fields_differing=int(r[1]), fields=list(r[2])[:20])
            for r in rows]
