"""Building the report: ask ``query.py`` for aggregates and samples, hand them to the pure
statistics, and assemble the canonical JSON document (see docs/report.md for every key).

``build_report`` is the one entry point; ``progress(step)`` is called before each of the
steps in ``STEPS`` so that the command can show a progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from shadowproxy import __version__
from shadowproxy.compare import checks, stats
from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.metrics import classification_performance, regression_performance
from shadowproxy.compare.query import HIST_BINS, ReportQuery, Window
from shadowproxy.compare.reference import FeatureData, from_summary, read_reference
from shadowproxy.compare.verdict import verdict

STEPS = ("counts and latency", "predictions", "labels", "field diff", "data checks", "slices",
         "verdict")
Progress = Callable[[str], None]
SEED = 20240601
CLASSIFICATION_MAX_CLASSES = 10


def _f(v: Any) -> float | None:
    return None if v is None else stats.num(v)


def infer_task(compare: CompareConfig, shape: dict[str, Any]) -> tuple[str, str]:
    """regression or classification: from the config, else from the predictions' values."""
    if compare.task is not None:
        return compare.task, "config"
    if shape["n"] and shape["n_numeric"] == shape["n"]:
        if shape["integral"] and shape["distinct_primary"] <= CLASSIFICATION_MAX_CLASSES:
            return "classification", (f"inferred: integers with at most "
                                      f"{CLASSIFICATION_MAX_CLASSES} distinct values")
        return "regression", "inferred: numeric predictions"
    return "classification", "inferred: not every prediction is a number"


def positive_class(compare: CompareConfig, classes: set[str]) -> str | None:
    """The configured positive class, else "1" or "true" when the classes are binary."""
    if compare.positive_class is not None:
        pc = compare.positive_class
        return ("true" if pc else "false") if isinstance(pc, bool) else str(pc)
    if classes <= {"0", "1"}:
        return "1"
    if classes <= {"false", "true"}:
        return "true"
    return None


async def _regression(q: ReportQuery, th: Any, compare: CompareConfig) -> dict[str, Any]:
    out = await q.regression_summary()
    n = out["n"]
    if not n:
        return out
    p, s = await q.regression_sample(n)
    r = out.pop("pearson_sql")
    pearson: dict[str, Any] = {"r": r, "p_value": None}
    if r is not None and n > 2:
        from scipy import stats as sps

        if abs(r) >= 1:
            pearson["p_value"] = 0.0
        else:
            t = r * math.sqrt((n - 2) / (1 - r * r))
            pearson["p_value"] = _f(2 * sps.t.sf(abs(t), n - 2))
    out["pearson"] = pearson
    out["spearman"] = stats.correlation(p, s, "spearman")
    out["wilcoxon"] = stats.wilcoxon(s - p)
    out["distribution_test"] = stats.numeric_drift(
        p, s, alpha=th.alpha, large_sample=th.large_sample, max_distance=th.max_distance)
    dt = out["distribution_test"]
    if dt.get("p_value") is not None:
        dt["drift"] = bool(dt["p_value"] < th.alpha)
    out["tolerance"] = {"abs": compare.abs_tolerance, "rel": compare.rel_tolerance,
                        "configured": bool(compare.abs_tolerance or compare.rel_tolerance)}
    out["sample"] = {"n": int(p.size), "of": n, "sampled": bool(p.size < n), "seed": q.seed,
                     "used_for": ["spearman", "wilcoxon", "distribution_test"]}
    return out


