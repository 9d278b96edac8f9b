"""Generative answers compared pair by pair (``compare.task: generation``); pure, no SQL.

The report reads, per paired request, each side's ``body_json`` (the unstreamed answer, or
a stream assembled into that shape by ``shadowproxy.streams``), its ``stream`` timing and
``latency_ms``, whether the request asked for JSON, and a reference answer when one was
imported as a label; :func:`generation_from` turns a side into a :class:`Generation`, and
:func:`compare_generations` gives every figure of the section as typed results:

- text: exact match, normalized match (case folded, whitespace collapsed, punctuation
  stripped if asked), similarity (below), length ratio (shadow / primary characters);
- ``finish_reason`` agreement with the primary × shadow counts;
- tool calls: both sides call a tool or neither; same function names; same calls (names,
  and arguments compared as parsed JSON, so key order and spacing do not count);
- JSON validity of each side where the request asked for JSON (``response_format`` type
  ``json_object`` or ``json_schema``);
- timing side by side: total latency, time to first token, each answer's median and p99
  inter-chunk gap, tokens per second (streamed answers only for the last three);
- usage totals and, with prices per side, cost per 1,000 requests;
- the most different pairs, with both texts and a word-level diff (``difflib``);
- with labels, exact match and similarity of each side against the reference;
- optionally, semantic similarity from embeddings (``compare/embeddings.py``).

Similarity is the normalized Indel similarity of RapidFuzz (``rapidfuzz.distance.Indel``):
``2·LCS(a, b) / (len(a) + len(b))`` over characters, 1 for two empty texts — the measure of
``difflib.SequenceMatcher.ratio`` without its matching heuristics, computed exactly by a
bit-parallel C++ core (MIT licence, maintained since 2020, wheels for every platform);
``docs/generative.md`` has the measured difference from ``difflib``.

Only the first choice of each answer is compared. A pair counts once both sides answered
(a body with ``choices``); the others are counted as missing per side. Text figures cover
the pairs where at least one side wrote text (a missing text is compared as ""); two
answers that only call tools (their content null or "") are compared by their tool calls
alone.
"""

from __future__ import annotations

import difflib
import html
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson

from shadowproxy.compare.visible import visible
from shadowproxy.errors import UsageError
from shadowproxy.jsonexact import loads_exact

SIMILARITY_BINS = 10
_WORDS = re.compile(r"\s+|[^\s]+")


@dataclass(frozen=True)
class ToolCall:
    """One function call of an answer; ``arguments`` as the model wrote them (JSON text)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Generation:
    """One side's answer, as far as the report compares it (the first choice)."""

    text: str | None = None
    finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    """The whole call (``responses.latency_ms``), streamed or not."""
    streamed: bool = False
    ttft_ms: float | None = None
    gap_p50_ms: float | None = None
    gap_p99_ms: float | None = None
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class GenerationPair:
    """One paired request: both sides' answers (None when a side did not answer)."""

    request_id: str
    primary: Generation | None
    shadow: Generation | None
    wants_json: bool = False
    """The request asked for JSON (see :func:`asks_for_json`)."""
    label: str | None = None
    """The reference answer, when one was imported."""


@dataclass(frozen=True)
class Prices:
    """What a side's model costs, per million tokens."""

    input_per_million: float
    output_per_million: float


@dataclass(frozen=True)
class Rate:
    """``count`` of ``n``; ``rate`` is None when ``n`` is 0."""

    count: int
    n: int
    rate: float | None

    @staticmethod
    def of(count: int, n: int) -> Rate:
        return Rate(count, n, count / n if n else None)


