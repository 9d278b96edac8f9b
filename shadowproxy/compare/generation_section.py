"""The report's ``generation`` section: a generative model's answers against the primary's.

A route is compared as a generation route when its ``compare.task`` is ``generation``, or
when the task is not configured and most of the first primary answers of the window are chat
or text completions (``generation.is_generation``). The section then stands in for the
``predictions``, ``performance`` and ``slices`` sections of a numeric model; the counts,
operational figures, field diff and data checks are reported as for any route.

What is read, per comparable pair (both answered 2xx with JSON; a seeded sample of at most
``thresholds.sample_max``): each side's ``body_json`` (the unstreamed answer, or a stream
assembled into that shape), ``responses.stream`` (the stream's timing; NULL for an answer
that was not streamed, whose timing is then its ``latency_ms`` alone), whether the request
asked for JSON, the reference answer imported as a label, and what the slices need (the
prompt's length, the requested ``model``, whether the request asked for a stream). Bodies
come back trimmed to the first choice without its ``logprobs``, the only part compared, so
that large answers cost no memory here. Every figure is then computed by the pure functions
of ``compare/generation.py``; semantic similarity by ``compare/embeddings.py`` when an
embeddings endpoint is configured. A pair where either call failed (``error_kind``: a
stream cut short, assembled as far as it went) is left out and counted (``cut_short``).

Slices: the families of ``compare.slices`` (SQL conditions over the pairs, or bins and
values of a configured feature) and the built-in ones of ``generation.builtin_slices``
(prompt length in quartiles, requested model, streamed or not). Each slice is compared like
the whole; its normalized-match rate is tested against the rest of the pairs
(``subgroup.slice_test``, the numeric slices' test: each pair is a request of its own; Holm
across slices), and a slice where the shadow agrees significantly less often than elsewhere
is flagged.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import asyncpg
import numpy as np
import orjson

from shadowproxy.compare import stats, subgroup
from shadowproxy.compare.config import EmbeddingsConfig, SliceConfig
from shadowproxy.compare.embeddings import semantic_similarity
from shadowproxy.compare.features import CURRENT, Features
from shadowproxy.compare.generation import (
    GenerationPair,
    Prices,
    SemanticSimilarity,
    asks_for_json,
    compare_generations,
    generation_from,
    is_generation,
    normalize,
)
from shadowproxy.compare.snapshot import COMPARABLE, PAIR_FILTER, Explain, Snapshot
from shadowproxy.errors import UsageError

INFER_SAMPLE = 50
"""How many of the window's first primary answers the task inference looks at."""
CURVE_LEVELS = [i / 20 for i in range(21)]
TOP_VALUES = 20
"""At most this many values of a categorical slice family (the most frequent)."""
PROMPT_LENGTH_QUANTILES = (0.25, 0.5, 0.75)


def _trimmed(column: str) -> str:
    """SQL: a response body cut to what the section reads (the first choice, its logprobs
    dropped, and the object type and usage), as jsonb text."""
    first = f"({column} #> '{{choices,0}}')"
    return (f"jsonb_build_object('object', {column} -> 'object', 'usage', {column} -> 'usage',"
            f" 'choices', CASE WHEN jsonb_typeof({column} -> 'choices') = 'array'"
            f" AND jsonb_array_length({column} -> 'choices') > 0 THEN jsonb_build_array("
            f"CASE WHEN jsonb_typeof({first}) = 'object' THEN {first} - 'logprobs'"
            f" ELSE {first} END) ELSE {column} -> 'choices' END)::text")


def _text_length(path: str) -> str:
    return ("coalesce((SELECT sum(length(t #>> '{}')) FROM jsonb_path_query("
            f"p.request_body_json, '{path} ? (@.type() == \"string\")') AS t), 0)")


PROMPT_CHARS = " + ".join(_text_length(path) for path in (
    "lax $.messages[*].content[*]", "lax $.messages[*].content[*].text", "lax $.prompt[*]"))
"""SQL: the characters of a request's prompt: every message's text (a string content, or
the text parts of a list of parts), or the legacy completions ``prompt``."""

