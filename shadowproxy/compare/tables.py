"""The report's JSON laid out as titled tables, shared by the text, Markdown and HTML renderers.

Each renderer only decides how a ``Section`` looks; what is shown, in which order and with
which number format is decided once here, from the JSON alone (a report saved with
``--format json`` renders the same later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""


@dataclass
class TextComparison:
    """Two texts side by side and their word-level diff: ``(op, primary, shadow)`` runs,
    ``op`` one of equal, delete, insert, replace (``generation.DiffSegment``). Each side's
    tool calls, as ``→ name(arguments)``, are shown below its text (``shown``); they are
    kept apart so that the text report can write a text's own line breaks as escapes and
    still put each call on a line of its own."""

    title: str
    primary: str
    shadow: str
    diff: list[tuple[str, str, str]]
    primary_calls: list[str] = field(default_factory=list)
    shadow_calls: list[str] = field(default_factory=list)

    def shown(self, side: str) -> str:
        """A side's text, then its tool calls, a line each."""
        text, calls = ((self.primary, self.primary_calls) if side == "primary"
                       else (self.shadow, self.shadow_calls))
        return "\n".join(([text] if text else []) + calls)


@dataclass
class Section:
    key: str
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    comparisons: list[TextComparison] = field(default_factory=list)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for people: integers as is, floats to ``digits`` significant figures."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def pval(test: dict[str, Any] | None) -> str:
    if not test or test.get("p_value") is None:
        return "–"
    return fmt(test["p_value"], 3)


def config_version_notes(m: dict[str, Any]) -> list[str]:
    """What the report says about the configuration versions in its window."""
    versions = m.get("config_versions") or []
    listed = ", ".join(f"{v['version'] or '(none)'} ({v['requests']:,} requests, "
                       f"{v['first']} → {v['last']})" for v in versions)
    if m.get("config_version"):
        return [f"configuration version {m['config_version']} only"
                + (f", of {len(versions)} in the window: {listed}" if len(versions) > 1
                   else "")]
    if len(versions) > 1:
        return [f"the window spans {len(versions)} configuration versions, reported together: "
                f"{listed}; --config-version V reports on one"]
    return []


def sample_notes(m: dict[str, Any]) -> list[str]:
    """What the report says about its sample: population and sample sizes, what is exact,
    and the counts estimated for the whole window."""
    sample = m.get("sample")
    if not sample:
        return []
    if not sample["sampled"]:
        return [f"every pair of the window was read ({sample['population']:,} pairs, at most "
                f"--max-pairs {sample['max_pairs']:,} are read whole)"]
    notes = [f"sampled: {sample['size']:,} of {sample['population']:,} pairs "
             f"({pct(sample['fraction'])}), a uniform sample of whole requests (--max-pairs "
             f"{sample['max_pairs']:,}, --seed {sample['seed']}); counts, error rates, mean "
             "latencies and status agreement cover every pair; tests, percentiles, "
             "histograms, the field diff, data checks and slices read the sample, and their "
             "p-values and intervals are those of the sample's size"]
    for name, e in sample.get("estimates", {}).items():
        notes.append(f"estimated for the window: {name.replace('_', ' ')} {e['estimate']:,} "
                     f"(95% interval {e['ci_low']:,} to {e['ci_high']:,}; "
                     f"{e['in_sample']:,} of {e['of_sample']:,} in the sample)")
    return notes


def _header(r: dict[str, Any]) -> Section:
    m = r["meta"]
    v = r["verdict"]
    s = Section("verdict", f"Verdict: {v['status'].upper()}")
    replayed = m.get("shadow_role") in ("replay", "mixed")
    s.notes.append(f"route {m['route']}, shadow {m['shadow']}"
                   + (" (replayed with shadowproxy replay)" if replayed else "")
                   + (f", baseline {m['baseline_shadow']}" if m.get("baseline_shadow") else "")
                   + f"; window {m['window']['start']} → {m['window']['end']}")
    s.notes += config_version_notes(m)
    s.notes += sample_notes(m)
    if v["reasons"]:
        s.tables.append(Table(["level", "section", "reason"],
                              [[x["level"], x["section"], x["message"]] for x in v["reasons"]]))
    else:
        s.notes.append("no rule fired")
    return s


