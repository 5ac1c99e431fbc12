"""Shared by the serving tests: a job directory, a free port, servers in and out of process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import pytest
import uvicorn

from trainer import checkpoints, models
from trainer.config import Config
from trainer.data.vocabulary import Vocabulary
from trainer.serving import routes, server
from trainer.serving.request import Limits

ROOT = Path(__file__).resolve().parents[1]
VOCAB = Vocabulary(list("\n .,:;!?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def make_job_dir(path: str, staging: str, seed: int = 1) -> keras.Model:
    """A job directory written by the training job's own checkpoint writer."""
    cfg = Config(embedding_dim=8, rnn_units=16, num_layers=2, train_data="x", job_dir=path)
    keras.utils.set_random_seed(seed)
    model = models.build_model(cfg, VOCAB.size)
    # Peaked, context-dependent distributions, as a trained model's are.
    model.set_weights([w * 5.0 for w in model.get_weights()])
    job = checkpoints.JobDir(path, local_dir=staging)
    job.write("config.json", cfg.to_json())
    job.write("vocab.json", VOCAB.to_json())
    assert checkpoints.BestExporter(job, "val_loss").maybe_export(model, 3, 30, 1.8765)
    assert job.close(timeout=60) == []
    return model


LIMITS = Limits(max_length=300, max_instances=8, max_body_bytes=20_000)


class LiveServer:
    """The application under uvicorn in a thread of this process, on a loopback port.

    Args:
      running: the batcher (closed with the server).
      network: keyword arguments of `trainer.serving.server.Network` (limits, timeouts).
      app: keyword arguments of `routes.create_app` (limits, routes, timing).
    """

    def __init__(self, running, network: dict | None = None, **app):
        self.batcher = running
        self.port = free_port()
        application = routes.create_app(running, **{"limits": LIMITS, "seed": 0, **app})
        self.server = uvicorn.Server(server.config(
            application, server.Network("127.0.0.1", self.port, **(network or {}))))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise AssertionError("the server did not start")
            self.thread.join(0.05)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.batcher.close()


def module_job(folder: Path) -> tuple[str, keras.Model]:
    """A job directory in `folder` (a module's temp folder), and its model."""
    job_dir = str(folder / "job")
    return job_dir, make_job_dir(job_dir, str(folder / "staging"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes | dict | None = None, timeout: float = 60.0,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET (no body) or a JSON POST; HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **(headers or {})} if data is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=sent),
                                    timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def start_server(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m trainer.serve ARGS` in its own process group (killed with it on failure)."""
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.serve", *args], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), **(env or {})})


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180.0) -> None:
    """Polls `url` until it answers 200; fails with the server's stderr if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: "
                                 f"{proc.stderr.read()[-3000:]}")
        try:
            if request(url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no answer from {url} in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Kills the server's whole process group if it is still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def streamed_logprobs(client, asked: dict, choices: int) -> tuple[list[str], list[dict]]:
    """Each choice's text and `logprobs` lists joined over a stream's chunks; asserts that
    each chunk's offsets start where its text does and that several chunks had tokens."""
    texts, scored = [""] * choices, [0] * choices
    joined = [{k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
              for _ in range(choices)]
    for chunk in client.completions.create(**asked, stream=True):
        for c in chunk.choices:
            for key, values in joined[c.index].items():
                values += getattr(c.logprobs, key)
            scored[c.index] += bool(c.logprobs.tokens)
            assert c.logprobs.text_offset[:1] in ([], [len(texts[c.index])])
            texts[c.index] += c.text
    assert all(n > 1 for n in scored)
    return texts, joined


def same_logprobs(got: dict, want) -> None:
    """`got` (from `streamed_logprobs`) equals an answer's `logprobs` `want`."""
    assert got["tokens"] == want.tokens and got["text_offset"] == want.text_offset
    assert got["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-5)
    assert [t and list(t) for t in got["top_logprobs"]] == [t and list(t) for t in
                                                             want.top_logprobs]
    assert [v for t in got["top_logprobs"] for v in (t or {}).values()] == pytest.approx(
        [v for t in want.top_logprobs for v in (t or {}).values()], abs=1e-5)
