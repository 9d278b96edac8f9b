"""Summarise a bench/run.sh result: ratios against nginx, Envoy and direct, and the record check.

    python bench/summarize.py RESULTS_DIR DATABASE_URL

Reads the harness's results.json and the proxy's log (one ``stopped: served=… written=…``
line per shadowproxy run), prints a Markdown table of medians (with the range over the
repetitions) with each shadowproxy build's figures as ratios to nginx's mirror, Envoy's
mirror, direct, and its own fast-shadow run, with the hypervisor's steal share of the
machine's CPU time during the runs and the proxy's core's speed (the CPU time of fixed
interpreter and kernel work on CPU 0, bench/speed.py) when bench/run.sh recorded them, and
checks that every request shadowproxy
answered was recorded: the database (after ``bench/store_spool.py``) holds as many requests
as the runs' stop lines say were answered, and every run reached its stop line. The
targets named ``shadowproxy`` (the compiled build, as ``bench/run.sh`` starts it) and
``shadowproxy-pure`` (``BENCH_PURE_TOO=1``) are ours. A target named ``unrecorded`` (the tree of
``bench/unrecorded_tree.py``, given with ``--proxy``) is shown beside them and left out of
the record check, which it fails by construction.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import speed  # bench/speed.py
import steal  # bench/steal.py
from localhost import stored_requests  # bench/localhost.py

OURS = ("shadowproxy", "shadowproxy-pure")
MEASURING = ("unrecorded",)
"""Targets that run shadowproxy recording nothing, to measure what the recording costs."""
SHADOWPROXY_START = re.compile(r" shadowproxy\[\d+\]: listening on ")
"""The line each shadowproxy process logs when it serves: marks a target's log as ours."""


Key = tuple[str, str, int]
"""(scenario, target, connections)"""
_STOP = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+(?:[+-]\d\d:\d\d)?) "
                   r".*stopped: served=(\d+) written=(\d+) spooled=(\d+) dropped=(\d+)"
                   r"(?: stop_cpu_s=([\d.]+))?", re.M)
"""A stop line: its time, served, written, spooled, dropped and (since it is logged) the
stop's CPU seconds. The time as the text log writes it, UTC with its offset
(``2026-12-06T06:48:19.367+00:00``), or, from builds before that, local time without a zone
(``2026-12-06 06:48:19,367``): a benchmark may compare one with the other."""


def stop_time(text: str) -> float:
    """A stop line's time (``_STOP``'s first group) as Unix seconds."""
    return datetime.fromisoformat(text.replace(",", ".")).timestamp()


