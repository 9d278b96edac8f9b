"""The generation section's figures (shadowproxy.compare.generation), each checked against an
independent computation on the same texts: a dynamic-programming LCS for similarity, the
standard library's json, statistics and math for the rest.

The texts are the example chat service's answers (``examples/chat_service.py``): the "small"
model as the primary, "large" as the shadow; they agree on most prompts and not on some.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from examples.chat_service import Answer, Speed, answer, build_app, differs
from shadowproxy.compare.config import EmbeddingsConfig
from shadowproxy.compare.embeddings import semantic_similarity
from shadowproxy.compare.generation import (
    Distribution,
    Generation,
    GenerationPair,
    Prices,
    ToolCall,
    asks_for_json,
    compare_generations,
    diff_html,
    generation_from,
    is_generation,
    normalize,
    semantic_from_vectors,
    similarities,
    word_diff,
)
from shadowproxy.compare.tables_generation import _most_different
from shadowproxy.streams import assemble

PROMPTS = [f"Question {i}: how do I tune a {w} cache?"
           for i, w in enumerate(["small", "large", "fast", "slow", "shared", "remote"] * 5)]
LONG = " ".join(["context"] * 45) + " so what now?"


def lcs(a: str, b: str) -> int:
    """Length of the longest common subsequence (textbook dynamic programming)."""
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def ref_similarity(a: str, b: str) -> float:
    return 1.0 if not a and not b else 2 * lcs(a, b) / (len(a) + len(b))


def ref_normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def quantiles(values: list[float]) -> dict[str, float]:
    """p10..p99 with the inclusive method (the same linear interpolation as numpy's)."""
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p10": q[9], "p25": q[24], "p50": q[49], "p75": q[74], "p90": q[89], "p99": q[98]}


def assert_distribution(d: Distribution, values: list[float]) -> None:
    assert d.n == len(values)
    assert d.mean == pytest.approx(statistics.fmean(values))
    assert d.min == pytest.approx(min(values))
    assert d.max == pytest.approx(max(values))
    for key, value in quantiles(values).items():
        assert getattr(d, key) == pytest.approx(value), key


def gen(a: Answer, **extra: Any) -> Generation:
    calls = (ToolCall(a.tool_call.name, a.tool_call.arguments),) if a.tool_call else ()
    return Generation(text=a.text, finish_reason=a.finish_reason, tool_calls=calls, **extra)


def sides(pair: GenerationPair) -> tuple[Generation, Generation]:
    assert pair.primary is not None and pair.shadow is not None
    return pair.primary, pair.shadow


def chat_pairs() -> list[GenerationPair]:
    return [GenerationPair(f"r{i}", gen(answer("small", p)), gen(answer("large", p)))
            for i, p in enumerate(PROMPTS + [LONG])]


def test_text_figures_match_an_independent_computation() -> None:
    """Exact and normalized match, similarity, its histogram and length ratio agree."""
    pairs = chat_pairs()
    assert 0 < sum(differs(p) for p in PROMPTS) < len(PROMPTS)
    result = compare_generations(pairs)
    texts = [(p.primary.text or "", p.shadow.text or "") for p in pairs
             if p.primary and p.shadow]
    sims = [ref_similarity(a, b) for a, b in texts]
    text = result.text
    assert result.n_compared == len(pairs) == text.exact_match.n
    assert text.exact_match.count == sum(a == b for a, b in texts)
    assert text.exact_match.rate == pytest.approx(text.exact_match.count / len(texts))
    assert text.normalized_match.count == sum(ref_normalize(a) == ref_normalize(b)
                                              for a, b in texts)
    assert list(result.similarities) == pytest.approx(sims, abs=1e-12)
    assert_distribution(text.similarity, sims)
    bins = Counter(min(int(s * 10), 9) for s in sims)
    assert text.similarity_histogram == tuple(bins.get(i, 0) for i in range(10))
    assert_distribution(text.length_ratio, [len(b) / len(a) for a, b in texts])
    assert text.length_ratio_undefined == 0
    assert 0 < text.exact_match.count < len(texts)  # the models agree on most, not all


def test_similarity_of_known_texts() -> None:
    """Identical texts score 1, disjoint ones 0, two empty texts 1; others 2·LCS/(|a|+|b|)."""
    cases = [("abc", "abc"), ("abc", "xyz"), ("", ""), ("", "abc"),
             ("kitten sitting", "sitting kitten"), ("Größe", "grösse")]
    got = similarities([a for a, _ in cases], [b for _, b in cases])
    assert got == pytest.approx([ref_similarity(a, b) for a, b in cases], abs=1e-12)
    assert got[:4] == [1.0, 0.0, 1.0, 0.0]
    assert similarities([], []) == []


def test_a_similarity_of_a_whole_tenth_falls_in_its_own_bin() -> None:
    """2·LCS/(|a|+|b|) = 2/10 and 1/10 exactly: the similarity is the fraction rounded
    once (not 1 − 8/10 = 0.19999999999999996), and the histogram counts it in [0.2, 0.3)."""
    pairs = [GenerationPair("r1", Generation(text="a"), Generation(text="aaaabaaaa")),
             GenerationPair("r2", Generation(text="a"), Generation(text="bbbbbbbbbbbbbbbbbba")),
             GenerationPair("r3", Generation(text="abcde"), Generation(text="abxyz"))]
    result = compare_generations(pairs)
    assert list(result.similarities) == [0.2, 0.1, 0.4]
    assert result.text.similarity_histogram == (0, 1, 1, 0, 1, 0, 0, 0, 0, 0)
    assert result.most_different[0].similarity == 0.1


def test_normalization_folds_case_and_whitespace_and_optionally_punctuation() -> None:
    """Case and whitespace runs never count; punctuation only when asked."""
    assert normalize("  Hello,\n\tWORLD!  ") == "hello, world!"
    assert normalize("Hello, world!", strip_punctuation=True) == "hello world"
    assert normalize("«Straße» — ok…", strip_punctuation=True) == "strasse ok"
    pairs = [GenerationPair("a", Generation(text="Hello,  World"), Generation(text="hello world")),
             GenerationPair("b", Generation(text="Yes."), Generation(text="YES"))]
    assert compare_generations(pairs).text.normalized_match.count == 0
    strict = compare_generations(pairs, strip_punctuation=True)
    assert strict.text.normalized_match.count == 2
    assert strict.text.exact_match.count == 0


def test_finish_reason_agreement_matches_counts() -> None:
    """Agreement and the primary × shadow table count the same pairs as a Counter does."""
    pairs = chat_pairs() + [GenerationPair("x", Generation(text="a"), Generation(text="a"))]
    result = compare_generations(pairs).finish_reason
    reasons = [(p.primary.finish_reason, p.shadow.finish_reason) for p in pairs
               if p.primary and p.shadow]
    assert result.agreement.count == sum(a == b for a, b in reasons)
    table = Counter(("null" if a is None else a, "null" if b is None else b)
                    for a, b in reasons)
    assert {(a, b): n for a, row in result.pairs.items() for b, n in row.items()} == table
    assert result.pairs["length"]["stop"] == 1  # the long prompt: small stops at 40 tokens
    assert result.primary == dict(Counter(a or "null" for a, _ in reasons))
    assert result.shadow == dict(Counter(b or "null" for _, b in reasons))


def _call_pair(rid: str, p: list[tuple[str, str]], s: list[tuple[str, str]],
               p_text: str | None = None, s_text: str | None = None) -> GenerationPair:
    return GenerationPair(rid, Generation(text=p_text, tool_calls=tuple(ToolCall(*c) for c in p)),
                          Generation(text=s_text, tool_calls=tuple(ToolCall(*c) for c in s)))


def _same_calls_ref(p: GenerationPair) -> bool:
    a, b = sides(p)[0].tool_calls, sides(p)[1].tool_calls
    if [c.name for c in a] != [c.name for c in b]:
        return False
    for x, y in zip(a, b, strict=True):
        try:
            if json.loads(x.arguments) != json.loads(y.arguments):
                return False
        except json.JSONDecodeError:
            if x.arguments != y.arguments:
                return False
    return True


def test_tool_call_agreement_compares_arguments_as_json() -> None:
    """Same function with reordered arguments agrees; other arguments or names do not."""
    weather = [GenerationPair(f"w{i}", gen(answer("small", q, tool="get_weather")),
                              gen(answer("large", q, tool="get_weather")))
               for i, q in enumerate([f"What is the weather in {c}?" for c in
                                      ("Paris", "Rome", "Oslo", "Lyon", "Berlin")])]
    pairs = weather + [
        _call_pair("d", [("get_weather", '{"city": "A"}')], [("get_weather", '{"city": "B"}')]),
        _call_pair("n", [("get_weather", "{}")], [("get_time", "{}")]),
        _call_pair("i", [("f", "{not json")], [("f", "{not json")]),
        _call_pair("j", [("f", "{not json")], [("f", "{}")]),
        _call_pair("t", [], [], "hello", "hello"),
        _call_pair("two", [("f", "{}"), ("g", '{"a":1}')], [("f", "{}"), ("g", '{"a": 1}')]),
    ]
    result = compare_generations(pairs).tool_calls
    calls = [(sides(p)[0].tool_calls, sides(p)[1].tool_calls, p) for p in pairs]
    either = [(a, b, p) for a, b, p in calls if a or b]
    assert result.n_either == len(either) == len(pairs) - 1
    assert result.presence.count == sum(bool(a) == bool(b) for a, b, _ in calls)
    assert result.same_names.count == sum([c.name for c in a] == [c.name for c in b]
                                          for a, b, _ in either)
    assert result.same_calls.count == sum(_same_calls_ref(p) for _, _, p in either)
    assert result.invalid_arguments == {"primary": 2, "shadow": 1}
    # Paris, Rome, Berlin: both call with the keys in another order; Oslo, Lyon: small
    # answers in text instead.
    assert [differs(f"What is the weather in {c}?") for c in ("Paris", "Oslo", "Lyon")] == [
        False, True, True]
    assert result.same_calls.count == 3 + 1 + 1  # weather ×3, "i" (same raw text), "two"


def test_tool_call_arguments_differing_in_a_boolean_are_other_calls() -> None:
    """`true` is not `1` nor `false` `0` in JSON (Python's == says they are); the same
    number written `1` or `1.0` is the same argument."""
    pairs = [
        _call_pair("b1", [("f", '{"urgent": true}')], [("f", '{"urgent": 1}')]),
        _call_pair("b0", [("f", '{"a": [false, {"b": null}]}')],
                   [("f", '{"a": [0, {"b": null}]}')]),
        _call_pair("top", [("f", "true")], [("f", "1")]),
        _call_pair("num", [("f", '{"n": 1, "m": [2]}')], [("f", '{"m": [2.0], "n": 1.0}')]),
        _call_pair("same", [("f", '{"a": true, "b": "x"}')], [("f", '{"b": "x", "a": true}')]),
    ]
    result = compare_generations(pairs).tool_calls
    assert (result.same_names.count, result.same_calls.count) == (5, 2)


def test_tool_call_arguments_with_integers_past_64_bits_are_compared_exactly() -> None:
    """Order ids past 2^64 that differ by one are other calls (read as floats they were
    equal); the same id is the same call; 1e999, valid JSON, is no invalid argument."""
    pairs = [
        _call_pair("other", [("refund", '{"order": 18446744073709551616}')],
                   [("refund", '{"order": 18446744073709551617}')]),
        _call_pair("negative", [("refund", '{"order": -9223372036854775809}')],
                   [("refund", '{"order": -9223372036854775810}')]),
        _call_pair("same", [("refund", '{"order": 18446744073709551617, "n": 1}')],
                   [("refund", '{"n": 1.0, "order": 18446744073709551617}')]),
        _call_pair("huge", [("f", '{"x": 1e999}')], [("f", '{"x": 1e999}')]),
    ]
    result = compare_generations(pairs).tool_calls
    assert [_same_calls_ref(p) for p in pairs] == [False, False, True, True]
    assert (result.same_names.count, result.same_calls.count) == (4, 2)
    assert result.invalid_arguments == {"primary": 0, "shadow": 0}


def test_json_validity_counts_only_requests_that_asked_for_json() -> None:
    """Each side's share of valid JSON among the requests that asked, as json.loads says."""
    pairs = []
    for i, prompt in enumerate(PROMPTS):
        asked = i % 2 == 0
        pairs.append(GenerationPair(f"r{i}", gen(answer("small", prompt, json_mode=asked)),
                                    gen(answer("large", prompt, json_mode=asked)),
                                    wants_json=asked))
    result = compare_generations(pairs).json

    def valid(text: str | None) -> bool:
        try:
            json.loads(text or "")
            return True
        except json.JSONDecodeError:
            return False

    asked_pairs = [p for p in pairs if p.wants_json]
    assert result.n_asked == len(asked_pairs) == len(PROMPTS) // 2
    assert result.primary.count == sum(valid(sides(p)[0].text) for p in asked_pairs)
    assert result.shadow.count == len(asked_pairs)
    assert result.primary.count < len(asked_pairs)  # small fences some answers in Markdown


def test_asks_for_json_and_is_generation() -> None:
    """json_object and json_schema ask for JSON; text does not. Completions are recognised."""
    assert asks_for_json({"response_format": {"type": "json_object"}})
    assert asks_for_json({"response_format": {"type": "json_schema", "json_schema": {}}})
    assert not asks_for_json({"response_format": {"type": "text"}})
    assert not asks_for_json([1])
    assert is_generation({"object": "chat.completion", "choices": []})
    assert is_generation({"choices": [{"text": "x"}]})
    assert not is_generation({"prediction": 1.0})
    assert not is_generation({"error": {"message": "x"}})


def test_timing_side_by_side_matches_statistics() -> None:
    """Latency, TTFT, gaps and tokens/s percentiles per side, as statistics computes them."""
    pairs = []
    for i in range(40):
        p = Generation(text="a", latency_ms=100.0 + i, streamed=False)
        s = Generation(text="a", latency_ms=150.0 + 3 * i, streamed=True, ttft_ms=20.0 + i % 7,
                       gap_p50_ms=5.0 + (i % 5) / 10, gap_p99_ms=9.0 + i % 3,
                       tokens_per_s=40.0 + i)
        pairs.append(GenerationPair(f"r{i}", p, s))
    result = compare_generations(pairs).timing
    assert_distribution(result["primary"].latency_ms, [100.0 + i for i in range(40)])
    assert_distribution(result["shadow"].latency_ms, [150.0 + 3 * i for i in range(40)])
    assert_distribution(result["shadow"].ttft_ms, [20.0 + i % 7 for i in range(40)])
    assert_distribution(result["shadow"].gap_p50_ms, [5.0 + (i % 5) / 10 for i in range(40)])
    assert_distribution(result["shadow"].gap_p99_ms, [9.0 + i % 3 for i in range(40)])
    assert_distribution(result["shadow"].tokens_per_s, [40.0 + i for i in range(40)])
    assert result["primary"].ttft_ms == Distribution(0)
    assert (result["primary"].streamed, result["shadow"].streamed) == (0, 40)


def test_usage_totals_and_cost_per_thousand_requests() -> None:
    """Token totals, means and cost per 1,000 requests follow from the prices by hand."""
    pairs = [GenerationPair(f"r{i}", Generation(text="a", prompt_tokens=100 + i,
                                                completion_tokens=20 + i),
                            Generation(text="a", prompt_tokens=100 + i,
                                       completion_tokens=None if i == 0 else 30 + i))
             for i in range(10)]
    result = compare_generations(pairs, prices={"primary": Prices(0.15, 0.60),
                                                "shadow": Prices(2.50, 10.00)}).usage
    p, s = result["primary"], result["shadow"]
    assert (p.n_with_usage, p.prompt_tokens, p.completion_tokens) == (10, 1045, 245)
    assert (s.n_with_usage, s.prompt_tokens, s.completion_tokens) == (9, 945, 315)
    assert p.mean_completion_tokens == pytest.approx(24.5)
    assert p.cost_per_1000 == pytest.approx((1045 * 0.15 + 245 * 0.60) / 1e6 / 10 * 1000)
    assert s.cost_per_1000 == pytest.approx((945 * 2.50 + 315 * 10.00) / 1e6 / 9 * 1000)
    without = compare_generations(pairs).usage
    assert without["primary"].cost_per_1000 is None
    assert without["primary"].prompt_tokens == 1045


def test_most_different_pairs_come_with_a_word_diff() -> None:
    """The least similar pairs first, identical ones never; each diff rebuilds both texts."""
    pairs = chat_pairs()
    result = compare_generations(pairs, most_different=5)
    texts = {p.request_id: (p.primary.text or "", p.shadow.text or "") for p in pairs
             if p.primary and p.shadow}
    ranked = sorted((ref_similarity(a, b), rid) for rid, (a, b) in texts.items() if a != b)
    assert [d.request_id for d in result.most_different] == [rid for _, rid in ranked[:5]]
    for d in result.most_different:
        a, b = texts[d.request_id]
        assert (d.primary_text, d.shadow_text) == (a, b)
        assert "".join(s.primary for s in d.diff) == a
        assert "".join(s.shadow for s in d.diff) == b
        assert all(s.primary == s.shadow for s in d.diff if s.op == "equal")
        assert any(s.op != "equal" for s in d.diff)
    assert len(compare_generations(pairs, most_different=100).most_different) == len(ranked)


def test_a_pair_without_a_finish_reason_shows_a_dash_in_its_title() -> None:
    """An answer that gave no finish_reason (a stream cut short) is "–" in the most
    different pair's title, as elsewhere in the report, not Python's ``None``."""
    pair = {"request_id": "r1", "similarity": 0.25, "primary_text": "a b",
            "shadow_text": "a c", "primary_finish_reason": "stop",
            "shadow_finish_reason": None,
            "diff": [{"op": "equal", "primary": "a ", "shadow": "a "},
                     {"op": "replace", "primary": "b", "shadow": "c"}]}
    section = _most_different({"most_different": [pair]})
    assert section.comparisons[0].title == "r1: similarity 0.25, finish_reason stop / –"


def test_word_diff_of_a_known_edit_and_its_html() -> None:
    """One replaced word is one replace segment between equal runs; HTML is escaped."""
    diff = word_diff("the <quick> fox", "the slow fox")
    assert [(s.op, s.primary, s.shadow) for s in diff] == [
        ("equal", "the ", "the "), ("replace", "<quick>", "slow"), ("equal", " fox", " fox")]
    assert diff_html(diff) == "the <del>&lt;quick&gt;</del><ins>slow</ins> fox"


def test_labels_give_each_side_its_match_and_similarity() -> None:
    """Against the reference answers (here large's), each side's exact match and similarity."""
    pairs = [GenerationPair(p.request_id, p.primary, p.shadow,
                            label=answer("large", prompt).text if i % 3 else None)
             for i, (p, prompt) in enumerate(zip(chat_pairs(), PROMPTS + [LONG], strict=True))]
    result = compare_generations(pairs).labels
    assert result is not None
    labelled = [p for p in pairs if p.label is not None]
    assert result.n == len(labelled)
    for side in ("primary", "shadow"):
        texts = [(getattr(p, side).text or "", p.label or "") for p in labelled]
        assert result.exact_match[side].count == sum(a == b for a, b in texts)
        assert result.normalized_match[side].count == sum(
            ref_normalize(a) == ref_normalize(b) for a, b in texts)
        assert_distribution(result.similarity[side], [ref_similarity(a, b) for a, b in texts])
    assert result.exact_match["shadow"].rate == 1.0
    assert compare_generations(chat_pairs()).labels is None


def test_pairs_missing_a_side_are_counted_not_compared() -> None:
    """A side without an answer leaves the pair out of every figure and is counted."""
    pairs = chat_pairs()[:4] + [GenerationPair("m1", None, Generation(text="x")),
                                GenerationPair("m2", Generation(text="x"), None)]
    result = compare_generations(pairs)
    assert (result.n_pairs, result.n_compared) == (6, 4)
    assert result.missing == {"primary": 1, "shadow": 1}
    assert result.text.exact_match.n == 4
    orjson.dumps(result.to_dict())  # JSON-ready
    empty = compare_generations([])
    assert empty.text.exact_match.rate is None
    assert empty.text.similarity == Distribution(0)


def test_generation_from_reads_chat_legacy_tool_calls_and_stream_timing() -> None:
    """Text, tool calls, finish reason, usage and stream timing are read from the columns."""
    body = {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": [{"type": "text", "text": "Hi"}],
                        "tool_calls": [{"id": "c", "type": "function", "function": {
                            "name": "f", "arguments": '{"a": 1}'}}],
                        "function_call": {"name": "g", "arguments": {"b": 2}}}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    stream = {"ttft_ms": 12.5, "gap_p50_ms": 4.0, "gap_p99_ms": 9.0, "tokens_per_s": 50.0,
              "interrupted": False}
    g = generation_from(body, stream, 80.0)
    assert g == Generation(text="Hi", finish_reason="tool_calls",
                           tool_calls=(ToolCall("f", '{"a": 1}'), ToolCall("g", '{"b":2}')),
                           prompt_tokens=7, completion_tokens=3, latency_ms=80.0, streamed=True,
                           ttft_ms=12.5, gap_p50_ms=4.0, gap_p99_ms=9.0, tokens_per_s=50.0)
    legacy = generation_from({"object": "text_completion",
                              "choices": [{"text": "yo", "finish_reason": "stop"}]})
    assert legacy == Generation(text="yo", finish_reason="stop")
    assert generation_from({"error": {"message": "overloaded"}}) is None
    assert generation_from(None) is None
    assert generation_from({"choices": [{"message": {"content": None}}],
                            "usage": {"prompt_tokens": True}}) == Generation()


def test_semantic_similarity_from_vectors_is_the_cosine() -> None:
    """Cosine of each pair of vectors, summarised; a zero vector is left out."""
    a = [[1.0, 0.0], [1.0, 1.0], [0.3, -2.0], [0.0, 0.0]]
    b = [[1.0, 0.0], [-1.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    result = semantic_from_vectors(a, b, "m")
    cos = [sum(x * y for x, y in zip(u, v, strict=True)) / (math.hypot(*u) * math.hypot(*v))
           for u, v in zip(a[:3], b[:3], strict=True)]
    assert result.available and result.model == "m" and result.similarity is not None
    assert_distribution(result.similarity, cos)
    with pytest.raises(ValueError, match="as many vectors"):
        semantic_from_vectors(a, b[:2])


@pytest.fixture
async def chat_service() -> AsyncIterator[str]:
    runner = web.AppRunner(build_app(speed=Speed(0.002, 0.0005), clock=lambda: 1))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_semantic_similarity_from_an_embeddings_endpoint(chat_service: str) -> None:
    """Vectors fetched from /v1/embeddings (in batches) give each pair's cosine; pairs with
    an empty side are left out."""
    primary = [answer("small", p).text for p in PROMPTS[:12]] + [""]
    shadow = [answer("large", p).text for p in PROMPTS[:12]] + ["x"]
    result = await semantic_similarity(f"{chat_service}/v1/embeddings", primary, shadow,
                                       model="hashed", batch_size=5)
    assert result.available and result.similarity is not None
    async with aiohttp.ClientSession() as session, session.post(
            f"{chat_service}/v1/embeddings", json={"input": primary[:12] + shadow[:12]}) as r:
        vectors = [d["embedding"] for d in (await r.json())["data"]]
    cos = [sum(x * y for x, y in zip(u, v, strict=True)) / (math.hypot(*u) * math.hypot(*v))
           for u, v in zip(vectors[:12], vectors[12:], strict=True)]
    assert_distribution(result.similarity, cos)
    same = [i for i in range(12) if primary[i] == shadow[i]]
    assert same and all(cos[i] == pytest.approx(1.0) for i in same)


async def test_an_unusable_embeddings_endpoint_is_reported_not_raised(
        chat_service: str) -> None:
    """A refused connection, a 404 or a malformed answer give available=False and why."""
    refused = await semantic_similarity("http://127.0.0.1:1/v1/embeddings", ["a"], ["b"],
                                        timeout_s=5)
    assert not refused.available and refused.why and "127.0.0.1:1" in refused.why
    missing = await semantic_similarity(f"{chat_service}/v2/nothing", ["a"], ["b"], timeout_s=5)
    assert not missing.available and missing.why and "404" in missing.why
    wrong = await semantic_similarity(f"{chat_service}/v1/models", ["a"], ["b"], timeout_s=5)
    assert not wrong.available and wrong.why
    nothing = await semantic_similarity(f"{chat_service}/v1/embeddings", [None], ["b"])
    assert nothing.available and nothing.similarity == Distribution(0)


async def test_an_unusable_embeddings_endpoint_is_named_without_its_secrets(
        chat_service: str) -> None:
    """The reason goes into the report, which is shared: an API key in the endpoint's query
    and a password before '@' are shown as ***, on a refused connection and on an answer
    that cannot be used."""
    for base in ("http://u:Pw9secret@127.0.0.1:1", chat_service.replace("//", "//u:Pw9secret@")):
        result = await semantic_similarity(f"{base}/v2/nothing?api_key=K3ysecret", ["a"],
                                           ["b"], timeout_s=5)
        assert not result.available and result.why
        assert "secret" not in result.why and "/v2/nothing?api_key=***" in result.why
    with pytest.raises(ValueError, match=r"got 'ftp://\*\*\*@h/e\?key=\*\*\*'"):
        EmbeddingsConfig(url="ftp://u:Pw9secret@h/e?key=K3ysecret")


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]
                ) -> tuple[bytes, list[tuple[int, float]], float]:
    sent = time.perf_counter()
    data = bytearray()
    arrivals = []
    async with session.post(url, json=body) as resp:
        async for piece in resp.content.iter_any():
            arrivals.append((len(data), time.perf_counter()))
            data += piece
    return bytes(data), arrivals, sent


async def test_a_streaming_shadow_against_an_unstreamed_primary(chat_service: str) -> None:
    """The primary answers in one body, the shadow streams: both read to the same shape and
    the comparison sees the shadow's timing and the same texts the service wrote."""
    url = f"{chat_service}/v1/chat/completions"
    pairs = []
    async with aiohttp.ClientSession() as session:
        for i, prompt in enumerate(PROMPTS[:10] + [LONG]):
            messages = [{"role": "user", "content": prompt}]
            raw, _, sent = await _post(session, url, {"model": "small", "messages": messages})
            primary = generation_from(orjson.loads(raw), None,
                                      (time.perf_counter() - sent) * 1000)
            raw, arrivals, sent = await _post(session, url, {
                "model": "large", "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}})
            assembled = assemble(raw, arrivals, sent)
            assert assembled is not None
            shadow = generation_from(assembled[0], assembled[1], assembled[1]["duration_ms"])
            pairs.append(GenerationPair(f"r{i}", primary, shadow))
    result = compare_generations(pairs)
    expected = [(answer("small", p).text, answer("large", p).text) for p in PROMPTS[:10] + [LONG]]
    assert [(sides(p)[0].text, sides(p)[1].text) for p in pairs] == expected
    assert result.text.exact_match.count == sum(a == b for a, b in expected)
    assert result.timing["shadow"].streamed == 11 and result.timing["primary"].streamed == 0
    assert result.timing["shadow"].ttft_ms.n == 11 and result.timing["primary"].ttft_ms.n == 0
    assert result.timing["shadow"].ttft_ms.min is not None
    assert result.timing["shadow"].ttft_ms.min >= 4.0  # large: twice the 2 ms
    assert result.usage["shadow"].completion_tokens == sum(
        answer("large", p).completion_tokens for p in PROMPTS[:10] + [LONG])
