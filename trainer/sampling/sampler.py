"""Sampling text from the model with carried LSTM state, inside compiled TF loops.

The model reads and draws the ids of the job's tokenizer (characters, words or BPE
subwords; `trainer.sampling.tokens` turns prompts into ids and ids back into text,
counted in characters). The prompt is fed once through the model's own layers; after
that a new token costs one LSTM step per layer, each layer's (h, c) carried from the
step before, never a re-run of a window. The step loop is a `tf.while_loop`
inside one `tf.function`, compiled with XLA by default (it fuses the per-char
ops, which otherwise cost more than the arithmetic of a small LSTM), so a block
of tokens is one call from Python.

The Sampler has one way in for a stream (`stream`, the new text block by block)
and one for a batch (`generate`, the whole texts). `begin` and `advance` are the
stepping interface under both, which the server's backends drive themselves to
let requests join and leave a running batch. The Sampler holds references to
the model's layers, not copies, so it always samples from the current weights
(the training job calls it between epochs).

Every row has its own seed and settings (see `trainer.sampling.next_char`): the draw for a
row's step t depends only on (row seed, t), so the same seed, prompt and
settings give the same text alone or batched with other rows, and a stream
generated block by block equals the same sample generated in one call. One int
seed for a batch means seeds seed, seed + 1, ... for its rows.

Prompts of different lengths in one batch are left-padded and masked; the
LSTM layers keep their zero state over the padding, so each row is exactly what
feeding that prompt alone would give. An empty prompt starts from a newline
(or the out-of-vocabulary id when the tokenizer has no newline), since the
model needs one input before it predicts anything. A word model's `<unk>` is never
drawn (the characters of a word outside its vocabulary are drawn directly).

A bpe model never draws an id whose bytes cannot continue the row's text as valid
UTF-8 (`trainer.sampling.utf8`): each row's automaton state is carried as the last
element of the states, after every layer's (h, c), and the logits of each step are
masked by it, so the text decodes without U+FFFD however the model was trained.

`length` counts characters of the new text for every tokenizer: a row ends at the
first token whose text reaches it, so a word or subword model's text may be longer
by the rest of that token (`tokens.OutputText`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer import models
from trainer.data.tokenization import Tokenizer
from trainer.data.vocabulary import OOV_ID
from trainer.sampling import scoring
from trainer.sampling.next_char import Rule, Settings, choose, row_arrays, row_seeds, seed_keys
from trainer.sampling.scoring import Scores, score_rows
from trainer.sampling.tokens import (
    OOV_MODES,
    EncodedPrompt,
    OutputText,
    check_oov,
    encode_prompt,
    pad_prompts,
    start_id,
)
from trainer.sampling.utf8 import tables_of

__all__ = ["OOV_MODES", "STREAM_BLOCK", "EncodedPrompt", "Sampler", "Settings", "check_oov",
           "encode_prompt", "pad_prompts", "start_id"]

# Ids per compiled call when streaming: small enough to show progress,
# large enough that the Python round trip costs little next to the steps.
STREAM_BLOCK = 64
# Plain sampling: no greedy rows, no filters.
SAMPLE = Rule()
# XLA fuses the per-char ops that dominate small steps, but its CPU matmuls lose once a
# step is arithmetic-bound: measured 0.83x the graph executor at 64 rows x 512 units,
# 1.24x at 64 x 256 and 1.2-3.2x below (BENCHMARKS-history.md). Larger batches run without it.
XLA_MAX_ROW_UNITS = 32_768


class Sampler:
    """Generates text from a model, one carried-state LSTM step per token."""

    def __init__(self, model: keras.Model, tokenizer: Tokenizer, jit_compile: bool = True):
        """Wraps `model` (from `models.build_model`) without copying its weights.

        Args:
          model: the training model; its embedding, lstm_* and logits layers are used.
          tokenizer: the tokenizer the model was trained with (`job_loader.load_job`'s;
            a `Vocabulary` for a char model).
          jit_compile: compile the step loop with XLA for batches of fewer than
            XLA_MAX_ROW_UNITS rows x units. Each (batch, tokens per call) shape then
            compiles once, in about a second; False always runs TensorFlow's graph
            executor, which pays a fixed cost per op of every step.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.embedding = model.get_layer("embedding")
        self.lstms = models.lstm_layers(model)
        self.dense = model.get_layer("logits")
        if not self.lstms:
            raise ValueError("the model has no LSTM layers")
        self.jit_compile = jit_compile
        # Added to the logits so that the out-of-vocabulary id is never drawn, nor an id
        # that decodes to nothing (a word model's <unk>, which only announces that a word
        # is spelled out after it: a model that kept drawing it would write nothing).
        oov_mask = np.array([-np.inf if i == OOV_ID or not piece else 0.0
                             for i, piece in enumerate(tokenizer.pieces)], np.float32)
        self._oov_mask = tf.constant(oov_mask)
        # A bpe model's UTF-8 automaton (None for char and word): the state after each
        # (state, id), flattened, and per state the mask of the ids allowed next.
        self.utf8 = tables_of(tokenizer)
        if self.utf8 is not None:
            self._utf8_next = tf.constant(self.utf8.next.reshape(-1))
            self._utf8_masks = tf.constant(self.utf8.mask() + oov_mask[None, :])
        self._feed = tf.function(self.feed, reduce_retracing=True)
        self._steps = tf.function(self.steps, reduce_retracing=True)
        self._scores, self._scores_from = (
            tf.function(functools.partial(f, self), reduce_retracing=True)
            for f in (scoring.scores, scoring.scores_from))
        self._steps_xla = tf.function(self.steps, reduce_retracing=True, jit_compile=True)

    # --- Compiled internals. Public only because trainer.sampling.saved_model builds
    # its signatures from them; everything else goes through the methods below them. ---

    def feed(self, ids: tf.Tensor, mask: tf.Tensor | None = None
             ) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        """Internal: runs left-padded prompts through the model once, one LSTM step per token.

        The prompt goes through the same cell steps as the sampling loop rather
        than through the LSTM layers: a layer may pick the cuDNN kernel on a GPU,
        which rejects left padding and would put GPU-only ops into an export.

        Args:
          ids: (batch, time) int32 ids, time >= 1.
          mask: (batch, time) bool, False on left padding; None when there is none.

        Returns:
          (logits for the next token (batch, vocab) float32, states (h0, c0, h1, c1, ...),
          and for a bpe model each row's UTF-8 state (batch,) int32 last).
        """
        ids = tf.convert_to_tensor(ids, tf.int32)
        batch = tf.shape(ids)[0]
        states = tuple(tf.zeros([batch, layer.cell.units], layer.cell.compute_dtype)
                       for layer in self.lstms for _ in "hc")
        if self.utf8 is not None:
            states += (tf.zeros([batch], tf.int32),)
        logits = tf.zeros([batch, self.tokenizer.size], tf.float32)

        def body(t, logits, states):
            logits, new_states = self._step(ids[:, t], states)
            if mask is not None:
                # Padding leaves the state as it was (zero until the prompt starts).
                new_states = tuple(
                    tf.where(mask[:, t, None] if new.shape.rank == 2 else mask[:, t], new, old)
                    for new, old in zip(new_states, states))
            return t + 1, logits, new_states

        _, logits, states = tf.while_loop(
            lambda t, *_: t < tf.shape(ids)[1], body, (tf.constant(0), logits, states),
            parallel_iterations=1)
        return logits, states

    def _layers(self, ids: tf.Tensor, states: Sequence[tf.Tensor]
                ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """One token per row through every layer: the model's own logits (float32, no mask)
        and each layer's new (h, c), flattened."""
        x = self.embedding(ids)
        new_states = []
        for j, layer in enumerate(self.lstms):
            x, (h, c) = layer.cell(x, [states[2 * j], states[2 * j + 1]], training=False)
            new_states += [h, c]
        return tf.cast(self.dense(x), tf.float32), new_states

    def _step(self, ids: tf.Tensor, states: tuple[tf.Tensor, ...]
              ) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        """One token per row through every layer; returns masked logits and new states.

        For a bpe model the last state is each row's UTF-8 state: it moves past `ids`, and
        the logits are masked by the state it reaches.
        """
        logits, new_states = self._layers(ids, states)
        if self.utf8 is None:
            return logits + self._oov_mask, tuple(new_states)
        state = tf.gather(self._utf8_next, states[-1] * self.tokenizer.size + ids)
        return logits + tf.gather(self._utf8_masks, state), (*new_states, state)

    def steps(self, logits: tf.Tensor, states: tuple[tf.Tensor, ...], n: int | tf.Tensor,
              step0: tf.Tensor, seeds: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor,
              top_p: tf.Tensor, rule: Rule = SAMPLE, keep_logits: bool = False) -> tuple:
        """Internal: draws `n` tokens per row, one LSTM step each, in a `tf.while_loop`.

        Args:
          logits: (batch, vocab) logits for the first token to draw.
          states: the carried (h, c) of every layer, flattened (a bpe model's UTF-8
            state last).
          n: tokens to draw; a Python int under XLA (it sizes the output), else
            also an int32 scalar tensor.
          step0: (batch,) int32, each row's index of its first step here (the draw
            of a row's step t depends on (row seed, t), so blocks continue one stream).
          seeds: (batch,) int64 row seeds.
          temperature, top_k, top_p: (batch,) per-row settings (see `next_char.choose`).
          rule: which parts of the choice run.
          keep_logits: also return the masked logits each token was drawn from.

        Returns:
          (ids (batch, n) int32, logits after the last token, states after it,
          and (batch, n, vocab) logits when keep_logits).
        """
        batch = tf.shape(logits)[0]
        drawn = tf.TensorArray(tf.int32, size=n, element_shape=tf.TensorShape([None]))
        seen = tf.TensorArray(tf.float32, size=n if keep_logits else 0,
                              element_shape=logits.shape)
        step0 = tf.cast(step0, tf.int32)
        keys = seed_keys(seeds)

        def body(i, logits, states, drawn, seen):
            if keep_logits:
                seen = seen.write(i, logits)
            ids = choose(logits, keys, step0 + i, temperature, top_k, top_p, rule)
            logits, states = self._step(ids, states)
            return i + 1, logits, states, drawn.write(i, ids), seen

        _, logits, states, drawn, seen = tf.while_loop(
            lambda i, *_: i < n, body, (tf.constant(0), logits, tuple(states), drawn, seen),
            parallel_iterations=1)
        if isinstance(n, int):
            ids = tf.transpose(drawn.stack()) if n else tf.zeros([batch, 0], tf.int32)
        else:
            # Stacking an empty TensorArray of unknown row count fails, so n == 0 is apart.
            ids = tf.cond(n > 0, lambda: tf.transpose(drawn.stack()),
                          lambda: tf.zeros([batch, 0], tf.int32))
        if keep_logits:
            return ids, logits, states, tf.transpose(seen.stack(), [1, 0, 2])
        return ids, logits, states

    # --- Python API ---

    def stream(self, prompts: Sequence[str], length: int,
               settings: Settings | Sequence[Settings] | None = None,
               seed: int | Sequence[int] = 0, oov: str = "error", block: int = STREAM_BLOCK
               ) -> Iterator[list[str]]:
        """Generates `length` new chars per prompt, drawing `block` tokens per call.

        The prompts themselves are not repeated. The blocks of a row add up to what
        `generate` returns for the same arguments: the block size never changes the text.
        A row ends at the first token whose text reaches `length` characters, which a
        word or subword model's text may pass by the rest of that token.

        Args:
          prompts: prompt texts, one per row; each may be empty (see `start_id`).
          length: characters to generate per row (at least; see above).
          settings: the choice rule, for every row or one per row; default `Settings()`.
          seed: one seed per row, or an int: rows get seed, seed + 1, ... The same
            seed, prompt and settings give the same text, alone or in any batch.
          oov: what to do with prompt characters the tokenizer lacks ("error"/"skip").
          block: tokens per compiled call; 0 generates everything in one call (a
            word or subword model: in calls of `STREAM_BLOCK` tokens).

        Yields:
          A list with one string per row for each block (a row's string is empty
          once it is done, or while a character's bytes are incomplete); nothing when
          length is 0.

        Raises:
          UserError: for prompt characters the tokenizer lacks with oov="error".
        """
        encoded = [encode_prompt(self.tokenizer, p, oov).ids for p in prompts]
        outputs = [OutputText(self.tokenizer, length) for _ in prompts]
        for ids in self._draw(encoded, outputs, settings or Settings(), seed, block):
            yield [out.feed(row) for out, row in zip(outputs, ids, strict=True)]

    def generate(self, prompts: Sequence[str], length: int,
                 settings: Settings | Sequence[Settings] | None = None,
                 seed: int | Sequence[int] = 0, oov: str = "error") -> list[str]:
        """Generates `length` new chars per prompt in one compiled call (see `stream`; a
        word or subword model: in calls of `STREAM_BLOCK` tokens).

        Args:
          prompts, length, settings, seed, oov: as for `stream`.

        Returns:
          The new text of each row (the prompt not included).

        Raises:
          UserError: for prompt characters the tokenizer lacks with oov="error".
        """
        texts = [""] * len(prompts)
        for parts in self.stream(prompts, length, settings, seed, oov, block=0):
            texts = [t + p for t, p in zip(texts, parts, strict=True)]
        return texts

    def uses_xla(self, batch: int) -> bool:
        """Whether a batch of this many rows runs the XLA-compiled loop.

        Args:
          batch: rows in the call.

        Returns:
          True when `jit_compile` is set and the rows x units stay under XLA_MAX_ROW_UNITS.
        """
        units = max(layer.cell.units for layer in self.lstms)
        return self.jit_compile and batch * units < XLA_MAX_ROW_UNITS

    # --- The stepping interface under `stream` and `generate`. The server's backends
    # drive it themselves, since their rows join and leave between calls. ---

    def begin(self, prompts: Sequence[np.ndarray]) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        """Feeds encoded prompts: the first step of the stepping interface.

        Args:
          prompts: id arrays (`EncodedPrompt.ids`), one per row; lengths may differ.

        Returns:
          (logits for each row's first token, the carried states), for `advance`. Every
          element of the states has the rows first, so rows may be gathered and joined.
        """
        ids, mask = pad_prompts(self.tokenizer, prompts)
        return self._feed(tf.constant(ids), None if mask.all() else tf.constant(mask))

    def advance(self, logits: tf.Tensor, states: tuple[tf.Tensor, ...], n: int,
                step0: np.ndarray, seeds: np.ndarray, rows: dict[str, np.ndarray], rule: Rule,
                keep_logits: bool = False) -> tuple:
        """Draws `n` more tokens per row in one compiled call: the stepping interface's step.

        Args:
          logits, states: from `begin` or the previous `advance`.
          n: tokens to draw per row.
          step0: (batch,) each row's count of tokens drawn so far.
          seeds: (batch,) int64 row seeds (see `next_char.row_seeds`).
          rows: per-row settings as arrays (see `next_char.row_arrays`).
          rule: which parts of the choice run (`Rule.for_rows` of the rows' settings).
          keep_logits: also return the logits each token was drawn from, which lets
            the draws be checked against the model.

        Returns:
          (ids (batch, n) NumPy, logits, states, (batch, n, vocab) NumPy logits or None).
        """
        xla = self.uses_xla(len(step0))
        out = (self._steps_xla if xla else self._steps)(
            logits, states, n if xla else tf.constant(n, tf.int32), tf.constant(step0, tf.int32),
            tf.constant(seeds, tf.int64), **{k: tf.constant(v) for k, v in rows.items()},
            rule=rule, keep_logits=keep_logits)
        return out[0].numpy(), out[1], out[2], out[3].numpy() if keep_logits else None

    def score(self, rows: Sequence[np.ndarray]) -> list[Scores]:
        """The model's log-probability of each id of each row after the ids before it.

        Args:
          rows: id arrays; each row's first id is only read (a prompt's first id, or
            `start_id` before text the model wrote from an empty prompt).

        Returns:
          One `Scores` per row, of len(row) - 1 positions (see `scoring.scores`).
        """
        return score_rows(rows, self.tokenizer.size,
                          lambda ids: [t.numpy() for t in self._scores(tf.constant(ids))])

    def score_from(self, row: np.ndarray, states: np.ndarray | None
                   ) -> tuple[Scores, np.ndarray]:
        """`score` of one row that continues a text: `scoring.score_piece`."""
        return scoring.score_piece(row, states, self.tokenizer.size, self._scores_from)

    def _draw(self, prompts: Sequence[np.ndarray], outputs: Sequence[OutputText],
              settings: Settings | Sequence[Settings], seed: int | Sequence[int], block: int
              ) -> Iterator[np.ndarray]:
        """Yields the (batch, n) ids of each call of `block` tokens until every output is done.

        With `block` 0, a char model draws every character a row owes in one call; a
        word or bpe model draws `STREAM_BLOCK` tokens per call, since its tokens cover
        about two characters each and a call of as many tokens as characters owed would
        draw about twice the tokens the text needs.
        """
        rows = [settings] * len(prompts) if isinstance(settings, Settings) else list(settings)
        if len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} settings for {len(prompts)} prompts")
        arrays, seeds = row_arrays(rows), row_seeds(seed, len(prompts))
        if not len(prompts) or all(out.done for out in outputs):
            return
        logits, states = self.begin(prompts)
        rule = Rule.for_rows(rows)
        xla = self.uses_xla(len(prompts))
        one_each = self.tokenizer.kind == "char"
        if block <= 0 and not one_each:
            block = STREAM_BLOCK
        done = 0
        while not all(out.done for out in outputs):
            owed = max(out.owed for out in outputs)
            n = owed if block <= 0 else min(block, owed)
            # Under XLA every distinct n compiles anew: a shorter block runs at full size.
            width = block if xla and block > 0 else n
            ids, logits, states, _ = self.advance(
                logits, states, width, np.full(len(prompts), done, np.int32), seeds, arrays,
                rule)
            # Characters end with that call; other tokens may need more calls, which go on
            # from the end of this one.
            n = n if one_each else width
            yield ids[:, :n]
            done += n
