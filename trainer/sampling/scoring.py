"""The model's log-probability of given ids: what OpenAI's `logprobs` report.

`scores` feeds each row of ids through the sampler's own cell steps (as `Sampler.feed`
does, so an export holds no GPU-only ops) and reads the model's softmax after every
prefix; `Sampler.score` and an export's `score` signature run it, `score_rows` pads
rows of different lengths into one call and splits the answer. `scores_from` starts
from given states and also returns the states it ends in, so a text scored piece by
piece (a stream's chunks) costs one pass over it in all: `Sampler.score_from` and an
export's `score_from` signature run it, `score_piece` around either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from trainer.sampling.sampler import Sampler

# The most alternatives `scores` gives per position (OpenAI's completions allow 5).
TOP_LOGPROBS = 5


class Scores(NamedTuple):
    """A row's log-probabilities from `Sampler.score`: position t is the id at t + 1."""

    # (positions,) float32: the model's log-probability of each id.
    logprobs: np.ndarray
    # (positions, k) int32 / float32: the k likeliest ids at each position, best first.
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @classmethod
    def empty(cls, vocab: int) -> Scores:
        k = min(TOP_LOGPROBS, vocab)
        return cls(np.zeros(0, np.float32), np.zeros((0, k), np.int32),
                   np.zeros((0, k), np.float32))


def score_rows(rows: Sequence[np.ndarray], vocab: int,
               run: Callable[[np.ndarray], Sequence[np.ndarray]]) -> list[Scores]:
    """Scores rows of different lengths in one call: right-padded, then split per row.

    Args:
      rows: id arrays.
      vocab: the tokenizer's size.
      run: (batch, time) int32 ids -> (logprobs, top ids, top logprobs) NumPy, as
        `scores` (or an exported `score` signature) gives them.

    Returns:
      One `Scores` per row, of len(row) - 1 positions.
    """
    width = max((len(r) for r in rows), default=0)
    if width < 2:
        return [Scores.empty(vocab) for _ in rows]
    ids = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    chosen, top_ids, top_values = run(ids)
    return [Scores(chosen[i, :len(r) - 1], top_ids[i, :len(r) - 1], top_values[i, :len(r) - 1])
            for i, r in enumerate(rows)]


def score_piece(row: np.ndarray, states: np.ndarray | None, vocab: int,
                run: Callable[[tf.Tensor, tf.Tensor], Sequence[tf.Tensor]]
                ) -> tuple[Scores, np.ndarray]:
    """Scores one row from given states, through `scores_from` (or an export's signature).

    Args:
      row: ids; its first id is only read (the last id of the piece before, or a
        prompt's first).
      states: the packed states (`pack`) after the ids before the row, or None for a
        row that starts its text (zero states).
      vocab: the tokenizer's size.
      run: ((1, time) int32 ids, (1, width) float32 states, width 0 for zero states)
        tensors -> (logprobs, top ids, top logprobs, states after all but the last id),
        as `scores_from` returns them.

    Returns:
      (the row's `Scores`, of len(row) - 1 positions; the packed states (width,) after
      all its ids but the last, where the next piece starts).
    """
    if states is None:
        states = np.zeros(0, np.float32)
    if len(row) < 2:  # Nothing to score, nothing fed: the states stay.
        return Scores.empty(vocab), states
    ids = tf.constant(np.asarray(row, np.int32)[None])
    out = run(ids, tf.constant(states[None], tf.float32))
    chosen, top_ids, top_values, after = (np.asarray(t)[0] for t in out)
    return Scores(chosen, top_ids, top_values), after


def pack(states: Sequence[tf.Tensor]) -> tf.Tensor:
    """The layers' (h, c) side by side as one float32 (batch, width) tensor."""
    return tf.concat([tf.cast(s, tf.float32) for s in states], axis=1)


