"""Building the report: its sections in order on one snapshot, then the verdict.

Each section owns its SQL and its part of the JSON document (docs/report.md lists every
key): ``operational`` (counts, latency, errors), ``predictions``, ``performance`` (labels),
``diff`` (response fields), ``features`` (data checks) and ``slices``. A section that needs
another's extraction takes its handle as an argument (``Predictions``, ``Features``), so the
order below is the only one that type-checks. ``progress(step)`` is called before each of
the ``STEPS`` a report takes, in their order, so that the command can show a progress bar.

A generation route (``compare.task: generation``, or inferred from the primary's answers:
see ``generation_section``) gets the ``generation`` section instead of ``predictions``,
``performance`` and ``slices``, which compare numbers and classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import asyncpg

from shadowproxy import __version__
from shadowproxy.compare import (
    diff,
    features,
    generation_section,
    operational,
    performance,
    predictions,
    sampling,
    slices,
)
from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.extract import within_sql
from shadowproxy.compare.options import DEFAULT_MAX_PAIRS, DEFAULT_SEED
from shadowproxy.compare.snapshot import Scope, Snapshot, snapshot
from shadowproxy.compare.verdict import Verdict, verdict
from shadowproxy.compare.window import Window

STEPS = ("counts and latency", "predictions", "labels", "field diff", "data checks",
         "generation", "slices", "verdict")
Progress = Callable[[str], None]
SEED = DEFAULT_SEED
SCRATCH = (sampling.SCRATCH + predictions.SCRATCH + diff.SCRATCH + features.SCRATCH
           + slices.SCRATCH)


class Meta(TypedDict):
    route: str
    shadow: str
    shadow_role: str
    baseline_shadow: str | None
    window: dict[str, str]
    config_version: str | None
    """``--config-version``: the only version reported on (None: every version)."""
    config_versions: list[operational.ConfigVersion]
    """Every configuration version of the route's requests in the window."""
    generated_at: str
    versions: dict[str, str]
    seed: int
    sample: sampling.SampleInfo
    """What the row-level sections read: every pair, or a sample of whole requests."""
    thresholds: dict[str, Any]
    compare: dict[str, Any]


class Report(TypedDict):
    """The report; a generation route has ``generation`` instead of ``predictions``,
    ``performance`` and ``slices``."""

    meta: Meta
    counts: operational.Counts
    operational: operational.Operational
    diff: diff.DiffSection
    predictions: NotRequired[predictions.PredictionsSection]
    performance: NotRequired[performance.PerformanceSection]
    data_checks: features.DataChecksSection
    slices: NotRequired[slices.SlicesSection]
    generation: NotRequired[generation_section.GenerationSection]
    verdict: Verdict


