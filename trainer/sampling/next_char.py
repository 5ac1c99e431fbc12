"""How the next character is chosen from the logits: settings, per-row seeds, the draw.

Every row of a batch has its own seed, temperature, top_k and top_p, so rows
that belong to different requests can share one compiled sampling call (the
server batches them) and each row is exactly what it would be alone.

Randomness is counter-based: the uniform number behind char `v` of a row's
step `t` is a hash of (row seed, t, v). A row's text therefore depends only on
its own seed and settings, never on its neighbours in the batch or on how the
steps are split into calls. The draw itself is the Gumbel-max trick:
argmax(logits / temperature - log(-log(u))) is a sample from
softmax(logits / temperature). The hash is integer arithmetic that XLA compiles
(TensorFlow's stateless categorical op has no XLA kernel), on int64 tensors
masked to 32 bits, since TensorFlow's CPU kernels lack most uint32 arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from trainer.errors import UserError

# Seeds are int64 in the graph; the hash uses all 64 bits.
MAX_SEED = 2**63 - 1

# Sampled rows divide their logits by at least this (0 means greedy, handled apart).
MIN_TEMPERATURE = 1e-6
_MASK32 = 0xFFFFFFFF
# Odd constants of the lowbias32 hash (Chris Wellons' hash-prospector) and the golden ratio.
_MUL1, _MUL2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the next character is chosen from the model's logits."""

    # Logits are divided by this; below 1 is more conservative. 0 means greedy.
    temperature: float = 0.8
    # Keep only the k most likely characters; 0 keeps all.
    top_k: int = 0
    # Keep the smallest set of characters whose probability reaches p; 1 keeps all.
    top_p: float = 1.0
    # Always take the most likely character.
    greedy: bool = False

    def validate(self) -> Settings:
        """Raises UserError naming the first bad value; returns self."""
        # Also catches NaN; an infinite one would divide -inf logits into NaN.
        if not 0 <= self.temperature < math.inf:
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


class Rule(NamedTuple):
    """Which parts of the choice run; Python bools, so each mix is its own compiled loop.

    A row whose own settings do not need a part that runs (top_k 0, top_p 1, a
    temperature above 0) is left unchanged by it, so the mix only costs time.
    """

    all_greedy: bool = False
    any_greedy: bool = False
    filter_k: bool = False
    filter_p: bool = False

    @classmethod
    def for_rows(cls, rows: Sequence[Settings]) -> Rule:
        sampled = [s for s in rows if not s.is_greedy]
        return cls(all_greedy=not sampled, any_greedy=len(sampled) < len(rows),
                   filter_k=any(s.top_k > 0 for s in sampled),
                   filter_p=any(s.top_p < 1.0 for s in sampled))

    @classmethod
    def everything(cls) -> Rule:
        """Every part, for graphs whose settings arrive as tensors (the SavedModel)."""
        return cls(all_greedy=False, any_greedy=True, filter_k=True, filter_p=True)


def row_arrays(rows: Sequence[Settings]) -> dict[str, np.ndarray]:
    """Per-row settings as the arrays `choose` takes: greedy rows get temperature 0."""
    for s in rows:
        s.validate()
    return {"temperature": np.array([0.0 if s.is_greedy else max(s.temperature, MIN_TEMPERATURE)
                                     for s in rows], np.float32),
            "top_k": np.array([s.top_k for s in rows], np.int32),
            "top_p": np.array([s.top_p for s in rows], np.float32)}


def row_seeds(seed: int | Sequence[int], batch: int) -> np.ndarray:
    """One seed per row: a sequence as given, or seed, seed + 1, ... for one int."""
    if isinstance(seed, (int, np.integer)):
        return np.arange(batch, dtype=np.int64) + np.int64(seed)
    seeds = np.asarray(seed, np.int64)
    if seeds.shape != (batch,):
        raise ValueError(f"{len(seeds)} seeds for {batch} rows")
    return seeds