async def _classification(q: ReportQuery, th: Any, compare: CompareConfig) -> dict[str, Any]:
    cells = await q.flip_matrix()
    classes = sorted({c[0] for c in cells} | {c[1] for c in cells})
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for a, b, n in cells:
        matrix[index[a], index[b]] += n
    total = int(matrix.sum())
    out: dict[str, Any] = {"n": total}
    if not total:
        return out
    pc = positive_class(compare, set(classes))
    p_counts, s_counts = matrix.sum(axis=1), matrix.sum(axis=0)
    out.update({
        "agreement": float(np.trace(matrix) / total),
        "kappa": stats.kappa(matrix),
        "flip_matrix": {"classes": classes, "rows": "primary", "columns": "shadow",
                        "counts": matrix.astype(int).tolist()},
        "flips": [{"from": a, "to": b, "n": n, "share": n / total}
                  for a, b, n in sorted(cells, key=lambda c: -c[2]) if a != b][:20],
        "class_rates": {c: {"primary": float(p_counts[i] / total),
                            "shadow": float(s_counts[i] / total),
                            "diff": float((s_counts[i] - p_counts[i]) / total)}
                        for c, i in index.items()},
        "positive_class": pc,
        "distribution_test": stats.categorical_drift(
            {c: int(p_counts[i]) for c, i in index.items()},
            {c: int(s_counts[i]) for c, i in index.items()},
            alpha=th.alpha, large_sample=th.large_sample, max_js_distance=th.max_js_distance),
        "worst": await q.disagreements(),
    })
    if pc is not None and pc in index:
        pr, sr = p_counts[index[pc]] / total, s_counts[index[pc]] / total
        out["positive_rate"] = {"primary": float(pr), "shadow": float(sr),
                                "diff": float(sr - pr)}
    dt = out["distribution_test"]
    if dt.get("p_value") is not None:
        dt["drift"] = bool(dt["p_value"] < th.alpha)
    return out


async def _performance(q: ReportQuery, task: str, n_pred: int, compare: CompareConfig
                       ) -> dict[str, Any]:
    counts = await q.label_counts()
    labels = {"predictions": counts["n"], "labelled_both": counts["both_labelled"],
              "coverage": counts["both_labelled"] / counts["n"] if counts["n"] else None}
    out: dict[str, Any] = {"n_labelled": {"primary": counts["primary_labelled"],
                                          "shadow": counts["shadow_labelled"]},
                           "labels": labels}
    if not counts["both_labelled"]:
        out["why"] = ("no labelled predictions: load ground truth with "
                      "`shadowproxy labels import -c FILE LABELS.csv`")
        return out
    rows = await q.labelled_rows(counts["both_labelled"])
    out["sample"] = {"n": len(rows), "of": counts["both_labelled"],
                     "sampled": len(rows) < counts["both_labelled"]}
    if task == "regression":
        keep = [r for r in rows if r["pn"] is not None and r["sn"] is not None
                and _is_number(r["y"])]
        y = np.array([float(r["y"]) for r in keep])
        p = np.array([r["pn"] for r in keep], dtype=np.float64)
        s = np.array([r["sn"] for r in keep], dtype=np.float64)
        if not keep:
            out["why"] = "the labels are not numbers, but the task is regression"
            return out
        out.update(regression_performance(y, p, s, seed=SEED))
        return out
    y_t = np.array([_class_text(r["y"]) for r in rows])
    p_t = np.array([_class_text(r["pt"]) for r in rows])
    s_t = np.array([_class_text(r["st"]) for r in rows])
    pc = positive_class(compare, set(y_t) | set(p_t) | set(s_t))
    scores = [r["ps"] is not None and r["ss"] is not None for r in rows]
    ps = np.array([r["ps"] for r in rows], dtype=np.float64) if all(scores) and rows else None
    ss = np.array([r["ss"] for r in rows], dtype=np.float64) if all(scores) and rows else None
    out.update(classification_performance(y_t, p_t, s_t, pc, ps, ss, seed=SEED))
    out["positive_class"] = pc
    return out


def _is_number(text: Any) -> bool:
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


def _class_text(text: str | None) -> str:
    """Class labels compare as text; 1.0 and 1 name the same class."""
    if text is None:
        return ""
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if f.is_integer() and math.isfinite(f) else text


