"""Which numeric precision and compiler settings this machine can run, decided up front.

`--precision=auto` becomes mixed_bfloat16 on a CPU that multiplies bfloat16 natively
(and has no GPU), float32 elsewhere. Settings a GPU cannot run (XLA around the cuDNN
LSTM, bfloat16 in it) are refused with one line before anything is written. A layer
width that oneDNN multiplies slowly in float32 without AVX-512 is warned about.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from trainer.config import Config
from trainer.errors import UserError


def has_gpu() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def check_jit_compile(cfg: Config) -> None:
    """--jit_compile cannot work where the LSTMs run the cuDNN kernel: say so up front."""
    if cfg.jit_compile and has_gpu():
        raise UserError("--jit_compile does not work on a GPU: XLA has no kernel for the cuDNN "
                        "LSTM (CudnnRNNV3), which is the fast path there; drop --jit_compile")


def check_precision(cfg: Config) -> None:
    """mixed_bfloat16 cannot work where the LSTMs run the cuDNN kernel: say so up front."""
    if cfg.precision == "mixed_bfloat16" and has_gpu():
        raise UserError("--precision=mixed_bfloat16 does not work on a GPU: the cuDNN LSTM "
                        "kernel takes float16, float32 or float64 only; use "
                        "--precision=mixed_float16 there")


def _onednn_capped_below_avx512() -> bool:
    """Whether `ONEDNN_MAX_CPU_ISA` holds oneDNN below AVX-512 (e.g. AVX2)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return bool(cap) and cap != "ALL" and not cap.startswith(("AVX512", "AVX10"))


def _cpu_flags(cpuinfo: str) -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None when it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            return {word for line in f if line.startswith("flags")
                    for word in line.split(":", 1)[-1].split()}
    except OSError:
        return None


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX512_BF16 or AMX-BF16 flags).

    Elsewhere oneDNN emulates bfloat16 and mixed_bfloat16 runs slower than float32.
    oneDNN capped below AVX-512 (`ONEDNN_MAX_CPU_ISA`, e.g. AVX2) uses neither: then False.
    """
    if _onednn_capped_below_avx512():
        return False
    return bool((_cpu_flags(cpuinfo) or set()) & {"avx512_bf16", "amx_bf16"})


def slow_width_warning(cfg: Config, cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """A warning when --rnn_units is a power of two and the LSTMs train in float32 on a
    CPU whose oneDNN runs without AVX-512 (an x86 CPU with AVX2 and no AVX-512, or one
    held to AVX2 by `ONEDNN_MAX_CPU_ISA`), with no GPU; None otherwise (other CPUs are
    not measured).

    There oneDNN multiplies the LSTMs' 4 x units-wide gate products far more slowly
    when units is a power of two: a training step of 2 x LSTM(256) took 1.7x as long
    as 2 x LSTM(248) and 1.6x as long as 2 x LSTM(264), which does more arithmetic
    (128: 1.4x 120, 1.2x 136; 512: 1.5x 504); with AVX-512 the gap is about 1.1x, in
    bfloat16 none (BENCHMARKS.md, *LSTM width*; `python -m bench.lstm_width`).
    """
    units = cfg.rnn_units
    if (cfg.precision != "float32" or units < 128 or units & (units - 1) or has_gpu()):
        return None
    flags = _cpu_flags(cpuinfo) or set()
    # Measured on x86 only: an AVX2 CPU without AVX-512, or oneDNN held below it.
    if not _onednn_capped_below_avx512() and ("avx2" not in flags or "avx512f" in flags):
        return None
    return (f"--rnn_units={units} is a power of two: in float32 without AVX-512, oneDNN "
            f"multiplies such LSTMs slowly (a training step took 1.2-1.7x as long as at "
            f"{units - 8} or {units + 8} units); --rnn_units={units - 8} trains more text "
            f"a second here")


def resolve_precision(cfg: Config, cpuinfo: str = "/proc/cpuinfo") -> Config:
    """Replaces --precision=auto with what this machine runs best (see Config.precision)."""
    if cfg.precision != "auto":
        return cfg
    if has_gpu():
        precision, why = "float32", "a GPU"
    elif cpu_has_bfloat16(cpuinfo):
        precision, why = "mixed_bfloat16", "CPU with bfloat16 instructions, no GPU"
    else:
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
        precision, why = "float32", (f"oneDNN capped at {cap} by ONEDNN_MAX_CPU_ISA" if cap
                                     else "CPU without bfloat16 instructions")
    logging.info("--precision=auto: %s (%s)", precision, why)
    return cfg.replace(precision=precision)


def settle(cfg: Config) -> Config:
    """The config with --precision resolved, after refusing what this machine cannot run."""
    check_jit_compile(cfg)
    cfg = resolve_precision(cfg)
    check_precision(cfg)
    warning = slow_width_warning(cfg)
    if warning:
        logging.warning("%s", warning)
    return cfg
