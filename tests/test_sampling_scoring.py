"""Tests for trainer.sampling.scoring: the model's log-probabilities of given ids."""

from __future__ import annotations

import numpy as np
import pytest
from test_sampling_sampler import VOCAB, _model

from trainer.sampling.sampler import Sampler, encode_prompt
from trainer.sampling.scoring import Scores


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model, VOCAB)


def test_score_is_the_whole_sequence_models_log_softmax(model, sampler):
    """`score` (cell steps, padded rows) against the Keras model run over each row alone."""
    rows = [encode_prompt(VOCAB, text).ids for text in
            ("the cat sat on the mat.", "ab", "q", "Cab, cab; a bad cab!")]
    scores = sampler.score(rows)
    for row, got in zip(rows, scores, strict=True):
        assert got.logprobs.shape == (len(row) - 1,)
        assert got.top_ids.shape == got.top_logprobs.shape == (len(row) - 1, 5)
        if len(row) < 2:
            continue
        logits = model(row[None], training=False).numpy()[0, :-1].astype(np.float64)
        expected = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        np.testing.assert_allclose(got.logprobs, expected[np.arange(len(row) - 1), row[1:]],
                                   atol=1e-4)
        best = np.sort(expected, axis=-1)[:, ::-1][:, :5]
        np.testing.assert_allclose(got.top_logprobs, best, atol=1e-4)
        np.testing.assert_allclose(np.take_along_axis(expected, got.top_ids, -1), best,
                                   atol=1e-4)
    # The model's distributions are peaked: the likeliest ids are not all alike.
    assert np.ptp(scores[0].top_logprobs[:, 0]) > 0.5
    assert sampler.score([]) == [] and len(sampler.score([rows[2]])[0].logprobs) == 0


def scored_in_pieces(score_from, row: np.ndarray, cuts) -> Scores:
    """`row` scored piece by piece through `score_from` (a Sampler's or a backend's), each
    piece from the states the one before ended in, as a stream's chunks are."""
    parts, states, fed = [], None, 0
    for cut in cuts:
        piece, states = score_from(row[fed:cut], states)
        assert piece.logprobs.shape == (max(0, cut - fed - 1),)
        parts.append(piece)
        fed = max(fed, cut - 1)
    return Scores(*(np.concatenate(p) for p in zip(*parts)))


def same_scores(got: Scores, want: Scores) -> None:
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    np.testing.assert_array_equal(got.top_ids, want.top_ids)
    np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, atol=1e-5)


def test_score_from_in_pieces_equals_the_whole_row(sampler):
    row = encode_prompt(VOCAB, "the cat sat on the mat, a bad cab.").ids
    (whole,) = sampler.score([row])
    # A one-id piece scores nothing and keeps the (zero) states; then pieces of 1 to 22.
    got = scored_in_pieces(sampler.score_from, row, (1, 3, 4, 12, len(row)))
    assert len(got.logprobs) == len(row) - 1
    same_scores(got, whole)
    # The states carry the text: the same last piece from zero states scores otherwise.
    alone, _ = sampler.score_from(row[11:], None)
    assert np.abs(alone.logprobs - whole.logprobs[11:]).max() > 0.1
