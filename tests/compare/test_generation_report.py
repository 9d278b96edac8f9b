"""The generation section of the report on a real PostgreSQL: every figure of its JSON
checked against an independent computation on the same texts.

Rows are inserted as the recorder stores them (tests/compare/records.py): each side's
unstreamed answer (or an assembled stream, which has the same shape) in ``body_json``, the
stream's timing in ``responses.stream``. The answers are the example chat service's
(``examples/chat_service.py``): "large" is the primary and "small" the cheaper candidate
shadow; they agree on most prompts and not on some. The expected figures are computed here
from the bodies as inserted, with the standard library, a dynamic-programming LCS and scipy.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import statistics
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats as sps

from examples.chat_service import answer, build_app, embed, wants_json
from examples.chat_traffic import Mix, requests
from shadowproxy.compare.command import clean, render
from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.labels import import_labels, read_labels
from shadowproxy.compare.report import build_report
from shadowproxy.compare.window import Window
from tests.compare.records import Call, Exchange, insert
from tests.compare.test_generation import lcs, ref_normalize
from tests.upstreams import serve_app

ROUTE = "chat"
SHADOW = "candidate"
N = 150
PRICES = {"primary": {"input_per_million": 2.5, "output_per_million": 10.0},
          SHADOW: {"input_per_million": 0.15, "output_per_million": 0.6}}


def window() -> Window:
    now = datetime.now(UTC)
    return Window(now - timedelta(hours=1), now)


async def report(url: str, compare: dict[str, Any], *, shadow: str = SHADOW
                 ) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        return dict(await build_report(conn, route=ROUTE, shadow=shadow, window=window(),
                                       compare=CompareConfig.model_validate(compare)))
    finally:
        await conn.close()


def chat_body(model: str, request: dict[str, Any]) -> dict[str, Any]:
    """What the example service answers, unstreamed (a stream assembles to the same)."""
    prompt = request["messages"][-1]["content"]
    a = answer(model, prompt, tool="get_weather" if request.get("tools") else None,
               json_mode=wants_json(request))
    message: dict[str, Any] = {"role": "assistant", "content": a.text}
    if a.tool_call is not None:
        message["tool_calls"] = [{"id": a.tool_call.id, "type": "function", "function": {
            "name": a.tool_call.name, "arguments": a.tool_call.arguments}}]
    prompt_tokens = sum(len(m["content"].split()) for m in request["messages"])
    return {"id": f"chatcmpl-{model}", "object": "chat.completion", "created": 1,
            "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                         "finish_reason": a.finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": a.completion_tokens,
                      "total_tokens": prompt_tokens + a.completion_tokens}}


def timing(rng: np.random.Generator, slower: float) -> dict[str, Any]:
    """A ``responses.stream`` value as streams.assemble writes it."""
    ttft = float(rng.uniform(20, 60)) * slower
    return {"ttfb_ms": ttft / 2, "ttft_ms": ttft, "chunks": 12, "token_chunks": 10,
            "gap_p50_ms": float(rng.uniform(2, 4)) * slower,
            "gap_p90_ms": 6.0, "gap_p99_ms": float(rng.uniform(5, 9)) * slower,
            "gap_max_ms": 12.0, "duration_ms": ttft + 40, "completion_tokens": 10,
            "tokens_per_s": float(rng.uniform(80, 200)) / slower, "interrupted": False}


class Data:
    """The inserted exchanges, kept to compute the expected figures from."""

    def __init__(self) -> None:
        rng = np.random.default_rng(5)
        self.exchanges: list[Exchange] = []
        self.labels: dict[str, str] = {}
        received = datetime.now(UTC) - timedelta(minutes=10)
        mix = Mix(stream=0.4, weather=0.2, long=0.15, json=0.15)
        for i, (rid, body, label) in enumerate(requests(N, 11, mix, None)):
            body["model"] = "gpt-a" if i % 3 else "gpt-b"
            streamed = bool(body.get("stream"))
            primary = Call(chat_body("large", body), latency_ms=float(rng.gamma(4, 30)),
                           stream=timing(rng, 1.0) if streamed else None)
            # The shadow streams some answers the primary did not, and the reverse.
            shadow_streamed = streamed != (i % 10 == 0)
            shadow = Call(chat_body("small", body), latency_ms=float(rng.gamma(4, 20)),
                          stream=timing(rng, 2.5) if shadow_streamed else None)
            self.exchanges.append(Exchange(body, primary, {SHADOW: shadow}, request_id=rid,
                                           received_at=received + timedelta(seconds=i),
                                           route=ROUTE, path="/v1/chat/completions"))
            if label is not None:
                self.labels[rid] = label
        self.compared = list(self.exchanges)
        """Both sides answered with a completion."""
        question = {"model": "gpt-a", "messages": [{"role": "user", "content": "Why?"}]}
        # A 200 that is not a completion: comparable, but the shadow gave no answer.
        self.not_completion = Exchange(question, Call(chat_body("large", question)),
                                       {SHADOW: Call({"error": {"message": "overloaded"}})},
                                       route=ROUTE)
        self.comparable = [*self.compared, self.not_completion]
        sse = {"content-type": "text/event-stream; charset=utf-8"}
        self.exchanges += [
            # Streamed and stored raw (before streams were assembled): not comparable.
            *[Exchange({**question, "stream": True}, Call(chat_body("large", question)),
                       {SHADOW: Call(None, raw=b"data: {}\n\ndata: [DONE]\n\n", headers=sse)},
                       route=ROUTE) for _ in range(3)],
            self.not_completion,
            Exchange(question, Call(chat_body("large", question)),
                     {SHADOW: Call(None, status=None, latency_ms=None, error="timeout")},
                     route=ROUTE),
        ]


@pytest.fixture
async def data(database_url: str, tmp_path: Path) -> Data:
    d = Data()
    await insert(database_url, d.exchanges)
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["request_id", "label"])
        writer.writerows(d.labels.items())
        # A JSON null label is no reference answer, as in the predictions' sections (it
        # was compared as the text "null"): not in ``d.labels``, so not counted.
        unlabelled = next(e.request_id for e in d.compared if e.request_id not in d.labels)
        writer.writerow([unlabelled, "null"])
    conn = await asyncpg.connect(database_url)
    try:
        await import_labels(conn, *read_labels(path))
    finally:
        await conn.close()
    return d


# -- independent computations --------------------------------------------------------------

def first(body: dict[str, Any]) -> dict[str, Any]:
    choice: dict[str, Any] = body["choices"][0]
    return choice


def text_of(body: dict[str, Any]) -> str | None:
    content: str | None = first(body)["message"]["content"]
    return content


def calls_of(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"])
            for c in first(body)["message"].get("tool_calls", [])]


_LCS: dict[tuple[str, str], float] = {}


def similarity(a: str, b: str) -> float:
    if a == b:
        return 1.0
    if (a, b) not in _LCS:
        _LCS[a, b] = 2 * lcs(a, b) / (len(a) + len(b))
    return _LCS[a, b]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), by hand."""
    x = sorted(values)
    pos = q * (len(x) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (x[hi] - x[lo]) * (pos - lo)


def check_distribution(d: dict[str, Any], values: list[float]) -> None:
    assert d["n"] == len(values)
    if not values:
        assert d["mean"] is None
        return
    assert d["mean"] == pytest.approx(statistics.fmean(values))
    assert (d["min"], d["max"]) == pytest.approx((min(values), max(values)))
    for key, q in (("p10", 0.1), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p90", 0.9),
                   ("p99", 0.99)):
        assert d[key] == pytest.approx(percentile(values, q)), key


def is_json(text: str | None) -> bool:
    try:
        json.loads(text or "")
    except ValueError:
        return False
    return text is not None


def prompt_chars(request: dict[str, Any]) -> int:
    return sum(len(m["content"]) for m in request["messages"])


def cost(bodies: list[dict[str, Any]], price: dict[str, float]) -> float:
    prompt = sum(b["usage"]["prompt_tokens"] for b in bodies)
    completion = sum(b["usage"]["completion_tokens"] for b in bodies)
    total = (prompt * price["input_per_million"]
             + completion * price["output_per_million"]) / 1e6
    return total / len(bodies) * 1000


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, by hand."""
    n = len(p)
    order = sorted(range(n), key=lambda i: p[i])
    out = [0.0] * n
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (n - rank) * p[i]))
        out[i] = running
    return out


def two_by_two_p(k_in: int, n_in: int, k_out: int, n_out: int) -> float:
    table = [[k_in, n_in - k_in], [k_out, n_out - k_out]]
    if min(sps.contingency.expected_freq(np.array(table)).ravel()) < 5:
        return float(sps.fisher_exact(table).pvalue)
    return float(sps.chi2_contingency(table).pvalue)


# -- the tests -----------------------------------------------------------------------------

COMPARE = {"task": "generation", "slices": {"tools": "request_body_json ? 'tools'"},
           "generation": {"prices": PRICES, "most_different": 5},
           "thresholds": {"min_slice_size": 10}}


async def test_every_figure_matches_an_independent_computation(
        database_url: str, data: Data) -> None:
    """Texts, finish reasons, tool calls, JSON, timing, usage, cost, the most different pairs
    and the labels: each figure of the section equals its computation by hand."""
    r = await report(database_url, COMPARE)
    assert "predictions" not in r and "performance" not in r and "slices" not in r
    g = r["generation"]
    assert g["task_source"] == "config"
    assert r["counts"]["comparable_pairs"] == N + 1
    assert g["sample"] == {"n": N + 1, "of": N + 1, "sampled": False, "seed": r["meta"]["seed"]}
    assert (g["n_pairs"], g["n_compared"], g["missing"]) == (
        N + 1, N, {"primary": 0, "shadow": 1})
    assert g["streamed_unassembled"] == {"primary": 0, "shadow": 3}

    ex = data.compared
    p_bodies = [e.primary.body for e in ex]
    s_bodies = [e.shadows[SHADOW].body for e in ex]
    texts = [(text_of(p) or "", text_of(s) or "", e) for p, s, e in
             zip(p_bodies, s_bodies, ex, strict=True)
             if text_of(p) is not None or text_of(s) is not None]
    sims = [similarity(a, b) for a, b, _ in texts]
    t = g["text"]
    assert t["exact_match"] == {"count": sum(a == b for a, b, _ in texts), "n": len(texts),
                                "rate": pytest.approx(sum(a == b for a, b, _ in texts)
                                                      / len(texts))}
    normalized = sum(ref_normalize(a) == ref_normalize(b) for a, b, _ in texts)
    assert (t["normalized_match"]["count"], t["normalized_match"]["n"]) == (normalized,
                                                                           len(texts))
    assert 0 < t["exact_match"]["count"] < len(texts)
    check_distribution(t["similarity"], sims)
    hist = Counter(min(int(s * 10), 9) for s in sims)
    assert list(t["similarity_histogram"]) == [hist.get(i, 0) for i in range(10)]
    check_distribution(t["length_ratio"], [len(b) / len(a) if a else 1.0
                                           for a, b, _ in texts if a or not b])
    assert t["length_ratio_undefined"] == sum(1 for a, b, _ in texts if not a and b)

    reasons = [(first(p)["finish_reason"], first(s)["finish_reason"])
               for p, s in zip(p_bodies, s_bodies, strict=True)]
    f = g["finish_reason"]
    assert f["agreement"]["count"] == sum(a == b for a, b in reasons)
    assert f["agreement"]["count"] < N  # small stops early on long prompts
    matrix: dict[str, dict[str, int]] = {}
    for a, b in reasons:
        matrix.setdefault(a, {}).setdefault(b, 0)
        matrix[a][b] += 1
    assert f["pairs"] == matrix
    assert f["primary"] == dict(Counter(a for a, _ in reasons))
    assert f["shadow"] == dict(Counter(b for _, b in reasons))

    calls = [(calls_of(p), calls_of(s)) for p, s in zip(p_bodies, s_bodies, strict=True)]
    either = [(a, b) for a, b in calls if a or b]
    tc = g["tool_calls"]
    assert tc["presence"]["count"] == sum(bool(a) == bool(b) for a, b in calls)
    assert tc["n_either"] == len(either) > 0
    assert tc["same_names"]["count"] == sum([n for n, _ in a] == [n for n, _ in b]
                                            for a, b in either)
    same = sum(len(a) == len(b) and all(x[0] == y[0] and json.loads(x[1]) == json.loads(y[1])
                                        for x, y in zip(a, b, strict=True))
               for a, b in either)
    assert tc["same_calls"]["count"] == same
    # The two models write the arguments' keys in another order: the same JSON.
    assert any(a and b and a[0][1] != b[0][1] for a, b in either) and same > 0
    assert tc["invalid_arguments"] == {"primary": 0, "shadow": 0}

    asked = [(p, s) for p, s, e in zip(p_bodies, s_bodies, ex, strict=True)
             if e.request.get("response_format")]
    js = g["json"]
    assert js["n_asked"] == len(asked) > 0
    assert js["primary"]["count"] == sum(is_json(text_of(p)) for p, _ in asked) == len(asked)
    assert js["shadow"]["count"] == sum(is_json(text_of(s)) for _, s in asked) < len(asked)

    for side, calls_ in (("primary", [e.primary for e in ex]),
                         ("shadow", [e.shadows[SHADOW] for e in ex])):
        tm = g["timing"][side]
        check_distribution(tm["latency_ms"], [c.latency_ms for c in calls_])
        streams = [c.stream for c in calls_ if c.stream is not None]
        assert tm["streamed"] == len(streams) > 0
        for key in ("ttft_ms", "gap_p50_ms", "gap_p99_ms", "tokens_per_s"):
            check_distribution(tm[key], [s[key] for s in streams])
        bodies = p_bodies if side == "primary" else s_bodies
        u = g["usage"][side]
        assert u["n_with_usage"] == N
        assert u["prompt_tokens"] == sum(b["usage"]["prompt_tokens"] for b in bodies)
        assert u["completion_tokens"] == sum(b["usage"]["completion_tokens"] for b in bodies)
        assert u["mean_completion_tokens"] == pytest.approx(u["completion_tokens"] / N)
        assert u["cost_per_1000"] == pytest.approx(
            cost(bodies, PRICES["primary" if side == "primary" else SHADOW]))
        curve = g["timing_curves"]["latency_ms"][side]
        assert curve == pytest.approx([percentile([c.latency_ms for c in calls_], q)
                                       for q in g["timing_curves"]["levels"]])
    assert g["prices"] == {"primary": PRICES["primary"], "shadow": PRICES[SHADOW]}

    ranked = sorted((similarity(a, b), e.request_id, a, b) for a, b, e in texts if a != b)
    most = g["most_different"]
    assert [(d["request_id"], d["primary_text"], d["shadow_text"]) for d in most] == [
        (rid, a, b) for _, rid, a, b in ranked[:5]]
    bodies = {e.request_id: (e.primary.body, e.shadows[SHADOW].body) for e in ex}
    for d, (sim, *_rest) in zip(most, ranked, strict=False):
        assert d["similarity"] == pytest.approx(sim)
        for side, body in zip(("primary", "shadow"), bodies[d["request_id"]], strict=True):
            assert [(c["name"], c["arguments"]) for c in d[f"{side}_tool_calls"]] == \
                calls_of(body)
        assert "".join(s["primary"] for s in d["diff"]) == d["primary_text"]
        assert "".join(s["shadow"] for s in d["diff"]) == d["shadow_text"]

    labelled = [(text_of(p) or "", text_of(s) or "", data.labels[e.request_id])
                for p, s, e in zip(p_bodies, s_bodies, ex, strict=True)
                if e.request_id in data.labels]
    lab = g["labels"]
    assert lab["n"] == len(labelled) > 0
    for k, side in enumerate(("primary", "shadow")):
        assert lab["exact_match"][side]["count"] == sum(x[k] == x[2] for x in labelled)
        assert lab["normalized_match"][side]["count"] == sum(
            ref_normalize(x[k]) == ref_normalize(x[2]) for x in labelled)
        check_distribution(lab["similarity"][side], [similarity(x[k], x[2]) for x in labelled])
    assert lab["exact_match"]["primary"]["rate"] == 1.0  # the references are large's texts
    assert g["semantic"] is None


@asynccontextmanager
async def embeddings_service() -> AsyncIterator[str]:
    """The example service, whose /v1/embeddings gives hashed bag-of-words vectors."""
    async with serve_app(build_app()) as url:
        yield f"{url}/v1/embeddings"


async def test_semantic_similarity_from_a_configured_embeddings_endpoint(
        database_url: str, data: Data, monkeypatch: pytest.MonkeyPatch) -> None:
    """With generation.embeddings the section gets each pair's cosine (a seeded sample of
    max_pairs); without the API key's variable, or with an endpoint that is down, the report
    stands and says why."""
    monkeypatch.setenv("TEST_EMBEDDINGS_KEY", "secret")
    async with embeddings_service() as url:
        r = await report(database_url, {**COMPARE, "generation": {"embeddings": {
            "url": url, "model": "hashed-words", "api_key_env": "TEST_EMBEDDINGS_KEY",
            "max_pairs": 40}}})
    semantic = r["generation"]["semantic"]
    assert semantic["available"] and semantic["model"] == "hashed-words"
    texts = [(text_of(e.primary.body), text_of(e.shadows[SHADOW].body))
             for e in data.compared]
    both = [(a, b) for a, b in texts if a and b]
    assert len(both) > 40
    cosines = [sum(x * y for x, y in zip(embed(a), embed(b), strict=True))
               / math.sqrt(sum(x * x for x in embed(a)) * sum(y * y for y in embed(b)))
               for a, b in random.Random(r["meta"]["seed"]).sample(both, 40)]
    check_distribution(semantic["similarity"], cosines)

    monkeypatch.delenv("TEST_EMBEDDINGS_KEY")
    r = await report(database_url, {**COMPARE, "generation": {"embeddings": {
        "url": url, "api_key_env": "TEST_EMBEDDINGS_KEY"}}})
    assert r["generation"]["semantic"] == {
        "available": False, "similarity": None, "model": None,
        "why": "the environment variable TEST_EMBEDDINGS_KEY "
               "(generation.embeddings.api_key_env) is not set"}
    assert {"level": "info", "section": "generation",
            "message": "no semantic similarity: the environment variable TEST_EMBEDDINGS_KEY "
                       "(generation.embeddings.api_key_env) is not set"
            } in r["verdict"]["reasons"]
    r = await report(database_url, {**COMPARE, "generation": {"embeddings": {"url": url}}})
    assert not r["generation"]["semantic"]["available"]  # the service has stopped
    assert "Connect" in r["generation"]["semantic"]["why"]
    assert r["generation"]["n_compared"] == N


async def test_slices_compare_each_subset_and_test_it_against_the_rest(
        database_url: str, data: Data) -> None:
    """A SQL slice and the built-in families (prompt length in quartiles, requested model,
    streamed or not): each slice's figures, its test against the rest, and BH."""
    r = await report(database_url, {**COMPARE, "slices": {
        **COMPARE["slices"], "nothing": "request_body_json ? 'no-such-key'"}})
    part = r["generation"]["slices"]
    assert part["families"] == ["tools", "nothing", "prompt_length", "model", "stream"]
    # A configured slice no pair falls in is named, in the JSON and in the rendered report.
    assert part["empty"] == ["nothing"]
    assert "no pair in the window falls in nothing (compare.slices)" in render(r, "text")
    ex = data.comparable
    chars = [prompt_chars(e.request) for e in ex]
    edges = sorted({float(min(chars)), *(float(round(q)) for q in statistics.quantiles(
        chars, n=4, method="inclusive")), float(max(chars))})
    expected: dict[str, list[int]] = {"tools": [i for i, e in enumerate(ex)
                                                if "tools" in e.request]}
    for k in range(len(edges) - 1):
        a, b = edges[k], edges[k + 1]
        last = k == len(edges) - 2
        expected[f"prompt_length in [{a:g}, {b:g}{']' if last else ')'}"] = [
            i for i, c in enumerate(chars) if a <= c and (c <= b if last else c < b)]
    for model in ("gpt-a", "gpt-b"):
        expected[f"model = {model}"] = [i for i, e in enumerate(ex)
                                        if e.request["model"] == model]
    for flag in ("false", "true"):
        expected[f"stream = {flag}"] = [i for i, e in enumerate(ex)
                                        if str(bool(e.request.get("stream"))).lower() == flag]
    got = {s["slice"]: s for s in part["slices"]}
    assert set(got) == set(expected)

    def matched(i: int) -> bool | None:
        if ex[i] is data.not_completion:
            return None
        a, b = text_of(ex[i].primary.body), text_of(ex[i].shadows[SHADOW].body)
        if a is None and b is None:
            return None
        return ref_normalize(a or "") == ref_normalize(b or "")

    p_values, tested = [], []
    for name, members in expected.items():
        s = got[name]
        texts = [(text_of(ex[i].primary.body) or "", text_of(ex[i].shadows[SHADOW].body) or "")
                 for i in members if matched(i) is not None]
        members = [i for i in members if ex[i] is not data.not_completion]
        assert s["n"] == len(members)
        assert s["exact_match"] == pytest.approx(sum(a == b for a, b in texts) / len(texts))
        assert s["similarity_mean"] == pytest.approx(
            statistics.fmean(similarity(a, b) for a, b in texts))
        assert s["finish_reason_agreement"] == pytest.approx(statistics.fmean(
            first(ex[i].primary.body)["finish_reason"]
            == first(ex[i].shadows[SHADOW].body)["finish_reason"] for i in members))
        assert s["latency_p50_ms"]["primary"] == pytest.approx(
            percentile([ex[i].primary.latency_ms for i in members], 0.5))
        inside = [matched(i) for i in members if matched(i) is not None]
        outside = [matched(i) for i in range(len(ex))
                   if i not in members and matched(i) is not None]
        assert s["normalized_match"] == pytest.approx(sum(inside) / len(inside))
        if min(len(inside), len(outside)) < 10:
            assert s["test"]["test"] is None
            continue
        # One pair per request, so the permutation by request is a permutation of pairs:
        # its p-value estimates the exact 2×2 test's (1,999 reshuffles: within Monte Carlo
        # error of it).
        p = two_by_two_p(sum(inside), len(inside), sum(outside), len(outside))
        assert s["test"]["p_value"] == pytest.approx(p, abs=0.04 + 0.2 * p)
        p_values.append(s["test"]["p_value"])
        tested.append(s)
    assert part["multiple_testing"] == {"method": "holm", "tests": len(tested)}
    assert len(tested) > 3
    for s, adjusted in zip(tested, holm(p_values), strict=True):
        assert s["test"]["p_value_adjusted"] == pytest.approx(adjusted)
        worse = s["test"]["rate_in"] < s["test"]["rate_out"]
        assert s.get("flagged", False) == (adjusted < 0.05 and worse)
    # Long prompts are where small stops early: the longest quarter is flagged.
    longest = [s for name, s in got.items() if name.startswith("prompt_length")][-1]
    assert longest["flagged"] and "elsewhere" in longest["flag_reason"]


