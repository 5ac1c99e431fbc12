"""Benchmark: training chars/s of the job's own loop against plain Keras `model.fit`.

    python -m bench.train_throughput [--corpus=data/shakespeare] [--models=1x256,2x512] \
        [--rounds=2] [--long] [--out=bench/results/train_throughput.json]

--corpus is a folder with train/*.txt and val/*.txt shards (the default is the one
`make data` writes) or one text file, which is split 90/10 by characters as nanoGPT
splits it; the published figures used tinyshakespeare.txt that way
(--corpus=PATH/tinyshakespeare.txt). Both paths train on the training part only. Without
a corpus the benchmark stops at once with one line saying to run `make data` or pass
--corpus.

Variants, interleaved round by round because the machine may be shared:

- ours: `trainer.training.train.train` (streaming pipeline, strategy, custom step,
  checkpoints, reporting; no per-epoch sample) with --steps_per_epoch=N; the
  chars/s of every epoch after the first (which traces) from its metrics.jsonl.
- keras fit: the same `models.build_model`, the training text encoded with the
  job's vocabulary (built from `trainer.data.index.build`'s counts) as one
  tensor, fed the TF text-generation tutorial's way:
  `Dataset.from_tensor_slices(ids).batch(seq + 1).map(split).shuffle.batch`,
  `model.compile(Adam(global_clipnorm))` and `model.fit`, timed per epoch.

Models (--models): 1x256 (no dropout), 2x512 (the Config() defaults, dropout 0.2)
and 1x32 (a size for smoke tests: a run takes seconds), each with and without XLA
(`jit_compile`; 2x512 with XLA only with --long: XLA is slower than the default
kernels for these LSTMs on a CPU, and a 2x512 step takes seconds). Claim: ours >=
0.95x the baseline. And, for reference, useful targets per second of the
tutorial's 'last' objective (one target per stride-1 window) against 'sequence'
(every position), through the job, on 1x256 (or the first model given without it).

Every figure must be measured: a variant that fails stops the benchmark with one
`error:` line and exit status 1, and no result is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

import bench

FLAGS = flags.FLAGS
TARGET = 0.95
SEQ_LENGTH = 100
# The Config() defaults are the 2x512 model (dropout 0.2, batch 256).
MODELS = {
    "1x256": {"num_layers": 1, "rnn_units": 256, "dropout": 0.0, "batch_size": 256},
    "2x512": {},
    "1x32": {"num_layers": 1, "rnn_units": 32, "embedding_dim": 16, "dropout": 0.0,
             "batch_size": 16},
}
DEFAULT_MODELS = ["1x256", "2x512"]
# The model whose XLA variant and objective comparison are slow enough to need --long.
BIG = "2x512"


def config(train: str, job_dir: str, model: str, xla: bool, steps: int, epochs: int, **extra):
    """The job's Config for one measurement of `model` (a name of MODELS), validated."""
    from trainer.config import Config

    return Config(train_data=train, job_dir=job_dir, steps_per_epoch=steps, epochs=epochs,
                  sample_length=0, jit_compile=xla, seq_length=SEQ_LENGTH,
                  **MODELS[model], **extra).validate()


def ours(cfg) -> dict[str, Any]:
    """Runs the job; steady-state chars/s from its metrics (epochs after the first)."""
    from trainer.training import train

    train.train(cfg)
    with open(os.path.join(cfg.job_dir, "metrics.jsonl"), encoding="utf-8") as f:
        epochs = [json.loads(line) for line in f]
    steady = epochs[1:]
    chars_per_epoch = cfg.steps_per_epoch * cfg.batch_size * cfg.seq_length
    wall = epochs[-1]["elapsed_sec"] - epochs[0]["elapsed_sec"]
    return {"chars_per_sec": bench.median([e["chars_per_sec"] for e in steady]),
            "epochs_chars_per_sec": [e["chars_per_sec"] for e in epochs],
            # Between the first and last epoch's end: checkpoints and reporting included.
            "end_to_end_chars_per_sec": chars_per_epoch * len(steady) / wall}


def keras_fit(cfg) -> dict[str, Any]:
    """The tutorial's in-memory dataset and model.fit, on the library's model."""
    import keras
    import tensorflow as tf

    from trainer import models, storage
    from trainer.data import index, vocabulary

    paths = storage.expand_patterns(cfg.train_data)
    # The job's vocabulary: built from the same scan's counts the job builds it from.
    counts = index.build(paths, [], lowercase=cfg.lowercase, piece_bytes=cfg.piece_bytes).counts
    vocab = vocabulary.Vocabulary.from_counts(counts, cfg.lowercase)
    ids = vocab.encode("".join(vocabulary.decode(storage.read_bytes(p), cfg.lowercase)[0]
                               for p in paths))

    def split(chunk):
        chunk = tf.cast(chunk, tf.int32)
        return chunk[:-1], chunk[1:]

    ds = (tf.data.Dataset.from_tensor_slices(ids).batch(cfg.seq_length + 1, drop_remainder=True)
          .map(split).shuffle(10_000, seed=cfg.seed).batch(cfg.batch_size, drop_remainder=True)
          .repeat().prefetch(tf.data.AUTOTUNE))
    keras.utils.set_random_seed(cfg.seed)
    model = models.build_model(cfg, vocab.size)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate,
                                                  global_clipnorm=cfg.clipnorm or None),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=cfg.jit_compile)
    seconds: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    model.fit(ds, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, callbacks=[Timer()],
              verbose=0)
    chars = cfg.steps_per_epoch * cfg.batch_size * cfg.seq_length
    return {"chars_per_sec": bench.median([chars / s for s in seconds[1:]]),
            "epochs_chars_per_sec": [chars / s for s in seconds]}


