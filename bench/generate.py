"""Benchmark: generation speed of the carried-state sampler against the 2017 tutorial's loop.

    python -m bench.generate [--job_dir=runs/shakespeare] [--out=bench/results/generate.json]

Without --job_dir the model has the default config's size (embedding 64, 2 x 512
LSTM) over a ~100-char vocabulary with random weights: speed does not depend on
the weights. Measured, each after a warm-up call:

- the sampler for 1 stream, in one compiled call and in the 64-char blocks that
  `trainer.generate` streams to a terminal (its step loop compiled with XLA, the
  default), and the same blocks without XLA (TensorFlow's graph executor);
- the sampler for --streams streams in one batch (aggregate chars/s);
- the tutorial's loop: for every char, `model.predict` on the last 100 chars and
  a NumPy draw from the softmax (slow, so only --tutorial_chars chars).

A word or bpe job (`--job_dir`) is measured the same way in its own tokens: the
tutorial's loop on a 100-token window, one token per call, until its tokens cover
--tutorial_chars characters, and the sampler's blocks of 64 tokens; `--length` still
counts characters (a row ends at the first token that reaches them).

Times include feeding a 100-char prompt. Prints a markdown table and writes JSON.
It needs no corpus. A row that cannot be measured stops the benchmark with one
`error:` line and exit status 1, and no result is written.
"""

from __future__ import annotations

import os
import string
import sys
import time
from typing import Any

from absl import flags

import bench

FLAGS = flags.FLAGS
# The targets the issue sets: speedup over the tutorial loop.
TARGETS = {"1 stream": 100.0, "batch": 2000.0}
WINDOW = 100


def _model(job_dir: str | None) -> tuple[Any, Any, str]:
    """(model, vocabulary, a description): the job's best model or a random default-size one."""
    from trainer import job_loader, models
    from trainer.config import Config
    from trainer.data.vocabulary import Vocabulary

    if job_dir:
        cfg, vocab, model, pointer = job_loader.load_job(job_dir)
        return model, vocab, (f"{job_dir} ({pointer.get('weights')}; {vocab.kind} tokenizer, "
                              f"{vocab.size} ids)")
    cfg = Config()
    vocab = Vocabulary([c for c in string.printable if c not in "\r\x0b\x0c"])
    return models.build_model(cfg, vocab.size), vocab, (
        f"random weights, embedding {cfg.embedding_dim}, {cfg.num_layers} x {cfg.rnn_units} "
        f"LSTM, {vocab.size} ids")


