"""Benchmarks, run together by `make bench` (python -m bench.run) or one by one.

The few things every benchmark shares live here: how the machine and its load
are described next to each figure, the --corpus a benchmark trains on, synthetic
corpora (random text with English-like character frequencies, as 10 MB shards),
how a markdown table is printed, how a result is written, and how a benchmark
fails (one `error:` line and exit status 1 when a figure it must produce could
not be measured; no result is written then). Importing this package stays cheap
(no TensorFlow), so a benchmark's --help answers at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

# The corpus `make data` writes (the Makefile's DATA_DIR), relative to the repository root,
# where `python -m bench.NAME` runs.
DEFAULT_CORPUS = "data/shakespeare"
CORPUS_HINT = ("run `make data`, or pass --corpus=PATH (a folder with train/*.txt and "
               "val/*.txt, or one text file)")
# nanoGPT's shakespeare_char split of a single text file: the first 90% of the characters
# train, the rest validate.
TRAIN_SHARE = 0.9
RESULTS_DIR = "bench/results"
# Synthetic corpora are written as shards of this many bytes.
SHARD_BYTES = 10 * 1000 * 1000


def cpu_model() -> str:
    """The CPU model name as lscpu and /proc/cpuinfo give it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (what else runs on a shared machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """The hardware and software a figure was measured on, with the load at this moment."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                            "python": platform.python_version(), "load": load(),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        info["gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
    except ImportError:
        pass
    return info


# Rough English character frequencies (per mille of running text, capitals and
# punctuation included), enough to give the pipeline a realistic vocabulary.
_FREQ = {" ": 170, "\n": 20, "e": 95, "t": 68, "a": 61, "o": 58, "i": 53, "n": 53, "s": 49,
         "h": 49, "r": 46, "d": 33, "l": 31, "u": 21, "c": 20, "m": 19, "w": 18, "f": 17,
         "y": 16, "g": 15, "p": 13, "b": 12, "v": 8, "k": 6, ",": 14, ".": 9, "'": 3, ";": 2,
         ":": 2, "!": 2, "?": 2, "-": 2, "x": 1.2, "j": 1, "q": 1, "z": 0.6}
_FREQ.update({c: 1.5 for c in "TAISWHBMCO"})
_FREQ.update({c: 0.5 for c in "DEFGKLNPRUVYJQXZ"})


def synthetic_text(n_chars: int, seed: int) -> bytes:
    """Random ASCII text whose characters follow `_FREQ`."""
    import numpy as np

    chars = np.frombuffer("".join(_FREQ).encode(), np.uint8)
    weights = np.array(list(_FREQ.values()))
    # A 64k-entry lookup table drawn once makes sampling a single fancy index.
    counts = np.floor(weights / weights.sum() * 65536).astype(int)
    counts[0] += 65536 - counts.sum()
    lut = np.repeat(chars, counts)
    rng = np.random.default_rng(seed)
    return lut[rng.integers(0, 65536, n_chars, dtype=np.uint16)].tobytes()


def write_corpus(folder: str, total_bytes: int, seed: int = 0,
                 one_file: bool = False) -> list[str]:
    """Writes `total_bytes` of synthetic text as 10 MB shards (or, with `one_file`,
    the same 10 MB blocks appended to one file); returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths, left, i = [], total_bytes, 0
    while left > 0:
        size = min(SHARD_BYTES, left)
        path = os.path.join(folder, "corpus.txt" if one_file else f"shard-{i:05d}.txt")
        with open(path, "ab" if one_file else "wb") as f:
            f.write(synthetic_text(size, seed * 100_003 + i))
        if path not in paths:
            paths.append(path)
        left -= size
        i += 1
    return paths


def median(values: Sequence[float]) -> float:
    """The median of `values`; NaN (not measured) when there are none."""
    return statistics.median(values) if values else float("nan")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats get thousands separators and sensible precision."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:  # NaN: not measured.
                return "-"
            if abs(value) >= 100:
                return f"{value:,.0f}"
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,d}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(path: str, result: dict[str, Any]) -> None:
    """Writes a benchmark's JSON result, creating the folder, atomically."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)


def report(table: str, path: str, result: dict[str, Any]) -> None:
    """Prints a benchmark's table, writes its JSON result and says where."""
    print(table)
    write_result(path, result)
    print(f"wrote {path}", file=sys.stderr)


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux).

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and
    exec, so a child started by a big parent would report the parent's peak.
    """
    return _status_mb("VmHWM")


class BenchError(Exception):
    """A figure the benchmark must produce could not be measured; shown as one line."""


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`, for a one-line error."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


@contextlib.contextmanager
def measuring(what: str) -> Iterator[None]:
    """Turns any failure inside the block into a BenchError that names `what`.

    The traceback is logged at -v=1 (debug), so the default output stays one line.
    """
    try:
        yield
    except BenchError:
        raise
    except Exception as err:
        from absl import logging

        logging.debug("%s failed", what, exc_info=True)
        raise BenchError(f"{what} failed: {first_line(err)}") from err


def is_figure(value: Any) -> bool:
    """Whether `value` is a measured number: an int or a finite float (not None, not NaN)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def require(figures: Mapping[str, Any]) -> None:
    """Raises BenchError naming every figure of `figures` that is missing or NaN."""
    missing = [name for name, value in figures.items() if not is_figure(value)]
    if missing:
        raise BenchError(f"not measured: {', '.join(missing)}")


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run(main)` for a benchmark.

    A BenchError or the trainer's UserError becomes one `error: ...` line on stderr
    and exit status 1. SIGTERM becomes SystemExit, so the `finally` and `with` blocks
    that stop a benchmark's servers and workers (started in sessions of their own,
    out of reach of a signal to this process's group) run before it exits.
    """
    from absl import app

    from trainer.errors import UserError

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    def wrapped(argv: list[str]) -> int | None:
        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return main(argv)
        except (BenchError, UserError) as err:
            print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr, flush=True)
            return 1

    app.run(wrapped)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The text a benchmark trains on: file patterns of its two parts and a description."""

    train: str
    val: str
    description: str


def check_corpus(path: str) -> tuple[list[str], list[str]] | None:
    """Checks a --corpus value without reading it.

    Args:
      path: a folder with train/*.txt and val/*.txt shards, or one text file.

    Returns:
      The folder's (train, val) shard paths, or None for a single file.

    Raises:
      BenchError: there is no such corpus (the message tells how to get one).
    """
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        shards = [sorted(glob.glob(os.path.join(path, part, "*.txt"))) for part in ("train", "val")]
        if all(shards):
            return shards[0], shards[1]
        raise BenchError(f"{path} holds no train/*.txt and val/*.txt shards: {CORPUS_HINT}")
    raise BenchError(f"no corpus at {path}: {CORPUS_HINT}")


def corpus(path: str, folder: str) -> Corpus:
    """The --corpus flag's text as train and validation patterns.

    Args:
      path: a folder with train/*.txt and val/*.txt shards (what `make data` writes), or
        one text file, split by characters as nanoGPT's shakespeare_char does: the first
        90% train, the rest validate (how the published figures used tinyshakespeare.txt).
      folder: where the two parts of a single file are written, as train/train.txt and
        val/val.txt.

    Returns:
      The patterns of the two parts, with a description for the result.

    Raises:
      BenchError: there is no such corpus.
    """
    shards = check_corpus(path)
    if shards is not None:
        train, val = shards
        size = [sum(os.path.getsize(p) for p in part) for part in shards]
        return Corpus(os.path.join(path, "train", "*.txt"), os.path.join(path, "val", "*.txt"),
                      f"{path} ({len(train)} train shard(s), {size[0]:,} bytes; {len(val)} val "
                      f"shard(s), {size[1]:,} bytes)")
    from trainer import storage
    from trainer.data import vocabulary

    # Decoded as the job decodes a shard, so the cut falls on a character, never inside one.
    text, _ = vocabulary.decode(storage.read_bytes(path))
    cut = int(len(text) * TRAIN_SHARE)
    patterns = []
    for part, chars in (("train", text[:cut]), ("val", text[cut:])):
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        with open(os.path.join(folder, part, f"{part}.txt"), "w", encoding="utf-8") as f:
            f.write(chars)
        patterns.append(f.name)
    # The file's name, not where this machine keeps it: the result is read elsewhere.
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return Corpus(patterns[0], patterns[1], f"{name} split 90/10 by characters ({cut:,} train, "
                  f"{len(text) - cut:,} val chars)")
