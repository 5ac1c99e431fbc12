"""Benchmark: validation loss reached within a wall-clock budget, against two anchors.

    python -m bench.quality [--corpus=data/shakespeare] [--presets=quality] [--minutes=3] \
        [--out=bench/results/quality.json] [--plot=bench/results/quality.png]

--corpus is a folder with train/*.txt and val/*.txt shards (the default is the one
`make data` writes: whole works held out for validation) or one text file, split
as nanoGPT's shakespeare_char splits it: the first 90% of the characters train,
the last 10% validate (the published figures: --corpus=PATH/tinyshakespeare.txt).
Without a corpus the benchmark stops at once with one line saying to run
`make data` or pass --corpus.

Each preset trains on the two parts through the job itself (`python -m
trainer.task --preset=NAME --train_data=... --val_data=... --train_minutes=MINUTES`),
in a subprocess. Reported, in nats/char and bits/char: the job's
`val_carried_loss` (the validation text read as --batch_size contiguous lanes with
the LSTM state carried from chunk to chunk, as the model is used to generate) and
its `val_loss` (--seq_length windows, each read from a zero state) beside it; the
chars trained on; and a plot of both against wall-clock from each job's
metrics.jsonl.

A job's own figures depend on its shape (more lanes, shorter windows: a higher
loss for the same weights), so each job's kept weights are also scored on one
common shape, `python -m trainer.evaluate --seq_length=100 --batch_size=64`
(--score_seq_length, --score_batch_size; 0 skips it): the columns to compare
presets of different shapes by.

Anchors, on tinyshakespeare.txt's 90/10 split only (other corpora are not
comparable with them): a Witten-Bell interpolated 5-gram character model, 1.6688
nats/char; nanoGPT's 10.7M-parameter transformer, 1.4697 (about 3 minutes on an
A100).

One run is one draw: its seed fixes the initial weights, the dropout masks and the
lanes' turns, and on this benchmark two seeds of one recipe can differ by a hundredth
of a nat. `--seeds=1,2,3` trains each preset once per seed (the job's `--seed`), one
after another, and adds each preset's mean, lowest and highest figure over its seeds
(`spread` in the JSON, a second table): the figure to compare recipes by.

A preset whose job fails, or reports no validation loss, stops the benchmark with
one `error:` line and exit status 1, and no result is written.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import flags

import bench

FLAGS = flags.FLAGS
ANCHORS = {"Witten-Bell 5-gram": 1.6688, "nanoGPT 10.7M transformer": 1.4697}


def train_preset(preset: str, train: str, val: str, job_dir: str, minutes: float,
                 extra: list[str]) -> dict[str, Any]:
    """Trains one preset through the job's entrypoint; returns its metrics per epoch."""
    command = [sys.executable, "-m", "trainer.task", f"--preset={preset}",
               f"--train_data={train}", f"--val_data={val}", f"--job_dir={job_dir}",
               f"--train_minutes={minutes:g}", *extra]
    load, start = bench.load(), time.time()
    with open(f"{job_dir}.log", "w", encoding="utf-8") as log:
        # Stopping the benchmark (SIGTERM: SystemExit) kills the job too: call() kills its
        # child when the wait is interrupted.
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    record: dict[str, Any] = {"preset": preset, "extra_flags": extra, "minutes": minutes,
                              "command": " ".join(shlex.quote(c) for c in command[1:]),
                              "exit_code": code, "wall_sec": time.time() - start,
                              "load_start": load, "load_end": bench.load()}
    metrics = os.path.join(job_dir, "metrics.jsonl")
    if code or not os.path.exists(metrics):
        with open(f"{job_dir}.log", encoding="utf-8") as f:
            record["error"] = f.read()[-2000:]
        return record
    with open(metrics, encoding="utf-8") as f:
        record["epochs"] = [json.loads(line) for line in f]
    with open(os.path.join(job_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    record["config"] = {k: cfg[k] for k in ("num_layers", "rnn_units", "embedding_dim",
                                            "dropout", "batch_size", "seq_length",
                                            "learning_rate", "lr_schedule", "epochs",
                                            "steps_per_epoch", "clipnorm", "warmup_steps",
                                            "weight_decay", "seed")}
    record["config"]["carry_state"] = cfg.get("carry_state", False)
    record["config"]["tokenizer"] = cfg.get("tokenizer", "char")
    record["config"]["max_vocab"] = cfg.get("max_vocab")
    record["vocab_size"] = _vocab_size(job_dir, record["config"]["tokenizer"])
    last = record["epochs"][-1]
    validated = _validated(record["epochs"])  # All of them but with --validation_freq.
    # Per character of the text whatever the tokenizer (older metrics: val_loss is per char).
    record["final_val_loss"] = per_char(last, "val")
    record["best_val_loss"] = min(per_char(e, "val") for e in validated)
    record["final_val_bpc"] = record["final_val_loss"] / math.log(2)
    record["final_val_loss_per_token"] = last["val_loss"]
    if "val_carried_loss" in last:
        record["final_val_carried_loss"] = per_char(last, "val_carried")
        record["best_val_carried_loss"] = min(per_char(e, "val_carried") for e in validated)
        record["final_val_carried_bpc"] = record["final_val_carried_loss"] / math.log(2)
    record["train_sec"] = last["elapsed_sec"]
    record["chars_trained"] = last.get("chars_trained",
                                       last["step"] * cfg["batch_size"] * cfg["seq_length"])
    record["chars_per_sec"] = record["chars_trained"] / max(record["train_sec"], 1e-9)
    record["sample"] = _last_sample(f"{job_dir}.log")
    return record


def _validated(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epochs a job validated."""
    return [e for e in epochs if "val_loss" in e]


def score(job_dir: str, val: str, seq_length: int, batch_size: int) -> dict[str, Any]:
    """The job's kept weights scored on `val` at one common shape, through trainer.evaluate.

    Returns:
      {"seq_length", "batch_size", "checkpoint", "carried", "windowed"}: nats per
      character of the text, carried over `batch_size` lanes and over windows of
      `seq_length` tokens.

    Raises:
      bench.BenchError: the evaluation failed (its last line says why).
    """
    command = [sys.executable, "-m", "trainer.evaluate", f"--job_dir={job_dir}",
               f"--data={val}", "--format=json", f"--seq_length={seq_length}",
               f"--batch_size={batch_size}"]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise bench.BenchError(f"scoring {job_dir} exited {done.returncode}: {last[:300]}")
    result = json.loads(done.stdout)
    return {"seq_length": seq_length, "batch_size": batch_size,
            "checkpoint": result["checkpoint"],
            "carried": result["carried"]["nats_per_char"],
            "windowed": result["windowed"]["nats_per_char"]}


def per_char(metrics: dict[str, Any], prefix: str) -> float:
    """A validation loss in nats per character of the text (`{prefix}_nats_per_char`)."""
    return metrics.get(f"{prefix}_nats_per_char", metrics[f"{prefix}_loss"])


def _vocab_size(job_dir: str, kind: str) -> int:
    from trainer.data import tokenization
    from trainer.data.vocabulary import Vocabulary

    def read(name: str) -> str | None:
        path = os.path.join(job_dir, name)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    return tokenization.load(kind, Vocabulary.from_json(read("vocab.json")), read).size


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """Every figure one preset's run must hold, by name (carried loss when the job has it)."""
    name = run.get("label") or run["preset"]
    names = ["final_val_loss", "best_val_loss", "train_sec", "chars_trained"]
    if "final_val_carried_loss" in run:
        names.append("final_val_carried_loss")
    found = {f"{name} {n}": run.get(n) for n in names}
    if "common" in run:
        found.update({f"{name} common {k}": run["common"][k] for k in ("carried", "windowed")})
    return found


def failure(run: dict[str, Any]) -> str:
    """One line on a failed job: its exit status and its last log line (its error)."""
    last = (run.get("error", "").strip().splitlines() or ["no output"])[-1]
    return (f"--preset={run['preset']} exited {run['exit_code']}: {last[:300]} (--keep_jobs=DIR "
            "keeps its log)")


def _last_sample(log_path: str) -> str:
    with open(log_path, encoding="utf-8") as f:
        text = f.read()
    marker = text.rfind("sample after epoch")
    if marker < 0:
        return ""
    lines = text[marker:].splitlines()[1:]
    body = []
    for line in lines:  # The sample runs until the next log line.
        if (line[:1] in "IWEF" and line[1:5].isdigit()) or line.startswith("done: "):
            break
        body.append(line)
    return "\n".join(body)


def plot(runs: list[dict[str, Any]], path: str, title: str) -> None:
    """Validation loss against wall-clock minutes, one line per run, with the anchors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        if "epochs" not in run:
            continue
        epochs = _validated(run["epochs"])
        minutes = [e["elapsed_sec"] / 60 for e in epochs]
        name = run.get("label") or run["preset"]
        line = ax.plot(minutes, [per_char(e, "val") for e in epochs], marker="o",
                       markersize=3, linestyle="--" if "final_val_carried_loss" in run else "-",
                       label=f"{name}, windowed: {run['final_val_loss']:.4f}")[0]
        if "final_val_carried_loss" in run:
            ax.plot(minutes, [per_char(e, "val_carried") for e in epochs], marker="o",
                    markersize=3, color=line.get_color(),
                    label=f"{name}, carried: {run['final_val_carried_loss']:.4f}")
    for (name, value), style in zip(ANCHORS.items(), ("--", ":")):
        ax.axhline(value, color="gray", linestyle=style, label=f"{name}: {value}")
    ax.set_xlabel("wall-clock minutes of training (epoch ends, validation included)")
    ax.set_ylabel("validation loss (nats/char); dashed: windowed, solid: carried state")
    ax.set_ylim(1.35, 2.6)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table, with its setup above it and the anchors below."""
    m = result["machine"]
    lines = [f"quality on {m['cpu']} ({m['cores']} cores, {len(m.get('gpus', []))} GPU), "
             f"corpus {result['corpus']}\n"]
    rows = []
    common = next((run["common"] for run in result["runs"] if "common" in run), None)
    for run in result["runs"]:
        carried = run.get("final_val_carried_loss", run["final_val_loss"])
        beats = [name for name, v in ANCHORS.items() if carried < v]
        kept = run.get("common", {})
        rows.append([run.get("label") or run["preset"], run["minutes"], run["train_sec"] / 60,
                     _fmt(run.get("final_val_carried_loss")),
                     _fmt(run.get("final_val_carried_bpc")),
                     _fmt(run.get("best_val_carried_loss")),
                     f"{run['final_val_loss']:.4f}", f"{run['final_val_bpc']:.4f}",
                     f"{run['best_val_loss']:.4f}",
                     *([_fmt(kept.get(k)) for k in ("carried", "windowed")]
                       if common else []),
                     run["chars_trained"],
                     f"{run.get('chars_per_sec', 0):,.0f}",
                     f"{run['config'].get('tokenizer', 'char')} {run.get('vocab_size', '')}",
                     f"{run['load_start'][0]:.1f} -> {run['load_end'][0]:.1f}",
                     ", ".join(beats) or "none"])
    lines.append(bench.table(["run", "budget min", "trained min", "carried val nats/char",
                              "carried bits/char", "best carried", "windowed val nats/char",
                              "windowed bits/char", "best windowed",
                              *([f"kept weights: carried, {common['batch_size']} lanes",
                                 f"kept weights: windowed, {common['seq_length']} tokens"]
                                if common else []),
                              "chars trained",
                              "chars/s", "tokenizer, ids", "load",
                              "carried beats"], rows))
    if result.get("spread"):
        lines.append("over the seeds:\n" + _spread_table(result["spread"]))
    lines += [f"anchor {name}: {v} nats/char ({v / math.log(2):.4f} bits/char)"
              for name, v in ANCHORS.items()]
    return "\n".join(lines) + "\n"


def spread(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each preset's figures over its seeds (`--seeds`): mean, lowest and highest.

    Args:
      runs: the result's runs; those with a "seed" are grouped by their "name".

    Returns:
      One row per name trained with more than one seed: {"name", "seeds", and for each
      figure the runs have ("carried", "windowed", and the kept weights' "common
      carried" / "common windowed"), {"mean", "min", "max"}}.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if "seed" in run:
            groups.setdefault(run["name"], []).append(run)
    rows = []
    for name, group in groups.items():
        if len(group) < 2:
            continue
        values = {"carried": [r.get("final_val_carried_loss") for r in group],
                  "windowed": [r["final_val_loss"] for r in group],
                  "common carried": [r.get("common", {}).get("carried") for r in group],
                  "common windowed": [r.get("common", {}).get("windowed") for r in group]}
        row: dict[str, Any] = {"name": name, "seeds": [r["seed"] for r in group]}
        for key, found in values.items():
            if None not in found:
                row[key] = {"mean": sum(found) / len(found), "min": min(found),
                            "max": max(found)}
        rows.append(row)
    return rows


def _spread_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in ("carried", "windowed", "common carried", "common windowed")
            if all(k in row for row in rows)]
    return bench.table(
        ["run", "seeds", *(f"{k} mean (min-max)" for k in keys)],
        [[row["name"], ", ".join(map(str, row["seeds"])),
          *(f"{row[k]['mean']:.4f} ({row[k]['min']:.4f}-{row[k]['max']:.4f})" for k in keys)]
         for row in rows])


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def define_flags() -> None:
    """Defines this benchmark's flags."""
    flags.DEFINE_string("corpus", bench.DEFAULT_CORPUS, "A folder with train/*.txt and "
                        "val/*.txt shards, or one text file to split 90/10 by characters.")
    flags.DEFINE_list("presets", ["quality"], "Presets from configs/ to train, one after "
                      "another.")
    flags.DEFINE_float("minutes", 3.0, "Training budget per preset (--train_minutes); 15 "
                       "for the real run.")
    flags.DEFINE_string("label", None, "Name of the run in the table and plot (one preset).")
    flags.DEFINE_list("seeds", [], "Train each preset once per seed (the job's --seed), "
                      "and report the spread over them; empty: the preset's own seed once.")
    flags.register_validator("seeds", lambda v: all(x.strip().isdigit() for x in v),
                             "--seeds takes whole numbers, e.g. --seeds=1,2,3")
    flags.DEFINE_multi_string("flag", [], "Extra flag for every job, e.g. "
                              "--flag=--rnn_units=512 (repeatable).")
    flags.DEFINE_string("out", f"{bench.RESULTS_DIR}/quality.json", "JSON output.")
    flags.DEFINE_string("plot", f"{bench.RESULTS_DIR}/quality.png", "PNG plot; empty: none.")
    flags.DEFINE_list("also_plot", [], "Earlier quality JSON files whose runs join the plot.")
    flags.DEFINE_string("keep_jobs", None, "Keep the job folders under this folder.")
    flags.DEFINE_integer("score_seq_length", 100, "Also score each job's kept weights on "
                         "windows (and carried chunks) of this many tokens, one shape for "
                         "every preset; 0 = do not.", lower_bound=0)
    flags.DEFINE_integer("score_batch_size", 64, "... and over this many carried lanes.",
                         lower_bound=1)


def main(argv: list[str]) -> int:
    """Trains each preset, prints the table, writes the JSON and the plot."""
    del argv
    bench.check_corpus(FLAGS.corpus)
    folder = tempfile.mkdtemp(prefix="bench-quality-")
    jobs = FLAGS.keep_jobs or folder
    os.makedirs(jobs, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "quality", "machine": bench.machine(),
                              "corpus": FLAGS.corpus, "anchors": ANCHORS, "runs": []}
    try:
        text = bench.corpus(FLAGS.corpus, folder)
        result["corpus"] = text.description
        seeds = [int(s) for s in FLAGS.seeds] or [None]
        for preset, seed in ((p, s) for p in FLAGS.presets for s in seeds):
            name = FLAGS.label if FLAGS.label and len(FLAGS.presets) == 1 else preset
            label = name if seed is None else f"{name} seed {seed}"
            job_dir = os.path.join(jobs, f"{label.replace(' ', '-')}-{time.strftime('%H%M%S')}")
            print(f"training --preset={preset}{'' if seed is None else f' --seed={seed}'} for "
                  f"{FLAGS.minutes:g} minutes ...", file=sys.stderr, flush=True)
            run = train_preset(preset, text.train, text.val, job_dir, FLAGS.minutes,
                               FLAGS.flag + ([] if seed is None else [f"--seed={seed}"]))
            run["label"] = label if label != preset else None
            if seed is not None:
                run["name"], run["seed"] = name, seed
            if "error" in run:
                raise bench.BenchError(failure(run))
            if FLAGS.score_seq_length:
                run["common"] = score(job_dir, text.val, FLAGS.score_seq_length,
                                      FLAGS.score_batch_size)
            bench.require(figures(run))
            result["runs"].append(run)
        result["spread"] = spread(result["runs"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(markdown(result))
    bench.write_result(FLAGS.out, result)
    if FLAGS.plot:
        runs = list(result["runs"])
        for path in FLAGS.also_plot:
            with open(path, encoding="utf-8") as f:
                runs += json.load(f)["runs"]
        plot(runs, FLAGS.plot, f"{result['corpus']}\n{result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores")
        print(f"wrote {FLAGS.plot}", file=sys.stderr)
    print(f"wrote {FLAGS.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    define_flags()
    bench.run_main(main)