def medians(runs: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    grouped: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[(run["scenario"], run["target"], int(run["conns"]))].append(run)
    out = {}
    for key, group in grouped.items():
        row = {}
        for field in ("rps", "p50_ms", "p99_ms", "proxy_cpu_us_per_req", "errors",
                      "shadow_ratio"):
            values = [r[field] for r in group if r.get(field) is not None]
            row[field] = statistics.median(values) if values else float("nan")
            row[field + "_range"] = (min(values), max(values)) if values else None
        row["reps"] = len(group)
        out[key] = row
    return out


def spread(bounds: tuple[float, float] | None, fmt: str) -> str:
    return "–" if bounds is None else f"{fmt.format(bounds[0])}–{fmt.format(bounds[1])}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and b == b and a == a else "–"


@dataclass
class AfterWindow:
    """What one run (all its repetitions) cost after its measured windows."""

    answered: float = 0.0
    """Requests its proxies answered (their stop lines' served=)."""
    left_spooled: float = 0.0
    """Records its stops left in the spool."""
    stored_cpu_s: float = 0.0
    """CPU seconds that storing them took afterwards (bench/store_spool.py)."""
    stop_cpu_s: float = 0.0
    """CPU seconds of its stops (their stop lines' stop_cpu_s)."""
    stops_told: int = 0
    """Stop lines that carried stop_cpu_s (those of versions before it do not)."""

    def stop_us(self) -> float | None:
        """The stops' CPU per request answered, µs; None when unknown."""
        return 1e6 * self.stop_cpu_s / self.answered if self.answered and self.stops_told \
            else None

    def stored_us(self) -> float | None:
        """The later storing's CPU per request answered, µs; None when nothing answered."""
        return 1e6 * self.stored_cpu_s / self.answered if self.answered else None


def all_in(window_us: float, after: AfterWindow | None) -> str:
    """A run's CPU per request with what it cost after its measured window: its stops and
    the later storing of what they left spooled (``stored_later``), per request answered.
    "–" where either is unknown (not ours, or stop lines from before ``stop_cpu_s``)."""
    stop = None if after is None else after.stop_us()
    stored = None if after is None else after.stored_us()
    if stop is None or stored is None or window_us != window_us:
        return "–"
    return f"{window_us + stop + stored:.0f}"


def main() -> None:
    out = Path(sys.argv[1])
    url = sys.argv[2] if len(sys.argv) > 2 else "postgresql:///nonexistent"
    data = json.loads((out / "results.json").read_text())
    table = medians(data["runs"])
    connections = sorted({c for _, _, c in table})
    scenarios = sorted({s for s, _, _ in table}, key=lambda s: ["fast", "echo5ms",
                       "echoslowshadow", "slowshadow", "blackhole"].index(s)
                       if s in ("fast", "echo5ms", "echoslowshadow", "slowshadow",
                                "blackhole") else 99)
    # Every target that ran shadowproxy (also one given with --proxy beside the two builds):
    # they all record into the one database the check counts.
    texts = {path.name.removeprefix("proxy-").removesuffix(".log"):
             path.read_text(errors="replace") for path in (out / "logs").glob("proxy-*.log")}
    started = {target for target, text in texts.items() if SHADOWPROXY_START.search(text)}
    recording = started - set(MEASURING)
    later = stored_later(out, started, texts)
    print("| scenario | conns | target | req/s (range) | p50 ms | p99 ms (range) | proxy µs/req "
          "(range) | µs/req with stops and stored later | rps ÷ nginx mirror | "
          "rps ÷ Envoy mirror | rps ÷ direct | p50 ÷ fast | p99 ÷ fast | steal % (range) | "
          "CPU 0 probe µs: interpreter / kernel |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    logged = (out / "harness.log").exists()
    steals = (steal.by_run(out / "harness.log", out / "steal.tsv")
              if (out / "steal.tsv").exists() and logged else {})
    speeds = (speed.by_run(out / "harness.log", out / "speed.tsv", 0)
              if (out / "speed.tsv").exists() and logged else {})
    for scenario, conns, target in ((s, c, t) for s in scenarios for c in connections
                                    for t in ("direct", "nginx-mirror", "envoy-mirror", *OURS,
                                              *MEASURING)):
        row = table.get((scenario, target, conns))
        if row is None:
            continue
        cells = [scenario, str(conns), target,
                 f"{row['rps']:,.0f} ({spread(row['rps_range'], '{:,.0f}')})",
                 f"{row['p50_ms']:.2f}",
                 f"{row['p99_ms']:.2f} ({spread(row['p99_ms_range'], '{:.2f}')})",
                 "–" if row["proxy_cpu_us_per_req"] != row["proxy_cpu_us_per_req"]
                 else f"{row['proxy_cpu_us_per_req']:.0f} "
                      f"({spread(row['proxy_cpu_us_per_req_range'], '{:.0f}')})",
                 all_in(row["proxy_cpu_us_per_req"], later.get((scenario, target, conns)))]
        if target in OURS or target in MEASURING:
            fast = table.get(("fast", target, conns), {})
            nginx = table.get((scenario, "nginx-mirror", conns), {})
            envoy = table.get((scenario, "envoy-mirror", conns), {})
            direct = table.get((scenario, "direct", conns), {})
            cells += [ratio(row["rps"], nginx.get("rps", float("nan"))),
                      ratio(row["rps"], envoy.get("rps", float("nan"))),
                      ratio(row["rps"], direct.get("rps", float("nan"))),
                      ratio(row["p50_ms"], fast.get("p50_ms", float("nan"))),
                      ratio(row["p99_ms"], fast.get("p99_ms", float("nan")))]
        else:
            cells += [""] * 5
        shares = [100 * x for x in steals.get((scenario, target, conns), [])]
        cells.append("–" if not shares else f"{statistics.median(shares):.1f} "
                     f"({spread((min(shares), max(shares)), '{:.1f}')})")
        probes = speeds.get((scenario, target, conns), [])
        cells.append("–" if not probes else
                     f"{statistics.median(p[0] for p in probes):.0f} / "
                     f"{statistics.median(p[1] for p in probes):.0f}")
        print("| " + " | ".join(cells) + " |")

    log = "".join(texts[target] for target in sorted(recording))
    stops = [tuple(map(int, m.groups()[1:5])) for m in _STOP.finditer(log)]
    served = sum(s[0] for s in stops)
    dropped = sum(s[3] for s in stops)
    ours = [r for r in data["runs"] if r["target"] in recording]
    completed = sum(r["requests"] for r in ours)
    # One proxy start per run; a run without a stop line was killed by the harness, and
    # what it answered is unknown (what it spooled is stored by a later start).
    killed = len(ours) - len(stops)

    try:
        rows: int | None = stored_requests(url)
    except (OSError, asyncpg.PostgresError):
        rows = None  # the benchmark's database is gone: check the proxy's own counts only
    held = "not reachable any more" if rows is None else f"holds {rows:,} requests"
    if any(v.left_spooled for v in later.values()):
        print()
        print("After the measured windows (one data folder per start): the CPU each run's "
              "stops took (the last calls, the queue's flush and the spool within the grace; "
              "their stop lines' stop_cpu_s), what they left spooled, and the CPU that "
              "storing it took afterwards (bench/store_spool.py), per request the run "
              "answered (warm-ups included):")
        print()
        print("| scenario | conns | target | answered | stops, µs/req | left spooled | "
              "stored later, µs/req |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for key in sorted(later, key=lambda k: (scenarios.index(k[0]) if k[0] in scenarios
                                                 else 99, k[2], k[1])):
            run = later[key]
            stored, stop = run.stored_us(), run.stop_us()
            print(f"| {key[0]} | {key[2]} | {key[1]} | {run.answered:,.0f} | "
                  f"{'–' if stop is None else f'{stop:.1f}'} | {run.left_spooled:,.0f} | "
                  f"{'–' if stored is None else f'{stored:.1f}'} |")
    ok = killed == 0 and dropped == 0 and rows in (None, served) and completed <= served
    unknown = (f"; {killed} killed before their stop line, their count unknown"
               if killed else "")
    whole = speed.overall(out / "speed.tsv", 0) if (out / "speed.tsv").exists() else None
    if whole is not None:
        print()
        print(f"CPU 0 probes over the whole benchmark (bench/speed.py): interpreter "
              f"{whole[0]:.0f} µs, kernel {whole[1]:.0f} µs (medians; the same work, so a "
              f"run's larger figure means a slower core in its minutes).")
    print()
    print(f"Record check over {len(ours)} shadowproxy runs{unknown}: wrk completed "
          f"{completed:,} requests in the measured windows; shadowproxy answered {served:,} "
          f"(warm-ups included), {dropped:,} records dropped; after the spool left by the "
          f"last stop was stored, the database {held}. {'OK' if ok else 'MISMATCH'}.")


def stored_later(out: Path, ours: set[str], texts: dict[str, str]) -> dict[Key, AfterWindow]:
    """By run key, what the run cost after its measured windows (``AfterWindow``):
    ``bench/store_spool.py``'s figures for each start's data folder and the runs' stop lines
    (``stop_cpu_s``: what the stop took, after the measured window), each placed in its
    run's span of the harness's log."""
    figures_path = out / "store_spool.json"
    if not figures_path.exists() or not (out / "harness.log").exists():
        return {}
    figures = json.loads(figures_path.read_text())
    stops = [(stop_time(m[1]), int(m[2]),
              None if m[6] is None else float(m[6]))
             for target in ours for m in _STOP.finditer(texts[target])]
    moments = [t for t, _, _ in stops] + [f["started_ns"] / 1e9 for f in figures]
    if not moments:
        return {}
    runs = [r for r in steal.spans(out / "harness.log", min(moments) - 60) if r[0][1] in ours]
    # The log's times are whole seconds, each run's line written after its proxy stopped:
    # a start falls in the last of our runs begun by then, a stop in the first not ended.
    totals: dict[Key, AfterWindow] = defaultdict(AfterWindow)
    for moment, served, stop_cpu in stops:
        key = next((k for k, _, end in runs if moment < end + 1), None)
        if key is not None:
            totals[key].answered += served
            if stop_cpu is not None:  # stop lines of versions before stop_cpu_s lack it
                totals[key].stop_cpu_s += stop_cpu
                totals[key].stops_told += 1
    for figure in figures:
        begun = [k for k, start, _ in runs if start <= figure["started_ns"] / 1e9]
        if begun:
            totals[begun[-1]].left_spooled += figure["stored"]
            totals[begun[-1]].stored_cpu_s += figure["cpu_s"]
    return dict(totals)


if __name__ == "__main__":
    main()