async def test_verdict_warns_on_each_generation_rule(database_url: str, data: Data) -> None:
    """Normalized match, finish_reason, tool calls, JSON validity, the reference answers,
    TTFT p99 and a flagged slice each give a warning; unassembled streams an info."""
    r = await report(database_url, COMPARE)
    reasons = [(x["level"], x["message"]) for x in r["verdict"]["reasons"]
               if x["section"] == "generation"]
    text = "\n".join(m for _, m in reasons)
    assert r["verdict"]["status"] == "warn"
    for phrase in ("matches the primary's after normalization", "finish_reason agrees on",
                   "the same tool calls", "valid JSON in", "against the",
                   "time to first token", "slice prompt_length in"):
        assert phrase in text, phrase
    assert ("info", "streamed answers stored without an assembled body_json (primary 0, "
                    "shadow 3) are not compared") in reasons

    relaxed = {**COMPARE, "thresholds": {
        "min_slice_size": 1000, "min_normalized_match": 0, "min_finish_reason_agreement": 0,
        "min_tool_call_agreement": 0, "max_json_validity_drop": 1,
        "max_reference_match_drop": 1, "max_ttft_p99_ratio": 100,
        "max_latency_p99_ratio": 100}}
    r = await report(database_url, relaxed)
    assert [x for x in r["verdict"]["reasons"] if x["level"] != "info"] == []
    assert r["verdict"]["status"] == "pass"


