"""The optimizer and its time-budgeted learning-rate schedule, and the moving average
of the weights (--ema_momentum).

Adam (AdamW's decoupled weight decay with --weight_decay, biases excluded) over a
warmup-then-cosine (or linear) schedule whose progress is the larger of the step count and
the elapsed share of --train_minutes, so a machine slower than planned still ends
its budget decayed. Gradient clipping is not here: `distribution.clip_global_norm`
clips the gradient summed over replicas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from trainer.config import Config


class BudgetSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup then cosine (or linear) decay, whose progress is the larger of step
    and time.

    `time_progress` (a variable in [0, 1], the elapsed fraction of --train_minutes)
    is set by the training loop; at 0 this is Keras's CosineDecay with warmup over
    `total_steps`. A machine slower than planned thus still ends its budget decayed.
    The warmup counts steps alone: on a slow machine (or after a slow start) the
    clock would otherwise end it within a few steps, and a deep LSTM thrown at the
    peak rate that early learns far worse (the rate is the smaller of the warmup's
    and the decay's).
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, alpha: float,
                 time_progress: tf.Variable | None = None, shape: str = "cosine"):
        super().__init__()
        self.peak, self.total_steps, self.warmup_steps, self.alpha = (
            peak, total_steps, warmup_steps, alpha)
        self.time_progress, self.shape = time_progress, shape
        self.cosine = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0, decay_steps=max(1, total_steps - warmup_steps),
            alpha=alpha, warmup_target=peak, warmup_steps=warmup_steps)

    def curve(self, step):
        """The rate at `step` (a float tensor) of warmup then decay, by steps alone."""
        if self.shape == "cosine":
            return self.cosine(step)
        warmup = float(self.warmup_steps)
        ramp = self.peak * step / max(warmup, 1.0)
        done = tf.clip_by_value((step - warmup) / max(self.total_steps - warmup, 1.0), 0.0, 1.0)
        decayed = self.peak * (1.0 - (1.0 - self.alpha) * done)
        return tf.where(step < warmup, ramp, decayed)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.time_progress is None:
            return self.curve(step)
        budget = tf.maximum(step, tf.cast(self.time_progress, tf.float32) * self.total_steps)
        warmup = float(self.warmup_steps)
        decayed = self.curve(tf.maximum(budget, warmup))
        if not self.warmup_steps:
            return decayed
        return tf.minimum(self.curve(tf.minimum(step, warmup)), decayed)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "alpha": self.alpha, "shape": self.shape}


def build_optimizer(cfg: Config, total_steps: int
                    ) -> tuple[keras.optimizers.Optimizer, tf.Variable]:
    """Adam over the budgeted schedule; returns it and the schedule's time-progress variable."""
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    time_progress = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="time_progress")
    schedule = BudgetSchedule(cfg.learning_rate, total_steps, warmup,
                              1.0 if cfg.lr_schedule == "constant" else cfg.min_lr_ratio,
                              time_progress if cfg.train_minutes else None,
                              "linear" if cfg.lr_schedule == "linear" else "cosine")
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