@dataclass(frozen=True)
class Distribution:
    """Summary of a sample; percentiles interpolate linearly (numpy's default)."""

    n: int
    mean: float | None = None
    min: float | None = None
    p10: float | None = None
    p25: float | None = None
    p50: float | None = None
    p75: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @staticmethod
    def of(values: Sequence[float | None]) -> Distribution:
        x = np.asarray([v for v in values if v is not None], dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            return Distribution(0)
        q = [float(v) for v in np.percentile(x, [10, 25, 50, 75, 90, 99])]
        return Distribution(n=int(x.size), mean=float(x.mean()), min=float(x.min()),
                            p10=q[0], p25=q[1], p50=q[2], p75=q[3], p90=q[4], p99=q[5],
                            max=float(x.max()))


@dataclass(frozen=True)
class TextAgreement:
    exact_match: Rate
    normalized_match: Rate
    similarity: Distribution
    similarity_histogram: tuple[int, ...]
    """Pairs per tenth of similarity: [0, 0.1), ..., [0.9, 1.0] (1.0 in the last bin)."""
    length_ratio: Distribution
    """Shadow characters / primary characters, over pairs whose primary text is not empty."""
    length_ratio_undefined: int
    """Pairs whose primary text is empty and shadow text is not."""


@dataclass(frozen=True)
class FinishReasons:
    agreement: Rate
    pairs: dict[str, dict[str, int]]
    """primary reason → shadow reason → pairs ("null" for none)."""
    primary: dict[str, int]
    shadow: dict[str, int]


@dataclass(frozen=True)
class ToolCallAgreement:
    presence: Rate
    """Over all compared pairs: both sides call a tool, or neither."""
    n_either: int
    """Pairs where at least one side called a tool."""
    same_names: Rate
    """Over ``n_either``: the same functions in the same order."""
    same_calls: Rate
    """Over ``n_either``: the same functions with the same arguments (as parsed JSON)."""
    invalid_arguments: dict[str, int]
    """Per side, calls whose arguments are not valid JSON."""


@dataclass(frozen=True)
class JsonValidity:
    n_asked: int
    primary: Rate
    shadow: Rate


@dataclass(frozen=True)
class SideTiming:
    latency_ms: Distribution
    ttft_ms: Distribution
    gap_p50_ms: Distribution
    """Across answers, each streamed answer's median inter-chunk gap."""
    gap_p99_ms: Distribution
    tokens_per_s: Distribution
    streamed: int


@dataclass(frozen=True)
class SideUsage:
    n_with_usage: int
    prompt_tokens: int
    completion_tokens: int
    mean_prompt_tokens: float | None
    mean_completion_tokens: float | None
    cost_per_1000: float | None
    """Mean cost of a request with usage, × 1,000; None without prices for the side."""


@dataclass(frozen=True)
class DiffSegment:
    """A run of words: ``equal`` in both, or ``delete``/``insert``/``replace`` between them."""

    op: str
    primary: str
    shadow: str


@dataclass(frozen=True)
class DifferentPair:
    request_id: str
    similarity: float
    primary_text: str
    shadow_text: str
    primary_finish_reason: str | None
    shadow_finish_reason: str | None
    diff: tuple[DiffSegment, ...]


@dataclass(frozen=True)
class LabelAgreement:
    n: int
    exact_match: dict[str, Rate]
    normalized_match: dict[str, Rate]
    similarity: dict[str, Distribution]


@dataclass(frozen=True)
class SemanticSimilarity:
    """Cosine similarity of the two answers' embeddings; ``why`` when not computed."""

    available: bool
    similarity: Distribution | None = None
    model: str | None = None
    why: str | None = None


@dataclass(frozen=True)
class GenerationComparison:
    n_pairs: int
    n_compared: int
    missing: dict[str, int]
    text: TextAgreement
    finish_reason: FinishReasons
    tool_calls: ToolCallAgreement
    json: JsonValidity
    timing: dict[str, SideTiming]
    usage: dict[str, SideUsage]
    most_different: tuple[DifferentPair, ...]
    labels: LabelAgreement | None = None
    semantic: SemanticSimilarity | None = None
    similarities: tuple[float, ...] = field(default=(), repr=False)
    """The similarity of each pair compared on text, in input order (for plots)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the per-pair similarities left out)."""
        out = asdict(self)
        out.pop("similarities")
        return out


# --- reading one side ----------------------------------------------------------------------

def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return None


def is_generation(body_json: Any) -> bool:
    """Whether a response body is a chat or text completion (the report's task inference)."""
    if not isinstance(body_json, dict):
        return False
    if body_json.get("object") in ("chat.completion", "text_completion"):
        return True
    choices = body_json.get("choices")
    return (isinstance(choices, list) and bool(choices) and isinstance(choices[0], dict)
            and ("message" in choices[0] or "text" in choices[0]))


def asks_for_json(request_json: Any) -> bool:
    """Whether a request asked for JSON: ``response_format.type`` json_object or json_schema."""
    if not isinstance(request_json, dict):
        return False
    fmt = request_json.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def generation_from(body_json: Any, stream: Mapping[str, Any] | None = None,
                    latency_ms: float | None = None) -> Generation | None:
    """A side's answer from its ``body_json``, ``stream`` and ``latency_ms`` columns; None
    when the body is not a completion (an error, another API)."""
    if not is_generation(body_json):
        return None
    choices = body_json.get("choices")
    first: Any = choices[0] if isinstance(choices, list) and choices else {}
    if not isinstance(first, dict):
        first = {}
    text: str | None
    calls: list[ToolCall] = []
    message = first.get("message")
    if isinstance(message, dict):
        text = _content_text(message.get("content"))
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                calls.append(ToolCall(str(fn.get("name") or ""), _arguments(fn)))
        fc = message.get("function_call")
        if isinstance(fc, dict):
            calls.append(ToolCall(str(fc.get("name") or ""), _arguments(fc)))
        if calls and not text:
            # An answer that only calls tools wrote no text. Streamed, its content is often
            # "" (vLLM's first chunk is {"role": "assistant", "content": ""}) where the same
            # answer unstreamed has null: both are compared by their tool calls alone.
            text = None
    else:
        text = first.get("text") if isinstance(first.get("text"), str) else None
    usage = body_json.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    s = stream if isinstance(stream, Mapping) else {}
    finish = first.get("finish_reason")
    return Generation(
        text=text, finish_reason=finish if isinstance(finish, str) else None,
        tool_calls=tuple(calls), prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")), latency_ms=_float(latency_ms),
        streamed=bool(s), ttft_ms=_float(s.get("ttft_ms")),
        gap_p50_ms=_float(s.get("gap_p50_ms")), gap_p99_ms=_float(s.get("gap_p99_ms")),
        tokens_per_s=_float(s.get("tokens_per_s")))


def _arguments(fn: Mapping[str, Any]) -> str:
    args = fn.get("arguments")
    if isinstance(args, str):
        return args
    return orjson.dumps(args).decode() if args is not None else ""


# --- text ----------------------------------------------------------------------------------

def normalize(text: str, *, strip_punctuation: bool = False) -> str:
    """Case folded, whitespace runs made one space and trimmed; punctuation removed if asked
    (Unicode categories P*)."""
    if strip_punctuation:
        text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.casefold().split())


