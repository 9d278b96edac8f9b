"""The verdict: pass, warn or fail, with one reason per rule that fired (pure).

Rules read the finished sections of the report; thresholds come from
``compare.thresholds``. ``fail`` is for evidence that the shadow must not be promoted as is
(broken input constraints, more errors, significantly worse on labels) and for too little
evidence to promote it (fewer than ``min_pairs`` comparable pairs: a gate must not pass on
an empty window); ``warn`` for what a person should look at (drift, disagreement,
incomplete pairs, slow shadow); ``info`` reasons never change the status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypedDict

from shadowproxy.compare.config import Thresholds

LEVELS = ("pass", "warn", "fail")


class Reason(TypedDict):
    level: str
    section: str
    message: str


class Verdict(TypedDict):
    status: str
    reasons: list[Reason]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _drift_details(data: dict[str, Any]) -> list[str]:
    """Each drifted feature's name, with why when the drift rule explained it."""
    found = {f.get("name"): f for f in data.get("features", []) if f.get("drift")}
    out = []
    for name in data["drifted"]:
        f = found.get(name, {})
        why = [c["explanation"] for c in (f.get("distribution"), f.get("missing"))
               if isinstance(c, dict) and c.get("drift") and c.get("explanation")]
        out.append(f"{name} ({'; '.join(why)})" if why else name)
    return out


Add = Callable[[str, str, str], None]


def _generation(gen: Mapping[str, Any], op: Mapping[str, Any], th: Thresholds, add: Add
                ) -> None:
    """The rules of a generation route (``compare.task: generation``), all warnings."""
    norm = gen["text"]["normalized_match"]
    if norm["n"] and norm["rate"] < th.min_normalized_match:
        add("warn", "generation", f"the shadow's text matches the primary's after "
                                  f"normalization on {_pct(norm['rate'])} of {norm['n']} "
                                  f"pairs (< {_pct(th.min_normalized_match)}); mean "
                                  f"similarity {gen['text']['similarity']['mean']:.3f}")
    finish = gen["finish_reason"]
    agree = finish["agreement"]
    if agree["n"] and agree["rate"] < th.min_finish_reason_agreement:
        moves = sorted(((n, p, s) for p, row in finish["pairs"].items()
                        for s, n in row.items() if p != s), reverse=True)
        top = ", ".join(f"{p} → {s}: {n}" for n, p, s in moves[:3])
        add("warn", "generation", f"finish_reason agrees on {_pct(agree['rate'])} of pairs "
                                  f"(< {_pct(th.min_finish_reason_agreement)}): {top}")
    calls = gen["tool_calls"]
    same = calls["same_calls"]
    if same["n"] and same["rate"] < th.min_tool_call_agreement:
        add("warn", "generation", f"the same tool calls (functions and arguments) in "
                                  f"{_pct(same['rate'])} of the {same['n']} pairs where a "
                                  f"side called a tool (< {_pct(th.min_tool_call_agreement)})")
    js = gen["json"]
    if js["n_asked"] and js["primary"]["rate"] - js["shadow"]["rate"] > th.max_json_validity_drop:
        add("warn", "generation", f"valid JSON in {_pct(js['shadow']['rate'])} of the shadow's "
                                  f"answers to the {js['n_asked']} requests that asked for "
                                  f"JSON, against {_pct(js['primary']['rate'])} of the "
                                  "primary's")
    labels = gen.get("labels")
    if labels:
        p_ref, s_ref = (labels["normalized_match"][side]["rate"] for side in ("primary",
                                                                             "shadow"))
        if p_ref - s_ref > th.max_reference_match_drop:
            add("warn", "generation", f"against the {labels['n']} reference answers the "
                                      f"shadow matches {_pct(s_ref)}, the primary "
                                      f"{_pct(p_ref)} (normalized)")
    ttft = {side: gen["timing"][side]["ttft_ms"] for side in ("primary", "shadow")}
    if ttft["primary"]["n"] and ttft["shadow"]["n"]:
        p99p, p99s = ttft["primary"]["p99"], ttft["shadow"]["p99"]
        if not op.get("latency_compared", True):
            add("info", "generation", "time to first token of a replayed target is not "
                                      "compared (measured under replay load)")
        elif p99p and p99s / p99p > th.max_ttft_p99_ratio:
            add("warn", "generation", f"shadow p99 time to first token {p99s:.1f} ms is "
                                      f"{p99s / p99p:.2f}× the primary's {p99p:.1f} ms")
    semantic = gen.get("semantic")
    if semantic and not semantic["available"]:
        add("info", "generation", f"no semantic similarity: {semantic['why']}")
    unassembled = gen.get("streamed_unassembled", {})
    if any(unassembled.values()):
        add("info", "generation", f"streamed answers stored without an assembled body_json "
                                  f"(primary {unassembled['primary']}, shadow "
                                  f"{unassembled['shadow']}) are not compared")
    for s in gen["slices"].get("slices", []):
        if s.get("flagged"):
            add("warn", "generation", f"slice {s['slice']}: {s['flag_reason']}")


