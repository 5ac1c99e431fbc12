"""The job's model trained and sampled outside the job, on whichever Keras backend runs.

Shared by bench/gpu_keras_torch.py (which runs it on PyTorch where a GPU machine has no
TensorFlow) and bench/gpu_import.py (which checks the result in TensorFlow): the `gpu`
preset read from configs/gpu.flags, the job's optimizer settings, nanoGPT's 90/10 split
with the job's vocabulary, validation over the job's windows, stepped sampling with
carried states, and the weights written as .npz parts.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from typing import Any

import numpy as np

PRESET = "configs/gpu.flags"


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
    from trainer.data.vocabulary import Vocabulary

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