async def test_the_task_is_inferred_from_chat_completions(database_url: str,
                                                          data: Data) -> None:
    """Without compare.task the primary's chat completions make it a generation route."""
    r = await report(database_url, {})
    assert r["generation"]["task_source"].startswith("inferred: 50 of the first 50")
    assert "predictions" not in r
    assert r["generation"]["n_compared"] == N
    assert r["meta"]["compare"]["generation"]["most_different"] == 10  # the settings used


async def test_the_report_renders_as_text_markdown_html_and_json(
        database_url: str, data: Data) -> None:
    """Every format shows the figures, the timing table and the most different pairs side
    by side with their word diff; HTML adds the plots."""
    compare = {**COMPARE, "generation": {**COMPARE["generation"], "most_different": 40}}
    r = clean(await report(database_url, compare))
    json.dumps(r, allow_nan=False)
    top = r["generation"]["most_different"][0]
    text = render(r, "text")
    for phrase in ("Generation: texts", "normalized match", "time to first token ms, shadow",
                   "Generation: most different pairs", "cost per 1,000", "[-", "{+",
                   "Generation: slices", top["request_id"], "→ get_weather({"):
        assert phrase in text, phrase
    # The slices' p-values are adjusted by Holm's method, and the table says so.
    assert r["generation"]["slices"]["multiple_testing"]["method"] == "holm"
    assert "p adj (Holm)" in text and "(BH)" not in text
    markdown = render(r, "markdown")
    assert "| primary | shadow |" in markdown and "<del>" in markdown
    html = render(r, "html")
    assert html.count("<svg") >= 3  # similarity, TTFT, tokens per second, latency
    assert '<table class="pair">' in html and "<ins>" in html and "<del>" in html
    assert "Time to first token (ECDF)" in html


