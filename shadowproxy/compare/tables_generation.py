"""The ``generation`` section of the report's JSON laid out as titled tables and text pairs.

Like ``tables.py`` (which calls it for a generation route), it decides what is shown and in
which number format from the JSON alone; each renderer only decides how it looks. Four
sections: the texts (agreement figures), timing and usage side by side, the most different
pairs with their word diff, and the slices.
"""

from __future__ import annotations

from typing import Any

from shadowproxy.compare.tables import (
    Section,
    Table,
    TextComparison,
    empty_slices_note,
    fmt,
    pct,
    pval,
)

SIDES = ("primary", "shadow")
TIMING = (("latency_ms", "total latency ms"), ("ttft_ms", "time to first token ms"),
          ("gap_p50_ms", "inter-chunk gap, median per answer, ms"),
          ("gap_p99_ms", "inter-chunk gap, p99 per answer, ms"),
          ("tokens_per_s", "tokens per second"))


def rate(r: dict[str, Any] | None) -> str:
    """A ``Rate`` as "92.00% (46 of 50)"."""
    if not r or not r.get("n"):
        return "–"
    return f"{pct(r['rate'])} ({fmt(r['count'])} of {fmt(r['n'])})"


def _texts(g: dict[str, Any]) -> Section:
    s = Section("generation", f"Generation: texts ({g['task_source']})")
    sample = g["sample"]
    s.notes.append(f"{fmt(g['n_compared'])} pairs compared, both answers chat or text "
                   f"completions; without one: primary {fmt(g['missing']['primary'])}, "
                   f"shadow {fmt(g['missing']['shadow'])}"
                   + (f"; a seeded sample of the {fmt(sample['of'])} comparable pairs"
                      if sample["sampled"] else ""))
    un = g.get("streamed_unassembled") or {}
    if any(un.values()):
        s.notes.append(f"streamed answers stored without an assembled body (not compared): "
                       f"primary {fmt(un['primary'])}, shadow {fmt(un['shadow'])}")
    cut = g.get("cut_short") or {}
    if any(cut.values()):
        s.notes.append(f"answers cut short by a failed call (the client left, a timeout, a "
                       f"reset), their pairs not compared: primary {fmt(cut['primary'])}, "
                       f"shadow {fmt(cut['shadow'])}")
    t, f, calls, js = g["text"], g["finish_reason"], g["tool_calls"], g["json"]
    sim, ratio = t["similarity"], t["length_ratio"]
    rows = [["exact match", rate(t["exact_match"])],
            ["normalized match (case, whitespace)", rate(t["normalized_match"])],
            ["similarity mean", fmt(sim["mean"])],
            ["similarity p10 / median / p90",
             f"{fmt(sim['p10'])} / {fmt(sim['p50'])} / {fmt(sim['p90'])}"],
            ["length ratio (shadow / primary) median",
             fmt(ratio["p50"]) + (f" (p10 {fmt(ratio['p10'])}, p90 {fmt(ratio['p90'])})"
                                  if ratio["n"] else "")],
            ["finish_reason agreement", rate(f["agreement"])],
            ["tool calls: both or neither", rate(calls["presence"])],
            ["tool calls: same functions", rate(calls["same_names"])],
            ["tool calls: same functions and arguments", rate(calls["same_calls"])]]
    invalid = calls["invalid_arguments"]
    if any(invalid.values()):
        rows.append(["tool calls with arguments that are not JSON",
                     f"primary {fmt(invalid['primary'])}, shadow {fmt(invalid['shadow'])}"])
    if js["n_asked"]:
        rows.append([f"valid JSON (of {fmt(js['n_asked'])} asked)",
                     f"primary {rate(js['primary'])}, shadow {rate(js['shadow'])}"])
    semantic = g.get("semantic")
    if semantic:
        if semantic["available"]:
            d = semantic["similarity"]
            rows.append([f"semantic similarity ({semantic.get('model') or 'embeddings'})",
                         f"mean {fmt(d['mean'])}, median {fmt(d['p50'])}, "
                         f"p10 {fmt(d['p10'])} over {fmt(d['n'])} pairs"])
        else:
            s.notes.append(f"no semantic similarity: {semantic['why']}")
    s.tables.append(Table(["", "value"], rows))
    reasons = sorted({*f["primary"], *f["shadow"]})
    if reasons:
        s.tables.append(Table(["primary \\ shadow", *reasons],
                              [[p, *[fmt(f["pairs"].get(p, {}).get(x, 0)) for x in reasons]]
                               for p in reasons if p in f["primary"]],
                              title="finish_reason"))
    hist = t["similarity_histogram"]
    if any(hist):
        k = len(hist)
        s.tables.append(Table(["similarity", "pairs"], [
            [f"[{i / k:.1f}, {(i + 1) / k:.1f}{']' if i == k - 1 else ')'}", fmt(n)]
            for i, n in enumerate(hist)]))
    labels = g.get("labels")
    if labels:
        s.tables.append(Table(["side", "exact match", "normalized match", "similarity mean"], [
            [side, rate(labels["exact_match"][side]), rate(labels["normalized_match"][side]),
             fmt(labels["similarity"][side]["mean"])] for side in SIDES],
            title=f"against the reference answers (labels, {fmt(labels['n'])} pairs)"))
    return s


