"""A job directory written by version 0.1.0, before the package moved into its wings,
still resumes, generates, evaluates and serves the same.

tests/fixtures/job_0_1_0 was trained by that version (the tiny preset, 1 x LSTM(24),
2 epochs of 60 steps on tests/fixtures/job_0_1_0_corpus.txt, --learning_rate=0.02),
then trimmed to what a job dir needs (config, vocabulary, best weights and pointer,
the newest resume checkpoint, the scan record). The expected figures below are what
that version printed for it: `trainer.generate --prime="The king " --length=40
--greedy` and `trainer.evaluate --data=<the corpus>`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from serve_helpers import free_port, request, start_server, stop, wait_ready

from trainer import job_loader, task
from trainer.training import evaluation, train

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CORPUS = FIXTURES / "job_0_1_0_corpus.txt"
PROMPT, GREEDY = "The king ", "the the the the the the the the the the "
WINDOWED, CARRIED = 1.5367357015333474, 1.4950181100970117
# The flags the fixture was trained with: the same model, so a resume is accepted.
FLAGS = ["--preset=tiny", "--val_fraction=0.1", "--steps_per_epoch=60", "--rnn_units=24",
         "--embedding_dim=8", "--batch_size=8", "--seq_length=16", "--sample_length=20",
         "--learning_rate=0.02", "--checkpoint_every_steps=0"]


@pytest.fixture()
def job(tmp_path) -> str:
    """A copy of the old job dir (tests write into it)."""
    shutil.copytree(FIXTURES / "job_0_1_0", tmp_path / "job")
    return str(tmp_path / "job")


def test_an_old_job_dir_generates_and_evaluates_as_it_did(job):
    cfg, vocab, model, pointer = job_loader.load_job(job)
    assert pointer["step"] == 120 and cfg.rnn_units == 24
    from trainer.sampling.sampler import Sampler, Settings

    sampler = Sampler(model, vocab)
    assert sampler.generate([PROMPT], len(GREEDY), Settings(greedy=True))[0] == GREEDY
    scores = evaluation.score_files([str(CORPUS)], cfg, vocab, model)
    assert scores["windowed"]["nats_per_char"] == pytest.approx(WINDOWED, abs=1e-5)
    assert scores["carried"]["nats_per_char"] == pytest.approx(CARRIED, abs=1e-5)


def test_an_old_job_dir_resumes_at_its_step(job, caplog):
    caplog.set_level("INFO", logger="absl")
    cfg = task.parse_flags(["trainer.task", *FLAGS, f"--train_data={CORPUS}",
                            f"--job_dir={job}", "--epochs=3"])
    summary = train.train(cfg)
    assert "resumed from ckpt/ckpt-120 at step 120 (epoch 3)" in caplog.text
    assert summary["step"] == 180 and summary["epoch"] == 3
    lines = Path(job, "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [60, 120, 180]


def test_an_old_job_dir_serves_the_same_text(job):
    port = free_port()
    proc = start_server([f"--model_dir={job}", f"--port={port}", "--host=127.0.0.1",
                         "--max_batch=1", "--nowarm_up", "--nojit_compile"])
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health")
        status, body = request(f"http://127.0.0.1:{port}/predict", {"instances": [
            {"prompt": PROMPT, "length": len(GREEDY), "greedy": True}]})
        assert status == 200, body
        assert json.loads(body)["predictions"][0]["text"] == GREEDY
    finally:
        stop(proc)