def _best_time(fn, repeats: int, warm_up=None) -> float:
    (warm_up or fn)()  # Traces and compiles before anything is timed.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def tutorial_loop(model, prompt_ids, chars: int, temperature: float = 0.8, seed: int = 0,
                  token_chars=None):
    """The 2017 tutorial's generation: re-feed the whole window with predict, per token,
    until the tokens cover `chars` characters (`token_chars`: characters per id; None:
    one each)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    window = list(prompt_ids[-WINDOW:])
    out, covered = [], 0
    while covered < chars:
        logits = model.predict(np.array([window]), verbose=0)[0, -1].astype("float64")
        logits[0] = -np.inf  # The out-of-vocabulary id, as in our sampler.
        probs = np.exp((logits - logits.max()) / temperature)
        next_id = int(rng.choice(len(probs), p=probs / probs.sum()))
        out.append(next_id)
        covered += 1 if token_chars is None else token_chars[next_id]
        window = window[1:] + [next_id]
    return out


def run(job_dir: str | None, length: int, streams: int, tutorial_chars: int,
        repeats: int) -> dict[str, Any]:
    """Measures every row of the benchmark.

    Returns:
      A JSON-ready dict: the setup and one entry per measured row.
    """
    import numpy as np
    import tensorflow as tf

    from trainer.sampling.sampler import Sampler, Settings

    model, vocab, described = _model(job_dir)
    sampler = Sampler(model, vocab)
    rng = np.random.default_rng(0)
    prompt = vocab.decode(rng.integers(1, vocab.size, WINDOW).tolist())
    settings = Settings()
    rows = []

    def add(name: str, n_streams: int, chars: int, seconds: float) -> None:
        rows.append({"name": name, "streams": n_streams, "chars": chars, "seconds": seconds,
                     "chars_per_sec": chars / seconds})

    window = vocab.encode(prompt).tolist()
    # Characters per id: a word or bpe model's tutorial loop draws until its ids cover them.
    per_id = None if vocab.kind == "char" else vocab.token_chars
    drawn: list[list[int]] = []
    seconds = _best_time(
        lambda: drawn.append(tutorial_loop(model, window, tutorial_chars, token_chars=per_id)),
        1, warm_up=lambda: tutorial_loop(model, window, 2, token_chars=per_id))
    unit = "char" if per_id is None else "token"
    add(f"tutorial loop (predict on the {WINDOW}-{unit} window per {unit})", 1,
        len(vocab.decode(drawn[-1])), seconds)
    seconds = _best_time(lambda: sampler.generate([prompt], length, settings), repeats)
    add("sampler, 1 stream, one compiled call", 1, length, seconds)
    seconds = _best_time(lambda: list(sampler.stream([prompt], length, settings)), repeats)
    add(f"sampler, 1 stream, 64-{unit} blocks (as streamed)", 1, length, seconds)
    graph = Sampler(model, vocab, jit_compile=False)
    seconds = _best_time(lambda: list(graph.stream([prompt], length, settings)), repeats)
    add(f"sampler without XLA, 1 stream, 64-{unit} blocks", 1, length, seconds)
    seconds = _best_time(lambda: sampler.generate([prompt] * streams, length, settings),
                         repeats)
    add(f"sampler, {streams} streams in one batch", streams, streams * length, seconds)

    base = rows[0]["chars_per_sec"]
    for row in rows:
        row["speedup"] = row["chars_per_sec"] / base
        target = TARGETS["1 stream"] if row["streams"] == 1 else TARGETS["batch"]
        row["target"] = None if row is rows[0] else target
        row["meets_target"] = None if row is rows[0] else row["speedup"] >= target
    gpus = tf.config.list_physical_devices("GPU")
    return {"benchmark": "generate", "model": described, "length": length,
            "device": f"{len(gpus)} GPU(s)" if gpus else f"CPU ({os.cpu_count()} cores)",
            "machine": bench.machine(), "rows": rows}


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Every figure the result must hold, by name."""
    out = {f"{r['name']} chars/s": r["chars_per_sec"] for r in result["rows"]}
    out.update({f"{r['name']} x tutorial": r["speedup"] for r in result["rows"]})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table, with its setup above it."""
    rows = [(r["name"], r["chars"], r["seconds"], r["chars_per_sec"], r["speedup"],
             "" if r["target"] is None else
             f">= {r['target']:.0f}x {'met' if r['meets_target'] else 'MISSED'}")
            for r in result["rows"]]
    head = (f"generate benchmark, {result['model']}; {result['device']}, "
            f"load {result['machine'].get('load')}\n\n")
    return head + bench.table(("what", "chars", "seconds", "chars/s", "x tutorial", "target"),
                              rows)


def define_flags() -> None:
    """Defines this benchmark's flags."""
    flags.DEFINE_string("job_dir", None, "Benchmark this trained job directory's model; "
                        "default: the default config's size with random weights.")
    flags.DEFINE_string("out", "bench/results/generate.json", "Where to write the JSON "
                        "results.")
    flags.DEFINE_integer("length", 512, "Chars generated per stream in each timed call.",
                         lower_bound=1)
    flags.DEFINE_integer("streams", 64, "Streams in the batched measurement.", lower_bound=1)
    flags.DEFINE_integer("tutorial_chars", 20, "Chars timed with the (very slow) tutorial "
                         "loop.", lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Timed calls per sampler row; the fastest counts.",
                         lower_bound=1)


def main(argv: list[str]) -> int:
    del argv
    with bench.measuring("generation"):
        result = run(FLAGS.job_dir, FLAGS.length, FLAGS.streams, FLAGS.tutorial_chars,
                     FLAGS.repeats)
    bench.require(figures(result))
    sys.stdout.write(markdown(result))
    bench.write_result(FLAGS.out, result)
    print(f"wrote {FLAGS.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    bench.run_main(main)
