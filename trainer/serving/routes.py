"""The HTTP side of `trainer.serve`: routes, JSON errors and server-sent events (FastAPI).

Routes (the first two named by Vertex AI's AIP_HEALTH_ROUTE / AIP_PREDICT_ROUTE):
  GET  /health    200 {"status": "ready", ...} once the model is loaded
  POST /predict   {"instances": [...], "parameters": {...}} -> {"predictions": [...]}
  POST /stream    one instance -> text/event-stream: `data: {"text": ...}` per block,
                  then `event: done` with the settings (or `event: error`)
  GET  /info      the model's name, config, best checkpoint and the request limits
  GET  /          a page to try the model in a browser

Every refused request gets HTTP 400 and a one-line `{"error": "..."}`; a failure
inside the server gets 500 with the same shape. Nothing a client sends stops it.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from trainer.serving import page
from trainer.serving.batcher import Batcher
from trainer.serving.request import (
    Instance,
    Limits,
    RequestError,
    parse_predict,
    parse_stream,
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (RequestError) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the body has {declared} bytes, over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the body has over {limit} bytes, the limit")
    return bytes(body)


def _subscribe(batcher: Batcher, instance: Instance, ids: Any) -> tuple[asyncio.Queue, Any]:
    """Submits one row; its blocks arrive on the returned queue as (text, error) pairs."""
    loop = asyncio.get_running_loop()
    blocks: asyncio.Queue = asyncio.Queue()
    row = batcher.submit(ids, instance,
                         lambda text, err: loop.call_soon_threadsafe(blocks.put_nowait,
                                                                     (text, err)))
    return blocks, row


async def _collect(blocks: asyncio.Queue) -> str:
    parts = []
    while True:
        text, err = await blocks.get()
        if err is not None:
            raise err
        if text is None:
            return "".join(parts)
        parts.append(text)


def _event(data: dict[str, Any], kind: str | None = None) -> str:
    head = f"event: {kind}\n" if kind else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(batcher: Batcher, limits: Limits | None = None, health_route: str = "/health",
               predict_route: str = "/predict", seed: int | None = None) -> FastAPI:
    """The FastAPI application over a running `Batcher`.

    Args:
      batcher: runs the model.
      limits: what one request may ask for.
      health_route, predict_route: Vertex AI's AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE.
      seed: seeds the draw of seeds for instances that give none (tests); None: fresh.
    """
    limits = limits or Limits()
    app = FastAPI(title="char-lstm", docs_url=None, redoc_url=None, openapi_url=None)
    rng = random.Random(seed)
    info = {**batcher.backend.info, "vocab_size": batcher.backend.vocab.size,
            "limits": {"max_length": limits.max_length,
                       "max_prompt_chars": limits.max_prompt_chars,
                       "max_instances": limits.max_instances,
                       "max_body_bytes": limits.max_body_bytes},
            "routes": {"health": health_route, "predict": predict_route, "stream": "/stream"}}

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return _error(400, str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, err.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, f"bad request: {err.errors()[0].get('msg', err)}")

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(err).__name__}: {err}")

    @app.get(health_route)
    async def health() -> dict[str, Any]:
        return {"status": "ready", "model": info["name"]}

    @app.get("/info")
    async def describe() -> dict[str, Any]:
        return info

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page.PAGE

    @app.post(predict_route)
    async def predict(request: Request) -> dict[str, Any]:
        found = parse_predict(await read_body(request, limits.max_body_bytes),
                                        limits, rng)
        encoded = [batcher.encode(instance) for instance in found]  # All checked first.
        queues = [_subscribe(batcher, instance, ids)[0]
                  for instance, ids in zip(found, encoded)]
        texts = await asyncio.gather(*(_collect(q) for q in queues))
        return {"predictions": [{"text": text, **instance.describe()}
                                for text, instance in zip(texts, found)]}

    @app.post("/stream")
    async def stream(request: Request) -> StreamingResponse:
        instance = parse_stream(await read_body(request, limits.max_body_bytes),
                                          limits, rng)
        blocks, row = _subscribe(batcher, instance, batcher.encode(instance))

        async def events():
            try:
                while True:
                    text, err = await blocks.get()
                    if err is not None:
                        yield _event({"error": f"{type(err).__name__}: {err}"}, "error")
                        return
                    if text is None:
                        yield _event(instance.describe(), "done")
                        return
                    yield _event({"text": text})
            finally:
                row.cancelled = True  # A client that left stops its row at the next block.

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    return app
