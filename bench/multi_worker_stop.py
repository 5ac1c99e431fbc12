"""How a multi-worker job stops on SIGTERM to one worker, and what its rerun loses.

    python -m bench.multi_worker_stop [--workers=2] [--rounds=3] [--out=bench/results/...]

Run from the repository root: the workers are started by the multi-worker test
harness, tests/cluster.py. Each round starts a job of --workers `trainer.task`
processes on loopback (TF_CONFIG, one shared local job dir, the tiny preset with
dropout 0.2, on a small corpus it writes itself, so it needs no --corpus), waits
until the chief has saved a step checkpoint, sends SIGTERM to the last worker only,
and measures the seconds until every process has exited (target < 30 s). Then it
reruns the same commands and reads the step each worker resumed at: steps lost =
the step the stop was agreed at minus the step resumed at (target 0). Printed as a
table; written as JSON with the machine. A round whose figures cannot be read (a
job that ends or stalls before its first checkpoint, a worker that logs no stop or
resume step) stops the benchmark with one `error:` line and exit status 1, and no
result is written.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import tempfile
import time
from typing import Any

from absl import flags

import bench
from tests.cluster import LocalCluster, job_args, latest_step, write_corpus

FLAGS = flags.FLAGS


def found(pattern: str, text: str) -> int | None:
    """The first group of `pattern` in `text` as an int; None when it does not occur."""
    match = re.search(pattern, text)
    return int(match.group(1)) if match else None


def one_round(folder: str, workers: int, timeout: float = 300) -> dict[str, Any]:
    """One stop-and-rerun; returns its figures.

    Args:
      folder: where the corpus, the job dir and the workers' logs go.
      workers: processes in the job.
      timeout: seconds each of the two jobs may take.

    Raises:
      bench.BenchError: the job ended or stalled before its first step checkpoint.
    """
    job = os.path.join(folder, "job")
    args = job_args(write_corpus(os.path.join(folder, "data")), job)
    with LocalCluster(args, os.path.join(folder, "first"), workers) as cluster:
        deadline = time.monotonic() + timeout
        while latest_step(job) < 20:
            if None not in cluster.poll() or time.monotonic() > deadline:
                last = (cluster.log(0).strip().splitlines() or ["no output"])[-1]
                raise bench.BenchError("the job ended or stalled before its first step "
                                       f"checkpoint; worker 0's last line: {last[:300]}")
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


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Every figure the result must hold, by name."""
    out: dict[str, Any] = {"median exit s": result["median_exit_sec"]}
    for i, r in enumerate(result["rounds"], 1):
        out[f"round {i} exit s"] = r["exit_sec"]
        for name in ("stopped_at", "resumed_at", "steps_lost"):
            out.update({f"round {i} worker {w} {name}": v for w, v in enumerate(r[name])})
    return out


def main(argv: list[str]) -> int:
    """Runs the rounds, prints the table, writes the JSON."""
    del argv
    rounds = []
    for _ in range(FLAGS.rounds):
        with tempfile.TemporaryDirectory(prefix="mw-stop-") as folder, \
                bench.measuring("a stop-and-rerun round"):
            rounds.append(one_round(folder, FLAGS.workers, FLAGS.timeout))
    result = {"benchmark": "multi_worker_stop", "machine": bench.machine(),
              "workers": FLAGS.workers, "rounds": rounds,
              "median_exit_sec": statistics.median(r["exit_sec"] for r in rounds),
              "command": f"python -m bench.multi_worker_stop --workers={FLAGS.workers} "
                         f"--rounds={FLAGS.rounds}"}
    bench.require(figures(result))
    print(f"| round | SIGTERM to worker {FLAGS.workers - 1} -> all exited (s) | exit codes | "
          "stopped at | resumed at | steps lost | rerun exit codes | load |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        print(f"| {i} | {r['exit_sec']:.1f} | {r['codes']} | {r['stopped_at']} | "
              f"{r['resumed_at']} | {r['steps_lost']} | {r['rerun_codes']} | {r['load']} |")
    print(f"median {result['median_exit_sec']:.1f} s (target < 30 s); CPU "
          f"{result['machine']['cpu']}, {result['machine']['cores']} cores")
    bench.write_result(FLAGS.out, result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    flags.DEFINE_integer("workers", 2, "Worker processes in the job.", lower_bound=2)
    flags.DEFINE_integer("rounds", 3, "Stop-and-rerun rounds.", lower_bound=1)
    flags.DEFINE_float("timeout", 300, "Seconds each job of a round may take.")
    flags.DEFINE_string("out", f"{bench.RESULTS_DIR}/multi_worker_stop.json", "JSON result.")
    bench.run_main(main)
