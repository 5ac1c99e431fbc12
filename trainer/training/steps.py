"""The compiled training steps: windowed, or with each LSTM layer's state carried.

Each step is a `tf.function` around `strategy.run` with a GradientTape, the same
for the one-device, mirrored and multi-worker strategies, and returns the
[loss sum, correct, count] of the global batch. The carried step also takes and
returns every replica's (h, c) per layer (a PerReplica value under several
replicas); row r of replica k reads the same lane at every step
(`lane_pipeline.lanes_dataset`), so each row's state is the one its lane left. With an
average, each step updates it after the optimizer's update, outside `strategy.run`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer import models
from trainer.config import Config
from trainer.training import distribution
from trainer.training.optimization import WeightAverage

SUM = tf.distribute.ReduceOp.SUM


def train_step(cfg: Config, strategy: tf.distribute.Strategy, model: keras.Model,
               optimizer: keras.optimizers.Optimizer, global_batch: int,
               average: WeightAverage | None = None, token_chars=None, parts: int = 1):
    """The windowed step `step(iterator) -> sums`, or with --carry_state the carried
    step `step(iterator, states) -> (sums, states)`; either updates `average` after
    the optimizer's step.

    The loss is the mean over each row's targets, averaged over the global batch;
    `token_chars` (the tokenizer's) makes the sums count characters too. `parts`: each
    replica's rows are cut into that many pieces whose passes run side by side
    (`distribution.batch_parts`), the same loss and gradients.
    """

    def part_losses(x, y, states):
        if states is None:
            logits, after = model(x, training=True), None
        else:
            logits, after = models.run_with_state(model, x, states, training=True)
        losses, sums = models.loss_sums(y, logits, cfg.objective, token_chars=token_chars)
        return tf.reduce_mean(tf.reshape(losses, [tf.shape(losses)[0], -1]), -1), sums, after

    def gradients(x, y, states):
        with tf.GradientTape() as tape:
            outs = [part_losses(a, b, tuple(part) if states is not None else None)
                    for a, b, *part in models.split_rows((x, y, *(states or ())), parts)]
            per_row = tf.concat([o[0] for o in outs], 0)
            loss = tf.nn.compute_average_loss(per_row, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)
        sums = tf.add_n([o[1] for o in outs])
        after = None if states is None else models.join_rows([o[2] for o in outs])
        return tape.gradient(scaled, model.trainable_variables), sums, after

    # XLA compiles the forward and backward pass of each replica. The iterator, the
    # gradients' all-reduce and the optimizer update stay outside it: XLA has no
    # kernels for iterator ops, and a compiled cluster cannot reach the variables of
    # other replicas' devices.
    replica_gradients = (tf.function(gradients, jit_compile=True) if cfg.jit_compile
                         else gradients)

    def apply(grads):
        if cfg.clipnorm:
            grads = distribution.clip_global_norm(grads, optimizer, cfg.clipnorm)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    def replica_step(x, y):
        grads, sums, _ = replica_gradients(x, y, None)
        apply(grads)
        return sums

    def replica_carried(x, y, reset, states):
        # A new pass (or a resumed job) starts every lane over, from a zero state;
        # --state_reset_prob zeroes some rows on other steps too.
        states = tuple(tf.where(reset[:, None], tf.zeros_like(s), s) for s in states)
        grads, sums, after = replica_gradients(x, y, states)
        apply(grads)
        # Truncated backpropagation: the state goes on, its gradient does not.
        return sums, tuple(tf.stop_gradient(s) for s in after)

    def averaged():
        if average is not None:
            average.update()

    @tf.function
    def windowed(iterator):
        x, y = next(iterator)
        sums = strategy.run(replica_step, args=(x, y))
        averaged()
        return strategy.reduce(SUM, sums, axis=None)

    @tf.function
    def carried(iterator, states):
        x, y, reset = next(iterator)
        sums, states = strategy.run(replica_carried, args=(x, y, reset, states))
        averaged()
        return strategy.reduce(SUM, sums, axis=None), states

    return carried if cfg.carry_state else windowed


class CarriedSteps:
    """Calls the carried step with the states the previous call returned.

    The states live only in memory: a resumed job starts from zero states (the
    first batch it reads is flagged `reset`), which costs one step of context per
    lane, not a different data order.
    """

    def __init__(self, step, iterator, strategy: tf.distribute.Strategy, model: keras.Model,
                 batch_size: int):
        self.step, self.iterator = step, iterator
        self.states = distribution.zero_states(strategy, model, batch_size)

    def __call__(self) -> tf.Tensor:
        sums, self.states = self.step(self.iterator, self.states)
        return sums