def default_steps(model: str, xla: bool) -> int:
    """Steps per epoch that make a timed epoch take some 10-30 s on 2 cores."""
    if model == BIG:
        return 3
    return 4 if xla else 8


def variants(long: bool, models: list[str], steps: int | None) -> list[dict[str, Any]]:
    """(model, path, xla) combinations measured each round, with their steps per epoch.

    Args:
      long: more steps, and the big model with XLA too.
      models: names of MODELS.
      steps: steps per epoch for every variant; None: `default_steps`.
    """
    out = []
    for model in models:
        for xla in (False, True):
            if xla and model == BIG and not long:
                continue
            n = steps or default_steps(model, xla) * (2 if long else 1)
            for path in ("ours", "keras fit"):
                out.append({"model": model, "path": path, "xla": xla, "steps": n})
    return out


def name(variant: dict[str, Any]) -> str:
    """How a variant is named in progress lines and errors."""
    return f"{variant['path']} ({variant['model']}, XLA {'on' if variant['xla'] else 'off'})"


def run(corpus: str, rounds: int, epochs: int, long: bool, models: list[str],
        steps: int | None = None) -> dict[str, Any]:
    """All variants, `rounds` times interleaved, plus the objective comparison.

    Args:
      corpus: the --corpus path (see the module docstring).
      rounds: interleaved rounds; the median of each variant counts.
      epochs: epochs per measurement, the first of which (tracing) is not counted.
      long: see `variants`.
      models: names of MODELS.
      steps: steps per epoch for every variant; None: `default_steps`.

    Returns:
      The JSON-ready result.

    Raises:
      bench.BenchError: a variant could not be measured.
    """
    import keras
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    folder = tempfile.mkdtemp(prefix="bench-train-")
    todo = variants(long, models, steps)
    results: dict[str, Any] = {"benchmark": "train_throughput", "machine": bench.machine(),
                               "rounds": rounds, "epochs": epochs, "seq_length": SEQ_LENGTH}
    try:
        text = bench.corpus(corpus, os.path.join(folder, "corpus"))
        results["corpus"] = text.description
        runs = 0

        def measure(variant, **extra) -> dict[str, Any]:
            nonlocal runs
            runs += 1
            keras.backend.clear_session()
            cfg = config(text.train, os.path.join(folder, f"job-{runs}"), variant["model"],
                         variant["xla"], variant["steps"], epochs, **extra)
            load = bench.load()[0]
            # Progress bars go to stderr: stdout is the table.
            with bench.measuring(name(variant)), contextlib.redirect_stdout(sys.stderr):
                out = (ours if variant["path"] == "ours" else keras_fit)(cfg)
            bench.require({f"{name(variant)} chars/s": out["chars_per_sec"]})
            return {**out, "load_1min": load, "load_after": bench.load()[0],
                    "batch_size": cfg.batch_size}

        for round_ in range(rounds):
            for variant in todo:
                variant.setdefault("runs", []).append(measure(variant))
                print(f"round {round_ + 1}: {name(variant)}: "
                      f"{variant['runs'][-1]['chars_per_sec']:,.0f} chars/s", file=sys.stderr,
                      flush=True)
        objectives = []
        model = "1x256" if "1x256" in models else models[0]
        for objective, shift in (("sequence", 0), ("last", 1)):
            variant = {"model": model, "path": "ours", "xla": False,
                       "steps": steps or default_steps(model, False)}
            out = measure(variant, objective=objective, window_shift=shift)
            targets_per_window = SEQ_LENGTH if objective == "sequence" else 1
            windows = out["chars_per_sec"] / SEQ_LENGTH
            objectives.append({"objective": objective, "model": model,
                               "window_shift": shift or SEQ_LENGTH,
                               "windows_per_sec": windows,
                               "targets_per_sec": windows * targets_per_window,
                               "load_1min": out["load_1min"]})
        results["objectives"] = objectives
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for variant in todo:
        variant["chars_per_sec"] = bench.median([r["chars_per_sec"] for r in variant["runs"]])
    results["variants"] = todo
    results["ratios"] = ratios(todo)
    results["machine"]["load_end"] = bench.load()
    bench.require(figures(results))
    return results


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Every figure the result must hold, by name."""
    out = {f"{name(v)} chars/s": v["chars_per_sec"] for v in result["variants"]}
    out.update({f"ours / keras fit ({r['model']}, XLA {'on' if r['xla'] else 'off'})":
                r["median"] for r in result["ratios"]})
    out.update({f"{o['objective']} objective targets/s": o["targets_per_sec"]
                for o in result["objectives"]})
    return out


def ratios(todo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours / keras fit per (model, xla), per round (same round: same load) and median."""
    out = []
    for mine in (v for v in todo if v["path"] == "ours"):
        base = next(v for v in todo if v["path"] != "ours" and v["model"] == mine["model"]
                    and v["xla"] == mine["xla"])
        per_round = [a["chars_per_sec"] / b["chars_per_sec"]
                     for a, b in zip(mine["runs"], base["runs"])]
        value = bench.median(per_round)
        out.append({"model": mine["model"], "xla": mine["xla"], "per_round": per_round,
                    "median": value, "target": TARGET, "met": value >= TARGET})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as markdown tables: variants, ratios against the claim, objectives."""
    m = result["machine"]
    lines = [f"training throughput on {m['cpu']} ({m['cores']} cores), TF "
             f"{m.get('tensorflow')}, load {m['load']} at start, {m['load_end']} at end; "
             f"corpus {result['corpus']}; seq_length {result['seq_length']}, "
             f"{result['rounds']} interleaved round(s) of {result['epochs']} epochs each, "
             "first epoch (tracing) excluded; 2x512 = the Config() defaults (dropout 0.2)\n"]
    rows = []
    for v in result["variants"]:
        e2e = [r.get("end_to_end_chars_per_sec") for r in v["runs"]]
        rows.append([v["model"], v["path"], "on" if v["xla"] else "off", v["runs"][0]["batch_size"],
                     v["steps"], v["chars_per_sec"],
                     ", ".join(f"{r['chars_per_sec']:,.0f}" for r in v["runs"]),
                     bench.median([x for x in e2e if x]) if e2e[0] else float("nan"),
                     ", ".join(f"{r['load_1min']:.1f}" for r in v["runs"])])
    lines.append(bench.table(["model", "path", "XLA", "batch", "steps/epoch",
                              "chars/s (median)", "per round", "ours end-to-end chars/s",
                              "load per round"], rows))
    rows = [[r["model"], "on" if r["xla"] else "off", r["median"],
             ", ".join(f"{x:.2f}" for x in r["per_round"]), f">= {r['target']}",
             "met" if r["met"] else "MISSED"] for r in result["ratios"]]
    lines.append(bench.table(["model", "XLA", "ours / keras fit", "per round", "target", ""],
                             rows))
    rows = [[o["objective"], o["window_shift"], o["windows_per_sec"], o["targets_per_sec"],
             o["load_1min"]] for o in result["objectives"]]
    if rows:
        model = result["objectives"][0].get("model", "1x256")
        lines.append(bench.table([f"objective ({model}, ours)", "window shift", "windows/s",
                                  "useful targets/s", "load"], rows))
    return "\n".join(lines)


def define_flags() -> None:
    """Defines this benchmark's flags."""
    flags.DEFINE_string("corpus", bench.DEFAULT_CORPUS, "A folder with train/*.txt and "
                        "val/*.txt shards, or one text file (split 90/10 by characters); "
                        "training reads the training part.")
    flags.DEFINE_bool("long", False, "More steps per epoch and rounds, and 2x512 with XLA.")
    flags.DEFINE_integer("rounds", None, "Interleaved rounds (default 2, 3 with --long).",
                         lower_bound=1)
    flags.DEFINE_integer("epochs", 2, "Epochs per measurement; the first (tracing) is not "
                         "counted.", lower_bound=2)
    flags.DEFINE_integer("steps", None, "Steps per epoch of every variant (default: sized "
                         "for 10-30 s epochs on 2 cores).", lower_bound=1)
    flags.DEFINE_list("models", DEFAULT_MODELS, f"Models to measure, of {', '.join(MODELS)} "
                      "(2x512 is the Config() default model; 1x32 is for smoke tests).")
    flags.DEFINE_string("out", f"{bench.RESULTS_DIR}/train_throughput.json", "JSON output.")


def main(argv: list[str]) -> int:
    """Measures, prints the tables, writes the JSON; see the module docstring."""
    del argv
    rounds = FLAGS.rounds or (3 if FLAGS.long else 2)
    unknown = set(FLAGS.models) - set(MODELS)
    if unknown or not FLAGS.models:
        raise app.UsageError(f"unknown --models {sorted(unknown)}; choose from {list(MODELS)}")
    bench.check_corpus(FLAGS.corpus)  # Before TensorFlow loads: a missing corpus fails at once.
    result = run(FLAGS.corpus, rounds, FLAGS.epochs, FLAGS.long, FLAGS.models, FLAGS.steps)
    bench.report(markdown(result), FLAGS.out, result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    bench.run_main(main)
