"""Tests for `python -m trainer.evaluate`: both modes, OOV counts, json, gs://, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from trainer import job_loader, storage
from trainer.config import Config
from trainer.training import distribution, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = ["the cat sat on the mat. ", "a dog ran in the fog. ", "we see the sea. "]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data")
    (folder / "train.txt").write_text("".join(SENTENCES[j % 3] for j in range(300)))
    job_dir = tmp_path_factory.mktemp("job")
    train.train(Config(train_data=str(folder / "train.txt"), val_fraction=0.1,
                       job_dir=str(job_dir), num_layers=1, rnn_units=24, embedding_dim=8,
                       dropout=0.0, batch_size=8, seq_length=20, learning_rate=0.01,
                       warmup_steps=0, epochs=2, sample_length=0,
                       checkpoint_every_steps=0).validate())
    return str(job_dir)


@pytest.fixture(scope="module")
def test_text(tmp_path_factory) -> str:
    # 'Q' and 'é' never occur in the training text: out of vocabulary.
    text = "".join(SENTENCES[(j * 7) % 3] + ("Q\u00e9 " if j % 5 == 0 else "")
                   for j in range(60))
    path = tmp_path_factory.mktemp("test") / "test.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _evaluate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": REPO})


def _direct_windowed(job: str, text: str, batch: int, seq_length: int = 0) -> float:
    """Mean loss over every window (the last batch is padded), OOV targets left out."""
    cfg, vocab, model, _ = job_loader.load_job(job)
    ids = vocab.encode(text).astype("int32")
    n = seq_length or cfg.seq_length
    windows = np.stack([ids[s:s + n + 1] for s in range(0, len(ids) - n, n)])
    logits = np.asarray(model(windows[:, :-1]), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    losses = -np.take_along_axis(log_probs, windows[:, 1:, None], -1)[..., 0]
    keep = windows[:, 1:] != 0
    return float(losses[keep].mean())


def test_json_reports_both_modes_and_counts_the_oov_chars(job, test_text):
    result = _evaluate(f"--job_dir={job}", f"--data={test_text}", "--format=json",
                       "--batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    # Threads sized for this machine (as a training job here would pick them) before
    # TensorFlow started, whatever the job trained with.
    counts = distribution.thread_counts(Config(rnn_units=24), distribution.usable_cpus(),
                                        gpu=False)
    intra, inter = (counts[k] or "TensorFlow's choice"
                    for k in ("intra_op_threads", "inter_op_threads"))
    assert f"threads per op: {intra}; ops at once: {inter}" in result.stderr
    assert "already started" not in result.stderr
    report = json.loads(result.stdout)
    with open(test_text, encoding="utf-8") as f:
        text = f.read()
    assert report["chars"] == len(text)
    assert report["oov_chars"] == text.count("Q") + text.count("\u00e9")
    assert report["oov_distinct"] == ["Q", "\u00e9"]
    windowed, carried = report["windowed"], report["carried"]
    assert windowed["nats_per_char"] == pytest.approx(_direct_windowed(job, text, 4), rel=1e-5)
    for mode in (windowed, carried):
        assert mode["bits_per_char"] == pytest.approx(mode["nats_per_char"] / math.log(2))
        assert mode["perplexity"] == pytest.approx(math.exp(mode["nats_per_char"]))
        assert 0 < mode["chars_scored"] < len(text) - report["oov_chars"] + 1
    assert carried["lanes"] == 4 and carried["nats_per_char"] != windowed["nats_per_char"]
    # A --batch_size far too large for the text: fewer lanes, so that each lane's unscored
    # remainder (less than one chunk) leaves at most a tenth of the text out.
    huge = _evaluate(f"--job_dir={job}", f"--data={test_text}", "--format=json",
                     "--batch_size=4096", "--seq_length=30")  # 21 lanes would score 49%.
    assert huge.returncode == 0, huge.stderr[-3000:]
    carried = json.loads(huge.stdout)["carried"]
    assert carried["lanes"] < 4096 and carried["tokens_scored"] >= 0.9 * (len(text) - 1)


def test_seq_length_scores_windows_of_another_length(job, test_text):
    # The job trained on 20-char windows; scored on 50-char ones, as a model trained on 50
    # would be, the figure is the direct one over 50-char windows, and more context per
    # character gives a lower loss than the job's own windows.
    own, longer = (_evaluate(f"--job_dir={job}", f"--data={test_text}", "--format=json",
                             "--batch_size=4", *extra) for extra in ([], ["--seq_length=50"]))
    assert own.returncode == 0 and longer.returncode == 0, (own.stderr + longer.stderr)[-3000:]
    own, longer = json.loads(own.stdout)["windowed"], json.loads(longer.stdout)["windowed"]
    with open(test_text, encoding="utf-8") as f:
        text = f.read()
    assert longer["nats_per_char"] == pytest.approx(_direct_windowed(job, text, 4, 50), rel=1e-5)
    assert longer["how"].startswith("50-char windows") and own["how"].startswith("20-char")
    assert longer["nats_per_char"] < own["nats_per_char"]


def test_text_output_and_a_job_dir_in_a_bucket(job, test_text, gcs_bucket):
    bucket = gcs_bucket()
    for name in os.listdir(job):
        if os.path.isfile(os.path.join(job, name)):
            storage.copy_file(os.path.join(job, name), f"{bucket}/job/{name}")
    storage.copy_file(test_text, f"{bucket}/test/test.txt")
    local = _evaluate(f"--job_dir={job}", f"--data={test_text}")
    remote = _evaluate(f"--job_dir={bucket}/job", f"--data={bucket}/test/*.txt")
    for result in (local, remote):
        assert result.returncode == 0, result.stderr[-3000:]
    lines = local.stdout.splitlines()
    assert lines[1] == f"data: 1 file(s), {os.path.getsize(test_text) - 12:,} chars"
    assert lines[2].startswith("not in the vocabulary: 24 chars (2 distinct: 'Q' 'é')")
    assert lines[3].startswith("windowed: ") and "bits/char, perplexity" in lines[3]
    assert lines[4].startswith("carried: ")
    # Same model, same text: the same figures from the bucket.
    assert remote.stdout.splitlines()[1:] == lines[1:]


@pytest.mark.parametrize("args, message", [
    (["--job_dir={tmp}/nowhere", "--data={text}"], "error: {tmp}/nowhere is not a job directory"),
    (["--job_dir={job}", "--data={tmp}/none-*.txt"], "error: data pattern matched no files"),
    (["--job_dir={job}", "--data={tmp}/short.txt"], "error: the text holds 5 chars, fewer"),
    (["--job_dir={job}", "--data={tmp}/short.txt", "--seq_length=5"],
     "error: the text holds 5 chars, fewer than one window of 6 (seq_length 5 + 1)"),
    (["--job_dir={tmp}", "--data={text}"], "error: could not load a model from {tmp}: "
                                           "JSONDecodeError"),
    (["--job_dir={job}"], "error: flag --data=None: Flag --data must have a value other than "
                          "None."),
])
def test_bad_input_ends_with_one_line(job, test_text, tmp_path, args, message):
    (tmp_path / "short.txt").write_text("the c")
    (tmp_path / "config.json").write_text("{not json")
    values = {"tmp": tmp_path, "job": job, "text": test_text}
    result = _evaluate(*[a.format(**values) for a in args])
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message.format(**values)), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_help_exits_zero():
    for flag in ("--help", "--helpshort"):
        result = _evaluate(flag, timeout=60)
        assert result.returncode == 0 and "--job_dir" in result.stdout + result.stderr
