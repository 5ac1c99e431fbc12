"""One character step of the model, outside Keras: the weights and the math both exports use.

The web page (`trainer.sampling.web_export`) and the ONNX file
(`trainer.sampling.onnx_export`) run the model one character at a time with the
state carried by the caller, as `Sampler` does. Both take the trained layers'
weights in Keras's own layout and repeat the LSTMCell arithmetic:

    z = x @ kernel + h @ recurrent_kernel + bias     (gates in the order i, f, c, o)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(c_gate)
    h' = sigmoid(o) * tanh(c')

with the embedding row of the input id as the first layer's x, each layer's h'
as the next layer's x, and `h' @ logits_kernel + logits_bias` as the logits.
Dropout is off at inference, so it has no place here. `write_folder` writes
either export's files.
"""

from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from trainer import models, storage


class LayerWeights(NamedTuple):
    """One LSTM layer's weights, float32, in Keras's layout."""

    kernel: np.ndarray  # (inputs, 4 * units)
    recurrent_kernel: np.ndarray  # (units, 4 * units)
    bias: np.ndarray  # (4 * units,)


class StepWeights(NamedTuple):
    """Everything one step needs, float32 NumPy arrays."""

    embedding: np.ndarray  # (vocab, embedding_dim)
    lstms: list[LayerWeights]  # bottom to top
    logits_kernel: np.ndarray  # (units of the top layer, vocab)
    logits_bias: np.ndarray  # (vocab,)

    @property
    def units(self) -> list[int]:
        """Each layer's units, bottom to top."""
        return [layer.recurrent_kernel.shape[0] for layer in self.lstms]


def state_names(weights: StepWeights) -> list[str]:
    """The carried state's names, bottom layer first: ["h0", "c0", "h1", "c1", ...]."""
    return [f"{part}{i}" for i in range(len(weights.lstms)) for part in "hc"]


def step_weights(model: keras.Model) -> StepWeights:
    """Copies the trained layers' weights out of a model from `models.build_model`.

    Args:
      model: the model; its embedding, lstm_* and logits layers are read.

    Returns:
      The weights as float32 arrays (mixed-precision models keep float32 variables).
    """
    def f32(variable) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(variable), np.float32)

    lstms = [LayerWeights(f32(layer.cell.kernel), f32(layer.cell.recurrent_kernel),
                          f32(layer.cell.bias)) for layer in models.lstm_layers(model)]
    dense = model.get_layer("logits")
    return StepWeights(f32(model.get_layer("embedding").embeddings), lstms,
                       f32(dense.kernel), f32(dense.bias))


def step_function(weights: StepWeights) -> tf.types.experimental.PolymorphicFunction:
    """A tf.function for one step: (ids, h0, c0, h1, c1, ...) -> logits and the new state.

    The weights become variables the function captures, which converters such as
    tf2onnx freeze into constants.

    Args:
      weights: from `step_weights`.

    Returns:
      A tf.function with the input signature ids int32 (batch,) and each state
      float32 (batch, units), named as `state_names` gives them; it returns a
      dict of "logits" (batch, vocab), the raw logits, and "<name>_out" for each state.
    """
    embedding = tf.Variable(weights.embedding, trainable=False)
    lstms = [[tf.Variable(w, trainable=False) for w in layer] for layer in weights.lstms]
    dense = [tf.Variable(weights.logits_kernel, trainable=False),
             tf.Variable(weights.logits_bias, trainable=False)]
    names = state_names(weights)
    signature = [tf.TensorSpec([None], tf.int32, name="ids")] + [
        tf.TensorSpec([None, weights.units[i // 2]], tf.float32, name=name)
        for i, name in enumerate(names)]

    @tf.function(input_signature=signature, autograph=False)
    def step(ids: tf.Tensor, *states: tf.Tensor) -> dict[str, tf.Tensor]:
        x = tf.gather(embedding, ids)
        out = {}
        for i, (kernel, recurrent, bias) in enumerate(lstms):
            h, c = states[2 * i], states[2 * i + 1]
            z = tf.matmul(x, kernel) + tf.matmul(h, recurrent) + bias
            gate_i, gate_f, gate_c, gate_o = tf.split(z, 4, axis=1)
            c = tf.sigmoid(gate_f) * c + tf.sigmoid(gate_i) * tf.tanh(gate_c)
            x = tf.sigmoid(gate_o) * tf.tanh(c)
            out[f"h{i}_out"], out[f"c{i}_out"] = x, c
        out["logits"] = tf.matmul(x, dense[0]) + dense[1]
        return out

    # The variables live as long as the function: it holds them through its closure.
    return step


def keras_step(model: keras.Model, ids: np.ndarray, states: list[np.ndarray]
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """One step through the model's own Keras layers, the reference the exports are checked on.

    Args:
      model: a model from `models.build_model`.
      ids: (batch,) int ids.
      states: (h, c) of every layer, flattened bottom first, float32 (batch, units).

    Returns:
      (raw logits (batch, vocab), the new states), NumPy float32.
    """
    x = model.get_layer("embedding")(tf.constant(ids, tf.int32))
    new_states = []
    for i, layer in enumerate(models.lstm_layers(model)):
        x, (h, c) = layer.cell(x, [tf.constant(states[2 * i]), tf.constant(states[2 * i + 1])],
                               training=False)
        new_states += [np.asarray(h, np.float32), np.asarray(c, np.float32)]
    logits = model.get_layer("logits")(x)
    return np.asarray(logits, np.float32), new_states


# Every file a web or ONNX export may write: --overwrite replaces these and leaves
# anything else the folder holds.
EXPORT_FILES = ("index.html", "charmodel.js", "tokenizer.js", "model.js", "vocab.json",
                "tokenizer.json", "model.onnx", "model.json")


def write_folder(files: dict[str, str | bytes], export_dir: str, last: str) -> None:
    """Writes named files into `export_dir` (local or gs://).

    They are written locally and uploaded as files rather than as strings: Cloud
    Storage then gives each object the content type its extension implies
    (text/html for index.html), which a bucket website serves it with.

    Replacing an export (--overwrite), `last` (the file that names the others: the
    page, model.json) is uploaded last, and the earlier export's files that the new
    one lacks go only after every new file is in place. Nothing else the folder
    holds is touched: only names in `EXPORT_FILES`.

    Args:
      files: file name -> contents; text is written as UTF-8.
      export_dir: the destination folder.
      last: the name of `files` uploaded last.
    """
    if set(files) - set(EXPORT_FILES):
        raise ValueError(f"not export files: {sorted(set(files) - set(EXPORT_FILES))}")
    before = set(storage.listdir(export_dir)) & set(EXPORT_FILES)
    with tempfile.TemporaryDirectory() as tmp:
        for name, contents in files.items():
            data = contents.encode("utf-8") if isinstance(contents, str) else contents
            folder = tmp if name == last else os.path.join(tmp, "first")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        storage.upload_dir(os.path.join(tmp, "first"), export_dir)
        storage.copy_file(os.path.join(tmp, last), storage.join(export_dir, last))
    for stale in sorted(before - set(files)):
        path = storage.join(export_dir, stale)
        storage.delete_prefix(path)
        storage.delete(path)