def _counts(r: dict[str, Any]) -> Section:
    c = r["counts"]
    rows = [[k.replace("_", " "), pct(c[k]) if k == "pair_completeness" else fmt(c[k])]
            for k in ("requests", "pairs", "complete_pairs", "comparable_pairs",
                      "pair_completeness", "requests_without_pair", "shadow_timeouts",
                      "shadow_drops", "shadow_skips", "shadow_errors", "shadow_5xx",
                      "primary_failures", "replayed_pairs") if k in c]
    return Section("counts", "Counts", tables=[Table(["", "value"], rows)])


def _operational(r: dict[str, Any]) -> Section:
    o = r["operational"]
    compared = o.get("latency_compared", True)
    rows = []
    for side in ("primary", "shadow"):
        lat = o[side]["latency_ms"]
        label = side if compared or side == "primary" else "shadow (under replay)"
        rows.append([label, fmt(o[side]["n"]), fmt(lat["p50"]), fmt(lat["p95"]),
                     fmt(lat["p99"]), fmt(lat["max"]), pct(o[side]["error_rate"])])
    s = Section("operational", "Operational", tables=[Table(
        ["side", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "error rate"], rows)])
    if not compared:
        s.notes.append(o.get("latency_note", "latency not compared"))
    s.notes.append(f"status codes agree on {pct(o['status_agreement'])} of complete pairs")
    outcomes = o.get("outcomes")
    if outcomes:
        words = list(outcomes["shadow"])
        s.tables.append(Table(["side", *words],
                              [[side, *[fmt(outcomes[side].get(w, 0)) for w in words]]
                               for side in ("primary", "shadow")],
                              title="calls by outcome (ok, or the kind of failure)"))
    return s


def _predictions(r: dict[str, Any]) -> Section:
    p = r["predictions"]
    s = Section("predictions", f"Predictions ({p['task']}, {p['task_source']})")
    if p.get("pairs_not_numbers"):
        s.notes.append(f"{fmt(p['pairs_not_numbers'])} paired predictions at {p['path']} "
                       "are not numbers on both sides (a string, a boolean, past float8's "
                       "range): left out")
    if not p.get("n"):
        s.notes.append(f"no paired {'numbers' if p.get('pairs_not_numbers') else 'predictions'} "
                       f"at {p['path']}")
        return s
    if p["task"] == "regression":
        rows = [["n", fmt(p["n"])], ["MAE", fmt(p["mae"])], ["RMSE", fmt(p["rmse"])],
                ["max |diff|", fmt(p["max_abs_diff"])],
                ["mean diff (shadow − primary)", fmt(p["mean_diff"])],
                ["median diff", fmt(p["median_diff"])],
                ["Pearson r", fmt(p["pearson"]["r"])],
                ["Spearman ρ", fmt(p["spearman"]["r"])],
                ["within tolerance", pct(p["within_tolerance"])
                 + f" (abs {p['tolerance']['abs']}, rel {p['tolerance']['rel']})"],
                *_paired_rows(p), _columns_row(p)]
        s.tables.append(Table(["", "value"], rows))
        if p.get("differences_beyond_float8"):
            s.notes.append(f"{fmt(p['differences_beyond_float8'])} differences of paired "
                           "predictions are past float8's range (±1.8e308): a figure that "
                           "large (the largest |diff|, the extreme quantiles of the "
                           "differences) is shown as – (null in JSON); the differences "
                           "histogram puts them in its end bins")
        side_rows = [[side] + [fmt(p[side][k]) for k in ("mean", "sd", "min", "median", "max")]
                     for side in ("primary", "shadow")]
        s.tables.append(Table(["side", "mean", "sd", "min", "median", "max"], side_rows))
        if p.get("worst"):
            s.tables.append(Table(["request id", "index", "primary", "shadow", "|diff|"], [
                [w["request_id"], str(w["index"]), fmt(w["primary"]), fmt(w["shadow"]),
                 fmt(w["abs_diff"])] for w in p["worst"]], title="largest differences"))
    else:
        rows = [["n", fmt(p["n"])], ["agreement", pct(p["agreement"])],
                ["Cohen's kappa", fmt(p["kappa"])]]
        if p.get("positive_rate"):
            pr = p["positive_rate"]
            rows.append([f"positive rate ({p['positive_class']})",
                         f"{pct(pr['primary'])} → {pct(pr['shadow'])} ({pct(pr['diff'])})"])
        rows += [*_paired_rows(p), _columns_row(p)]
        s.tables.append(Table(["", "value"], rows))
        classes, counts, folded = folded_flip_matrix(p["flip_matrix"])
        title = "flip matrix"
        if folded:
            title += (f" (the {len(classes) - 1} classes in the most pairs; the other "
                      f"{folded} summed in the last row and column; every class in the JSON)")
        s.tables.append(Table(["primary \\ shadow", *classes],
                              [[c, *[fmt(n) for n in row]]
                               for c, row in zip(classes, counts, strict=True)],
                              title=title))
    if p.get("baseline_noise"):
        b = p["baseline_noise"]
        detail = (f"MAE {fmt(b['mae'])}, RMSE {fmt(b['rmse'])}" if p["task"] == "regression"
                  else f"agreement {pct(b['agreement'])}")
        s.notes.append(f"noise floor (primary vs baseline {b['shadow']}): n {fmt(b['n'])}, "
                       + detail)
    return s


