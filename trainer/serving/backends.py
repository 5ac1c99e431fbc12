"""Loading a model to serve, behind one stepping interface (`Backend`).

Two kinds of model folder (local or gs://) can be served:
  - a job directory (config.json, vocab.json, best.json + weights): sampled by
    `trainer.sampling.sampler.Sampler`, its step loop compiled with XLA;
  - a SavedModel from `trainer.export`: its `begin`/`advance` signatures run the
    same sampling graph (without XLA), its assets.extra/ gives the tokenizer
    (vocab.json, and tokenizer.json for a word or bpe model).

Either way the job's tokenizer encodes prompts and decodes the ids drawn, in Python:
a char SavedModel takes prompt text, a word or bpe one takes ids.

Both give the same text for the same prompt, seed and settings, so the batcher
(`trainer.serving.batcher`) never needs to know which one it drives.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import job_loader, storage
from trainer.data import tokenization
from trainer.data.tokenization import Tokenizer
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError
from trainer.sampling.next_char import Rule
from trainer.sampling.sampler import Sampler
from trainer.sampling.saved_model import EXTRA_DIR
from trainer.sampling.scoring import Scores, score_piece, score_rows
from trainer.serving.request import RequestError


class Backend:
    """The model as the batcher sees it: begin rows, then advance them a block at a time.

    Attributes:
      tokenizer: the model's tokenizer (prompts are checked and encoded with it, and the
        ids drawn decoded).
      info: what /info tells about the model (name, path, kind, checkpoint, best, config).
      pad_batches: whether every batch size compiles apart, so batches are worth
        padding to a few sizes.
    """

    tokenizer: Tokenizer
    info: dict[str, Any]
    pad_batches = False

    def begin(self, prompts: Sequence[np.ndarray]) -> tuple[Any, tuple]:
        """Feeds encoded prompts.

        Args:
          prompts: id arrays (`EncodedPrompt.ids`), one per row.

        Returns:
          (logits, states): (batch, ...) tensors whose rows the batcher may gather
          and concatenate.
        """
        raise NotImplementedError

    def advance(self, logits: Any, states: tuple, n: int, step0: np.ndarray, seeds: np.ndarray,
                rows: dict[str, np.ndarray], rule: Rule) -> tuple[np.ndarray, Any, tuple]:
        """Draws `n` more tokens per row (arguments as for `Sampler.advance`).

        Returns:
          (ids (batch, n) NumPy, logits, states).
        """
        raise NotImplementedError

    def score(self, rows: Sequence[np.ndarray]) -> list[Scores]:
        """The model's log-probability of each id after those before it (`Sampler.score`).

        Args:
          rows: id arrays, one per row.

        Returns:
          One `Scores` per row.

        Raises:
          RequestError: when this model cannot score (`check_score`).
        """
        raise NotImplementedError

    def score_from(self, row: np.ndarray, states: np.ndarray | None
                   ) -> tuple[Scores, np.ndarray] | None:
        """`score` of one row that continues a text from its packed states
        (`Sampler.score_from`), or None when this model cannot (an export from before
        its `score_from` signature): the caller then scores the whole text again.

        Returns:
          (the row's `Scores`, the packed states where the next piece starts) or None.
        """
        return None

    def check_score(self) -> None:
        """Raises RequestError when `score` cannot work (a SavedModel exported before it)."""

    @property
    def can_score(self) -> bool:
        """Whether `score` works."""
        try:
            self.check_score()
        except RequestError:
            return False
        return True


class SamplerBackend(Backend):
    """A Keras model from a job directory, stepped through `Sampler.begin`/`advance`."""

    def __init__(self, sampler: Sampler, info: dict[str, Any]):
        """Serves `sampler`'s model, described by `info`."""
        self.sampler, self.tokenizer, self.info = sampler, sampler.tokenizer, info
        # Under XLA every batch size compiles apart.
        self.pad_batches = sampler.jit_compile

    def begin(self, prompts):
        return self.sampler.begin(prompts)

    def advance(self, logits, states, n, step0, seeds, rows, rule):
        ids, logits, states, _ = self.sampler.advance(logits, states, n, step0, seeds, rows, rule)
        return ids, logits, states

    def score(self, rows):
        return self.sampler.score(rows)

    def score_from(self, row, states):
        return self.sampler.score_from(row, states)


class SavedModelBackend(Backend):
    """An exported SavedModel, through its `begin` and `advance` signatures."""

    def __init__(self, loaded: Any, tokenizer: Tokenizer, info: dict[str, Any],
                 max_length: int = 0):
        """Serves `loaded` (from `tf.saved_model.load`), whose tokenizer is `tokenizer`;
        `max_length`: the most ids its `advance` draws per call (the export's
        --max_length), 0 for no limit."""
        self._max_length = max_length
        self._begin = loaded.signatures["begin"]
        self._advance = loaded.signatures["advance"]
        # Exports from before log-probabilities have no `score`.
        self._score = loaded.signatures.get("score")
        self._score_from = loaded.signatures.get("score_from")
        self._loaded = loaded  # Keeps the variables alive.
        self.tokenizer, self.info = tokenizer, info
        self._text_in = tokenizer.kind == "char"

    def begin(self, prompts):
        if self._text_in:
            # The graph encodes text itself; the ids were checked against vocab.json already.
            texts = [self.tokenizer.decode(p.tolist()) if len(p) else "" for p in prompts]
            out = self._begin(prompts=tf.constant(texts, tf.string))
        else:
            # Ids padded with 0 at the end (an empty row starts from a newline there).
            ids = np.zeros((len(prompts), max(1, *(len(p) for p in prompts))), np.int32)
            for i, p in enumerate(prompts):
                ids[i, :len(p)] = p
            out = self._begin(ids=tf.constant(ids))
        return out["logits"], (out["states"],)

    def advance(self, logits, states, n, step0, seeds, rows, rule):
        # An export draws at most its --max_length ids per call: a longer block is drawn in
        # several calls, each continuing the rows' step counts, so the text is the same.
        settings = {k: tf.constant(v) for k, v in rows.items()}
        drawn, step0, seeds = [], np.asarray(step0, np.int32), tf.constant(seeds, tf.int64)
        while True:
            k = min(n, self._max_length) if self._max_length else n
            out = self._advance(logits=logits, states=states[0], n=tf.constant(k, tf.int32),
                                steps=tf.constant(step0), seeds=seeds, **settings)
            drawn.append(out["ids"].numpy())
            logits, states = out["logits"], (out["states"],)
            n, step0 = n - k, step0 + k
            if n <= 0:
                return np.concatenate(drawn, axis=1), logits, states

    def check_score(self):
        if self._score is None:
            raise RequestError("this SavedModel was exported without log-probabilities (no "
                               "'score' signature): export it again with this version's "
                               "trainer.export, or leave logprobs out")

    def score(self, rows):
        self.check_score()

        def run(ids: np.ndarray) -> list[np.ndarray]:
            out = self._score(ids=tf.constant(ids))
            return [out[k].numpy() for k in ("logprobs", "top_ids", "top_logprobs")]

        return score_rows(rows, self.tokenizer.size, run)

    def score_from(self, row, states):
        if self._score_from is None:
            return None

        def run(ids: tf.Tensor, states: tf.Tensor) -> list[tf.Tensor]:
            out = self._score_from(ids=ids, states=states)
            return [out[k] for k in ("logprobs", "top_ids", "top_logprobs", "states")]

        return score_piece(row, states, self.tokenizer.size, run)


def _job_info(path: str, cfg: Any, pointer: dict[str, Any]) -> dict[str, Any]:
    return {"name": os.path.basename(path.rstrip("/")) or path, "path": path, "kind": "job dir",
            "checkpoint": pointer.get("weights"),
            "best": {k: pointer[k] for k in ("epoch", "step", "monitor", "value") if k in pointer},
            "config": json.loads(cfg.to_json())}


def _safe_name(name: str, folder: str) -> str:
    """`name` if it is one plain path component; a bucket may hold `..` or `a\\b` names."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or name != os.path.basename(name):
        raise UserError(f"{folder} holds an object named {name[:80]!r}, which would land "
                        "outside the download folder; refusing to load it")
    return name


def _download(remote: str, local: str) -> None:
    """Copies a gs:// folder tree (a SavedModel) to a local folder through `storage`."""
    for name in storage.listdir(remote):
        path = storage.join(remote, name)
        target = os.path.join(local, _safe_name(name, remote))
        children = storage.listdir(path)
        if children:
            _download(path, target)
        else:
            storage.copy_file(path, target)


def load_within(seconds: float, path: str, checkpoint: str | None = None,
                jit_compile: bool = True) -> Backend:
    """`load_backend`, or one UserError if it has not finished within `seconds`.

    A bucket that answers 5xx is retried by the storage library for minutes; the
    server should say so and stop instead. The loading thread is abandoned (it is a
    daemon: the process exits without it).

    Args:
      seconds: the bound; 0: none.
      path: as for `load_backend`.
      checkpoint: as for `load_backend`.
      jit_compile: as for `load_backend`.

    Returns:
      The backend.

    Raises:
      UserError: past the bound, or as `load_backend` raises.
    """
    if not seconds:
        return load_backend(path, checkpoint, jit_compile)
    result: list[Any] = []

    def load() -> None:
        try:
            result.append(load_backend(path, checkpoint, jit_compile))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread.
            result.append(err)

    thread = threading.Thread(target=load, name="load-model", daemon=True)
    thread.start()
    thread.join(seconds)
    if not result:
        raise UserError(f"could not load {path} within {seconds:g} s (--load_seconds); "
                        "is its storage reachable?")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def load_backend(path: str, checkpoint: str | None = None, jit_compile: bool = True) -> Backend:
    """Loads a job directory or an exported SavedModel (local or gs://) for serving.

    Args:
      path: the job directory or the SavedModel's folder.
      checkpoint: for a job directory, a weights file to serve instead of the best one.
      jit_compile: for a job directory, compile the sampling loop with XLA.

    Returns:
      The backend for the batcher.

    Raises:
      UserError: when `path` is neither, or cannot be read.
    """
    path = path.rstrip("/")
    if not storage.exists(storage.join(path, "saved_model.pb")):
        for name, kind in (("model.onnx", "an ONNX export"), ("charmodel.js", "a web page")):
            if storage.exists(storage.join(path, name)):
                raise UserError(f"{path} holds {kind} (trainer.export --format=...), which "
                                "this server does not load: serve its job directory or a "
                                "SavedModel export")
        cfg, tokenizer, model, pointer = job_loader.load_job(path, checkpoint)
        return SamplerBackend(Sampler(model, tokenizer, jit_compile=jit_compile),
                              _job_info(path, cfg, pointer))
    if not storage.is_gcs(path):
        return _load_saved_model(path, path)
    # tf.saved_model.load reads local files; `storage` is the one module for buckets.
    with tempfile.TemporaryDirectory(prefix="char-lstm-savedmodel-") as local:
        _download(path, local)
        return _load_saved_model(path, local)


def _load_saved_model(path: str, local: str) -> SavedModelBackend:
    try:
        vocab = Vocabulary.load(os.path.join(local, EXTRA_DIR, "vocab.json"))
        with open(os.path.join(local, EXTRA_DIR, "model.json"), encoding="utf-8") as f:
            model_info = json.load(f)
        kind = model_info.get("tokenizer") or model_info.get("config", {}).get("tokenizer")
        tokenizer = tokenization.load(kind or "char", vocab,
                                      lambda name: _read_or_none(local, name),
                                      f"{path}/{EXTRA_DIR}")
    except FileNotFoundError as err:
        raise UserError(f"{path} is a SavedModel without {EXTRA_DIR}/vocab.json and "
                        "model.json; export it again with this version's trainer.export"
                        ) from err
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: {EXTRA_DIR}/vocab.json or model.json is malformed "
                        f"({type(err).__name__})") from err
    loaded = tf.saved_model.load(local)
    if "advance" not in loaded.signatures:
        raise UserError(f"{path} has no 'advance' signature; export it again")
    checkpoint = model_info.get("checkpoint")
    info = {"name": os.path.basename(path), "path": path, "kind": "SavedModel",
            "checkpoint": os.path.basename(checkpoint) if isinstance(checkpoint, str) else None,
            "best": model_info.get("best", {}), "config": model_info.get("config", {})}
    if tokenizer.kind == "bpe" and _unmasked(loaded, info["config"]):
        logging.warning("%s was exported before bpe graphs kept each row's UTF-8 state: it "
                        "may draw bytes that form no character (U+FFFD in the text); export "
                        "it again with this version's trainer.export", path)
    limit = model_info.get("max_length")
    backend = SavedModelBackend(loaded, tokenizer, info,
                                limit if isinstance(limit, int) and limit > 0 else 0)
    if not backend.can_score:
        logging.info("%s was exported without a 'score' signature: completions with "
                     "logprobs get 400 (export it again to have them)", path)
    return backend


def _unmasked(loaded: Any, config: dict[str, Any]) -> bool:
    """Whether a bpe SavedModel's states lack the UTF-8 column (an export from before it)."""
    layers, units = config.get("num_layers"), config.get("rnn_units")
    width = loaded.signatures["begin"].structured_outputs["states"].shape[-1]
    return isinstance(layers, int) and isinstance(units, int) and width == 2 * layers * units


def _read_or_none(local: str, name: str) -> str | None:
    try:
        with open(os.path.join(local, EXTRA_DIR, name), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
