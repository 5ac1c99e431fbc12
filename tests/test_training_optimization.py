"""Tests for trainer.training.optimization through the training job: the time-budgeted
schedule, Adam's settings and weight decay, and --ema_momentum's weight average (the
average each step leaves, what is evaluated and saved, resume, bad values).

Shares the tiny config and corpus of tests/training_jobs.py and tests/conftest.py.
"""

from __future__ import annotations

import math
import os
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from training_jobs import metrics, read_json, tiny

from trainer import models
from trainer.data import vocabulary
from trainer.errors import UserError
from trainer.training import optimization, steps, train

MOMENTUM = 0.6  # 1 / (1 - 0.6) = 2.5: steps 1-2 average plainly, then the moving average.


def _restore(job_dir, cfg, vocab_size: int, step: int):
    """(raw weights, averaged weights, count) of the resume checkpoint at `step`."""
    model = models.build_model(cfg, vocab_size)
    average = optimization.WeightAverage(tf.distribute.get_strategy(), model, cfg.ema_momentum)
    prefix = os.path.join(job_dir, "ckpt", f"ckpt-{step}")
    tf.train.Checkpoint(model=model, weight_average=average).read(prefix).expect_partial()
    return ([v.numpy() for v in model.trainable_variables],
            [a.numpy() for a in average.averages], int(average.count.numpy()))


def test_the_average_follows_every_step_is_what_is_kept_and_survives_a_resume(
        corpus, tmp_path):
    # One step per epoch, every checkpoint kept: the resume checkpoint after step n holds
    # the weights W_n the step left and the average A_n.
    cfg = tiny(corpus, tmp_path, steps_per_epoch=1, epochs=3, keep_checkpoints=10,
               ema_momentum=MOMENTUM, lr_schedule="constant", learning_rate=0.05)
    train.train(cfg)
    train.train(cfg.replace(epochs=6))  # Resumed at step 3: the average goes on from A_3.
    vocab = vocabulary.Vocabulary.from_json((tmp_path / "vocab.json").read_text())
    checkpoints = {n: _restore(tmp_path, cfg, vocab.size, n) for n in range(1, 7)}
    assert [checkpoints[n][2] for n in range(1, 7)] == [1, 2, 3, 4, 5, 6]
    raw, averaged, _ = checkpoints[1]
    for w, a in zip(raw, averaged, strict=True):  # The first step's weights, exactly.
        np.testing.assert_array_equal(a, w)
    for n in range(2, 7):
        rate = max(1 - MOMENTUM, 1 / n)
        raw, averaged, _ = checkpoints[n]
        moved = False
        for w, a, before in zip(raw, averaged, checkpoints[n - 1][1], strict=True):
            np.testing.assert_allclose(a, before + rate * (w - before), rtol=1e-5, atol=1e-6)
            moved |= not np.allclose(a, w)
        assert moved, f"the average equals the weights at step {n}"

    # The best weights file holds the average of its step, and the validation figures
    # are the average's.
    best = read_json(tmp_path / "best.json")
    model = models.build_model(cfg, vocab.size)
    model.load_weights(str(tmp_path / best["weights"]))
    for w, a in zip(model.trainable_variables, checkpoints[best["step"]][1], strict=True):
        np.testing.assert_array_equal(w.numpy(), a)
    history = {h["step"]: h for h in metrics(tmp_path)}
    assert history[best["step"]]["val_loss"] == pytest.approx(best["value"])

    # Without averaging, the same run validates (and keeps) the raw weights instead.
    plain = tmp_path / "plain"
    train.train(cfg.replace(job_dir=str(plain), ema_momentum=0.0, epochs=3))
    assert [h["loss"] for h in metrics(plain)] == pytest.approx(
        [history[n]["loss"] for n in (1, 2, 3)], rel=1e-5)  # Training is unchanged ...
    assert metrics(plain)[-1]["val_loss"] != pytest.approx(history[3]["val_loss"], rel=1e-4)


def test_applied_swaps_the_average_in_and_back_exactly(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path)
    model = models.build_model(cfg, 12)
    average = optimization.WeightAverage(tf.distribute.get_strategy(), model, 0.9)
    trained = [v.numpy() for v in model.trainable_variables]
    with average.applied():  # No update yet: nothing to swap in.
        for v, w in zip(model.trainable_variables, trained, strict=True):
            np.testing.assert_array_equal(v.numpy(), w)
    average.update()
    for v in model.trainable_variables:
        v.assign(v + 1.0)
    moved = [v.numpy() for v in model.trainable_variables]
    with average.applied():
        for v, w in zip(model.trainable_variables, trained, strict=True):
            np.testing.assert_array_equal(v.numpy(), w)
        assert keras.ops.all(model.trainable_variables[0] != moved[0])
    for v, w in zip(model.trainable_variables, moved, strict=True):
        np.testing.assert_array_equal(v.numpy(), w)


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_a_momentum_outside_zero_to_one_is_refused(corpus, tmp_path, value):
    with pytest.raises(UserError, match=r"--ema_momentum must be in \[0, 1\)"):
        tiny(corpus, tmp_path, ema_momentum=value)


