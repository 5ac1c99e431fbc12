"""Tests for trainer.training.steps through the training job: the time-budgeted schedule and
carried-state training (one device, mirrored, two workers, resume).

Shares trainer.train's tiny config and corpus (tests/test_train.py).
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SENTENCES
from test_train import _flags, _free_port, _json, _task, metrics, tiny

from trainer import models, storage
from trainer.data import vocabulary
from trainer.errors import UserError
from trainer.training import optimization, steps, train


def _slowed(monkeypatch, seconds: float) -> None:
    """Makes every training step take at least `seconds` longer."""
    real = steps.train_step

    def slow(*args, **kwargs):
        step = real(*args, **kwargs)
        return lambda *a: time.sleep(seconds) or step(*a)
    monkeypatch.setattr(steps, "train_step", slow)


def _checkpoint_value(job_dir, name: str) -> float:
    latest = _json(os.path.join(job_dir, "ckpt", "latest.json"))["checkpoints"][0]
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


def test_without_a_budget_the_schedule_follows_the_steps_only(corpus, tmp_path, monkeypatch):
    _slowed(monkeypatch, 0.01)
    train.train(tiny(corpus, tmp_path, epochs=2, learning_rate=0.01, min_lr_ratio=0.1,
                     sample_length=0))
    first, last = metrics(tmp_path)
    schedule = optimization.BudgetSchedule(0.01, last["step"], 0, 0.1)
    # Half way through the cosine: 0.01 x (0.1 + 0.9 x 0.5).
    assert first["learning_rate"] == pytest.approx(float(schedule(first["step"])), rel=1e-5)
    assert first["learning_rate"] == pytest.approx(0.0055, rel=1e-4)


def _lane_corpus(tmp_path) -> tuple[str, str]:
    folder = tmp_path / "lanes"
    folder.mkdir()
    texts = ["".join(SENTENCES[(i + j) % 4] for j in range(n)) for i, n in enumerate((14, 11))]
    for i, text in enumerate(texts):
        (folder / f"part-{i}.txt").write_text(text)
    return str(folder / "*.txt"), "".join(texts)


@pytest.mark.parametrize("reset_prob", [0.0, 0.3])
def test_carried_training_equals_a_hand_computed_loop_and_resets_the_state_on_resume(
        tmp_path, reset_prob):
    pattern, text = _lane_corpus(tmp_path)
    job = tmp_path / "job"
    cfg = tiny(pattern, job, val_fraction=0.0, carry_state=True, batch_size=4, seq_length=16,
               steps_per_epoch=5, epochs=2, lr_schedule="constant", clipnorm=1.0,
               sample_length=0, dropout=0.0, state_reset_prob=reset_prob)
    assert cfg.rotate_lanes  # The default: passes after the first turn the lanes.
    train.train(cfg)  # Steps 1-10: a pass is 7 steps, so the lanes start over at step 8.
    train.train(cfg.replace(epochs=3))  # Resumed at step 10, from a zero state.
    vocab = vocabulary.Vocabulary.from_json((job / "vocab.json").read_text())
    ids = vocab.encode(text).astype("int32")
    lanes, seq = 4, 16
    length = len(ids) // lanes
    pass_steps = (length - 1) // seq
    assert pass_steps == 7
    block = np.concatenate([ids[:lanes * length]] * 2)  # The lanes' ring, unrolled once.
    turns = [0] + [int(np.random.default_rng([cfg.seed, p]).integers(lanes * length))
                   for p in (1, 2)]
    assert turns[1] != 0 and turns[2] != turns[1]

    keras.utils.set_random_seed(cfg.seed)
    model = models.build_model(cfg, vocab.size)
    optimizer = keras.optimizers.Adam(cfg.learning_rate)
    states, losses, resets = models.zero_states(model, lanes), [], 0
    for step in range(15):
        p, t = divmod(step, pass_steps)
        if t == 0 or step == 10:
            states = models.zero_states(model, lanes)
        elif reset_prob:  # Each lane's state is zeroed by its own draw from the seed.
            zeroed = np.random.default_rng([cfg.seed, p, t, 0]).random(lanes) < reset_prob
            resets += int(zeroed.sum())
            states = tuple(tf.where(zeroed[:, None], tf.zeros_like(s), s) for s in states)
        begins = [(i * length + turns[p]) % (lanes * length) + t * seq for i in range(lanes)]
        rows = np.stack([block[b:b + seq + 1] for b in begins])
        with tf.GradientTape() as tape:
            logits, states = models.run_with_state(model, rows[:, :-1], states, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                rows[:, 1:], logits, from_logits=True))
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
        grads, _ = tf.clip_by_global_norm(grads, 1.0)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))
    assert (resets > 0) == (reset_prob > 0)  # The draws did zero some lanes mid pass.
    history = metrics(job)
    assert [h["step"] for h in history] == [5, 10, 15]
    for h, first in zip(history, (0, 5, 10)):
        assert h["loss"] == pytest.approx(np.mean(losses[first:first + 5]), rel=1e-4)
    restored = models.build_model(cfg, vocab.size)
    latest = _json(job / "ckpt" / "latest.json")["checkpoints"][0]
    tf.train.Checkpoint(model=restored).read(str(job / latest["prefix"])).expect_partial()
    for mine, theirs in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_allclose(theirs, mine, rtol=1e-4, atol=1e-5)


def test_carried_state_mirrored_over_two_cpus_matches_one_device(corpus, tmp_path):
    # With the weights averaged too: each replica updates its own copy of the average,
    # and validation reads the average on both.
    base = tiny(corpus, tmp_path, carry_state=True, clipnorm=0.05, epochs=1,
                monitor="val_carried_loss", ema_momentum=0.5)
    one = _task(_flags(base.replace(job_dir=str(tmp_path / "one"), batch_size=16,
                                    strategy="one_device")))
    two = _task(_flags(base.replace(job_dir=str(tmp_path / "two"), batch_size=8,
                                    strategy="mirrored", logical_cpus=2)))
    for proc in (one, two):
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-3000:]
    assert "2 replica(s)" in out
    a, b = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert a["step"] == b["step"]
    for name in ("loss", "val_loss", "val_carried_loss"):
        assert b[name] == pytest.approx(a[name], rel=1e-4), name
    assert a["val_carried_loss"] != a["val_loss"]
    assert _json(tmp_path / "one" / "best.json")["monitor"] == "val_carried_loss"
    tags = {value.tag for path in storage.glob(str(tmp_path / "one" / "logs" / "*"))
            for event in tf.compat.v1.train.summary_iterator(path)
            for value in event.summary.value}
    assert {"val_loss", "val_carried_loss", "learning_rate"} <= tags  # TensorBoard has both.


def test_carried_state_two_workers_train_together(corpus, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    procs, outs = [], []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        cfg = tiny(corpus, tmp_path / f"job-{index}", batch_size=8, epochs=1, carry_state=True,
                   ema_momentum=0.5)  # Each worker averages its own copy of the weights.
        procs.append(_task(_flags(cfg), env={"TF_CONFIG": tf_config}))
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[-3000:]
            outs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    done = [line.split("chars_per_sec")[0] for out in outs for line in out.splitlines()
            if line.startswith("done:")]
    assert len(done) == 2 and done[0] == done[1]
    assert math.isfinite(metrics(tmp_path / "job-0")[0]["val_carried_loss"])


def test_too_many_lanes_for_the_data_is_refused(corpus, tmp_path):
    with pytest.raises(UserError, match="too short for 1024 lanes"):
        train.train(tiny(corpus, tmp_path, batch_size=1024, carry_state=True))
    with pytest.raises(UserError, match="--carry_state needs --objective=sequence"):
        tiny(corpus, tmp_path, carry_state=True, objective="last")


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
