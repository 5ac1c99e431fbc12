"""Tests for the training entrypoint: flags, presets and one-line errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from absl import flags

from trainer import config, task
from trainer.config import Config
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.task", *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                          timeout=180)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_helpshort_explains_every_flag():
    result = _cli("--helpshort")
    assert result.returncode == 0
    for field in dataclasses.fields(Config):
        assert f"--{field.name}:" in result.stdout or f"--[no]{field.name}:" in result.stdout
    assert "--preset" in result.stdout
    assert "Units in each LSTM layer." in result.stdout


def test_every_field_carries_its_own_help_and_enums_their_choices():
    helps = config.field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(Config)}
    assert all(text.strip() for text in helps.values())
    assert helps["adam_beta1"] != helps["adam_beta2"]
    assert config.field_choices()["precision"] == config.PRECISIONS
    assert set(config.field_choices()) == {"objective", "strategy", "precision", "lr_schedule",
                                           "monitor", "init_new_chars", "tokenizer"}
    flag_values = flags.FlagValues()
    task.define_flags(flag_values)
    assert flag_values["monitor"].help.endswith(helps["monitor"])
    assert flag_values["seed"].help == helps["seed"]
    assert tuple(flag_values["precision"].parser.enum_values) == config.PRECISIONS
    with pytest.raises(UserError, match="--lr_schedule must be one of cosine, linear, constant"):
        Config(train_data="x", job_dir="y", lr_schedule="step").validate()
    with pytest.raises(UserError, match="--early_stopping_patience must be >= 0, got -1"):
        Config(train_data="x", job_dir="y", early_stopping_patience=-1).validate()


def test_presets_load_and_later_flags_override_them():
    seed = task.parse_flags(["task", "--preset=seed", "--train_data=x", "--job_dir=y"])
    assert (seed.objective, seed.shift, seed.batch_size, seed.rnn_units) == ("last", 1, 512, 256)
    assert seed.monitor == "loss"
    mine = task.parse_flags(["task", "--preset", "seed", "--rnn_units=64", "--train_data=x",
                             "--job-dir=gs://b/j"])
    assert (mine.rnn_units, mine.job_dir) == (64, "gs://b/j")
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        task.parse_flags(["task", "--preset=nope"])


@pytest.mark.parametrize("args, message", [
    (["--no_such_flag=1"], "no_such_flag"),
    (["--strategy=gpu_cluster"], "strategy"),
    (["--rnn_units=abc"], "rnn_units"),
])
def test_bad_flags_give_one_line(args, message):
    line = _one_error_line(_cli(*args, "--train_data=x", "--job_dir=y"))
    assert message in line


@pytest.mark.parametrize("args, message", [
    (["--rnn_units=-4"], "--rnn_units must be positive, got -4"),
    (["--batch_size=0"], "--batch_size must be positive"),
    (["--dropout=1.5"], "--dropout must be in [0, 1)"),
    (["--state_reset_prob=1"], "--state_reset_prob must be in [0, 1)"),
    (["--val_fraction=0.1", "--val_data=v"], "either --val_data or --val_fraction"),
])
def test_bad_values_are_named(args, message):
    with pytest.raises(UserError) as err:
        task.parse_flags(["task", "--train_data=x", "--job_dir=y", *args])
    assert message in str(err.value)


def test_missing_required_flags():
    with pytest.raises(UserError, match="--train_data is required"):
        task.parse_flags(["task", "--job_dir=y"])
    with pytest.raises(UserError, match="--job_dir is required"):
        task.parse_flags(["task", "--train_data=x"])


def test_data_errors_are_one_line_and_exit_non_zero(tmp_path):
    line = _one_error_line(_cli(f"--train_data={tmp_path}/none-*.txt", f"--job_dir={tmp_path}/j"))
    assert f"data pattern matched no files: {tmp_path}/none-*.txt" in line
    (tmp_path / "short.txt").write_text("too short for a window")
    line = _one_error_line(_cli(f"--train_data={tmp_path}/short.txt", f"--job_dir={tmp_path}/j"))
    assert "no training shard holds one window of 101 chars" in line
    assert not os.path.exists(tmp_path / "j" / "best.json")


def test_environment_failures_are_one_line_too(tmp_path):
    """A job dir that cannot be made, or gs:// without credentials: one line, exit 1."""
    (tmp_path / "data.txt").write_text("the cat sat on the mat. " * 50)
    (tmp_path / "a-file").write_text("not a folder")
    result = _cli(f"--train_data={tmp_path}/data.txt", f"--job_dir={tmp_path}/a-file/job",
                  "--epochs=1", "--num_layers=1", "--rnn_units=8", "--seq_length=20")
    assert result.returncode == 1
    assert "Not a directory" in _one_error_line(result)
    # Outside the tests' emulator, with credentials that cannot be loaded (no request is
    # made: google.auth fails on the missing file before any network use).
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "TRAINER_REQUIRE_EMULATOR")}
    env.update(PYTHONPATH=REPO, GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing.json"))
    result = subprocess.run([sys.executable, "-m", "trainer.task", "--train_data=gs://b/*.txt",
                             f"--job_dir={tmp_path}/job"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert "no Google Cloud credentials for gs:// paths" in _one_error_line(result)


def test_environment_messages():
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    from trainer import errors

    assert errors.describe(UserError("bad flag")) == "bad flag"
    assert errors.describe(PermissionError(13, "Permission denied", "/x")) == (
        "[Errno 13] Permission denied: '/x'")
    assert "credentials" in errors.describe(auth.DefaultCredentialsError("none\nmore"))
    assert errors.describe(auth.RefreshError("token expired")).startswith(
        "Google Cloud credentials failed: token expired")
    forbidden = errors.describe(api.Forbidden("GET gs://b/o: no storage.objects.get access"))
    assert forbidden.startswith("Cloud Storage refused a request: 403 GET gs://b/o")
    assert errors.describe(ValueError("a bug")) is None  # Bugs keep their traceback.
