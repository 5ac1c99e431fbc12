"""The GPU tooling's round trip, run on this CPU with Keras's TensorFlow backend.

bench.gpu_keras_torch trains the job's model outside the job (on a GPU machine it
uses the torch backend) and bench.gpu_import must load what it saved into the job's
TensorFlow model, score it the same, and write a job directory trainer.generate reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from trainer import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_gpu_tooling_round_trip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the cat sat on the mat, we see the sea.\n"
                              for i in range(2500)))
    out = tmp_path / "out"
    _run("bench.gpu_keras_torch", f"--corpus={corpus}", f"--out={out}", "--smoke",
         "--parts=quality", KERAS_BACKEND="tensorflow")
    with open(out / "results.json") as f:
        results = json.load(f)
    run = results["quality"]["gpu preset"]
    assert run["passes_run"] == 2 and run["val_loss"] < 3.5  # Learned something (ln 66 = 4.2).
    assert run["weight_files"] == ["best.part0.npz"]
    _run("bench.gpu_import", f"--results={out}/results.json", f"--weights={out}/best.part*.npz",
         f"--corpus={corpus}", f"--job_dir={tmp_path}/job", f"--out={tmp_path}/import.json",
         "--tolerance=1e-4")
    with open(tmp_path / "import.json") as f:
        assert json.load(f)["abs_difference"] <= 1e-4
    cfg, vocab, model, pointer = checkpoints.load_job(str(tmp_path / "job"))
    assert (cfg.num_layers, cfg.rnn_units) == (run["config"]["num_layers"],
                                               run["config"]["rnn_units"])
    # The job dir's best value is TensorFlow's score; the run's is rounded to 4 places.
    assert abs(pointer["value"] - run["val_loss"]) <= 1e-4 + 5e-5
