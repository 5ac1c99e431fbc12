"""The ONNX export: one model step as an ONNX graph, with the vocabulary beside it.

    python -m trainer.export --format=onnx --job_dir=runs/shakespeare --export_dir=runs/onnx

writes model.onnx, vocab.json and model.json. The graph has no loop in it, so
any ONNX runtime runs it; the caller carries the state from step to step:

  inputs:  ids int32 (batch,); h0, c0, h1, c1, ... float32 (batch, units)
  outputs: logits float32 (batch, vocab), the raw logits of the next char;
           h0_out, c0_out, ... the state to pass to the next step

Start from zero states, feed the prompt's ids one step at a time, then feed each
drawn id. Id 0 is the out-of-vocabulary id: `Sampler` never draws it, so set its
logit to -inf before choosing. Ids 1..N are vocab.json's "chars" in order;
prompts are normalised as in training (`\\r\\n` -> `\\n`, lowercased when
"lowercase" is true), and an empty prompt starts from a newline's id.

The graph takes ids whatever the tokenizer. A word or bpe model's folder also
holds the job's tokenizer.json (for bpe the `tokenizers` library's file, whose ids
are the model's minus one), and model.json's "tokenizer" says how its ids map
(`token_export.ids_note`). The graph does not sample: a sampler of a bpe model must
itself mask every id whose bytes cannot continue the text as valid UTF-8 (the rule
of `trainer.sampling.utf8`, which the note repeats).

The graph is converted by tf2onnx from `step_model.step_function` and, before
anything is written, one step of it under onnxruntime is compared with the same
step through the trained Keras layers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import keras
import numpy as np

from trainer.data import tokenization
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError
from trainer.sampling import step_model, token_export

# Opset 17 is read by every maintained runtime (onnxruntime, onnxruntime-web, others).
OPSET = 17
MODEL_FILE = "model.onnx"
# Rows and seed of the export-time check: a few different ids and non-zero states.
_CHECK_ROWS = 3
# Largest difference allowed there, relative to the largest magnitude compared.
_CHECK_TOLERANCE = 1e-4


def convert(model: keras.Model) -> bytes:
    """The serialised single-step ONNX model of a trained Keras model.

    Args:
      model: from `models.build_model`, with trained weights.

    Returns:
      The ONNX ModelProto's bytes.

    Raises:
      UserError: when tf2onnx is not installed.
    """
    try:
        import tf2onnx
    except ImportError as err:
        raise UserError("--format=onnx needs tf2onnx and onnxruntime: pip install "
                        "'char-lstm-trainer[export]'") from err
    # Its INFO lines (versions, optimiser passes) would bury the door's one line of output.
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    weights = step_model.step_weights(model)
    step = step_model.step_function(weights)
    proto, _ = tf2onnx.convert.from_function(step, input_signature=step.input_signature,
                                             opset=OPSET)
    # The converter lists the outputs by name (c0_out before logits); put them in the
    # documented order, so `logits, *states = session.run(None, feeds)` holds.
    named = {o.name: type(o)() for o in proto.graph.output}
    for o in proto.graph.output:
        named[o.name].CopyFrom(o)
    del proto.graph.output[:]
    proto.graph.output.extend(named[n] for n in output_names(weights))
    return proto.SerializeToString()


def output_names(weights: step_model.StepWeights) -> list[str]:
    """The graph's outputs, in order: the logits, then each layer's h and c."""
    return ["logits"] + [f"{n}_out" for n in step_model.state_names(weights)]


def check(model: keras.Model, onnx_bytes: bytes, seed: int = 0) -> float:
    """Runs one step under onnxruntime and compares it with the Keras layers' step.

    Args:
      model: the Keras model the ONNX model was converted from.
      onnx_bytes: `convert`'s output.
      seed: for the check's random ids and states.

    Returns:
      The largest relative difference over the logits and every state.

    Raises:
      UserError: when onnxruntime is missing or the two disagree beyond 1e-4.
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise UserError("--format=onnx checks the export with onnxruntime: pip install "
                        "'char-lstm-trainer[export]'") from err
    weights = step_model.step_weights(model)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, weights.embedding.shape[0], _CHECK_ROWS).astype(np.int32)
    states = [rng.uniform(-1, 1, (_CHECK_ROWS, weights.units[i // 2])).astype(np.float32)
              for i in range(2 * len(weights.lstms))]
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = step_model.state_names(weights)
    got = session.run(output_names(weights),
                      {"ids": ids, **dict(zip(names, states, strict=True))})
    logits, new_states = step_model.keras_step(model, ids, states)
    worst = 0.0
    for name, a, b in zip(["logits", *names], got, [logits, *new_states], strict=True):
        scale = max(1.0, float(np.abs(b).max()))
        worst = max(worst, float(np.abs(a - b).max()) / scale)
        if worst > _CHECK_TOLERANCE:
            raise UserError(f"the ONNX model's {name} differ from the Keras model's by "
                            f"{worst:.2g} (relative) in one step; nothing was written")
    return worst


def export(model: keras.Model, vocab: tokenization.Tokenizer, export_dir: str,
           info: dict[str, Any] | None = None, chars: Vocabulary | None = None) -> str:
    """Converts, checks and writes the ONNX export to `export_dir` (local or gs://).

    Args:
      model: a trained model from `models.build_model`.
      vocab: its tokenizer (a `Vocabulary` for a char model).
      export_dir: an empty or missing folder (see `trainer.export`).
      info: what model.json says about the model (config, best checkpoint).
      chars: the job's characters (its vocab.json); default: `vocab`'s own.

    Returns:
      `export_dir`.
    """
    onnx_bytes = convert(model)
    difference = check(model, onnx_bytes)
    weights = step_model.step_weights(model)
    names = step_model.state_names(weights)
    described = {**(info or {}), "format": "onnx", "opset": OPSET,
                 "inputs": ["ids", *names], "outputs": output_names(weights),
                 "units": weights.units, "vocab_size": vocab.size,
                 "checked_relative_difference": difference}
    note = token_export.ids_note(vocab)
    if note is not None:
        described["tokenizer"] = note
    step_model.write_folder({MODEL_FILE: onnx_bytes,
                             "vocab.json": token_export.chars_of(vocab, chars).to_json(),
                             "model.json": json.dumps(described, indent=1),
                             **token_export.files(vocab)}, export_dir, last="model.json")
    return export_dir
