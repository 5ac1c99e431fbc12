"""Benchmark: training chars/s with the job's auto CPU threads against TensorFlow's own pools.

    python -m bench.cpu_threads [--corpus=data/shakespeare] [--presets=cpu,quality] \
        [--steps=40] [--rounds=2] [--isa=AVX2] [--out=bench/results/cpu_threads.json]

Each preset trains through `python -m trainer.task` for 3 blocks of --steps steps (no
validation, no sample, --train_minutes=0), once with --intra_op_threads and
--inter_op_threads left at auto (-1) and once at 0 (TensorFlow's choice: a pool of one
thread per core for each), the two alternating and swapping order round by round
because the machine may be shared. Figure: chars/s over the blocks after the first
(which traces the step), from metrics.jsonl, the median over rounds; the ratio is the
median of each round's auto / TensorFlow ratio. Each row records the thread counts auto
resolved to on this machine (config.json): on more than 2 usable CPUs, with a GPU, or for
LSTMs wider than 256 units, auto is TensorFlow's choice and both columns measure the same
thing.

--isa caps oneDNN (ONEDNN_MAX_CPU_ISA, e.g. AVX2: no AVX-512, so float32 and no
bfloat16) to see an older CPU's kernels on a newer one. Every figure must be measured:
a job that fails stops the benchmark with one `error:` line and exit status 1, and no
result is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from absl import flags

import bench

FLAGS = flags.FLAGS
VARIANTS = {"auto": [], "tensorflow": ["--intra_op_threads=0", "--inter_op_threads=0"]}
BLOCKS = 3


def train_blocks(preset: str, train: str, job_dir: str, steps: int, extra: list[str],
                 env: dict[str, str]) -> dict[str, Any]:
    """Trains BLOCKS x `steps` steps of a preset; returns chars/s after the first block."""
    command = [sys.executable, "-m", "trainer.task", f"--preset={preset}",
               f"--train_data={train}", f"--job_dir={job_dir}", "--train_minutes=0",
               f"--steps_per_epoch={steps}", f"--epochs={BLOCKS}", "--sample_length=0",
               "--checkpoint_every_steps=0", *extra]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise bench.BenchError(f"--preset={preset} {' '.join(extra)} exited "
                               f"{done.returncode}: {last[:300]}")
    with open(os.path.join(job_dir, "metrics.jsonl"), encoding="utf-8") as f:
        blocks = [json.loads(line) for line in f]
    with open(os.path.join(job_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    chars = blocks[-1]["chars_trained"] - blocks[0]["chars_trained"]
    seconds = blocks[-1]["elapsed_sec"] - blocks[0]["elapsed_sec"]
    return {"chars_per_sec": chars / seconds if seconds > 0 else float("nan"),
            "threads": [cfg.get("intra_op_threads"), cfg.get("inter_op_threads")],
            "precision": cfg.get("precision"), "rnn_units": cfg["rnn_units"],
            "num_layers": cfg["num_layers"], "embedding_dim": cfg["embedding_dim"]}


def measure(preset: str, train: str, folder: str, env: dict[str, str]) -> dict[str, Any]:
    """Both variants of one preset, alternating over --rounds rounds."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for round_ in range(FLAGS.rounds):
        order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            job_dir = os.path.join(folder, f"{preset}-{name}-{round_}")
            with bench.measuring(f"{preset} with {name} threads"):
                runs[name].append(train_blocks(preset, train, job_dir, FLAGS.steps,
                                               VARIANTS[name], env))
            shutil.rmtree(job_dir, ignore_errors=True)
    auto, tensorflow = runs["auto"], runs["tensorflow"]
    row = {"preset": preset, "precision": auto[0]["precision"], "rnn_units": auto[0]["rnn_units"],
           "auto_threads": auto[0]["threads"], "tensorflow_threads": tensorflow[0]["threads"],
           "auto_chars_per_sec": bench.median([r["chars_per_sec"] for r in auto]),
           "tensorflow_chars_per_sec": bench.median([r["chars_per_sec"] for r in tensorflow]),
           "ratio": bench.median([a["chars_per_sec"] / t["chars_per_sec"]
                                  for a, t in zip(auto, tensorflow)]),
           "rounds": runs}
    bench.require({f"{preset} {k}": row[k] for k in ("auto_chars_per_sec",
                                                     "tensorflow_chars_per_sec", "ratio")})
    return row


def markdown(result: dict[str, Any]) -> str:
    """The table: one row per preset."""
    rows = [[r["preset"], r["precision"], "{}, {}".format(*r["auto_threads"]),
             r["auto_chars_per_sec"], r["tensorflow_chars_per_sec"], f"{r['ratio']:.2f}x"]
            for r in result["presets"]]
    return bench.table(["preset", "precision", "auto: per op, at once (0 = TF's)",
                        "chars/s auto", "chars/s TF's pools", "auto / TF's"], rows)


def define_flags() -> None:
    """Defines this benchmark's flags."""
    flags.DEFINE_string("corpus", bench.DEFAULT_CORPUS, "A folder with train/*.txt and "
                        "val/*.txt shards, or one text file (its first 90% trains).")
    flags.DEFINE_list("presets", ["cpu", "quality"], "Presets from configs/ to time.")
    flags.DEFINE_integer("steps", 40, "Steps per block (3 blocks; the first is not timed).",
                         lower_bound=1)
    flags.DEFINE_integer("rounds", 2, "Rounds of both variants per preset.", lower_bound=1)
    flags.DEFINE_string("isa", "", "ONEDNN_MAX_CPU_ISA for every job (e.g. AVX2); empty: "
                        "the CPU's own.")
    flags.DEFINE_string("out", f"{bench.RESULTS_DIR}/cpu_threads.json", "JSON output.")


def main(argv: list[str]) -> int:
    """Times each preset both ways, prints the table, writes the JSON."""
    del argv
    bench.check_corpus(FLAGS.corpus)
    folder = tempfile.mkdtemp(prefix="bench-threads-")
    env = {"ONEDNN_MAX_CPU_ISA": FLAGS.isa} if FLAGS.isa else {}
    result: dict[str, Any] = {"benchmark": "cpu_threads", "machine": bench.machine(),
                              "isa": FLAGS.isa or None, "steps": FLAGS.steps,
                              "blocks": BLOCKS, "presets": []}
    try:
        text = bench.corpus(FLAGS.corpus, folder)
        result["corpus"] = text.description
        for preset in FLAGS.presets:
            print(f"timing --preset={preset} ...", file=sys.stderr, flush=True)
            result["presets"].append(measure(preset, text.train, folder, env))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    bench.report(markdown(result), FLAGS.out, result)
    return 0


if __name__ == "__main__":
    define_flags()
    bench.run_main(main)
