"""Runs every benchmark, each in its own subprocess, and prints their tables.

    python -m bench.run [--quick] [--long] [--corpus=data/shakespeare] [--out_dir=bench/results]

`make bench` runs this (after `make data`). In order: training throughput (its
default-model figure feeds the input pipeline's), training chars/s with the job's auto CPU
threads against TensorFlow's own pools, the input pipeline, the multi-worker stop
(SIGTERM to one of 2 loopback workers), generation, the server under load and quality
with a short budget (3 minutes; 15 with --long, the real quality run; 1 with --quick).
Throughput and quality train on --corpus: a folder with train/*.txt and val/*.txt shards
(the default is the one `make data` writes) or one text file, split 90/10 by characters
(--corpus=PATH/tinyshakespeare.txt reproduces the published figures). Without it nothing
runs: one line says to run `make data` or pass --corpus. Each benchmark writes its JSON
under --out_dir; each one's log (progress, TensorFlow noise) goes to
<out_dir>/logs/NAME.log. The exit status is 1 when any benchmark failed.
--quick skips the 1 GB RSS corpus and the tutorial's 4.4 GB numpy windows and
measures one round; --long measures more rounds and steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import flags

import bench

FLAGS = flags.FLAGS


def plan(out_dir: str, quick: bool, long: bool, corpus: str) -> list[tuple[str, list[str]]]:
    """(name, module arguments) of each benchmark, in the order they run."""
    minutes = 15 if long else (1 if quick else 3)
    throughput = ["bench.train_throughput", f"--corpus={corpus}",
                  f"--out={out_dir}/train_throughput.json"]
    if long:
        throughput.append("--long")
    elif quick:
        throughput.append("--rounds=1")
    threads = ["bench.cpu_threads", f"--corpus={corpus}", f"--out={out_dir}/cpu_threads.json"]
    if quick:
        threads.append("--rounds=1")
    elif long:
        threads.append("--rounds=3")
    # Power-of-two widths are slow where oneDNN has AVX2 and no AVX-512: time them there.
    width = ["bench.lstm_width", f"--corpus={corpus}", "--isa=AVX2",
             f"--out={out_dir}/lstm_width.json"]
    if quick:
        width += ["--widths=248,256", "--steps=10", "--rounds=1"]
    pipeline = ["bench.input_pipeline", f"--out={out_dir}/input_pipeline.json"]
    if quick:
        pipeline += ["--rss_mb=10mb", "--tutorial_chars=0", "--rounds=3"]
    return [("train_throughput", throughput), ("cpu_threads", threads),
            ("lstm_width", width), ("input_pipeline", pipeline),
            ("multi_worker_stop", ["bench.multi_worker_stop", f"--rounds={1 if quick else 3}",
                                   f"--out={out_dir}/multi_worker_stop.json"]),
            ("generate", ["bench.generate", f"--out={out_dir}/generate.json"]),
            ("serve_load", ["bench.serve_load", f"--out={out_dir}/serve_load.json"]
             + (["--min_requests=16"] if quick else [])),
            ("quality", ["bench.quality", f"--corpus={corpus}", f"--minutes={minutes}",
                         f"--out={out_dir}/quality_{minutes}min.json",
                         f"--plot={out_dir}/quality_{minutes}min.png"])]


def default_model_windows_per_sec(path: str) -> float | None:
    """The job's windows/s for the Config() model, from train_throughput's JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    for variant in result.get("variants", []):
        if variant["model"].startswith("2x512") and variant["path"] == "ours" and \
                not variant["xla"] and variant["chars_per_sec"] == variant["chars_per_sec"]:
            return variant["chars_per_sec"] / result["seq_length"]
    return None


def run_one(name: str, args: list[str], log_dir: str) -> dict[str, Any]:
    """Runs `python -m args...`, prints its stdout (the tables), logs its stderr."""
    log = os.path.join(log_dir, f"{name}.log")
    print(f"\n## {name}\n\n`python -m {' '.join(args)}` (log: {log}, load "
          f"{bench.load()})\n", flush=True)
    start = time.time()
    with open(log, "w", encoding="utf-8") as err:
        out = subprocess.run([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                             stderr=err, text=True, check=False,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    print(out.stdout, flush=True)
    seconds = time.time() - start
    if out.returncode:
        with open(log, encoding="utf-8", errors="replace") as f:
            last = (f.read().strip().splitlines() or [""])[-1]  # A benchmark's `error:` line.
        print(f"{name} FAILED (exit {out.returncode}): {last}; see {log}", flush=True)
    return {"name": name, "exit_code": out.returncode, "seconds": seconds}


def main(argv: list[str]) -> int:
    """Runs every benchmark of `plan`; exit status 1 when any of them failed."""
    del argv
    bench.check_corpus(FLAGS.corpus)  # Before anything runs: no half-finished set of results.
    out_dir = FLAGS.out_dir
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    print(f"# benchmarks on {bench.cpu_model()} ({os.cpu_count()} cores), load {bench.load()}")
    done = []
    for name, args in plan(out_dir, FLAGS.quick, FLAGS.long, FLAGS.corpus):
        if name == "input_pipeline":
            wps = default_model_windows_per_sec(os.path.join(out_dir, "train_throughput.json"))
            if wps:
                args = [*args, f"--train_windows_per_sec={wps:.3f}"]
        done.append(run_one(name, args, log_dir))
    print("\n## summary\n")
    print(bench.table(["benchmark", "exit", "minutes"],
                      [[d["name"], d["exit_code"], d["seconds"] / 60] for d in done]))
    return 1 if any(d["exit_code"] for d in done) else 0


def define_flags() -> None:
    """Defines the flags of the whole run."""
    flags.DEFINE_bool("quick", False, "One round, no 1 GB corpus or tutorial arrays, 1-minute "
                      "quality run.")
    flags.DEFINE_bool("long", False, "More rounds and steps; the 15-minute quality run.")
    flags.DEFINE_string("corpus", bench.DEFAULT_CORPUS, "Corpus for throughput and quality: "
                        "a folder with train/*.txt and val/*.txt, or one text file (split "
                        "90/10 by characters).")
    flags.DEFINE_string("out_dir", bench.RESULTS_DIR, "Where results and logs go.")


if __name__ == "__main__":
    define_flags()
    bench.run_main(main)
