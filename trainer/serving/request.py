"""What one generation request asks for, read and checked from JSON.

A prediction request is Vertex AI's `{"instances": [...], "parameters": {...}}`;
each instance is a prompt string or an object with the fields below, and
`parameters` gives defaults for all of them. The defaults are
`trainer.generate`'s (length 500, or the server's limit if lower), except the
seed: a fresh one per instance, returned with its prediction. Every problem
raises `RequestError`, whose one-line message the server returns with HTTP 400.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from typing import Any

from trainer.data import tokenization
from trainer.errors import UserError
from trainer.sampling.next_char import MAX_SEED, Settings
from trainer.sampling.sampler import check_oov

FIELDS = ("prompt", "length", "temperature", "top_k", "top_p", "greedy", "seed", "oov")


class RequestError(UserError):
    """A request the server refuses: HTTP 400 with this one-line message."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_length: int = 2000
    max_prompt_chars: int = 10_000
    max_instances: int = 64
    # Vertex AI refuses online prediction requests over 1.5 MB, so nothing larger arrives there.
    max_body_bytes: int = 1_500_000


@dataclasses.dataclass(frozen=True)
class Instance:
    """One prompt to continue, with its settings (see `trainer.generate`'s flags)."""

    prompt: str = ""
    length: int = 500
    settings: Settings = Settings()
    seed: int = 0
    oov: str = "error"

    def describe(self) -> dict[str, Any]:
        """The settings as a prediction reports them (the seed repeats the text)."""
        s = self.settings
        return {"length": self.length, "seed": self.seed, "temperature": s.temperature,
                "top_k": s.top_k, "top_p": s.top_p, "greedy": s.is_greedy, "oov": self.oov}


def _number(name: str, value: Any, kind: type, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {_short(value)}")
    # Bounds first: float() of a 400-digit integer overflows, and its text is long.
    if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"{name} must be in [{low:g}, {high:g}], got {_short(value)}")
    if kind is int and not float(value).is_integer():
        raise RequestError(f"{name} must be a whole number, got {value}")
    return kind(value)


def _short(value: Any, limit: int = 40) -> str:
    """`value` as JSON, cut to `limit` chars: error texts stay short whatever was sent."""
    text = json.dumps(value) if isinstance(value, (int, float)) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_instance(raw: Any, defaults: dict[str, Any], limits: Limits,
                   rng: random.Random) -> Instance:
    """One instance (a prompt string or an object) -> a checked `Instance`.

    Args:
      raw: the instance as decoded from JSON.
      defaults: the request's `parameters` (already an object).
      limits: the server's limits.
      rng: draws the seed of an instance that names none.

    Raises:
      RequestError: naming the first bad field.
    """
    if isinstance(raw, str):
        raw = {"prompt": raw}
    if not isinstance(raw, dict):
        raise RequestError("each instance must be a prompt string or an object")
    fields = {**defaults, **raw}
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field {_short(unknown[0])}; known: {', '.join(FIELDS)}")
    prompt = fields.get("prompt", "")
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"prompt has {len(prompt)} chars, over the limit of "
                           f"{limits.max_prompt_chars}")
    length = _number("length", fields.get("length", min(500, limits.max_length)), int, 0,
                     limits.max_length)
    greedy = fields.get("greedy", False)
    if not isinstance(greedy, bool):
        raise RequestError("greedy must be true or false")
    settings = Settings(temperature=_number("temperature", fields.get("temperature", 0.8),
                                            float, 0, 100),
                        top_k=_number("top_k", fields.get("top_k", 0), int, 0, 1_000_000),
                        top_p=_number("top_p", fields.get("top_p", 1.0), float, 0, 1),
                        greedy=greedy)
    try:
        settings.validate()
    except UserError as err:
        raise RequestError(str(err)) from err
    seed = fields.get("seed")
    seed = rng.randrange(2**31) if seed is None else _number("seed", seed, int, 0, MAX_SEED)
    return Instance(prompt, length, settings, seed, oov_mode(fields.get("oov", "error")))


def oov_mode(value: Any) -> str:
    """A request's `oov` ("error" or "skip"); RequestError for anything else."""
    try:
        return check_oov(value)
    except UserError as err:
        raise RequestError(str(err)) from err


def flag(data: dict[str, Any], name: str) -> bool:
    """A request's optional true/false field (absent or null: false)."""
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false")
    return bool(value)


def decode_json(body: bytes) -> Any:
    """The request body as JSON; RequestError for anything that is not UTF-8 JSON.

    JSON's escapes can spell half of a character (`"\\ud800"`, a lone surrogate),
    which is not text: no answer could carry it back in UTF-8, so it is refused
    wherever it stands, whatever `oov` says.
    """
    try:
        data = json.loads(body.decode("utf-8"))
        # Strict UTF-8 has no surrogates: only a \uD800-\uDFFF escape can bring one.
        if _SURROGATE_ESCAPE.search(body):
            _refuse_lone_surrogates(data)
        return data
    except UnicodeDecodeError as err:
        raise RequestError(f"the body is not UTF-8: {err.reason} at byte {err.start}") from err
    except ValueError as err:
        raise RequestError(f"the body is not valid JSON: {str(err).splitlines()[0][:80]}"
                           ) from err
    except RecursionError as err:
        raise RequestError("the body's JSON is nested too deeply") from err


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(value: Any, where: str = "the body") -> None:
    if isinstance(value, str):
        lone = tokenization.lone_surrogates(value)
        if lone:
            raise RequestError(f"{where} holds {len(lone)} lone surrogate(s) ("
                               + ", ".join(repr(c) for c in lone[:5]) + "): half of a "
                               "character's JSON escape, which is not text")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, "a field name")
            _refuse_lone_surrogates(item, _short(key))
    elif isinstance(value, list):
        for item in value:
            _refuse_lone_surrogates(item, where)


def parse_predict(body: bytes, limits: Limits, rng: random.Random) -> list[Instance]:
    """A Vertex AI prediction body -> its instances, checked."""
    data = decode_json(body)
    if not isinstance(data, dict) or "instances" not in data:
        raise RequestError('the body must be an object with "instances": [...]')
    instances, defaults = data["instances"], data.get("parameters") or {}
    unknown = sorted(set(data) - {"instances", "parameters"})
    if unknown:
        raise RequestError(f"unknown top-level field {_short(unknown[0])}")
    if not isinstance(instances, list) or not instances:
        raise RequestError('"instances" must be a non-empty list')
    if len(instances) > limits.max_instances:
        raise RequestError(f"{len(instances)} instances, over the limit of "
                           f"{limits.max_instances}")
    if not isinstance(defaults, dict):
        raise RequestError('"parameters" must be an object')
    return [parse_instance(raw, defaults, limits, rng) for raw in instances]


def parse_stream(body: bytes, limits: Limits, rng: random.Random) -> Instance:
    """A streaming request body: one instance object (or {"instances": [one]})."""
    data = decode_json(body)
    if isinstance(data, dict) and "instances" in data:
        found = parse_predict(body, limits, rng)
        if len(found) != 1:
            raise RequestError("a stream takes one instance")
        return found[0]
    return parse_instance(data, {}, limits, rng)
