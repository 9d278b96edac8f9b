"""Counters and histograms of the data path, exposed in Prometheus text format.

The data path only adds to plain integers (a few tens of nanoseconds each); the Prometheus
metric families are built when ``/metrics`` is scraped. With several workers each process
writes a snapshot (``Metrics.snapshot``) that the admin process merges.

Metric names (the public interface; docs/operations.md describes each):
``shadowproxy_requests_total{route,code}``,
``shadowproxy_upstream_latency_seconds{route,target}`` (histogram),
``shadowproxy_shadow_requests_total{route,shadow,outcome}``,
``shadowproxy_shadow_set_json_skipped_total{route,shadow}`` (requests sent to a shadow without
its ``set_json``, their body not a JSON object the edits fit),
``shadowproxy_records_total{outcome}``, ``shadowproxy_recorder_queue_records``; and
``shadowproxy_bodies_withheld_total{reason}`` (bodies not stored because they could not be
redacted); ``shadowproxy_database_up`` and ``shadowproxy_database_error{class}`` (why records
go to the spool: a transient outage, or a permanent problem only the operator can fix);
``shadowproxy_config_info{version}`` (1 for each configuration version a process runs),
``shadowproxy_config_reloads_total{result}`` (``applied`` or ``rejected``);
``shadowproxy_storage_maintenance_total{result}`` (``ok`` or ``failed``: runs of the task
that creates partitions ahead and applies the retention, ``store/maintenance.py``).

Counters are kept by route and shadow name, so they survive reloads of the configuration.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from shadowproxy.failures import ERROR_KINDS

# Upper bounds in seconds, from sub-millisecond proxying to slow models.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BUCKETS_MS = tuple(b * 1000.0 for b in LATENCY_BUCKETS_S)
SHADOW_OUTCOMES = ("ok", *ERROR_KINDS)
"""``outcome`` of a shadow call: ok, or the kind of its failure (``failures.ErrorKind``)."""
RECORD_OUTCOMES = ("written", "spooled", "dropped")
RELOAD_RESULTS = ("applied", "rejected")
MAINTENANCE_RESULTS = ("ok", "failed")
DATABASE_ERROR_CLASSES = ("transient", "permanent")
"""``class`` of ``shadowproxy_database_error``: see ``store.database.classify``."""


class Histogram:
    """Latency histogram in milliseconds (exposed in seconds)."""

    __slots__ = ("counts", "sum_ms")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS_MS) + 1)
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect_left(_BUCKETS_MS, ms)] += 1
        self.sum_ms += ms


class ShadowCounters:
    """Outcomes and latency of one shadow of one route."""

    __slots__ = ("in_flight", "latency", "outcomes", "set_json_skipped")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = dict.fromkeys(SHADOW_OUTCOMES, 0)
        """Calls by outcome: "ok" or an error kind."""
        self.latency = Histogram()
        self.in_flight = 0
        """Calls to this shadow not finished yet, under every configuration version: what
        ``max_in_flight`` bounds, also across a reload."""
        self.set_json_skipped = 0
        """Requests sent unedited: the body did not fit the shadow's ``set_json``."""

    def finish(self, kind: str | None, latency_ms: float) -> None:
        """A call made ended: ``kind`` None when it succeeded."""
        self.outcomes["ok" if kind is None else kind] += 1
        self.latency.observe(latency_ms)

    def not_called(self, kind: str) -> None:
        """A call not made (dropped, skipped): counted, no latency."""
        self.outcomes[kind] += 1


class RouteCounters:
    """Client responses by status code, and the primary's latency, for one route."""

    __slots__ = ("codes", "primary_latency")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.primary_latency = Histogram()

    def count(self, code: int) -> None:
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1


