"""An example OpenAI-compatible chat service: deterministic answers, streamed or not.

    python -m examples.chat_service --port 9101                     # serves "small" and "large"
    python -m examples.chat_service --port 9102 --model large --ttft-ms 80 --token-delay-ms 15

It speaks the subset of the OpenAI API that model servers (vLLM, TGI, llama.cpp's server,
Ollama, LiteLLM) share, so that shadowproxy can be shown on generative traffic without a
model: every answer is derived from the prompt by a hash, so it repeats exactly.

    POST /v1/chat/completions  {"model": "small", "messages": [...], "stream": true,
                                "stream_options": {"include_usage": true}, "max_tokens": 50,
                                "tools": [...], "response_format": {"type": "json_object"}, "n": 1}
    POST /v1/completions       {"model": "small", "prompt": "...", "stream": false}
    POST /v1/embeddings        {"input": "text" | ["text", ...]}
    GET  /v1/models, GET /healthz

Streamed answers are server-sent events as OpenAI sends them: a role-only first chunk, one
chunk per token after ``--ttft-ms`` and ``--token-delay-ms`` apart, a chunk with the
``finish_reason``, a usage chunk (``choices: []``) when ``stream_options.include_usage`` is
set, and ``data: [DONE]``. The unstreamed answer to the same request is exactly what a client
assembling the stream gets.

The two models agree on most prompts and differ on some, as a cheaper candidate would:

- on one prompt in five (by the prompt's hash) ``large`` words its answer differently;
- on long prompts (over 40 words) ``small`` stops at 40 tokens (``finish_reason: "length"``)
  where ``large`` finishes (``"stop"``);
- asked about the weather with ``tools`` offered, both call the first tool with the city as
  arguments (streamed in pieces of a few characters; the two models write the keys in a
  different order, which is the same JSON), except that on the one-in-five prompts ``small``
  answers in text instead;
- asked for JSON (``response_format``), ``small`` wraps it in a Markdown code fence on the
  one-in-five prompts, which is not valid JSON.

``large`` is also slower: its time to first token is twice ``--ttft-ms`` and its per-token
delay 1.5 times ``--token-delay-ms``. ``/v1/embeddings`` returns hashed bag-of-words vectors
(64 dimensions, unit length), so texts sharing words get similar vectors.

Bad input gets a 400 (an unknown model a 404) with OpenAI's ``{"error": {...}}`` body.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

MODELS = ("small", "large")
SLOWDOWN = {"small": (1.0, 1.0), "large": (2.0, 1.5)}
"""Per model: the factors on the time to first token and on the per-token delay."""
SMALL_TOKEN_LIMIT = 40
LONG_PROMPT_WORDS = 40
EMBEDDING_DIM = 64
MAX_CHOICES = 4
ARGUMENT_PIECE = 6
"""Tool-call arguments are streamed in pieces of this many characters."""

SENTENCES = (
    "It depends mostly on the context you give it.",
    "The short version is that small steps add up.",
    "Most people start with the simplest option and refine it.",
    "There are trade-offs between speed and accuracy.",
    "A good first check is to measure before changing anything.",
    "Documentation and examples usually help more than theory.",
    "The details matter less than getting the overall shape right.",
    "Testing each part on its own makes the whole easier to trust.",
)
PARAPHRASES = (
    "Mostly, it depends on the context you provide.",
    "In brief, small steps add up over time.",
    "Most people begin with the simplest option and then refine it.",
    "Speed and accuracy trade off against each other.",
    "Measuring before changing anything is a good first check.",
    "Examples and documentation tend to help more than theory does.",
    "Getting the overall shape right matters more than the details.",
    "Testing every part on its own makes the whole easier to trust.",
)
_WORD = re.compile(r"[A-Za-z0-9']+")
_TOKEN = re.compile(r"\s*\S+")
_CITY = re.compile(r"\b(?:in|at|for)\s+([A-Za-z][A-Za-z-]+)")


class InputError(ValueError):
    """The request is not one this service answers; ``status`` and ``param`` say how."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Answer:
    """One choice: text pieces (tokens) or a tool call, and why it ended."""

    tokens: tuple[str, ...]
    tool_call: ToolCall | None
    finish_reason: str

    @property
    def text(self) -> str | None:
        return None if self.tool_call is not None else "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        if self.tool_call is not None:
            return 1 + len(_pieces(self.tool_call.arguments))
        return len(self.tokens)