def test_generation_settings_are_validated() -> None:
    """task: generation and its settings load; a bad URL, an unknown built-in slice, a
    negative price or too many pairs to show are refused with what was expected."""
    c = CompareConfig.model_validate({"task": "generation", "generation": {
        "prices": {"primary": {"input_per_million": 2.5, "output_per_million": 10}},
        "embeddings": {"url": "http://127.0.0.1:9/v1/embeddings"},
        "strip_punctuation": True, "most_different": 3, "builtin_slices": ["model"]},
        "thresholds": {"min_normalized_match": 0.5, "max_ttft_p99_ratio": 2}})
    assert c.generation.prices["primary"].output_per_million == 10
    assert c.generation.embeddings is not None and c.generation.embeddings.max_pairs == 1000
    assert CompareConfig().generation.builtin_slices == ["prompt_length", "model", "stream"]
    for bad, message in (
            ({"embeddings": {"url": "127.0.0.1:9"}}, "expected an http:// or https:// URL"),
            ({"builtin_slices": ["length"]}, "'prompt_length', 'model' or 'stream'"),
            ({"prices": {"primary": {"input_per_million": -1, "output_per_million": 1}}},
             "greater than or equal to 0"),
            ({"most_different": 101}, "less than or equal to 100"),
            ({"price": {}}, "Extra inputs are not permitted")):
        with pytest.raises(ValidationError, match=re.escape(message)):
            CompareConfig.model_validate({"generation": bad})
    with pytest.raises(ValidationError, match="min_normalized_match"):
        CompareConfig.model_validate({"thresholds": {"min_normalized_match": 2}})


