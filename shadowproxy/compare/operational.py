"""The report's ``counts`` and ``operational`` sections: how many pairs, how each side did.

Everything here is an exact aggregate over every pair of the window (no sampling): counts
of requests and pairs, how the calls failed (by ``error_kind``), latency percentiles, error
rates, status-code agreement and a log-scale latency histogram. The shadow may be a live
shadow or a target replayed with ``shadowproxy replay`` (``shadow_role = 'replay'``): it is
reported alike, except that a replayed latency is not compared with the primary's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NotRequired, TypedDict

import numpy as np

from shadowproxy.compare import summaries
from shadowproxy.compare.snapshot import PAIR_FILTER, Snapshot
from shadowproxy.compare.summaries import Group
from shadowproxy.errors import UsageError
from shadowproxy.failures import ERROR_KINDS

HIST_BINS = 30
OUTCOMES = ("ok", *ERROR_KINDS)
"""What became of a call, in the words of the ``outcome`` label of the shadow metrics."""
CALLED = "coalesce(shadow_error_kind, 'ok') NOT IN ('dropped', 'skipped')"
"""Pairs whose shadow call was made (dropped and skipped calls were not)."""


class Counts(TypedDict):
    requests: int
    pairs: int
    complete_pairs: int
    comparable_pairs: int
    shadow_timeouts: int
    shadow_drops: int
    shadow_skips: int
    shadow_errors: int
    shadow_5xx: int
    primary_failures: int
    requests_without_pair: int
    pair_completeness: float | None
    replayed_pairs: int


class Latency(TypedDict):
    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None
    max: float | None


class Side(TypedDict):
    n: int
    latency_ms: Latency
    error_rate: float | None


class StatusPair(TypedDict):
    primary: int | None
    shadow: int | None
    n: int


class LatencyHistogram(TypedDict):
    edges: list[float]
    primary: list[int]
    shadow: list[int]
    scale: str


class Outcomes(TypedDict):
    """Calls by outcome per side: ``ok`` or the kind of failure, every word listed."""

    primary: dict[str, int]
    shadow: dict[str, int]


class Operational(TypedDict):
    primary: Side
    shadow: Side
    status_agreement: float | None
    status_pairs: list[StatusPair]
    outcomes: Outcomes
    latency_compared: bool
    latency_note: NotRequired[str]
    latency_histogram: NotRequired[LatencyHistogram]


def shadow_role(counts: Counts) -> str:
    """``shadow`` (live traffic), ``replay`` (every pair from ``shadowproxy replay``) or
    ``mixed``."""
    if not counts["replayed_pairs"]:
        return "shadow"
    return "replay" if counts["replayed_pairs"] == counts["pairs"] else "mixed"


async def check_replayed(db: Snapshot, unlisted: Mapping[str, str]) -> None:
    """UsageError unless each name of ``unlisted`` (not a shadow in the configuration) was
    replayed into the window; its value says where the name came from."""
    if not unlisted:
        return
    s = db.scope
    found = [r[0] for r in await db.fetch(
        "SELECT DISTINCT shadow_name FROM shadowproxy.pairs WHERE route = $1 "
        "AND received_at >= $2 AND received_at < $3 AND shadow_role = 'replay' ORDER BY 1",
        s.route, s.window.start, s.window.end)]
    for name, where in unlisted.items():
        if name not in found:
            raise UsageError(
                f"{where}, and no target was replayed as {name!r} into the window "
                f"{s.window.start.isoformat()} → {s.window.end.isoformat()} (targets "
                f"replayed into it: {found or 'none'}); name a shadow of the route, or "
                f"replay the window first with `shadowproxy replay ... --as {name}`")


class ConfigVersion(TypedDict):
    """One configuration version that handled requests of the route in the window."""

    version: str | None
    requests: int
    first: str
    last: str


async def config_versions(db: Snapshot) -> list[ConfigVersion]:
    """The configuration versions of the route's requests in the window, first used first
    (whatever ``--config-version`` selects); UsageError if the selected one is not among
    them."""
    s = db.scope
    found = [ConfigVersion(version=version, requests=n, first=first.isoformat(),
                           last=last.isoformat())
             for version, n, first, last in sorted(
                 await summaries.requests_by_version(db),
                 key=lambda v: (v[2], v[0] is None, v[0] or ""))]
    if s.config_version is not None and s.config_version not in [v["version"] for v in found]:
        raise UsageError(
            f"--config-version {s.config_version}: no request of route {s.route!r} in the "
            f"window {s.window.start.isoformat()} → {s.window.end.isoformat()} was handled "
            f"under it (versions in the window: "
            f"{[v['version'] for v in found] or 'none'}); see requests.config_version")
    return found


async def scan(db: Snapshot) -> list[Group]:
    """Every pair of the window, grouped by what the counts and rates tell apart (statuses,
    outcomes, replayed, comparable) with each group's latency sums: what ``counts`` and
    ``operational`` share, from the hourly summaries where they exist and the rows
    elsewhere (``summaries``), however large the window."""
    return await summaries.pair_groups(db)


def _sum(groups: list[Group], keep: Callable[[Group], bool]) -> int:
    return sum(int(g["n"]) for g in groups if keep(g))


async def counts(db: Snapshot, groups: list[Group]) -> Counts:
    """How many requests, pairs and complete pairs; how the shadow calls failed."""
    selected = db.scope.config_version
    requests = sum(n for version, n, _, _ in await summaries.requests_by_version(db)
                   if selected is None or version == selected)
    pairs = _sum(groups, lambda g: True)
    complete = _sum(groups, lambda g: g["ps"] is not None and g["ss"] is not None)

    def kind(k: str) -> int:
        return _sum(groups, lambda g: g["sek"] == k)

    return Counts(
        requests=requests, pairs=pairs, complete_pairs=complete,
        comparable_pairs=_sum(groups, lambda g: g["comparable"]),
        shadow_timeouts=kind("timeout"), shadow_drops=kind("dropped"),
        shadow_skips=kind("skipped"),
        shadow_errors=_sum(groups, lambda g: g["sek"] not in (None, "timeout", "dropped",
                                                               "skipped")),
        shadow_5xx=_sum(groups, lambda g: g["ss"] is not None and g["ss"] >= 500),
        primary_failures=_sum(groups, lambda g: g["ps"] is None),
        requests_without_pair=max(requests - pairs, 0),
        pair_completeness=complete / pairs if pairs else None,
        replayed_pairs=_sum(groups, lambda g: g["replayed"]))


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _side(q: list[float | None] | None, mean: Any, mx: Any, n: int,
          error_rate: float | None) -> Side:
    p = q or [None, None, None]
    return Side(n=n, latency_ms=Latency(p50=p[0], p95=p[1], p99=p[2], mean=_opt(mean),
                                        max=_opt(mx)),
                error_rate=error_rate)


def _rates(groups: list[Group]) -> dict[str, Any]:
    """What the former per-pair aggregates gave, from the groups of ``scan``."""
    def total(col: str, keep: Callable[[Group], bool] = lambda g: True) -> float:
        return sum(float(g[col]) for g in groups if keep(g) and g[col] is not None)

    def extreme(cols: tuple[str, ...], pick: Callable[..., Any]) -> float | None:
        values = [g[c] for g in groups for c in cols if g[c] is not None]
        return pick(values) if values else None

    pairs = total("n")
    pn, sn = total("pn"), total("sn")
    called = total("n", lambda g: g["sek"] not in ("dropped", "skipped"))
    complete = total("n", lambda g: g["ps"] is not None and g["ss"] is not None)
    return {
        "pmean": total("psum") / pn if pn else None, "smean": total("ssum") / sn if sn else None,
        "pmax": extreme(("pmax",), max), "smax": extreme(("smax",), max),
        "pn": int(pn), "sn": int(sn),
        "lo": extreme(("pmin", "smin"), min), "hi": extreme(("pmax", "smax"), max),
        "perr": total("n", lambda g: g["ps"] is None or g["ps"] >= 500) / pairs if pairs
        else None,
        "s_called": int(called),
        "s_failed": int(total("n", lambda g: (g["ss"] is None or g["ss"] >= 500)
                              and g["sek"] not in ("dropped", "skipped"))),
        "status_agreement": total("n", lambda g: g["ps"] is not None and g["ps"] == g["ss"])
        / complete if complete else None,
    }


def _status_pairs(groups: list[Group]) -> list[StatusPair]:
    """The 20 most frequent (primary, shadow) status pairs (no status: last)."""
    n: dict[tuple[int | None, int | None], int] = {}
    for g in groups:
        n[(g["ps"], g["ss"])] = n.get((g["ps"], g["ss"]), 0) + int(g["n"])

    def order(item: tuple[tuple[int | None, int | None], int]) -> tuple[Any, ...]:
        (p, s), count = item
        return (-count, p is None, p or 0, s is None, s or 0)

    return [StatusPair(primary=p, shadow=s, n=c) for (p, s), c in sorted(n.items(),
                                                                         key=order)[:20]]


async def operational(db: Snapshot, counts: Counts, groups: list[Group]
                      ) -> Operational:
    """Latency percentiles and error rates per side; status-code agreement; histograms.

    A replayed target's latency is given but not compared with the primary's: it was
    measured under replay load, not under the production traffic the primary answered.
    """
    # Means, counts and rates cover every pair (the groups of ``scan``); percentiles and
    # the histogram need the rows sorted or binned, and read the sample on a large window
    # (Snapshot.rows).
    row = _rates(groups)
    q = await db.fetchrow(f"""
        SELECT
          percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY primary_latency_ms)
            AS pq,
          percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY shadow_latency_ms)
            AS sq
        FROM {db.rows} WHERE {PAIR_FILTER}""", *db.pair_args())
    s_err = row["s_failed"] / row["s_called"] if row["s_called"] else None
    out = Operational(
        primary=_side(q["pq"], row["pmean"], row["pmax"], row["pn"], _opt(row["perr"])),
        shadow=_side(q["sq"], row["smean"], row["smax"], row["sn"], s_err),
        status_agreement=_opt(row["status_agreement"]),
        status_pairs=_status_pairs(groups), outcomes=_outcomes(groups),
        latency_compared=True)
    role = shadow_role(counts)
    if role != "shadow":
        out["latency_compared"] = False
        which = (f"all {counts['pairs']} pairs" if role == "replay" else
                 f"{counts['replayed_pairs']} of the {counts['pairs']} pairs")
        out["latency_note"] = (
            f"{which} of {db.scope.shadow} came from `shadowproxy replay`: its latency was "
            "measured under replay load, not production load, and is not compared with the "
            "primary's")
    if row["lo"] is not None and row["hi"] is not None:
        out["latency_histogram"] = await _latency_histogram(db, float(row["lo"]),
                                                            float(row["hi"]))
    return out


def _outcomes(groups: list[Group]) -> Outcomes:
    """Each side's calls by outcome: ``ok`` (an answer came) or the ``error_kind``."""
    out = Outcomes(primary=dict.fromkeys(OUTCOMES, 0), shadow=dict.fromkeys(OUTCOMES, 0))
    for g in groups:
        if g["po"] is not None:
            out["primary"][g["po"]] = out["primary"].get(g["po"], 0) + int(g["n"])
        if g["so"] is not None:
            out["shadow"][g["so"]] = out["shadow"].get(g["so"], 0) + int(g["n"])
    return out


async def _latency_histogram(db: Snapshot, lo: float, hi: float) -> LatencyHistogram:
    lo, hi = max(lo, 0.01), max(hi, 0.01)
    edges = [float(e) for e in np.geomspace(lo, hi * 1.000001 if hi > lo else lo * 1.01,
                                            HIST_BINS + 1)]
    rows = await db.fetch(f"""
        SELECT side, least(width_bucket(ln(greatest(v, 0.01)), ln($5), ln($6), {HIST_BINS}),
                           {HIST_BINS}) AS b, count(*)
        FROM (SELECT 'primary' AS side, primary_latency_ms AS v FROM {db.rows}
              WHERE {PAIR_FILTER}
              UNION ALL
              SELECT 'shadow', shadow_latency_ms FROM {db.rows}
              WHERE {PAIR_FILTER}) x
        WHERE v IS NOT NULL GROUP BY 1, 2""", *db.pair_args(), edges[0], edges[-1])
    series: dict[str, list[int]] = {"primary": [0] * HIST_BINS, "shadow": [0] * HIST_BINS}
    for side, b, n in rows:
        series[side][max(b, 1) - 1] += n
    return LatencyHistogram(edges=edges, primary=series["primary"], shadow=series["shadow"],
                            scale="log")
