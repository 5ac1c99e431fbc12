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


