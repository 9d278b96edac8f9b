"""deploy/grafana/shadowproxy.json: every query uses the design's metric names and labels."""

from __future__ import annotations

import re
from typing import Any

import pytest

from shadowproxy.metrics import Metrics, families
from tests.deploy.files import (
    CONTRACT_HISTOGRAMS,
    CONTRACT_LABEL_VALUES,
    CONTRACT_METRICS,
    ROOT,
    load_json,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "shadowproxy.json"
# Labels Prometheus adds to every scraped series (target labels), usable in any query.
TARGET_LABELS = frozenset({"instance", "job", "pod", "namespace"})
METRIC = re.compile(r"\b(shadowproxy_[a-z0-9_]+)")
SELECTOR = re.compile(r"\b(shadowproxy_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = load_json(DASHBOARD)
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def _targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in _panels(dashboard) for t in p.get("targets", [])]


def _base(name: str) -> str:
    """The design's name for an exposed series (histograms add _bucket, _sum, _count)."""
    for histogram in CONTRACT_HISTOGRAMS:
        if name in (f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"):
            return histogram
    return name


def _queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for _, t in _targets(dashboard)]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["query"]["query"])
    return queries


def test_every_metric_queried_is_a_design_metric(dashboard: dict[str, Any]) -> None:
    """No query names a metric outside the public list (a typo would chart nothing)."""
    for query in _queries(dashboard):
        names = METRIC.findall(query)
        assert names, f"query uses no shadowproxy metric: {query}"
        for name in names:
            assert _base(name) in CONTRACT_METRICS, f"{name} is not a public metric: {query}"
            if name.endswith("_bucket"):
                assert "histogram_quantile" in query, query


def test_every_design_metric_is_charted(dashboard: dict[str, Any]) -> None:
    """Request rate, latency, shadow outcomes, records and queue depth all have panels."""
    charted = {_base(n) for _, t in _targets(dashboard) for n in METRIC.findall(t["expr"])}
    assert charted == set(CONTRACT_METRICS)


def test_selectors_use_the_metrics_own_labels_and_values(dashboard: dict[str, Any]) -> None:
    """Label matchers name labels the metric has, and exact values the design lists."""
    for query in _queries(dashboard):
        for name, matchers in SELECTOR.findall(query):
            base = _base(name)
            allowed = CONTRACT_METRICS[base] | TARGET_LABELS
            if name.endswith("_bucket"):
                allowed |= {"le"}
            for part in filter(str.strip, matchers.split(",")):
                m = MATCHER.fullmatch(part)
                assert m, f"cannot read matcher {part!r} in {query}"
                label, op, value = m.groups()
                assert label in allowed, f"{name} has no label {label!r}: {query}"
                values = CONTRACT_LABEL_VALUES.get((base, label))
                if op == "=" and values is not None:
                    assert value in values, f"{label}={value!r} never occurs: {query}"


def test_groupings_and_legends_use_labels_the_series_have(dashboard: dict[str, Any]) -> None:
    """`by (...)` keeps only labels of the queried metrics; legends show only kept labels."""
    for title, target in _targets(dashboard):
        expr = target["expr"]
        bases = {_base(n) for n in METRIC.findall(expr)}
        available = set().union(*(CONTRACT_METRICS[b] for b in bases)) | TARGET_LABELS
        if any(n.endswith("_bucket") for n in METRIC.findall(expr)):
            available |= {"le"}
        kept: set[str] | None = None
        for group in GROUPING.findall(expr):
            labels = {label.strip() for label in group.split(",") if label.strip()}
            assert labels <= available, f"{title}: grouping by {labels - available}"
            kept = labels if kept is None else kept & labels
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        if legend:
            assert kept is not None and legend <= kept, f"{title}: legend {legend} not kept"


def test_panels_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    """Every panel and query reads from the ${datasource} variable, so import works anywhere."""
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in names
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_template_variables_used_in_queries_are_defined(dashboard: dict[str, Any]) -> None:
    """$route, $shadow and friends used in queries are dashboard variables or Grafana's own."""
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    builtin = {"__rate_interval", "__range", "__interval"}
    for query in _queries(dashboard):
        for var in re.findall(r"\$\{?(\w+)", query):
            assert var in defined | builtin, f"${var} is not defined: {query}"


def test_layout_is_well_formed(dashboard: dict[str, Any]) -> None:
    """Panel ids are unique and every panel fits in Grafana's 24-column grid."""
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    assert dashboard["uid"] and dashboard["title"]


def _exported() -> dict[str, set[str]]:
    """Sample names and their labels, as shadowproxy's /metrics exposes them."""
    metrics = Metrics()
    metrics.route("r").count(200)
    metrics.route("r").primary_latency.observe(5.0)
    metrics.shadow("r", "s").finish(None, 3.0)
    metrics.records["written"] += 1
    exported: dict[str, set[str]] = {}
    for family in families([metrics.snapshot()]):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def test_every_metric_queried_is_exported_by_the_proxy(dashboard: dict[str, Any]) -> None:
    """The proxy's own /metrics families carry every series and label the dashboard queries."""
    exported = _exported()
    for query in _queries(dashboard):
        for name in METRIC.findall(query):
            assert name in exported, f"/metrics has no {name}: {query}"
        for name, matchers in SELECTOR.findall(query):
            for part in filter(str.strip, matchers.split(",")):
                m = MATCHER.fullmatch(part)
                assert m
                assert m.group(1) in exported[name] | TARGET_LABELS, f"{name}: {part}"
