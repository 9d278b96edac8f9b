"""The operational section on a real PostgreSQL: failures by kind, replayed targets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.render_text import render_text
from shadowproxy.compare.report import build_report
from shadowproxy.compare.window import Window
from shadowproxy.errors import UsageError
from shadowproxy.failures import ERROR_KINDS
from tests.compare.records import Call, Exchange, insert


async def report(url: str, shadow: str = "candidate") -> dict[str, Any]:
    now = datetime.now(UTC)
    conn = await asyncpg.connect(url)
    try:
        return dict(await build_report(
            conn, route="house-prices", shadow=shadow,
            window=Window(now - timedelta(hours=1), now + timedelta(minutes=1)),
            compare=CompareConfig.model_validate({"prediction": "$.prediction"})))
    finally:
        await conn.close()


def ok(i: int) -> Call:
    return Call({"prediction": float(i)}, latency_ms=10.0 + i % 7)


async def test_shadow_failures_are_counted_by_kind_not_by_text(database_url: str) -> None:
    """Counts and error rates follow error_kind whatever the error text says."""
    failed = {
        0: Call(None, status=None, latency_ms=None, error="read did not finish in 2.0 s",
                kind="timeout"),
        1: Call(None, status=None, latency_ms=None, error="max_in_flight (64) reached",
                kind="dropped"),
        2: Call(None, status=None, latency_ms=None, error="body over mirror limit",
                kind="skipped"),
        3: Call(None, status=None, latency_ms=None, error="timeout-like text, refused",
                kind="connect"),
        4: Call(None, status=None, latency_ms=None, error="peer went away", kind="reset"),
        5: Call({"error": "boom"}, status=503, latency_ms=4.0),
    }
    exchanges = [Exchange({"x": i}, ok(i), {"candidate": failed.get(i % 20, ok(i))})
                 for i in range(100)]
    await insert(database_url, exchanges)
    r = await report(database_url)

    c = r["counts"]
    assert (c["shadow_timeouts"], c["shadow_drops"], c["shadow_skips"]) == (5, 5, 5)
    assert c["shadow_errors"] == 10 and c["shadow_5xx"] == 5  # connect and reset
    op = r["operational"]
    # Calls made: every pair but the dropped and skipped ones; failed: timeout, connect,
    # reset and the 5xx.
    assert op["shadow"]["error_rate"] == pytest.approx(20 / 90)
    outcomes = op["outcomes"]["shadow"]
    assert list(outcomes) == ["ok", *ERROR_KINDS]  # the words of the shadow outcome metric
    assert outcomes == {"ok": 75, "timeout": 5, "connect": 5, "reset": 5, "closed": 0,
                        "protocol": 0, "dropped": 5, "skipped": 5, "shutdown": 0}
    assert op["outcomes"]["primary"]["ok"] == 100
    text = render_text(r)
    assert "calls by outcome" in text and "dropped" in text


def replayed(n: int) -> list[Exchange]:
    """Each request answered live by the primary and shadow 'candidate', and replayed to
    'candidate-replay' (the same model, ten times slower under replay load)."""
    return [Exchange({"x": i}, ok(i),
                     {"candidate": Call({"prediction": i + 0.5}, latency_ms=12.0)},
                     replays={"candidate-replay": Call({"prediction": i + 0.5},
                                                       latency_ms=120.0 + i % 5)})
            for i in range(n)]


async def test_a_replayed_target_is_reported_with_its_latency_labelled(database_url: str
                                                                       ) -> None:
    """A replayed target is compared like a shadow; its latency is shown, not compared."""
    await insert(database_url, replayed(60))
    live = await report(database_url, "candidate")
    now = datetime.now(UTC)
    conn = await asyncpg.connect(database_url)
    try:
        r = dict(await build_report(
            conn, route="house-prices", shadow="candidate-replay",
            window=Window(now - timedelta(hours=1), now + timedelta(minutes=1)),
            compare=CompareConfig.model_validate({"prediction": "$.prediction"}),
            unlisted={"candidate-replay": "--shadow: not a shadow in the configuration"}))
    finally:
        await conn.close()

    assert live["meta"]["shadow_role"] == "shadow" and live["operational"]["latency_compared"]
    assert r["meta"]["shadow_role"] == "replay" and r["counts"]["replayed_pairs"] == 60
    op = r["operational"]
    assert op["shadow"]["latency_ms"]["p50"] == pytest.approx(122.0)  # shown as measured
    assert op["latency_compared"] is False and "measured under replay load" in op["latency_note"]
    assert op["latency_note"].startswith(
        "all 60 pairs of candidate-replay came from `shadowproxy replay`: its latency")
    reasons = r["verdict"]["reasons"]
    assert not any("p99" in x["message"] for x in reasons)  # 10x the primary: not a warning
    assert {"level": "info", "section": "operational", "message": op["latency_note"]} in reasons
    for key in ("n", "mae", "rmse", "within_tolerance"):
        assert r["predictions"][key] == live["predictions"][key]
    text = render_text(r)
    assert "shadow (under replay)" in text and "(replayed with shadowproxy replay)" in text


async def test_an_unknown_target_is_neither_shadow_nor_replayed(database_url: str) -> None:
    """A name that is no configured shadow and was not replayed into the window: UsageError."""
    await insert(database_url, replayed(5))
    now = datetime.now(UTC)
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(UsageError, match=r"no target was replayed as 'ghost'.*"
                                             r"\['candidate-replay'\]"):
            await build_report(
                conn, route="house-prices", shadow="ghost",
                window=Window(now - timedelta(hours=1), now + timedelta(minutes=1)),
                compare=CompareConfig.model_validate({"prediction": "$.prediction"}),
                unlisted={"ghost": "--shadow: route 'house-prices' has no shadow named 'ghost'"})
    finally:
        await conn.close()