LABEL_TEXT = ("CASE jsonb_typeof(l.label) WHEN 'string' THEN l.label #>> '{}' "
              "WHEN 'null' THEN NULL ELSE l.label::text END")
"""SQL: the reference answer of a pair; a label stored as other JSON, as its text; a JSON
null is no label, as in the predictions' sections (``performance.LABEL_SQL``)."""


# -- types ---------------------------------------------------------------------------------

class Sample(TypedDict):
    n: int
    of: int
    sampled: bool
    seed: int


class Curves(TypedDict):
    """Per-side quantiles at ``levels``, for the plots; None where a side has no value."""

    levels: list[float]
    latency_ms: dict[str, list[float] | None]
    ttft_ms: dict[str, list[float] | None]
    tokens_per_s: dict[str, list[float] | None]


class SliceEntry(TypedDict, total=False):
    family: str
    slice: str
    n: int
    exact_match: float | None
    normalized_match: float | None
    similarity_mean: float | None
    finish_reason_agreement: float | None
    tool_call_agreement: float | None
    latency_p50_ms: dict[str, float | None]
    ttft_p50_ms: dict[str, float | None]
    test: dict[str, Any]
    flagged: bool
    flag_reason: str


class SlicesPart(TypedDict, total=False):
    slices: list[SliceEntry]
    min_size: int
    families: list[str]
    multiple_testing: dict[str, Any]
    why: str
    empty: list[str]


class GenerationSection(TypedDict, total=False):
    """The JSON ``generation`` section (docs/generative.md lists the keys); from
    ``n_pairs`` to ``semantic``, the keys of ``GenerationComparison.to_dict()``."""

    task_source: str
    sample: Sample
    prices: dict[str, dict[str, float] | None]
    streamed_unassembled: dict[str, int]
    cut_short: dict[str, int]
    n_pairs: int
    n_compared: int
    missing: dict[str, int]
    text: dict[str, Any]
    finish_reason: dict[str, Any]
    tool_calls: dict[str, Any]
    json: dict[str, Any]
    timing: dict[str, Any]
    usage: dict[str, Any]
    most_different: list[dict[str, Any]]
    labels: dict[str, Any] | None
    semantic: dict[str, Any] | None
    timing_curves: Curves
    slices: SlicesPart


@dataclass(frozen=True)
class _Row:
    """One loaded pair and what its slices need."""

    id: Any
    pair: GenerationPair
    prompt_chars: int
    model: str | None
    streamed_request: bool
    failed: tuple[bool, bool]
    """Whether the primary's, the shadow's call failed (``error_kind``): the answer is what
    came before the failure, a stream assembled as far as it went."""


# -- task ----------------------------------------------------------------------------------

async def task_source(db: Snapshot, comparable: int) -> str | None:
    """Why the route is compared as generation ("config", or what the inference saw), or
    None when it is not a generation route."""
    task = db.compare.task
    if task == "generation":
        return "config"
    if task is not None or not comparable:
        return None
    rows = await db.fetch(f"""
        SELECT {_trimmed('primary_body_json')} FROM shadowproxy.pairs
        WHERE {PAIR_FILTER} AND {COMPARABLE} ORDER BY received_at, id LIMIT {INFER_SAMPLE}""",
                          *db.pair_args())
    hits = sum(is_generation(orjson.loads(r[0])) for r in rows)
    if rows and 2 * hits > len(rows):
        return (f"inferred: {hits} of the first {len(rows)} primary answers are chat or text "
                "completions")
    return None


# -- loading -------------------------------------------------------------------------------

def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


