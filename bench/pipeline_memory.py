"""Memory side of bench.input_pipeline: peak RSS of one-epoch child processes over
growing corpora, and of the 2017 tutorial's numpy windows; and the pipeline setup
both sides time (`setup`, `ours`, `one_pass`).

bench.input_pipeline runs these (`memory`, `child`) on synthetic corpora, so neither
needs --corpus. Each measurement is a fresh child process of this module, so its
peak RSS is its own:

    python -m bench.pipeline_memory --child_rss='SHARDS/*.txt' [--shard_cycle=8]
    python -m bench.pipeline_memory --child_tutorial=1600000

Each prints one JSON line. This module imports nothing from bench.input_pipeline:
the dependency goes one way, input_pipeline -> pipeline_memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from absl import flags

import bench

FLAGS = flags.FLAGS
SEQ_LENGTH = 100
BATCH = 256
# Corpus layouts: (size in MB, one file or 10 MB shards). 1mb is for smoke tests.
LAYOUTS = {"10mb": (10, True), "1gb-one-file": (1000, True), "1gb-10mb-shards": (1000, False),
           "1mb": (1, True)}
DEFAULT_LAYOUTS = ["10mb", "1gb-one-file", "1gb-10mb-shards"]


def setup(pattern: str, shard_cycle: int = 8):
    """What a job builds once: the scan, vocabulary, regions and steps of one pass.

    Returns:
      (cfg, vocab, regions, steps), the arguments of `ours` and the baselines.
    """
    from trainer import storage
    from trainer.config import Config
    from trainer.data import index, vocabulary, window_pipeline

    cfg = Config(train_data=pattern, seq_length=SEQ_LENGTH, batch_size=BATCH,
                 shard_cycle=shard_cycle)
    corpus = index.build(storage.expand_patterns(pattern), [], lowercase=False,
                         piece_bytes=cfg.piece_bytes)
    vocab = vocabulary.Vocabulary.from_counts(corpus.counts)
    regions, _ = index.make_regions(corpus, cfg.window)
    steps = window_pipeline.steps_per_pass(regions, cfg.window, cfg.shift, BATCH, 1,
                                           window_pipeline.Sharding())
    return cfg, vocab, regions, steps


def ours(cfg, vocab, regions, steps):
    """The job's pipeline: one shuffled pass of (x, y) batches."""
    from trainer.data import window_pipeline

    return window_pipeline.dataset(regions, vocab, cfg, batch_size=BATCH, shift=cfg.shift,
                                   steps=steps, repeat=False)


def one_pass(make, setup_, batches: int = -1) -> tuple[int, float, float]:
    """(windows, wall seconds, CPU seconds) of building `make`'s dataset and iterating it once.

    The pass is consumed inside the graph (`Dataset.reduce`), as the training
    step's `next(iterator)` does, so no per-batch Python overhead is counted.
    CPU seconds (all threads of this process) move less than wall time when
    other jobs share the cores.

    Args:
      make: builds the dataset from `setup_` (`ours` or a baseline).
      setup_: what `setup` returned.
      batches: how many batches to take; -1: the whole pass.
    """
    import tensorflow as tf

    wall, cpu = time.perf_counter(), time.process_time()
    ds = make(*setup_).take(batches)
    windows = ds.reduce(tf.constant(0, tf.int64),
                        lambda n, xy: n + tf.cast(tf.shape(xy[0])[0], tf.int64))
    return int(windows), time.perf_counter() - wall, time.process_time() - cpu


