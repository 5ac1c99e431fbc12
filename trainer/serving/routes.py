"""The HTTP side of `trainer.serve`: routes, JSON errors and server-sent events (FastAPI).

Routes (the first two named by Vertex AI's AIP_HEALTH_ROUTE / AIP_PREDICT_ROUTE):
  GET  /health    200 {"status": "ready", ...}; 503 when the batcher has stopped or
                  its queue is full
  POST /predict   {"instances": [...], "parameters": {...}} -> {"predictions": [...]}
  POST /stream    one instance -> text/event-stream: `data: {"text": ...}` per block,
                  then `event: done` with the settings (or `event: error`)
  GET  /info      the model's name, config, best checkpoint, tokenizer and the request
                  limits
  GET  /metrics   Prometheus metrics (`trainer.serving.metrics`)
  GET  /          a page to try the model in a browser
  /v1/...         OpenAI's completions API (`trainer.serving.completions`), also under
                  a second prefix (KServe's /openai/v1)
  POST /tokenize, /detokenize   vLLM's tokenizer routes (`trainer.serving.tokenize`),
                  at the root and under each OpenAI prefix

Every refused request gets a 4xx and a one-line `{"error": "..."}` (OpenAI's
shape on its routes): 400 bad input, 408 a body too slow, 415 a body not sent as
application/json, 429 the queue is full (with Retry-After); 503 past the
request's deadline or while stopping. A failure inside the server gets 500
without internal details (the log has them). Nothing a client sends stops it.
Below the application (`trainer.serving.server`): a foreign Host header gets a
one-line JSON 400 (starlette's TrustedHostMiddleware decides), every request gets
503 with Retry-After while the model loads, and requests past the connection limit
get a one-line JSON 503 with Retry-After as well.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from starlette.exceptions import HTTPException

from trainer.config import public_config
from trainer.serving import completions, metrics, page, schemas, tokenize
from trainer.serving.batcher import Batcher, UnavailableError
from trainer.serving.request import Limits, RequestError, parse_predict, parse_stream
from trainer.serving.transport import (
    LOG,
    ClientGoneError,
    Timing,
    admit,
    public_message,
    read_body,
    status_of,
    to_queue,
    watch,
)

# Seconds a refused client is asked to wait (429, 503): about one long request.
RETRY_AFTER = "2"


async def _collect(blocks: asyncio.Queue) -> str:
    parts = []
    while True:
        _, text, err = await blocks.get()
        if err is not None:
            raise err
        if text is None:
            return "".join(parts)
        parts.append(text)


def _event(data: dict[str, Any], kind: str | None = None) -> str:
    head = f"event: {kind}\n" if kind else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(batcher: Batcher, limits: Limits | None = None, health_route: str = "/health",
               predict_route: str = "/predict", seed: int | None = None,
               timing: Timing | None = None,
               openai_prefixes: tuple[str, ...] = completions.PREFIXES) -> FastAPI:
    """The FastAPI application over a running `Batcher`.

    Args:
      batcher: runs the model.
      limits: what one request may ask for.
      health_route: Vertex AI's AIP_HEALTH_ROUTE.
      predict_route: Vertex AI's AIP_PREDICT_ROUTE.
      seed: seeds the draw of seeds for instances that give none (tests); None: fresh.
      timing: how long a body and a request may take.
      openai_prefixes: where OpenAI's routes are served (each gets all of them).

    Returns:
      The application, its OpenAPI schema at /openapi.json.
    """
    limits, timing = limits or Limits(), timing or Timing()
    app = FastAPI(title="char-lstm", docs_url=None, redoc_url=None)
    rng = random.Random(seed)
    # No file system or bucket paths: a client has no use for them.
    info = {**{k: v for k, v in batcher.backend.info.items() if k not in ("path", "job_dir")},
            "config": public_config(batcher.backend.info.get("config", {})),
            "tokenizer": batcher.backend.tokenizer.kind,
            "vocab_size": batcher.backend.tokenizer.size,
            "limits": {"max_length": limits.max_length,
                       "max_prompt_chars": limits.max_prompt_chars,
                       "max_instances": limits.max_instances,
                       "max_body_bytes": limits.max_body_bytes},
            "routes": {"health": health_route, "predict": predict_route, "stream": "/stream",
                       "tokenize": "/tokenize", "detokenize": "/detokenize"},
            # Whether /v1/completions answers `logprobs` (an older export cannot).
            "logprobs": batcher.backend.can_score}
    openai_shaped = tokenize.paths(openai_prefixes)

    def error(request: Request, status: int, message: str) -> JSONResponse:
        retry = {"Retry-After": RETRY_AFTER} if status in (429, 503) else None
        # Vertex AI's default routes lie under /v1/endpoints/...: they keep this shape.
        if request.url.path not in (health_route, predict_route) and (
                completions.is_openai_path(request.url.path, openai_prefixes)
                or request.url.path in openai_shaped):
            return JSONResponse(completions.error_body(status, message), status, headers=retry)
        return JSONResponse({"error": message}, status, headers=retry)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> Response:
        status = status_of(err)
        if status == 500:
            LOG.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return error(request, status, public_message(err))

    # Registered by class too, so that they are answered without the traceback that the
    # catch-all handler's path logs.
    for kind in (RequestError, UnavailableError):
        app.add_exception_handler(kind, failed)

    @app.exception_handler(ClientGoneError)
    async def gone(request: Request, err: ClientGoneError) -> Response:
        LOG.warning("%s %s: %s", request.method, request.url.path, err)
        request.state.client_gone = True  # Counted as such by /metrics.
        return Response(status_code=400)  # Nobody reads it.

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error(request, err.status_code, " ".join(str(err.detail).split())[:300])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return error(request, 400, "bad request")

    @app.get(health_route, responses=schemas.responses(503))
    async def health() -> JSONResponse:
        problem = ("the batcher has stopped" if not batcher.alive
                   else "the queue is full" if batcher.saturated else None)
        if problem:
            return JSONResponse({"error": problem}, 503, headers={"Retry-After": RETRY_AFTER})
        return JSONResponse({"status": "ready", "model": info["name"]})

    @app.get("/info")
    async def describe() -> dict[str, Any]:
        return info

    registry = CollectorRegistry()
    registry.register(metrics.BatcherCollector(batcher, info))
    ProcessCollector(registry=registry)
    app.add_middleware(metrics.RequestMetrics, registry=registry)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus' text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def scrape() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page.PAGE, headers=page.HEADERS)

    @app.post(predict_route, openapi_extra=schemas.body(schemas.PredictRequest),
              responses=schemas.responses(400, 408, 415, 429, 503))
    async def predict(request: Request) -> dict[str, Any]:
        found = parse_predict(
            await read_body(request, limits.max_body_bytes, timing.body_seconds), limits, rng)
        queues = [asyncio.Queue() for _ in found]
        rows = admit(batcher, found, [to_queue(q) for q in queues])
        texts = await watch(request, rows, asyncio.gather(*(_collect(q) for q in queues)),
                            timing.deadline_seconds)
        return {"predictions": [{"text": text, **instance.describe()}
                                for text, instance in zip(texts, found)]}

    @app.post("/stream", openapi_extra=schemas.body(schemas.StreamRequest),
              responses=schemas.responses(400, 408, 415, 429, 503, stream=True))
    async def stream(request: Request) -> StreamingResponse:
        instance = parse_stream(
            await read_body(request, limits.max_body_bytes, timing.body_seconds), limits, rng)
        blocks: asyncio.Queue = asyncio.Queue()
        (row,) = admit(batcher, [instance], [to_queue(blocks)])

        async def events():
            try:
                async with asyncio.timeout(timing.deadline_seconds or None):
                    while True:
                        _, text, err = await blocks.get()
                        if err is not None:
                            yield _event({"error": public_message(err)}, "error")
                            return
                        if text is None:
                            yield _event(instance.describe(), "done")
                            return
                        yield _event({"text": text})
            except TimeoutError:
                yield _event({"error": "the request ran past its deadline of "
                                       f"{timing.deadline_seconds:g} s"}, "error")
            finally:
                row.cancelled = True  # A client that left stops its row at the next block.

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    completions.add_routes(app, batcher, limits, timing, rng, info["name"], openai_prefixes)
    tokenize.add_routes(app, batcher.backend.tokenizer, limits, timing, openai_prefixes)
    return app
