"""The model: Embedding -> N stacked LSTM layers -> Dense logits.

Every LSTM keeps the settings under which Keras runs the fused cuDNN kernel on
a GPU (tanh, sigmoid, no recurrent dropout, not unrolled, with bias); dropout
sits between layers instead. Logits stay float32 under mixed precision so the
softmax and the loss are computed at full precision. The weights have one
layout whichever kernel runs, so GPU-trained weights load on a CPU.

Each LSTM returns its states too, so `trainer.sampling` can step the same
layers one character at a time with carried state.
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.config import Config


def build_model(cfg: Config, vocab_size: int) -> keras.Model:
    """Builds the training model mapping (batch, time) ids to (batch, time, vocab) logits.

    Args:
      cfg: embedding_dim, rnn_units, num_layers and dropout are read.
      vocab_size: number of ids, the out-of-vocabulary id included.

    Returns:
      An uncompiled functional Keras model. Layers are named `embedding`,
      `lstm_{i}`, `dropout_{i}` and `logits`.
    """
    inputs = keras.Input(shape=(None,), dtype="int32", name="chars")
    x = layers.Embedding(vocab_size, cfg.embedding_dim, name="embedding")(inputs)
    for i in range(cfg.num_layers):
        x, _, _ = lstm_layer(cfg.rnn_units, name=f"lstm_{i}")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, name=f"dropout_{i}")(x)
    logits = layers.Dense(vocab_size, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="char_lstm")


def lstm_layer(units: int, name: str) -> layers.LSTM:
    """An LSTM layer with every setting the cuDNN kernel requires, spelled out."""
    return layers.LSTM(
        units, activation="tanh", recurrent_activation="sigmoid", recurrent_dropout=0.0,
        unroll=False, use_bias=True, return_sequences=True, return_state=True,
        use_cudnn="auto", name=name)


def lstm_layers(model: keras.Model) -> list[layers.LSTM]:
    """The model's LSTM layers, bottom to top."""
    return [layer for layer in model.layers if isinstance(layer, layers.LSTM)]


def cudnn_eligible(layer: layers.LSTM) -> bool:
    """True when Keras may run this layer with the cuDNN kernel on a GPU."""
    return (layer.cell.activation is keras.activations.tanh
            and layer.cell.recurrent_activation is keras.activations.sigmoid
            and layer.cell.recurrent_dropout == 0
            and not layer.unroll
            and layer.cell.use_bias
            and layer.use_cudnn in ("auto", True))
