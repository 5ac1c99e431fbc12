"""Scoring a model on text, two ways, under any tf.distribute strategy.

Windowed: the text is cut into windows of seq_length inputs (stride
seq_length), each read from a zero state; this is what the training job has
always reported as `val_loss`. Carried: the text is cut into a few long
contiguous lanes (`lane_pipeline.lanes_dataset`) read seq_length chars at a
time, with every LSTM layer's (h, c) carried from one chunk to the next, as
generation uses the model; only each lane's first chunk starts from zero.

Both return sums (loss, correct, count) reduced over the replicas, so any
number of replicas scores the same text alike. The training job (between
epochs) and `trainer.evaluate` (on a job directory) use the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer import models
from trainer.config import Config
from trainer.data import index, lane_pipeline, tokenization, window_pipeline
from trainer.errors import UserError
from trainer.training import distribution

SUM = tf.distribute.ReduceOp.SUM


class Evaluator:
    """Windowed and carried scoring of `model`, compiled once per strategy.

    Args:
      strategy: the strategy the model's variables were created under.
      model: a model from `models.build_model`.
      objective: the job's objective; carried scoring is always 'sequence'.
      skip_oov: leave out-of-vocabulary targets out of the scores.
      token_chars: characters each id covers (`Tokenizer.token_chars`); None: one.
      parts: rows of each batch are cut into this many parts, run side by side
        (`distribution.batch_parts`): with each op on one thread, one forward pass is a
        chain of small products that keeps one core busy; the sums are the same.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 objective: str = "sequence", skip_oov: bool = False, token_chars=None,
                 parts: int = 1):
        self.strategy, self.model = strategy, model

        def windowed(x, y):
            return tf.add_n([models.loss_sums(b, model(a, training=False), objective,
                                              skip_oov, token_chars)[1]
                             for a, b in models.split_rows((x, y), parts)])

        def carried(x, y, states):
            sums, after = [], []
            for a, b, *part in models.split_rows((x, y, *states), parts):
                logits, part = models.run_with_state(model, a, tuple(part), training=False)
                sums.append(models.loss_sums(b, logits, "sequence", skip_oov, token_chars)[1])
                after.append(part)
            return tf.add_n(sums), models.join_rows(after)

        @tf.function
        def windowed_step(x, y):
            return strategy.reduce(SUM, strategy.run(windowed, args=(x, y)), axis=None)

        @tf.function
        def carried_step(x, y, states):
            sums, states = strategy.run(carried, args=(x, y, states))
            return strategy.reduce(SUM, sums, axis=None), states

        self.windowed_step, self.carried_step = windowed_step, carried_step

    def windowed(self, dataset_fn: Callable) -> np.ndarray:
        """[loss sum, correct, count, chars] over the windows of `dataset_fn` (one pass of an
        window_pipeline.dataset per worker)."""
        totals = np.zeros(4)
        for x, y in self.strategy.distribute_datasets_from_function(dataset_fn):
            totals += self.windowed_step(x, y).numpy()
        return totals

    def carried(self, dataset_fn: Callable, batch_size: int) -> np.ndarray:
        """[loss sum, correct, count, chars] over the lanes of `dataset_fn`.

        Args:
          dataset_fn: gives one pass (repeat=False) of an lane_pipeline.lanes_dataset
            per worker, `batch_size` lanes per replica.
          batch_size: lanes per replica.
        """
        totals = np.zeros(4)
        states = distribution.zero_states(self.strategy, self.model, batch_size)
        for x, y, _ in self.strategy.distribute_datasets_from_function(dataset_fn):
            sums, states = self.carried_step(x, y, states)
            totals += sums.numpy()
        return totals


