"""Bucket I/O and fault tolerance, against a real storage emulator on loopback.

Each test runs `python -m trainer.task` as a separate process, as a cloud job
would run, and kills, signals or cuts it off from the bucket along the way.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from training_jobs import metrics, tiny

from trainer import storage
from trainer.training import reporting, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "we", "see", "the", "sea", "while",
         "dogs", "run", "in", "fog"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    for i in range(4):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(1500)]
        (folder / f"part-{i}.txt").write_text(" ".join(words) + "\n")
    return str(folder)


def _args(train_data: str, job_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer.task", "--preset=tiny", f"--train_data={train_data}",
            "--val_fraction=0.1", f"--job_dir={job_dir}", *extra]


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                            capture_output=True, text=True, timeout=timeout)
    return result


def _start(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout: float = 180, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before the condition")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _lines(path) -> int:
    return len(_read(path).splitlines()) if os.path.exists(path) else 0


def _latest_step(job_dir: str) -> int:
    path = os.path.join(job_dir, "ckpt", "latest.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return json.load(f)["checkpoints"][0]["step"]


def _best(job_dir: str) -> dict:
    return json.loads(storage.read_text(storage.join(job_dir, "best.json")))


def test_whole_run_against_a_bucket_then_generate_from_it(gcs_bucket, shards, tmp_path):
    assert os.environ["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
    bucket = gcs_bucket()
    for path in glob.glob(os.path.join(shards, "*.txt")):
        storage.copy_file(path, f"{bucket}/corpus/{os.path.basename(path)}")
    job = f"{bucket}/runs/one"
    first = _run(_args(f"{bucket}/corpus/*.txt", job, f"--local_dir={tmp_path / 'a'}"))
    assert first.returncode == 0, first.stderr[-3000:]
    names = storage.listdir(job)
    best = _best(job)
    for name in ("config.json", "vocab.json", "best.json", "metrics.jsonl", best["weights"]):
        assert name in names
    for name, record in best["files"].items():  # The pointer names what is really there.
        assert storage.size(f"{job}/{name}") == record["size"]
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{job}/logs"))
    assert "latest.json" in storage.listdir(f"{job}/ckpt")
    # A new machine (empty staging folder) resumes from the bucket alone.
    again = _run(_args(f"{bucket}/corpus/*.txt", job, "--epochs=3",
                       f"--local_dir={tmp_path / 'b'}"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from ckpt/ckpt-" in again.stderr
    lines = storage.read_text(f"{job}/metrics.jsonl").splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    # Back on the first machine, whose staged metrics.jsonl stops at epoch 2: the
    # bucket's copy is the one continued, not the stale one.
    back = _run(_args(f"{bucket}/corpus/*.txt", job, "--epochs=4",
                      f"--local_dir={tmp_path / 'a'}"))
    assert back.returncode == 0, back.stderr[-3000:]
    lines = storage.read_text(f"{job}/metrics.jsonl").splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    # The job directory deleted to start over on that machine: nothing of the old run
    # (its metrics, its staged TensorBoard events) comes back into the new one.
    events = set(storage.listdir(f"{job}/logs"))
    storage.delete_prefix(job)
    over = _run(_args(f"{bucket}/corpus/*.txt", job, "--epochs=1",
                      f"--local_dir={tmp_path / 'a'}"))
    assert over.returncode == 0, over.stderr[-3000:]
    assert [json.loads(line)["epoch"] for line in storage.read_text(
        f"{job}/metrics.jsonl").splitlines()] == [1]
    new_events = set(storage.listdir(f"{job}/logs"))
    assert new_events and not new_events & events
    sample = subprocess.run([sys.executable, "-m", "trainer.generate", f"--job_dir={job}",
                             "--length=40", "--prime=the ", "--seed=3"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                            text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert len(sample.stdout.rstrip("\n")) >= 40


def _slow(shards: str, job: str, *extra: str) -> list[str]:
    # Enough steps per epoch that a signal lands mid-epoch.
    return _args(f"{shards}/*.txt", job, "--epochs=2", "--rnn_units=64", "--batch_size=8",
                 "--checkpoint_every_steps=10", "--sample_length=0", *extra)


def test_sigkill_mid_epoch_then_the_same_command_resumes(shards, tmp_path):
    job = str(tmp_path / "job")
    args = _slow(shards, job)
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(args, log)
        _wait_for(lambda: _latest_step(job) >= 20, proc=proc)
        proc.kill()
        proc.wait()
    saved = _latest_step(job)
    best_before = _best(job)["value"] if os.path.exists(os.path.join(job, "best.json")) else None
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from ckpt/ckpt-{saved} at step {saved}" in result.stderr
    if best_before is not None:
        assert _best(job)["value"] <= best_before


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_saves_every_completed_step_and_exits(shards, tmp_path, signum, code):
    job = str(tmp_path / "job")
    args = _slow(shards, job)
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(args, log)
        _wait_for(lambda: _latest_step(job) >= 10, proc=proc)
        sent = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == code
        took = time.monotonic() - sent
    output = _read(tmp_path / "first.log")
    assert took < 30, output[-2000:]
    name = signal.Signals(signum).name
    stopped_at = int(output.split(f"stopped by {name} at step ")[1].split(";")[0])
    assert _latest_step(job) == stopped_at  # Nothing completed was lost.
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {stopped_at}" in result.stderr


def test_mirrored_with_dropout_stops_on_sigterm_and_resumes_at_that_step(shards, tmp_path):
    # As the single-node spec runs: mirrored replicas, dropout 0.2.
    job = str(tmp_path / "job")
    args = _slow(shards, job, "--strategy=mirrored", "--logical_cpus=2", "--batch_size=4",
                 "--dropout=0.2")
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(args, log)
        _wait_for(lambda: _latest_step(job) >= 10, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    output = _read(tmp_path / "first.log")
    assert "2 replica(s)" in output
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert _latest_step(job) == stopped_at
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from ckpt/ckpt-{stopped_at} at step {stopped_at}" in result.stderr
    assert [json.loads(line)["epoch"] for line in _read(f"{job}/metrics.jsonl").splitlines()] \
        == [1, 2]


def test_training_rides_out_a_bucket_outage(gcs_emulator, gcs_bucket, shards, tmp_path):
    job = f"{gcs_bucket()}/runs/outage"
    stage = tmp_path / "stage"
    # Enough epochs (about 0.6 s each here) that the outage surely starts mid-training: with
    # 8 a quick machine had finished them before the emulator was down.
    epochs = 40
    args = _args(f"{shards}/*.txt", job, f"--epochs={epochs}", "--rnn_units=64",
                 "--sample_length=0", f"--local_dir={stage}", "--checkpoint_every_steps=20")
    with open(tmp_path / "job.log", "w") as log:
        proc = _start(args, log)
        _wait_for(lambda: os.path.exists(stage / "best.json"), proc=proc)
        gcs_emulator.stop()
        try:
            metrics = stage / "metrics.jsonl"
            epochs_before = _lines(metrics)
            assert epochs_before <= epochs - 2, "training ended before the outage began"
            # Training goes on while the bucket is away: more epochs complete. The outage
            # lasts past the storage client's own 10 s of retries, so our uploader sees
            # the failures and logs them.
            away = time.monotonic()
            _wait_for(lambda: _lines(metrics) >= epochs_before + 2, proc=proc)
            _wait_for(lambda: time.monotonic() - away > 15, proc=proc)
        finally:
            gcs_emulator.start()
        assert proc.wait(timeout=300) == 0, _read(tmp_path / "job.log")[-3000:]
    log_text = _read(tmp_path / "job.log")
    assert "failed (attempt 1), retrying" in log_text  # The failed attempts were reported.
    best = _best(job)
    for name, record in best["files"].items():
        assert storage.size(f"{job}/{name}") == record["size"]
    latest = json.loads(storage.read_text(f"{job}/ckpt/latest.json"))
    for entry in latest["checkpoints"]:
        for name, record in entry["files"].items():
            assert storage.size(f"{job}/{name}") == record["size"]
    assert len(storage.read_text(f"{job}/metrics.jsonl").splitlines()) == epochs


@pytest.fixture(scope="module")
def one_epoch(shards, tmp_path_factory) -> str:
    """A finished one-epoch job with resume checkpoints every 10 steps (copied by tests)."""
    job = str(tmp_path_factory.mktemp("one_epoch") / "job")
    result = _run(_args(f"{shards}/*.txt", job, "--epochs=1", "--checkpoint_every_steps=10"))
    assert result.returncode == 0, result.stderr[-3000:]
    return job


def _copy_of(job: str, tmp_path) -> str:
    shutil.copytree(job, tmp_path / "job")
    return str(tmp_path / "job")


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(shards, one_epoch, tmp_path):
    job = _copy_of(one_epoch, tmp_path)
    args = _args(f"{shards}/*.txt", job, "--epochs=1", "--checkpoint_every_steps=10")
    entries = json.loads(_read(os.path.join(job, "ckpt", "latest.json")))["checkpoints"]
    newest, older = entries[0], entries[1]
    data = [n for n in newest["files"] if ".data-" in n][0]
    path = os.path.join(job, data)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    result = _run(args[:-2] + ["--epochs=2", "--checkpoint_every_steps=10"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume checkpoint {newest['prefix']} skipped" in result.stderr
    assert f"resumed from {older['prefix']} at step {older['step']}" in result.stderr


def test_no_intact_checkpoint_stops_with_one_clear_line(shards, one_epoch, tmp_path):
    job = _copy_of(one_epoch, tmp_path)
    args = _args(f"{shards}/*.txt", job, "--epochs=1")
    for path in glob.glob(os.path.join(job, "ckpt", "*.data-*")):
        with open(path, "wb") as f:
            f.write(b"garbage")
    result = _run(args[:-1] + ["--epochs=2"])
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no intact resume checkpoint" in errors[0]
    assert "Traceback" not in result.stderr


def test_files_still_unuploaded_at_the_end_are_named_with_their_local_copies(
        gcs_emulator, gcs_bucket, shards, tmp_path):
    job = f"{gcs_bucket()}/runs/cutoff"
    stage = tmp_path / "stage"
    # Epochs enough that training is still going when the bucket goes away (with 3, a quick
    # machine had uploaded everything first).
    args = _args(f"{shards}/*.txt", job, "--epochs=30", "--sample_length=0",
                 f"--local_dir={stage}", "--upload_timeout=2")
    with open(tmp_path / "job.log", "w") as log:
        proc = _start(args, log)
        _wait_for(lambda: os.path.exists(stage / "best.json"), proc=proc)
        gcs_emulator.stop()
        assert proc.poll() is None, "the job ended before the outage began"
        try:
            code = proc.wait(timeout=240)
        finally:
            gcs_emulator.start()
    output = _read(tmp_path / "job.log")
    assert code == 1, output[-3000:]
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "could not be uploaded" in error[0]
    local = error[0].split("kept: ")[1].split(" -> ")[0]
    assert local.startswith(str(stage)) and os.path.exists(local)


def test_early_stopping_stops_after_the_patience_and_a_rerun_stays_stopped(
        shards, tmp_path, caplog):
    # A rate too small to move a float32 weight: every validation after the first ties.
    cfg = tiny(os.path.join(shards, "*.txt"), tmp_path, epochs=10, steps_per_epoch=2,
               learning_rate=1e-12, lr_schedule="constant", sample_length=0, val_steps=1,
               early_stopping_patience=2)
    caplog.set_level("INFO", logger="absl")
    summary = train.train(cfg)
    assert [h["improved"] for h in metrics(tmp_path)] == [True, False, False]
    assert summary["step"] == 6 == _latest_step(str(tmp_path))
    assert any("early stopping: 2 validation(s) without an improvement of val_loss" in
               r.getMessage() and "stops at step 6" in r.getMessage() for r in caplog.records)
    # The count is in the checkpoint: the same command does not train further.
    caplog.clear()
    assert train.train(cfg) == {}
    assert len(metrics(tmp_path)) == 3 and _latest_step(str(tmp_path)) == 6
    assert any("the job stopped early" in r.getMessage() for r in caplog.records)


def test_validation_freq_validates_every_nth_epoch_and_the_last(shards, tmp_path, caplog,
                                                                monkeypatch):
    caplog.set_level("INFO", logger="absl")
    cfg = tiny(os.path.join(shards, "*.txt"), tmp_path / "capped", epochs=7, steps_per_epoch=2,
               sample_length=0, val_steps=1, validation_freq=3, early_stopping_patience=2)
    summary = train.train(cfg)
    rows = metrics(tmp_path / "capped")
    assert [h["epoch"] for h in rows if "val_loss" in h] == [3, 6, 7]  # 7: the last.
    assert not any(h["improved"] for h in rows if "val_loss" not in h)
    assert all("loss" in h and "chars_per_sec" in h for h in rows)
    assert _best(str(tmp_path / "capped"))["epoch"] in (3, 6, 7)
    assert summary["step"] == 14  # Patience counts validations, not epochs.
    assert sum("not validated this epoch" in r.getMessage() for r in caplog.records) == 4
    # Ended by the clock, whatever epoch that is: validated, and its weights kept; also
    # when the clock runs out while an unvalidated epoch is reported (the first report
    # outlasts the budget here, as a long sample might): the job goes on to the next
    # readback and ends there.
    report, reports = reporting.Reporter.epoch_end, []

    def slow_report(*args, **kwargs):
        report(*args, **kwargs)
        reports.append(time.sleep(0 if reports else 6.5))

    monkeypatch.setattr(reporting.Reporter, "epoch_end", slow_report)
    cfg = tiny(os.path.join(shards, "*.txt"), tmp_path / "clock", epochs=10**6,
               steps_per_epoch=2, sample_length=0, val_steps=1, validation_freq=10**6,
               train_minutes=0.1)
    train.train(cfg)
    rows = metrics(tmp_path / "clock")
    assert len(rows) > 1 and [h["epoch"] for h in rows if "val_loss" in h] == [rows[-1]["epoch"]]
    assert _best(str(tmp_path / "clock"))["epoch"] == rows[-1]["epoch"]


def test_a_stop_during_an_epoch_s_last_steps_still_validates_that_epoch(shards, tmp_path):
    """A 3-step epoch is read back only at its end (READBACK_STEPS is 10), so a signal that
    comes while it trains is seen at its last step: the job validates and reports the
    epoch, then stops, and the resume goes on with the next one: no epoch left out."""
    job = str(tmp_path / "job")
    metrics_file = os.path.join(job, "metrics.jsonl")

    def args(epochs: int) -> list[str]:
        # Steps of a wider model: the epoch trains longer than it validates and saves.
        return _args(f"{shards}/*.txt", job, f"--epochs={epochs}", "--steps_per_epoch=3",
                     "--val_steps=1", "--sample_length=0", "--checkpoint_every_steps=0",
                     "--rnn_units=512", "--batch_size=32")

    with open(tmp_path / "first.log", "w") as log:
        proc = _start(args(400), log)
        try:
            # Epoch 2 reported and saved: epoch 3 is training.
            _wait_for(lambda: _lines(metrics_file) >= 2 and _latest_step(job) >= 6, proc=proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 143
        finally:
            proc.kill()
    output = _read(tmp_path / "first.log")
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    done = stopped_at // 3
    assert stopped_at % 3 == 0 and _latest_step(job) == stopped_at

    def epochs() -> list[int]:
        return [json.loads(line)["epoch"] for line in _read(metrics_file).splitlines()]

    assert epochs() == list(range(1, done + 1)), output[-2000:]
    result = _run(args(done + 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {stopped_at}" in result.stderr
    assert epochs() == list(range(1, done + 3))


def test_the_time_limit_is_said_once(shards, tmp_path):
    # Seen mid-epoch: the epoch is cut, validated, and the job ends, saying so once.
    result = _run(_args(f"{shards}/*.txt", str(tmp_path / "job"), "--train_minutes=0.05",
                        "--epochs=3", "--steps_per_epoch=100000", "--sample_length=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("--train_minutes=0.05 reached at step") == 1
