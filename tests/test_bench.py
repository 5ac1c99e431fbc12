"""Smoke tests of the benchmarks: each one at a tiny size, through its own command line.

Every benchmark runs as `python -m bench.NAME` in a subprocess (its flags, its
measurements, the check of its figures, the JSON it writes and its exit status) on
a tiny corpus written here, never the network; a figure missing from the JSON, or
NaN, fails the test. Each run has a timeout, after which the benchmark gets SIGTERM
(it stops the servers and workers it started) and then its process group SIGKILL.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys

import pytest
from cluster import write_corpus

import bench
from bench import lstm_width, quality
from bench import run as bench_run
from trainer.config import Config
from trainer.training import distribution

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # Seconds one benchmark may take on a loaded 2-core machine.


def run_bench(module: str, *args: str, cwd: str = REPO,
              timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m module args...`; SIGTERM, then SIGKILL to its group, past `timeout`."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        pytest.fail(f"python -m {module} ran past {timeout:g} s")
    finally:
        try:  # Whatever it left in its own group goes too.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def measured(result: subprocess.CompletedProcess, path) -> dict:
    """The JSON of a run that must have succeeded."""
    assert result.returncode == 0, result.stderr[-3000:]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def assert_figures(figures: dict) -> None:
    """Every value is a number and none is NaN or infinite."""
    missing = {name: value for name, value in figures.items()
               if isinstance(value, bool) or not isinstance(value, int | float)
               or not math.isfinite(value)}
    assert figures and not missing, f"not measured: {missing}"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The `error:` line a failed run ends with (exit status 1, no traceback)."""
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, \
        result.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    """About 25 KB of text in one file (the single-file form of --corpus)."""
    return glob.glob(write_corpus(str(tmp_path_factory.mktemp("text")), 1, 6000))[0]


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> str:
    """train/*.txt and val/*.txt shards (the form `make data` writes)."""
    folder = str(tmp_path_factory.mktemp("shards"))
    write_corpus(os.path.join(folder, "train"), 2)
    write_corpus(os.path.join(folder, "val"), 1)
    return folder


