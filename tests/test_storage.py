"""Tests for trainer.storage against real local files and a real storage emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from conftest import Emulator

from trainer import storage
from trainer.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gcs"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh empty folder: a local tmp dir or a new emulator bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_bucket")()


def _tree(root: str) -> None:
    for name, data in [
        ("a/x.txt", b"x"),
        ("a/y.txt", b"yy"),
        ("a/z1.bin", b"z"),
        ("a/sub/deep.txt", b"deep"),
        ("b/x.txt", b"bx"),
        ("top.txt", b"top"),
    ]:
        storage.write_bytes(storage.join(root, *name.split("/")), data)


def test_paths():
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/tmp/x")
    assert storage.join("gs://b", "a", "c.txt") == "gs://b/a/c.txt"
    assert storage.join("gs://b/a/", "c.txt") == "gs://b/a/c.txt"
    assert storage.join("/tmp", "a", "c.txt") == os.path.join("/tmp", "a", "c.txt")


def test_round_trip(root):
    path = storage.join(root, "dir", "f.txt")
    assert not storage.exists(path)
    storage.write_text(path, "héllo\n")
    assert storage.exists(path)
    assert storage.exists(storage.join(root, "dir"))  # A folder exists too.
    assert storage.read_text(path) == "héllo\n"
    assert storage.read_bytes(path) == "héllo\n".encode()
    assert storage.size(path) == len("héllo\n".encode())
    storage.write_bytes(path, b"v2")  # Overwrite.
    assert storage.read_bytes(path) == b"v2"
    storage.delete(path)
    storage.delete(path)  # Missing is fine.
    assert not storage.exists(path)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(path)
    with pytest.raises(FileNotFoundError):
        storage.size(path)


def test_listdir_and_delete_prefix(root):
    _tree(root)
    assert storage.listdir(root) == ["a", "b", "top.txt"]
    assert storage.listdir(storage.join(root, "a")) == ["sub", "x.txt", "y.txt", "z1.bin"]
    assert storage.listdir(storage.join(root, "a") + "/") == ["sub", "x.txt", "y.txt", "z1.bin"]
    assert storage.listdir(storage.join(root, "missing")) == []
    storage.delete_prefix(storage.join(root, "a"))
    storage.delete_prefix(storage.join(root, "missing"))
    assert storage.listdir(root) == ["b", "top.txt"]
    assert not storage.exists(storage.join(root, "a", "sub", "deep.txt"))


def test_glob(root):
    _tree(root)

    def g(pattern: str) -> list[str]:
        prefix = storage.join(root, "")
        return [p[len(prefix) :].replace(os.sep, "/") for p in storage.glob(prefix + pattern)]

    assert g("a/*.txt") == ["a/x.txt", "a/y.txt"]
    assert g("a/?.txt") == ["a/x.txt", "a/y.txt"]
    assert g("a/[xz]*") == ["a/x.txt", "a/z1.bin"]
    assert g("*/x.txt") == ["a/x.txt", "b/x.txt"]
    assert g("a/*") == ["a/sub", "a/x.txt", "a/y.txt", "a/z1.bin"]  # Folders too, not deeper.
    assert g("a/*/*.txt") == ["a/sub/deep.txt"]
    assert g("t*") == ["top.txt"]
    assert g("a/x.txt") == ["a/x.txt"]  # No wildcard: the path if it exists.
    assert g("a/nope.txt") == []
    assert g("nope/*") == []


def test_expand_patterns(root):
    _tree(root)
    a_star = storage.join(root, "a", "*")
    b_x = storage.join(root, "b", "x.txt")
    a_x = storage.join(root, "a", "x.txt")
    got = storage.expand_patterns(f"{b_x}, {a_star},{a_x}")
    # Pattern order, sorted within a pattern, duplicates and the "sub" folder dropped.
    names = ["x.txt", "y.txt", "z1.bin"]
    assert got == [b_x] + [storage.join(root, "a", n) for n in names]
    assert storage.expand_patterns([b_x, b_x]) == [b_x]
    missing = storage.join(root, "c", "*.txt")
    with pytest.raises(UserError, match=r"data pattern matched no files: .*c.\*\.txt"):
        storage.expand_patterns([b_x, missing, storage.join(root, "d")])
    with pytest.raises(UserError, match="matched no files"):
        storage.expand_patterns(storage.join(root, "a"))  # Only a folder.
    with pytest.raises(UserError, match="matched no files"):
        storage.expand_patterns(root)  # The root: a bucket or a folder, no file.


def test_copy_file_all_directions(tmp_path, gcs_bucket):
    bucket = gcs_bucket()
    src = str(tmp_path / "src.bin")
    data = os.urandom(3 * 1024 * 1024 + 17)  # Larger than one 1 MiB copy chunk.
    storage.write_bytes(src, data)
    hops = [
        (src, str(tmp_path / "l2l" / "copy.bin")),
        (src, f"{bucket}/up/copy.bin"),
        (f"{bucket}/up/copy.bin", f"{bucket}/g2g/copy.bin"),
        (f"{bucket}/g2g/copy.bin", str(tmp_path / "down" / "copy.bin")),
    ]
    for a, b in hops:
        storage.copy_file(a, b)
        assert storage.read_bytes(b) == data, (a, b)
    assert sorted(os.listdir(tmp_path / "down")) == ["copy.bin"]  # No temp file left.
    for missing in [str(tmp_path / "nope"), f"{bucket}/nope"]:
        for dst in [str(tmp_path / "dst"), f"{bucket}/dst"]:
            with pytest.raises(FileNotFoundError):
                storage.copy_file(missing, dst)
    assert not os.path.exists(tmp_path / "dst")


def test_upload_dir(root, tmp_path):
    local = tmp_path / "job"
    for rel in ["ckpt/w.h5", "ckpt/sub/x", "config.json"]:
        storage.write_text(str(local / rel), rel)
    dst = storage.join(root, "job")
    got = storage.upload_dir(str(local), dst)
    rels = ["ckpt/sub/x", "ckpt/w.h5", "config.json"]
    assert sorted(got) == sorted(storage.join(dst, *r.split("/")) for r in rels)
    for r in rels:
        assert storage.read_text(storage.join(dst, *r.split("/"))) == r


def test_md5_matches_emulator(tmp_path, gcs_bucket, gcs_emulator):
    bucket = gcs_bucket()
    src = str(tmp_path / "f.bin")
    storage.write_bytes(src, os.urandom(100_000))
    storage.copy_file(src, f"{bucket}/f.bin")
    name = urllib.parse.quote(bucket[len("gs://") :])
    url = f"{gcs_emulator.host}/storage/v1/b/{name}/o/f.bin"
    with urllib.request.urlopen(url, timeout=10) as resp:
        meta = json.load(resp)
    assert meta["md5Hash"] == storage.md5_file(src)


def test_local_write_is_atomic(tmp_path):
    path = str(tmp_path / "new" / "f.json")
    storage.write_text(path, "old")
    storage.write_text(path, "new")
    with pytest.raises(TypeError):
        storage.write_bytes(path, "not bytes")  # Fails mid-write.
    assert storage.read_text(path) == "new"
    assert os.listdir(tmp_path / "new") == ["f.json"]  # No temp files left behind.


def test_emulator_guard(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with pytest.raises(RuntimeError, match="TRAINER_REQUIRE_EMULATOR"):
        storage.exists("gs://some-bucket/x")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://10.1.2.3:9023")
    with pytest.raises(RuntimeError, match="refusing"):
        storage.exists("gs://some-bucket/x")


def test_subprocess_inherits_emulator(gcs_bucket):
    path = f"{gcs_bucket()}/hello.txt"
    storage.write_text(path, "from parent")
    code = f"from trainer import storage; print(storage.read_text({path!r}))"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from parent"


def test_fingerprint_changes_when_the_content_does(root):
    path = storage.join(root, "shard.txt")
    storage.write_text(path, "first version")
    first = storage.fingerprint(path)
    assert storage.fingerprint(path) == first  # Reading metadata changes nothing.
    time.sleep(0.01)  # Local files: a later mtime even where the clock is coarse.
    storage.write_text(path, "other version")  # The same size: only mtime/generation differ.
    assert storage.fingerprint(path) != first
    with pytest.raises(FileNotFoundError):
        storage.fingerprint(storage.join(root, "missing.txt"))


@pytest.mark.parametrize("path", ["gs://", "gs:///x.txt"])
def test_a_gs_path_without_a_bucket_is_refused(path):
    # Refused before any client is built, by every kind of call.
    calls = [
        lambda: storage.exists(path),
        lambda: storage.read_bytes(path),
        lambda: storage.write_bytes(path, b"x"),
        lambda: storage.listdir(path),
        lambda: storage.glob("gs:///*.txt"),
        lambda: storage.expand_patterns(path),
        lambda: storage.copy_file(path, "/tmp/never-written"),
    ]
    for call in calls:
        with pytest.raises(UserError, match="no bucket name"):
            call()


def test_a_stop_during_a_metadata_write_leaves_the_emulator_startable(tmp_path):
    # The test emulator rewrites its metadata file in place on every change; a stop that
    # cuts such a write short must not leave a file that no later start can read.
    emulator = Emulator(str(tmp_path))
    emulator.start()
    try:
        emulator.create_bucket("kept-bucket")
        meta = emulator._meta_path
        proc = emulator._proc
        signal_it = proc.send_signal

        def torn_then_signalled(sig):  # The stop lands halfway through a write.
            with open(meta, "r+b") as f:
                f.truncate(os.path.getsize(meta) // 2)
            signal_it(sig)

        proc.send_signal = torn_then_signalled
        emulator.stop()
        emulator.start()
        with urllib.request.urlopen(f"{emulator.host}/storage/v1/b/kept-bucket", timeout=10) as r:
            assert json.load(r)["name"] == "kept-bucket"
    finally:
        emulator.stop()