def unpack(sampler: Sampler, packed: tf.Tensor) -> list[tf.Tensor]:
    """`pack`'s tensor back into each layer's (h, c), in the layers' compute dtype."""
    layers = [layer for layer in sampler.lstms for _ in "hc"]
    parts = tf.split(packed, [layer.cell.units for layer in layers], axis=1)
    return [tf.cast(p, layer.cell.compute_dtype) for p, layer in zip(parts, layers)]


def scores(sampler: Sampler, ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The model's log-probability of each id after the ids before it.

    Rows start from zero states, as a prompt does; right padding (any id) only adds
    positions the caller ignores. The log-probabilities are the model's own softmax
    (temperature 1, no top-k/top-p, nothing masked), the figure the training loss and
    `trainer.evaluate` average, so a text's sum is its log-likelihood.

    Args:
      sampler: whose model's layers step the ids (`Sampler._layers`).
      ids: (batch, time) int32, time >= 1.

    Returns:
      (logprobs (batch, time - 1) of ids[:, 1:], top ids (batch, time - 1, k) int32
      and their logprobs (batch, time - 1, k), k = min(TOP_LOGPROBS, vocab)), where
      position t is the distribution after ids[:, :t + 1].
    """
    ids = tf.convert_to_tensor(ids, tf.int32)
    states = [tf.zeros([tf.shape(ids)[0], layer.cell.units], layer.cell.compute_dtype)
              for layer in sampler.lstms for _ in "hc"]
    return _scores(sampler, ids, states)[:3]


def scores_from(sampler: Sampler, ids: tf.Tensor, states: tf.Tensor
                ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """`scores` from given states: the rows continue a text whose states they are.

    Args:
      sampler: whose model's layers step the ids.
      ids: (batch, time) int32, time >= 1; rows of one length (no padding: the
        states after a padded row would have read its padding).
      states: (batch, width) float32, `pack`ed states after the ids before each row;
        (batch, 0) for rows that start their text (zero states).

    Returns:
      `scores`' three tensors, then the packed states after ids[:, :-1] (the last id
      is not fed: the next piece starts with it).
    """
    ids = tf.convert_to_tensor(ids, tf.int32)
    width = sum(2 * layer.cell.units for layer in sampler.lstms)
    states = tf.cond(tf.shape(states)[1] > 0, lambda: states,
                     lambda: tf.zeros([tf.shape(ids)[0], width]))
    *out, states = _scores(sampler, ids, unpack(sampler, states))
    return (*out, pack(states))


def _scores(sampler: Sampler, ids: tf.Tensor, states: list[tf.Tensor]
            ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, list[tf.Tensor]]:
    batch, steps = tf.shape(ids)[0], tf.shape(ids)[1] - 1
    k = min(TOP_LOGPROBS, sampler.tokenizer.size)
    arrays = (tf.TensorArray(tf.float32, size=steps, element_shape=[None]),
              tf.TensorArray(tf.int32, size=steps, element_shape=[None, k]),
              tf.TensorArray(tf.float32, size=steps, element_shape=[None, k]))

    def body(t, states, chosen, top_ids, top_values):
        logits, states = sampler._layers(ids[:, t], states)
        logprobs = tf.nn.log_softmax(logits)
        values, index = tf.math.top_k(logprobs, k)
        picked = tf.gather(logprobs, ids[:, t + 1], axis=1, batch_dims=1)
        return (t + 1, states, chosen.write(t, picked), top_ids.write(t, index),
                top_values.write(t, values))

    _, states, chosen, top_ids, top_values = tf.while_loop(
        lambda t, *_: t < steps, body, (tf.constant(0), states, *arrays),
        parallel_iterations=1)

    def stacked(array: tf.TensorArray, empty: list) -> tf.Tensor:
        # Stacking an empty TensorArray of unknown row count fails: no steps is apart.
        order = [1, 0, 2][:len(empty)]
        return tf.cond(steps > 0, lambda: tf.transpose(array.stack(), order),
                       lambda: tf.zeros(empty, array.dtype))

    return (stacked(chosen, [batch, 0]), stacked(top_ids, [batch, 0, k]),
            stacked(top_values, [batch, 0, k]), states)
