"""Loading a trained job directory for inference: its config, its tokenizer and a
model with the best (or a named) checkpoint's weights, as generation, evaluation,
export, serving and fine-tuning read it. `trainer.checkpoints` writes what this reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import keras

from trainer import checkpoints, models, storage
from trainer.checkpoints import BEST
from trainer.config import Config
from trainer.data import tokenization
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError


def load_job(job_dir: str, checkpoint: str | None = None
             ) -> tuple[Config, tokenization.Tokenizer, keras.Model, dict[str, Any]]:
    """Loads config, tokenizer and weights from a job directory, for inference.

    Args:
      job_dir: a job directory (local or gs://) written by the training job.
      checkpoint: a weights file name or path; default: the one best.json names.

    Returns:
      (config, the tokenizer the config names (the `Vocabulary` of vocab.json for
      char, the default of a config without one), model with the weights loaded, the
      best pointer or {}).

    Raises:
      UserError: not a job directory, no best checkpoint yet, or unreadable files (a
        truncated or foreign weights file, a hand-edited best.json), in one line.
    """
    try:
        return _load_job(job_dir, checkpoint)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"could not load a model from {job_dir}: "
                        f"{type(err).__name__}: {err}") from err


def read_config(job_dir: str) -> Config:
    """The config a job directory holds, read alone (a door sizes its thread pools from it
    before TensorFlow starts).

    Raises:
      UserError: not a job directory, or an unreadable config.json, in one line.
    """
    path = storage.join(job_dir.rstrip("/"), "config.json")
    try:
        return Config.from_dict(json.loads(storage.read_text(path)))
    except FileNotFoundError as err:
        raise UserError(f"{job_dir.rstrip('/')} is not a job directory: {err}") from err
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"could not load a model from {job_dir}: "
                        f"{type(err).__name__}: {err}") from err


def _load_job(job_dir: str, checkpoint: str | None
              ) -> tuple[Config, tokenization.Tokenizer, keras.Model, dict[str, Any]]:
    job_dir = job_dir.rstrip("/")
    cfg = read_config(job_dir)
    try:
        vocab = Vocabulary.load(storage.join(job_dir, "vocab.json"))
    except FileNotFoundError as err:
        raise UserError(f"{job_dir} is not a job directory: {err}") from err

    def read(name: str) -> str | None:
        try:
            return storage.read_text(storage.join(job_dir, name))
        except FileNotFoundError:
            return None

    vocab = tokenization.load(cfg.tokenizer, vocab, read, job_dir)
    pointer: dict[str, Any] = {}
    if checkpoint is None:
        try:
            pointer = json.loads(storage.read_text(storage.join(job_dir, BEST)))
        except FileNotFoundError as err:
            raise UserError(f"{job_dir} has no best checkpoint yet ({BEST} is missing)") from err
        except ValueError as err:
            raise UserError(f"{storage.join(job_dir, BEST)} is corrupt: {err}") from err
        name = pointer.get("weights") if isinstance(pointer, dict) else None
        # A hand-edited pointer must not make a server open files outside its job dir.
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name
                or "\\" in name):
            raise UserError(f"{storage.join(job_dir, BEST)} must name a weights file inside "
                            f"the job directory, got {str(name)[:80]!r}")
        checkpoint = storage.join(job_dir, name)
    elif "/" not in checkpoint:
        checkpoint = storage.join(job_dir, checkpoint)
    model = models.build_model(cfg, vocab.size)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.weights.h5")
        try:
            storage.copy_file(checkpoint, local)
        except FileNotFoundError as err:
            raise UserError(f"checkpoint {checkpoint} does not exist") from err
        record = pointer.get("files", {}).get(pointer.get("weights"))
        if record and not checkpoints.matches(local, record):
            raise UserError(f"{checkpoint} does not match the size and checksum in {BEST}")
        rows = _embedding_rows(local)
        if rows is not None and rows != vocab.size:
            source = "vocab.json" if cfg.tokenizer == "char" else f"its {tokenization.FILE}"
            raise UserError(f"{checkpoint} holds weights for {rows} ids, but the job's "
                            f"{source} gives {vocab.size}: the files do not belong together "
                            "(copied from another job, or edited?)")
        try:
            model.load_weights(local)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load weights from {checkpoint}: "
                            f"{str(err).splitlines()[0]}") from err
    return cfg, vocab, model, pointer


def _embedding_rows(local: str) -> int | None:
    """The ids a Keras weights file's embedding has (None when it has none to read)."""
    import h5py  # Keras's own dependency for .weights.h5.

    try:
        with h5py.File(local, "r") as f:
            table = f.get("layers/embedding/vars/0")
            return int(table.shape[0]) if table is not None else None
    except OSError:
        return None  # Not an HDF5 file: load_weights says so in its own words.