def test_corpus_is_a_shard_folder_or_one_file_split_90_10(text_file, shard_folder, tmp_path):
    shards = bench.corpus(shard_folder, str(tmp_path / "unused"))
    assert shards.train == os.path.join(shard_folder, "train", "*.txt")
    assert shards.val == os.path.join(shard_folder, "val", "*.txt")
    assert "2 train shard(s)" in shards.description
    assert not (tmp_path / "unused").exists()

    split = bench.corpus(text_file, str(tmp_path / "split"))
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    with open(split.train, encoding="utf-8") as f, open(split.val, encoding="utf-8") as g:
        train, val = f.read(), g.read()
    assert train + val == text and len(train) == int(len(text) * 0.9)
    # The result names the file, not the folder this machine keeps it in.
    assert split.description.startswith(f"{os.path.basename(text_file)} split 90/10")
    assert os.path.dirname(text_file) not in split.description

    with pytest.raises(bench.BenchError, match="run `make data`, or pass --corpus"):
        bench.corpus(str(tmp_path / "missing"), str(tmp_path / "x"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(bench.BenchError, match="no train/\\*.txt and val/\\*.txt"):
        bench.check_corpus(str(tmp_path / "empty"))


def test_require_names_every_figure_that_is_missing_or_nan():
    bench.require({"chars/s": 1.5, "steps": 3})
    with pytest.raises(bench.BenchError, match="not measured: ratio, baseline, flag$"):
        bench.require({"chars/s": 1.5, "ratio": float("nan"), "baseline": None, "flag": True})


def test_quality_spread_groups_a_presets_seeds():
    def run(name, seed, carried, windowed, common=None):
        out = {"name": name, "seed": seed, "final_val_carried_loss": carried,
               "final_val_loss": windowed}
        return {**out, "common": common} if common else out

    runs = [run("quality", 1, 1.40, 1.52, {"carried": 1.39, "windowed": 1.45}),
            run("quality", 2, 1.38, 1.50, {"carried": 1.37, "windowed": 1.44}),
            run("cpu", 1, 1.45, 1.49), {"preset": "tiny", "final_val_loss": 2.0},
            run("quality", 3, 1.42, 1.51, {"carried": 1.41, "windowed": 1.47})]
    (row,) = quality.spread(runs)  # "cpu" has one seed, "tiny" none: no spread.
    assert row["name"] == "quality" and row["seeds"] == [1, 2, 3]
    assert row["carried"] == pytest.approx({"mean": 1.40, "min": 1.38, "max": 1.42})
    assert row["windowed"] == pytest.approx({"mean": 1.51, "min": 1.50, "max": 1.52})
    assert row["common carried"]["mean"] == pytest.approx(1.39)
    assert row["common windowed"] == pytest.approx({"mean": 4.36 / 3, "min": 1.44,
                                                    "max": 1.47})
    # A run without the kept weights' scores leaves those columns out, not half-averaged.
    runs[0].pop("common")
    (row,) = quality.spread(runs)
    assert "common carried" not in row and row["carried"]["max"] == pytest.approx(1.42)
    assert "1.4000 (1.3800-1.4200)" in quality._spread_table([row])


@pytest.mark.parametrize("module", ["bench.train_throughput", "bench.quality", "bench.run",
                                    "bench.cpu_threads"])
def test_without_a_corpus_a_benchmark_says_make_data_in_one_line(module, tmp_path):
    # Run outside the repository: the default, data/shakespeare, is not there.
    line = one_error_line(run_bench(module, cwd=str(tmp_path), timeout=60))
    assert "no corpus at data/shakespeare: run `make data`, or pass --corpus" in line


def test_a_figure_that_cannot_be_measured_fails_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "job").mkdir()
    out = tmp_path / "generate.json"
    line = one_error_line(run_bench("bench.generate", f"--job_dir={tmp_path}/job",
                                    f"--out={out}"))
    assert line.startswith("error: generation failed: ")
    assert not out.exists()


def test_plan_runs_every_benchmark_on_the_corpus():
    steps = dict(bench_run.plan("out", quick=True, long=False, corpus="data/x"))
    assert list(steps) == ["train_throughput", "cpu_threads", "lstm_width", "input_pipeline",
                           "multi_worker_stop", "generate", "serve_load", "quality"]
    assert "--isa=AVX2" in steps["lstm_width"] and "--corpus=data/x" in steps["lstm_width"]
    assert "--corpus=data/x" in steps["train_throughput"]
    assert "--corpus=data/x" in steps["cpu_threads"] and "--rounds=1" in steps["cpu_threads"]
    assert "--corpus=data/x" in steps["quality"]


def test_train_throughput(text_file, tmp_path):
    out = tmp_path / "train.json"
    result = measured(run_bench("bench.train_throughput", f"--corpus={text_file}",
                                "--models=1x32", "--steps=2", "--rounds=1", f"--out={out}"), out)
    assert {(v["path"], v["xla"]) for v in result["variants"]} == {
        ("ours", False), ("keras fit", False), ("ours", True), ("keras fit", True)}
    figures = {f"{v['path']} xla={v['xla']}": v["chars_per_sec"] for v in result["variants"]}
    figures.update({f"ratio xla={r['xla']}": r["median"] for r in result["ratios"]})
    figures.update({o["objective"]: o["targets_per_sec"] for o in result["objectives"]})
    assert len(result["ratios"]) == 2 and len(result["objectives"]) == 2
    assert_figures(figures)
    assert "split 90/10" in result["corpus"]


def test_cpu_threads(text_file, tmp_path):
    out = tmp_path / "threads.json"
    result = measured(run_bench("bench.cpu_threads", f"--corpus={text_file}", "--presets=tiny",
                                "--steps=2", "--rounds=1", f"--out={out}"), out)
    (row,) = result["presets"]
    assert_figures({k: row[k] for k in ("auto_chars_per_sec", "tensorflow_chars_per_sec",
                                        "ratio")})
    # Each variant's job recorded the pools it ran with: auto as this machine resolves it.
    cfg = Config(train_data="t.txt", job_dir="j", rnn_units=row["rnn_units"])
    auto = distribution.thread_counts(cfg, distribution.usable_cpus(), gpu=False)
    assert row["auto_threads"] == [auto["intra_op_threads"], auto["inter_op_threads"]]
    assert row["tensorflow_threads"] == [0, 0]
    assert len(row["rounds"]["auto"]) == len(row["rounds"]["tensorflow"]) == 1


def test_lstm_width(text_file, tmp_path):
    out = tmp_path / "width.json"
    result = measured(run_bench("bench.lstm_width", f"--corpus={text_file}", "--preset=tiny",
                                "--widths=8,12", "--steps=2", "--rounds=1",
                                "--flag=--intra_op_threads=3", f"--out={out}"), out)
    assert [r["rnn_units"] for r in result["widths"]] == [8, 12]
    for row in result["widths"]:
        assert_figures({k: row[k] for k in ("chars_per_sec", "lstm_gflops")})
        # Each round's job trained the width asked for, with the flags passed on.
        assert [r["rnn_units"] for r in row["rounds"]] == [row["rnn_units"]]
        assert row["threads"][0] == 3  # --flag reached every job (auto would be 1 or 0).
        layers, embedding = row["rounds"][0]["num_layers"], row["rounds"][0]["embedding_dim"]
        assert row["lstm_gflops"] == pytest.approx(
            row["chars_per_sec"] * lstm_width.lstm_flops_per_char(
                row["rnn_units"], layers, embedding) / 1e9)
    # 2 layers of 4 units over 3 inputs, then 4: 6 x 4 x 4 x (3 + 4) + 6 x 4 x 4 x (4 + 4).
    assert lstm_width.lstm_flops_per_char(4, 2, 3) == 6 * 4 * 4 * 7 + 6 * 4 * 4 * 8


def test_lstm_width_refuses_a_width_that_is_not_a_number(text_file, tmp_path):
    done = run_bench("bench.lstm_width", f"--corpus={text_file}", "--widths=248,wide",
                     f"--out={tmp_path / 'w.json'}")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "error: --widths takes positive whole numbers, not 'wide'")
    assert not (tmp_path / "w.json").exists()
    done = run_bench("bench.lstm_width", f"--corpus={text_file}", "--widths=",
                     f"--out={tmp_path / 'w.json'}")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "error: --widths needs at least one width, e.g. --widths=248,256")
    assert not (tmp_path / "w.json").exists()


