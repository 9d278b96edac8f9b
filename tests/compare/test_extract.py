"""Feature extraction SQL on real PostgreSQL (JSON, instances, V2 tensors) and ignore paths."""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
import pytest

from shadowproxy.compare.config import CompareConfig, FeatureConfig
from shadowproxy.compare.extract import feature_rows_sql, ignore_regex, jsonpath_key
from shadowproxy.errors import UsageError


async def rows(url: str, feature: dict[str, Any], fmt: str, body: Any) -> list[tuple[int, Any]]:
    sql = feature_rows_sql(FeatureConfig.model_validate(feature), fmt, "$1::jsonb")
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetch(f"SELECT x.ord, x.v FROM {sql} x ORDER BY x.ord",
                                 json.dumps(body))
    finally:
        await conn.close()
    return [(r[0], json.loads(r[1])) for r in found]


V2_2D = {"inputs": [{"name": "input-0", "shape": [3, 2], "datatype": "FP32",
                     "data": [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]}]}
V2_NESTED = {"inputs": [{"name": "input-0", "shape": [2, 2], "datatype": "FP32",
                         "data": [[1.0, 10.0], [2.0, 20.0]]}]}
V2_NAMED = {"inputs": [{"name": "sqft", "shape": [2], "datatype": "FP32", "data": [700, 900]},
                       {"name": "city", "shape": [2], "datatype": "BYTES",
                        "data": ["north", "south"]}]}


async def test_v2_tensor_columns_follow_the_shape(database_url: str) -> None:
    """Column j of a [N, F] tensor, flat or nested data; a named 1-D tensor is one column."""
    assert await rows(database_url, {"column": 1}, "v2", V2_2D) == [(1, 10.0), (2, 20.0),
                                                                     (3, 30.0)]
    assert await rows(database_url, {"column": 0}, "v2", V2_NESTED) == [(1, 1.0), (2, 2.0)]
    assert await rows(database_url, {"input": "city"}, "v2", V2_NAMED) == [(1, "north"),
                                                                           (2, "south")]
    assert await rows(database_url, {"input": "nope"}, "v2", V2_NAMED) == []


async def test_instances_columns_by_index_or_key(database_url: str) -> None:
    """instances rows as lists take an index, rows as objects take a key."""
    body = {"instances": [[1, "a"], [2, "b"]]}
    assert await rows(database_url, {"column": 1}, "instances", body) == [(1, "a"), (2, "b")]
    body = {"instances": [{"odd key": 5}, {"odd key": 6}]}
    assert await rows(database_url, {"column": "odd key"}, "instances", body) == [(1, 5), (2, 6)]


async def test_a_json_path_feature_yields_each_match(database_url: str) -> None:
    """A plain jsonpath feature: one row per match, numbered in order."""
    body = {"features": {"sqft": 1200}}
    assert await rows(database_url, {"path": "$.features.sqft"}, "json", body) == [(1, 1200)]


def test_ignore_paths_become_anchored_subtree_regexes() -> None:
    """Indices, [*], .* and quoted keys match flattened field paths and their subtrees."""
    rx = re.compile(ignore_regex("$.items[*].ts"))
    assert rx.search("$.items[3].ts") and rx.search("$.items[0].ts.nanos")
    assert not rx.search("$.items[3].tsx") and not rx.search("$.other[0].ts")
    rx = re.compile(ignore_regex('$."odd key".*'))
    assert rx.search('$."odd key".a') and not rx.search("$.odd")
    assert jsonpath_key("ok_1") == ".ok_1" and jsonpath_key('a"b') == '."a\\"b"'
    with pytest.raises(UsageError, match="ignore supports"):
        ignore_regex("$.a ? (@ > 1)")
    with pytest.raises(UsageError, match="must start with"):
        ignore_regex("a.b")


def test_compare_config_rejects_features_that_do_not_fit_the_format() -> None:
    """json needs paths, instances needs columns, V2 columns are indices; slices need features."""
    bad = [
        {"features": {"a": {"column": 0}}},
        {"request_format": "instances", "features": {"a": {"input": "x"}}},
        {"request_format": "v2", "features": {"a": {"column": "x"}}},
        {"features": {"a": {"path": "$.a", "column": 1}}},
        {"slices": {"s": {"feature": "nope", "bins": [0, 1]}}},
        {"features": {"a": {"path": "$.a"}}, "slices": {"s": {"feature": "a", "bins": [2, 1]}}},
        {"features": {"a": {"path": "$.a", "min": 3, "max": 1}}},
    ]
    for spec in bad:
        with pytest.raises(ValueError):
            CompareConfig.model_validate(spec)
    CompareConfig.model_validate({"request_format": "v2", "features": {"a": {"column": 2}}})
