"""Tests for trainer.training.data_plan: word and bpe jobs scan, record their tokenizer,
train, resume and are scored per character."""

from __future__ import annotations

import math
import os

import pytest
from training_jobs import metrics, read_json, tiny

from trainer import job_loader, storage
from trainer.data import index
from trainer.training import evaluation, train


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_a_word_or_bpe_job_trains_records_its_tokenizer_and_resumes(corpus, tmp_path, kind):
    cfg = tiny(corpus, tmp_path, epochs=1, steps_per_epoch=15, tokenizer=kind, max_vocab=300,
               sample_length=0)
    train.train(cfg)
    summary = train.train(cfg.replace(epochs=2))
    history = metrics(tmp_path)
    assert [h["step"] for h in history] == [15, 30] and summary["step"] == 30
    assert read_json(tmp_path / "config.json")["tokenizer"] == kind
    loaded, tok, model, _ = job_loader.load_job(str(tmp_path))
    assert tok.kind == kind and tok.size <= 300 and loaded.tokenizer == kind
    best = read_json(tmp_path / "best.json")
    assert set(best["files"]) >= {"config.json", "vocab.json", "tokenizer.json"}
    text = storage.read_text(os.path.join(os.path.dirname(corpus), "part-0.txt"))
    per_token = len(text) / len(tok.encode(text))
    assert per_token > 2  # Words and merges: several characters per token.
    for h in history:
        # Per character of the text: the per-token loss over the chars each token covers.
        assert h["val_nats_per_char"] == pytest.approx(h["val_loss"] / per_token, rel=0.1)
        assert h["val_bpc"] == pytest.approx(h["val_nats_per_char"] / math.log(2))
    assert history[1]["val_loss"] < history[0]["val_loss"] < math.log(tok.size)
    assert history[1]["chars_trained"] == pytest.approx(30 * 16 * 32 * per_token, rel=0.1)
    # trainer.evaluate on the job: per character and per token, as the job reports them.
    scored = evaluation.score_files([os.path.join(os.path.dirname(corpus), "part-1.txt")],
                                    loaded, tok, model)
    assert scored["tokenizer"] == kind and scored["tokens"] < scored["chars"]
    for mode in ("windowed", "carried"):
        figures = scored[mode]
        assert figures["nats_per_char"] == pytest.approx(
            figures["nats_per_token"] * figures["tokens_scored"] / figures["chars_scored"])
        assert figures["nats_per_char"] < history[1]["val_loss"]
    # The scan record keeps each piece's tokens: a resumed job does not count them again.
    record = read_json(tmp_path / index.SCAN_RECORD)
    assert all(f["tokens"] and f["tokenized"] == tok.fingerprint for f in record["files"])
