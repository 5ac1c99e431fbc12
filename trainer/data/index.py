"""The corpus index: text files cut into bounded pieces, with their lengths and fingerprints.

A file is cut into pieces of about `piece_bytes` bytes, each read later by one
range read, so nothing ever holds a whole file however large it is. Cuts are moved
forward to the next UTF-8 character start (and past the `\\n` of a `\\r\\n`), so
decoding piece by piece gives exactly the text of decoding the whole file, and no
byte is decoded twice. A `.gz` file cannot be read by ranges: it is one stream,
cut into pieces of its decompressed bytes, read front to back.

The scan (`trainer.data.scan`) reads each byte once per job, split evenly among
the workers; `shards.json` in the job directory records what it found, so a
restart re-reads only files whose fingerprint (size and version) changed.

With a word or bpe tokenizer (`trainer.data.tokenization`), `count_tokens` then
tokenizes every piece once (each piece whole, by one worker) and records its
length in tokens: regions, windows and lanes count tokens, and a token never spans
two pieces. A word job's scan also counts the words its vocabulary is built from.

`make_regions` turns the index into the spans that windows are cut from; windows
that would cross a piece boundary are dropped, and the log says how many.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from trainer import storage
from trainer.data import scan
from trainer.data import tokenization
from trainer.data import vocabulary
from trainer.errors import UserError

SCAN_RECORD = "shards.json"
_RECORD_VERSION = 2
_STAT_THREADS = 16



def is_compressed(path: str) -> bool:
    return path.endswith(".gz")


@dataclasses.dataclass
class FileInfo:
    """What the scan learned about one file."""

    path: str
    split: str  # "train" or "val"
    fingerprint: str
    compressed: bool = False
    # (start byte, stop byte, chars) per piece; bytes of the decompressed stream for .gz.
    pieces: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    invalid_bytes: int = 0
    nul_chars: int = 0
    # Tokens per piece and spelled-out words, by the tokenizer with this fingerprint
    # ("" and None for characters).
    tokens: list[int] | None = None
    unknown_words: int = 0
    tokenized: str = ""

    @property
    def chars(self) -> int:
        return sum(p[2] for p in self.pieces)

    def lengths(self) -> list[int]:
        """Each piece's length in the job's tokens: tokens if counted, else chars."""
        return self.tokens if self.tokens is not None else [p[2] for p in self.pieces]


@dataclasses.dataclass
class Index:
    """The result of a scan over the training and validation files."""

    files: list[FileInfo]
    # Character counts over the training files this scan read (for a new vocabulary).
    histogram: np.ndarray
    reused: int = 0
    bytes_read: int = 0  # By this worker.
    # Word counts over the training files this scan read (a word job's new vocabulary).
    words: collections.Counter | None = None

    def split(self, name: str) -> list[FileInfo]:
        return [f for f in self.files if f.split == name]

    @property
    def counts(self) -> collections.Counter:
        return vocabulary.histogram_counts(self.histogram)


@dataclasses.dataclass(frozen=True)
class Region:
    """Tokens [begin, end) of one piece (chars, for the char tokenizer), the span
    windows are cut from.

    `start`/`stop` are the piece's bytes in its file; `offset` is the number of
    tokens of the file before the piece; `version` is the file's fingerprint when it
    was scanned: reads are pinned to it (`storage.read_range`).
    """

    path: str
    start: int
    stop: int
    begin: int
    end: int
    offset: int = 0
    compressed: bool = False
    version: str = ""

    @property
    def length(self) -> int:
        return self.end - self.begin


def build(train_paths: Sequence[str], val_paths: Sequence[str], *, lowercase: bool,
         piece_bytes: int, known: dict[str, FileInfo] | None = None, worker: int = 0,
         num_workers: int = 1, combine: scan.Combine = scan.alone,
         threads: int = 0, keep_words: int = 0,
         names: tuple[str, str] = ("training", "validation")) -> Index:
    """Cuts the files into pieces and counts their characters, each byte read once.

    Args:
      train_paths, val_paths: the expanded data patterns (local or gs://).
      lowercase: the job's normalisation.
      piece_bytes: the nominal piece size.
      known: files from an earlier scan (`read_record`); one whose fingerprint still
        matches is not read again (its chars are not counted: pass `known` only when
        the vocabulary already exists).
      worker, num_workers: this process's share of the pieces to scan.
      combine: sums an array over all workers (every worker calls it the same times).
      threads: reading threads on this machine; 0 = one per CPU (at least 4).
      names: what the warnings call the train and the val files.
      keep_words: count words too (`scan.scan_files`); 0 = do not.

    Returns:
      The whole index, the same on every worker.
    """
    paths = [(p, "train") for p in train_paths] + [(p, "val") for p in val_paths]
    with concurrent.futures.ThreadPoolExecutor(_STAT_THREADS) as pool:
        stats = list(pool.map(storage.stat, [p for p, _ in paths]))
    files, todo, sizes = [], [], []
    for (path, split), (size, version) in zip(paths, stats, strict=True):
        stamp = f"{size}:{version}"
        before = (known or {}).get(path)
        if before is not None and before.fingerprint == stamp:
            files.append(dataclasses.replace(before, split=split))
        else:
            files.append(FileInfo(path, split, stamp, is_compressed(path)))
            todo.append(files[-1])
            sizes.append(size)
    scanned, histogram, bytes_read, words = scan.scan_files(
        [f.path for f in todo], sizes, [f.compressed for f in todo],
        [f.split == "train" for f in todo], lowercase=lowercase, piece_bytes=piece_bytes,
        worker=worker, num_workers=num_workers, combine=combine,
        threads=threads or scan.default_threads(), keep_words=keep_words)
    for info, result in zip(todo, scanned, strict=True):
        info.pieces, info.invalid_bytes, info.nul_chars = result.pieces, result.invalid, result.nul
    _warn_about(todo, names)
    return Index(files, histogram, len(files) - len(todo), bytes_read, words)


def count_tokens(index: Index, tok, *, worker: int = 0, num_workers: int = 1,
                 combine: scan.Combine = scan.alone, threads: int = 0) -> bool:
    """Records every piece's length in `tok`'s tokens (word and bpe tokenizers).

    Each piece is read and tokenized whole by one worker (a .gz file's pieces by one
    worker, in order); one sum over the workers gives everyone every count. Files
    already counted by this tokenizer (same fingerprint) are not read again.

    Returns:
      Whether anything was counted (the record then needs writing).
    """
    if tok.kind == "char":
        return False
    mark = tok.fingerprint
    todo = [f for f in index.files if f.tokenized != mark or f.tokens is None]
    if not todo:
        return False
    sizes = np.array([max(sum(p[1] - p[0] for p in f.pieces), 1) for f in todo], np.int64)
    owners = (np.concatenate([[0], np.cumsum(sizes)[:-1]]) * num_workers
              // max(int(sizes.sum()), 1))
    at = np.concatenate([[0], np.cumsum([len(f.pieces) + 1 for f in todo])]).astype(np.int64)

    def run(f: int) -> np.ndarray:
        info, out = todo[f], np.zeros(len(todo[f].pieces) + 1)
        regions = [Region(info.path, start, stop, 0, chars, 0, info.compressed,
                          info.fingerprint) for start, stop, chars in info.pieces]
        stream = scan.open_region(regions[0]) if info.compressed and regions else None
        try:
            for k, region in enumerate(regions):
                ids = tok.encode(scan.read_piece(region, tok.lowercase, stream))
                out[k], out[-1] = len(ids), out[-1] + tokenization.unknown_ids(tok, ids)
        finally:
            if stream is not None:
                stream.close()
        return out

    mine = [f for f in range(len(todo)) if owners[f] == worker]
    counts = np.zeros(int(at[-1]))
    with concurrent.futures.ThreadPoolExecutor(threads or scan.default_threads()) as pool:
        for f, out in zip(mine, pool.map(run, mine), strict=True):
            counts[at[f]:at[f + 1]] = out
    counts = combine(counts).astype(np.int64)
    for f, info in enumerate(todo):
        info.tokens = counts[at[f]:at[f + 1] - 1].tolist()
        info.unknown_words, info.tokenized = int(counts[at[f + 1] - 1]), mark
    return True


def _warn_about(files: Sequence[FileInfo], names: tuple[str, str]) -> None:
    for split, what in zip(("train", "val"), names, strict=True):
        mine = [f for f in files if f.split == split]
        empty = [f.path for f in mine if f.chars == 0]
        if empty:
            logging.warning("skipping %d empty %s shard(s), e.g. %s", len(empty), what, empty[0])
        invalid = [f for f in mine if f.invalid_bytes]
        if invalid:
            logging.warning("%d invalid UTF-8 byte(s) in %d %s shard(s) were replaced by "
                            "U+FFFD (e.g. %s)", sum(f.invalid_bytes for f in invalid),
                            len(invalid), what, invalid[0].path)
        binary = [f.path for f in mine if f.nul_chars]
        if binary:
            logging.warning("%d %s shard(s) contain NUL bytes and may be binary files (e.g. "
                            "%s); they are used as text", len(binary), what, binary[0])


def record(index: Index, lowercase: bool, piece_bytes: int) -> str:
    """JSON of the index for `read_record`: every file's fingerprint and pieces."""
    return json.dumps({"version": _RECORD_VERSION, "lowercase": lowercase,
                       "piece_bytes": piece_bytes,
                       "files": [dataclasses.asdict(f) for f in index.files]}) + "\n"


def read_record(text: str | None, lowercase: bool, piece_bytes: int) -> dict[str, FileInfo]:
    """The files in a `record`, by path; none if there is no record, it is unreadable, or
    it was made with another `lowercase` or piece size (both change what a scan finds)."""
    try:
        data = json.loads(text) if text else {}
        if (data.get("version") != _RECORD_VERSION or data.get("lowercase") != lowercase
                or data.get("piece_bytes") != piece_bytes):
            return {}
        return {f["path"]: FileInfo(**{**f, "pieces": [tuple(p) for p in f["pieces"]]})
                for f in data["files"]}
    except (ValueError, TypeError, KeyError, AttributeError):
        logging.warning("ignoring an unreadable %s: scanning every shard", SCAN_RECORD)
        return {}


def make_regions(index: Index, window: int, val_fraction: float = 0.0
                 ) -> tuple[list[Region], list[Region]]:
    """Splits the indexed files into training and validation regions, one per piece.

    With validation files, whole files go to each side; with `val_fraction` the tail of
    every training file is validation, and no training window touches it.

    Returns:
      (train_regions, val_regions) in corpus order; val_regions is empty without validation.

    Raises:
      UserError: no training (or, when asked for, validation) file holds one window.
    """
    train, val = [], []
    for info in index.split("train"):
        total = sum(info.lengths())
        cut = total - int(total * val_fraction)
        offset = 0
        for (start, stop, _), chars in zip(info.pieces, info.lengths(), strict=True):
            mid = min(max(cut - offset, 0), chars)
            if mid:
                train.append(Region(info.path, start, stop, 0, mid, offset, info.compressed,
                                    info.fingerprint))
            if val_fraction and mid < chars:
                val.append(Region(info.path, start, stop, mid, chars, offset, info.compressed,
                                  info.fingerprint))
            offset += chars
    for info in index.split("val"):
        offset = 0
        for (start, stop, _), chars in zip(info.pieces, info.lengths(), strict=True):
            val.append(Region(info.path, start, stop, 0, chars, offset, info.compressed,
                              info.fingerprint))
            offset += chars
    files = index.split("train")
    train = _keep_long_enough(train, files, window, "training")
    if not train:
        raise UserError(f"no training shard holds one window of {window} {_unit(files)} "
                        f"({len(files)} shard(s), {sum(sum(f.lengths()) for f in files)} "
                        f"{_unit(files)} in all)")
    if index.split("val") or val_fraction:
        val = _keep_long_enough(val, index.split("val") or files, window, "validation")
        if not val:
            raise UserError(f"no validation shard holds one window of {window} "
                            f"{_unit(index.files)}")
    return train, val


def _unit(files: Sequence[FileInfo]) -> str:
    return "tokens" if any(f.tokens is not None for f in files) else "chars"


def _keep_long_enough(regions: list[Region], files: Sequence[FileInfo], window: int,
                      what: str) -> list[Region]:
    per_file = collections.Counter()
    for r in regions:
        per_file[r.path] += r.length
    short = [f.path for f in files if 0 < per_file[f.path] < window]
    if short:
        logging.warning("skipping %d %s shard(s) shorter than one window of %d %s, e.g. %s",
                        len(short), what, window, _unit(files), short[0])
    return [r for r in regions if r.length >= window]


def sample_pieces(index: Index, budget: int) -> list[Region]:
    """Whole training pieces of at most `budget` bytes in all, spread evenly over the
    corpus (every piece when they fit), in corpus order."""
    pieces = [Region(f.path, start, stop, 0, chars, 0, f.compressed, f.fingerprint)
              for f in index.split("train") for start, stop, chars in f.pieces if chars]
    total = sum(r.stop - r.start for r in pieces)
    if total <= budget:
        return pieces
    every = total / budget
    chosen, due, seen = [], 0.0, 0
    for r in pieces:
        if seen >= due:
            chosen.append(r)
            due += (r.stop - r.start) * every
        seen += r.stop - r.start
    return chosen


def prepare(train_paths: Sequence[str], val_paths: Sequence[str], *, lowercase: bool,
            piece_bytes: int, read: Callable[[str], str | None],
            write: Callable[[str, str], None], reuse: bool, worker: int = 0,
            num_workers: int = 1, combine: scan.Combine = scan.alone, keep_words: int = 0,
            tokenizer_for: Callable[[Index], object] | None = None) -> tuple[Index, object]:
    """Scans the corpus, re-reading only what changed since the job directory's record.

    Args:
      train_paths, val_paths, lowercase, piece_bytes, worker, num_workers, combine,
        keep_words: see `build`.
      read, write: read and write a file of the job directory by name.
      reuse: trust the record (a resumed job, whose vocabulary is fixed already).
      tokenizer_for: gives the job's tokenizer once the scan is done (the index in
        hand); its pieces are then counted in tokens (`count_tokens`). None: no
        tokenizer (chars).

    Returns:
      (the index, the tokenizer or None); the record is rewritten when anything changed.
    """
    known = read_record(read(SCAN_RECORD), lowercase, piece_bytes) if reuse else {}
    began = time.monotonic()
    index = build(train_paths, val_paths, lowercase=lowercase, piece_bytes=piece_bytes,
                 known=known, worker=worker, num_workers=num_workers, combine=combine,
                 keep_words=keep_words)
    total = len(index.files)
    gone = set(known) - {f.path for f in index.files}
    if index.reused:
        logging.info("%d of %d shard(s) unchanged since the last scan (%s): not read again",
                     index.reused, total, SCAN_RECORD)
    if index.reused < total:
        logging.info("scanned %d shard(s): %.1f MB read by this worker (%d of %d) in %.1f s",
                     total - index.reused, index.bytes_read / 1e6, worker, num_workers,
                     time.monotonic() - began)
    if known and (index.reused < total or gone):
        logging.warning("%d shard(s) changed, appeared or disappeared since the last scan; the "
                        "data order of this resumed run differs from an unbroken one",
                        total - index.reused + len(gone))
    tok = tokenizer_for(index) if tokenizer_for else None
    began = time.monotonic()
    counted = tok is not None and count_tokens(index, tok, worker=worker,
                                               num_workers=num_workers, combine=combine)
    if counted:
        logging.info("counted the tokens of every piece in %.1f s", time.monotonic() - began)
    if index.reused < total or gone or counted:
        write(SCAN_RECORD, record(index, lowercase, piece_bytes))
    return index, tok
