"""Tests for trainer.uploads: ordered background copies that outlast a storage outage."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from trainer import storage, uploads


def test_uploader_fifo_local(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    done: list[str] = []
    seen_before_pointer: list[bool] = []
    uploader = uploads.Uploader(max_backoff=0.2)
    # The first file does not exist yet: the item is retried and must hold up the rest.
    late = str(src / "late.txt")
    uploader.submit(late, str(dst / "late.txt"), on_done=lambda: done.append("late"))
    for i in range(5):
        storage.write_text(str(src / f"{i}.txt"), str(i))
        uploader.submit(str(src / f"{i}.txt"), str(dst / f"{i}.txt"), lambda i=i: done.append(i))
    uploader.submit_bytes(str(dst / "pointer.json"), b'{"step": 5}')
    uploader.submit(
        str(src / "0.txt"),
        str(dst / "after.txt"),
        on_done=lambda: seen_before_pointer.append(os.path.exists(dst / "pointer.json")),
    )
    time.sleep(0.5)
    assert uploader.pending() == 8 and done == []
    storage.write_text(late, "written late")  # Read when processed, not when submitted.
    assert uploader.close(timeout=20) == []
    assert done == ["late", 0, 1, 2, 3, 4]
    assert seen_before_pointer == [True]
    assert storage.read_text(str(dst / "late.txt")) == "written late"
    assert storage.read_text(str(dst / "pointer.json")) == '{"step": 5}'
    with pytest.raises(RuntimeError):
        uploader.submit(late, str(dst / "x"))


def test_uploader_survives_outage(tmp_path, gcs_bucket, gcs_emulator, caplog):
    bucket = gcs_bucket()
    files = {}
    for i in range(3):
        files[str(tmp_path / f"f{i}.bin")] = os.urandom(1000 + i)
        storage.write_bytes(str(tmp_path / f"f{i}.bin"), files[str(tmp_path / f"f{i}.bin")])
    storage.write_bytes(f"{bucket}/before.txt", b"kept")
    uploader = uploads.Uploader(max_backoff=0.5)
    gcs_emulator.stop()
    try:
        expected = []
        for i, local in enumerate(files):
            uploader.submit(local, f"{bucket}/out/f{i}.bin")
            expected.append((local, f"{bucket}/out/f{i}.bin"))
        uploader.submit_bytes(f"{bucket}/out/pointer.json", b"{}")
        expected.append(("<2 bytes>", f"{bucket}/out/pointer.json"))
        with caplog.at_level(logging.WARNING):
            assert uploader.flush(timeout=2.0) == expected
        assert uploader.pending() == 4
        assert any("f0.bin" in r.getMessage() for r in caplog.records)
    finally:
        gcs_emulator.start()
    assert uploader.flush(timeout=30) == []
    for i, data in enumerate(files.values()):
        assert storage.read_bytes(f"{bucket}/out/f{i}.bin") == data
    assert storage.read_bytes(f"{bucket}/out/pointer.json") == b"{}"
    assert storage.read_bytes(f"{bucket}/before.txt") == b"kept"  # Restart kept the data.
    assert uploader.close(timeout=5) == []


def test_uploader_close_is_not_blocked_by_outage(tmp_path, gcs_bucket, gcs_emulator):
    bucket = gcs_bucket()
    storage.write_text(str(tmp_path / "f.txt"), "f")
    uploader = uploads.Uploader(max_backoff=30.0, name="close-test")
    gcs_emulator.stop()
    try:
        uploader.submit(str(tmp_path / "f.txt"), f"{bucket}/f.txt")
        start = time.monotonic()
        assert uploader.close(timeout=0.5) == [(str(tmp_path / "f.txt"), f"{bucket}/f.txt")]
        assert time.monotonic() - start < 5
    finally:
        gcs_emulator.start()
    # The thread exits once its current attempt ends; it starts no new attempt.
    deadline = time.monotonic() + 15
    while any(t.name == "close-test" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_pointers_reach_the_bucket_after_the_files_they_name(tmp_path, gcs_bucket, gcs_emulator,
                                                              monkeypatch):
    """Three saves queued while the bucket is out of reach: when uploads catch up, every
    latest.json that lands names only checkpoint files already in the bucket."""
    import json

    import tensorflow as tf

    from trainer import checkpoints

    bucket = gcs_bucket()
    landed: set[str] = set()
    broken: list[str] = []
    real_copy, real_write = storage.copy_file, storage.write_bytes

    def check(remote: str, data: bytes) -> None:
        if remote.endswith("latest.json"):
            for entry in json.loads(data)["checkpoints"]:
                broken.extend(f"{entry['step']}:{n}" for n in entry["files"]
                              if f"{bucket}/job/{n}" not in landed)
        landed.add(remote)

    def copy_file(src, dst, *args, **kwargs):
        real_copy(src, dst, *args, **kwargs)
        if storage.is_gcs(dst):
            with open(src, "rb") as f:
                check(dst, f.read())

    def write_bytes(path, data, *args, **kwargs):
        real_write(path, data, *args, **kwargs)
        if storage.is_gcs(path):
            check(path, data)

    monkeypatch.setattr(storage, "copy_file", copy_file)
    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    job = checkpoints.JobDir(f"{bucket}/job", local_dir=str(tmp_path / "staging"))
    variable = tf.Variable(0.0)
    resume = checkpoints.ResumeCheckpoints(job, tf.train.Checkpoint(v=variable), keep=2)
    gcs_emulator.stop()
    try:
        for step in (500, 1000, 1500):
            variable.assign(float(step))
            resume.save(step, 0)
        # What is left uncopied names the staged copy of each pointer, as of any file.
        left = job.flush(timeout=0.5)
        assert (str(tmp_path / "staging" / "ckpt" / "latest.json"),
                f"{bucket}/job/ckpt/latest.json") in left
    finally:
        gcs_emulator.start()
    assert job.close(timeout=60) == []
    assert broken == []
    pointer = json.loads(storage.read_text(f"{bucket}/job/ckpt/latest.json"))
    assert [e["step"] for e in pointer["checkpoints"]] == [1500, 1000]


def test_a_second_save_at_the_same_step_writes_over_nothing_latest_json_lists(tmp_path):
    """A stop at an epoch's last step saves, validates, then saves that step again: the
    first save's files stay as latest.json recorded them while the second is written."""
    import json

    import tensorflow as tf

    from trainer import checkpoints

    job = checkpoints.JobDir(str(tmp_path / "job"))
    variable = tf.Variable(1.0)
    resume = checkpoints.ResumeCheckpoints(job, tf.train.Checkpoint(v=variable), keep=2)
    resume.save(10, 0)
    (first,) = json.loads(job.read(checkpoints.LATEST))["checkpoints"]
    variable.assign(2.0)
    resume.save(10, 1)
    entries = json.loads(job.read(checkpoints.LATEST))["checkpoints"]
    assert [(e["prefix"], e["epoch"]) for e in entries] == [("ckpt/ckpt-10-2", 1),
                                                             ("ckpt/ckpt-10", 0)]
    assert entries[1] == first
    for entry in entries:
        for name, record in entry["files"].items():
            assert checkpoints.file_record(str(tmp_path / "job" / name)) == record
    variable.assign(0.0)
    fresh = checkpoints.ResumeCheckpoints(job, tf.train.Checkpoint(v=variable), keep=2)
    assert fresh.restore()["prefix"] == "ckpt/ckpt-10-2" and variable.numpy() == 2.0