def test_input_pipeline(tmp_path):
    out = tmp_path / "pipeline.json"
    result = measured(run_bench(
        "bench.input_pipeline", "--speed_mb=1", "--rounds=1", "--flat_map_batches=2",
        "--rss_mb=1mb", "--rss_repeats=1", "--tutorial_chars=3000",
        "--train_windows_per_sec=100", f"--tmp_dir={tmp_path}", f"--out={out}"), out)
    speed = result["speed"]
    assert len(speed["median_windows_per_sec"]) == 3
    figures = dict(speed["median_windows_per_sec"])
    figures.update({"ours / (a)": speed["ours_vs_frame"],
                    "ours / training": result["ours_vs_training"],
                    "fewest pieces": speed["single_file_mixing"]["fewest_per_batch"],
                    "tutorial peak RSS": result["tutorial"]["peak_rss_mb"]})
    assert [row["layout"] for row in result["memory"]] == ["1mb"]
    figures.update({f"{k} 1mb": result["memory"][0][k]
                    for k in ("peak_rss_mb", "scan_mb_per_sec", "windows_per_sec")})
    assert_figures(figures)


def test_generate(tmp_path):
    out = tmp_path / "generate.json"
    result = measured(run_bench(
        "bench.generate", f"--job_dir={REPO}/tests/fixtures/job_0_1_0", "--length=16",
        "--streams=2", "--tutorial_chars=2", "--repeats=1", f"--out={out}"), out)
    assert len(result["rows"]) == 5
    assert_figures({r["name"]: r["chars_per_sec"] for r in result["rows"]})
    assert_figures({f"{r['name']} x": r["speedup"] for r in result["rows"]})