def _timing(g: dict[str, Any]) -> Section:
    s = Section("generation_timing", "Generation: timing and usage")
    timing = g["timing"]
    streamed = {side: timing[side]["streamed"] for side in SIDES}
    s.notes.append(f"streamed answers: primary {fmt(streamed['primary'])}, shadow "
                   f"{fmt(streamed['shadow'])}; time to first token, gaps and tokens per "
                   "second come from streamed answers, total latency from every answer")
    rows = []
    for key, label in TIMING:
        for side in SIDES:
            d = timing[side][key]
            if d["n"] or key == "latency_ms":
                rows.append([f"{label}, {side}", fmt(d["n"]), fmt(d["p50"]), fmt(d["p90"]),
                             fmt(d["p99"]), fmt(d["max"]), fmt(d["mean"])])
    s.tables.append(Table(["", "n", "p50", "p90", "p99", "max", "mean"], rows,
                          title="timing percentiles"))
    usage = g["usage"]
    s.tables.append(Table(
        ["side", "answers with usage", "prompt tokens", "completion tokens",
         "mean prompt", "mean completion", "cost per 1,000 requests"],
        [[side, fmt(u["n_with_usage"]), fmt(u["prompt_tokens"]), fmt(u["completion_tokens"]),
          fmt(u["mean_prompt_tokens"]), fmt(u["mean_completion_tokens"]),
          "–" if u["cost_per_1000"] is None else f"{u['cost_per_1000']:.4f}"]
         for side in SIDES for u in [usage[side]]], title="usage"))
    if not any(g["prices"].values()):
        s.notes.append("no prices configured (compare.generation.prices): no cost")
    return s


def _most_different(g: dict[str, Any]) -> Section:
    s = Section("generation_pairs", "Generation: most different pairs")
    if not g["most_different"]:
        s.notes.append("no pair of differing texts")
        return s
    s.notes.append("least similar first; in the diff, the primary's words are struck out and "
                   "the shadow's inserted")
    for p in g["most_different"]:
        s.comparisons.append(TextComparison(
            title=f"{p['request_id']}: similarity {fmt(p['similarity'], 3)}, finish_reason "
                  f"{_reason(p['primary_finish_reason'])} / "
                  f"{_reason(p['shadow_finish_reason'])}",
            primary=p["primary_text"], shadow=p["shadow_text"],
            diff=[(d["op"], d["primary"], d["shadow"]) for d in p["diff"]],
            primary_calls=_calls(p.get("primary_tool_calls", [])),
            shadow_calls=_calls(p.get("shadow_tool_calls", []))))
    return s


def _reason(reason: str | None) -> str:
    """A finish_reason as written; "–" for an answer that gave none (a stream cut short)."""
    return reason if reason else "–"


def _calls(calls: list[dict[str, str]]) -> list[str]:
    """An answer's tool calls as ``→ name(arguments)``."""
    return [f"→ {c['name']}({c['arguments']})" for c in calls]


def _slices(g: dict[str, Any]) -> Section:
    part = g["slices"]
    s = Section("generation_slices", "Generation: slices")
    if part.get("empty"):
        s.notes.append(empty_slices_note(part["empty"]))
    if not part.get("slices"):
        s.notes.append(part.get("why", "no slices"))
        return s
    whole = g["text"]
    rows = [["(whole)", fmt(g["n_compared"]), pct(whole["exact_match"]["rate"]),
             pct(whole["normalized_match"]["rate"]), fmt(whole["similarity"]["mean"]),
             pct(g["finish_reason"]["agreement"]["rate"]), "–", "–", ""]]
    for x in part["slices"]:
        test = x["test"]
        rows.append([x["slice"], fmt(x["n"]), pct(x["exact_match"]),
                     pct(x["normalized_match"]), fmt(x["similarity_mean"]),
                     pct(x["finish_reason_agreement"]), pval(test),
                     fmt(test.get("p_value_adjusted"), 3),
                     "FLAG" if x.get("flagged") else ("" if test.get("test") else "not tested")])
    s.tables.append(Table(["slice", "n", "exact", "normalized", "similarity", "finish agree",
                           "p", "p adj (Holm)", ""], rows))
    s.notes.append(f"each slice's normalized match is tested against the rest of the pairs "
                   f"when both have at least {fmt(part['min_size'])} pairs compared on text "
                   "(thresholds.min_slice_size); FLAG: significantly lower in the slice")
    return s


def generation_sections(g: dict[str, Any]) -> list[Section]:
    """The generation section's parts, in order."""
    return [_texts(g), _timing(g), _most_different(g), _slices(g)]


def plain_diff(diff: list[tuple[str, str, str]]) -> str:
    """A word diff as plain text: ``[-primary's words-]{+shadow's words+}`` (wdiff's marks)."""
    out = []
    for op, a, b in diff:
        if op == "equal":
            out.append(a)
            continue
        if a:
            out.append(f"[-{a}-]")
        if b:
            out.append(f"{{+{b}+}}")
    return "".join(out)


def shorten(text: str, limit: int = 600) -> str:
    """``text`` cut at ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"
