"""Tests for trainer.models: the cuDNN contract, parameter counts, float32 logits."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer import models
from trainer.config import Config
from trainer.errors import UserError


def test_every_lstm_is_cudnn_eligible():
    model = models.build_model(Config(num_layers=3, rnn_units=16, embedding_dim=8), 30)
    lstms = models.lstm_layers(model)
    assert [layer.name for layer in lstms] == ["lstm_0", "lstm_1", "lstm_2"]
    for layer in lstms:
        assert models.cudnn_eligible(layer)
        assert layer.cell.recurrent_dropout == 0 and not layer.unroll and layer.cell.use_bias


def test_the_eligibility_check_catches_a_breaking_setting():
    broken = keras.layers.LSTM(8, recurrent_dropout=0.1)
    assert not models.cudnn_eligible(broken)
    assert not models.cudnn_eligible(keras.layers.LSTM(8, activation="relu"))


def test_parameter_count_matches_the_architecture():
    vocab, emb, units, layers = 50, 12, 20, 2
    model = models.build_model(Config(num_layers=layers, rnn_units=units, embedding_dim=emb), vocab)
    lstm = lambda inputs: 4 * (units * (inputs + units) + units)  # noqa: E731
    expected = vocab * emb + lstm(emb) + lstm(units) + units * vocab + vocab
    assert model.count_params() == expected


def test_embedding_init_std_draws_a_normal_embedding():
    def embedding(std: float) -> np.ndarray:
        cfg = Config(num_layers=1, rnn_units=8, embedding_dim=64, embedding_init_std=std)
        return models.build_model(cfg, 200).get_layer("embedding").get_weights()[0]

    assert np.abs(embedding(0.0)).max() <= 0.05  # Keras's uniform in +-0.05.
    for std in (1.0, 2.0):
        values = embedding(std)
        assert values.std() == pytest.approx(std, rel=0.05) and np.abs(values).max() > 2 * std
    with pytest.raises(UserError, match="--embedding_init_std must be >= 0"):
        Config(embedding_init_std=-1.0).validate()


def test_logits_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = models.build_model(Config(num_layers=1, rnn_units=8, embedding_dim=4), 10)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert models.lstm_layers(model)[0].compute_dtype == "float16"
    logits = model(np.zeros((2, 5), dtype="int32"))
    assert logits.shape == (2, 5, 10) and logits.dtype == "float32"


def test_run_with_state_carries_the_state_a_whole_sequence_would():
    cfg = Config(num_layers=2, rnn_units=12, embedding_dim=6, dropout=0.3)
    model = models.build_model(cfg, 20)
    ids = np.random.default_rng(0).integers(0, 20, size=(3, 24)).astype("int32")
    whole = keras.ops.convert_to_numpy(model(ids))
    # From zero states it is the model itself; chunk by chunk with the state carried, too.
    logits, _ = models.run_with_state(model, ids, models.zero_states(model, 3))
    np.testing.assert_allclose(logits, whole, atol=1e-5)
    states, parts = models.zero_states(model, 3), []
    for start, end in ((0, 7), (7, 16), (16, 24)):
        part, states = models.run_with_state(model, ids[:, start:end], states)
        parts.append(part)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-5)
    # A non-zero state changes the output: the state really goes in.
    other, _ = models.run_with_state(model, ids, tuple(s + 0.5 for s in states))
    assert np.abs(np.asarray(other) - whole).max() > 1e-3
    assert all(models.cudnn_eligible(layer) for layer in models.lstm_layers(model))