async def _load(db: Snapshot, comparable: int) -> list[_Row]:
    sample = db.sample_clause(comparable, "id::text")
    rows = await db.fetch(f"""
        SELECT p.id, p.request_id, p.primary_latency_ms, p.shadow_latency_ms,
               p.primary_error_kind IS NOT NULL AS pf, p.shadow_error_kind IS NOT NULL AS sf,
               {_trimmed('p.primary_body_json')} AS pb, {_trimmed('p.shadow_body_json')} AS sb,
               rp.stream::text AS ps, rs.stream::text AS ss,
               (p.request_body_json -> 'response_format')::text AS fmt,
               {LABEL_TEXT} AS label, {PROMPT_CHARS} AS prompt_chars,
               CASE jsonb_typeof(p.request_body_json -> 'model')
                 WHEN 'string' THEN p.request_body_json ->> 'model'
                 ELSE (p.request_body_json -> 'model')::text END AS model,
               coalesce(p.request_body_json -> 'stream' = 'true'::jsonb, false) AS streamed
        FROM (SELECT * FROM {db.rows}
              WHERE {PAIR_FILTER} AND {COMPARABLE} AND {sample}) p
        LEFT JOIN shadowproxy.responses rp ON rp.request = p.id AND rp.role = 'primary'
                                              AND rp.received_at = p.received_at
        LEFT JOIN shadowproxy.responses rs ON rs.request = p.id AND rs.target = p.shadow_name
                                              AND rs.received_at = p.received_at
        LEFT JOIN shadowproxy.labels l ON l.request_id = p.request_id
        ORDER BY p.received_at, p.id""", *db.pair_args())
    out = []
    for r in rows:
        fmt = _loads(r["fmt"])
        pair = GenerationPair(
            request_id=r["request_id"],
            primary=generation_from(orjson.loads(r["pb"]), _loads(r["ps"]),
                                    r["primary_latency_ms"]),
            shadow=generation_from(orjson.loads(r["sb"]), _loads(r["ss"]),
                                   r["shadow_latency_ms"]),
            wants_json=asks_for_json({"response_format": fmt}), label=r["label"])
        out.append(_Row(r["id"], pair, int(r["prompt_chars"]), r["model"], bool(r["streamed"]),
                        (bool(r["pf"]), bool(r["sf"]))))
    return out


def _complete(rows: list[_Row]) -> tuple[list[_Row], dict[str, int]]:
    """The rows whose two calls both ended well; and per side, how many answers were cut
    short. A stream whose call failed mid-way (the client left, a timeout, a reset) is
    stored assembled as far as it went, 2xx with a ``body_json``: compared, its cut text and
    missing ``finish_reason`` would count against the other side. An answer sent in one
    piece and cut has no JSON and is not comparable at all, which the streamed one now
    matches."""
    cut = {"primary": sum(r.failed[0] for r in rows), "shadow": sum(r.failed[1] for r in rows)}
    if not cut["primary"] and not cut["shadow"]:
        return rows, cut
    return [r for r in rows if not any(r.failed)], cut


async def _unassembled(db: Snapshot) -> dict[str, int]:
    """Per side, 2xx answers streamed as server-sent events but stored without ``body_json``
    (recorded before streams were assembled, or not an OpenAI-compatible stream): they are
    not comparable, and are counted so that the report says why."""
    sse = "lower(coalesce({0}.headers ->> 'content-type', '')) LIKE 'text/event-stream%'"
    row = await db.fetchrow(f"""
        SELECT count(*) FILTER (WHERE p.primary_body_json IS NULL AND {sse.format('rp')}),
               count(*) FILTER (WHERE p.shadow_body_json IS NULL AND {sse.format('rs')})
        FROM (SELECT id, received_at, shadow_name, primary_body_json, shadow_body_json
              FROM shadowproxy.pairs
              WHERE {PAIR_FILTER} AND primary_status BETWEEN 200 AND 299
                AND shadow_status BETWEEN 200 AND 299
                AND (primary_body_json IS NULL OR shadow_body_json IS NULL)) p
        LEFT JOIN shadowproxy.responses rp ON rp.request = p.id AND rp.role = 'primary'
                                              AND rp.received_at = p.received_at
        LEFT JOIN shadowproxy.responses rs ON rs.request = p.id AND rs.target = p.shadow_name
                                              AND rs.received_at = p.received_at
        """, *db.pair_args())
    return {"primary": int(row[0]), "shadow": int(row[1])}


# -- semantic similarity, prices, curves ---------------------------------------------------

