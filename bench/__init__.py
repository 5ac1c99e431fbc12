"""Benchmarks, run together by `make bench` (python -m bench.run) or one by one.

The few things every benchmark shares live here: how the machine and its load
are described next to each figure, synthetic corpora (random text with
English-like character frequencies, as 10 MB shards), how a markdown table is
printed, and how a result is written. Importing this package stays cheap (no TensorFlow), so a
benchmark's --help answers at once.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

# The corpus the quality and throughput benchmarks read by default, relative to the repo.
DEFAULT_CORPUS = "../shared/data/tinyshakespeare.txt"
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
