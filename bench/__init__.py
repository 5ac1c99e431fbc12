"""Benchmarks, run together by `make bench` (python -m bench.run) or one by one.

The few things every benchmark shares live here: how the machine and its load
are described next to each figure, how a markdown table is printed, and how a
result is written. Importing this package stays cheap (no TensorFlow), so a
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
