"""Semantic similarity of paired answers from an OpenAI-compatible embeddings endpoint.

Optional: configured with the endpoint's URL (``http://host:port/v1/embeddings``), a model
name and an API key when the endpoint needs one. Each distinct text is embedded once, in
batches; the pair's similarity is the cosine of its two vectors. The report stands without
it: a failing endpoint gives ``SemanticSimilarity(available=False, why=...)`` rather than an
error, and the rest of the generation section is unchanged. Pairs where a side wrote no text
are left out (an empty text has no meaning to embed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from shadowproxy.compare.generation import SemanticSimilarity, semantic_from_vectors
from shadowproxy.config import shown_url


class _EndpointError(Exception):
    """The endpoint's answer cannot be used; the message says why."""


async def _batch(session: aiohttp.ClientSession, url: str, texts: list[str],
                 model: str | None, headers: dict[str, str]) -> list[list[float]]:
    payload: dict[str, Any] = {"input": texts}
    if model is not None:
        payload["model"] = model
    # The messages go into the report, which is shared: the URL as a message may show it
    # (an API key in its query, a password before '@' as ***).
    shown = shown_url(url)
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            status = resp.status
            raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = str(exc).replace(url, shown)  # aiohttp's InvalidURL is the URL itself
        raise _EndpointError(f"{shown}: {type(exc).__name__}: {detail}") from exc
    if status != 200:
        detail = raw[:200].decode("utf-8", "replace")
        raise _EndpointError(f"{shown} answered {status}: {detail}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _EndpointError(f"{shown}: the answer is not JSON ({exc})") from exc
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != len(texts):
        raise _EndpointError(f"{shown}: expected {len(texts)} embeddings under 'data'")
    rows = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
    vectors = []
    for row in rows:
        vector = row.get("embedding") if isinstance(row, dict) else None
        if not isinstance(vector, list) or not vector:
            raise _EndpointError(f"{shown}: an item of 'data' has no 'embedding' list")
        vectors.append([float(v) for v in vector])
    return vectors


async def semantic_similarity(url: str, primary: Sequence[str | None],
                              shadow: Sequence[str | None], *, model: str | None = None,
                              api_key: str | None = None, timeout_s: float = 60.0,
                              batch_size: int = 64) -> SemanticSimilarity:
    """Cosine similarity of each pair's embeddings; never raises for the endpoint's faults."""
    if len(primary) != len(shadow):
        raise ValueError(f"expected as many texts per side (got {len(primary)} and "
                         f"{len(shadow)})")
    pairs = [(a, b) for a, b in zip(primary, shadow, strict=True) if a and b]
    distinct = list(dict.fromkeys(t for pair in pairs for t in pair))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    vectors: dict[str, list[float]] = {}
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for start in range(0, len(distinct), batch_size):
                texts = distinct[start:start + batch_size]
                for text, vector in zip(texts, await _batch(session, url, texts, model,
                                                            headers), strict=True):
                    vectors[text] = vector
    except (_EndpointError, TimeoutError) as exc:
        return SemanticSimilarity(False, model=model,
                                  why=str(exc) or "the embeddings endpoint timed out")
    try:
        return semantic_from_vectors([vectors[a] for a, _ in pairs],
                                     [vectors[b] for _, b in pairs], model)
    except ValueError as exc:  # vectors of different lengths
        return SemanticSimilarity(False, model=model, why=f"{shown_url(url)}: {exc}")
