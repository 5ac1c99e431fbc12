"""Benchmark: the streaming window pipeline against materialising alternatives.

    python -m bench.input_pipeline [--speed_mb=30] [--rss_mb=10mb,1gb-one-file,1gb-10mb-shards] \
        [--train_windows_per_sec=N] [--out=bench/results/input_pipeline.json]

On synthetic corpora (random text with English-like character frequencies,
written as 10 MB shards into a temporary folder that is deleted afterwards), so
it needs no --corpus:

- Windows per second over one pass, from shards on disk to the last batch, of
  `trainer.data.window_pipeline.dataset` (default objective, seq_length 100) against
  (a) `tf.signal.frame` over the whole id array, materialised and shuffled, and
  (b) `Dataset.window().flat_map()` with a shuffle buffer. Rounds are
  interleaved (ours, a, b, ours, ...) because the machine may be shared; the
  median counts. Targets: ours >= 1.0x (a), and >= 20x the windows per second
  one training step of the default Config() model consumes here.
- Peak RSS of a subprocess that scans and iterates one epoch over one 10 MB file,
  one 1 GB file and the same 1 GB as 10 MB shards, three runs each (the median
  counts; RSS is also sampled through the pass to show it plateaus); target: it
  grows by less than 150 MB from 10 MB to 1 GB in either layout. The same runs
  time the scan (MB/s). (--rss_mb=1mb is a size for smoke tests.)
- Distinct pieces that feed 100 consecutive batches of a single-file corpus, and
  the fewest in any one batch (the target is --shard_cycle).
- For reference, the 2017 tutorial's numpy windows (stride 1, a python list of
  windows turned into a (n, 100, 1) float array) over 1.6M chars, in a
  subprocess: time and peak RSS.

The RSS and tutorial measurements run as child processes of bench/pipeline_memory.py.
Every figure asked for must be measured: one that cannot be (a failed child, too
little disk for a corpus) stops the benchmark with one `error:` line and exit
status 1, and no result is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from absl import app, flags

import bench
from bench import pipeline_memory
from bench.pipeline_memory import BATCH, SEQ_LENGTH, one_pass, ours, setup

FLAGS = flags.FLAGS
# Targets from the streaming input issue.
TARGET_VS_FRAME = 1.0
TARGET_VS_TRAINING = 20.0
TARGET_RSS_GROWTH_MB = 150.0


def _all_ids(vocab, regions):
    """The whole corpus as one id array, read and encoded with the job's own functions."""
    import numpy as np

    from trainer.data import window_pipeline

    return np.concatenate([window_pipeline.load_region_ids(r, vocab, False) for r in regions])


def pieces_per_batches(built, batches: int = 100) -> dict[str, Any]:
    """How many distinct pieces feed `batches` consecutive batches (from the plan alone)."""
    from trainer.data import window_pipeline

    cfg, _, regions, _ = built
    counts = [window_pipeline.num_windows(r.length, cfg.window, cfg.shift) for r in regions]
    plan = window_pipeline.plan(counts, [[i] for i in range(len(regions))], BATCH,
                               min(cfg.shard_cycle, len(regions)), cfg.seed, 0, True)
    per_batch, seen = [], set()
    for takes in list(plan)[:batches]:
        per_batch.append(len({t[0] for t in takes}))
        seen.update(t[0] for t in takes)
    return {"pieces": len(regions), "batches": len(per_batch), "distinct_pieces": len(seen),
            "fewest_per_batch": min(per_batch), "shard_cycle": cfg.shard_cycle}


def _split(windows):
    """(x, y) of a batch of windows: every char but the last, every char but the first."""
    import tensorflow as tf

    windows = tf.cast(windows, tf.int32)
    return windows[:, :-1], windows[:, 1:]


