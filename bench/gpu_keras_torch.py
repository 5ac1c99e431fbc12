"""GPU check where PyTorch is installed but TensorFlow is not: the job's model on Keras/torch.

    KERAS_BACKEND=torch python -m bench.gpu_keras_torch --corpus=PATH --out=DIR \
        [--minutes=5] [--smoke]

`bench/gpu_check.sh` is the real GPU check: it runs the job itself (TensorFlow,
cuDNN through TF). The GPU machines lent to this project's sessions have no
TensorFlow and no network, and TensorFlow with its CUDA 12 libraries (over 2 GB
of wheels) cannot be carried there, but they do have PyTorch with CUDA. Keras 3
runs the same model definition (`trainer.models.build_model`) on the torch
backend, where an LSTM that meets the cuDNN conditions runs `torch._VF.lstm`
(cuDNN). So this script measures on that GPU what does not depend on
TensorFlow:

  1. cudnn:      which LSTM path each layer call took (Keras's torch backend
                 falls back silently when the cuDNN call raises), the heaviest
                 CUDA kernels of one training step, and the step time against
                 use_cudnn=False;
  2. throughput: training chars/s in float32, mixed_bfloat16 and mixed_float16
                 (Keras `train_on_batch`) for the `gpu` preset's model and the
                 default one;
  3. generation: chars/s of stepped sampling with carried state (1 and 64
                 streams) against the tutorial's loop (`model.predict` on the
                 whole window for every char);
  4. quality:    the `gpu` preset's recipe (configs/gpu.flags: model, batch,
                 window, Adam with warmup + cosine, global clipnorm, passes) on
                 tinyshakespeare's 90/10 split, validation loss in nats/char
                 over every 256-char window of the validation text, from a
                 zero state as the job evaluates. The best weights are written
                 as .npz parts (each under 16 MiB) so that
                 `python -m bench.gpu_import` can load them into the
                 TensorFlow model on a CPU, re-evaluate them and make a job
                 directory that `trainer.generate` reads.

Not measured here, because it needs TensorFlow: the job's own input pipeline,
strategy and checkpoint path on a GPU (gpu_check.sh does that).
Everything is written to --out as it is measured (results.json, curve.json).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags

from bench.gpu_keras import (
    Recorder,
    compiled_model,
    generate,
    generation,
    preset_config,
    quality,
    save_weights,
    split,
    sync,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("corpus", "../shared/data/tinyshakespeare.txt", "Text to split 90/10.")
    flags.DEFINE_string("out", "bench/results/gpu_torch", "Folder for the figures and weights.")
    flags.DEFINE_float("minutes", 5.0, "Wall-clock budget of the quality part.")
    flags.DEFINE_integer("timed_steps", 30, "Steps timed per throughput figure.")
    flags.DEFINE_bool("smoke", False, "Tiny sizes, to try the script on a CPU in a minute.")
    flags.DEFINE_list("parts", ["cudnn", "throughput", "quality", "generation"],
                      "Which parts to run (generation samples the model that quality trains).")
    flags.DEFINE_list("seeds", ["42"], "Train the gpu preset once per seed (init and data order).")
    flags.DEFINE_multi_string("variant", [], "Also train the preset with these changes, e.g. "
                              "'rnn_units=512,dropout=0.3' (repeatable), while the budget lasts.")


def environment() -> dict[str, Any]:
    import keras

    info: dict[str, Any] = {"keras": keras.__version__, "backend": keras.backend.backend(),
                            "python": sys.version.split()[0]}
    if keras.backend.backend() == "torch":
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def random_batch(ids: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    starts = rng.integers(0, len(ids) - seq - 1, size=batch)
    rows = np.stack([ids[s:s + seq + 1] for s in starts])
    return rows[:, :-1].astype("int32"), rows[:, 1:].astype("int32")


def time_steps(model, ids: np.ndarray, batch: int, seq: int, steps: int) -> float:
    """Seconds per training step, after two untimed steps."""
    rng = np.random.default_rng(0)
    batches = [random_batch(ids, batch, seq, rng) for _ in range(steps + 2)]
    for x, y in batches[:2]:
        model.train_on_batch(x, y)
    sync()
    start = time.perf_counter()
    for x, y in batches[2:]:
        model.train_on_batch(x, y)
    sync()
    return (time.perf_counter() - start) / steps


def check_cudnn(cfg, ids, vocab_size, rec: Recorder, timed_steps: int) -> None:
    import keras

    result: dict[str, Any] = {"conditions_met": None, "calls": {}}
    counts: collections.Counter = collections.Counter()
    if keras.backend.backend() == "torch":
        import importlib

        # The module itself: `from keras.src.backend.torch import rnn` names a function.
        torch_rnn = importlib.import_module("keras.src.backend.torch.rnn")

        for name in ("_cudnn_lstm", "_fallback_lstm"):
            original = getattr(torch_rnn, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                out = _original(*args, **kwargs)
                counts[_name] += 1  # Counted only when the call returned.
                return out

            setattr(torch_rnn, name, counted)
    from trainer import models

    model = compiled_model(cfg, vocab_size)
    layers = models.lstm_layers(model)
    result["conditions_met"] = all(models.cudnn_eligible(layer) for layer in layers)
    # Building the functional model runs each layer once on symbolic (meta) tensors, which
    # takes the fallback path; only the calls of real steps count.
    result["calls_while_building"] = dict(counts)
    counts.clear()
    seconds = time_steps(model, ids, cfg.batch_size, cfg.seq_length, timed_steps)
    result["calls"] = dict(counts)
    result["cudnn_path_every_call"] = (counts["_cudnn_lstm"] == (timed_steps + 2) * len(layers)
                                       and not counts["_fallback_lstm"])
    result["step_ms_cudnn"] = round(seconds * 1000, 2)
    result["kernels"] = top_kernels(model, ids, cfg)
    rec.put("cudnn", result)
    # The same model with the generic per-timestep loop, for scale (few steps: it is slow).
    slow = compiled_model(cfg, vocab_size)
    for layer in models.lstm_layers(slow):
        layer.use_cudnn = False
    seconds_slow = time_steps(slow, ids, cfg.batch_size, cfg.seq_length, max(2, timed_steps // 10))
    result["step_ms_use_cudnn_false"] = round(seconds_slow * 1000, 2)
    result["speedup"] = round(seconds_slow / seconds, 2)
    rec.put("cudnn", result)


def top_kernels(model, ids, cfg, count: int = 8) -> list[list[Any]]:
    """The CUDA kernels that took longest in one profiled training step."""
    import keras

    if keras.backend.backend() != "torch":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    try:
        x, y = random_batch(ids, cfg.batch_size, cfg.seq_length, np.random.default_rng(1))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.train_on_batch(x, y)
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))
        return [[e.key[:90], round(getattr(e, "device_time_total", 0) / 1000, 3)]
                for e in rows[:count]]
    except Exception as err:  # The profiler is evidence, not a requirement.
        return [[f"profiler failed: {err!r}"[:200], 0]]


def throughput(models_to_time, ids, vocab_size, rec: Recorder, timed_steps: int) -> None:
    import keras

    rows = []
    for name, cfg in models_to_time:
        for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
            try:
                model = compiled_model(cfg, vocab_size, policy)
                seconds = time_steps(model, ids, cfg.batch_size, cfg.seq_length, timed_steps)
                rows.append({"model": name, "policy": policy, "step_ms": round(seconds * 1000, 2),
                             "chars_per_s": round(cfg.batch_size * cfg.seq_length / seconds)})
            except Exception as err:  # One failing policy should not hide the others.
                rows.append({"model": name, "policy": policy, "error": repr(err)[:300]})
            keras.backend.clear_session()
            rec.put("throughput", rows)


def main(argv: list[str]) -> int:
    del argv
    import keras

    started = time.perf_counter()
    rec = Recorder(FLAGS.out)
    rec.put("environment", environment())
    parts = list(FLAGS.parts)
    if os.path.exists(FLAGS.corpus):
        with open(FLAGS.corpus, encoding="utf-8") as f:
            text = f.read()
    else:  # Speed does not depend on the text; quality does, so it needs the corpus.
        import bench

        text = bench.synthetic_text(1_115_394, seed=0).decode("utf-8")
        dropped = [p for p in parts if p in ("quality", "generation")]
        parts = [p for p in parts if p not in dropped]
        if dropped:
            rec.put("skipped", f"{', '.join(dropped)}: no corpus at {FLAGS.corpus}")
    vocab, train_ids, val_ids = split(text)
    cfg = preset_config()
    from trainer.config import Config

    default = Config()
    timed = FLAGS.timed_steps
    budget = FLAGS.minutes * 60
    if FLAGS.smoke:
        cfg = cfg.replace(num_layers=1, rnn_units=32, embedding_dim=16, batch_size=8, seq_length=32,
                          epochs=2, warmup_steps=5)
        default = default.replace(num_layers=1, rnn_units=32, batch_size=8, seq_length=32)
        train_ids, timed = train_ids[:40_000], 3
    rec.put("data", {"corpus": FLAGS.corpus, "chars": len(text), "vocab_size": vocab.size,
                     "train_chars": int(len(train_ids)), "val_chars": int(len(val_ids))})
    for part, fn in (("cudnn", lambda: check_cudnn(cfg, train_ids, vocab.size, rec, timed)),
                     ("throughput", lambda: throughput([("gpu preset", cfg), ("default", default)],
                                                       train_ids, vocab.size, rec, timed))):
        if part not in parts:
            continue
        try:
            fn()
        except Exception as err:  # Keep going: later parts are worth having on their own.
            rec.put(f"{part}_error", repr(err)[:500])
        keras.backend.clear_session()
    curves: dict[str, Any] = {}
    if "quality" not in parts:
        rec.put("wall_s", round(time.perf_counter() - started, 1))
        return 0
    runs = [(f"gpu preset, seed {seed}" if len(FLAGS.seeds) > 1 else "gpu preset",
             cfg.replace(seed=int(seed))) for seed in FLAGS.seeds]
    for variant in FLAGS.variant:
        changes = dict(item.split("=", 1) for item in variant.split(","))
        changes = {k: type(getattr(cfg, k))(v) for k, v in changes.items()}
        runs.append((variant, cfg.replace(**changes)))
    q_start = time.perf_counter()  # The quality budget starts now.
    for i, (name, run_cfg) in enumerate(runs):
        left = budget - (time.perf_counter() - q_start)
        if i and (left < 60 or FLAGS.smoke):
            rec.put(f"skipped {name}", f"{left:.0f} s of the budget left")
            continue
        keras.backend.clear_session()
        keras.utils.set_random_seed(run_cfg.seed)
        best = quality(run_cfg, name, train_ids, val_ids, vocab.size, left, rec, curves)
        if best is None or i:
            continue
        # The first run's best weights come back; float16 keeps a 3x768 model in two parts
        # (the device returns at most 8 files, 64 MiB). The npz keeps the dtype.
        dtype = "float32" if run_cfg.rnn_units <= 512 else "float16"
        paths = save_weights(best.pop("weights"), rec.out, "best", dtype)
        rec.results["quality"][name]["weight_files"] = [os.path.basename(p) for p in paths]
        if "generation" not in parts:
            continue
        try:  # Stepped generation from the trained model, best weights loaded back.
            best["model"].set_weights([np.load(p)[k].astype("float32")
                                       for p in paths for k in sorted(np.load(p).files)])
            generation(best["model"], val_ids[:100], rec, FLAGS.smoke)
            length = 50 if FLAGS.smoke else 500
            ids, _ = generate(best["model"], val_ids[:100], length, 1, 0.8, seed=1)
            rec.put("sample", {"prime": vocab.decode(val_ids[:100]), "text": vocab.decode(ids[0])})
        except Exception as err:
            rec.put("generation_error", repr(err)[:500])
    rec.put("wall_s", round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
