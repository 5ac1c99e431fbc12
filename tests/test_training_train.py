"""Tests for trainer.train: the real training function on a tiny config.

In-process runs use one device; mirrored and multi-worker runs are separate
processes because logical devices and collectives must be set before TF starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import keras
import pytest
import tensorflow as tf
from training_jobs import flags_of, free_port, metrics, read_json, start_task, tiny

from trainer import checkpoints, job_loader, models, storage
from trainer.config import Config
from trainer.data import index, vocabulary
from trainer.errors import UserError
from trainer.training import data_plan, distribution, init_from, loop, precision, train


def test_tiny_run_learns_and_writes_a_usable_job_dir(corpus, tmp_path):
    summary = train.train(tiny(corpus, tmp_path, epochs=3))
    history = metrics(tmp_path)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(math.isfinite(h["loss"]) for h in history)
    vocab_size = len(read_json(tmp_path / "vocab.json")["chars"]) + 1
    # From ln(vocab) at the start, the loss at least halves on this repetitive text.
    assert history[-1]["val_loss"] < 0.5 * math.log(vocab_size)
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    best = read_json(tmp_path / "best.json")
    assert best["value"] == pytest.approx(min(h["val_loss"] for h in history))
    assert best["weights"] == checkpoints.weights_name(best["epoch"], best["value"])
    for name, record in best["files"].items():
        assert storage.md5_file(str(tmp_path / name)) == record["md5"]
    assert Config.from_dict(read_json(tmp_path / "config.json")).rnn_units == 32
    assert os.path.exists(tmp_path / "ckpt" / "latest.json")
    assert os.listdir(tmp_path / "logs")  # TensorBoard events.
    assert summary["step"] == history[-1]["step"]


def test_resume_continues_where_it_stopped_with_the_optimizer_state(corpus, tmp_path):
    # A constant rate, so that the 1-epoch run's schedule equals the 2-epoch run's.
    straight = tmp_path / "straight"
    train.train(tiny(corpus, straight, epochs=2, lr_schedule="constant"))
    stopped = tmp_path / "stopped"
    train.train(tiny(corpus, stopped, epochs=1, lr_schedule="constant"))
    summary = train.train(tiny(corpus, stopped, epochs=2, lr_schedule="constant"))
    first, resumed = metrics(straight), metrics(stopped)
    assert [h["epoch"] for h in resumed] == [1, 2]
    assert summary["step"] == first[-1]["step"]
    # Same batches, same weights and same Adam moments: the same epoch-2 numbers.
    assert resumed[1]["loss"] == pytest.approx(first[1]["loss"], rel=1e-4)
    assert resumed[1]["val_loss"] == pytest.approx(first[1]["val_loss"], rel=1e-4)


def test_a_restart_never_replaces_a_better_best(corpus, tmp_path, caplog):
    train.train(tiny(corpus, tmp_path, epochs=1))
    pointer = read_json(tmp_path / "best.json")
    pointer["value"] = 0.001  # Pretend the run already holds a far better checkpoint.
    (tmp_path / "best.json").write_text(json.dumps(pointer))
    # On absl's logger itself: flag parsing elsewhere in the suite may have raised its level.
    caplog.set_level(logging.INFO, logger="absl")
    train.train(tiny(corpus, tmp_path, epochs=2))
    after = read_json(tmp_path / "best.json")
    assert after["weights"] == pointer["weights"] and after["value"] == 0.001
    history = metrics(tmp_path)
    assert [h["improved"] for h in history] == [True, False]
    # The epoch line names the best kept so far and this epoch's value beside it.
    line = next(r.getMessage() for r in caplog.records if "epoch 2/2" in r.getMessage())
    assert line.endswith(f"best val_loss 0.0010 (not improved, kept; this epoch "
                         f"{history[1]['val_loss']:.4f})")


def test_a_diverging_loss_stops_with_a_clear_error(corpus, tmp_path):
    with pytest.raises(loop.TrainingDivergedError, match="loss became (nan|inf)"):
        train.train(tiny(corpus, tmp_path, learning_rate=1e38, clipnorm=0, epochs=1))


def test_an_incompatible_job_dir_is_refused(corpus, tmp_path):
    train.train(tiny(corpus, tmp_path, epochs=1))
    with pytest.raises(UserError, match="incompatible config.*rnn_units"):
        train.train(tiny(corpus, tmp_path, rnn_units=48))


def test_too_big_a_batch_for_the_data_is_refused(corpus, tmp_path):
    with pytest.raises(UserError, match="fewer windows than one global batch"):
        train.train(tiny(corpus, tmp_path, batch_size=4096))


def test_mirrored_over_two_cpus_matches_one_device(corpus, tmp_path):
    # A clipnorm this small clips every step, and must clip the same gradient (the global
    # batch's) whether one device or two replicas compute it.
    base = tiny(corpus, tmp_path, clipnorm=0.05, epochs=1)
    one = start_task(flags_of(base.replace(job_dir=str(tmp_path / "one"), batch_size=16,
                                    strategy="one_device")))
    # The replicas' ops on pools of their own size, which the job logs and records.
    two = start_task(flags_of(base.replace(job_dir=str(tmp_path / "two"), batch_size=8,
                                    strategy="mirrored", logical_cpus=2,
                                    intra_op_threads=1, inter_op_threads=3)))
    for proc in (one, two):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    assert "2 replica(s)" in out and "global batch 16" in out
    assert "threads per op: 1; ops at once: 3" in out
    saved = read_json(tmp_path / "two" / "config.json")
    assert (saved["intra_op_threads"], saved["inter_op_threads"]) == (1, 3)
    a, b = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert a["step"] == b["step"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)


def test_xla_trains_under_mirrored_and_is_refused_on_a_gpu(corpus, tmp_path, monkeypatch):
    # Compiling the optimizer update too used to fail here: a compiled cluster on one
    # logical CPU tried to reach replica 1's variables on the other.
    cfg = tiny(corpus, tmp_path, epochs=1, jit_compile=True, clipnorm=0.05, strategy="mirrored",
               logical_cpus=2, batch_size=8)
    proc = start_task(flags_of(cfg))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "2 replica(s)" in out
    assert math.isfinite(metrics(tmp_path)[0]["loss"])
    # XLA cannot compile the cuDNN LSTM kernel that a GPU would run: one clear error.
    monkeypatch.setattr(precision.tf.config, "list_logical_devices",
                        lambda kind=None: ["/device:GPU:0"] if kind == "GPU" else [])
    with pytest.raises(UserError, match="--jit_compile does not work on a GPU"):
        precision.check_jit_compile(cfg)
    precision.check_jit_compile(cfg.replace(jit_compile=False))


def test_xla_and_mixed_precision_steps_train(corpus, tmp_path, monkeypatch):
    summary = train.train(tiny(corpus, tmp_path / "xla", epochs=1, jit_compile=True))
    assert math.isfinite(summary["loss"]) and summary["step"] > 0
    # --precision=auto on a CPU with bfloat16 instructions trains in mixed_bfloat16, and
    # config.json records what ran.
    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda *args: True)
    summary = train.train(tiny(corpus, tmp_path / "bf16", epochs=1, precision="auto"))
    assert math.isfinite(summary["loss"]) and summary["step"] > 0
    assert read_json(tmp_path / "bf16" / "config.json")["precision"] == "mixed_bfloat16"



def test_a_resumed_job_reads_only_the_shards_that_changed(corpus, tmp_path, monkeypatch,
                                                           caplog):
    """shards.json lets a restart skip the full scan; a changed shard is read again."""
    folder = tmp_path / "data"
    folder.mkdir()
    for path in sorted(storage.glob(corpus)):
        with open(path) as f:
            (folder / os.path.basename(path)).write_text(f.read())
    cfg = tiny(str(folder / "*.txt"), tmp_path / "job")
    read = []
    real_read = storage.read_range
    monkeypatch.setattr(storage, "read_range",
                        lambda p, a, b, *v: read.append(p) or real_read(p, a, b, *v))
    place = distribution.Placement(1, 0, True, 1)

    def prepare():
        read.clear()
        job = checkpoints.JobDir(cfg.job_dir)
        corpus = data_plan.scan_corpus(cfg, job, None, place)
        regions, chars = corpus.train_regions, corpus.train_chars
        job.write("vocab.json", corpus.chars.to_json())  # As train() does after this call.
        job.close(timeout=10)
        shards = [p for p in read if os.path.dirname(p) == str(folder)]
        return sorted(os.path.basename(p) for p in shards), chars, regions

    names, chars, regions = prepare()
    assert names == ["part-0.txt", "part-1.txt", "part-2.txt", "part-3.txt"]
    recorded = read_json(tmp_path / "job" / index.SCAN_RECORD)["files"]
    assert sum(p[2] for s in recorded for p in s["pieces"]) == chars

    # Resumed, nothing changed: no shard is read, and the data is described the same.
    assert prepare() == ([], chars, regions)

    with open(folder / "part-2.txt", "a") as f:
        f.write("the end. " * 20)
    names, chars_now, _ = prepare()
    assert names == ["part-2.txt"]
    assert chars_now == chars + len("the end. ") * 20
    assert "not in this job's vocabulary" not in caplog.text  # No new characters.
    # New characters in a changed shard: said, since they train as the unknown id.
    with open(folder / "part-1.txt", "a") as f:
        f.write("\u65e5\u672c " * 10)
    prepare()
    assert ("2 character(s) of the new or changed training text (" in caplog.text
            and "'\u65e5\u672c') are not in this job's vocabulary" in caplog.text)
    chars_now += len("\u65e5\u672c ") * 10
    # A shard gone: nothing to read, and the record forgets it.
    part3 = next(sum(p[2] for p in s["pieces"]) for s in recorded
                 if s["path"].endswith("part-3.txt"))
    os.remove(folder / "part-3.txt")
    assert prepare()[:2] == ([], chars_now - part3)
    paths = [s["path"] for s in read_json(tmp_path / "job" / index.SCAN_RECORD)["files"]]
    assert len(paths) == 3 and not any(p.endswith("part-3.txt") for p in paths)
    # A different --lowercase changes what a scan counts: nothing recorded is reused.
    cfg = cfg.replace(lowercase=True)
    assert len(prepare()[0]) == 3


def test_one_device_mirrored_and_two_workers_agree_and_only_the_chief_writes(corpus, tmp_path):
    """Every validation window is scored once, however many workers and however uneven
    their shares: 37 windows split 18/19 between two workers, padded to equal steps."""
    val = tmp_path / "val.txt"
    val.write_text(("the sea and the fog. " * 60)[:33 + 32 * 36])
    # One step at a negligible rate: the weights stay the same everywhere, dropout as shipped.
    base = tiny(corpus, tmp_path, val_fraction=0.0, val_data=str(val), epochs=1,
                steps_per_epoch=1, learning_rate=1e-12, dropout=0.2, sample_length=0)
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    runs = {"one": start_task(flags_of(base.replace(job_dir=str(tmp_path / "one"), batch_size=16,
                                             strategy="one_device"))),
            "mirrored": start_task(flags_of(base.replace(job_dir=str(tmp_path / "mirrored"),
                                                  batch_size=8, strategy="mirrored",
                                                  logical_cpus=2)))}
    for worker in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": worker}})
        runs[f"worker{worker}"] = start_task(flags_of(base.replace(
            job_dir=str(tmp_path / f"worker{worker}"), batch_size=8)),
            env={"TF_CONFIG": tf_config})
    outs = {}
    try:
        for name, proc in runs.items():
            outs[name], _ = proc.communicate(timeout=400)
            assert proc.returncode == 0, f"{name}: {outs[name][-3000:]}"
    finally:
        for proc in runs.values():
            proc.kill()
    losses = {name: metrics(tmp_path / name)[0]["val_loss"] for name in ("one", "mirrored",
                                                                          "worker0")}
    assert losses["mirrored"] == pytest.approx(losses["one"], abs=1e-4)
    assert losses["worker0"] == pytest.approx(losses["one"], abs=1e-4)
    # The two workers trained together, and only the chief wrote the job dir.
    assert "multi_worker: 2 replica(s) on 2 worker(s)" in outs["worker0"]
    done = [line for name in ("worker0", "worker1") for line in outs[name].splitlines()
            if line.startswith("done:")]
    assert len(done) == 2 and done[0].split("chars_per_sec")[0] == done[1].split(
        "chars_per_sec")[0]  # Same step count and losses on both workers.
    assert os.path.exists(tmp_path / "worker0" / "best.json")
    assert os.path.exists(tmp_path / "worker0" / "ckpt" / "latest.json")
    assert not os.path.exists(tmp_path / "worker1")  # The non-chief wrote nothing.


def test_bfloat16_is_refused_on_a_gpu(corpus, tmp_path, monkeypatch):
    # cuDNN's LSTM kernel has no bfloat16 version: one clear error up front, as for XLA.
    cfg = tiny(corpus, tmp_path, precision="mixed_bfloat16")
    precision.check_precision(cfg)  # No GPU here: allowed (and trained, in the test above).
    monkeypatch.setattr(precision.tf.config, "list_logical_devices",
                        lambda kind=None: ["/device:GPU:0"] if kind == "GPU" else [])
    with pytest.raises(UserError, match="--precision=mixed_bfloat16 does not work on a GPU"):
        precision.check_precision(cfg)
    precision.check_precision(cfg.replace(precision="mixed_float16"))


@pytest.fixture(scope="module")
def base_job(corpus, tmp_path_factory) -> str:
    """A few steps of a tiny job, the base that the fine-tuning tests start from."""
    job = tmp_path_factory.mktemp("base")
    train.train(tiny(corpus, job, epochs=1, steps_per_epoch=4, sample_length=0))
    return str(job)


def _text(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_fine_tuning_starts_from_the_base_weights(base_job, tmp_path):
    # Every 32-char window of this text is the same, so any batch's loss is that window's.
    window = "the cat " * 5
    data = _text(tmp_path, "cat.txt", "the cat " * 200)
    cfg = tiny(data, tmp_path / "tuned", epochs=1, steps_per_epoch=1, sample_length=0,
               init_from=base_job)
    train.train(cfg)
    _, base_vocab, base_model, pointer = job_loader.load_job(base_job)
    ids = base_vocab.encode(window[:33]).astype("int32")
    logits = base_model(ids[None, :-1])
    expected = float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        ids[None, 1:], logits, from_logits=True)))
    assert metrics(tmp_path / "tuned")[0]["loss"] == pytest.approx(expected, rel=1e-5)
    # The base's vocabulary as it is (its chars this text lacks included), nothing added.
    assert read_json(tmp_path / "tuned" / "vocab.json")["chars"] == list(base_vocab.chars)
    record = read_json(tmp_path / "tuned" / "config.json")[init_from.RECORD]
    assert record["job_dir"] == base_job and record["weights"] == pointer["weights"]
    assert record["added_chars"] == 0


def test_new_chars_get_fresh_rows_and_a_resumed_fine_tuning_job_keeps_its_own(
        base_job, corpus, tmp_path, caplog):
    data = _text(tmp_path, "zoo.txt", "Zebras ate the cat! " * 100)
    cfg = tiny(data, tmp_path / "tuned", epochs=1, steps_per_epoch=2, sample_length=0,
               init_from=base_job)
    # The rows the job gets: the base's for old ids, a fresh model's for the added ones.
    base = init_from.load_base(cfg, checkpoints.JobDir(cfg.job_dir))
    vocab = init_from.vocabulary(cfg, base, vocabulary.count_chars("Zebras ate the cat! "))
    added = vocab.chars[len(base.vocab.chars):]
    assert vocab.chars[:len(base.vocab.chars)] == base.vocab.chars and added == ("!", "Z")
    model = models.build_model(cfg, vocab.size)
    fresh = [w.numpy() for w in model.weights]
    init_from.load_weights(model, base, vocab)
    _, _, base_model, _ = job_loader.load_job(base_job)
    old = base.vocab.size
    for name, new, was, src in zip([w.path for w in model.weights],
                                   [w.numpy() for w in model.weights], fresh,
                                   [w.numpy() for w in base_model.weights], strict=True):
        corner = tuple(slice(0, n) for n in src.shape)
        assert (new[corner] == src).all(), name
        if new.shape != src.shape:
            rows = (slice(None), slice(old, None)) if "logits/kernel" in name else slice(old, None)
            assert (new[rows] == was[rows]).all(), name

    caplog.set_level(logging.INFO, logger="absl")
    train.train(cfg)
    saved = read_json(tmp_path / "tuned" / "vocab.json")["chars"]
    assert tuple(saved) == vocab.chars
    record = read_json(tmp_path / "tuned" / "config.json")[init_from.RECORD]
    assert record["added_chars"] == 2
    assert any("2 character(s) of this text added" in r.getMessage() for r in caplog.records)
    # A resume reads its own checkpoint, vocabulary and record, not the base (gone now).
    shutil.move(base_job, base_job + "-moved")
    try:
        caplog.clear()
        summary = train.train(cfg.replace(epochs=2))
    finally:
        shutil.move(base_job + "-moved", base_job)
    assert any("resumed from ckpt/ckpt-2 at step 2" in r.getMessage() for r in caplog.records)
    assert not any("started from" in r.getMessage() for r in caplog.records)
    assert summary["step"] == 4 and [h["epoch"] for h in metrics(tmp_path / "tuned")] == [1, 2]
    assert read_json(tmp_path / "tuned" / "vocab.json")["chars"] == saved
    assert read_json(tmp_path / "tuned" / "config.json")[init_from.RECORD] == record
    # --init_new_chars=refuse: one line instead.
    with pytest.raises(UserError, match=r"2 character\(s\) .* lacks \('!Z'\)") as err:
        train.train(cfg.replace(job_dir=str(tmp_path / "refused"), init_new_chars="refuse"))
    assert "\n" not in str(err.value)


def test_init_from_another_architecture_names_the_field(base_job, corpus, tmp_path):
    with pytest.raises(UserError, match=r"--init_from=.* holds another model \(rnn_units: "
                                        r"job directory has 32, this run asks for 48\)") as err:
        train.train(tiny(corpus, tmp_path / "job", rnn_units=48, init_from=base_job))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="is not a job directory"):
        train.train(tiny(corpus, tmp_path / "job", init_from=str(tmp_path / "nothing")))


def test_init_from_a_base_in_a_bucket(base_job, corpus, gcs_bucket, tmp_path):
    bucket = gcs_bucket()
    pointer = read_json(os.path.join(base_job, checkpoints.BEST))
    for name in ("config.json", "vocab.json", checkpoints.BEST, pointer["weights"]):
        storage.copy_file(os.path.join(base_job, name), storage.join(bucket, "base", name))
    cfg = tiny(corpus, tmp_path, epochs=1, steps_per_epoch=1, sample_length=0,
               init_from=f"{bucket}/base")
    train.train(cfg)
    record = read_json(tmp_path / "config.json")[init_from.RECORD]
    assert record["job_dir"] == f"{bucket}/base" and record["weights"] == pointer["weights"]
