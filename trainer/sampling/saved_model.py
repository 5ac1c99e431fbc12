"""The exported SavedModel: the model, its tokenizer and the sampling loop as one module.

`trainer.export` is the entrypoint that writes it; `trainer.serving.backends` loads it
(its `begin`/`advance` signatures, and `score`/`score_from` for log-probabilities). What the
signatures take and return is
described in trainer/export.py.

A char model's graph encodes prompt text and decodes the text drawn itself
(`CharGenerator`). Words and byte-level BPE cannot be split by graph ops, so a word
or bpe model's graph takes and returns ids (`TokenGenerator`), and its
assets.extra/ carries tokenizer.json beside vocab.json for whoever calls it.

A bpe model's graph masks every id whose bytes cannot continue a row's text as valid
UTF-8, as `Sampler` does (`trainer.sampling.utf8`); the `states` tensor of its
`begin`/`advance` signatures then holds each row's UTF-8 state (0..7, as float32) in a
last column after the layers' (h, c).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import keras
import tensorflow as tf

from trainer import storage
from trainer.data import tokenization
from trainer.data.vocabulary import OOV_ID, Vocabulary
from trainer.errors import UserError
from trainer.sampling import scoring
from trainer.sampling.next_char import MIN_TEMPERATURE, Rule
from trainer.sampling.sampler import Sampler, start_id

REPLACEMENT_CHAR = 0xFFFD
# Extra files beside the graph, in TF Serving's folder for them.
EXTRA_DIR = "assets.extra"


class _Generator(tf.Module):
    """What both modules share: the model, the sampling loop and its `advance` step."""

    def __init__(self, model: keras.Model, tokenizer: tokenization.Tokenizer, max_length: int,
                 name: str):
        super().__init__(name=name)
        # Attribute assignment tracks the model's variables for tf.saved_model.save.
        self.model = model
        self._sampler = Sampler(model, tokenizer)
        self._start = start_id(tokenizer)
        self._max_length = max_length

    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.float32, name="logits"),
        tf.TensorSpec([None, None], tf.float32, name="states"),
        tf.TensorSpec([], tf.int32, name="n"),
        tf.TensorSpec([None], tf.int32, name="steps"),
        tf.TensorSpec([None], tf.int64, name="seeds"),
        tf.TensorSpec([None], tf.float32, name="temperature"),
        tf.TensorSpec([None], tf.int32, name="top_k"),
        tf.TensorSpec([None], tf.float32, name="top_p")])
    def advance(self, logits: tf.Tensor, states: tf.Tensor, n: tf.Tensor, steps: tf.Tensor,
                seeds: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor
                ) -> dict[str, tf.Tensor]:
        """Draws `n` more ids per row, each row with its own step index, seed and settings."""
        ids, logits, parts = self._sampler.steps(
            logits, self._unpack(states), tf.clip_by_value(n, 0, self._max_length), steps,
            seeds, temperature, top_k, top_p, rule=Rule.everything())
        return {"ids": ids, "logits": logits, "states": self._pack(parts)}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])
    def score(self, ids: tf.Tensor) -> dict[str, tf.Tensor]:
        """The model's log-probability of each id after those before it, and the likeliest
        ids at each position (rows right-padded; see `scoring.scores`)."""
        logprobs, top_ids, top_logprobs = scoring.scores(self._sampler, ids)
        return {"logprobs": logprobs, "top_ids": top_ids, "top_logprobs": top_logprobs}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids"),
                                  tf.TensorSpec([None, None], tf.float32, name="states")])
    def score_from(self, ids: tf.Tensor, states: tf.Tensor) -> dict[str, tf.Tensor]:
        """`score` of rows that continue a text from its packed states, and the states
        after all but each row's last id (see `scoring.scores_from`)."""
        out = scoring.scores_from(self._sampler, ids, states)
        return dict(zip(("logprobs", "top_ids", "top_logprobs", "states"), out))

    def _pack(self, states: tuple[tf.Tensor, ...]) -> tf.Tensor:
        """The sampler's states as one (batch, width) tensor: the layers' (h, c) side by
        side, then a bpe model's UTF-8 state as one float32 column."""
        if self._sampler.utf8 is None:
            return tf.concat(states, axis=1)
        return tf.concat([*states[:-1], tf.cast(states[-1], tf.float32)[:, None]], axis=1)

    def _unpack(self, states: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """`_pack`'s tensor back into the sampler's states."""
        layers = len(self._sampler.lstms) * 2
        if self._sampler.utf8 is None:
            return tuple(tf.split(states, layers, axis=1))
        return (*tf.split(states[:, :-1], layers, axis=1), tf.cast(states[:, -1], tf.int32))

    def _draw(self, ids: tf.Tensor, mask: tf.Tensor, length: tf.Tensor,
              temperature: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """`length` ids per row after the left-padded prompts (row i seeded seed + i)."""
        logits, states = self._sampler.feed(ids, mask)
        batch = tf.shape(ids)[0]
        # Row i draws with seed + i, as Sampler does for one int seed; a temperature
        # of 0 or less is greedy.
        temperature = tf.where(temperature > 0, tf.maximum(temperature, MIN_TEMPERATURE), 0.0)
        ids, _, _ = self._sampler.steps(
            logits, states, tf.clip_by_value(length, 0, self._max_length),
            tf.zeros([batch], tf.int32), seed + tf.range(tf.cast(batch, tf.int64)),
            tf.fill([batch], temperature), tf.zeros([batch], tf.int32), tf.ones([batch]),
            rule=Rule(any_greedy=True))
        return ids

    def _left_pad(self, ids: tf.RaggedTensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Ragged prompt ids (out-of-vocabulary ids dropped) -> left-padded (ids, mask),
        an empty row becoming the start id, as `pad_prompts` builds them."""
        ids = tf.ragged.boolean_mask(ids, ids != OOV_ID)
        empty = tf.cast(ids.row_lengths() == 0, tf.int64)
        starts = tf.RaggedTensor.from_row_lengths(
            tf.fill([tf.reduce_sum(empty)], self._start), empty)
        ids = tf.concat([starts, ids], axis=1)
        lengths = ids.row_lengths()
        right = ids.to_tensor(OOV_ID)
        # Reversing each row's ids, then the whole padded row, moves the padding left.
        left = tf.reverse(tf.reverse_sequence(right, lengths, seq_axis=1, batch_axis=0), [1])
        mask = tf.reverse(tf.sequence_mask(lengths, tf.shape(right)[1]), [1])
        return left, mask


class CharGenerator(_Generator):
    """A char model, its vocabulary and the sampling loop: text in, text out."""

    def __init__(self, model: keras.Model, vocab: Vocabulary, max_length: int = 10_000):
        """Wraps a trained model for export.

        Args:
          model: from `models.build_model`, with trained weights.
          vocab: the model's vocabulary.
          max_length: the largest `length` a request may ask for.
        """
        super().__init__(model, vocab, max_length, "char_generator")
        points = [ord(c) for c in vocab.chars]
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(points, tf.int32), tf.range(1, len(points) + 1, dtype=tf.int32)),
            default_value=OOV_ID)
        # Id -> code point; the out-of-vocabulary id (never generated) maps to U+FFFD.
        self.code_points = tf.constant([REPLACEMENT_CHAR] + points, tf.int32)
        self._lowercase = vocab.lowercase

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="prompts"),
        tf.TensorSpec([], tf.int32, name="length"),
        tf.TensorSpec([], tf.float32, name="temperature")])
    def serve(self, prompts: tf.Tensor, length: tf.Tensor, temperature: tf.Tensor
              ) -> dict[str, tf.Tensor]:
        """Continues each prompt with `length` sampled chars (fresh randomness per call)."""
        seed = tf.random.uniform([], maxval=2**62, dtype=tf.int64)
        return self._generate(prompts, length, temperature, seed)

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="prompts"),
        tf.TensorSpec([], tf.int32, name="length"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int64, name="seed")])
    def generate_seeded(self, prompts: tf.Tensor, length: tf.Tensor, temperature: tf.Tensor,
                        seed: tf.Tensor) -> dict[str, tf.Tensor]:
        """Like `serve`, but the same seed gives the same text (and equals `Sampler`'s)."""
        return self._generate(prompts, length, temperature, seed)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")])
    def begin(self, prompts: tf.Tensor) -> dict[str, tf.Tensor]:
        """Feeds the prompts; returns the logits for the first char and the packed state."""
        logits, states = self._sampler.feed(*self._encode(prompts))
        return {"logits": logits, "states": self._pack(states)}

    def _generate(self, prompts: tf.Tensor, length: tf.Tensor, temperature: tf.Tensor,
                  seed: tf.Tensor) -> dict[str, tf.Tensor]:
        ids = self._draw(*self._encode(prompts), length, temperature, seed)
        text = tf.strings.unicode_encode(tf.gather(self.code_points, ids), "UTF-8")
        return {"generated": text}

    def _encode(self, prompts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Prompt strings -> left-padded (ids, mask), as `pad_prompts` builds them.

        This repeats `encode_prompt` (with oov="skip") and `pad_prompts` in graph
        ops rather than calling them: a server of the SavedModel runs the graph
        alone, without this package's Python. The tests check that both agree.
        """
        text = tf.strings.regex_replace(prompts, "\r\n", "\n")
        if self._lowercase:
            text = tf.strings.lower(text, encoding="utf-8")
        points = tf.strings.unicode_decode(text, "UTF-8", errors="replace")
        return self._left_pad(tf.ragged.map_flat_values(self.table.lookup, points))


class TokenGenerator(_Generator):
    """A word or bpe model and the sampling loop: ids in, ids out.

    The caller encodes prompts and decodes the ids with assets.extra/tokenizer.json
    (see trainer/export.py); ids are padded with 0, which is never a prompt's id.
    """

    def __init__(self, model: keras.Model, tokenizer: tokenization.Tokenizer,
                 max_length: int = 10_000):
        """Wraps a trained model for export.

        Args:
          model: from `models.build_model`, with trained weights.
          tokenizer: the model's word or bpe tokenizer.
          max_length: the largest `length` (in tokens) a request may ask for.
        """
        super().__init__(model, tokenizer, max_length, "token_generator")

    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="ids"),
        tf.TensorSpec([], tf.int32, name="length"),
        tf.TensorSpec([], tf.float32, name="temperature")])
    def serve(self, ids: tf.Tensor, length: tf.Tensor, temperature: tf.Tensor
              ) -> dict[str, tf.Tensor]:
        """Continues each row of prompt ids with `length` sampled ids (fresh randomness)."""
        seed = tf.random.uniform([], maxval=2**62, dtype=tf.int64)
        return {"generated_ids": self._draw(*self._encode(ids), length, temperature, seed)}

    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="ids"),
        tf.TensorSpec([], tf.int32, name="length"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int64, name="seed")])
    def generate_seeded(self, ids: tf.Tensor, length: tf.Tensor, temperature: tf.Tensor,
                        seed: tf.Tensor) -> dict[str, tf.Tensor]:
        """Like `serve`, but the same seed gives the same ids (and equals `Sampler`'s)."""
        return {"generated_ids": self._draw(*self._encode(ids), length, temperature, seed)}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])
    def begin(self, ids: tf.Tensor) -> dict[str, tf.Tensor]:
        """Feeds the prompts' ids; returns the logits for the first token and the state."""
        logits, states = self._sampler.feed(*self._encode(ids))
        return {"logits": logits, "states": self._pack(states)}

    def _encode(self, ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Rows of ids padded with 0 -> left-padded (ids, mask), as `pad_prompts` builds them."""
        return self._left_pad(tf.RaggedTensor.from_tensor(ids))


def export(model: keras.Model, tokenizer: tokenization.Tokenizer, export_dir: str,
           max_length: int = 10_000, overwrite: bool = False,
           info: dict[str, Any] | None = None, vocab_json: str | None = None) -> str:
    """Writes the SavedModel to `export_dir` (local or gs://) through `storage`.

    Args:
      model: a trained model from `models.build_model`.
      tokenizer: its tokenizer (a `Vocabulary` for a char model).
      export_dir: the destination folder.
      max_length: the largest `length` a request may ask for (tokens).
      overwrite: replace a SavedModel already in `export_dir`.
      info: what assets.extra/model.json tells a server about the model (config, best).
      vocab_json: the job's vocab.json, for assets.extra/; default: the characters the
        tokenizer holds (a bpe tokenizer holds none: only its `lowercase` then).

    Returns:
      `export_dir`.

    Raises:
      UserError: when `export_dir` already holds a SavedModel and not `overwrite`.
    """
    target = storage.join(export_dir, "saved_model.pb")
    replace = storage.exists(target)
    if replace and not overwrite:
        raise UserError(f"{export_dir} already holds a SavedModel; pass --overwrite "
                        "to replace it, or choose a new version folder")
    kind = tokenizer.kind
    if kind == "char":
        module = CharGenerator(model, tokenizer, max_length)
        vocab_json = vocab_json or tokenizer.to_json()
    else:
        module = TokenGenerator(model, tokenizer, max_length)
        chars = getattr(tokenizer, "chars", Vocabulary((), lowercase=tokenizer.lowercase))
        vocab_json = vocab_json or chars.to_json()
    signatures = {"serving_default": module.serve, "generate_seeded": module.generate_seeded,
                  "begin": module.begin, "advance": module.advance, "score": module.score,
                  "score_from": module.score_from}
    with tempfile.TemporaryDirectory() as tmp:
        # Saved locally, then copied by `storage`, the one module that writes to buckets.
        local = os.path.join(tmp, "saved_model")
        tf.saved_model.save(module, local, signatures=signatures)
        extra = os.path.join(local, EXTRA_DIR)
        os.makedirs(extra)
        with open(os.path.join(extra, "vocab.json"), "w", encoding="utf-8") as f:
            f.write(vocab_json)
        if kind != "char":
            with open(os.path.join(extra, tokenization.FILE), "w", encoding="utf-8") as f:
                f.write(tokenizer.to_json())
        with open(os.path.join(extra, "model.json"), "w", encoding="utf-8") as f:
            json.dump({**(info or {}), "tokenizer": kind, "max_length": max_length}, f,
                      indent=1)
        # The SavedModel it replaces goes only now that the new one is whole.
        if replace and not storage.is_gcs(export_dir):
            _swap_local(local, export_dir)
        else:
            _upload(local, export_dir, replace)
    return export_dir


def _upload(local: str, export_dir: str, replace: bool) -> None:
    """Copies the SavedModel in `local` into `export_dir`, the graph file last, so a
    half-copied folder is never a loadable model; with `replace`, the old graph file
    goes first, and the old files the new model lacks last."""
    target = storage.join(export_dir, "saved_model.pb")
    before = set(storage.listdir(export_dir)) if replace else set()
    if replace:
        storage.delete(target)
    storage.upload_dir(os.path.join(local, "variables"), storage.join(export_dir, "variables"))
    for name in sorted(os.listdir(local)):
        if name not in ("variables", "saved_model.pb"):
            path = os.path.join(local, name)
            if os.path.isdir(path):
                storage.upload_dir(path, storage.join(export_dir, name))
            else:
                storage.copy_file(path, storage.join(export_dir, name))
    storage.copy_file(os.path.join(local, "saved_model.pb"), target)
    for stale in sorted(before - set(os.listdir(local))):
        path = storage.join(export_dir, stale.rstrip("/"))
        storage.delete_prefix(path)
        storage.delete(path)


def _swap_local(local: str, export_dir: str) -> None:
    """Puts the SavedModel in `local` in place of the local folder `export_dir`: copied
    beside it first, then swapped in by two renames."""
    final = os.path.abspath(export_dir)
    parent, name = os.path.dirname(final), os.path.basename(final)
    staged = tempfile.mkdtemp(prefix=f".{name}.new-", dir=parent)
    old = staged.replace(f".{name}.new-", f".{name}.old-")
    try:
        shutil.copytree(local, staged, dirs_exist_ok=True)
        os.rename(final, old)
        os.rename(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(final):
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
