"""Tests for trainer.training.precision: what --precision=auto picks on which CPU, and
the warning about LSTM widths that oneDNN multiplies slowly in float32 without AVX-512."""

from __future__ import annotations

import logging

import pytest
from training_jobs import tiny

from trainer.training import precision


@pytest.fixture
def cpuinfo(tmp_path):
    """Writes a two-CPU /proc/cpuinfo with the given flags; returns its path."""
    def write(name: str, flag_line: str) -> str:
        path = tmp_path / name
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flag_line}\n\n"
                        f"processor\t: 1\nflags\t\t: fpu sse2 {flag_line}\n")
        return str(path)
    return write


def test_auto_precision_follows_the_cpu_flags(corpus, tmp_path, monkeypatch, cpuinfo):
    # bfloat16 only where the CPU multiplies it natively; emulated, it is slower than float32.
    zen4, sapphire, avx2 = (cpuinfo("zen4", "avx2 avx512f avx512_bf16"),
                            cpuinfo("spr", "avx512f amx_bf16 amx_tile"), cpuinfo("avx2", "avx2"))
    assert precision.cpu_has_bfloat16(zen4) and precision.cpu_has_bfloat16(sapphire)
    assert not precision.cpu_has_bfloat16(avx2)
    assert not precision.cpu_has_bfloat16(str(tmp_path / "missing"))
    # oneDNN capped at AVX2 (as on an AVX2-only CPU) runs no bfloat16 instructions.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.cpu_has_bfloat16(zen4)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert precision.cpu_has_bfloat16(sapphire)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    auto = tiny(corpus, tmp_path, precision="auto")
    assert precision.resolve_precision(auto, zen4).precision == "mixed_bfloat16"
    assert precision.resolve_precision(auto, avx2).precision == "float32"
    fixed = auto.replace(precision="mixed_float16")
    assert precision.resolve_precision(fixed, zen4) is fixed
    monkeypatch.setattr(precision.tf.config, "list_logical_devices",
                        lambda kind=None: ["/device:GPU:0"] if kind == "GPU" else [])
    assert precision.resolve_precision(auto, zen4).precision == "float32"  # cuDNN: no bfloat16.


def test_a_power_of_two_width_is_warned_about_in_float32_without_avx512(
        corpus, tmp_path, monkeypatch, cpuinfo, caplog):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    avx2, zen4 = cpuinfo("avx2", "avx2 fma"), cpuinfo("zen4", "avx2 avx512f avx512_bf16")
    cfg = tiny(corpus, tmp_path, precision="float32", rnn_units=256)
    warning = precision.slow_width_warning(cfg, avx2)
    assert warning.startswith("--rnn_units=256 is a power of two")
    assert "--rnn_units=248" in warning and "\n" not in warning
    for units in (128, 512):
        assert f"--rnn_units={units - 8} " in precision.slow_width_warning(
            cfg.replace(rnn_units=units), avx2)
    # Not a power of two, too small to matter, not float32, or oneDNN has AVX-512: silent.
    for quiet in (cfg.replace(rnn_units=248), cfg.replace(rnn_units=264),
                  cfg.replace(rnn_units=64), cfg.replace(precision="mixed_bfloat16")):
        assert precision.slow_width_warning(quiet, avx2) is None
    assert precision.slow_width_warning(cfg, zen4) is None
    # Unmeasured elsewhere (an ARM CPU's oneDNN runs other kernels), or unreadable: silent.
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve\n")
    assert precision.slow_width_warning(cfg, str(arm)) is None
    assert precision.slow_width_warning(cfg, str(tmp_path / "missing")) is None
    # An AVX-512 CPU with oneDNN held to AVX2 multiplies as an AVX2-only one does.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.slow_width_warning(cfg, zen4) == warning
    # A GPU runs cuDNN, not oneDNN.
    monkeypatch.setattr(precision.tf.config, "list_logical_devices",
                        lambda kind=None: ["/device:GPU:0"] if kind == "GPU" else [])
    assert precision.slow_width_warning(cfg, avx2) is None
    monkeypatch.undo()
    # The job logs it once, as it settles the config.
    monkeypatch.setattr(precision, "_cpu_flags", lambda cpuinfo: {"avx2"})
    with caplog.at_level(logging.WARNING):
        assert precision.settle(cfg) == cfg
    assert [r.getMessage() for r in caplog.records if "power of two" in r.getMessage()] == [
        warning]
