"""Tests for `python -m trainer.generate`: job directories, prompts, output, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from absl import flags

from trainer import cli, generate, job_loader, models, storage
from trainer.config import Config
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError
from trainer.sampling.sampler import Sampler, Settings

VOCAB = Vocabulary(list("\n .,abcdefghijklmnopqrstuvwxyz"))
TEXT = "the quick brown fox jumps over the lazy dog. " * 30
ROOT = Path(__file__).resolve().parents[1]


def make_job_dir(job_dir: str, work: Path, seed: int = 1, val_data: str | None = None
                 ) -> keras.Model:
    """Writes a job directory in the trainer's documented layout, by hand.

    Args:
      job_dir: where to write it (local or gs://).
      work: a local scratch folder (data shard, staged weights).
      seed: initialises the random weights.
      val_data: the config's val_data; default a local shard of TEXT.

    Returns:
      The model whose weights were saved.
    """
    shard = work / "val.txt"
    shard.write_text(TEXT)
    cfg = Config(embedding_dim=8, rnn_units=16, num_layers=2, seq_length=20,
                 train_data=str(shard), val_data=str(shard) if val_data is None else val_data)
    keras.utils.set_random_seed(seed)
    model = models.build_model(cfg, VOCAB.size)
    # Freshly initialised weights give near-uniform next-char distributions; larger
    # ones make them peaked and context-dependent, as a trained model's are.
    model.set_weights([w * 5.0 for w in model.get_weights()])
    embedding = model.get_layer("embedding").embeddings
    embedding.assign(embedding * 10.0)
    name = f"weights-improvement-01-{seed:.4f}.weights.h5"
    local = work / f"staged-{seed}"
    local.mkdir(exist_ok=True)
    model.save_weights(str(local / name))
    (local / "config.json").write_text(cfg.to_json())
    (local / "vocab.json").write_text(VOCAB.to_json())
    files = {n: {"size": os.path.getsize(local / n), "md5": storage.md5_file(str(local / n))}
             for n in (name, "config.json", "vocab.json")}
    for n in files:
        storage.copy_file(str(local / n), storage.join(job_dir, n))
    best = {"epoch": 1, "step": 10, "monitor": "val_loss", "value": float(seed), "weights": name,
            "files": files}
    storage.write_text(storage.join(job_dir, "best.json"), json.dumps(best))
    return model


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[str, keras.Model]:
    work = tmp_path_factory.mktemp("generate")
    job_dir = str(work / "job")
    return job_dir, make_job_dir(job_dir, work)


def run(capsys, *args: str) -> tuple[str, str]:
    """Runs the entrypoint in-process on fresh flags; returns (stdout, stderr)."""
    values = flags.FlagValues()
    generate.define_flags(values)
    values(["generate", *args])
    generate.run(values)
    out = capsys.readouterr()
    return out.out, out.err


def test_same_seed_same_text_and_stream_equals_library(job, capsys):
    job_dir, model = job
    text, err = run(capsys, f"--job_dir={job_dir}", "--prime=the ", "--length=150", "--seed=5")
    assert "loaded weights-improvement-01-1.0000.weights.h5" in err
    assert len(text) == 150
    assert run(capsys, f"--job_dir={job_dir}", "--prime=the ", "--length=150", "--seed=5")[0] \
        == text
    assert Sampler(model, VOCAB).generate(["the "], 150, Settings(0.8), seed=5) == [text]
    assert run(capsys, f"--job_dir={job_dir}", "--prime=the ", "--length=150", "--seed=6")[0] \
        != text


def test_top_k_1_and_temperature_0_equal_greedy(job, capsys):
    base = (f"--job_dir={job[0]}", "--prime=over the", "--length=60")
    greedy = run(capsys, *base, "--greedy")[0]
    assert run(capsys, *base, "--top_k=1", "--temperature=1.3", "--seed=1")[0] == greedy
    assert run(capsys, *base, "--temperature=0", "--seed=2")[0] == greedy
    assert run(capsys, *base, "--seed=2", "--top_p=0.9", "--top_k=4")[0] != greedy


def test_length_zero_and_empty_prompt(job, capsys):
    assert run(capsys, f"--job_dir={job[0]}", "--prime=the", "--length=0")[0] == ""
    text, err = run(capsys, f"--job_dir={job[0]}", "--prime=", "--length=30", "--seed=1")
    assert len(text) == 30
    assert "seed" not in err  # A given seed is not announced.


def test_prompt_chars_outside_the_vocabulary(job, capsys):
    with pytest.raises(UserError, match=r"2 character\(s\).*'Q'.*'é'.*--oov=skip"):
        run(capsys, f"--job_dir={job[0]}", "--prime=Quiché", "--length=5")
    text, err = run(capsys, f"--job_dir={job[0]}", "--prime=Quiché", "--length=20", "--seed=3",
                    "--oov=skip")
    assert "skipping 2 prompt character(s)" in err
    assert text == run(capsys, f"--job_dir={job[0]}", "--prime=uich", "--length=20",
                       "--seed=3")[0]
    # Bytes that were not UTF-8 arrive as lone surrogates: not text, so not skipped (the
    # prompt is printed back, and they have no UTF-8 to print).
    with pytest.raises(UserError, match=r"1 lone surrogate\(s\) \('\\udcff'\): bytes that "
                       "were not UTF-8"):
        run(capsys, f"--job_dir={job[0]}", "--prime=ab\udcff", "--length=5", "--oov=skip",
            "--format=json", "--seed=1")


def test_a_seed_past_int64_or_an_infinite_temperature_is_one_line(job, capsys):
    with pytest.raises(UserError, match=r"--seed \+ --num_samples - 1 must be at most "
                       r"9223372036854775807, got 9223372036854775808"):
        run(capsys, f"--job_dir={job[0]}", "--prime=the", "--seed=9223372036854775807",
            "--num_samples=2")
    with pytest.raises(UserError, match="temperature must be a finite number >= 0, got inf"):
        run(capsys, f"--job_dir={job[0]}", "--prime=the", "--temperature=inf")


def test_default_prompt_is_a_validation_window_or_a_newline(job, capsys, tmp_path):
    text, err = run(capsys, f"--job_dir={job[0]}", "--length=20", "--seed=4")
    assert "a random 20-char window of the validation text" in err
    window = err.split("val.txt:\n", 1)[1][:20]
    assert window in TEXT
    assert [text] == Sampler(job[1], VOCAB).generate([window], 20, seed=4)
    assert "pass --seed=" in run(capsys, f"--job_dir={job[0]}", "--length=5")[1]

    lost = str(tmp_path / "job")
    model = make_job_dir(lost, tmp_path, seed=2, val_data=str(tmp_path / "moved/*.txt"))
    text, err = run(capsys, f"--job_dir={lost}", "--length=20", "--seed=4")
    assert "a newline (no validation data reachable" in err
    assert [text] == Sampler(model, VOCAB).generate(["\n"], 20, seed=4)


def test_json_output_file_with_settings(job, capsys, tmp_path):
    out = tmp_path / "samples.json"
    stdout, err = run(capsys, f"--job_dir={job[0]}", "--prime=the", "--length=25",
                      "--num_samples=3", "--format=json", f"--output={out}", "--seed=9",
                      "--top_k=5")
    assert stdout == "" and "wrote 3 sample(s)" in err
    data = json.loads(out.read_text())
    assert data["prompt"] == "the" and data["seed"] == 9 and data["length"] == 25
    assert data["settings"] == {"temperature": 0.8, "top_k": 5, "top_p": 1.0, "greedy": False}
    assert [len(s) for s in data["samples"]] == [25, 25, 25]
    assert data["samples"] == Sampler(job[1], VOCAB).generate(
        ["the"] * 3, 25, Settings(top_k=5), seed=9)
    text, _ = run(capsys, f"--job_dir={job[0]}", "--prime=the", "--length=5", "--num_samples=2")
    assert text.count("--- sample ") == 2


def test_checkpoint_and_prime_file(job, capsys, tmp_path):
    other = make_job_dir(str(tmp_path / "other"), tmp_path, seed=7)
    name = "weights-improvement-01-7.0000.weights.h5"
    storage.copy_file(str(tmp_path / "other" / name), os.path.join(job[0], name))
    prime = tmp_path / "prime.txt"
    prime.write_text("the lazy")
    args = (f"--job_dir={job[0]}", f"--prime_file={prime}", "--length=40", "--seed=1")
    text = run(capsys, *args, f"--checkpoint={name}")[0]
    assert [text] == Sampler(other, VOCAB).generate(["the lazy"], 40, seed=1)
    assert text != run(capsys, *args)[0]
    with pytest.raises(UserError, match="does not exist"):
        run(capsys, *args, "--checkpoint=nope.weights.h5")
    with pytest.raises(UserError, match="either --prime or --prime_file"):
        run(capsys, *args, "--prime=x")


def test_not_a_job_directory(tmp_path, capsys):
    with pytest.raises(UserError, match="not a job directory"):
        run(capsys, f"--job_dir={tmp_path}", "--length=5")
    (tmp_path / "config.json").write_text(Config().to_json())
    (tmp_path / "vocab.json").write_text(VOCAB.to_json())
    with pytest.raises(UserError, match="no best checkpoint"):
        run(capsys, f"--job_dir={tmp_path}", "--length=5")


def test_gcs_job_dir_on_the_emulator(job, gcs_bucket, capsys):
    remote = gcs_bucket() + "/runs/one"
    storage.upload_dir(job[0], remote)
    args = ("--prime=the ", "--length=50", "--seed=11")
    assert run(capsys, f"--job_dir={remote}", *args)[0] == run(capsys, f"--job_dir={job[0]}",
                                                               *args)[0]


def _cli(module: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_helpshort_explains_every_flag():
    result = _cli("trainer.generate", "--helpshort", timeout=60)
    assert "Traceback" not in result.stderr  # absl exits 1 after printing help.
    values = flags.FlagValues()
    generate.define_flags(values)
    for name, flag in values._flags().items():
        assert f"--{name}" in result.stdout or f"--[no]{name}" in result.stdout
        assert flag.help and flag.help.endswith((".", ")"))


def test_main_reports_bad_input_in_one_line(job, capsys, monkeypatch):
    values = flags.FlagValues()
    generate.define_flags(values)
    values(["generate", f"--job_dir={job[0]}", "--prime=Xy", "--length=5"])
    assert cli.run_door(["generate"], generate.run, values) == 1
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err
    assert out.err.splitlines()[-1] == ("error: the prompt has 1 character(s) the model's "
                                        "vocabulary lacks: 'X' (drop them with --oov=skip)")


def test_cli_flag_errors_are_one_line():
    result = _cli("trainer.generate", "--job_dir=x", "--top_p=2", timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: flag --top_p=2: 2.0 is not number <= 1.0 (see --helpshort)"]


def test_generate_from_a_real_training_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text(TEXT * 3)
    (data / "val.txt").write_text(TEXT)
    job_dir = str(tmp_path / "job")
    trained = _cli("trainer.task", f"--train_data={data}/train.txt",
                   f"--val_data={data}/val.txt", f"--job_dir={job_dir}", "--embedding_dim=8",
                   "--rnn_units=16", "--num_layers=1", "--seq_length=20", "--batch_size=16",
                   "--epochs=1", "--steps_per_epoch=5", "--sample_length=10")
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = _cli("trainer.generate", f"--job_dir={job_dir}", "--prime=the ", "--length=80",
                  "--seed=3")
    assert result.returncode == 0, result.stderr[-3000:]
    _, vocab, model, pointer = job_loader.load_job(job_dir)
    assert pointer["weights"] in result.stderr
    assert [result.stdout] == Sampler(model, vocab).generate(["the "], 80, seed=3)
