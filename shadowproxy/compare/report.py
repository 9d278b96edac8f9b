"""Building the report: its sections in order on one snapshot, then the verdict.

Each section owns its SQL and its part of the JSON document (docs/report.md lists every
key): ``operational`` (counts, latency, errors), ``predictions``, ``performance`` (labels),
``diff`` (response fields), ``features`` (data checks) and ``slices``. A section that needs
another's extraction takes its handle as an argument (``Predictions``, ``Features``), so the
order below is the only one that type-checks. ``progress(step)`` is called before each of
the ``STEPS`` so that the command can show a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import asyncpg

from shadowproxy import __version__
from shadowproxy.compare import diff, features, operational, performance, predictions, slices
from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.snapshot import Scope, snapshot
from shadowproxy.compare.verdict import Verdict, verdict
from shadowproxy.compare.window import Window

STEPS = ("counts and latency", "predictions", "labels", "field diff", "data checks", "slices",
         "verdict")
Progress = Callable[[str], None]
SEED = 20240601
SCRATCH = predictions.SCRATCH + diff.SCRATCH + features.SCRATCH + slices.SCRATCH


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
    thresholds: dict[str, Any]
    compare: dict[str, Any]


class Report(TypedDict):
    meta: Meta
    counts: operational.Counts
    operational: operational.Operational
    diff: diff.DiffSection
    predictions: predictions.PredictionsSection
    performance: performance.PerformanceSection
    data_checks: features.DataChecksSection
    slices: slices.SlicesSection
    verdict: Verdict


async def build_report(conn: asyncpg.Connection, *, route: str, shadow: str, window: Window,
                       compare: CompareConfig, reference: Path | None = None,
                       progress: Progress | None = None,
                       unlisted: Mapping[str, str] | None = None,
                       config_version: str | None = None) -> Report:
    """The whole report as a JSON-ready dict.

    ``unlisted`` names the targets (the shadow, the baseline) that are not shadows of the
    route in the configuration, each with where the name came from: they must have been
    replayed into the window (``shadowproxy replay --as NAME``), else UsageError.
    ``config_version`` keeps the requests handled under that configuration version only.
    """
    import numpy as np
    import scipy

    step = progress or (lambda _: None)
    scope = Scope(route, shadow, window, compare, SEED, config_version)
    async with snapshot(conn, scope, SCRATCH) as db:
        versions = await operational.config_versions(db)
        for validate in (predictions.validate, features.validate, diff.validate,
                         slices.validate):
            await validate(db)
        await operational.check_replayed(db, unlisted or {})
        step(STEPS[0])
        counts = await operational.counts(db)
        health = await operational.operational(db, counts)
        step(STEPS[1])
        preds, pred_section = await predictions.build(db)
        step(STEPS[2])
        perf = await performance.build(db, preds)
        step(STEPS[3])
        field_diff = await diff.build(db, counts["comparable_pairs"])
        step(STEPS[4])
        feats, data_checks = await features.build(db, reference)
        step(STEPS[5])
        slice_section = await slices.build(db, preds, pred_section, feats)
        step(STEPS[6])
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
        seed=SEED, thresholds=th.model_dump(),
        compare=compare.model_dump(mode="json", exclude={"thresholds"}))
    decided = verdict({"counts": counts, "operational": health, "predictions": pred_section,
                       "performance": perf, "data_checks": data_checks,
                       "slices": slice_section}, th)
    return Report(meta=meta, counts=counts, operational=health, diff=field_diff,
                  predictions=pred_section, performance=perf, data_checks=data_checks,
                  slices=slice_section, verdict=decided)