FLIP_MATRIX_CLASSES = 10
"""The classes the flip matrix shows; the others are summed in one row and column."""


def folded_flip_matrix(fm: dict[str, Any]) -> tuple[list[str], list[list[int]], int]:
    """The flip matrix as people read it: ``(classes, counts, folded)``. With more than
    ``FLIP_MATRIX_CLASSES`` classes, those in the most pairs (predicted by either side) are
    kept in their order and the ``folded`` others are summed in a last row and column,
    ``(N others)``: a matrix of every class (64, 150 ids predicted as classes) was a mass
    of columns no terminal, page or plot could show. The JSON keeps every class."""
    classes, counts = fm["classes"], fm["counts"]
    k = len(classes)
    if k <= FLIP_MATRIX_CLASSES + 1:  # folding a single class into "others" hides it for nothing
        return classes, counts, 0
    pairs = [sum(counts[i]) + sum(row[i] for row in counts) - counts[i][i] for i in range(k)]
    top = sorted(sorted(range(k), key=lambda i: (-pairs[i], i))[:FLIP_MATRIX_CLASSES])
    at = dict.fromkeys(range(k), len(top)) | {i: n for n, i in enumerate(top)}
    folded = [[0] * (len(top) + 1) for _ in range(len(top) + 1)]
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            folded[at[i]][at[j]] += n
    return [classes[i] for i in top] + [f"({k - len(top)} others)"], folded, k - len(top)


def _paired_rows(p: dict[str, Any]) -> list[list[str]]:
    """The paired test that decides: its effect, its p-value and what it concluded."""
    t = p.get("paired")
    if not t:
        return []
    if p["task"] == "regression":
        ci = (f" (95% CI {fmt(t['ci_low'])} to {fmt(t['ci_high'])})"
              if t.get("ci_low") is not None else "")
        effect = ["mean shift, by request", fmt(t["mean_shift"]) + ci]
    else:
        f = t.get("largest")
        effect = ["largest one-way flip", "–" if not f else
                  f"{f['a']} → {f['b']} {fmt(f['a_to_b'])}, back {fmt(f['b_to_a'])} "
                  f"(net {pct(f['net_share'])})"]
    return [effect, [f"paired test ({t['test']}, {fmt(t['requests'])} requests)",
                     f"p = {pval(t)}" + (" — DIFFERS" if t.get("decision") else "")]]