async def _semantic(config: EmbeddingsConfig | None, pairs: Sequence[GenerationPair],
                    seed: int) -> SemanticSimilarity | None:
    if config is None:
        return None
    key = None
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            return SemanticSimilarity(
                False, model=config.model,
                why=f"the environment variable {config.api_key_env} "
                    "(generation.embeddings.api_key_env) is not set")
    texts = [(p.primary.text, p.shadow.text) for p in pairs
             if p.primary is not None and p.shadow is not None
             and p.primary.text and p.shadow.text]
    if len(texts) > config.max_pairs:
        texts = random.Random(seed).sample(texts, config.max_pairs)
    return await semantic_similarity(config.url, [a for a, _ in texts], [b for _, b in texts],
                                     model=config.model, api_key=key,
                                     timeout_s=config.timeout_s)


def _quantiles(values: Sequence[float | None]) -> list[float] | None:
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    return [float(v) for v in np.percentile(x, [100 * q for q in CURVE_LEVELS])]


def _curves(pairs: Sequence[GenerationPair]) -> Curves:
    both = [p for p in pairs if p.primary is not None and p.shadow is not None]
    out = Curves(levels=CURVE_LEVELS, latency_ms={}, ttft_ms={}, tokens_per_s={})
    for side in ("primary", "shadow"):
        answers = [getattr(p, side) for p in both]
        out["latency_ms"][side] = _quantiles([g.latency_ms for g in answers])
        out["ttft_ms"][side] = _quantiles([g.ttft_ms for g in answers])
        out["tokens_per_s"][side] = _quantiles([g.tokens_per_s for g in answers])
    return out


# -- slices --------------------------------------------------------------------------------

def _failed(family: str, spec: str) -> Explain:
    def explain(exc: asyncpg.PostgresError) -> UsageError:
        return UsageError(f"compare.slices.{family}: PostgreSQL failed evaluating {spec!r}: "
                          f"{exc}")
    return explain


def _categories(values: Sequence[str | None], name: str) -> dict[str, list[int]]:
    """One slice per value among the ``TOP_VALUES`` most frequent (missing ones apart)."""
    counts = Counter(v for v in values if v is not None)
    top = sorted(counts, key=lambda v: (-counts[v], v))[:TOP_VALUES]
    out: dict[str, list[int]] = {f"{name} = {v}": [] for v in top}
    for i, v in enumerate(values):
        key = f"{name} = {v}"
        if key in out:
            out[key].append(i)
    return out


def _bins(values: Sequence[float | None], edges: Sequence[float], name: str
          ) -> dict[str, list[int]]:
    """One slice per bin [a, b) of ``edges``, the last one closed, as the slices section."""
    out: dict[str, list[int]] = {}
    last = len(edges) - 2
    for k, (a, b) in enumerate(itertools.pairwise(edges)):
        label = f"{name} in [{a:g}, {b:g}{']' if k == last else ')'}"
        out[label] = [i for i, v in enumerate(values) if v is not None
                      and a <= v and (v <= b if k == last else v < b)]
    return out


def _prompt_length_bins(chars: Sequence[int]) -> dict[str, list[int]]:
    if not chars:
        return {}
    inner = np.quantile(np.asarray(chars, dtype=np.float64), PROMPT_LENGTH_QUANTILES)
    edges = sorted({float(min(chars)), *(float(round(q)) for q in inner), float(max(chars))})
    if len(edges) < 2:
        return {}
    return _bins([float(c) for c in chars], edges, "prompt_length")


async def _families(db: Snapshot, rows: Sequence[_Row], features: Features
                    ) -> list[tuple[str, dict[str, list[int]]]]:
    """Each slice family: its slices, each as the indexes of its rows."""
    index = {r.id: i for i, r in enumerate(rows)}
    out: list[tuple[str, dict[str, list[int]]]] = []
    for family, spec in db.compare.slices.items():
        if isinstance(spec, str):
            ids = await db.fetch(f"SELECT id FROM {db.rows} WHERE {PAIR_FILTER} "
                                 f"AND {COMPARABLE} AND ({spec})", *db.pair_args(),
                                 explain=_failed(family, spec))
            out.append((family, {family: sorted(index[r[0]] for r in ids if r[0] in index)}))
        else:
            out.append((family, await _feature_slices(db, rows, index, features, spec)))
    builtin = db.compare.generation.builtin_slices
    if "prompt_length" in builtin:
        out.append(("prompt_length", _prompt_length_bins([r.prompt_chars for r in rows])))
    if "model" in builtin:
        out.append(("model", _categories([r.model or "(none)" for r in rows], "model")))
    if "stream" in builtin:
        out.append(("stream", _categories(
            ["true" if r.streamed_request else "false" for r in rows], "stream")))
    return out