async def _diff(q: ReportQuery, comparable: int, baseline: str | None, th: Any
                ) -> dict[str, Any]:
    compared = await q.load_field_diff("shadow", comparable)
    if baseline:
        await q.load_field_diff("baseline", comparable, baseline)
    raw = await q.field_diff("shadow")
    noise = {r["field"]: r for r in await q.field_diff("baseline")} if baseline else {}
    fields, noise_fields = [], []
    for r in raw:
        rate = r["n_differ"] / r["n_present"] if r["n_present"] else 0.0
        entry: dict[str, Any] = {"field": r["field"], "n_present": r["n_present"],
                                 "n_differ": r["n_differ"], "rate": rate,
                                 "examples": list(r["examples"] or [])}
        if baseline:
            nr = noise.get(r["field"])
            n_rate = nr["n_differ"] / nr["n_present"] if nr and nr["n_present"] else 0.0
            entry["noise_rate"] = n_rate
            # Diffy's rule: a difference counts only if it clearly exceeds the noise.
            beyond = (rate > n_rate and abs(rate - n_rate) / (rate + n_rate) * 100 > 20
                      and abs(rate - n_rate) * 100 > 0.03)
            entry["noise"] = bool(n_rate > 0 and not beyond)
            if entry["noise"]:
                noise_fields.append(r["field"])
        fields.append(entry)
    differing, differing_real = await q.pairs_differing("shadow", noise_fields)
    out: dict[str, Any] = {
        "comparable_pairs": comparable,
        "compared_pairs": compared,
        "sampled": compared < comparable,
        "identical": compared - differing,
        "identical_share": (compared - differing) / compared if compared else None,
        "ignore": list(q.compare.ignore),
        "tolerance": {"abs": q.compare.abs_tolerance, "rel": q.compare.rel_tolerance},
        "fields": fields[:200],
        "n_fields": len(fields),
        "worst": await q.worst_diff_pairs("shadow", noise_fields),
    }
    if baseline:
        out["baseline_shadow"] = baseline
        out["noise_fields"] = noise_fields
        out["identical_excluding_noise"] = compared - differing_real
        out["identical_share_excluding_noise"] = ((compared - differing_real) / compared
                                                  if compared else None)
    return out


async def _data_checks(q: ReportQuery, reference: Path | None, th: Any, seed: int
                       ) -> dict[str, Any]:
    compare = q.compare
    if not compare.features:
        return {"features": [], "n_features": 0, "reference": None,
                "why": "no compare.features configured", "value_check_failures": {},
                "drifted": []}
    ref_data: dict[str, FeatureData] | None = None
    ref_info: dict[str, Any]
    await q.load_features(q.window, "current")
    if reference is not None:
        ref_data = read_reference(reference, compare.features, sample_max=th.sample_max,
                                  seed=seed)
        ref_info = {"kind": "file", "path": str(reference)}
    else:
        earlier = q.window.earlier()
        await q.load_features(earlier, "reference")
        ref_info = {"kind": "earlier_window", "start": earlier.start.isoformat(),
                    "end": earlier.end.isoformat()}
    await q.index_features()
    features = []
    for name, cfg in compare.features.items():
        allowed = [str(a).lower() if isinstance(a, bool) else str(a)
                   for a in cfg.allowed] if cfg.allowed is not None else None
        allowed_num = ([float(a) for a in cfg.allowed]
                       if cfg.allowed and all(isinstance(a, int | float) and not isinstance(
                           a, bool) for a in cfg.allowed) else None)
        lo = cfg.min if cfg.min is not None else -math.inf
        hi = cfg.max if cfg.max is not None else math.inf
        row = await q.feature_summary(name, "current", allowed=allowed,
                                      allowed_numeric=allowed_num, lo=lo, hi=hi)
        cur = from_summary(row)
        cur.counts = await q.feature_counts(name, "current")
        cur.sample = await q.feature_sample(name, "current", cur.n_numeric)
        ref: FeatureData | None
        if ref_data is not None:
            ref = ref_data[name]
        else:
            ref = from_summary(await q.feature_summary(
                name, "reference", allowed=None, allowed_numeric=None, lo=-math.inf,
                hi=math.inf))
            ref.counts = await q.feature_counts(name, "reference")
            ref.sample = await q.feature_sample(name, "reference", ref.n_numeric)
            if not ref.n_rows:
                ref = None
        outside = None
        if ref is not None and ref.stats["min"] is not None and cur.n_numeric:
            outside = await q.count_outside(name, "current", ref.stats["min"], ref.stats["max"])
        check = checks.feature_check(
            name, cfg, cur, ref, th, n_not_allowed=int(row["n_not_allowed"]),
            n_out_of_range=int(row["n_out_of_range"]), n_outside_reference_range=outside)
        if check["type"] in ("numeric", "sparse") and cur.n_numeric:
            edges = checks.histogram_edges(cur, ref, HIST_BINS)
            hist: dict[str, Any] = {"edges": edges,
                                    "current": await q.feature_histogram(name, "current", edges)}
            if ref is not None and ref_data is not None:
                counts, _ = np.histogram(np.clip(ref.sample, edges[0], edges[-1]), bins=edges)
                hist["reference"] = [int(c) for c in counts]
                hist["reference_from"] = "sample" if ref.sample.size < ref.n_numeric else "all"
            elif ref is not None:
                hist["reference"] = await q.feature_histogram(name, "reference", edges)
            check["histogram"] = hist
            levels = np.linspace(0, 1, 101)
            check["quantiles"] = {
                "levels": [float(x) for x in levels],
                "current": [float(x) for x in np.quantile(cur.sample, levels)],
                "reference": ([float(x) for x in np.quantile(ref.sample, levels)]
                              if ref is not None and ref.sample.size else None)}
        features.append(check)
    out = checks.finish(features, th)
    out["reference"] = ref_info
    return out


