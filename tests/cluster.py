"""A multi-worker job on this machine: `trainer.task` processes with TF_CONFIG on loopback.

The harness of tests/test_multi_worker.py, also run by bench/multi_worker_stop.py
(`from tests.cluster import ...`, from the repository root). Each worker runs in its own
process group (so a signal can go to one worker alone) with its output in a log file;
leaving the `with` block kills every group that is still alive, whatever happened
inside it. Also here: the small corpus, the workers' flags and the resume step that
both read, and `as_workers`: threads standing in for workers, for the scan's sums.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "we", "see", "the", "sea", "while",
         "dogs", "run", "in", "fog"]


def as_workers(n: int, run: Callable) -> list:
    """`run(worker, combine)` in n threads standing in for n workers; their results.

    `combine` sums an array over the threads (a barrier and a sum per call), as the
    strategy's all-reduce sums it over workers.
    """
    import numpy as np

    barrier, rounds, local = threading.Barrier(n), defaultdict(list), threading.local()

    def combine(values):
        k = local.calls = getattr(local, "calls", 0) + 1
        rounds[k].append(values)
        barrier.wait(timeout=30)
        return np.sum(rounds[k], axis=0)

    out = [None] * n

    def target(worker):
        out[worker] = run(worker, combine)

    threads = [threading.Thread(target=target, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(o is not None for o in out)
    return out


def write_corpus(folder: str, shards: int = 4, words: int = 1500) -> str:
    """Small repetitive shards; returns their glob pattern."""
    os.makedirs(folder, exist_ok=True)
    for i in range(shards):
        with open(os.path.join(folder, f"part-{i}.txt"), "w") as f:
            f.write(" ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(words)) + "\n")
    return os.path.join(folder, "*.txt")


def job_args(train_data: str, job_dir: str, *extra: str) -> list[str]:
    """The flags of every worker: tiny preset, dropout 0.2 as the specs, step checkpoints."""
    return ["--preset=tiny", "--dropout=0.2", f"--train_data={train_data}", "--val_fraction=0.1",
            f"--job_dir={job_dir}", "--epochs=2", "--rnn_units=64", "--batch_size=8",
            "--checkpoint_every_steps=10", "--sample_length=0", *extra]


def latest_step(job_dir: str) -> int:
    """The newest resume checkpoint's step in a local job dir (0 when none)."""
    try:
        with open(os.path.join(job_dir, "ckpt", "latest.json")) as f:
            return json.load(f)["checkpoints"][0]["step"]
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalCluster:
    """Workers 0..n-1 of one job (worker 0 is the chief), each `python -m trainer.task`.

    Args:
      args: the flags every worker gets (the same command on every machine).
      log_dir: where worker-N.log goes.
      workers: how many processes.
      delays: seconds to wait before starting each worker (a staggered start).
      env: extra environment for every worker.
      extra: worker index -> flags added to that worker's command only.
    """

    def __init__(self, args: Sequence[str], log_dir: str, workers: int = 2,
                 delays: Sequence[float] = (), env: dict[str, str] | None = None,
                 extra: Mapping[int, Sequence[str]] | None = None):
        self.args, self.log_dir, self.workers = list(args), log_dir, workers
        self.extra = dict(extra or {})
        self.delays = list(delays) + [0.0] * (workers - len(delays))
        self.env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(workers)]}
        self.procs: list[subprocess.Popen] = []
        self.ended: dict[int, float] = {}
        os.makedirs(log_dir, exist_ok=True)

    def log_path(self, index: int) -> str:
        return os.path.join(self.log_dir, f"worker-{index}.log")

    def log(self, index: int) -> str:
        with open(self.log_path(index), errors="replace") as f:
            return f.read()

    def __enter__(self) -> LocalCluster:
        started = time.monotonic()
        self.procs = [None] * self.workers  # type: ignore[list-item]
        try:
            for index in sorted(range(self.workers), key=lambda i: self.delays[i]):
                time.sleep(max(0.0, started + self.delays[index] - time.monotonic()))
                self.procs[index] = self._start(index)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self, index: int) -> subprocess.Popen:
        tf_config = {"cluster": self.cluster, "task": {"type": "worker", "index": index}}
        with open(self.log_path(index), "w") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "trainer.task", *self.args, *self.extra.get(index, ())],
                cwd=REPO,
                env={**self.env, "TF_CONFIG": json.dumps(tf_config)}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def signal(self, index: int, signum: int = signal.SIGTERM) -> None:
        """Sends `signum` to worker `index` alone."""
        self.procs[index].send_signal(signum)

    def poll(self) -> list[int | None]:
        """Each worker's exit status (None while it runs); notes when each one ended."""
        codes = [p.poll() if p is not None else None for p in self.procs]
        for i, code in enumerate(codes):
            if code is not None:
                self.ended.setdefault(i, time.monotonic())
        return codes

    def wait(self, timeout: float) -> list[int]:
        """Waits for every worker to exit; raises TimeoutError (with the logs' tails)."""
        deadline = time.monotonic() + timeout
        while None in self.poll():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- worker {i}\n{self.log(i)[-2000:]}"
                                  for i in range(self.workers))
                raise TimeoutError(f"the workers did not all exit in {timeout:g} s\n{tails}")
            time.sleep(0.05)
        return [p.returncode for p in self.procs]

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