def child_rss(pattern: str, shard_cycle: int) -> dict[str, Any]:
    """Run in a subprocess: scan and iterate one epoch, then report the peak RSS.

    RSS is also sampled through the pass, to show whether it plateaus (bounded by
    the shards in flight) or grows with the corpus.
    """
    import threading

    import tensorflow as tf  # noqa: F401  (imported first: its RSS is the floor)

    after_import = bench.rss_mb()
    began = time.perf_counter()
    built = setup(pattern, shard_cycle)
    scan_seconds = time.perf_counter() - began
    after_scan = bench.peak_rss_mb()
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append(bench.rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    windows, seconds, cpu_seconds = one_pass(ours, built)
    done.set()
    quarters = [samples[min(len(samples) - 1, len(samples) * q // 4)] for q in (1, 2, 3, 4)
                ] if samples else []
    from trainer import storage

    scanned = sum(storage.size(p) for p in storage.expand_patterns(pattern))
    return {"windows": windows, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "scan_seconds": scan_seconds, "scan_mb_per_sec": scanned / 1e6 / scan_seconds,
            "shard_cycle": shard_cycle, "rss_after_import_mb": after_import,
            "peak_rss_after_scan_mb": after_scan, "rss_at_quarters_mb": quarters,
            "peak_rss_mb": bench.peak_rss_mb()}


def child_tutorial(n_chars: int) -> dict[str, Any]:
    """Run in a subprocess: the 2017 tutorial's stride-1 numpy windows over n_chars."""
    import numpy as np

    text = bench.synthetic_text(n_chars, seed=2).decode()
    after_import = bench.rss_mb()
    start = time.perf_counter()
    chars = sorted(set(text))
    char_to_int = {c: i for i, c in enumerate(chars)}
    data_x, data_y = [], []
    for i in range(0, len(text) - SEQ_LENGTH, 1):
        data_x.append([char_to_int[c] for c in text[i:i + SEQ_LENGTH]])
        data_y.append(char_to_int[text[i + SEQ_LENGTH]])
    x = np.reshape(data_x, (len(data_x), SEQ_LENGTH, 1))
    x = x / float(len(chars))
    y = np.eye(len(chars), dtype=np.float32)[data_y]  # What keras' to_categorical returns.
    seconds = time.perf_counter() - start
    return {"chars": n_chars, "windows": len(x), "x_shape": list(x.shape), "x_gb": x.nbytes / 1e9,
            "y_gb": y.nbytes / 1e9, "seconds": seconds, "rss_after_import_mb": after_import,
            "peak_rss_mb": bench.peak_rss_mb()}


def child(*args: str) -> dict[str, Any]:
    """Runs this module with `args` in a fresh process; its JSON line, or {"error": ...}."""
    out = subprocess.run([sys.executable, "-m", "bench.pipeline_memory", *args],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if out.returncode:
        # The child's last line is its error (a one-line `error:` or a traceback's last line).
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{' '.join(args)}: exit {out.returncode}: {last[-300:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(layouts: list[str], folder: str, shard_cycle: int = 8,
           repeats: int = 3) -> list[dict[str, Any]]:
    """Peak RSS of one-epoch subprocesses over growing corpora, each deleted after use.

    Each size runs `repeats` times: the peak varies by tens of MB from run to run
    with how many shard loads happen to overlap, so the median counts and the
    largest is shown beside it.

    Args:
      layouts: names of LAYOUTS.
      folder: where the corpora are written.
      shard_cycle: the job's --shard_cycle.
      repeats: runs per layout.

    Returns:
      One row per layout.

    Raises:
      bench.BenchError: a layout could not be measured (no disk space, or a run
        failed).
    """
    rows = []
    for layout in layouts:
        size, one_file = LAYOUTS[layout]
        need = size * 1e6 * 1.2
        if shutil.disk_usage(folder).free < need:
            raise bench.BenchError(
                f"the {layout} corpus needs {need / 1e9:.1f} GB free in {folder}; pass "
                "--tmp_dir=FOLDER with room, or leave it out of --rss_mb")
        shards = os.path.join(folder, f"rss-{layout}")
        bench.write_corpus(shards, size * 1000 * 1000, seed=3, one_file=one_file)
        load = bench.load()[0]
        runs = [child(f"--child_rss={shards}/*.txt", f"--shard_cycle={shard_cycle}")
                for _ in range(repeats)]
        shutil.rmtree(shards)
        row: dict[str, Any] = {"layout": layout, "corpus_mb": size, "load_1min": load,
                               "runs": runs}
        failed = [r for r in runs if "peak_rss_mb" not in r]
        if failed:
            raise bench.BenchError(f"peak RSS over the {layout} corpus: "
                                   f"{failed[0].get('error', 'no result')}")
        middle = sorted(runs, key=lambda r: r["peak_rss_mb"])[(len(runs) - 1) // 2]
        row.update({k: middle[k] for k in ("windows", "seconds", "shard_cycle",
                                           "rss_after_import_mb", "peak_rss_after_scan_mb",
                                           "rss_at_quarters_mb", "scan_mb_per_sec")})
        row["peak_rss_mb"] = bench.median([r["peak_rss_mb"] for r in runs])
        row["peak_rss_max_mb"] = max(r["peak_rss_mb"] for r in runs)
        row["windows_per_sec"] = row["windows"] / row["seconds"]
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    """Runs one child measurement and prints its JSON line."""
    del argv
    if FLAGS.child_rss:
        print(json.dumps(child_rss(FLAGS.child_rss, FLAGS.shard_cycle)))
    elif FLAGS.child_tutorial:
        print(json.dumps(child_tutorial(FLAGS.child_tutorial)))
    else:
        print("give --child_rss=PATTERN or --child_tutorial=N", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    flags.DEFINE_string("child_rss", None, "One-epoch RSS child over this pattern.")
    flags.DEFINE_integer("shard_cycle", 8, "--shard_cycle of the RSS child.")
    flags.DEFINE_integer("child_tutorial", None, "Tutorial RSS child over N chars.")
    bench.run_main(main)