def _slowed(monkeypatch, seconds: float) -> None:
    """Makes every training step take at least `seconds` longer."""
    real = steps.train_step

    def slow(*args, **kwargs):
        step = real(*args, **kwargs)
        return lambda *a: time.sleep(seconds) or step(*a)
    monkeypatch.setattr(steps, "train_step", slow)


def _checkpoint_value(job_dir, name: str) -> float:
    latest = read_json(os.path.join(job_dir, "ckpt", "latest.json"))["checkpoints"][0]
    reader = tf.train.load_checkpoint(os.path.join(job_dir, latest["prefix"]))
    return float(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))


def test_a_slowed_run_still_ends_its_budget_decayed_and_a_resume_keeps_the_clock(
        corpus, tmp_path, monkeypatch):
    _slowed(monkeypatch, 0.05)
    cfg = tiny(corpus, tmp_path, epochs=40, train_minutes=0.06, learning_rate=0.01,
               min_lr_ratio=0.1, sample_length=0)
    summary = train.train(cfg)
    history = metrics(tmp_path)
    # Far fewer steps than the 40 x 35 planned: by steps alone the rate would be near its peak.
    assert summary["step"] < 0.2 * 40 * 35
    assert history[-1]["learning_rate"] == pytest.approx(0.001, rel=0.05)
    elapsed = _checkpoint_value(tmp_path, "elapsed")
    assert elapsed >= 0.06 * 60
    # Resumed with the same budget: the job's clock was kept, the budget is spent, and the
    # run stops at once (--train_minutes is the whole job's).
    assert train.train(cfg.replace(epochs=41)) == {}
    assert len(metrics(tmp_path)) == len(history)
    # Given twice the budget it goes on from the kept clock: over half of it is gone, so
    # the rate starts well below its peak (a fresh clock would start near 0.01).
    train.train(cfg.replace(epochs=41, train_minutes=0.12))
    assert metrics(tmp_path)[len(history)]["learning_rate"] < 0.006
    assert _checkpoint_value(tmp_path, "elapsed") > elapsed


def test_the_warmup_counts_steps_even_when_the_clock_runs_ahead():
    """A slow machine's clock passes the warmup's share of the budget within a few steps:
    the rate still climbs over the warmup's steps, then follows the budget's decay."""
    clock = tf.Variable(0.0)
    schedule = optimization.BudgetSchedule(0.01, 1000, 100, 0.0, clock)
    assert float(schedule(50)) == pytest.approx(0.005)  # The clock has not run ahead yet.
    clock.assign(0.5)  # Half the minutes gone at step 10: a far slower machine than planned.
    assert float(schedule(10)) == pytest.approx(0.001)  # Still the warmup's 10 / 100.
    # Past the warmup: the cosine at the clock's progress (half of it past the warmup).
    half = 0.01 * 0.5 * (1 + math.cos(math.pi * (500 - 100) / 900))
    assert float(schedule(100)) == pytest.approx(half, rel=1e-5)
    # Late in the warmup the smaller one wins: ramp 0.006 against the decay's 0.0059.
    assert float(schedule(60)) == pytest.approx(half, rel=1e-5)
    clock.assign(0.0)
    assert float(schedule(400)) == pytest.approx(float(optimization.BudgetSchedule(
        0.01, 1000, 100, 0.0)(400)))  # Without a lead, the plain steps' cosine.


