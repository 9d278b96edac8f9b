"""Failure kinds are one list: what the data path sets, what the database stores and the
pairs view shows, and what the shadow outcome metric counts."""

from __future__ import annotations

import asyncpg
import pytest

from shadowproxy.config import RecordingConfig
from shadowproxy.failures import ERROR_KINDS, ErrorKind
from shadowproxy.metrics import SHADOW_OUTCOMES, Metrics, families
from shadowproxy.models import CapturedResponse
from shadowproxy.recorder.postgres import PostgresWriter
from shadowproxy.recorder.rows import RowEncoder
from tests.deploy.files import CONTRACT_LABEL_VALUES
from tests.recorder.exchanges import exchanges


@pytest.mark.parametrize("checked", [False, True], ids=["copy", "checking path"])
async def test_every_error_kind_is_stored_and_read_back(database_url: str,
                                                        checked: bool) -> None:
    """Each ErrorKind, as a primary's and as a shadow's failure, is accepted by the database
    (by COPY and by the checking path) and comes back the same word in the pairs view;
    the human-readable detail stays beside it in `error`."""
    batch = exchanges(len(ErrorKind))
    for ex, kind in zip(batch, ErrorKind, strict=True):
        primary = ex.responses[0]
        primary.status, primary.body = None, None
        primary.error_kind, primary.error = kind, f"{kind}: detail of the primary"
        shadow = CapturedResponse("s1", "shadow", primary.started_at)
        shadow.error_kind, shadow.error = kind, f"{kind}: detail of the shadow"
        ex.responses.append(shadow)
    writer = PostgresWriter(database_url)
    try:
        await writer.write(*RowEncoder(RecordingConfig()).encode(batch), checked=checked)
    finally:
        await writer.close()
    assert writer.withheld == [] and writer.unstorable == []
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT request_id, primary_error_kind, shadow_error_kind, "
                                "shadow_error, shadow_role FROM shadowproxy.pairs")
    finally:
        await conn.close()
    kinds = {ex.request_id: kind for ex, kind in zip(batch, ErrorKind, strict=True)}
    assert len(rows) == len(ErrorKind)
    for row in rows:
        kind = kinds[row["request_id"]]
        assert (row["primary_error_kind"], row["shadow_error_kind"]) == (kind, kind)
        assert row["shadow_error"] == f"{kind}: detail of the shadow"
        assert row["shadow_role"] == "shadow"


def test_the_shadow_outcome_metric_counts_ok_and_exactly_the_error_kinds() -> None:
    """`shadowproxy_shadow_requests_total{outcome}` says "ok" or the kind, the same words
    the database stores, and the dashboard's contract lists the same set."""
    assert ("ok", *ERROR_KINDS) == SHADOW_OUTCOMES
    assert set(ERROR_KINDS) == {kind.value for kind in ErrorKind}
    metrics = Metrics()
    counters = metrics.shadow("r", "s1")
    counters.finish(None, 1.0)
    for kind in ErrorKind:
        if kind in (ErrorKind.DROPPED, ErrorKind.SKIPPED):
            counters.not_called(kind)
        else:
            counters.finish(kind, 1.0)
    exported = {sample.labels["outcome"]: sample.value
                for family in families([metrics.snapshot()])
                if family.name == "shadowproxy_shadow_requests"
                for sample in family.samples}
    assert exported == dict.fromkeys(SHADOW_OUTCOMES, 1.0)
    assert CONTRACT_LABEL_VALUES[("shadowproxy_shadow_requests_total", "outcome")] == set(
        SHADOW_OUTCOMES)
