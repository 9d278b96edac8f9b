"""The report and configuration versions: a window spanning several says so, and
``--config-version`` reports on one."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shadowproxy.cli import main
from tests.compare.records import Call, Exchange, insert, write_config

COMPARE = """
prediction: "$.prediction"
features:
  sqft: {path: "$.features.sqft", min: 0}
"""


@pytest.fixture
def config(sync_database_url: str, tmp_path: Path) -> Path:
    """150 exchanges under version aaa (the candidate agrees), then 120 under bbb (it is
    off by 10%), and 5 rows stored before versions existed."""
    now = datetime.now(UTC)
    exchanges = []
    for i in range(150):
        exchanges.append(Exchange({"features": {"sqft": 1000 + i}}, Call({"prediction": i}),
                                  {"candidate": Call({"prediction": i})},
                                  received_at=now - timedelta(minutes=30, seconds=-i),
                                  config_version="aaa"))
    for i in range(120):
        exchanges.append(Exchange({"features": {"sqft": 1000 + i}},
                                  Call({"prediction": 100 + i}),
                                  {"candidate": Call({"prediction": 110 + 1.1 * i})},
                                  received_at=now - timedelta(minutes=10, seconds=-i),
                                  config_version="bbb"))
    for _ in range(5):
        exchanges.append(Exchange({"features": {"sqft": 1}}, Call({"prediction": 1}),
                                  {"candidate": Call({"prediction": 1})},
                                  received_at=now - timedelta(minutes=50)))
    asyncio.run(insert(sync_database_url, exchanges))
    return write_config(tmp_path, sync_database_url, COMPARE)


def _report(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert main(["report", "-c", str(config), "--route", "house-prices", "--since", "1h",
                 "--format", "json", *extra]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def test_a_window_of_several_versions_lists_them(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --config-version every pair counts, and meta lists each version in the window
    with its requests, first used first; the text report says the window spans them."""
    report = _report(config, capsys)
    assert report["counts"]["pairs"] == 275
    assert report["meta"]["config_version"] is None
    versions = report["meta"]["config_versions"]
    assert [(v["version"], v["requests"]) for v in versions] == [
        (None, 5), ("aaa", 150), ("bbb", 120)]
    assert main(["report", "-c", str(config), "--route", "house-prices", "--since", "1h"]) == 0
    text = capsys.readouterr().out
    assert "the window spans 3 configuration versions" in text
    assert "--config-version V reports on one" in text


def test_config_version_selects_the_requests_of_one_version(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--config-version bbb reports on those 120 requests only: counts, predictions and data
    checks; the text names the version."""
    report = _report(config, capsys, "--config-version", "bbb")
    assert report["meta"]["config_version"] == "bbb"
    assert report["counts"]["requests"] == 120
    assert report["counts"]["pairs"] == 120
    assert report["predictions"]["n"] == 120
    assert report["predictions"]["mean_diff"] > 9
    same = _report(config, capsys, "--config-version", "aaa")
    assert same["counts"]["pairs"] == 150
    assert same["predictions"]["max_abs_diff"] == 0
    assert main(["report", "-c", str(config), "--route", "house-prices", "--since", "1h",
                 "--config-version", "aaa"]) == 0
    assert "configuration version aaa only, of 3 in the window" in capsys.readouterr().out


def test_an_unknown_config_version_is_a_usage_error(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A version no request of the window was handled under is exit 2, listing those that
    were."""
    assert main(["report", "-c", str(config), "--route", "house-prices", "--since", "1h",
                 "--config-version", "ccc"]) == 2
    err = capsys.readouterr().err
    assert "--config-version ccc: no request of route 'house-prices'" in err
    assert "'aaa', 'bbb'" in err