def frame(cfg, vocab, regions, steps):
    """(a) tf.signal.frame over the whole id array: every window held in memory at once."""
    import tensorflow as tf

    frames = tf.signal.frame(tf.constant(_all_ids(vocab, regions)), cfg.window, cfg.shift)
    frames = tf.random.shuffle(frames, seed=cfg.seed)
    ds = tf.data.Dataset.from_tensor_slices(frames).batch(BATCH, drop_remainder=True)
    return ds.map(_split, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def window_flat_map(cfg, vocab, regions, steps):
    """(b) Dataset.window().flat_map(): one element per char, windows assembled by tf.data."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(_all_ids(vocab, regions))
    ds = ds.window(cfg.window, shift=cfg.shift, drop_remainder=True)
    ds = ds.flat_map(lambda w: w.batch(cfg.window, drop_remainder=True))
    ds = ds.shuffle(10_000, seed=cfg.seed).batch(BATCH, drop_remainder=True)
    return ds.map(_split, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def speed(speed_mb: int, rounds: int, flat_map_batches: int, folder: str) -> dict[str, Any]:
    """Interleaved rounds of the three pipelines over one synthetic corpus."""
    bench.write_corpus(os.path.join(folder, "speed"), speed_mb * 1000 * 1000, seed=1,
                       one_file=True)
    built = setup(os.path.join(folder, "speed", "*.txt"))
    variants = {"ours (window_pipeline.dataset)": (ours, -1),
                "(a) tf.signal.frame, materialised": (frame, -1),
                # So slow that only the first batches are timed (setup included).
                f"(b) Dataset.window().flat_map(), first {flat_map_batches} batches":
                    (window_flat_map, flat_map_batches)}
    for make, _ in variants.values():  # Warm-up: traces every function once.
        one_pass(make, built, 1)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    loads = []
    for _ in range(rounds):
        loads.append(bench.load()[0])
        for name, (make, batches) in variants.items():
            windows, seconds, cpu_seconds = one_pass(make, built, batches)
            wall[name].append(windows / seconds)
            cpu[name].append(windows / cpu_seconds)
    ours_name, frame_name = list(variants)[:2]
    ratios = [o / f for o, f in zip(wall[ours_name], wall[frame_name])]
    cpu_ratios = [o / f for o, f in zip(cpu[ours_name], cpu[frame_name])]
    return {"corpus_mb": speed_mb, "windows_per_pass": built[3] * BATCH, "rounds": rounds,
            "load_1min": loads, "windows_per_sec": wall, "windows_per_cpu_sec": cpu,
            "median_windows_per_sec": {k: bench.median(v) for k, v in wall.items()},
            "median_windows_per_cpu_sec": {k: bench.median(v) for k, v in cpu.items()},
            "ours_vs_frame_per_round": ratios, "ours_vs_frame": bench.median(ratios),
            "ours_vs_frame_cpu": bench.median(cpu_ratios),
            "single_file_mixing": pieces_per_batches(built)}


def training_windows_per_sec(folder: str) -> float:
    """Windows/s one training step of the default Config() model takes, via the job itself."""
    from trainer.config import Config
    from trainer.training import train

    job_dir = os.path.join(folder, "train-job")
    cfg = Config(train_data=os.path.join(folder, "speed", "*.txt"), job_dir=job_dir,
                 steps_per_epoch=3, epochs=2, sample_length=0, checkpoint_every_steps=0)
    train.train(cfg.validate())
    with open(os.path.join(job_dir, "metrics.jsonl"), encoding="utf-8") as f:
        last = [json.loads(line) for line in f][-1]  # The second epoch: traced already.
    return last["chars_per_sec"] / cfg.seq_length


def run(speed_mb: int, rounds: int, flat_map_batches: int, rss_mb: list[str],
        shard_cycle: int, rss_repeats: int, tutorial_chars: int, train_wps: float | None,
        tmp_root: str | None) -> dict[str, Any]:
    """Every measurement of this benchmark, in one temporary folder deleted at the end."""
    folder = tempfile.mkdtemp(prefix="bench-input-", dir=tmp_root)
    try:
        result: dict[str, Any] = {"benchmark": "input_pipeline", "machine": bench.machine(),
                                  "seq_length": SEQ_LENGTH, "batch": BATCH}
        with bench.measuring("the pipeline speeds"):
            result["speed"] = speed(speed_mb, rounds, flat_map_batches, folder)
        if train_wps is None:
            with bench.measuring("the default model's training windows/s"):
                train_wps = training_windows_per_sec(folder)
            result["training_source"] = "measured here: 3-step epochs of Config() defaults"
        else:
            result["training_source"] = "given (--train_windows_per_sec)"
        result["training_windows_per_sec"] = train_wps
        result["ours_vs_training"] = (
            result["speed"]["median_windows_per_sec"]["ours (window_pipeline.dataset)"] / train_wps)
        result["memory"] = pipeline_memory.memory(rss_mb, folder, shard_cycle, rss_repeats)
        if tutorial_chars:
            result["tutorial"] = pipeline_memory.child(f"--child_tutorial={tutorial_chars}")
            if "error" in result["tutorial"]:
                raise bench.BenchError(f"the tutorial's numpy windows: "
                                       f"{result['tutorial']['error']}")
        else:
            result["tutorial"] = {"skipped": "--tutorial_chars=0"}
        result["machine"]["load_end"] = bench.load()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["targets"] = targets(result)
    bench.require(figures(result))
    return result


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Every figure the result must hold, by name (the tutorial's only when it ran)."""
    speed_ = result["speed"]
    out = {f"{name} windows/s": value
           for name, value in speed_["median_windows_per_sec"].items()}
    out.update({"ours / (a)": speed_["ours_vs_frame"],
                "training windows/s": result["training_windows_per_sec"],
                "ours / training": result["ours_vs_training"],
                "fewest pieces per batch": speed_["single_file_mixing"]["fewest_per_batch"]})
    out.update({f"peak RSS over {row['layout']} MiB": row.get("peak_rss_mb")
                for row in result["memory"]})
    if "skipped" not in result["tutorial"]:
        out["tutorial peak RSS MiB"] = result["tutorial"].get("peak_rss_mb")
    out.update({f"target {name}": t["value"] for name, t in result["targets"].items()})
    return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue with the measured value and whether it was met."""
    out = {"ours_vs_frame": {"target": f">= {TARGET_VS_FRAME}",
                             "value": result["speed"]["ours_vs_frame"]},
           "ours_vs_training": {"target": f">= {TARGET_VS_TRAINING}",
                                "value": result["ours_vs_training"]}}
    out["ours_vs_frame"]["met"] = out["ours_vs_frame"]["value"] >= TARGET_VS_FRAME
    out["ours_vs_training"]["met"] = out["ours_vs_training"]["value"] >= TARGET_VS_TRAINING
    rows = {r["layout"]: r for r in result["memory"] if "peak_rss_mb" in r}
    for big in ("1gb-one-file", "1gb-10mb-shards"):
        if "10mb" in rows and big in rows:
            growth = rows[big]["peak_rss_mb"] - rows["10mb"]["peak_rss_mb"]
            out[f"rss_growth_10mb_to_{big}"] = {
                "target": f"< {TARGET_RSS_GROWTH_MB} MB (medians)", "value": growth,
                "met": growth < TARGET_RSS_GROWTH_MB,
                "worst_case": rows[big]["peak_rss_max_mb"] - min(
                    r["peak_rss_mb"] for r in rows["10mb"]["runs"] if "peak_rss_mb" in r)}
    mixing = result["speed"]["single_file_mixing"]
    out["single_file_pieces_per_batch"] = {
        "target": f">= {mixing['shard_cycle']} (--shard_cycle)",
        "value": mixing["fewest_per_batch"],
        "met": mixing["fewest_per_batch"] >= min(mixing["shard_cycle"], mixing["pieces"])}
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as markdown tables."""
    speed_ = result["speed"]
    m = result["machine"]
    lines = [f"input pipeline on {m['cpu']} ({m['cores']} cores), load {m['load']} at start, "
             f"{m.get('load_end')} at end; {speed_['corpus_mb']} MB synthetic corpus, "
             f"{speed_['windows_per_pass']:,} windows of {SEQ_LENGTH}+1 per pass, batch {BATCH}, "
             f"{speed_['rounds']} interleaved rounds (median)\n"]
    rows = [[name, bench.median(v), speed_["median_windows_per_cpu_sec"][name],
             ", ".join(f"{x:,.0f}" for x in v)] for name, v in speed_["windows_per_sec"].items()]
    rows.append([f"training consumes (default model; {result['training_source']})",
                 result["training_windows_per_sec"], float("nan"), ""])
    lines.append(bench.table(["pipeline", "windows/s (median)", "windows/CPU-s (median)",
                              "windows/s per round"], rows))
    lines.append(f"ours / (a): {speed_['ours_vs_frame']:.2f} by wall time, "
                 f"{speed_['ours_vs_frame_cpu']:.2f} by CPU time\n")
    mixing = speed_["single_file_mixing"]
    lines.append(f"single {speed_['corpus_mb']} MB file: {mixing['pieces']} pieces; "
                 f"{mixing['batches']} consecutive batches drew from {mixing['distinct_pieces']} "
                 f"distinct pieces, at least {mixing['fewest_per_batch']} per batch\n")
    rows = [[r["layout"], r.get("shard_cycle", "-"), r.get("windows", "-"),
             r.get("scan_mb_per_sec", float("nan")),
             r.get("seconds", float("nan")), r.get("rss_after_import_mb", float("nan")),
             r.get("peak_rss_after_scan_mb", float("nan")),
             ", ".join(f"{x:.0f}" for x in r.get("rss_at_quarters_mb", [])),
             r.get("peak_rss_mb", float("nan")), r.get("peak_rss_max_mb", float("nan")),
             r.get("load_1min", float("nan"))] for r in result["memory"]]
    lines.append(bench.table(["corpus", "shard_cycle", "windows", "scan MB/s", "epoch s",
                              "RSS after import MiB", "peak after scan MiB",
                              "RSS at 1/4, 1/2, 3/4, end of pass", "peak RSS MiB (median)",
                              "peak RSS MiB (max)", "load"], rows))
    t = result["tutorial"]
    if "skipped" in t:
        lines.append(f"tutorial numpy windows: skipped ({t['skipped']})\n")
    else:
        lines.append(bench.table(
            ["tutorial numpy windows", "windows", "seconds", "x GB", "peak RSS MiB"],
            [[f"{t['chars']:,} chars, stride 1", t["windows"], t["seconds"], t["x_gb"],
              t["peak_rss_mb"]]]))
    rows = [[name, t["target"], t["value"], "met" if t["met"] else "MISSED",
             t.get("worst_case", float("nan"))] for name, t in result["targets"].items()]
    lines.append(bench.table(["target", "wanted", "measured", "", "worst case"], rows))
    return "\n".join(lines)


def define_flags() -> None:
    """Defines this benchmark's flags."""
    flags.DEFINE_integer("speed_mb", 30, "Size of the corpus the speeds are measured on.")
    flags.DEFINE_integer("rounds", 5, "Interleaved rounds of the speed comparison.")
    flags.DEFINE_integer("flat_map_batches", 40, "Batches timed of the slow window/flat_map "
                         "pipeline (b).")
    flags.DEFINE_list("rss_mb", pipeline_memory.DEFAULT_LAYOUTS, "Corpus layouts for peak RSS, "
                      f"of {', '.join(pipeline_memory.LAYOUTS)} (1mb: for smoke tests).")
    flags.DEFINE_integer("rss_repeats", 3, "Runs per corpus size for peak RSS (median "
                         "counts).")
    flags.DEFINE_integer("shard_cycle", 8, "--shard_cycle of the RSS runs (shards read at "
                         "once; the Config default is 8).")
    flags.DEFINE_integer("tutorial_chars", 1_600_000, "Chars for the tutorial's numpy windows; "
                         "0 skips it (it needs ~4.4 GB at 1.6M).")
    flags.DEFINE_float("train_windows_per_sec", None, "Windows/s one training step of the "
                       "default model takes (e.g. from bench.train_throughput); default: "
                       "measure it here.")
    flags.DEFINE_string("tmp_dir", None, "Where the temporary corpora go (default: system "
                        "temp dir; needs ~1.2 GB free for the 1 GB corpus).")
    flags.DEFINE_string("out", f"{bench.RESULTS_DIR}/input_pipeline.json", "JSON output.")


def main(argv: list[str]) -> int:
    """Measures, prints the tables, writes the JSON; see the module docstring."""
    del argv
    unknown = set(FLAGS.rss_mb) - set(pipeline_memory.LAYOUTS)
    if unknown:
        raise app.UsageError(f"unknown --rss_mb {sorted(unknown)}; choose from "
                             f"{list(pipeline_memory.LAYOUTS)}")
    result = run(FLAGS.speed_mb, FLAGS.rounds, FLAGS.flat_map_batches,
                 list(FLAGS.rss_mb), FLAGS.shard_cycle, FLAGS.rss_repeats,
                 FLAGS.tutorial_chars,
                 FLAGS.train_windows_per_sec, FLAGS.tmp_dir)
    bench.report(markdown(result), FLAGS.out, result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    bench.run_main(main)