def completion(text: str, finish: str = "stop") -> dict[str, Any]:
    """A legacy text completion (``/v1/completions``)."""
    return {"object": "text_completion", "choices": [{"index": 0, "text": text,
                                                      "logprobs": None,
                                                      "finish_reason": finish}]}


async def test_legacy_completions_content_parts_and_feature_slices(
        database_url: str) -> None:
    """Text completions are compared like chat; a prompt's length counts every message's text
    (strings and text parts) or the legacy prompt; a feature slice bins the request's
    value."""
    exchanges, chars, temperature, same = [], [], [], []
    for i in range(40):
        words = " ".join(["word"] * (i + 1))
        if i % 3 == 0:
            request: dict[str, Any] = {"prompt": words}
            length = len(words)
        elif i % 3 == 1:
            request = {"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": words}]}
            length = len("Be brief.") + len(words)
        else:
            request = {"messages": [{"role": "user", "content": [
                {"type": "text", "text": words}, {"type": "image_url", "image_url": {
                    "url": "data:,"}}, {"type": "text", "text": "?"}]}]}
            length = len(words) + 1
        request["temperature"] = (i % 4) / 2
        answer_p, answer_s = f"answer {i}", f"answer {i}" if i % 4 else f"Answer  {i}!"
        exchanges.append(Exchange(request, Call(completion(answer_p)),
                                  {SHADOW: Call(completion(answer_s))}, route=ROUTE))
        chars.append(length)
        temperature.append(request["temperature"])
        same.append(answer_p == answer_s)
    await insert(database_url, exchanges)
    r = await report(database_url, {
        "features": {"temperature": {"path": "$.temperature"}},
        "slices": {"temp": {"feature": "temperature", "bins": [0, 0.75, 2]}},
        "generation": {"builtin_slices": ["prompt_length"]}})
    g = r["generation"]
    assert g["task_source"].startswith("inferred: 40 of the first 40")
    assert g["text"]["exact_match"]["count"] == sum(same) == 30
    assert g["text"]["normalized_match"]["count"] == 30  # "!" is punctuation, not stripped
    got = {s["slice"]: s["n"] for s in g["slices"]["slices"]}
    edges = sorted({float(min(chars)), *(float(round(q)) for q in statistics.quantiles(
        chars, n=4, method="inclusive")), float(max(chars))})
    expected = {"temperature in [0, 0.75)": sum(t < 0.75 for t in temperature),
                "temperature in [0.75, 2]": sum(t >= 0.75 for t in temperature)}
    for k in range(len(edges) - 1):
        a, b = edges[k], edges[k + 1]
        last = k == len(edges) - 2
        expected[f"prompt_length in [{a:g}, {b:g}{']' if last else ')'}"] = sum(
            a <= c and (c <= b if last else c < b) for c in chars)
    assert got == expected
    stripped = await report(database_url, {"generation": {"strip_punctuation": True,
                                                          "builtin_slices": []}})
    assert stripped["generation"]["text"]["normalized_match"]["count"] == 40
    assert stripped["generation"]["slices"]["slices"] == []