def _columns_row(p: dict[str, Any]) -> list[str]:
    d = p.get("distribution_test") or {}
    return [f"columns as distributions ({d.get('test') or '–'}, information)",
            fmt(d.get("statistic")) + (f", p = {pval(d)}" if d.get("p_value") is not None
                                       else "")]


def _performance(r: dict[str, Any]) -> Section:
    p = r["performance"]
    s = Section("performance", "Performance on labels")
    s.notes.append(f"labelled for both: {fmt(p['labels']['labelled_both'])} of "
                   f"{fmt(p['labels']['predictions'])} predictions "
                   f"({pct(p['labels']['coverage'])})")
    if p.get("why"):
        s.notes.append(p["why"])
        return s
    keys = [k for k in ("mse", "rmse", "mae", "r2", "accuracy", "precision", "recall", "f1",
                        "roc_auc") if k in p["primary"]]
    s.tables.append(Table(["metric", "primary", "shadow"],
                          [[k, *[_metric(p[side], k) for side in ("primary", "shadow")]]
                           for k in keys]))
    t = p["paired_test"]
    s.notes.append(f"paired test {t['test']}: p = {pval(t)}; shadow "
                   + ("better" if p["shadow_better"] else "not better"))
    ci = p.get("confidence_intervals", {})
    if "why" in ci:
        s.notes.append(ci["why"])
    else:
        s.tables.append(Table(["95% CI", "low", "high"], [
            [k, fmt(v[0]), fmt(v[1])] for k, v in ci.items() if isinstance(v, list)]))
    return s


def _metric(metrics: dict[str, Any], key: str) -> str:
    """A metric, or – with the reason it is missing when the JSON gives one
    (``roc_auc_why``): a bare – on labels of one class read as a failure to compute."""
    why = metrics.get(f"{key}_why")
    return f"– ({why})" if metrics[key] is None and why else fmt(metrics[key])


def _diff(r: dict[str, Any]) -> Section:
    d = r["diff"]
    s = Section("diff", "Response diff")
    s.notes.append(f"identical after ignore: {fmt(d['identical'])} of "
                   f"{fmt(d['compared_pairs'])} ({pct(d['identical_share'])})"
                   + (f"; a seeded sample of the {fmt(d['comparable_pairs'])} comparable pairs"
                      if d["sampled"] else ""))
    cut = d.get("cut_short") or {}
    if any(cut.values()):
        s.notes.append(f"answers cut short by a failed call (the client left, a timeout, a "
                       f"reset), their pairs not compared: primary {fmt(cut['primary'])}, "
                       f"shadow {fmt(cut['shadow'])}")
    if "identical_share_excluding_noise" in d:
        s.notes.append(f"identical excluding noise fields {d['noise_fields']}: "
                       f"{pct(d['identical_share_excluding_noise'])}")
    headers = ["field", "present", "differs", "rate"]
    if "baseline_shadow" in d:
        headers += ["noise rate", "noise"]
    rows = []
    for f in d["fields"][:25]:
        row = [f["field"], fmt(f["n_present"]), fmt(f["n_differ"]), pct(f["rate"])]
        if "baseline_shadow" in d:
            row += [pct(f.get("noise_rate")), fmt(f.get("noise"))]
        rows.append(row)
    if rows:
        s.tables.append(Table(headers, rows))
    if d.get("worst"):
        s.tables.append(Table(["request id", "fields differing", "fields"], [
            [w["request_id"], fmt(w["fields_differing"]), ", ".join(w["fields"][:6])]
            for w in d["worst"]], title="most different pairs"))
    return s