def test_quality(shard_folder, tmp_path):
    out, png = tmp_path / "quality.json", tmp_path / "quality.png"
    result = measured(run_bench(
        "bench.quality", f"--corpus={shard_folder}", "--presets=tiny", "--minutes=0.5",
        "--flag=--epochs=3", "--flag=--steps_per_epoch=2", "--flag=--validation_freq=2",
        "--score_seq_length=32", "--score_batch_size=16", "--seeds=7", f"--out={out}",
        f"--plot={png}"), out)
    (run,) = result["runs"]
    # The seed reached the job; one seed gives no spread.
    assert run["config"]["seed"] == 7 and run["label"] == "tiny seed 7"
    assert result["spread"] == []
    assert_figures({k: run[k] for k in ("final_val_loss", "best_val_loss", "final_val_bpc",
                                        "train_sec", "chars_trained")})
    assert run["chars_trained"] == 6 * 16 * 32  # Steps x the tiny preset's batch x window.
    # Validated after epochs 2 and 3 only (--validation_freq and the last epoch).
    assert ["val_loss" in e for e in run["epochs"]] == [False, True, True]
    assert run["best_val_loss"] == min(e["val_loss"] for e in run["epochs"][1:])
    # Scored again at the job's own shape (the tiny preset's 32 x 16), the kept weights
    # (the best validation's, by val_loss) give that validation's windowed figure.
    assert run["common"]["seq_length"] == 32 and run["common"]["batch_size"] == 16
    assert run["common"]["windowed"] == pytest.approx(run["best_val_loss"], rel=1e-4)
    assert_figures({"common carried": run["common"]["carried"]})
    assert png.stat().st_size > 0


def test_serve_load(tmp_path):
    out = tmp_path / "serve.json"
    result = measured(run_bench("bench.serve_load", "--clients=1,2", "--min_requests=2",
                                "--length=8", "--overload_seconds=1",
                                "--overload_queue_rows=2", f"--out={out}"), out)
    assert [(r["batching"], r["clients"]) for r in result["rows"]] == [
        ("on", 1), ("on", 2), ("off", 1), ("off", 2)]
    for row in result["rows"]:
        assert row["requests"] == max(2, -(-2 // row["clients"])) * row["clients"]
        assert_figures({k: row[k] for k in ("requests_per_sec", "p50_ms", "p99_ms")})
    assert [r["admission"] for r in result["overload"]] == ["on", "off"]
    for row in result["overload"]:
        assert 0 <= row["refused_share"] < 1 and row["admitted"] > 0
        assert_figures({k: row[k] for k in ("p50_ms", "p99_ms")})
    assert result["overload"][1]["refused_share"] == 0


def test_multi_worker_stop(tmp_path):
    out = tmp_path / "stop.json"
    result = measured(run_bench("bench.multi_worker_stop", "--rounds=1", "--workers=2",
                                "--timeout=200", f"--out={out}"), out)
    (round_,) = result["rounds"]
    assert_figures({"exit s": round_["exit_sec"], "median": result["median_exit_sec"]})
    for name in ("stopped_at", "resumed_at", "steps_lost"):
        assert len(round_[name]) == 2
        assert_figures({f"{name} {i}": v for i, v in enumerate(round_[name])})