def similarities(a: Sequence[str], b: Sequence[str]) -> list[float]:
    """Normalized Indel similarity of each pair ``(a[i], b[i])``: 2·LCS / (|a| + |b|)."""
    if not a:
        return []
    try:
        from rapidfuzz import process
        from rapidfuzz.distance import Indel
    except ImportError as exc:
        raise UsageError("comparing generated texts needs rapidfuzz: "
                         "pip install 'shadowproxy[report]'") from exc

    # From the integer distance, not ``Indel.normalized_similarity``: that is 1 − d/(|a|+|b|)
    # in floating point, which puts 2/10 at 0.19999999999999996, below its histogram bin.
    # (|a|+|b| − d) / (|a|+|b|) is the fraction rounded once.
    distances = process.cpdist(list(a), list(b), scorer=Indel.distance, dtype=np.int64,
                               workers=1)
    out = []
    for x, y, d in zip(a, b, distances.tolist(), strict=True):
        total = len(x) + len(y)
        out.append((total - d) / total if total else 1.0)
    return out


def word_diff(a: str, b: str) -> tuple[DiffSegment, ...]:
    """A word-level diff of two texts (whitespace kept), as runs of segments."""
    wa, wb = _WORDS.findall(a), _WORDS.findall(b)
    matcher = difflib.SequenceMatcher(None, wa, wb, autojunk=False)
    return tuple(DiffSegment(op, "".join(wa[i1:i2]), "".join(wb[j1:j2]))
                 for op, i1, i2, j1, j2 in matcher.get_opcodes())


def diff_html(diff: Sequence[DiffSegment]) -> str:
    """The diff as HTML: equal text plain, the primary's words in ``<del>``, the shadow's in
    ``<ins>`` (escaped, control characters and bidirectional overrides shown as escapes:
    ``visible``)."""
    out = []
    for seg in diff:
        if seg.op == "equal":
            out.append(html.escape(visible(seg.primary)))
            continue
        if seg.primary:
            out.append(f"<del>{html.escape(visible(seg.primary))}</del>")
        if seg.shadow:
            out.append(f"<ins>{html.escape(visible(seg.shadow))}</ins>")
    return "".join(out)


def _histogram(values: Sequence[float]) -> tuple[int, ...]:
    counts = [0] * SIMILARITY_BINS
    for v in values:
        counts[min(int(v * SIMILARITY_BINS), SIMILARITY_BINS - 1)] += 1
    return tuple(counts)