def test_the_linear_schedule_warms_up_then_falls_in_a_straight_line_on_the_clock():
    clock = tf.Variable(0.0)
    schedule = optimization.BudgetSchedule(0.01, 1000, 100, 0.1, clock, shape="linear")
    assert float(schedule(50)) == pytest.approx(0.005)
    assert float(schedule(100)) == pytest.approx(0.01)
    # 0.01 down to 0.001 over steps 100-1000: a quarter of the way at step 325.
    assert float(schedule(325)) == pytest.approx(0.01 - 0.009 / 4, rel=1e-5)
    assert float(schedule(1000)) == pytest.approx(0.001, rel=1e-5)
    assert float(schedule(5000)) == pytest.approx(0.001, rel=1e-5)
    clock.assign(0.55)  # The clock ahead: step 550's rate at step 200 (half the decay).
    assert float(schedule(200)) == pytest.approx(0.0055, rel=1e-5)
    assert float(schedule(10)) == pytest.approx(0.001)  # The warmup still counts steps.
    # The cosine's rate is above the line's early in the decay, below it late.
    cosine = optimization.BudgetSchedule(0.01, 1000, 100, 0.1)
    line = optimization.BudgetSchedule(0.01, 1000, 100, 0.1, shape="linear")
    assert float(cosine(300)) > float(line(300)) and float(cosine(800)) < float(line(800))
    cfg = tiny("unused", "unused", lr_schedule="linear", learning_rate=0.01, warmup_steps=0,
               min_lr_ratio=0.0)
    optimizer, _ = optimization.build_optimizer(cfg, total_steps=10)
    assert float(optimizer.learning_rate) == pytest.approx(0.01)
    optimizer.iterations.assign(2)
    assert float(optimizer.learning_rate) == pytest.approx(0.008)  # The cosine's: 0.00905.


def test_without_a_budget_the_schedule_follows_the_steps_only(corpus, tmp_path, monkeypatch):
    _slowed(monkeypatch, 0.01)
    train.train(tiny(corpus, tmp_path, epochs=2, learning_rate=0.01, min_lr_ratio=0.1,
                     sample_length=0))
    first, last = metrics(tmp_path)
    schedule = optimization.BudgetSchedule(0.01, last["step"], 0, 0.1)
    # Half way through the cosine: 0.01 x (0.1 + 0.9 x 0.5).
    assert first["learning_rate"] == pytest.approx(float(schedule(first["step"])), rel=1e-5)
    assert first["learning_rate"] == pytest.approx(0.0055, rel=1e-4)


def test_adam_uses_the_configured_moment_decay_rates(tmp_path):
    cfg = tiny("unused", tmp_path, lr_schedule="constant", learning_rate=0.1,
               adam_beta1=0.5, adam_beta2=0.9)
    optimizer, _ = optimization.build_optimizer(cfg, total_steps=10)
    w = tf.Variable([0.0])
    m = v = expected = 0.0
    for t, g in enumerate([1.0, 3.0, -2.0], start=1):
        optimizer.apply_gradients([(tf.constant([g]), w)])
        # Adam (Kingma & Ba) with Keras's epsilon outside the bias-corrected root.
        m, v = 0.5 * m + 0.5 * g, 0.9 * v + 0.1 * g * g
        rate = 0.1 * math.sqrt(1 - 0.9**t) / (1 - 0.5**t)
        expected -= rate * m / (math.sqrt(v) + 1e-7)
        assert float(w[0]) == pytest.approx(expected, rel=1e-5)
    # The defaults' moments differ: the same gradients leave a different weight.
    default, _ = optimization.build_optimizer(tiny("unused", tmp_path, lr_schedule="constant",
                                      learning_rate=0.1), total_steps=10)
    w2 = tf.Variable([0.0])
    for g in [1.0, 3.0, -2.0]:
        default.apply_gradients([(tf.constant([g]), w2)])
    assert abs(float(w2[0]) - expected) > 1e-3


@pytest.mark.parametrize("flag", ["adam_beta1", "adam_beta2"])
def test_moment_decay_rates_outside_zero_one_are_refused(tmp_path, flag):
    with pytest.raises(UserError, match=f"--{flag} must be in \\[0, 1\\), got 1.0"):
        tiny("unused", tmp_path, **{flag: 1.0})


def test_weight_decay_shrinks_kernels_and_embedding_but_not_biases(tmp_path):
    cfg = tiny("unused", tmp_path, lr_schedule="constant", learning_rate=0.1, weight_decay=0.5,
               num_layers=2)
    model = models.build_model(cfg, vocab_size=7)
    optimizer, _ = optimization.build_optimizer(cfg, total_steps=10)
    before = {v.path: v.numpy() for v in model.trainable_variables}
    # Zero gradients: Adam's own step is zero, so only the decay moves a weight.
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    names = set()
    for v in model.trainable_variables:
        names.add(v.name)
        shrink = 1.0 if v.name == "bias" else 1 - 0.1 * 0.5
        np.testing.assert_allclose(v.numpy(), before[v.path] * shrink, rtol=1e-6, atol=1e-7)
    assert {"embeddings", "kernel", "recurrent_kernel", "bias"} <= names
    # Off by default: the same zero step leaves every weight where it was.
    plain, _ = optimization.build_optimizer(cfg.replace(weight_decay=0.0), total_steps=10)
    kernel = model.get_layer("logits").kernel
    start = kernel.numpy()
    plain.apply_gradients([(tf.zeros_like(kernel), kernel)])
    np.testing.assert_array_equal(kernel.numpy(), start)
