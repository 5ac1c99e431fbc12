"""The optimizer with its time-budgeted schedule, the moving average of the weights
(--ema_momentum), and the compiled training steps: windowed, or with each LSTM
layer's state carried.

Each step is a `tf.function` around `strategy.run` with a GradientTape, the same
for the one-device, mirrored and multi-worker strategies, and returns the
[loss sum, correct, count] of the global batch. The carried step also takes and
returns every replica's (h, c) per layer (a PerReplica value under several
replicas); row r of replica k reads the same lane at every step
(`lane_io.lanes_dataset`), so each row's state is the one its lane left. With an
average, each step updates it after the optimizer's update, outside `strategy.run`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from trainer import models
from trainer.config import Config
from trainer.training import distribution, evaluation

SUM = tf.distribute.ReduceOp.SUM


class BudgetSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup then cosine decay, whose progress is the larger of step and time.

    `time_progress` (a variable in [0, 1], the elapsed fraction of --train_minutes)
    is set by the training loop; at 0 this is Keras's CosineDecay with warmup over
    `total_steps`. A machine slower than planned thus still ends its budget decayed.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, alpha: float,
                 time_progress: tf.Variable | None = None):
        super().__init__()
        self.peak, self.total_steps, self.warmup_steps, self.alpha = (
            peak, total_steps, warmup_steps, alpha)
        self.time_progress = time_progress
        self.cosine = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0, decay_steps=max(1, total_steps - warmup_steps),
            alpha=alpha, warmup_target=peak, warmup_steps=warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.time_progress is not None:
            step = tf.maximum(step, tf.cast(self.time_progress, tf.float32) * self.total_steps)
        return self.cosine(step)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "alpha": self.alpha}


def optimizer(cfg: Config, total_steps: int) -> tuple[keras.optimizers.Optimizer, tf.Variable]:
    """Adam over the budgeted schedule; returns it and the schedule's time-progress variable."""
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    time_progress = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="time_progress")
    schedule = BudgetSchedule(cfg.learning_rate, total_steps, warmup,
                              cfg.min_lr_ratio if cfg.lr_schedule == "cosine" else 1.0,
                              time_progress if cfg.train_minutes else None)
    # No global_clipnorm here: Keras would clip each replica's share of the gradient
    # before summing them; `distribution.clip_global_norm` clips the summed gradient instead.
    # Keras applies weight_decay as AdamW does: w -= lr * weight_decay * w, apart from Adam's
    # step. Biases stay out of it (as nanoGPT keeps its biases and norms out).
    optimizer = keras.optimizers.Adam(schedule, beta_1=cfg.adam_beta1, beta_2=cfg.adam_beta2,
                                      weight_decay=cfg.weight_decay or None)
    if cfg.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    if cfg.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer, time_progress


class WeightAverage(tf.Module):
    """An exponential moving average of the model's trainable weights (--ema_momentum).

    After the n-th update (n counted from 1) the average moves toward the weights
    by max(1 - momentum, 1 / n): the plain mean of every step's weights until 1 / (1 -
    momentum) steps were taken, then the moving average. Its variables sit beside the
    model's on every replica (each replica updates its own copy from its own weights,
    which are the same everywhere) and go into the resume checkpoint; `applied()` swaps
    them into the model for evaluation and saving, and back.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, momentum: float):
        super().__init__(name="weight_average")
        self.strategy, self.momentum = strategy, momentum
        self.targets = [v.value for v in model.trainable_variables]
        with strategy.scope():
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")
            self.averages = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                         name=f"average_{i}")
                             for i, v in enumerate(self.targets)]

    def update(self) -> None:
        """One step: average <- average + rate * (weights - average). Cross-replica context."""
        count = tf.cast(self.count, tf.float32) + 1.0
        rate = tf.maximum(1.0 - self.momentum, 1.0 / count)

        def move(average, weights):
            average.assign_add(tf.cast(rate, average.dtype) * (weights - average))

        for average, target in zip(self.averages, self.targets, strict=True):
            self.strategy.extended.update(average, move, args=(target,), group=False)
        self.count.assign_add(1)

    @tf.function
    def _swap(self) -> None:
        def swap(average, weights):
            held = weights.read_value()
            weights.assign(average)
            average.assign(held)

        for average, target in zip(self.averages, self.targets, strict=True):
            self.strategy.extended.update(average, swap, args=(target,), group=False)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside (none before the first update),
        its trained ones again after."""
        if not int(self.count.numpy()):
            yield
            return
        with self.strategy.scope():
            self._swap()
        try:
            yield
        finally:
            with self.strategy.scope():
                self._swap()


def train_step(cfg: Config, strategy: tf.distribute.Strategy, model: keras.Model,
               optimizer: keras.optimizers.Optimizer, global_batch: int,
               average: WeightAverage | None = None):
    """The windowed step `step(iterator) -> sums`, or with --carry_state the carried
    step `step(iterator, states) -> (sums, states)`; either updates `average` after
    the optimizer's step.

    The loss is the mean over each row's targets, averaged over the global batch.
    """

    def gradients(x, y, states):
        with tf.GradientTape() as tape:
            if states is None:
                logits, after = model(x, training=True), None
            else:
                logits, after = models.run_with_state(model, x, states, training=True)
            losses, sums = evaluation.loss_sums(y, logits, cfg.objective)
            per_row = tf.reshape(losses, [tf.shape(losses)[0], -1])
            loss = tf.nn.compute_average_loss(tf.reduce_mean(per_row, -1),
                                              global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)
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
        self.states = evaluation.distributed_zero_states(strategy, model, batch_size)

    def __call__(self) -> tf.Tensor:
        sums, self.states = self.step(self.iterator, self.states)
        return sums
