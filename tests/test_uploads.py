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
