"""Tests for --ema_momentum (trainer.training.optimization.WeightAverage) through the training job:
the average each step leaves, what is evaluated and saved, resume, bad values.

Shares trainer.train's tiny config and corpus (tests/test_train.py).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_train import _json, metrics, tiny

from trainer import models
from trainer.data import vocabulary
from trainer.errors import UserError
from trainer.training import optimization, train

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
    best = _json(tmp_path / "best.json")
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