class Metrics:
    """All counters of one process."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteCounters] = {}
        self.shadows: dict[tuple[str, str], ShadowCounters] = {}
        self.records = dict.fromkeys(RECORD_OUTCOMES, 0)
        self.queue_depth: Callable[[], int] = lambda: 0
        self.config_version = ""
        """The configuration this process runs ("" for none: a supervisor's own counters)."""
        self.reloads = dict.fromkeys(RELOAD_RESULTS, 0)
        self.bodies_withheld: dict[str, int] = {}
        """Bodies not stored, by reason (``recorder.bodies.WITHHELD_REASONS`` and others)."""
        self.maintenance = dict.fromkeys(MAINTENANCE_RESULTS, 0)
        """Runs of the storage maintenance task, by result."""
        self.database_state: Callable[[], str] = lambda: "up"
        """'up', or the class of the problem that keeps the database from being used."""

    def withheld(self, reason: str) -> None:
        self.bodies_withheld[reason] = self.bodies_withheld.get(reason, 0) + 1

    def route(self, name: str) -> RouteCounters:
        return self.routes.setdefault(name, RouteCounters())

    def shadow(self, route: str, name: str) -> ShadowCounters:
        return self.shadows.setdefault((route, name), ShadowCounters())

    def snapshot(self) -> dict[str, Any]:
        """Plain data, for another process to merge and expose."""
        return {
            "requests": [(r, code, n) for r, c in self.routes.items()
                         for code, n in c.codes.items()],
            "latency": [(r, "primary", c.primary_latency.counts, c.primary_latency.sum_ms)
                        for r, c in self.routes.items()]
            + [(r, s, c.latency.counts, c.latency.sum_ms) for (r, s), c in self.shadows.items()],
            "shadow": [(r, s, dict(c.outcomes)) for (r, s), c in self.shadows.items()],
            "set_json_skipped": [(r, s, c.set_json_skipped)
                                 for (r, s), c in self.shadows.items()],
            "records": dict(self.records),
            "queue": self.queue_depth(),
            "config_version": self.config_version,
            "reloads": dict(self.reloads),
            "bodies_withheld": dict(self.bodies_withheld),
            "database": self.database_state(),
            "maintenance": dict(self.maintenance),
        }


def families(snapshots: Iterable[dict[str, Any]]) -> Iterator[Metric]:
    """Prometheus metric families summed over the snapshots of every process."""
    requests: dict[tuple[str, str], int] = {}
    latency: dict[tuple[str, str], tuple[list[int], float]] = {}
    shadow: dict[tuple[str, str, str], int] = {}
    set_json_skipped: dict[tuple[str, str], int] = {}
    records = dict.fromkeys(RECORD_OUTCOMES, 0)
    queue = 0
    versions: set[str] = set()
    reloads = dict.fromkeys(RELOAD_RESULTS, 0)
    withheld: dict[str, int] = {}
    database = dict.fromkeys(("up", *DATABASE_ERROR_CLASSES), 0)
    maintenance = dict.fromkeys(MAINTENANCE_RESULTS, 0)
    for snap in snapshots:
        for route, code, n in snap["requests"]:
            key = (route, str(code))
            requests[key] = requests.get(key, 0) + n
        for route, target, counts, sum_ms in snap["latency"]:
            old_counts, old_sum = latency.get((route, target), ([0] * len(counts), 0.0))
            latency[(route, target)] = (
                [a + b for a, b in zip(old_counts, counts, strict=True)], old_sum + sum_ms)
        for route, name, outcomes in snap["shadow"]:
            for outcome, n in outcomes.items():
                shadow[(route, name, outcome)] = shadow.get((route, name, outcome), 0) + n
        for route, name, n in snap.get("set_json_skipped", ()):
            set_json_skipped[(route, name)] = set_json_skipped.get((route, name), 0) + n
        for outcome, n in snap["records"].items():
            records[outcome] += n
        queue += snap["queue"]
        if snap.get("config_version"):
            versions.add(snap["config_version"])
        for result, n in snap.get("reloads", {}).items():
            reloads[result] = reloads.get(result, 0) + n
        for reason, n in snap.get("bodies_withheld", {}).items():
            withheld[reason] = withheld.get(reason, 0) + n
        for result, n in snap.get("maintenance", {}).items():
            maintenance[result] = maintenance.get(result, 0) + n
        state = snap.get("database")
        if state in database:
            database[state] += 1

    fam = CounterMetricFamily("shadowproxy_requests", "Client requests answered, by route "
                              "and status code.", labels=["route", "code"])
    for (route, code), n in sorted(requests.items()):
        fam.add_metric([route, code], n)
    yield fam

    hist = HistogramMetricFamily("shadowproxy_upstream_latency_seconds",
                                 "Latency of upstream calls (primary and shadows).",
                                 labels=["route", "target"])
    for (route, target), (counts, sum_ms) in sorted(latency.items()):
        cumulative, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        hist.add_metric([route, target], buckets, sum_ms / 1000.0)
    yield hist

    fam = CounterMetricFamily("shadowproxy_shadow_requests", "Shadow calls by outcome.",
                              labels=["route", "shadow", "outcome"])
    for (route, name, outcome), n in sorted(shadow.items()):
        fam.add_metric([route, name, outcome], n)
    yield fam

    fam = CounterMetricFamily("shadowproxy_shadow_set_json_skipped", "Requests sent to a "
                              "shadow without its set_json edits: the body was not a JSON "
                              "object they fit.", labels=["route", "shadow"])
    for (route, name), n in sorted(set_json_skipped.items()):
        fam.add_metric([route, name], n)
    yield fam

    fam = CounterMetricFamily("shadowproxy_records", "Exchange records by what became of "
                              "them.", labels=["outcome"])
    for outcome in RECORD_OUTCOMES:
        fam.add_metric([outcome], records[outcome])
    yield fam

    yield GaugeMetricFamily("shadowproxy_recorder_queue_records",
                            "Records waiting in memory for the database writer.", value=queue)

    info = GaugeMetricFamily("shadowproxy_config_info", "The configuration version running "
                             "(a short hash of its normalized content).", labels=["version"])
    for version in sorted(versions):
        info.add_metric([version], 1)
    yield info

    fam = CounterMetricFamily("shadowproxy_config_reloads", "Configuration reloads, by "
                              "result: applied, or rejected (the file was invalid).",
                              labels=["result"])
    for result, n in reloads.items():
        fam.add_metric([result], n)
    yield fam

    fam = CounterMetricFamily("shadowproxy_bodies_withheld", "Bodies not stored because "
                              "they could not be redacted (recording.redact_json) or PostgreSQL "
                              "refused their record, by reason.",
                              labels=["reason"])
    for reason, n in sorted(withheld.items()):
        fam.add_metric([reason], n)
    yield fam

    yield GaugeMetricFamily("shadowproxy_database_up", "1 while records go straight to "
                            "PostgreSQL, 0 while they go to the spool because it cannot be "
                            "used (summed over workers).", value=database["up"])
    errors = GaugeMetricFamily("shadowproxy_database_error", "1 while the database cannot "
                               "be used, by class: transient (an outage: it passes) or "
                               "permanent (a wrong password, database name or TLS setting: "
                               "the operator must fix it); summed over workers.",
                               labels=["class"])
    for kind in DATABASE_ERROR_CLASSES:
        errors.add_metric([kind], database[kind])
    yield errors

    fam = CounterMetricFamily("shadowproxy_storage_maintenance", "Runs of the storage "
                              "maintenance (partitions created ahead, retention), by result: "
                              "ok, or failed (logged; tried again at the next interval).",
                              labels=["result"])
    for result, n in maintenance.items():
        fam.add_metric([result], n)
    yield fam


class SnapshotCollector:
    """A prometheus_client collector over a function returning snapshots."""

    def __init__(self, snapshots: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        return families(self._snapshots())
