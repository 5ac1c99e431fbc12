"""Helpers for the training tests: the tiny config, its job's files, the job as a process.

In-process runs use one device; mirrored and multi-worker runs are separate
processes because logical devices and collectives must be set before TF starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from trainer.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(corpus: str, job_dir, **overrides) -> Config:
    values = dict(train_data=corpus, val_fraction=0.1, job_dir=str(job_dir), num_layers=1,
                  rnn_units=32, embedding_dim=16, dropout=0.0, batch_size=16, seq_length=32,
                  learning_rate=0.01, warmup_steps=0, epochs=2, sample_length=20,
                  checkpoint_every_steps=0)
    values.update(overrides)
    return Config(**values).validate()


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def metrics(job_dir) -> list[dict]:
    with open(os.path.join(job_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def start_task(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def flags_of(cfg: Config) -> list[str]:
    return [f"--{k}={v}" for k, v in cfg.to_dict().items() if v != "" and k != "model_dir"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




# Short English with a few characters of two, three and four UTF-8 bytes.
TOKEN_TEXT = ("the cat sat on the mat — and the café was naïve. 🙂 the dog ran to the cat.\n"
              "a cat and a dog — the mat, the café; 🙂 then the end.\n")


def token_job(folder, kind: str, steps: int = 30, sample_length: int = 0) -> str:
    """A word or bpe job trained for `steps` steps on a small corpus (`TOKEN_TEXT`).

    Args:
      folder: where the corpus and the job directory go.
      kind: "word" or "bpe".
      steps: training steps, in one epoch.
      sample_length: the per-epoch sample's characters (0: none; each compiles a sampler).

    Returns:
      The job directory.
    """
    from trainer.training import train  # Late: only these tests train.

    corpus, job_dir = os.path.join(folder, f"{kind}.txt"), os.path.join(folder, f"job_{kind}")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(TOKEN_TEXT * 40)
    train.train(tiny(corpus, job_dir, tokenizer=kind, max_vocab=300 if kind == "bpe" else 64,
                     epochs=1, steps_per_epoch=steps, seq_length=16, batch_size=8,
                     val_steps=2, sample_length=sample_length))
    return job_dir
