"""Fine-tuning: a new job that starts from another job's best weights (`--init_from`).

The base job's model fields must match this run's (`config.MODEL_FIELDS`), so every
weight has the base's shape except along the vocabulary axis. The vocabulary is the
base's; characters of the new training text that it lacks are added after its own
ids (`Vocabulary.extended`), so every old id keeps its character and its trained
embedding and output rows, and the new ids keep the rows a fresh model was built
with. The optimizer and the schedule start fresh from this job's flags. A word or
bpe base's tokenizer is taken unchanged (its ids cannot move): a word base spells new
words out, and characters it lacks become the unknown-character id.

Only a job that holds no resume checkpoint starts from the base: a resumed
fine-tuning job restores its own checkpoint, keeps its own vocab.json and does not
read the base at all. config.json records where the job started (its "init_from"
entry), and a resumed job keeps that record.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import keras
import numpy as np
from absl import logging

from trainer import checkpoints, job_loader, storage
from trainer.config import Config, incompatibilities
from trainer.data import tokenization
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError

RECORD = "init_from"  # The key of config.json that says where the job started.


@dataclasses.dataclass(frozen=True)
class Base:
    """The job a fine-tuning run starts from: its config, vocabulary and best pointer."""

    job_dir: str
    config: Config
    vocab: Vocabulary
    pointer: dict[str, Any]
    tokenizer: tokenization.Tokenizer


def load_base(cfg: Config, job: checkpoints.JobDir) -> Base | None:
    """Reads the --init_from job's config, vocabulary and best pointer and checks them.

    Args:
      cfg: this run's config (init_from, job_dir and the model fields are read).
      job: this run's job directory.

    Returns:
      The base, or None without --init_from or when the job directory already holds
      resume checkpoints (the job resumes from its own).

    Raises:
      UserError: the base is not a job directory, has no best checkpoint, or its
        model fields differ from this run's (the line names them).
    """
    if not cfg.init_from:
        return None
    if job.read(checkpoints.LATEST) is not None:
        logging.info("--init_from=%s: the job directory holds its own checkpoints; resuming "
                     "from them", cfg.init_from)
        return None
    path = cfg.init_from.rstrip("/")
    if path == cfg.job_dir.rstrip("/"):
        raise UserError("--init_from must name another job directory than --job_dir")
    try:
        config = json.loads(storage.read_text(storage.join(path, "config.json")))
        vocab = Vocabulary.load(storage.join(path, "vocab.json"))
        pointer = json.loads(storage.read_text(storage.join(path, checkpoints.BEST)))
    except FileNotFoundError as err:
        raise UserError(f"--init_from={path} is not a job directory with a best checkpoint "
                        f"({err})") from err
    except ValueError as err:
        raise UserError(f"--init_from={path}: unreadable job files ({err})") from err
    problems = incompatibilities(Config.from_dict(config).to_dict(), cfg)
    if problems:
        raise UserError(f"--init_from={path} holds another model ({'; '.join(problems)}); "
                        "give this run the base's values")
    base_cfg = Config.from_dict(config)
    tok = tokenization.load(base_cfg.tokenizer, vocab,
                            lambda name: _read_optional(storage.join(path, name)),
                            f"--init_from={path}")
    return Base(path, base_cfg, vocab, pointer, tok)


def _read_optional(path: str) -> str | None:
    try:
        return storage.read_text(path)
    except FileNotFoundError:
        return None


def tokenizer(cfg: Config, base: Base, counts: collections.Counter) -> tokenization.Tokenizer:
    """A word or bpe base's tokenizer, unchanged; says what this text has that it lacks.

    Raises:
      UserError: with --init_new_chars=refuse, a word base lacks characters of the text.
    """
    lacking = sorted((c for c in counts if c not in set(base.vocab.chars)), key=ord)
    if lacking and base.tokenizer.kind == "word":
        shown = "".join(lacking[:20])
        if cfg.init_new_chars == "refuse":
            raise UserError(f"the training text has {len(lacking)} character(s) that the "
                            f"vocabulary of --init_from={base.job_dir} lacks ({shown!r})")
        logging.warning("%d character(s) of this text are not in the word vocabulary of %s "
                        "(%r): a word tokenizer cannot add ids, so they are read as the "
                        "unknown-character id", len(lacking), base.job_dir, shown)
    logging.info("tokenizer of %s (%s, %d ids) taken unchanged", base.job_dir,
                 base.config.tokenizer, base.tokenizer.size)
    return base.tokenizer


def vocabulary(cfg: Config, base: Base, counts: collections.Counter) -> Vocabulary:
    """The base's vocabulary, extended by this training text's new characters.

    Args:
      cfg: init_new_chars is read.
      base: from `load_base`.
      counts: the characters of this job's training text and how often each occurs.

    Returns:
      The vocabulary of the job, logged with how many characters were added.

    Raises:
      UserError: with --init_new_chars=refuse, when the text has characters the base
        vocabulary lacks (the line names a few).
    """
    vocab = base.vocab.extended(counts)
    added = vocab.chars[base.vocab.size - 1:]
    if added and cfg.init_new_chars == "refuse":
        shown = "".join(added[:20])
        raise UserError(f"the training text has {len(added)} character(s) that the vocabulary "
                        f"of --init_from={base.job_dir} lacks ({shown!r}"
                        f"{'...' if len(added) > 20 else ''}); pass --init_new_chars=add to "
                        "add them")
    logging.info("vocabulary of %s: %d ids; %d character(s) of this text added after them%s",
                 base.job_dir, base.vocab.size, len(added), f": {''.join(added)!r}" if added
                 else "")
    return vocab


def config_json(cfg: Config, job: checkpoints.JobDir, base: Base | None,
                vocab: Vocabulary) -> str:
    """config.json's text: the config and, for a fine-tuning job, where it started.

    A job that starts from the base records the base's job directory, the weights file
    best.json named and its md5, and how many characters were added. A resumed job
    keeps the record its first run wrote.

    Args:
      cfg: this run's config.
      job: this run's job directory (its saved config.json is read for the record).
      base: from `load_base`; None for a resumed or an ordinary job.
      vocab: the job's vocabulary.

    Returns:
      The JSON text, as `Config.to_json` writes it plus the record.
    """
    values = cfg.to_dict()
    if base is not None:
        pointer, weights = base.pointer, base.pointer["weights"]
        values[RECORD] = {
            "job_dir": base.job_dir, "weights": weights,
            "md5": pointer.get("files", {}).get(weights, {}).get("md5"),
            **{k: pointer.get(k) for k in ("epoch", "step", "monitor", "value")},
            "base_vocab_size": base.vocab.size, "added_chars": vocab.size - base.vocab.size}
    else:
        saved = job.read("config.json")
        kept = json.loads(saved).get(RECORD) if saved else None
        if kept:
            values[RECORD] = kept
    return json.dumps(values, indent=2, sort_keys=True) + "\n"


def load_weights(model: keras.Model, base: Base, vocab: Vocabulary) -> None:
    """Copies the base's best weights into `model`, a fresh model of this job's vocabulary.

    Each weight is copied into the leading corner of the model's: all of it, except for
    the embedding's and the output layer's rows of the added ids, which keep the values
    the fresh model was initialised with.

    Args:
      model: built under the job's strategy for `vocab`; every replica's copy is assigned.
      base: from `load_base`.
      vocab: the job's vocabulary, the base's with any added characters after it.

    Raises:
      UserError: the base's weights cannot be loaded, its best checkpoint changed since
        it was read, or this job's vocabulary does not start with the base's.
    """
    if vocab.chars[:base.vocab.size - 1] != base.vocab.chars:
        raise UserError(f"the job's vocab.json does not start with the vocabulary of "
                        f"--init_from={base.job_dir}; use a new --job_dir")
    _, _, source, pointer = job_loader.load_job(base.job_dir)
    if pointer["weights"] != base.pointer["weights"]:
        raise UserError(f"the best checkpoint of --init_from={base.job_dir} changed while this "
                        "job started (is it still training?); rerun to start from the new one")
    targets, sources = model.weights, source.weights
    if [w.path for w in targets] != [w.path for w in sources]:
        raise UserError(f"the weights of --init_from={base.job_dir} do not match this model's "
                        "layers")
    for target, weight in zip(targets, sources, strict=True):
        value = np.asarray(weight.numpy())
        if tuple(target.shape) != value.shape:
            # Only the vocabulary axis differs: the base's rows first, fresh rows after.
            fresh = np.array(target.numpy())
            fresh[tuple(slice(0, n) for n in value.shape)] = value
            value = fresh
        target.assign(value)
    logging.info("started from %s/%s (epoch %s, %s %s)", base.job_dir, base.pointer["weights"],
                 base.pointer.get("epoch"), base.pointer.get("monitor"),
                 base.pointer.get("value"))