def _mix(x: tf.Tensor) -> tf.Tensor:
    """lowbias32, a bijection on 32-bit values with full avalanche, on int64 holding them."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    # The product exceeds int64's range; its low 32 bits, all that is kept, are exact.
    x = tf.bitwise.bitwise_and(x * _MUL1, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = tf.bitwise.bitwise_and(x * _MUL2, _MASK32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def seed_keys(seeds: tf.Tensor) -> tf.Tensor:
    """(batch,) int64 row seeds (>= 0) -> the per-row keys `uniform` hashes with."""
    seeds = tf.convert_to_tensor(seeds, tf.int64)
    lo = tf.bitwise.bitwise_and(seeds, _MASK32)
    hi = tf.bitwise.bitwise_and(tf.bitwise.right_shift(seeds, 32), _MASK32)
    return _mix(tf.bitwise.bitwise_xor(_mix(hi + _GOLDEN), lo))


def uniform(keys: tf.Tensor, steps: tf.Tensor, width: int | tf.Tensor) -> tf.Tensor:
    """(batch, width) float32 numbers in (0, 1), a function of (seed, step, column) only.

    Args:
      keys: (batch,) int64, each row's `seed_keys`.
      steps: (batch,) int, each row's step index.
      width: columns (the vocabulary size).
    """
    key = _mix(tf.bitwise.bitwise_xor(keys, tf.cast(steps, tf.int64)))
    column = tf.range(tf.cast(width, tf.int64), dtype=tf.int64) * _GOLDEN
    # One more full mix per column: distinct inputs, so the columns are unrelated.
    x = _mix(tf.bitwise.bitwise_and(key[:, None] + column[None, :], _MASK32))
    # The top 24 bits, centred in their bin: never exactly 0 or 1.
    return (tf.cast(tf.bitwise.right_shift(x, 8), tf.float32) + 0.5) * (1.0 / (1 << 24))


def first_max(x: tf.Tensor) -> tf.Tensor:
    """`tf.argmax(x, axis=-1)` (the first index of each row's largest value), found as
    the row's max and then the first index that reaches it.

    The same ids, but much faster under XLA on a CPU when `x` is costly to compute (the
    draw's hash and logs): XLA computes the producer of a lone argmax inside its
    reduction loop, element by element (0.45 ms a step for 64 rows x 1,024 ids), whereas
    a max and a compare read `x` once, computed vectorised (0.10 ms).

    Args:
      x: (batch, width) float32.

    Returns:
      (batch,) int32 indices.
    """
    top = tf.reduce_max(x, axis=-1, keepdims=True)
    return tf.argmax(tf.cast(x >= top, tf.int32), axis=-1, output_type=tf.int32)


def choose(logits: tf.Tensor, keys: tf.Tensor, steps: tf.Tensor, temperature: tf.Tensor,
           top_k: tf.Tensor, top_p: tf.Tensor, rule: Rule) -> tf.Tensor:
    """Picks one id per row: argmax, or a draw after temperature, top-k, top-p.

    Args:
      logits: (batch, vocab) float32; -inf where a char must never be drawn.
      keys, steps: (batch,) each row's `seed_keys` and step index (see `uniform`).
      temperature: (batch,) float32; rows at 0 take the argmax.
      top_k: (batch,) int32, 0 keeps all.
      top_p: (batch,) float32, 1 keeps all.
      rule: which parts run (see `Rule`).

    Returns:
      (batch,) int32 ids.
    """
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32) if rule.any_greedy else None
    if rule.all_greedy:
        return greedy
    scaled = logits / tf.maximum(temperature, MIN_TEMPERATURE)[:, None]
    if rule.filter_k or rule.filter_p:
        ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")
        width = tf.shape(scaled)[-1]
        cutoff = ordered[:, -1]  # Keeps everything.
        if rule.filter_k:
            k = tf.where(top_k > 0, tf.minimum(top_k, width), width)
            # The top-k cut applies before top-p, as if the rest had probability 0.
            ordered = tf.where(tf.range(width)[None, :] < k[:, None], ordered, -np.inf)
            cutoff = tf.gather(ordered, k - 1, batch_dims=1)
        if rule.filter_p:
            before = tf.cumsum(tf.nn.softmax(ordered), axis=-1, exclusive=True)
            # The most likely char is always kept; then each char whose predecessors
            # have not yet reached top_p. Rows at top_p 1 keep what they had.
            kept = tf.reduce_sum(tf.cast(before < top_p[:, None], tf.int32), axis=-1)
            by_p = tf.gather(ordered, tf.maximum(kept, 1) - 1, batch_dims=1)
            cutoff = tf.where(top_p < 1.0, tf.maximum(cutoff, by_p), cutoff)
        scaled = tf.where(scaled < cutoff[:, None], -np.inf, scaled)
    gumbel = -tf.math.log(-tf.math.log(uniform(keys, steps, tf.shape(scaled)[-1])))
    drawn = first_max(scaled + gumbel)
    return tf.where(temperature > 0, drawn, greedy) if rule.any_greedy else drawn
