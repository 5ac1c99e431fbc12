"""How a multi-worker job stops on SIGTERM to one worker, and what its rerun loses.

    python -m bench.multi_worker_stop [--workers=2] [--rounds=3] [--out=bench/results/...]

Each round starts a job of --workers `trainer.task` processes on loopback (TF_CONFIG,
one shared local job dir, the tiny preset with dropout 0.2), waits until the chief has
saved a step checkpoint, sends SIGTERM to the last worker only, and measures the
seconds until every process has exited. Then it reruns the same commands and reads
the step each worker resumed at: steps lost = the step the stop was agreed at minus
the step resumed at (target 0). Printed as a table; written as JSON with the machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import tempfile
import time

from absl import app, flags

import bench
from bench.local_cluster import LocalCluster

FLAGS = flags.FLAGS
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "we", "see", "the", "sea", "while",
         "dogs", "run", "in", "fog"]


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


def found(pattern: str, text: str) -> int | None:
    match = re.search(pattern, text)
    return int(match.group(1)) if match else None


def one_round(folder: str, workers: int, timeout: float = 300) -> dict:
    """One stop-and-rerun; returns its figures."""
    job = os.path.join(folder, "job")
    args = job_args(write_corpus(os.path.join(folder, "data")), job)
    with LocalCluster(args, os.path.join(folder, "first"), workers) as cluster:
        deadline = time.monotonic() + timeout
        while latest_step(job) < 20:
            if None not in cluster.poll() or time.monotonic() > deadline:
                raise RuntimeError("the job ended or stalled before its first step checkpoint:\n"
                                   + cluster.log(0)[-2000:])
            time.sleep(0.05)
        sent = time.monotonic()
        cluster.signal(workers - 1, signal.SIGTERM)
        codes = cluster.wait(timeout)
        exit_sec = max(cluster.ended.values()) - sent
        stopped = [found(r"stopped by SIGTERM[^\n]* at step (\d+)", cluster.log(i))
                   for i in range(workers)]
    saved = latest_step(job)
    with LocalCluster(args, os.path.join(folder, "rerun"), workers) as cluster:
        rerun_codes = cluster.wait(timeout)
        resumed = [found(r"resumed from ckpt/ckpt-\d+ at step (\d+)", cluster.log(i))
                   for i in range(workers)]
    lost = [s - r if s is not None and r is not None else None
            for s, r in zip(stopped, resumed)]
    return {"exit_sec": round(exit_sec, 2), "codes": codes, "stopped_at": stopped,
            "saved": saved, "resumed_at": resumed, "steps_lost": lost,
            "rerun_codes": rerun_codes, "load": bench.load()}


def main(argv: list[str]) -> None:
    del argv
    rounds = []
    for _ in range(FLAGS.rounds):
        with tempfile.TemporaryDirectory(prefix="mw-stop-") as folder:
            rounds.append(one_round(folder, FLAGS.workers))
    result = {"machine": bench.machine(), "workers": FLAGS.workers, "rounds": rounds,
              "median_exit_sec": statistics.median(r["exit_sec"] for r in rounds),
              "command": f"python -m bench.multi_worker_stop --workers={FLAGS.workers} "
                         f"--rounds={FLAGS.rounds}"}
    print(f"| round | SIGTERM to worker {FLAGS.workers - 1} -> all exited (s) | exit codes | "
          "stopped at | resumed at | steps lost | rerun exit codes | load |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        print(f"| {i} | {r['exit_sec']:.1f} | {r['codes']} | {r['stopped_at']} | "
              f"{r['resumed_at']} | {r['steps_lost']} | {r['rerun_codes']} | {r['load']} |")
    print(f"median {result['median_exit_sec']:.1f} s (target < 30 s); CPU "
          f"{result['machine']['cpu']}, {result['machine']['cores']} cores")
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    flags.DEFINE_integer("workers", 2, "Worker processes in the job.")
    flags.DEFINE_integer("rounds", 3, "Stop-and-rerun rounds.")
    flags.DEFINE_string("out", f"{bench.RESULTS_DIR}/multi_worker_stop.json", "JSON result.")
    app.run(main)