async def test_above_sample_max_a_seeded_sample_is_compared(database_url: str) -> None:
    """More comparable pairs than thresholds.sample_max: a seeded sample of about that many,
    the same on every run, and the section says so."""
    await insert(database_url, [
        Exchange({"prompt": f"p{i}"}, Call(completion(f"a{i}")),
                 {SHADOW: Call(completion(f"a{i}" if i % 2 else f"b{i}"))}, route=ROUTE)
        for i in range(1500)])
    compare = {"thresholds": {"sample_max": 1000}}
    first_run, second_run = (await report(database_url, compare))["generation"], \
        (await report(database_url, compare))["generation"]
    sample = first_run["sample"]
    assert sample["of"] == 1500 and sample["sampled"] and 850 < sample["n"] < 1150
    assert first_run["n_pairs"] == sample["n"]
    assert first_run["text"] == second_run["text"]
    assert first_run["text"]["exact_match"]["rate"] == pytest.approx(0.5, abs=0.06)


def test_ttft_of_a_replayed_target_is_not_compared() -> None:
    """A replayed target's time to first token is information, not a warning; without
    streamed answers on both sides there is no TTFT rule at all."""
    from shadowproxy.compare.config import Thresholds
    from shadowproxy.compare.verdict import verdict

    def dist(n: int, p99: float | None) -> dict[str, Any]:
        return {"n": n, "p99": p99}

    def gen(shadow_ttft: dict[str, Any]) -> dict[str, Any]:
        rate = {"count": 10, "n": 10, "rate": 1.0}
        return {"text": {"normalized_match": rate, "similarity": {"mean": 1.0}},
                "finish_reason": {"agreement": rate, "pairs": {}},
                "tool_calls": {"same_calls": {"count": 0, "n": 0, "rate": None}},
                "json": {"n_asked": 0}, "labels": None, "semantic": None,
                "streamed_unassembled": {"primary": 0, "shadow": 0}, "slices": {},
                "timing": {"primary": {"ttft_ms": dist(10, 50.0)},
                           "shadow": {"ttft_ms": shadow_ttft}}}

    side = {"error_rate": 0.0, "latency_ms": {"p99": 10.0}}
    counts = {"pairs": 200, "comparable_pairs": 200, "pair_completeness": 1.0}
    for latency_compared, shadow_ttft, expected in (
            (True, dist(10, 500.0), ["warn"]), (False, dist(10, 500.0), ["info"]),
            (True, dist(0, None), [])):
        op = {"primary": side, "shadow": side, "latency_compared": latency_compared}
        v = verdict({"counts": counts, "operational": op, "data_checks": {},
                     "generation": gen(shadow_ttft)}, Thresholds())
        assert [r["level"] for r in v["reasons"] if r["section"] == "generation"] == expected