def score_files(paths: Sequence[str], cfg: Config, tok: tokenization.Tokenizer,
                model: keras.Model, batch_size: int = 0,
                strategy: tf.distribute.Strategy | None = None,
                parts: int = 1) -> dict[str, Any]:
    """Scores a model on text files both ways, leaving out-of-vocabulary targets out.

    Args:
      paths: text files (local or gs://), scored as one text in this order.
      cfg: the model's training config (seq_length, lowercase, objective).
      tok: the model's tokenizer (its `Vocabulary` for chars).
      model: the trained model.
      batch_size: windows per batch and lanes for carried scoring; 0 = cfg.batch_size.
        Windowed scoring scores every window; carried scoring drops the remainder
        shorter than one lane step; `chars_scored` and `tokens_scored` say how much
        each scored.
      strategy: default: the current (default) strategy.
      parts: each batch's rows run in this many parts side by side (`Evaluator`).

    Returns:
      {"files", "chars", "tokens", "tokenizer", "oov_chars", "oov_distinct",
      "unknown_words", "windowed": {...}, "carried": {...}}, each mode with
      nats_per_char, bits_per_char (over the characters of the text the scored tokens
      cover), nats_per_token, bits_per_token, perplexity (per token), accuracy,
      chars_scored, tokens_scored.

    Raises:
      UserError: no text, or too little for one window.
    """
    strategy = strategy or tf.distribute.get_strategy()
    corpus = index.build(list(paths), [], lowercase=cfg.lowercase,
                         piece_bytes=cfg.piece_bytes, names=("scored", "scored"))
    index.count_tokens(corpus, tok)
    chars = sum(f.chars for f in corpus.files)
    tokens = sum(sum(f.lengths()) for f in corpus.files)
    lacking = set(tok.missing("".join(corpus.counts)))
    missing = {c: n for c, n in corpus.counts.items() if c in lacking}
    if tokens < cfg.window:
        unit = "chars" if tokens == chars else "tokens"
        raise UserError(f"the text holds {tokens} {unit}, fewer than one window of "
                        f"{cfg.window} (seq_length {cfg.seq_length} + 1); score it "
                        "with a smaller --seq_length, or give more text")
    regions, _ = index.make_regions(corpus, cfg.window)
    windows = sum(window_pipeline.num_windows(r.length, cfg.window, cfg.seq_length)
                  for r in regions)
    batch = max(1, min(batch_size or cfg.batch_size, windows))
    steps = -(-windows // batch)  # The last batch is padded: every window is scored.
    evaluator = Evaluator(strategy, model, cfg.objective, skip_oov=True,
                          token_chars=tokenization.chars_table(tok), parts=parts)
    result: dict[str, Any] = {
        "files": sum(1 for f in corpus.files if f.chars), "chars": chars, "tokens": tokens,
        "tokenizer": tok.kind, "oov_chars": sum(missing.values()),
        "oov_distinct": sorted(missing, key=ord),
        "unknown_words": sum(f.unknown_words for f in corpus.files)}
    unit = "chars" if result["tokenizer"] == "char" else "tokens"
    result["windowed"] = _summary(evaluator.windowed(lambda ctx: window_pipeline.dataset(
        regions, tok, cfg, batch_size=batch, shift=cfg.seq_length, steps=steps,
        shuffle=False, repeat=False)), f"{cfg.seq_length}-{unit[:-1]} windows from a zero state",
        batch=batch)
    # Fewer lanes when each lane's remainder (shorter than one chunk, not scored) would
    # leave more than a tenth of the text out: a --batch_size too large for the text.
    def steps_of(lanes: int) -> int:
        return lane_pipeline.lane_steps(regions, cfg.seq_length, lanes,
                                        window_pipeline.Sharding())

    lanes, text = batch, sum(r.length for r in regions) - 1
    while lanes > 1 and lanes * steps_of(lanes) * cfg.seq_length < 0.9 * text:
        lanes //= 2
    lane_steps = steps_of(lanes)
    if lane_steps:
        carried_cfg = cfg.replace(objective="sequence")
        result["carried"] = _summary(evaluator.carried(
            lambda ctx: lane_pipeline.lanes_dataset(regions, tok, carried_cfg,
                                                     batch_size=lanes, steps=lane_steps,
                                                     repeat=False), lanes),
            f"{lanes} contiguous lane(s), state carried", lanes=lanes)
    return result


def _summary(totals: np.ndarray, how: str, **extra: int) -> dict[str, Any]:
    values = models.metrics(totals)
    return {"nats_per_char": values["nats_per_char"], "bits_per_char": values["bpc"],
            "nats_per_token": values["loss"], "bits_per_token": values["loss"] / math.log(2),
            "perplexity": math.exp(values["loss"]), "accuracy": values["accuracy"],
            "chars_scored": int(round(totals[3])), "tokens_scored": int(totals[2]),
            "how": how, **extra}
