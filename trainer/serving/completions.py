"""OpenAI's completions API, as vLLM, TGI, llama.cpp's server and KServe serve it.

  POST {prefix}/completions       -> a `text_completion`, or server-sent chunks
                                     ending in `data: [DONE]` with "stream": true
  GET  {prefix}/models            -> the one model served
  POST {prefix}/chat/completions  -> 400: the model has no chat template

for each prefix (/v1, and KServe's /openai/v1 unless the server says otherwise),
so any client of the API (`openai.OpenAI(base_url=.../v1)`) can use the model.
`max_tokens` counts characters of the completion whatever the model's tokenizer: a
word or bpe model's choice ends at the first token that reaches it, so its text may
be longer by the rest of that token. `usage` counts the model's own tokens: characters
for a char model (the prompt as sent), and for a word or bpe model the prompt's and
the completion's texts encoded by its tokenizer. Stop strings are found in the
decoded text. `prompt`
is a string or a list of them; `temperature` (0: greedy), `top_p`, `n`, `seed`
(choice i uses seed + i), `stop` (up to 4 strings; the text ends before the
first, with finish_reason "stop"), `echo` (the prompt, as sent, starts each
choice's text; a stream sends it as the choice's first chunk) and `logprobs` (0 to
5 alternatives per token, streamed or not: `trainer.serving.logprobs`) are honoured,
and so is this server's `oov` ("error", or "skip" to leave out the prompt's characters
the model never saw, as on /predict); `suffix` is refused; other fields are ignored,
as OpenAI's servers do. Errors are
`{"error": {"message", "type", "param", "code"}}`, inside a stream too.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from trainer.data import tokenization
from trainer.sampling.tokens import count_tokens
from trainer.serving import logprobs, schemas, transport
from trainer.serving.batcher import Batcher
from trainer.serving.request import (
    MAX_SEED,
    Instance,
    Limits,
    RequestError,
    decode_json,
    flag,
    parse_instance,
)

PREFIXES = ("/v1", "/openai/v1")
MAX_STOPS = 4
_TYPES = {400: "invalid_request_error", 408: "invalid_request_error",
          415: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error"}


def prefixes(extra: str) -> tuple[str, ...]:
    """Where the routes go.

    Args:
      extra: a second prefix, e.g. KServe's /openai/v1; empty or "/": none.

    Returns:
      /v1, then `extra` if given.
    """
    extra = "/" + extra.strip("/")
    return ("/v1",) if extra in ("/", "/v1") else ("/v1", extra)


def is_openai_path(path: str, prefixes: Sequence[str]) -> bool:
    """Whether `path` is one of OpenAI's routes (their errors take OpenAI's shape).

    Args:
      path: the request's path.
      prefixes: where the routes are.

    Returns:
      True under one of `prefixes`.
    """
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object for an HTTP status.

    Args:
      status: the HTTP status.
      message: the one-line message.

    Returns:
      {"error": {"message", "type", "param", "code"}}.
    """
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": None, "code": None}}


def _choice_seed(seed: Any, index: int) -> Any:
    if (seed is None or isinstance(seed, bool) or not isinstance(seed, int)
            or not 0 <= seed <= MAX_SEED):
        return seed  # Checked (or drawn) by parse_instance.
    return (seed + index) % (MAX_SEED + 1)


def _stops(raw: Any) -> list[str]:
    stops = [raw] if isinstance(raw, str) else raw if raw is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop takes up to {MAX_STOPS} strings, got {len(stops)}")
    return [s for s in stops if s]


