"""Benchmark: training chars/s of one preset at several LSTM widths (--rnn_units).

    python -m bench.lstm_width [--corpus=data/shakespeare] [--preset=quality] \
        [--widths=240,248,256,264] [--steps=40] [--rounds=2] [--isa=AVX2] \
        [--flag=--intra_op_threads=1 ...] [--out=bench/results/lstm_width.json]

Each width trains through `python -m trainer.task` for 3 blocks of --steps steps (no
validation, no sample, --train_minutes=0), the widths in turn and in reverse order
round by round because the machine may be shared. Figures: chars/s over the blocks after
the first (which traces the step), the median over rounds; the LSTMs' arithmetic per
character (multiply-adds of the gate products, forward and backward: 6 x 4 x units x
(inputs + units) per layer) over a step's time, in GFLOP/s, so a width that runs slowly
for its arithmetic stands out beside its neighbours. In float32 without AVX-512
(`--isa=AVX2`), oneDNN runs power-of-two widths slowly: the job warns about them, and the
`quality` preset uses 248 units, not 256.

Each row records the precision and the CPU threads its job resolved (config.json): auto
threads change at widths above 256 (`distribution.SMALL_MODEL_UNITS`), so pass
--flag=--intra_op_threads=N --flag=--inter_op_threads=M to hold them fixed across widths.
A job that fails stops the benchmark with one `error:` line and exit status 1, and no
result is written.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from absl import flags

import bench
from bench.cpu_threads import BLOCKS, train_blocks

FLAGS = flags.FLAGS


def lstm_flops_per_char(units: int, layers: int, embedding_dim: int) -> float:
    """Floating-point operations of the LSTM gate products per character of a training
    step: forward and backward (3 products of 2 operations per multiply-add)."""
    inputs = [embedding_dim] + [units] * (layers - 1)
    return sum(6.0 * 4 * units * (n + units) for n in inputs)


def measure(train: str, folder: str, env: dict[str, str]) -> list[dict[str, Any]]:
    """Every width over --rounds rounds, alternating the order; one row per width."""
    widths = [int(w) for w in FLAGS.widths]
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in widths}
    for round_ in range(FLAGS.rounds):
        for width in (widths if round_ % 2 == 0 else list(reversed(widths))):
            job_dir = os.path.join(folder, f"{width}-{round_}")
            with bench.measuring(f"--preset={FLAGS.preset} --rnn_units={width}"):
                runs[width].append(train_blocks(FLAGS.preset, train, job_dir, FLAGS.steps,
                                                [f"--rnn_units={width}", *FLAGS.flag], env))
            shutil.rmtree(job_dir, ignore_errors=True)
    rows = []
    for width in widths:
        first = runs[width][0]
        chars_per_sec = bench.median([r["chars_per_sec"] for r in runs[width]])
        flops = lstm_flops_per_char(width, first["num_layers"], first["embedding_dim"])
        rows.append({"rnn_units": width, "precision": first["precision"],
                     "threads": first["threads"], "chars_per_sec": chars_per_sec,
                     "lstm_gflops": chars_per_sec * flops / 1e9, "rounds": runs[width]})
    bench.require({f"--rnn_units={r['rnn_units']} {k}": r[k] for r in rows
                   for k in ("chars_per_sec", "lstm_gflops")})
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The table: one row per width."""
    rows = [[r["rnn_units"], r["precision"], "{}, {}".format(*r["threads"]),
             r["chars_per_sec"], f"{r['lstm_gflops']:.1f}"] for r in result["widths"]]
    return bench.table(["rnn_units", "precision", "threads per op, at once (0 = TF's)",
                        "chars/s", "LSTM GFLOP/s"], rows)


def define_flags() -> None:
    """Defines this benchmark's flags."""
    flags.DEFINE_string("corpus", bench.DEFAULT_CORPUS, "A folder with train/*.txt and "
                        "val/*.txt shards, or one text file (its first 90% trains).")
    flags.DEFINE_string("preset", "quality", "Preset from configs/ to time.")
    flags.DEFINE_list("widths", ["240", "248", "256", "264"], "--rnn_units values to time.")
    flags.DEFINE_integer("steps", 40, "Steps per block (3 blocks; the first is not timed).",
                         lower_bound=1)
    flags.DEFINE_integer("rounds", 2, "Rounds over every width.", lower_bound=1)
    flags.DEFINE_string("isa", "", "ONEDNN_MAX_CPU_ISA for every job (e.g. AVX2); empty: "
                        "the CPU's own.")
    flags.DEFINE_multi_string("flag", [], "Extra flag for every job, e.g. "
                              "--flag=--intra_op_threads=1 (repeatable).")
    flags.DEFINE_string("out", f"{bench.RESULTS_DIR}/lstm_width.json", "JSON output.")


def main(argv: list[str]) -> int:
    """Times each width, prints the table, writes the JSON."""
    del argv
    if not FLAGS.widths:
        raise bench.BenchError("--widths needs at least one width, e.g. --widths=248,256")
    bad = [w for w in FLAGS.widths if not w.isdigit() or int(w) < 1]
    if bad:
        raise bench.BenchError(f"--widths takes positive whole numbers, not {bad[0]!r}")
    bench.check_corpus(FLAGS.corpus)
    env = {"ONEDNN_MAX_CPU_ISA": FLAGS.isa} if FLAGS.isa else {}
    result: dict[str, Any] = {"benchmark": "lstm_width", "machine": bench.machine(),
                              "isa": FLAGS.isa or None, "preset": FLAGS.preset,
                              "extra_flags": list(FLAGS.flag), "steps": FLAGS.steps,
                              "blocks": BLOCKS}
    with tempfile.TemporaryDirectory(prefix="bench-width-") as folder:
        text = bench.corpus(FLAGS.corpus, folder)
        result["corpus"] = text.description
        print(f"timing --preset={FLAGS.preset} at --rnn_units={','.join(FLAGS.widths)} ...",
              file=sys.stderr, flush=True)
        result["widths"] = measure(text.train, folder, env)
    bench.report(markdown(result), FLAGS.out, result)
    return 0


if __name__ == "__main__":
    define_flags()
    bench.run_main(main)
