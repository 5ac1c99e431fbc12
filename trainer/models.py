"""The model: Embedding -> N stacked LSTM layers -> Dense logits.

Every LSTM keeps the settings under which Keras runs the fused cuDNN kernel on
a GPU (tanh, sigmoid, no recurrent dropout, not unrolled, with bias); dropout
sits between layers instead. Logits stay float32 under mixed precision so the
softmax and the loss are computed at full precision. The weights have one
layout whichever kernel runs, so GPU-trained weights load on a CPU.

Each LSTM returns its states too, so `trainer.sampling.sampler` can step the same
layers one character at a time with carried state, and `run_with_state` runs
the same layers over a whole window from a given state and returns the state
after it (carried-state training and evaluation). The functional model itself
reads every window from a zero state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from trainer.config import Config
from trainer.data.vocabulary import OOV_ID


def build_model(cfg: Config, vocab_size: int) -> keras.Model:
    """Builds the training model mapping (batch, time) ids to (batch, time, vocab) logits.

    Args:
      cfg: embedding_dim, embedding_init_std, rnn_units, num_layers and dropout are read.
      vocab_size: number of ids, the out-of-vocabulary id included.

    Returns:
      An uncompiled functional Keras model. Layers are named `embedding`,
      `lstm_{i}`, `dropout_{i}` and `logits`.
    """
    inputs = keras.Input(shape=(None,), dtype="int32", name="chars")
    init = (keras.initializers.RandomNormal(stddev=cfg.embedding_init_std)
            if cfg.embedding_init_std else "uniform")
    x = layers.Embedding(vocab_size, cfg.embedding_dim, embeddings_initializer=init,
                         name="embedding")(inputs)
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


def zero_states(model: keras.Model, batch: int) -> tuple[tf.Tensor, ...]:
    """Zero (h, c) for every LSTM layer, bottom to top, flattened: (h0, c0, h1, c1, ...)."""
    return tuple(tf.zeros([batch, layer.cell.units], tf.float32)
                 for layer in lstm_layers(model) for _ in "hc")


def run_with_state(model: keras.Model, ids: tf.Tensor, states: tuple[tf.Tensor, ...],
                   training: bool = False) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
    """Runs the model's own layers over `ids` starting from `states`.

    The same layers and weights as `model(ids)`, which equals this with zero
    states. Passing an initial state keeps the LSTMs eligible for cuDNN.

    Args:
      model: a model from `build_model`.
      ids: (batch, time) int32 ids.
      states: (h, c) per LSTM layer, flattened as `zero_states` gives them; float32.
      training: dropout on or off.

    Returns:
      (logits (batch, time, vocab) float32, the states after the last step, float32).
    """
    names = {layer.name for layer in model.layers}
    x = model.get_layer("embedding")(ids)
    after = []
    for i, lstm in enumerate(lstm_layers(model)):
        initial = [tf.cast(s, lstm.compute_dtype) for s in states[2 * i:2 * i + 2]]
        x, h, c = lstm(x, initial_state=initial, training=training)
        after += [tf.cast(h, tf.float32), tf.cast(c, tf.float32)]
        if f"dropout_{i}" in names:
            x = model.get_layer(f"dropout_{i}")(x, training=training)
    return model.get_layer("logits")(x), tuple(after)


def split_rows(tensors: Sequence[tf.Tensor], parts: int) -> list[tuple[tf.Tensor, ...]]:
    """The tensors cut alike along their first axis (their rows) into `parts` pieces.

    Args:
      tensors: tensors with the same number of rows.
      parts: pieces wanted; the rows are shared out as evenly as they go (a piece may
        have none when the count is known only at run time and is smaller).

    Returns:
      One tuple of `tensors`' pieces per part; [tuple(tensors)] for parts < 2.
    """
    rows = tensors[0].shape[0]
    if parts < 2 or (rows is not None and rows < 2):
        return [tuple(tensors)]
    if rows is not None:
        parts = min(parts, rows)
    else:
        rows = tf.shape(tensors[0])[0]
    sizes = [(rows + parts - 1 - i) // parts for i in range(parts)]
    return list(zip(*(tf.split(t, sizes) for t in tensors), strict=True))


def join_rows(parts: Sequence[Sequence[tf.Tensor]]) -> tuple[tf.Tensor, ...]:
    """The inverse of `split_rows` for per-part tuples of tensors (each part's states):
    each position's pieces put back together along the rows, in order."""
    return tuple(tf.concat(list(pieces), 0) for pieces in zip(*parts))


def metrics(totals: np.ndarray) -> dict[str, float]:
    """Per-token loss and accuracy, and nats and bits per character of the text, from
    [loss sum, correct, tokens, chars] (`loss_sums`; chars = tokens when absent).

    For the char tokenizer a token is a character: loss == nats_per_char.
    """
    loss_sum, correct, count = totals[:3]
    chars = totals[3] if len(totals) > 3 else count
    loss = loss_sum / max(count, 1)
    per_char = loss_sum / max(chars, 1)
    return {"loss": loss, "accuracy": correct / max(count, 1), "nats_per_char": per_char,
            "bpc": per_char / math.log(2)}


def loss_sums(y: tf.Tensor, logits: tf.Tensor, objective: str = "sequence",
              skip_oov: bool = False, token_chars: np.ndarray | None = None
              ) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-target losses and the stacked [loss sum, correct, count, chars] of a batch.

    Args:
      y: target ids, (batch, time), or (batch,) for the 'last' objective.
      logits: (batch, time, vocab) float32.
      objective: 'last' scores only the final position.
      skip_oov: leave out targets that are the out-of-vocabulary id (text
        characters the model never saw); they are not counted either. Targets
        below 0 (evaluation padding) are always left out.
      token_chars: characters of the text each id covers (`Tokenizer.token_chars`),
        so a token's loss is spread over its characters; None: one per token.

    Returns:
      (losses shaped like y, [loss sum, correct, count, chars] float32).
    """
    if objective == "last":
        logits = logits[:, -1]
    # Targets of padding rows (window_pipeline.IGNORE, < 0) count as nothing.
    valid = y >= 0
    if skip_oov:
        valid &= tf.not_equal(y, OOV_ID)
    weight = tf.cast(valid, tf.float32)
    y = tf.maximum(y, 0)
    losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True) * weight
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32)
    count = tf.reduce_sum(weight)
    chars = (count if token_chars is None
             else tf.reduce_sum(tf.gather(tf.constant(token_chars, tf.float32), y) * weight))
    return losses, tf.stack([tf.reduce_sum(losses), tf.reduce_sum(correct * weight), count,
                             chars])