def parse_completion(body: bytes, limits: Limits, rng: random.Random
                     ) -> tuple[dict[str, Any], list[Instance], list[str], int]:
    """A completion request -> (the request, one instance per choice, the stop strings, n).

    Choices are ordered prompt by prompt, `n` for each, as OpenAI numbers them.

    Args:
      body: the request body.
      limits: the server's limits.
      rng: draws the seeds of choices without one.

    Returns:
      (the decoded request, the instances, the non-empty stop strings, n).

    Raises:
      RequestError: naming the first bad field.
    """
    data = decode_json(body)
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    prompts = data.get("prompt", "")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, str) for p in prompts):
        raise RequestError("prompt must be a string or a non-empty list of strings "
                           "(token ids are not taken: send text, which the model's "
                           "tokenizer encodes)")
    n = data.get("n", 1) if data.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError("n must be a positive whole number")
    if len(prompts) * n > limits.max_instances:
        raise RequestError(f"{len(prompts)} prompts x n={n} choices, over the limit of "
                           f"{limits.max_instances}")
    if data.get("suffix") not in (None, ""):
        raise RequestError("suffix is not supported")
    flag(data, "echo")
    flag(data, "stream")
    if not isinstance(data.get("stream_options"), dict | None):
        raise RequestError("stream_options must be an object")
    logprobs.parse(data)
    length = data.get("max_tokens", 16)
    length = 16 if length is None else length
    if isinstance(length, int) and not isinstance(length, bool) and length > limits.max_length:
        raise RequestError(f"max_tokens (characters) must be at most {limits.max_length}")
    temperature = data.get("temperature", 1.0)
    fields = {"length": length, "temperature": 1.0 if temperature is None else temperature,
              "top_p": 1.0 if data.get("top_p") is None else data["top_p"],
              "oov": data.get("oov", "error")}
    if fields["temperature"] == 0 and not isinstance(fields["temperature"], bool):
        fields = {**fields, "temperature": 1.0, "greedy": True}
    instances = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            seed = _choice_seed(data.get("seed"), p * n + j)
            try:
                instances.append(parse_instance({**fields, "prompt": prompt, "seed": seed},
                                                {}, limits, rng))
            except RequestError as err:
                raise RequestError(str(err).replace("length", "max_tokens", 1)) from err
    return data, instances, _stops(data.get("stop")), n


class StopScanner:
    """Cuts a choice's text before its first stop string, holding back what may start one."""

    def __init__(self, stops: Sequence[str]):
        """Scans for `stops` (non-empty strings)."""
        self.stops, self.held = list(stops), ""
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to send now, and whether a stop string was found."""
        text, self.held = self.held + text, ""
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            return text[:min(cuts)], True
        keep = len(text) - self.hold
        if keep < len(text):
            text, self.held = text[:max(0, keep)], text[max(0, keep):]
        return text, False

    def flush(self) -> str:
        """What was held back, at the end of the text."""
        text, self.held = self.held, ""
        return text


async def _choices(blocks: asyncio.Queue, count: int, rows: Sequence[Any],
                   stops: Sequence[str]) -> AsyncIterator[tuple[int, str, str | None]]:
    """(choice, text, finish_reason or None) as the rows' blocks arrive; raises their errors."""
    scanners = [StopScanner(stops) for _ in range(count)]
    running = count
    while running:
        index, text, err = await blocks.get()
        if err is not None:
            raise err
        if scanners[index] is None:
            continue  # Blocks of a row already ended by a stop string.
        if text is None:
            rest, scanners[index] = scanners[index].flush(), None
            running -= 1
            yield index, rest, "length"
            continue
        safe, stopped = scanners[index].feed(text)
        if stopped:
            rows[index].cancelled = True
            scanners[index] = None
            running -= 1
            yield index, safe, "stop"
        elif safe:
            yield index, safe, None


def _usage(tokenizer: tokenization.Tokenizer, instances: Sequence[Instance],
           texts: Sequence[str], n: int) -> dict[str, int]:
    """OpenAI's usage: the prompts (each once) and the completions, in the model's tokens."""
    prompt = sum(count_tokens(tokenizer, i.prompt) for i in instances[::n])
    produced = sum(count_tokens(tokenizer, t) for t in texts)
    return {"prompt_tokens": prompt, "completion_tokens": produced,
            "total_tokens": prompt + produced}