async def _feature_slices(db: Snapshot, rows: Sequence[_Row], index: Mapping[Any, int],
                          features: Features, spec: SliceConfig) -> dict[str, list[int]]:
    """A feature's bins (numeric) or values (categorical); a request's first value counts."""
    num: list[float | None] = [None] * len(rows)
    txt: list[str | None] = [None] * len(rows)
    for r in await db.fetch(f"""
            SELECT DISTINCT ON (id) id, num, txt FROM {features.table}
            WHERE name = $1 AND tag = '{CURRENT}' ORDER BY id, ord""", spec.feature):
        i = index.get(r["id"])
        if i is not None:
            num[i], txt[i] = r["num"], r["txt"]
    if spec.bins:
        return _bins(num, spec.bins, spec.feature)
    return _categories(txt, spec.feature)


def _p50(values: Sequence[float | None]) -> float | None:
    x = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.percentile(x, 50)) if x else None


def _slices(db: Snapshot, rows: Sequence[_Row],
            families: Sequence[tuple[str, dict[str, list[int]]]]) -> SlicesPart:
    """Every slice compared like the whole; normalized match tested against the rest."""
    th, g = db.thresholds, db.compare.generation
    kept = [(f, s) for f, s in families if len([k for k in s.values() if k]) >= 2
            or f in db.compare.slices]
    # Configured families no compared pair falls in are named (see slices.build).
    empty = [f for f, s in families if f in db.compare.slices and not any(s.values())]
    if not kept:
        return SlicesPart(slices=[], why="no slice family with two or more slices in the "
                                         "window (compare.slices, generation.builtin_slices)")
    matched = [_normalized_match(r.pair, g.strip_punctuation) for r in rows]
    entries: list[SliceEntry] = []
    for family, slices in kept:
        for name, members in slices.items():
            if not members:
                continue
            entries.append(_slice_entry(family, name, rows, members, matched,
                                        g.strip_punctuation, th.min_slice_size,
                                        db.scope.seed))
    tested = [e for e in entries if e["test"].get("p_value") is not None]
    for e, p_adj in zip(tested, stats.holm([e["test"]["p_value"] for e in tested]),
                        strict=True):
        e["test"]["p_value_adjusted"] = p_adj
        inside, outside = e["test"]["rate_in"], e["test"]["rate_out"]
        if p_adj < th.alpha and inside < outside:
            e["flagged"] = True
            e["flag_reason"] = (f"answers match the primary's (normalized) on "
                                f"{100 * inside:.1f}% of its pairs against "
                                f"{100 * outside:.1f}% elsewhere (adjusted p = {p_adj:.3g})")
    return SlicesPart(slices=entries, min_size=th.min_slice_size,
                      families=[f for f, _ in kept],
                      multiple_testing={"method": "holm", "tests": len(tested)}, empty=empty)


def _normalized_match(pair: GenerationPair, strip_punctuation: bool) -> bool | None:
    """None when the pair is not compared on text (as in ``compare_generations``: a side
    missing, or neither side wrote text), else whether the texts match after normalizing."""
    p, s = pair.primary, pair.shadow
    if p is None or s is None or (p.text is None and s.text is None):
        return None
    return (normalize(p.text or "", strip_punctuation=strip_punctuation)
            == normalize(s.text or "", strip_punctuation=strip_punctuation))


