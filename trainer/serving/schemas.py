"""The request and response shapes, for the OpenAPI schema at /openapi.json only.

The routes parse bodies themselves (`request`, `openai`), so that every problem
gets the protocol's own one-line error; these models only describe them, for
clients and for fuzzers that read the schema. They stay flat (no nested
models), so each is one self-contained JSON schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from trainer.serving.request import MAX_SEED

_MESSAGES = {400: "bad input", 408: "the body came too slowly",
             415: "the body is not sent as application/json",
             429: "the queue is full: retry after Retry-After seconds",
             503: "stopping, past the deadline, or (health) not ready"}
_VERTEX_ERROR = {"type": "object", "properties": {"error": {"type": "string"}},
                 "required": ["error"]}
_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

# One server-sent event: its `data` is a JSON object, or [DONE] at the end of OpenAI's.
_EVENT = {"type": "object", "properties": {"event": {"type": "string"},
                                            "data": {"type": "string"}}, "required": ["data"]}


class Settings(BaseModel):
    """What an instance may set (Vertex AI routes; `parameters` too)."""

    prompt: str = ""
    length: int | None = Field(None, ge=0)
    temperature: float = Field(0.8, ge=0, le=100)
    top_k: int = Field(0, ge=0, le=1_000_000)
    top_p: float = Field(1.0, gt=0, le=1)
    greedy: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    oov: Literal["error", "skip"] = "error"


class PredictRequest(BaseModel):
    """Vertex AI's prediction request: instances are prompts or `Settings` objects."""

    instances: list[str | dict[str, Any]] = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class StreamRequest(Settings):
    """One instance to stream."""


class CompletionRequest(BaseModel):
    """OpenAI's completion request; `max_tokens` counts characters (a word or bpe model
    ends at the token that reaches them). Other fields are ignored."""

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    stream: bool | None = False
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    oov: Literal["error", "skip"] = Field(
        "error", description="This server's: 'skip' leaves out the prompt's characters "
        "that the model's vocabulary lacks instead of refusing the request.")
    stream_options: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    """vLLM's tokenize request (`trainer.serving.tokenize`); `model` and
    `add_special_tokens` are ignored."""

    model: str | None = None
    prompt: str
    return_token_strs: bool | None = False
    add_special_tokens: bool | None = True
    oov: Literal["error", "skip"] = "error"


class TokenizeResponse(BaseModel):
    """The model's ids for the prompt; `max_model_len` in characters (prompt + output)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    skipped: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """vLLM's detokenize request: the model's ids."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """The ids' text."""

    prompt: str


def body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` that documents a route's JSON body as `model`.

    Args:
      model: the body's shape.

    Returns:
      The route decorator's `openapi_extra`.
    """
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def answer(model: type[BaseModel]) -> dict[int, dict[str, Any]]:
    """FastAPI `responses` entry documenting a route's 200 JSON answer as `model`."""
    return {200: {"description": "the answer",
                  "content": {"application/json": {"schema": model.model_json_schema()}}}}


def responses(*statuses: int, stream: bool = False, openai: bool = False
              ) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` for a route's error statuses (and a streamed 200).

    Args:
      statuses: the error statuses the route answers.
      stream: the route may answer 200 with server-sent events.
      openai: errors in OpenAI's shape instead of `{"error": "..."}`.

    Returns:
      The `responses` argument of the route's decorator.
    """
    schema = _OPENAI_ERROR if openai else _VERTEX_ERROR
    out: dict[int | str, dict[str, Any]] = {
        status: {"description": _MESSAGES[status],
                 "content": {"application/json": {"schema": schema}}} for status in statuses}
    if stream:
        out[200] = {"description": "the result, or server-sent events when streamed",
                    "content": {"text/event-stream": {"schema": _EVENT}}}
    return out