async def _slices(q: ReportQuery, task: str, n_pred: int, pred: dict[str, Any], th: Any
                  ) -> dict[str, Any]:
    if not q.compare.slices:
        return {"slices": [], "why": "no compare.slices configured"}
    found = await q.load_slices()
    regression = task == "regression"
    summary = {(r["family"], r["slice"]): dict(r) for r in await q.slice_summary(regression)}
    rows = await q.slice_rows(n_pred, regression) if n_pred else []
    if regression:
        err = np.array([abs(r["sn"] - r["pn"]) for r in rows], dtype=np.float64)
    else:
        err = np.array([float(r["pt"] != r["st"]) for r in rows], dtype=np.float64)
    members = [set(r["slices"]) for r in rows]
    labels = [r["y"] for r in rows]
    whole = ({"n": pred.get("n"), "mae": pred.get("mae"), "rmse": pred.get("rmse"),
              "within_tolerance": pred.get("within_tolerance")} if regression
             else {"n": pred.get("n"), "agreement": pred.get("agreement")})
    out_slices = []
    family_groups: dict[str, list[np.ndarray]] = {}
    for family, name in found:
        agg = summary.get((family, name), {"n": 0})
        entry: dict[str, Any] = {"family": family, "slice": name,
                                 **{k: _f(v) if k != "n" else int(v or 0)
                                    for k, v in agg.items() if k not in ("family", "slice")}}
        mask = np.array([name in m for m in members], dtype=bool)
        if entry["n"] < th.min_slice_size or mask.sum() < th.min_slice_size \
                or (~mask).sum() < th.min_slice_size:
            entry["test"] = {"test": None,
                             "why": f"fewer than {th.min_slice_size} rows in the slice or outside"}
        elif regression:
            entry["test"] = {**stats.location_test(err[~mask], err[mask], th.alpha),
                             "on": "|shadow - primary|, slice vs rest"}
        else:
            k, n_in = int(err[mask].sum()), int(mask.sum())
            k_out, n_out = int(err[~mask].sum()), int((~mask).sum())
            entry["test"] = {**stats.two_by_two([[k, n_in - k], [k_out, n_out - k_out]]),
                             "on": "disagreement, slice vs rest"}
        if not isinstance(q.compare.slices[family], str) and mask.sum() >= 3:
            family_groups.setdefault(family, []).append(err[mask])
        entry["performance"] = _slice_performance(rows, mask, labels, regression)
        out_slices.append(entry)
    tested = [s for s in out_slices if s["test"].get("p_value") is not None]
    for s, p_adj in zip(tested, stats.benjamini_hochberg([s["test"]["p_value"] for s in tested]),
                        strict=True):
        s["test"]["p_value_adjusted"] = p_adj
        worse = (s.get("mae", 0) or 0) > (whole.get("mae") or 0) if regression else \
            (s.get("agreement", 1) or 0) < (whole.get("agreement") or 0)
        if p_adj < th.alpha and worse:
            s["flagged"] = True
            s["flag_reason"] = ("the shadow departs from the primary more here than elsewhere "
                                f"(adjusted p = {p_adj:.3g})")
    families = {f: stats.groups_test(g, th.alpha) for f, g in family_groups.items()}
    return {"min_size": th.min_slice_size, "whole": whole, "slices": out_slices,
            "families": families,
            "multiple_testing": {"method": "benjamini-hochberg", "tests": len(tested)}}


