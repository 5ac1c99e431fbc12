"""OpenAI's `logprobs` on completions: how likely the model found each token of a choice.

A completion request with `"logprobs": k` (0 to 5) gets, per choice,

  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...],
   "text_offset": [...]}

over the choice's tokens: the prompt's first when `echo` is set, then the completion's.
Each figure is the natural log of the model's own probability of that token after the
tokens before it: its softmax at temperature 1, before top-k/top-p and before the
sampler's masks, the figure the training loss and `trainer.evaluate` average. So the
sum over an echoed prompt is the log-likelihood of its text after its first token,
which is what evaluation harnesses ask for (`echo` with `max_tokens: 0`). The prompt's
first token has none (null), as in OpenAI's and vLLM's answers; a completion of an
empty prompt is scored after the newline the sampler starts from.

`top_logprobs` holds the k likeliest tokens at each position, best first, and the
chosen one if it is not among them (so up to k + 1 entries, as OpenAI documents); the
out-of-vocabulary id, which nothing can send or draw, is left out of it. Tokens are
named by their text: a character, a word, a word model's `<unk>`, or for a bpe id
whose bytes are not whole characters `bytes:` and the bytes as `\\xNN` (OpenAI's form).
`text_offset` is where each token's text starts in the choice's text; a bpe id that
begins a character split across ids adds no text and shares its offset with the next.
The prompt's offsets count the text the model read (normalised as the training text,
`\\r\\n` as `\\n`), which differs from the echoed prompt only where normalising changed
it. A choice cut by a stop string keeps the tokens whose text starts before the cut.

The scores come from one more pass of the model over each choice's tokens after it
is drawn (`Backend.score`, run by the batcher's worker between blocks, the request's
rows still counted against the admission budget until it is done), so asking for them
costs about as much again as feeding the prompt and completion; a choice's text is
the same with or without them.

A stream carries them too (`StreamScores`): each chunk's `logprobs` holds the tokens
whose text starts in that chunk (an echoed prompt's in its own first chunk), with
`text_offset` counted from the start of the choice's whole text, so a choice's chunks
together hold what the same request gets without "stream". Each chunk is scored when it
is sent, by a pass over only the ids drawn since the chunk before, from the LSTM states
that pass ended in (`Backend.score_from`), so a whole stream costs one pass over its
prompt and completion, as one answer does; the last chunk's pass runs after its row
has left the admission budget. A SavedModel exported before its `score_from` signature
scores each chunk from the prompt on instead (about (c + 1) / 2 passes for c chunks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trainer.data import tokenization
from trainer.data.vocabulary import OOV_ID
from trainer.sampling.sampler import start_id
from trainer.sampling.scoring import TOP_LOGPROBS, Scores
from trainer.serving.request import RequestError


def parse(data: dict[str, Any]) -> int | None:
    """The request's `logprobs`: how many alternatives per token, or None when not asked.

    Args:
      data: the decoded completion request.

    Returns:
      k in 0..TOP_LOGPROBS, or None for absent, null or false.

    Raises:
      RequestError: for anything else.
    """
    k = data.get("logprobs")
    if k is None or k is False:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= TOP_LOGPROBS:
        raise RequestError(f"logprobs must be a whole number from 0 to {TOP_LOGPROBS}")
    return k


def token_name(tokenizer: tokenization.Tokenizer, token: int) -> str:
    """A token's text as `tokens` and `top_logprobs` show it (see the module docstring).

    Args:
      tokenizer: the model's tokenizer.
      token: one of its ids.

    Returns:
      The token's text.
    """
    if tokenizer.kind == "char":
        return tokenizer.chars[token - 1] if token != OOV_ID else ""
    if tokenizer.kind == "word" and token == tokenization.UNK_ID:
        return tokenization.UNK
    piece = tokenizer.pieces[token]
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def widths(tokenizer: tokenization.Tokenizer, ids: Sequence[int]) -> list[int]:
    """Characters of text each id adds as the ids are decoded in order (a character split
    across bpe ids counts for the id that completes it)."""
    decoder = tokenizer.stream_decoder()
    return [len(decoder.feed((int(i),))) for i in ids]


def rows(tokenizer: tokenization.Tokenizer, prompts: Sequence[np.ndarray],
         completions: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """What to score for each choice: its prompt's ids (or the start id for an empty
    prompt), then the ids drawn."""
    start = np.array([start_id(tokenizer)], np.int32)
    return [np.concatenate([p if len(p) else start, np.asarray(c, np.int32)]).astype(np.int32)
            for p, c in zip(prompts, completions, strict=True)]


def choice(tokenizer: tokenization.Tokenizer, k: int, scores: Scores, prompt: np.ndarray,
           completion: Sequence[int], echoed: str | None, kept: int) -> dict[str, Any]:
    """One choice's `logprobs` object.

    Args:
      tokenizer: the model's tokenizer.
      k: alternatives per token.
      scores: the choice's row from `rows`, scored.
      prompt: the prompt's ids.
      completion: the ids drawn for the choice.
      echoed: the prompt as echoed at the start of the text, or None without echo.
      kept: characters of the completion's text the choice returns (after a stop cut).

    Returns:
      {"tokens", "token_logprobs", "top_logprobs", "text_offset"}.
    """
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}

    def add(token: int, position: int | None, offset: int) -> None:
        out["tokens"].append(token_name(tokenizer, token))
        out["text_offset"].append(offset)
        if position is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            return
        chosen = float(scores.logprobs[position])
        top = {token_name(tokenizer, int(t)): float(v) for t, v in
               zip(scores.top_ids[position][:k], scores.top_logprobs[position][:k])
               if t != OOV_ID}
        top.setdefault(token_name(tokenizer, token), chosen)
        out["token_logprobs"].append(chosen)
        out["top_logprobs"].append(top)

    base = 0
    if echoed is not None:
        offset = 0
        for j, (token, width) in enumerate(zip(prompt, widths(tokenizer, prompt))):
            add(int(token), j - 1 if j else None, offset)
            offset += width
        base = len(echoed)
    context = max(1, len(prompt))
    offset = 0
    for j, (token, width) in enumerate(zip(completion, widths(tokenizer, completion))):
        if offset >= kept:
            break
        add(int(token), context - 1 + j, base + offset)
        offset += width
    return out


class StreamScores:
    """The `logprobs` of a stream's chunks (see the module docstring), choice by choice."""

    def __init__(self, tokenizer: tokenization.Tokenizer, k: int,
                 score: Callable[[list[np.ndarray]], concurrent.futures.Future],
                 score_from: Callable[[np.ndarray, np.ndarray | None],
                                      concurrent.futures.Future],
                 rows: Sequence[Any], echoed: Sequence[str]):
        """Scores the chunks of `rows`.

        Args:
          tokenizer: the model's tokenizer.
          k: alternatives per token.
          score: `Batcher.score`, for a model that cannot carry states.
          score_from: `Batcher.score_from`.
          rows: the request's rows (`Batcher.submit`): `ids` is the prompt's, and
            `output.ids` the ids drawn so far, which the batcher's worker appends to.
          echoed: each choice's echoed prompt, or "" without echo.
        """
        self.tokenizer, self.k, self.rows, self.echoed = tokenizer, k, rows, echoed
        self._score, self._score_from = score, score_from
        self.sent = [0] * len(rows)  # Characters of each completion sent so far.
        # Per choice: the scores of positions [0, fed) of its row (`rows`), and the
        # packed states after its first `fed` ids, where the next piece starts.
        self._done: list[list[Scores]] = [[] for _ in rows]
        self._fed = [0] * len(rows)
        self._states: list[np.ndarray | None] = [None] * len(rows)

    async def _scores(self, index: int, drawn: list[int]) -> Scores:
        """The scores of choice `index`'s row so far: only the ids not yet scored are fed,
        from the states the last piece ended in (the whole row again for a model that
        cannot carry states)."""
        (row,) = rows(self.tokenizer, [self.rows[index].ids], [drawn])
        fed = self._fed[index]
        if self._score_from is not None and len(row) - fed >= 2:
            answer = await asyncio.wrap_future(
                self._score_from(row[fed:], self._states[index]))
            if answer is None:  # An export without `score_from`: from the prompt on.
                self._score_from = None
            else:
                piece, self._states[index] = answer
                self._done[index].append(piece)
                self._fed[index] = len(row) - 1
        if self._score_from is None:
            (scores,) = await asyncio.wrap_future(self._score([row]))
            return scores
        done = self._done[index]
        return (Scores(*(np.concatenate(parts) for parts in zip(*done))) if done
                else Scores.empty(self.tokenizer.size))

    async def echo(self, index: int) -> dict[str, list[Any]]:
        """The `logprobs` of choice `index`'s echoed prompt (its first chunk)."""
        prompt = self.rows[index].ids
        return choice(self.tokenizer, self.k, await self._scores(index, []), prompt, [],
                      self.echoed[index], 0)

    async def chunk(self, index: int, text: str) -> dict[str, list[Any]]:
        """The `logprobs` of choice `index`'s next chunk of completion, `text`."""
        drawn = list(self.rows[index].output.ids)  # A copy: the worker may add more.
        scores = await self._scores(index, drawn)
        start = self.sent[index]
        self.sent[index] += len(text)
        whole = choice(self.tokenizer, self.k, scores, self.rows[index].ids, drawn, None,
                       self.sent[index])
        keep = [j for j, offset in enumerate(whole["text_offset"]) if offset >= start]
        out = {key: [values[j] for j in keep] for key, values in whole.items()}
        out["text_offset"] = [len(self.echoed[index]) + o for o in out["text_offset"]]
        return out