def _text_agreement(pt: list[str], st: list[str], sims: list[float],
                    strip_punctuation: bool) -> TextAgreement:
    n = len(pt)
    exact = sum(a == b for a, b in zip(pt, st, strict=True))
    norm = sum(normalize(a, strip_punctuation=strip_punctuation)
               == normalize(b, strip_punctuation=strip_punctuation)
               for a, b in zip(pt, st, strict=True))
    ratios: list[float | None] = []
    undefined = 0
    for a, b in zip(pt, st, strict=True):
        if a:
            ratios.append(len(b) / len(a))
        elif b:
            undefined += 1
        else:
            ratios.append(1.0)
    return TextAgreement(Rate.of(exact, n), Rate.of(norm, n), Distribution.of(sims),
                         _histogram(sims), Distribution.of(ratios), undefined)


def _reason(value: str | None) -> str:
    return "null" if value is None else value


def _finish_reasons(primary: list[Generation], shadow: list[Generation]) -> FinishReasons:
    pairs: dict[str, dict[str, int]] = {}
    same = 0
    for p, s in zip(primary, shadow, strict=True):
        row = pairs.setdefault(_reason(p.finish_reason), {})
        key = _reason(s.finish_reason)
        row[key] = row.get(key, 0) + 1
        same += p.finish_reason == s.finish_reason
    return FinishReasons(Rate.of(same, len(primary)), pairs,
                         dict(Counter(_reason(g.finish_reason) for g in primary)),
                         dict(Counter(_reason(g.finish_reason) for g in shadow)))


_INVALID = object()


def _parsed(arguments: str) -> Any:
    """The JSON value of a text, or ``_INVALID``: read exactly (integers past 64 bits stay
    apart, ``1e999`` is JSON), refusing ``NaN`` and ``Infinity``, which are not JSON."""
    try:
        return loads_exact(arguments, allow_nan=False)[0]
    except ValueError:
        return _INVALID