def _slice_performance(rows: list[Any], mask: np.ndarray, labels: list[Any], regression: bool
                       ) -> dict[str, Any] | None:
    idx = [i for i in np.flatnonzero(mask) if labels[i] is not None
           and (not regression or _is_number(labels[i]))]
    if not idx:
        return None
    if regression:
        y = np.array([float(labels[i]) for i in idx])
        p = np.array([rows[i]["pn"] for i in idx])
        s = np.array([rows[i]["sn"] for i in idx])
        return {"n_labelled": len(idx), "primary_mse": float(np.mean((p - y) ** 2)),
                "shadow_mse": float(np.mean((s - y) ** 2))}
    y_t = [_class_text(labels[i]) for i in idx]
    return {"n_labelled": len(idx),
            "primary_accuracy": float(np.mean([_class_text(rows[i]["pt"]) == y for i, y in
                                               zip(idx, y_t, strict=True)])),
            "shadow_accuracy": float(np.mean([_class_text(rows[i]["st"]) == y for i, y in
                                              zip(idx, y_t, strict=True)]))}


async def build_report(conn: asyncpg.Connection, *, route: str, shadow: str, window: Window,
                       compare: CompareConfig, reference: Path | None = None,
                       progress: Progress | None = None) -> dict[str, Any]:
    """The whole report as a JSON-ready dict."""
    step = progress or (lambda _: None)
    th = compare.thresholds
    q = ReportQuery(conn, route, shadow, window, compare, seed=SEED)
    await q.validate()
    step(STEPS[0])
    counts = await q.counts()
    operational = await q.operational()
    step(STEPS[1])
    await q.load_predictions()
    shape = await q.prediction_shape()
    task, task_source = infer_task(compare, shape)
    pred = await (_regression(q, th, compare) if task == "regression"
                  else _classification(q, th, compare))
    pred = {"task": task, "task_source": task_source, "path": compare.prediction,
            "unpaired_elements": shape["unpaired_elements"],
            "pairs_without_prediction": {"primary": shape["no_primary"],
                                         "shadow": shape["no_shadow"]},
            "length_mismatch_pairs": shape["length_mismatch"], **pred}
    if compare.baseline_shadow:
        await q.load_predictions(compare.baseline_shadow, "_base")
        pred["baseline_noise"] = {"shadow": compare.baseline_shadow,
                                  **await q.noise_summary("_base")}
    step(STEPS[2])
    performance = await _performance(q, task, shape["n"], compare)
    step(STEPS[3])
    diff = await _diff(q, counts["comparable_pairs"], compare.baseline_shadow, th)
    step(STEPS[4])
    data_checks = await _data_checks(q, reference, th, SEED)
    step(STEPS[5])
    slices = await _slices(q, task, shape["n"], pred, th)
    step(STEPS[6])
    import scipy

    server = await conn.fetchval("SHOW server_version")
    report: dict[str, Any] = {
        "meta": {
            "route": route, "shadow": shadow, "baseline_shadow": compare.baseline_shadow,
            "window": {"start": window.start.isoformat(), "end": window.end.isoformat()},
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": {"shadowproxy": __version__, "numpy": np.__version__,
                         "scipy": scipy.__version__, "postgresql": server},
            "seed": SEED, "thresholds": th.model_dump(),
            "compare": compare.model_dump(mode="json", exclude={"thresholds"}),
        },
        "counts": counts, "operational": operational, "diff": diff, "predictions": pred,
        "performance": performance, "data_checks": data_checks, "slices": slices,
    }
    report["verdict"] = verdict(report, th)
    return report
