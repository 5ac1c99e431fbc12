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
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
PRESET = "configs/gpu.flags"


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


def preset_config(path: str = PRESET):
    """The Config that a flags file describes (only --name=value lines)."""
    from trainer.config import Config

    cfg = Config()
    changes: dict[str, Any] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("--") or "=" not in line:
                continue
            name, value = line[2:].split("=", 1)
            kind = type(getattr(cfg, name))
            changes[name] = (value.lower() in ("1", "true")) if kind is bool else kind(value)
    return cfg.replace(**changes)


class Recorder:
    """Holds every figure and rewrites results.json after each one."""

    def __init__(self, out: str):
        self.out = out
        self.results: dict[str, Any] = {}
        os.makedirs(out, exist_ok=True)

    def put(self, key: str, value: Any) -> None:
        self.results[key] = value
        print(f"[gpu_keras_torch] {key}: {json.dumps(value)[:600]}", flush=True)
        with open(os.path.join(self.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=1)


def sync() -> None:
    import keras

    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


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


def compiled_model(cfg, vocab_size: int, policy: str = "float32", steps: int = 1000):
    """The job's model with the job's optimizer settings, compiled for train_on_batch."""
    import keras

    from trainer import models

    keras.mixed_precision.set_dtype_policy(policy)
    model = models.build_model(cfg, vocab_size)
    keras.mixed_precision.set_dtype_policy("float32")
    warmup = min(cfg.warmup_steps, max(0, steps - 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, steps - warmup), alpha=cfg.min_lr_ratio,
        warmup_target=cfg.learning_rate, warmup_steps=warmup)
    # Keras wraps the optimizer in a LossScaleOptimizer itself under mixed_float16.
    model.compile(optimizer=keras.optimizers.Adam(schedule, global_clipnorm=cfg.clipnorm or None),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


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


def step_sampler(model):
    """One char per call, states carried: embedding -> each LSTM with its state -> logits."""
    import keras

    from trainer import models

    embedding = model.get_layer("embedding")
    lstms = models.lstm_layers(model)
    dense = model.get_layer("logits")

    def step(ids, states):
        x = embedding(ids[:, None])
        new_states = []
        for layer, (h, c) in zip(lstms, states):
            x, h, c = layer(x, initial_state=[h, c])
            new_states.append((h, c))
        return dense(x[:, -1]), new_states

    def zero_states(batch):
        return [(keras.ops.zeros((batch, layer.units)), keras.ops.zeros((batch, layer.units)))
                for layer in lstms]

    return step, zero_states


def no_grad():
    """torch.no_grad() on the torch backend (no autograd graph while sampling), else nothing."""
    import contextlib

    import keras

    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def generate(model, prime_ids: np.ndarray, length: int, streams: int, temperature: float,
             seed: int = 0) -> tuple[np.ndarray, float]:
    """Stepped sampling; returns (ids drawn, seconds for the drawing after the prime)."""
    with no_grad():
        return _generate(model, prime_ids, length, streams, temperature, seed)


def _generate(model, prime_ids, length, streams, temperature, seed):
    import keras

    step, zero_states = step_sampler(model)
    states = zero_states(streams)
    logits = None
    for i in prime_ids:  # Feeding the prime one char at a time: the same path as drawing.
        logits, states = step(keras.ops.full((streams,), int(i), dtype="int32"), states)
    drawn = []
    generator = keras.random.SeedGenerator(seed)
    sync()
    start = time.perf_counter()
    for _ in range(length):
        ids = keras.random.categorical(logits / temperature, 1, seed=generator)[:, 0]
        ids = keras.ops.cast(ids, "int32")
        drawn.append(ids)
        logits, states = step(ids, states)
    out = keras.ops.convert_to_numpy(keras.ops.stack(drawn, axis=1))
    sync()
    return out, time.perf_counter() - start


def generation(model, prime_ids, rec: Recorder, smoke: bool) -> None:
    length = 50 if smoke else 500
    rows = []
    for streams in (1, 64):
        generate(model, prime_ids[:10], 5, streams, 0.8)  # Warm up.
        _, seconds = generate(model, prime_ids, length, streams, 0.8)
        rows.append({"what": f"stepped, {streams} stream(s)",
                     "chars_per_s": round(length * streams / seconds, 1)})
        rec.put("generation", rows)
    # The tutorial's loop: model.predict on the whole window, one char per call.
    window = np.array(prime_ids[-100:], dtype="int32")[None]
    chars = 5 if smoke else 40
    model.predict(window, verbose=0)
    start = time.perf_counter()
    for _ in range(chars):
        probs = model.predict(window, verbose=0)[0, -1]
        window = np.concatenate([window[:, 1:], [[int(np.argmax(probs))]]], axis=1).astype("int32")
    rows.append({"what": "tutorial loop (model.predict per char)",
                 "chars_per_s": round(chars / (time.perf_counter() - start), 1)})
    for row in rows[:-1]:
        row["x_tutorial"] = round(row["chars_per_s"] / rows[-1]["chars_per_s"], 1)
    rec.put("generation", rows)


def split(text: str):
    """nanoGPT's shakespeare_char split and our vocabulary (id 0 = out of vocabulary)."""
    from trainer.vocabulary import Vocabulary

    vocab = Vocabulary.from_counts(collections.Counter(text))
    cut = int(len(text) * 0.9)
    return vocab, vocab.encode(text[:cut]).astype("int32"), vocab.encode(text[cut:]).astype("int32")


def val_windows(val_ids: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Every whole window of seq+1 chars, stepping by seq (the job's validation windows)."""
    n = (len(val_ids) - 1) // seq
    rows = np.stack([val_ids[i * seq:i * seq + seq + 1] for i in range(n)])
    return rows[:, :-1], rows[:, 1:]


def quality(cfg, name: str, train_ids, val_ids, vocab_size, budget_s: float, rec: Recorder,
            curves: dict[str, Any]) -> dict[str, Any] | None:
    """Trains cfg's recipe for cfg.epochs passes (or until budget_s); returns the best."""
    steps_per_pass = ((len(train_ids) - 1) // cfg.seq_length) // cfg.batch_size
    total = steps_per_pass * cfg.epochs
    model = compiled_model(cfg, vocab_size, cfg.precision, total)
    xv, yv = val_windows(val_ids, cfg.seq_length)
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    best: dict[str, Any] | None = None
    curve = []
    for epoch in range(1, cfg.epochs + 1):
        # One pass: every window of the pass once, from a random offset, in random order.
        offset = int(rng.integers(0, cfg.seq_length))
        starts = np.arange(offset, len(train_ids) - cfg.seq_length - 1, cfg.seq_length)
        rng.shuffle(starts)
        losses = []
        for k in range(steps_per_pass):
            rows = np.stack([train_ids[s:s + cfg.seq_length + 1]
                             for s in starts[k * cfg.batch_size:(k + 1) * cfg.batch_size]])
            losses.append(float(model.train_on_batch(rows[:, :-1], rows[:, 1:])))
        val = float(model.evaluate(xv, yv, batch_size=256, verbose=0))
        elapsed = time.perf_counter() - start
        curve.append({"epoch": epoch, "seconds": round(elapsed, 1),
                      "loss": round(float(np.mean(losses)), 4), "val_loss": round(val, 4)})
        print(f"[{name}] pass {epoch}/{cfg.epochs} {elapsed:.0f}s loss {np.mean(losses):.4f} "
              f"val {val:.4f}", flush=True)
        if not math.isfinite(val):
            break
        if best is None or val < best["val_loss"]:
            best = {"val_loss": round(val, 4), "bits_per_char": round(val / math.log(2), 4),
                    "epoch": epoch, "seconds": round(elapsed, 1),
                    "chars_trained": epoch * steps_per_pass * cfg.batch_size * cfg.seq_length,
                    "weights": [w.copy() for w in model.get_weights()]}
        if elapsed > budget_s:
            break
    curves[name] = curve
    with open(os.path.join(rec.out, "curve.json"), "w", encoding="utf-8") as f:
        json.dump(curves, f)
    if best is None:
        return None
    summary = {k: v for k, v in best.items() if k != "weights"}
    summary.update(passes_run=len(curve), passes_planned=cfg.epochs, steps_per_pass=steps_per_pass,
                   val_windows=len(xv), config={k: getattr(cfg, k) for k in (
                       "num_layers", "rnn_units", "embedding_dim", "dropout", "batch_size",
                       "seq_length", "learning_rate", "warmup_steps", "min_lr_ratio", "clipnorm",
                       "epochs", "precision")})
    rec.results.setdefault("quality", {})[name] = summary
    rec.put("quality", rec.results["quality"])
    best["model"] = model
    return best


def save_weights(weights: list[np.ndarray], folder: str, prefix: str, dtype: str = "float32",
                 part_bytes: int = 15 << 20) -> list[str]:
    """Writes the weight list as .npz parts of at most part_bytes each (float32: exact)."""
    weights = [w.astype(dtype) for w in weights]
    parts, current, size = [], {}, 0
    for i, w in enumerate(weights):
        if current and size + w.nbytes > part_bytes:
            parts.append(current)
            current, size = {}, 0
        current[f"w{i:03d}"] = w
        size += w.nbytes
    parts.append(current)
    paths = []
    for j, part in enumerate(parts):
        paths.append(os.path.join(folder, f"{prefix}.part{j}.npz"))
        np.savez(paths[-1], **part)
    return paths


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