def _dumps(obj: Any) -> str:
    """Compact JSON, as model servers write it."""
    return json.dumps(obj, separators=(",", ":"))


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def differs(prompt: str) -> bool:
    """Whether the two models answer this prompt differently (one prompt in five)."""
    return _digest(prompt)[0] % 5 == 0


def _pieces(arguments: str) -> list[str]:
    return [arguments[i:i + ARGUMENT_PIECE] for i in range(0, len(arguments), ARGUMENT_PIECE)]


def answer_text(model: str, prompt: str, choice: int = 0) -> str:
    """The full text ``model`` writes for ``prompt`` (before any token limit)."""
    h = _digest(prompt, str(choice))
    words = _WORD.findall(prompt.lower())
    topic = " ".join(words[-3:]) or "that"
    count = 8 if len(words) > LONG_PROMPT_WORDS else 2 + h[1] % 3
    picks = [(h[2] + 3 * k) % len(SENTENCES) for k in range(count)]
    if model == "large" and differs(prompt):
        return f"Regarding {topic}, " + " ".join(PARAPHRASES[i] for i in picks)
    return f"About {topic}: " + " ".join(SENTENCES[i] for i in picks)


def _prompt_text(messages: Any) -> tuple[str, int]:
    """The last user message's text, and the words of every message (the prompt tokens)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {role, content} objects",
                         "messages")
    last_user = ""
    words = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"messages[{i}]: expected an object with a 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content
                               if isinstance(part, dict) and part.get("type") == "text")
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InputError(f"messages[{i}].content: expected a string, a list of parts or "
                             "null", "messages")
        words += len(content.split())
        if message["role"] == "user":
            last_user = content
    return last_user, words


def _limit(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{key}: expected an integer of 1 or more (got {value!r})", key)
        return value
    return None


def _tool_name(tools: Any) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InputError("tools: expected a list of {type: function, function: {name}}",
                         "tools")
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return str(fn["name"])
    return None


def wants_json(body: dict[str, Any]) -> bool:
    fmt = body.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def answer(model: str, prompt: str, *, choice: int = 0, limit: int | None = None,
           tool: str | None = None, json_mode: bool = False) -> Answer:
    """What ``model`` answers to ``prompt`` (the last user message)."""
    if tool is not None and re.search(r"\bweather\b", prompt, re.IGNORECASE):
        match = _CITY.search(prompt)
        city = match.group(1).capitalize() if match else "Here"
        if not (model == "small" and differs(prompt)):
            args = ({"city": city, "unit": "celsius"} if model == "large"
                    else {"unit": "celsius", "city": city})
            call_id = "call_" + _digest(model, prompt, str(choice)).hex()[:16]
            return Answer((), ToolCall(call_id, tool, _dumps(args)),
                          "tool_calls")
        text = f"I cannot look up the weather in {city} right now."
    else:
        text = answer_text(model, prompt, choice)
    if json_mode:
        text = _dumps({"answer": text})
        if model == "small" and differs(prompt):
            text = "```json\n" + text + "\n```"
    tokens = tuple(_TOKEN.findall(text))
    finish = "stop"
    cap = limit
    if model == "small" and len(prompt.split()) > LONG_PROMPT_WORDS:
        cap = SMALL_TOKEN_LIMIT if cap is None else min(cap, SMALL_TOKEN_LIMIT)
    if cap is not None and len(tokens) > cap:
        tokens = tokens[:cap]
        finish = "length"
    return Answer(tokens, None, finish)


def embed(text: str) -> list[float]:
    """A unit vector of hashed word counts: texts sharing words point the same way."""
    vector = [0.0] * EMBEDDING_DIM
    for word in _WORD.findall(text.lower()):
        h = _digest(word)
        vector[h[0] % EMBEDDING_DIM] += 1.0 if h[1] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [round(v / norm, 6) for v in vector] if norm else vector


@dataclass(frozen=True)
class Speed:
    """Delays of the ``small`` model; ``large`` scales them by ``SLOWDOWN``."""

    ttft_s: float = 0.0
    token_delay_s: float = 0.0

    def of(self, model: str) -> tuple[float, float]:
        first, per_token = SLOWDOWN[model]
        return self.ttft_s * first, self.token_delay_s * per_token


@dataclass(frozen=True)
class Service:
    models: tuple[str, ...]
    speed: Speed
    clock: Callable[[], int]


SERVICE = web.AppKey("service", Service)


def _error(exc: InputError) -> web.Response:
    error = {"message": str(exc), "type": "invalid_request_error", "param": exc.param,
             "code": exc.code}
    return web.json_response({"error": error}, status=exc.status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise InputError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InputError("expected a JSON object")
    return body


def _model(service: Service, body: dict[str, Any]) -> str:
    model = body.get("model", service.models[0])
    if model not in service.models:
        raise InputError(f"The model `{model}` does not exist; this service serves "
                         f"{list(service.models)}.", "model", 404, "model_not_found")
    return str(model)


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InputError(f"n: expected 1 to {MAX_CHOICES} (got {n!r})", "n")
    return n


def _usage(prompt_tokens: int, answers: Sequence[Answer]) -> dict[str, int]:
    completion = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _message(a: Answer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": a.text}
    if a.tool_call is not None:
        message["tool_calls"] = [{"id": a.tool_call.id, "type": "function",
                                  "function": {"name": a.tool_call.name,
                                               "arguments": a.tool_call.arguments}}]
    return message


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


def _steps(answers: Sequence[Answer]) -> list[list[tuple[int, dict[str, Any]]]]:
    """Per step, the (choice index, delta) pairs sent together; choices interleave."""
    per_choice: list[list[dict[str, Any]]] = []
    for a in answers:
        deltas: list[dict[str, Any]]
        if a.tool_call is not None:
            call = a.tool_call
            pieces = _pieces(call.arguments)
            deltas = [{"tool_calls": [{"index": 0, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]}]
            deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]}
                       for p in pieces]
        else:
            deltas = [{"content": t} for t in a.tokens]
        per_choice.append(deltas)
    longest = max(len(d) for d in per_choice)
    return [[(i, d[step]) for i, d in enumerate(per_choice) if step < len(d)]
            for step in range(longest)]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    try:
        body = await _json_body(request)
        model = _model(service, body)
        prompt, prompt_tokens = _prompt_text(body.get("messages"))
        limit = _limit(body)
        tool = _tool_name(body.get("tools"))
        n = _choices(body)
    except InputError as exc:
        return _error(exc)
    answers = [answer(model, prompt, choice=i, limit=limit, tool=tool,
                      json_mode=wants_json(body)) for i in range(n)]
    head = {"id": "chatcmpl-" + _digest(model, prompt).hex()[:24], "created": service.clock(),
            "model": model, "system_fingerprint": f"fp_{model}"}
    usage = _usage(prompt_tokens, answers)
    ttft, per_token = service.speed.of(model)
    if not body.get("stream"):
        await asyncio.sleep(ttft + per_token * max(len(_steps(answers)) - 1, 0))
        return web.json_response(
            {**head, "object": "chat.completion",
             "choices": [{"index": i, "message": _message(a), "logprobs": None,
                          "finish_reason": a.finish_reason} for i, a in enumerate(answers)],
             "usage": usage}, dumps=_dumps)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    chunk = {**head, "object": "chat.completion.chunk"}
    if include_usage:
        chunk["usage"] = None
    response = await _open_stream(request)
    try:
        await response.write(_sse({**chunk, "choices": [
            {"index": i, "delta": {"role": "assistant",
                                   "content": None if a.tool_call else ""},
             "logprobs": None, "finish_reason": None} for i, a in enumerate(answers)]}))
        for number, step in enumerate(_steps(answers)):
            await asyncio.sleep(ttft if number == 0 else per_token)
            await response.write(_sse({**chunk, "choices": [
                {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                for i, delta in step]}))
        await response.write(_sse({**chunk, "choices": [
            {"index": i, "delta": {}, "logprobs": None, "finish_reason": a.finish_reason}
            for i, a in enumerate(answers)]}))
        if include_usage:
            await response.write(_sse({**chunk, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away mid-stream
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    try:
        body = await _json_body(request)
        model = _model(service, body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InputError("prompt: expected a string", "prompt")
        limit = _limit(body)
    except InputError as exc:
        return _error(exc)
    a = answer(model, prompt, limit=limit)
    head = {"id": "cmpl-" + _digest(model, prompt).hex()[:24], "object": "text_completion",
            "created": service.clock(), "model": model}
    usage = _usage(len(prompt.split()), [a])
    ttft, per_token = service.speed.of(model)
    if not body.get("stream"):
        await asyncio.sleep(ttft + per_token * max(len(a.tokens) - 1, 0))
        return web.json_response(
            {**head, "choices": [{"index": 0, "text": a.text, "logprobs": None,
                                  "finish_reason": a.finish_reason}], "usage": usage},
            dumps=_dumps)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    response = await _open_stream(request)
    try:
        for number, token in enumerate(a.tokens):
            await asyncio.sleep(ttft if number == 0 else per_token)
            await response.write(_sse({**head, "choices": [
                {"index": 0, "text": token, "logprobs": None, "finish_reason": None}]}))
        await response.write(_sse({**head, "choices": [
            {"index": 0, "text": "", "logprobs": None, "finish_reason": a.finish_reason}]}))
        if include_usage:
            await response.write(_sse({**head, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass
    return response


async def embeddings(request: web.Request) -> web.Response:
    try:
        body = await _json_body(request)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if (not isinstance(texts, list) or not texts
                or not all(isinstance(t, str) for t in texts)):
            raise InputError("input: expected a string or a non-empty list of strings", "input")
    except InputError as exc:
        return _error(exc)
    words = sum(len(t.split()) for t in texts)
    return web.json_response(
        {"object": "list", "model": str(body.get("model") or "hashed-words"),
         "data": [{"object": "embedding", "index": i, "embedding": embed(t)}
                  for i, t in enumerate(texts)],
         "usage": {"prompt_tokens": words, "total_tokens": words}},
        dumps=_dumps)


async def models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "examples"}
        for m in service.models]})


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response({"status": "ok", "models": list(service.models)})


def build_app(models_served: Sequence[str] = MODELS, speed: Speed | None = None,
              clock: Callable[[], int] | None = None) -> web.Application:
    """The service; ``clock`` gives ``created`` (Unix seconds; tests fix it)."""
    unknown = [m for m in models_served if m not in MODELS]
    if unknown or not models_served:
        raise ValueError(f"expected models among {list(MODELS)} (got {list(models_served)})")
    app = web.Application()
    app[SERVICE] = Service(tuple(models_served), speed or Speed(),
                           clock or (lambda: int(time.time())))
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    return app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.chat_service",
        description="Serve deterministic OpenAI-compatible chat completions, streamed or not.")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", action="append", choices=MODELS,
                        help="a model to serve (repeatable; default both; the first answers "
                             "requests that name none)")
    parser.add_argument("--ttft-ms", type=float, default=0.0,
                        help="time to the first token of 'small' ('large' takes twice as long)")
    parser.add_argument("--token-delay-ms", type=float, default=0.0,
                        help="delay between tokens of 'small' ('large': 1.5 times as long)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port: expected 1..65535 (got {args.port})")
    for name in ("ttft_ms", "token_delay_ms"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')}: expected 0 or more "
                         f"(got {getattr(args, name)})")
    args.model = tuple(dict.fromkeys(args.model or MODELS))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    speed = Speed(args.ttft_ms / 1000, args.token_delay_ms / 1000)
    print(f"chat_service: {', '.join(args.model)} on http://{args.host}:{args.port}",
          flush=True)
    web.run_app(build_app(args.model, speed), host=args.host, port=args.port,
                access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
