"""Tests for trainer.training.evaluation: both ways of scoring agree with a direct computation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import tensorflow as tf

from trainer import models
from trainer.config import Config
from trainer.data import index, lane_pipeline, tokenization, window_pipeline
from trainer.data.vocabulary import Vocabulary, count_chars
from trainer.training import evaluation


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target], in float64 numpy."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]


@pytest.fixture
def setup(tmp_path):
    rng = random.Random(5)
    paths = []
    for i, n in enumerate([900, 1250]):
        path = tmp_path / f"val-{i}.txt"
        path.write_text("".join(rng.choice("abcde fgh\n") for _ in range(n)))
        paths.append(str(path))
    corpus = index.build(paths, [], lowercase=False, piece_bytes=1 << 20)
    vocab = Vocabulary.from_counts(corpus.counts)
    cfg = Config(seq_length=25, num_layers=2, rnn_units=16, embedding_dim=8, dropout=0.2)
    model = models.build_model(cfg, vocab.size)
    regions, _ = index.make_regions(corpus, 2)
    ids = [vocab.encode(_read(p)).astype(np.int64) for p in paths]
    return cfg, vocab, model, regions, ids


# parts: each batch's rows cut into that many pieces run side by side (2 + 1 + 1 rows of 4
# windows; 2 + 1 lanes of 3, their states put back together between chunks).
@pytest.mark.parametrize("parts", [1, 3])
def test_windowed_scores_equal_each_window_from_a_zero_state(setup, parts):
    cfg, vocab, model, regions, ids = setup
    batch = 4
    windows = [r[s:s + 26] for r in ids for s in range(0, len(r) - 25, 25)]
    steps = len(windows) // batch
    totals = evaluation.Evaluator(tf.distribute.get_strategy(), model, parts=parts).windowed(
        lambda ctx: window_pipeline.dataset(regions, vocab, cfg, batch_size=batch, shift=25,
                                           steps=steps, shuffle=False, repeat=False))
    scored = np.stack(windows[:steps * batch])
    expected = _cross_entropy(np.asarray(model(scored[:, :-1])), scored[:, 1:])
    assert totals[2] == expected.size
    assert totals[0] / totals[2] == pytest.approx(expected.mean(), rel=1e-5)


@pytest.mark.parametrize("parts", [1, 2])
def test_carried_scores_equal_each_lane_read_in_one_go(setup, parts):
    cfg, vocab, model, regions, ids = setup
    text = np.concatenate(ids)
    lanes = 3
    length = len(text) // lanes
    steps = lane_pipeline.lane_steps(regions, 25, lanes, window_pipeline.Sharding())
    totals = evaluation.Evaluator(tf.distribute.get_strategy(), model, parts=parts).carried(
        lambda ctx: lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=lanes,
                                                 steps=steps, repeat=False), lanes)
    # Each lane's text through the whole model at once: one long sequence from zero.
    span = steps * 25
    rows = np.stack([text[i * length:i * length + span + 1] for i in range(lanes)])
    expected = _cross_entropy(np.asarray(model(rows[:, :-1])), rows[:, 1:])
    assert totals[2] == expected.size
    assert totals[0] / totals[2] == pytest.approx(expected.mean(), rel=1e-5)
    # And it is not the windowed figure: the carried state makes a difference.
    windowed = _cross_entropy(np.asarray(model(rows[:, :-1].reshape(-1, 25))),
                              rows[:, 1:].reshape(-1, 25))
    # (Position by position: an untrained model's means can be equally close.)
    assert np.abs(windowed.reshape(expected.shape) - expected).max() > 1e-4


def test_out_of_vocabulary_targets_can_be_left_out():
    y = tf.constant([[1, 0, 2]])
    logits = tf.math.log(tf.constant([[[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]]))
    _, kept = models.loss_sums(y, logits, skip_oov=True)
    _, every = models.loss_sums(y, logits)
    assert kept.numpy().tolist() == pytest.approx([-math.log(0.6) - math.log(0.6), 2, 2, 2])
    assert every.numpy()[2] == 3 and every.numpy()[0] == pytest.approx(kept.numpy()[0]
                                                                         - math.log(0.5))
    metrics = models.metrics(kept.numpy())
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / math.log(2))


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_bits_per_char_equal_a_direct_computation_for_every_tokenizer(tmp_path, kind):
    """Each token's loss is spread over the characters it covers: the sum of the losses
    over the characters of the text the targets decode to, whatever the tokenizer."""
    rng = random.Random(11)
    words = ["thee", "thou", "art", "caf\u00e9", "\u4e16\u754c", "\U0001f389", "lord"]
    text = "".join(rng.choice(words) + rng.choice([" ", ", ", ".\n"]) for _ in range(400))
    text += "end."
    path = tmp_path / "val.txt"
    path.write_text(text, encoding="utf-8")
    chars = Vocabulary.from_counts(count_chars(text))
    tok = {"char": chars,
           "word": tokenization.WordTokenizer.from_counts(chars, tokenization.count_words(text),
                                                          len(chars.chars) + 6),
           "bpe": tokenization.BpeTokenizer.train([text], 280)}[kind]
    cfg = Config(seq_length=20, num_layers=1, rnn_units=16, embedding_dim=8, dropout=0.0,
                 batch_size=8, tokenizer=kind)
    model = models.build_model(cfg, tok.size)
    result = evaluation.score_files([str(path)], cfg, tok, model)
    ids = tok.encode(text).astype(np.int64)
    count = (len(ids) - 1) // 20
    rows = np.stack([ids[k * 20:k * 20 + 21] for k in range(count)])
    losses = _cross_entropy(np.asarray(model(rows[:, :-1])), rows[:, 1:])
    # The targets of windows at stride seq_length are one contiguous run of the text.
    covered = len(tok.decode(ids[1:count * 20 + 1].tolist()))
    windowed = result["windowed"]
    assert windowed["tokens_scored"] == losses.size
    assert windowed["chars_scored"] == covered
    assert windowed["nats_per_char"] == pytest.approx(losses.sum() / covered, rel=1e-5)
    assert windowed["nats_per_token"] == pytest.approx(losses.mean(), rel=1e-5)
    assert windowed["bits_per_char"] == pytest.approx(losses.sum() / covered / math.log(2),
                                                      rel=1e-5)
    assert result["chars"] == len(text) and result["tokens"] == len(ids)
    if kind != "char":
        assert result["tokens"] < len(text)  # Several characters per token.
    if kind == "word":
        assert result["unknown_words"] == tok.unknown(ids) > 0
