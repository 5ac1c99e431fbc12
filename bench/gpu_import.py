"""Loads weights trained by bench/gpu_keras_torch.py into the TensorFlow model and checks them.

    python -m bench.gpu_import --results=DIR/results.json --run='gpu preset' \
        --weights='DIR/best.part*.npz' [--corpus=...] [--job_dir=runs/gpu_h200]

The weights were trained on a GPU with Keras's torch backend (cuDNN through
PyTorch). Here they go into `trainer.models.build_model` on TensorFlow (on a
CPU), which is evaluated on the same validation windows: the two losses must
agree to float rounding, or the weight layouts differ. Then the weights are
written as a job directory (config.json, vocab.json, best weights, best.json)
through the job's own checkpoint code, so `python -m trainer.generate
--job_dir=...` samples from them. The comparison goes to --out.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from absl import app, flags

import bench

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("results", None, "results.json written by bench.gpu_keras_torch.")
    flags.DEFINE_string("run", "gpu preset", "Which quality run of that file the weights are.")
    flags.DEFINE_string("weights", None, "Glob of the weight parts (.npz) of that run.")
    flags.DEFINE_string("corpus", bench.DEFAULT_CORPUS, "The corpus the run was trained on.")
    flags.DEFINE_string("job_dir", None, "Write a job directory here for trainer.generate.")
    flags.DEFINE_string("out", None, "Write the comparison here (JSON).")
    flags.DEFINE_string("plot", None, "Also plot every run of the curve.json beside --results "
                        "(validation loss against wall-clock) to this PNG.")
    flags.DEFINE_float("tolerance", 2e-3, "Largest accepted |TF loss - GPU loss| in nats/char.")


def load_parts(pattern: str) -> list[np.ndarray]:
    """The weight list in model order, from parts whose keys are w000, w001, ..."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise app.UsageError(f"--weights={pattern} matches no file")
    weights: dict[str, np.ndarray] = {}
    for path in paths:
        with np.load(path) as part:
            weights.update({k: part[k].astype(np.float32) for k in part.files})
    return [weights[k] for k in sorted(weights)]


def plot_curves(results_path: str, results: dict, path: str) -> None:
    """The GPU runs' validation loss against wall-clock, drawn as bench.quality draws the CPU's."""
    from bench import quality

    with open(os.path.join(os.path.dirname(results_path), "curve.json"), encoding="utf-8") as f:
        curves = json.load(f)
    def label(name: str) -> str:
        c = results["quality"].get(name, {}).get("config")
        return f"{c['num_layers']}x{c['rnn_units']}, dropout {c['dropout']}" if c else name

    runs = [{"label": label(name), "final_val_loss": min(e["val_loss"] for e in curve),
             "epochs": [{"elapsed_sec": e["seconds"], "val_loss": e["val_loss"]} for e in curve]}
            for name, curve in curves.items()]
    gpu = results["environment"].get("gpu", "GPU")
    quality.plot(runs, path, f"tinyshakespeare 90/10 on one {gpu} (Keras on torch, cuDNN); "
                 "legend: best val_loss")


def main(argv: list[str]) -> int:
    del argv
    import keras

    from bench import gpu_keras as gpu
    from trainer import checkpoints, models

    with open(FLAGS.results, encoding="utf-8") as f:
        results = json.load(f)
    if FLAGS.plot:
        plot_curves(FLAGS.results, results, FLAGS.plot)
    run = results["quality"][FLAGS.run]
    with open(FLAGS.corpus, encoding="utf-8") as f:
        vocab, _, val_ids = gpu.split(f.read())
    cfg = gpu.preset_config().replace(**run["config"])
    model = models.build_model(cfg, vocab.size)
    model.set_weights(load_parts(FLAGS.weights))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xv, yv = gpu.val_windows(val_ids, cfg.seq_length)
    tf_loss = float(model.evaluate(xv, yv, batch_size=64, verbose=0))
    comparison = {"run": FLAGS.run, "gpu_val_loss": run["val_loss"],
                  "tf_cpu_val_loss": round(tf_loss, 5),
                  "abs_difference": round(abs(tf_loss - run["val_loss"]), 5),
                  "val_windows": len(xv), "machine": bench.machine()}
    print(json.dumps(comparison, indent=1))
    if FLAGS.out:
        bench.write_result(FLAGS.out, comparison)
    if comparison["abs_difference"] > FLAGS.tolerance:
        print(f"error: TensorFlow's loss differs from the GPU run's by "
              f"{comparison['abs_difference']} > {FLAGS.tolerance}: the weight layouts disagree")
        return 1
    if FLAGS.job_dir:
        cfg = cfg.replace(job_dir=FLAGS.job_dir)
        job = checkpoints.JobDir(FLAGS.job_dir)
        job.write("config.json", cfg.to_json())
        job.write("vocab.json", vocab.to_json())
        checkpoints.BestExporter(job, "val_loss").maybe_export(
            model, run["epoch"], run["epoch"] * run["steps_per_pass"], tf_loss)
        job.close(timeout=60)
        print(f"wrote {FLAGS.job_dir}: python -m trainer.generate --job_dir={FLAGS.job_dir}")
    return 0


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["results", "weights"])
    app.run(main)