async def build_report(conn: asyncpg.Connection, *, route: str, shadow: str, window: Window,
                       compare: CompareConfig, reference: Path | None = None,
                       progress: Progress | None = None,
                       unlisted: Mapping[str, str] | None = None,
                       config_version: str | None = None,
                       max_pairs: int = DEFAULT_MAX_PAIRS,
                       seed: int = SEED) -> Report:
    """The whole report as a JSON-ready dict.

    ``unlisted`` names the targets (the shadow, the baseline) that are not shadows of the
    route in the configuration, each with where the name came from: they must have been
    replayed into the window (``shadowproxy replay --as NAME``), else UsageError.
    ``config_version`` keeps the requests handled under that configuration version only.
    Above ``max_pairs`` pairs, what needs rows reads a sample of ``max_pairs`` requests drawn
    with ``seed`` (``sampling``); counts and rates always cover every pair.
    """
    import numpy as np
    import scipy

    step = progress or (lambda _: None)
    scope = Scope(route, shadow, window, compare, seed, config_version)
    async with snapshot(conn, scope, SCRATCH) as db:
        versions = await operational.config_versions(db)
        for validate in (predictions.validate, features.validate, diff.validate,
                         slices.validate):
            await validate(db)
        await operational.check_replayed(db, unlisted or {})
        step("counts and latency")
        groups = await operational.scan(db)
        counts = await operational.counts(db, groups)
        sample = await sampling.draw(db, counts["pairs"], counts["comparable_pairs"],
                                     max_pairs)
        health = await operational.operational(db, counts, groups)
        # The row-level sections see the sample's comparable pairs.
        comparable = sample["comparable"]
        source = await generation_section.task_source(db, comparable)
        sections: dict[str, Any] = {"counts": counts, "operational": health}
        preds = None
        if source is None:
            step("predictions")
            preds, sections["predictions"] = await predictions.build(db)
            step("labels")
            sections["performance"] = await performance.build(db, preds)
        step("field diff")
        sections["diff"] = await diff.build(db, comparable)
        step("data checks")
        feats, sections["data_checks"] = await features.build(db, reference)
        if preds is not None:
            step("slices")
            sections["slices"] = await slices.build(db, preds, sections["predictions"], feats)
        elif source is not None:
            step("generation")
            sections["generation"] = await generation_section.build(db, comparable, source,
                                                                    feats)
        step("verdict")
        if sample["sampled"]:
            sample["estimates"] = await _estimates(db, sections, sample,
                                                   diff.complete_comparable(groups))
        server = (await db.fetchrow("SHOW server_version"))[0]
    th = compare.thresholds
    meta = Meta(
        route=route, shadow=shadow, shadow_role=operational.shadow_role(counts),
        baseline_shadow=compare.baseline_shadow,
        window={"start": window.start.isoformat(), "end": window.end.isoformat()},
        config_version=config_version, config_versions=versions,
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        versions={"shadowproxy": __version__, "numpy": np.__version__,
                  "scipy": scipy.__version__, "postgresql": server},
        seed=seed, sample=sample, thresholds=th.model_dump(),
        compare=compare.model_dump(mode="json", exclude={"thresholds"} if source else
                                   {"thresholds", "generation"}))
    decided = verdict(sections, th,
                      sample_comparable=sample["comparable"] if sample["sampled"] else None)
    order = ("counts", "operational", "diff", "predictions", "performance", "data_checks",
             "slices", "generation")
    return cast(Report, {"meta": meta, **{k: sections[k] for k in order if k in sections},
                         "verdict": decided})


async def _estimates(db: Snapshot, sections: Mapping[str, Any], sample: sampling.SampleInfo,
                     complete: int) -> dict[str, sampling.Estimate]:
    """Comparable pairs of the window estimated from the sample's, with 95% intervals: those
    whose responses differ (of the ``complete`` ones, whose calls ended well: the diff
    compares no other), and those whose predictions disagree (a class flips, or a
    regression value leaves the tolerance)."""
    out: dict[str, sampling.Estimate] = {}
    population = sample["population_comparable"]
    d = sections["diff"]
    if d.get("compared_pairs"):
        out["pairs_differing"] = sampling.estimate(
            d["compared_pairs"] - d["identical"], d["compared_pairs"], complete)
    if "predictions" in sections and sections["predictions"].get("n"):
        c = db.compare
        classification = sections["predictions"]["task"] == "classification"

        def query(cast: str) -> str:
            differs = ("pt IS DISTINCT FROM st" if classification else
                       f"NOT ({within_sql('pn', 'sn', '$1::float8', '$2::float8', cast)})")
            return (f"SELECT count(DISTINCT id) FILTER (WHERE {differs}) "
                    f"FROM {predictions.PREDICTIONS}")

        # Among the sample's comparable pairs: one without a prediction does not disagree.
        # The tolerances are parameters of the regression query only: PostgreSQL refuses
        # arguments a statement has no placeholder for.
        tolerances = () if classification else (c.abs_tolerance, c.rel_tolerance)
        row = await db.fetchrow_wide(query, *tolerances)
        out["pairs_with_disagreeing_predictions"] = sampling.estimate(
            int(row[0]), sample["comparable"], population)
    return out
