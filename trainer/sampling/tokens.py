"""Between text and the model's ids: prompts in, drawn ids out as text.

Every prompt in Python is encoded here by the job's tokenizer (`trainer.data.tokenization`:
characters, words or byte-level BPE), normalised as the training text was; the
exported SavedModel of a char job repeats it in graph ops.

Generated text is counted in characters whatever the tokenizer: a row's ids are
decoded by the tokenizer's stream decoder (a character whose bytes span several BPE
ids comes out whole, once its last byte is drawn), and the row is done at the first
id whose text reaches the characters asked for. The text may therefore pass the
count by the rest of that id's text (a word, a subword; never for characters). The
bytes of a character still incomplete at that point are left out rather than shown
as U+FFFD. Nowhere else can a bpe row's bytes be invalid UTF-8: the samplers never
draw an id whose bytes cannot continue the row's text (`trainer.sampling.utf8`), so
the decoded text holds no U+FFFD that the model made up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from trainer.data import tokenization
from trainer.data.vocabulary import OOV_ID, normalise
from trainer.errors import UserError

OOV_MODES = ("error", "skip")
# A row also ends after this many ids per character asked: only a model that keeps
# drawing ids without text (a word model's <unk> after <unk>) gets there.
MAX_IDS_PER_CHAR = 4


class EncodedPrompt(NamedTuple):
    """A prompt as the model takes it."""

    # int32 ids, none of them the out-of-vocabulary id; empty for an empty prompt.
    ids: np.ndarray
    # The distinct characters the tokenizer cannot encode, in code-point order (left out).
    skipped: list[str]


def check_oov(oov: str) -> str:
    """Checks an `oov` mode: what to do with prompt characters the tokenizer lacks.

    Args:
      oov: "error" (refuse the prompt) or "skip" (leave them out).

    Returns:
      `oov`.

    Raises:
      UserError: for any other value.
    """
    if oov not in OOV_MODES:
        raise UserError(f"oov must be one of {', '.join(OOV_MODES)}, got {oov!r}")
    return oov


def encode_prompt(tokenizer: tokenization.Tokenizer, text: str, oov: str = "error",
                  hint: str = "drop them with --oov=skip") -> EncodedPrompt:
    """Turns prompt text into ids, normalised as the training text was.

    Every prompt in Python goes through here (the generate and serve entrypoints,
    the training job's samples).

    Args:
      tokenizer: the job's tokenizer; its `lowercase` setting is applied first. A bpe
        tokenizer encodes any text; char and word ones lack the characters that no
        training text held.
      text: the prompt.
      oov: "error" raises on characters the tokenizer lacks, "skip" drops them.
      hint: how the caller's user drops them, for the error message.

    Returns:
      The ids and the characters left out.

    Raises:
      UserError: for unknown characters with oov="error", lone surrogates (whatever
        `oov` says), or a bad `oov`.
    """
    check_oov(oov)
    text = normalise(text, tokenizer.lowercase)
    lone = tokenization.lone_surrogates(text)
    if lone:
        # Not characters at all, so not skipped either: the prompt is printed back (the
        # samples, --format=json, an echo), and these have no UTF-8 to print.
        raise UserError(f"the prompt holds {len(lone)} lone surrogate(s) ("
                        + ", ".join(repr(c) for c in lone[:5]) + "): bytes that were not "
                        "UTF-8, or half of a character's JSON escape; give the prompt as "
                        "UTF-8 text")
    missing = tokenizer.missing(text)
    if missing and oov == "error":
        shown = ", ".join(repr(c) for c in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise UserError(f"the prompt has {len(missing)} character(s) the model's vocabulary "
                        f"lacks: {shown}{more} ({hint})")
    if missing:
        # Dropped from the text before it is split, so a word tokenizer sees the rest whole.
        lacking = set(missing)
        text = "".join(c for c in text if c not in lacking)
    ids = tokenizer.encode(text).astype(np.int32)
    return EncodedPrompt(ids[ids != OOV_ID], missing)


def start_id(tokenizer: tokenization.Tokenizer) -> int:
    """The id fed for an empty prompt, since the model needs one input to predict from.

    Args:
      tokenizer: the job's tokenizer.

    Returns:
      The (first) id of a newline, or the out-of-vocabulary id when the tokenizer
      has no newline.
    """
    return int(tokenizer.encode("\n")[0])


def pad_prompts(tokenizer: tokenization.Tokenizer, prompts: Sequence[np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads encoded prompts into one batch; an empty prompt becomes `start_id`.

    Args:
      tokenizer: gives the id that stands in for an empty prompt.
      prompts: id arrays (`EncodedPrompt.ids`), one per row.

    Returns:
      (ids, mask), both (batch, longest); mask is False on the padding.
    """
    rows = [p if len(p) else np.array([start_id(tokenizer)], np.int32) for p in prompts]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    return ids, mask


class OutputText:
    """One row's drawn ids as text, until it holds `length` characters (see the module).

    Attributes:
      length: characters asked for.
      chars: characters of text so far.
      tokens: ids taken so far (those after the one that reached `length` are not).
      ids: those ids, in order.
    """

    def __init__(self, tokenizer: tokenization.Tokenizer, length: int):
        self.length, self.chars, self.tokens = length, 0, 0
        self.ids: list[int] = []
        self._decoder = tokenizer.stream_decoder()
        self._one_each = tokenizer.kind == "char"
        self._max_tokens = MAX_IDS_PER_CHAR * length

    @property
    def done(self) -> bool:
        return self.chars >= self.length or self.tokens >= self._max_tokens

    @property
    def owed(self) -> int:
        """Characters still to come (0 when done)."""
        return 0 if self.done else self.length - self.chars

    def feed(self, ids: np.ndarray | Sequence[int]) -> str:
        """The text of `ids`, the next ids drawn for the row, up to the one that is enough.

        Args:
          ids: the row's next ids; those after it is done are ignored.

        Returns:
          The new text (empty while a character's bytes are incomplete).
        """
        ids = np.asarray(ids).tolist()
        if self._one_each:  # One character per id: no need to look at each.
            ids = ids[:self.owed]
            self.chars, self.tokens = self.chars + len(ids), self.tokens + len(ids)
            self.ids += ids
            return self._decoder.feed(ids)
        parts = []
        for i in ids:
            if self.done:
                break
            text = self._decoder.feed((i,))
            self.chars, self.tokens = self.chars + len(text), self.tokens + 1
            self.ids.append(i)
            parts.append(text)
        return "".join(parts)


def count_tokens(tokenizer: tokenization.Tokenizer, text: str) -> int:
    """Tokens of `text` by the job's tokenizer, as the OpenAI API's usage counts them:
    characters for a char model (as given), the model's own tokens for word and bpe."""
    if tokenizer.kind == "char":
        return len(text)
    return len(tokenizer.encode(normalise(text, tokenizer.lowercase)))
