"""Tests for trainer.training.steps through the training job: carried-state training
(one device, mirrored, two workers, resume).

Shares the tiny config and corpus of tests/training_jobs.py and tests/conftest.py.
"""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SENTENCES
from training_jobs import flags_of, free_port, metrics, read_json, start_task, tiny

from trainer import models, storage
from trainer.config import Config
from trainer.data import vocabulary
from trainer.errors import UserError
from trainer.training import steps, train


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
    latest = read_json(job / "ckpt" / "latest.json")["checkpoints"][0]
    tf.train.Checkpoint(model=restored).read(str(job / latest["prefix"])).expect_partial()
    for mine, theirs in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_allclose(theirs, mine, rtol=1e-4, atol=1e-5)


def test_carried_state_mirrored_over_two_cpus_matches_one_device(corpus, tmp_path):
    # With the weights averaged too: each replica updates its own copy of the average,
    # and validation reads the average on both.
    base = tiny(corpus, tmp_path, carry_state=True, clipnorm=0.05, epochs=1,
                monitor="val_carried_loss", ema_momentum=0.5)
    one = start_task(flags_of(base.replace(job_dir=str(tmp_path / "one"), batch_size=16,
                                    strategy="one_device")))
    two = start_task(flags_of(base.replace(job_dir=str(tmp_path / "two"), batch_size=8,
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
    assert read_json(tmp_path / "one" / "best.json")["monitor"] == "val_carried_loss"
    tags = {value.tag for path in storage.glob(str(tmp_path / "one" / "logs" / "*"))
            for event in tf.compat.v1.train.summary_iterator(path)
            for value in event.summary.value}
    assert {"val_loss", "val_carried_loss", "learning_rate"} <= tags  # TensorBoard has both.


def test_carried_state_two_workers_train_together(corpus, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    procs, outs = [], []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        cfg = tiny(corpus, tmp_path / f"job-{index}", batch_size=8, epochs=1, carry_state=True,
                   ema_momentum=0.5)  # Each worker averages its own copy of the weights.
        procs.append(start_task(flags_of(cfg), env={"TF_CONFIG": tf_config}))
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


@pytest.mark.parametrize("carry", [False, True])
def test_a_step_cut_into_parts_computes_the_whole_batch_s_loss_gradients_and_states(carry):
    """distribution.batch_parts: the rows' passes run side by side, the update is the same."""
    cfg = Config(train_data="t.txt", job_dir="j", rnn_units=8, num_layers=2, embedding_dim=4,
                 dropout=0.0, carry_state=carry, clipnorm=0.5).validate()
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 12, (5, 7)).astype("int32"), rng.integers(0, 12, (5, 7)).astype("int32")
    reset = np.array([False, True, False, False, True])
    results = []
    for parts in (1, 3):  # 2 + 2 + 1 rows.
        keras.utils.set_random_seed(0)
        model = models.build_model(cfg, 12)
        optimizer = keras.optimizers.Adam(0.05)
        step = steps.train_step(cfg, tf.distribute.get_strategy(), model, optimizer, 5,
                                parts=parts)
        data = iter(tf.data.Dataset.from_tensors((x, y, reset) if carry else (x, y)).repeat())
        states = tuple(tf.fill([5, 8], float(i) / 10) for i in range(4))
        for _ in range(2):
            sums, states = step(data, states) if carry else (step(data), states)
        results.append((sums.numpy(), [s.numpy() for s in states], model.get_weights()))
    (sums1, states1, weights1), (sums3, states3, weights3) = results
    np.testing.assert_allclose(sums3, sums1, rtol=1e-5)
    for a, b in zip(states1 + weights1, states3 + weights3, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