def verdict(report: Mapping[str, Any], th: Thresholds, *,
            sample_comparable: int | None = None) -> Verdict:
    """The status and one reason per rule that fired, from the report's sections.

    ``sample_comparable``: the comparable pairs of the sample the row-level sections read,
    when the window was sampled (``--max-pairs``); the evidence rule holds for it too."""
    reasons: list[Reason] = []

    def add(level: str, section: str, message: str) -> None:
        reasons.append(Reason(level=level, section=section, message=message))

    counts, op = report["counts"], report["operational"]
    comparable = counts.get("comparable_pairs", 0)
    if not counts["pairs"]:
        add("fail", "counts", f"no pairs in the window, fewer than thresholds.min_pairs "
                              f"({th.min_pairs}): nothing was compared, and a gate must not "
                              "pass on no evidence")
    elif comparable < th.min_pairs:
        add("fail", "counts", f"{comparable} comparable pairs (both answered 2xx with JSON), "
                              f"fewer than thresholds.min_pairs ({th.min_pairs}): too little "
                              "evidence to pass")
    elif sample_comparable is not None and sample_comparable < th.min_pairs:
        # The tests, the differences and the slices read the sample, not the window.
        add("fail", "counts", f"the sample holds {sample_comparable} comparable pairs, fewer "
                              f"than thresholds.min_pairs ({th.min_pairs}): the comparisons "
                              "read the sample; raise --max-pairs")
    if counts["pairs"] and counts["pair_completeness"] is not None and \
            counts["pair_completeness"] < th.min_pair_completeness:
        add("warn", "counts", f"pair completeness {_pct(counts['pair_completeness'])} < "
                              f"{_pct(th.min_pair_completeness)}: missing pairs bias every "
                              "comparison")
    p_err, s_err = op["primary"]["error_rate"], op["shadow"]["error_rate"]
    if p_err is not None and s_err is not None and s_err - p_err > th.max_error_rate_increase:
        add("fail", "operational", f"shadow error rate {_pct(s_err)} vs primary {_pct(p_err)}")
    p99p, p99s = op["primary"]["latency_ms"]["p99"], op["shadow"]["latency_ms"]["p99"]
    if not op.get("latency_compared", True):
        add("info", "operational", op.get("latency_note", "latency not compared"))
    elif p99p and p99s and p99s / p99p > th.max_latency_p99_ratio:
        add("warn", "operational", f"shadow p99 latency {p99s:.1f} ms is {p99s / p99p:.2f}× "
                                   f"the primary's {p99p:.1f} ms")
    agree = op.get("status_agreement")
    if agree is not None and agree < th.min_status_agreement:
        add("warn", "operational", f"status codes agree on {_pct(agree)} of pairs")

    if "generation" in report:
        _generation(report["generation"], op, th, add)
    pred = report.get("predictions", {})
    # The paired test (compare/paired.py) decides; the distribution comparison of the two
    # prediction columns (distribution_test) is information only.
    paired = pred.get("paired") or {}
    if "predictions" in report and pred.get("n", 0) == 0 and pred.get("pairs_not_numbers"):
        add("warn", "predictions", f"compare.prediction matched {pred['pairs_not_numbers']} "
                                   "paired values, none a number on both sides, and task "
                                   "regression compares numbers: a service that writes its "
                                   "numbers as strings (\"0.5\") needs a jsonpath to a "
                                   "number, or task classification")
    elif "predictions" in report and pred.get("n", 0) == 0 and counts.get("comparable_pairs"):
        add("warn", "predictions", "compare.prediction matched no paired values: check the "
                                   "jsonpath against a recorded response")
    elif pred.get("task") == "regression" and pred.get("n"):
        if pred["tolerance"]["configured"] and pred["within_tolerance"] is not None \
                and pred["within_tolerance"] < th.min_within_tolerance:
            add("warn", "predictions", f"{_pct(pred['within_tolerance'])} of predictions "
                                       f"within tolerance (< {_pct(th.min_within_tolerance)})")
        if paired.get("decision"):
            add("warn", "predictions", paired["explanation"])
    elif pred.get("task") == "classification" and pred.get("n"):
        if pred["agreement"] < th.min_agreement:
            add("warn", "predictions", f"agreement {_pct(pred['agreement'])} < "
                                       f"{_pct(th.min_agreement)}")
        if pred["kappa"] is not None and pred["kappa"] < th.min_kappa:
            add("warn", "predictions", f"Cohen's kappa {pred['kappa']:.3f} < {th.min_kappa}")
        if paired.get("decision"):
            add("warn", "predictions", paired["explanation"])

    perf = report.get("performance", {})
    test = perf.get("paired_test") or {}
    if test.get("p_value") is not None and test["p_value"] < th.alpha:
        if perf.get("shadow_better"):
            add("info", "performance", f"the shadow is significantly better on the labelled "
                                       f"rows ({test['test']} p = {test['p_value']:.3g})")
        else:
            add("fail", "performance", f"the shadow is significantly worse on the labelled "
                                       f"rows ({test['test']} p = {test['p_value']:.3g})")

    data = report["data_checks"]
    for name, problems in data.get("value_check_failures", {}).items():
        add("fail", "data_checks", f"feature {name}: " + "; ".join(problems))
    if data.get("drifted"):
        add("warn", "data_checks", f"input drift in {', '.join(_drift_details(data))}"
                                   + (" (dataset drift)" if data.get("dataset_drift") else ""))

    flagged = [s for s in report.get("slices", {}).get("slices", []) if s.get("flagged")]
    for s in flagged:
        add("warn", "slices", f"slice {s['slice']}: {s['flag_reason']}")

    status = "pass"
    for r in reasons:
        if r["level"] in LEVELS and LEVELS.index(r["level"]) > LEVELS.index(status):
            status = r["level"]
    return Verdict(status=status, reasons=reasons)


def reaches(status: str, level: str) -> bool:
    """Whether a verdict ``status`` is at least ``level`` (for ``--fail-on``)."""
    return LEVELS.index(status) >= LEVELS.index(level)