def add_routes(app: FastAPI, batcher: Batcher, limits: Limits, timing: transport.Timing,
               rng: random.Random, model: str, prefixes: Sequence[str] = PREFIXES) -> None:
    """Adds OpenAI's routes under each prefix.

    Args:
      app: the application.
      batcher: runs the model.
      limits: what one request may ask for (`max_instances` bounds prompts x n).
      timing: how long a body and a request may take.
      rng: draws the seeds of choices without one.
      model: the model's name, as /models lists it.
      prefixes: where the routes go, e.g. ("/v1", "/openai/v1").
    """
    tokenizer = batcher.backend.tokenizer

    async def completions(request: Request) -> Any:
        data, instances, stops, n = parse_completion(
            await transport.read_body(request, limits.max_body_bytes, timing.body_seconds),
            limits, rng)
        top = logprobs.parse(data)
        if top is not None:
            batcher.backend.check_score()
        blocks: asyncio.Queue = asyncio.Queue()
        # Scores are computed after the rows end: the rows' admission is held until then
        # (a stream's chunks are scored as they are sent, and its rows let go as they end).
        held: list[Any] | None = [] if top is not None and not data.get("stream") else None
        rows = transport.admit(batcher, instances,
                               [transport.to_queue(blocks, i) for i in range(len(instances))],
                               held)
        try:
            return await _answer(request, data, instances, rows, blocks, stops, n, top)
        finally:
            for release in held or ():
                release()

    async def _answer(request: Request, data: dict[str, Any], instances: list[Instance],
                      rows: list[Any], blocks: asyncio.Queue, stops: list[str], n: int,
                      top: int | None) -> Any:
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model}
        # "echo": each choice's text starts with its prompt, as sent.
        echoed = [i.prompt if data.get("echo") else "" for i in instances]
        if data.get("stream"):
            options = data.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            scorer = (None if top is None else
                      logprobs.StreamScores(tokenizer, top, batcher.score,
                                            batcher.score_from, rows, echoed))
            return StreamingResponse(_stream(blocks, rows, instances, stops, head,
                                             tokenizer if usage else None, n,
                                             timing.deadline_seconds, echoed, scorer),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})

        async def collect() -> tuple[list[str], list[str], list[Any]]:
            texts, reasons = [""] * len(instances), ["length"] * len(instances)
            async for index, text, reason in _choices(blocks, len(instances), rows, stops):
                texts[index] += text
                reasons[index] = reason or reasons[index]
            if top is None:
                return texts, reasons, [None] * len(instances)
            prompts, drawn = [r.ids for r in rows], [r.output.ids for r in rows]
            scores = await asyncio.wrap_future(
                batcher.score(logprobs.rows(tokenizer, prompts, drawn)))
            return texts, reasons, [
                logprobs.choice(tokenizer, top, s, p, d, i.prompt if data.get("echo") else None,
                                len(t))
                for s, p, d, i, t in zip(scores, prompts, drawn, instances, texts)]

        texts, reasons, scored = await transport.watch(request, rows, collect(),
                                                       timing.deadline_seconds)
        choices = [{"text": e + t, "index": i, "logprobs": lp, "finish_reason": r}
                   for i, (e, t, r, lp) in enumerate(zip(echoed, texts, reasons, scored))]
        return {**head, "choices": choices,
                "usage": _usage(tokenizer, instances, texts, n)}

    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                            "owned_by": "char-lstm"}]}

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse(error_body(400, "this text model has no chat template: send "
                                       "plain text to /completions"), 400)

    for prefix in prefixes:
        app.post(f"{prefix}/completions", openapi_extra=schemas.body(schemas.CompletionRequest),
                 responses=schemas.responses(400, 408, 415, 429, 503, stream=True, openai=True)
                 )(completions)
        app.get(f"{prefix}/models")(models)
        app.post(f"{prefix}/chat/completions",
                 responses=schemas.responses(400, openai=True))(chat)


async def _stream(blocks: asyncio.Queue, rows: Sequence[Any], instances: Sequence[Instance],
                  stops: Sequence[str], head: dict[str, Any],
                  usage: tokenization.Tokenizer | None, n: int, deadline: float,
                  echoed: Sequence[str], scorer: logprobs.StreamScores | None = None
                  ) -> AsyncIterator[str]:
    """Server-sent `text_completion` chunks, then `data: [DONE]`; an error is a data frame.

    `usage`: the model's tokenizer when the client asked for usage, else None.
    `echoed`: each choice's prompt when the client asked for echo (its first chunk).
    `scorer`: gives each chunk its `logprobs` when the client asked for them.
    """
    texts = [""] * len(instances)
    try:
        async with asyncio.timeout(deadline or None):
            for index, prompt in enumerate(echoed):
                if prompt:
                    lp = await scorer.echo(index) if scorer else None
                    yield _frame({**head, "choices": [{"text": prompt, "index": index,
                                                       "logprobs": lp,
                                                       "finish_reason": None}]})
            async for index, text, reason in _choices(blocks, len(instances), rows, stops):
                texts[index] += text
                choice = {"text": text, "index": index,
                          "logprobs": await scorer.chunk(index, text) if scorer else None,
                          "finish_reason": reason}
                yield _frame({**head, "choices": [choice]})
        if usage is not None:
            yield _frame({**head, "choices": [], "usage": _usage(usage, instances, texts, n)})
    except Exception as err:  # noqa: BLE001 - the client hears of it in the stream's own way.
        if isinstance(err, TimeoutError):
            err = transport.DeadlineError(f"the request ran past its deadline of {deadline:g} s")
        yield _frame(error_body(transport.status_of(err), transport.public_message(err)))
    finally:
        for row in rows:  # A client that left stops its rows at the next block.
            row.cancelled = True
    yield "data: [DONE]\n\n"


def _frame(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