def _same_json(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values. Python's ``==`` takes ``true`` for ``1`` and
    ``false`` for ``0`` (a bool is an int), which JSON does not; numbers compare by value
    (``1`` and ``1.0`` are the same number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(_same_json(v, b[k]) for k, v in a.items()))
    if isinstance(a, list):
        return (isinstance(b, list) and len(a) == len(b)
                and all(_same_json(x, y) for x, y in zip(a, b, strict=True)))
    return bool(a == b)


def _same_call(a: ToolCall, b: ToolCall) -> bool:
    if a.name != b.name:
        return False
    pa, pb = _parsed(a.arguments), _parsed(b.arguments)
    if pa is _INVALID or pb is _INVALID:
        return a.arguments == b.arguments
    return _same_json(pa, pb)


def _tool_calls(primary: list[Generation], shadow: list[Generation]) -> ToolCallAgreement:
    presence = either = names = calls = 0
    invalid = {"primary": 0, "shadow": 0}
    for p, s in zip(primary, shadow, strict=True):
        for side, g in (("primary", p), ("shadow", s)):
            invalid[side] += sum(_parsed(c.arguments) is _INVALID for c in g.tool_calls)
        presence += bool(p.tool_calls) == bool(s.tool_calls)
        if not p.tool_calls and not s.tool_calls:
            continue
        either += 1
        if [c.name for c in p.tool_calls] == [c.name for c in s.tool_calls]:
            names += 1
            calls += all(_same_call(a, b)
                         for a, b in zip(p.tool_calls, s.tool_calls, strict=True))
    return ToolCallAgreement(Rate.of(presence, len(primary)), either, Rate.of(names, either),
                             Rate.of(calls, either), invalid)


def is_valid_json(text: str | None) -> bool:
    """Whether ``text`` is a JSON document (strictly: no Markdown fence, no trailing text)."""
    return text is not None and _parsed(text) is not _INVALID


def _timing(side: list[Generation]) -> SideTiming:
    return SideTiming(Distribution.of([g.latency_ms for g in side]),
                      Distribution.of([g.ttft_ms for g in side]),
                      Distribution.of([g.gap_p50_ms for g in side]),
                      Distribution.of([g.gap_p99_ms for g in side]),
                      Distribution.of([g.tokens_per_s for g in side]),
                      sum(g.streamed for g in side))


def _usage(side: list[Generation], prices: Prices | None) -> SideUsage:
    with_usage = [g for g in side if g.prompt_tokens is not None
                  and g.completion_tokens is not None]
    n = len(with_usage)
    prompt = sum(g.prompt_tokens or 0 for g in with_usage)
    completion = sum(g.completion_tokens or 0 for g in with_usage)
    cost = None
    if prices is not None and n:
        total = (prompt * prices.input_per_million
                 + completion * prices.output_per_million) / 1_000_000
        cost = total / n * 1000
    return SideUsage(n, prompt, completion, prompt / n if n else None,
                     completion / n if n else None, cost)


def _labels(rows: list[tuple[str, str, str]], strip_punctuation: bool
            ) -> LabelAgreement | None:
    if not rows:
        return None
    refs = [r[2] for r in rows]
    n = len(rows)
    exact: dict[str, Rate] = {}
    norm: dict[str, Rate] = {}
    sim: dict[str, Distribution] = {}
    for side, texts in (("primary", [r[0] for r in rows]), ("shadow", [r[1] for r in rows])):
        exact[side] = Rate.of(sum(t == ref for t, ref in zip(texts, refs, strict=True)), n)
        norm[side] = Rate.of(sum(normalize(t, strip_punctuation=strip_punctuation)
                                 == normalize(ref, strip_punctuation=strip_punctuation)
                                 for t, ref in zip(texts, refs, strict=True)), n)
        sim[side] = Distribution.of(similarities(texts, refs))
    return LabelAgreement(n, exact, norm, sim)


def compare_generations(pairs: Sequence[GenerationPair], *,
                        prices: Mapping[str, Prices] | None = None,
                        strip_punctuation: bool = False, most_different: int = 10,
                        semantic: SemanticSimilarity | None = None) -> GenerationComparison:
    """Every figure of the generation section over ``pairs`` (a slice is a subset of them).

    ``prices`` maps "primary" and/or "shadow" to :class:`Prices`; ``most_different`` is how
    many of the least similar pairs to return with their diff; ``semantic`` is attached as
    given (see ``compare/embeddings.py``).
    """
    compared = [p for p in pairs if p.primary is not None and p.shadow is not None]
    missing = {"primary": sum(p.primary is None for p in pairs),
               "shadow": sum(p.shadow is None for p in pairs)}
    primary = [p.primary for p in compared if p.primary is not None]
    shadow = [p.shadow for p in compared if p.shadow is not None]
    # Text is compared where a side wrote some: two tool calls without text are no match.
    texts = [i for i, (a, b) in enumerate(zip(primary, shadow, strict=True))
             if a.text is not None or b.text is not None]
    pt = [primary[i].text or "" for i in texts]
    st = [shadow[i].text or "" for i in texts]
    sims = similarities(pt, st)

    asked = [(a, b) for a, b, p in zip(primary, shadow, compared, strict=True) if p.wants_json]
    json_validity = JsonValidity(
        len(asked), Rate.of(sum(is_valid_json(a.text) for a, _ in asked), len(asked)),
        Rate.of(sum(is_valid_json(b.text) for _, b in asked), len(asked)))

    order = sorted((k for k in range(len(texts)) if pt[k] != st[k]),
                   key=lambda k: (sims[k], compared[texts[k]].request_id))
    different = tuple(
        DifferentPair(compared[texts[k]].request_id, sims[k], pt[k], st[k],
                      primary[texts[k]].finish_reason, shadow[texts[k]].finish_reason,
                      word_diff(pt[k], st[k]))
        for k in order[:most_different])

    labelled = [(a.text or "", b.text or "", p.label)
                for a, b, p in zip(primary, shadow, compared, strict=True) if p.label is not None]
    prices = prices or {}
    return GenerationComparison(
        n_pairs=len(pairs), n_compared=len(compared), missing=missing,
        text=_text_agreement(pt, st, sims, strip_punctuation),
        finish_reason=_finish_reasons(primary, shadow),
        tool_calls=_tool_calls(primary, shadow), json=json_validity,
        timing={"primary": _timing(primary), "shadow": _timing(shadow)},
        usage={"primary": _usage(primary, prices.get("primary")),
               "shadow": _usage(shadow, prices.get("shadow"))},
        most_different=different,
        labels=_labels(labelled, strip_punctuation),
        semantic=semantic, similarities=tuple(sims))


def semantic_from_vectors(primary: Sequence[Sequence[float]],
                          shadow: Sequence[Sequence[float]], model: str | None = None
                          ) -> SemanticSimilarity:
    """Cosine similarity of each pair of embedding vectors, summarised."""
    if len(primary) != len(shadow):
        raise ValueError(f"expected as many vectors per side (got {len(primary)} and "
                         f"{len(shadow)})")
    if not primary:
        return SemanticSimilarity(True, Distribution(0), model)
    a = np.asarray(primary, dtype=np.float64)
    b = np.asarray(shadow, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, np.sum(a * b, axis=1) / norms, np.nan)
    return SemanticSimilarity(True, Distribution.of([float(c) for c in cos]), model)

