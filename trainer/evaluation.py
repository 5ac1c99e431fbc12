"""Scoring a model on text, two ways, under any tf.distribute strategy.

Windowed: the text is cut into windows of seq_length inputs (stride
seq_length), each read from a zero state; this is what the training job has
always reported as `val_loss`. Carried: the text is cut into a few long
contiguous lanes (`input_pipeline.lanes_dataset`) read seq_length chars at a
time, with every LSTM layer's (h, c) carried from one chunk to the next, as
generation uses the model; only each lane's first chunk starts from zero.

Both return sums (loss, correct, count) reduced over the replicas, so any
number of replicas scores the same text alike. The training job (between
epochs) and `trainer.evaluate` (on a job directory) use the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from trainer import models
from trainer.vocabulary import OOV_ID

SUM = tf.distribute.ReduceOp.SUM


def metrics(totals: np.ndarray) -> dict[str, float]:
    """loss (nats/char), accuracy and bpc (bits/char) from [loss sum, correct, count]."""
    loss_sum, correct, count = totals
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "accuracy": correct / max(count, 1), "bpc": loss / math.log(2)}


def loss_sums(y: tf.Tensor, logits: tf.Tensor, objective: str = "sequence",
              skip_oov: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-target losses and the stacked [loss sum, correct, count] of a batch.

    Args:
      y: target ids, (batch, time), or (batch,) for the 'last' objective.
      logits: (batch, time, vocab) float32.
      objective: 'last' scores only the final position.
      skip_oov: leave out targets that are the out-of-vocabulary id (text
        characters the model never saw); they are not counted either.

    Returns:
      (losses shaped like y, [loss sum, correct, count] float32).
    """
    if objective == "last":
        logits = logits[:, -1]
    losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32)
    if skip_oov:
        weight = tf.cast(tf.not_equal(y, OOV_ID), tf.float32)
        return losses * weight, tf.stack([tf.reduce_sum(losses * weight),
                                          tf.reduce_sum(correct * weight),
                                          tf.reduce_sum(weight)])
    count = tf.cast(tf.size(y), tf.float32)
    return losses, tf.stack([tf.reduce_sum(losses), tf.reduce_sum(correct), count])


def distributed_zero_states(strategy: tf.distribute.Strategy, model: keras.Model,
                            batch: int):
    """Zero states for every replica (a PerReplica value, or plain tensors on one device)."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: models.zero_states(model, batch))


class Evaluator:
    """Windowed and carried scoring of `model`, compiled once per strategy.

    Args:
      strategy: the strategy the model's variables were created under.
      model: a model from `models.build_model`.
      objective: the job's objective; carried scoring is always 'sequence'.
      skip_oov: leave out-of-vocabulary targets out of the scores.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 objective: str = "sequence", skip_oov: bool = False):
        self.strategy, self.model = strategy, model

        def windowed(x, y):
            return loss_sums(y, model(x, training=False), objective, skip_oov)[1]

        def carried(x, y, states):
            logits, states = models.run_with_state(model, x, states, training=False)
            return loss_sums(y, logits, "sequence", skip_oov)[1], states

        @tf.function
        def windowed_step(x, y):
            return strategy.reduce(SUM, strategy.run(windowed, args=(x, y)), axis=None)

        @tf.function
        def carried_step(x, y, states):
            sums, states = strategy.run(carried, args=(x, y, states))
            return strategy.reduce(SUM, sums, axis=None), states

        self.windowed_step, self.carried_step = windowed_step, carried_step

    def windowed(self, dataset_fn: Callable) -> dict[str, float]:
        """Scores the windows of `dataset_fn` (an input_pipeline.dataset per worker)."""
        totals = np.zeros(3)
        for x, y in self.strategy.distribute_datasets_from_function(dataset_fn):
            totals += self.windowed_step(x, y).numpy()
        return metrics(totals)

    def carried(self, dataset_fn: Callable, batch_size: int) -> dict[str, float]:
        """Scores the lanes of `dataset_fn` (an input_pipeline.lanes_dataset per worker).

        Args:
          dataset_fn: gives one pass (repeat=False) of lanes, `batch_size` per replica.
          batch_size: lanes per replica.
        """
        totals = np.zeros(3)
        states = distributed_zero_states(self.strategy, self.model, batch_size)
        for x, y, _ in self.strategy.distribute_datasets_from_function(dataset_fn):
            sums, states = self.carried_step(x, y, states)
            totals += sums.numpy()
        return metrics(totals)
