"""vLLM's tokenizer routes: what the model reads for a prompt, and text for ids.

  POST /tokenize    {"prompt": "...", "return_token_strs": false, "oov": "error"}
                    -> {"count", "max_model_len", "tokens", "token_strs"}
  POST /detokenize  {"tokens": [...]} -> {"prompt": "..."}

at the root, as vLLM serves them, and under each OpenAI prefix (/v1/tokenize, as
SGLang and others do). `tokens` are the model's own ids: the ids the sampler feeds for
the prompt, normalised as the training text was (a bpe model's ids are the
`tokenizers` library's plus one; id 0 is never read or drawn). `count` is their
number; `token_strs` (with "return_token_strs": true) gives each id's text: a
character, a word or `<unk>` (a word model spells an unknown word out after it), or a
bpe token as the library writes it (bytes as printable symbols, "Ġ" for a space), as
vLLM returns them. `max_model_len` is the longest prompt plus output one request may
ask for, in characters: a recurrent model carries its state and has no window.
Characters a char or word model never saw: 400, or left out with "oov": "skip" (and
listed under `skipped`). `model` and `add_special_tokens` are accepted and ignored
(there is one model and it has no special tokens). Errors take OpenAI's shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request

from trainer.data import tokenization
from trainer.data.vocabulary import OOV_ID
from trainer.errors import UserError
from trainer.sampling.tokens import MAX_IDS_PER_CHAR, encode_prompt
from trainer.serving import schemas, transport
from trainer.serving.endpoint import TOKENIZER_ROUTES as PATHS
from trainer.serving.request import Limits, RequestError, decode_json, flag, oov_mode


def paths(prefixes: Sequence[str]) -> tuple[str, ...]:
    """Where the routes go: the root, then under each of OpenAI's `prefixes`."""
    return tuple(p + path for p in ("", *prefixes) for path in PATHS)


def max_model_len(limits: Limits) -> int:
    """The longest prompt plus output a request may ask for, in characters."""
    return limits.max_prompt_chars + limits.max_length


def _object(body: bytes) -> dict[str, Any]:
    data = decode_json(body)
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    if "messages" in data:
        raise RequestError("this text model has no chat template: send \"prompt\"")
    return data


def token_strs(tokenizer: tokenization.Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each id's text as a tokenizer names it (see the module docstring).

    Args:
      tokenizer: the job's tokenizer.
      ids: the model's ids, none of them the out-of-vocabulary id.

    Returns:
      One string per id.
    """
    if isinstance(tokenizer, tokenization.BpeTokenizer):
        return [tokenizer.hf.id_to_token(int(i) - 1) for i in ids]
    if isinstance(tokenizer, tokenization.WordTokenizer):
        return [tokenization.UNK if i == tokenization.UNK_ID else tokenizer.pieces[i].decode()
                for i in ids]
    return [tokenizer.chars[int(i) - 1] for i in ids]


def tokenize(tokenizer: tokenization.Tokenizer, body: bytes, limits: Limits
             ) -> dict[str, Any]:
    """A /tokenize request -> its answer.

    Args:
      tokenizer: the job's tokenizer.
      body: the request body.
      limits: the server's limits (the prompt's length).

    Returns:
      {"count", "max_model_len", "tokens", "token_strs"} (and "skipped" when
      characters were left out).

    Raises:
      RequestError: naming the first bad field.
    """
    data = _object(body)
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (this model takes one prompt per request)")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"prompt must be at most {limits.max_prompt_chars} characters, "
                           f"got {len(prompt)}")
    strs = flag(data, "return_token_strs")
    flag(data, "add_special_tokens")
    oov = oov_mode(data.get("oov", "error"))
    try:
        encoded = encode_prompt(tokenizer, prompt, oov, hint='send "oov": "skip" to drop them')
    except UserError as err:
        raise RequestError(str(err)) from err
    ids = encoded.ids.tolist()
    out = {"count": len(ids), "max_model_len": max_model_len(limits), "tokens": ids,
           "token_strs": token_strs(tokenizer, ids) if strs else None}
    if encoded.skipped:
        out["skipped"] = encoded.skipped
    return out


def detokenize(tokenizer: tokenization.Tokenizer, body: bytes, limits: Limits
               ) -> dict[str, str]:
    """A /detokenize request -> {"prompt": the ids' text}.

    Args:
      tokenizer: the job's tokenizer.
      body: the request body.
      limits: the server's limits (at most `MAX_IDS_PER_CHAR` ids per character of
        `max_model_len`).

    Returns:
      {"prompt": text}; bytes of a character that the ids leave incomplete come out
      as U+FFFD.

    Raises:
      RequestError: for ids that are not the model's.
    """
    data = _object(body)
    ids = data.get("tokens")
    last = tokenizer.size - 1
    if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and OOV_ID < i <= last for i in ids):
        raise RequestError(f"tokens must be a list of the model's ids, whole numbers from 1 "
                           f"to {last}")
    most = MAX_IDS_PER_CHAR * max_model_len(limits)
    if len(ids) > most:
        raise RequestError(f"tokens takes at most {most} ids, got {len(ids)}")
    return {"prompt": tokenizer.decode(ids)}


def add_routes(app: FastAPI, tokenizer: tokenization.Tokenizer, limits: Limits,
               timing: transport.Timing, prefixes: Sequence[str]) -> None:
    """Adds /tokenize and /detokenize at the root and under each prefix.

    Args:
      app: the application.
      tokenizer: the served job's tokenizer.
      limits: what one request may ask for.
      timing: how long a body may take.
      prefixes: OpenAI's prefixes, e.g. ("/v1", "/openai/v1").
    """
    errors = schemas.responses(400, 408, 415, openai=True)

    async def tokenize_route(request: Request) -> dict[str, Any]:
        body = await transport.read_body(request, limits.max_body_bytes, timing.body_seconds)
        return tokenize(tokenizer, body, limits)

    async def detokenize_route(request: Request) -> dict[str, str]:
        body = await transport.read_body(request, limits.max_body_bytes, timing.body_seconds)
        return detokenize(tokenizer, body, limits)

    for prefix in ("", *prefixes):
        app.post(f"{prefix}/tokenize", openapi_extra=schemas.body(schemas.TokenizeRequest),
                 responses={**errors, **schemas.answer(schemas.TokenizeResponse)}
                 )(tokenize_route)
        app.post(f"{prefix}/detokenize", openapi_extra=schemas.body(schemas.DetokenizeRequest),
                 responses={**errors, **schemas.answer(schemas.DetokenizeResponse)}
                 )(detokenize_route)