def _data_checks(r: dict[str, Any]) -> Section:
    d = r["data_checks"]
    s = Section("data_checks", "Data checks")
    if not d.get("features"):
        s.notes.append(d.get("why", "no features"))
        return s
    ref = d["reference"]
    s.notes.append("reference: " + (ref["path"] if ref["kind"] == "file" else
                                    f"the earlier window {ref['start']} → {ref['end']}"))
    rows = []
    for f in d["features"]:
        dist, miss = f.get("distribution") or {}, f.get("missing") or {}
        cur, refs = f["current"], f["reference"] or {}
        failed = "; ".join(f["checks"]["failed"]) or "ok"
        effect = "–"
        if dist.get("size") is not None:
            short = _EFFECTS.get(dist["effect"], dist["effect"])
            effect = f"{short} {fmt(dist['size'], 3)} (max {fmt(dist['threshold'])})"
        rows.append([f["name"], f["type"], fmt(cur["n"]),
                     f"{pct(refs.get('missing_share'))} → {pct(cur['missing_share'])}",
                     f"{fmt(refs.get('mean'))} → {fmt(cur['mean'])}", f.get("levels") or "–",
                     effect, fmt(dist.get("p_adjusted"), 3), fmt(miss.get("p_adjusted"), 3),
                     "DRIFT" if f.get("drift") else "–", failed])
    correction = d.get("correction", "holm").title()
    s.tables.append(Table(["feature", "type", "n", "missing ref → cur", "mean ref → cur",
                           "levels", "effect", f"p ({correction})",
                           f"missing p ({correction})", "drift", "value checks"], rows))
    s.notes.append(f"drift: an effect over its maximum and a p-value under {d.get('alpha')} "
                   f"after {correction}'s correction over {d.get('tests')} tests; "
                   "W: normalised Wasserstein distance, TV: total variation distance")
    for f in d["features"]:
        for check in (f.get("distribution") or {}, f.get("missing") or {}):
            if check.get("drift"):
                s.notes.append(f"{f['name']}: {check.get('explanation')}")
    return s


_EFFECTS = {"wasserstein_normed": "W", "total_variation": "TV"}


def empty_slices_note(families: list[str]) -> str:
    """The note naming the configured slices no pair of the window falls in."""
    return (f"no pair in the window falls in {', '.join(families)} (compare.slices): check "
            "the condition, or the feature's name and bins")


def _slices(r: dict[str, Any]) -> Section:
    d = r["slices"]
    s = Section("slices", "Slices")
    if d.get("empty"):
        s.notes.append(empty_slices_note(d["empty"]))
    if not d.get("slices"):
        s.notes.append(d.get("why", "no slices with data"))
        return s
    regression = "mae" in d["whole"]
    metric = "mae" if regression else "agreement"
    sampled = d["whole"].get("sampled", False)
    if sampled:
        s.notes.append("the slices and the whole read the sampled pairs (meta.sample): n "
                       "counts the sample's rows")
    rows = [["(whole sample)" if sampled else "(whole)", fmt(d["whole"]["n"]),
             fmt(d["whole"].get(metric)), "–", "–", ""]]
    for x in d["slices"]:
        rows.append([x["slice"], fmt(x["n"]), fmt(x.get(metric)), pval(x["test"]),
                     fmt(x["test"].get("p_value_adjusted"), 3),
                     "FLAG" if x.get("flagged") else
                     ("" if x["test"].get("test") else x["test"].get("why") or "")])
    method = d.get("multiple_testing", {}).get("method", "holm").title()
    s.tables.append(Table(["slice", "n", metric, "p", f"p adj ({method})", ""], rows))
    for family, t in d.get("families", {}).items():
        if t.get("test"):
            s.notes.append(f"{family}: {t['test']} across bins, p = {pval(t)}")
    return s


def sections(report: dict[str, Any]) -> list[Section]:
    """Every section of the report, verdict first (a generation route's own sections
    instead of predictions, performance and slices)."""
    if "generation" in report:
        from shadowproxy.compare.tables_generation import generation_sections

        return [_header(report), _counts(report), _operational(report),
                *generation_sections(report["generation"]), _diff(report),
                _data_checks(report)]
    return [_header(report), _counts(report), _operational(report), _predictions(report),
            _performance(report), _diff(report), _data_checks(report), _slices(report)]