def _slice_entry(family: str, name: str, rows: Sequence[_Row], members: list[int],
                 matched: Sequence[bool | None], strip_punctuation: bool, min_size: int,
                 seed: int) -> SliceEntry:
    c = compare_generations([rows[i].pair for i in members],
                            strip_punctuation=strip_punctuation, most_different=0)
    entry = SliceEntry(
        family=family, slice=name, n=c.n_compared, exact_match=c.text.exact_match.rate,
        normalized_match=c.text.normalized_match.rate, similarity_mean=c.text.similarity.mean,
        finish_reason_agreement=c.finish_reason.agreement.rate,
        tool_call_agreement=c.tool_calls.same_calls.rate,
        latency_p50_ms={s: c.timing[s].latency_ms.p50 for s in ("primary", "shadow")},
        ttft_p50_ms={s: c.timing[s].ttft_ms.p50 for s in ("primary", "shadow")})
    inside = set(members)
    compared = [i for i, m in enumerate(matched) if m is not None]
    in_slice = np.array([i in inside for i in compared], dtype=bool)
    n_in = int(in_slice.sum())
    n_out = len(compared) - n_in
    if n_in < min_size or n_out < min_size:
        entry["test"] = {"test": None, "why": f"fewer than {min_size} pairs compared on text "
                                              "in the slice or outside"}
        return entry
    # One pair per request: each is its own unit. The same test as the numeric slices
    # (subgroup.slice_test): the share of pairs whose texts differ, slice against the rest.
    differ = np.array([0.0 if matched[i] else 1.0 for i in compared])
    test = subgroup.slice_test(differ, in_slice, np.array(compared), binary=True, seed=seed)
    k_in = n_in - int(differ[in_slice].sum())
    k_out = n_out - int(differ[~in_slice].sum())
    entry["test"] = {**test, "on": "normalized match, slice vs rest",
                     "rate_in": k_in / n_in, "rate_out": k_out / n_out}
    return entry


# -- the section ---------------------------------------------------------------------------

def _with_tool_calls(most_different: list[dict[str, Any]], pairs: Sequence[GenerationPair]
                     ) -> None:
    """Each most different pair gets both sides' tool calls (``{name, arguments}``), which
    its texts alone do not show: a text answer against a tool call is a common difference."""
    by_id: dict[str, GenerationPair] = {}
    for p in pairs:
        by_id.setdefault(p.request_id, p)
    for d in most_different:
        pair = by_id[d["request_id"]]
        for side in ("primary", "shadow"):
            answer = getattr(pair, side)
            d[f"{side}_tool_calls"] = [{"name": c.name, "arguments": c.arguments}
                                       for c in answer.tool_calls]


def _prices(db: Snapshot) -> dict[str, Prices]:
    configured = db.compare.generation.prices
    out = {}
    for side, name in (("primary", "primary"), ("shadow", db.scope.shadow)):
        if name in configured:
            price = configured[name]
            out[side] = Prices(price.input_per_million, price.output_per_million)
    return out


async def build(db: Snapshot, comparable: int, source: str, features: Features
                ) -> GenerationSection:
    """The section over the ``comparable`` pairs (``counts.comparable_pairs``)."""
    g = db.compare.generation
    loaded = await _load(db, comparable)
    rows, cut = _complete(loaded)
    pairs = [r.pair for r in rows]
    prices = _prices(db)
    semantic = await _semantic(g.embeddings, pairs, db.scope.seed)
    comparison = compare_generations(pairs, prices=prices,
                                     strip_punctuation=g.strip_punctuation,
                                     most_different=g.most_different, semantic=semantic)
    section = GenerationSection(
        task_source=source,
        sample=Sample(n=len(loaded), of=comparable, sampled=len(loaded) < comparable,
                      seed=db.scope.seed),
        prices={side: ({"input_per_million": p.input_per_million,
                        "output_per_million": p.output_per_million}
                       if (p := prices.get(side)) else None) for side in ("primary", "shadow")},
        streamed_unassembled=await _unassembled(db), cut_short=cut)
    section.update(cast(GenerationSection, comparison.to_dict()))
    _with_tool_calls(section["most_different"], pairs)
    section["timing_curves"] = _curves(pairs)
    section["slices"] = _slices(db, rows, await _families(db, rows, features))
    return section
