"""The scan under `trainer.data.index`: cutting files into pieces and counting chars,
each byte read once per job, split evenly among the workers; and reading a piece back
(`read_piece`, pinned to the file the scan measured).

The bytes of all files to scan are laid end to end and every worker takes an equal
contiguous share, cut into byte ranges at piece boundaries (and at the share's
ends; a scan that counts words gives each piece whole to the worker whose share
holds its first byte, since words do not add up across a cut), read by one range read each and by several threads at once. Every cut,
nominal or at a share's end, moves forward to the next UTF-8 character start (and
past the `\\n` of a `\\r\\n`) by the same rule on the same bytes, so the worker on
each side of it agrees where it falls, and the parts of a piece add up to exactly
the piece. A file's first piece begins after a UTF-8 byte-order mark (EF BB BF, as
some editors save text), so the mark is neither text nor vocabulary; a U+FEFF
anywhere else is an ordinary character. A `.gz` file is one stream, scanned whole by the worker whose share
holds its first byte. Two sums across the workers (`combine`) then give every
worker the same pieces and the same character histogram (and, when counting
words, `tokenization.exchange_words` the same word counts).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import collections
import math
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trainer import storage
from trainer.data import tokenization, vocabulary
from trainer.errors import UserError

# UTF-8 puts at most 3 continuation bytes after a lead byte: a cut moves at most that far.
_MAX_CONTINUATION = 3
LOOKAHEAD = _MAX_CONTINUATION + 1
# The byte-order mark some editors put at the start of a UTF-8 file (Python's utf-8-sig).
BOM = b"\xef\xbb\xbf"

Combine = Callable[[np.ndarray], np.ndarray]


def alone(values: np.ndarray) -> np.ndarray:
    """The `combine` of a job with one worker."""
    return values


def boundary(data: bytes, i: int) -> int:
    """The first cut at or after `data[i]` that splits no character and no `\\r\\n`."""
    moved = 0
    while i < len(data) and moved < _MAX_CONTINUATION and data[i] & 0xC0 == 0x80:
        i, moved = i + 1, moved + 1
    if 0 < i < len(data) and data[i - 1] == 0x0D and data[i] == 0x0A:
        i += 1
    return i


@dataclasses.dataclass
class Part:
    """What one read learned: bytes [start, stop) and their characters."""

    start: int
    stop: int
    chars: int
    histogram: np.ndarray
    invalid: int
    nul: int
    words: collections.Counter | None = None


def measure(data: bytes, start: int, lowercase: bool, words: bool = False) -> Part:
    text, invalid = vocabulary.decode(data, lowercase)
    histogram = vocabulary.char_histogram(text)
    return Part(start, start + len(data), len(text), histogram, invalid,
                int(histogram[0]) if len(histogram) else 0,
                tokenization.count_words(text) if words else None)


def _read_part(path: str, size: int, lo: int, hi: int, lowercase: bool,
               words: bool = False) -> Part:
    """Reads nominal bytes [lo, hi) of a plain file, with both ends moved to a cut."""
    first, last = max(0, lo - 1), min(size, hi + LOOKAHEAD)
    data = storage.read_range(path, first, last)
    # A file's first piece begins after its byte-order mark: no reader ever sees it.
    start = len(BOM) * data.startswith(BOM) if lo == 0 else first + boundary(data, lo - first)
    stop = size if hi >= size else first + boundary(data, hi - first)
    return measure(data[start - first:stop - first], start, lowercase, words)


def open_compressed(path: str, version: str = "") -> gzip.GzipFile:
    """A .gz file's decompressed stream; `version` pins it (`storage.read_range`)."""
    return gzip.GzipFile(fileobj=storage.open_read(path, version), mode="rb")


def open_region(region: Any) -> gzip.GzipFile:
    """A compressed region's file, decompressed, pinned to the file the scan measured.

    Raises:
      UserError: the file was rewritten since the scan (`Region.version`).
    """
    try:
        return open_compressed(region.path, region.version)
    except storage.ChangedError as err:
        raise changed(region, CHANGED) from err


def _read_gzip(path: str, piece_bytes: int, lowercase: bool, words: bool = False
               ) -> list[Part]:
    """Streams a .gz file once, cutting its decompressed bytes into pieces."""
    pieces, buffer, position = [], b"", 0
    try:
        with open_compressed(path) as stream:
            buffer = stream.read(len(BOM))
            if buffer == BOM:  # The first piece begins after the byte-order mark.
                position, buffer = len(BOM), b""
            while True:
                more = stream.read(piece_bytes + LOOKAHEAD - len(buffer))
                buffer += more
                if not buffer:
                    break
                cut = len(buffer) if not more else boundary(buffer, min(piece_bytes, len(buffer)))
                pieces.append(measure(buffer[:cut], position, lowercase, words))
                position, buffer = position + cut, buffer[cut:]
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path} is not a readable gzip file: {err}") from err
    return pieces


@dataclasses.dataclass
class Scanned:
    """One file's pieces as (start, stop, chars), its bad bytes, for every worker alike."""

    pieces: list[tuple[int, int, int]]
    invalid: int
    nul: int


def scan_files(paths: Sequence[str], sizes: Sequence[int], compressed: Sequence[bool],
               counted: Sequence[bool], *, lowercase: bool, piece_bytes: int, worker: int,
               num_workers: int, combine: Combine, threads: int, keep_words: int = 0
               ) -> tuple[list[Scanned], np.ndarray, int, collections.Counter | None]:
    """Scans this worker's share of the files' bytes and combines all workers' results.

    Args:
      paths, sizes, compressed: the files to scan, in corpus order.
      counted: whether a file's chars go into the histogram (training files).
      worker, num_workers, combine: this worker's place; a sum over all workers.
      threads: reading threads on this machine.
      keep_words: also count the words (`tokenization.WORD_RULE`) of the counted files,
        each piece whole by one worker, and combine every worker's `keep_words` most
        frequent (`tokenization.exchange_words`); 0 = no word counts.

    Returns:
      (every file's pieces, the histogram of the counted files, bytes this worker read,
      the combined word counts or None).
    """
    words = keep_words > 0
    if not paths:  # Nothing changed since the record (every worker sees the same files).
        return [], np.zeros(0, np.int64), 0, (collections.Counter() if words else None)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    lo, hi = total * worker // num_workers, total * (worker + 1) // num_workers
    nominal = [0 if compressed[f] else math.ceil(sizes[f] / piece_bytes)
               for f in range(len(paths))]
    jobs = []  # (file, piece, nominal lo, nominal hi) of this worker.
    for f in range(len(paths)):
        base = int(offsets[f])
        if compressed[f]:
            owner = min(num_workers - 1, base * num_workers // total) if total else 0
            if owner == worker:
                jobs.append((f, -1, 0, 0))
            continue
        for k in range(nominal[f]):
            edges = (k * piece_bytes, min((k + 1) * piece_bytes, sizes[f]))
            if words:  # Whole pieces: the worker whose share holds the piece's first byte.
                if lo <= base + edges[0] < hi:
                    jobs.append((f, k) + edges)
                continue
            a = _snap(max(edges[0], lo - base), edges)
            b = _snap(min(edges[1], hi - base), edges)
            if a < b:
                jobs.append((f, k, a, b))

    def run(job) -> list[Part]:
        f, k, a, b = job
        counting = words and counted[f]
        if k < 0:
            return _read_gzip(paths[f], piece_bytes, lowercase, counting)
        return [_read_part(paths[f], sizes[f], a, b, lowercase, counting)]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(run, jobs))
    bytes_read = sum(p.stop - p.start for parts in results for p in parts
                     if p.stop > p.start) if jobs else 0
    # Round 1: the pieces of each .gz file and each worker's largest code point fix shapes.
    hists = [p.histogram for job, parts in zip(jobs, results, strict=True)
             if counted[job[0]] for p in parts]
    first = np.zeros(len(paths) + num_workers)
    for job, parts in zip(jobs, results, strict=True):
        if job[1] < 0:
            first[job[0]] = len(parts)
    first[len(paths) + worker] = max([len(h) for h in hists] + [0])
    first = combine(first)
    counts = [int(first[f]) if compressed[f] else nominal[f] for f in range(len(paths))]
    width = int(first[len(paths):].max())
    # Round 2: (start, stop, chars) per piece, (invalid, nul) per file, the histogram.
    at = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows, stats_at = 3 * int(at[-1]), 3 * int(at[-1]) + 2 * len(paths)
    second = np.zeros(stats_at + width)
    for (f, k, a, b), parts in zip(jobs, results, strict=True):
        for j, part in enumerate(parts):
            row = 3 * (int(at[f]) + (j if k < 0 else k))
            if k < 0 or a == k * piece_bytes:  # This part begins its piece.
                second[row] += part.start
            if k < 0 or b == min((k + 1) * piece_bytes, sizes[f]):  # It ends it.
                second[row + 1] += part.stop
            second[row + 2] += part.chars
            second[rows + 2 * f:rows + 2 * f + 2] += (part.invalid, part.nul)
            if counted[f]:
                second[stats_at:stats_at + len(part.histogram)] += part.histogram
    second = combine(second)
    scanned = []
    for f in range(len(paths)):
        pieces = second[3 * at[f]:3 * at[f + 1]].astype(np.int64).reshape(-1, 3)
        scanned.append(Scanned([tuple(int(v) for v in p) for p in pieces],
                               int(second[rows + 2 * f]), int(second[rows + 2 * f + 1])))
    found = None
    if words:
        mine = collections.Counter()
        for parts in results:
            for part in parts:
                mine.update(part.words or {})
        found = tokenization.exchange_words(mine, keep_words, worker, num_workers, combine)
    return scanned, second[stats_at:].astype(np.int64), bytes_read, found


def _snap(cut: int, edges: tuple[int, int]) -> int:
    """A share's end inside a piece, moved onto the piece's edge when it lies within a few
    bytes of it, so its cut and the piece's own can never overlap (both sides agree)."""
    nearest = min(edges, key=lambda edge: abs(cut - edge))
    return nearest if abs(cut - nearest) < 2 * LOOKAHEAD else cut


def default_threads() -> int:
    return max(4, os.cpu_count() or 1)


class Streams:
    """Open .gz streams to read pieces from, each only forward.

    A .gz file has no random access: reading a piece from a fresh stream first
    decompresses everything before it. Readers that take a file's pieces in several
    interleaved forward runs (carried lanes, a sample of pieces) keep up to `limit`
    streams, and each piece is read from the stream closest behind it, so a file is
    decompressed about once per run rather than once per piece.
    """

    def __init__(self, limit: int = 8):
        self.limit = limit
        self.open: list[tuple[str, Any]] = []  # (path, stream), least recently used first.

    def get(self, region: Any):  # An index.Region.
        """A stream positioned at or before the region's piece; None if not compressed."""
        if not region.compressed:
            return None
        behind = [i for i, (path, stream) in enumerate(self.open)
                  if path == region.path and stream.tell() <= region.start]
        if behind:
            i = max(behind, key=lambda i: self.open[i][1].tell())
            entry = self.open.pop(i)
        else:
            if len(self.open) >= self.limit:
                self.open.pop(0)[1].close()
            entry = (region.path, open_region(region))
        self.open.append(entry)
        return entry[1]

    def close(self) -> None:
        for _, stream in self.open:
            stream.close()
        self.open = []


def read_text(region: Any, lowercase: bool, stream=None) -> str:
    """A char region's (an `index.Region`'s) text: one range read of its piece (or the next bytes of `stream`)."""
    return read_piece(region, lowercase, stream)[region.begin:region.end]


def read_piece(region: Any, lowercase: bool, stream=None) -> str:
    """The text of the region's whole piece: one range read (or the next bytes of `stream`).

    Raises:
      UserError: the file was rewritten since the scan (`Region.version`).
    """
    try:
        if region.compressed:
            if stream is None:
                with open_region(region) as own:
                    own.seek(region.start)
                    data = own.read(region.stop - region.start)
            else:
                if stream.tell() != region.start:
                    stream.seek(region.start)
                data = stream.read(region.stop - region.start)
        else:
            data = storage.read_range(region.path, region.start, region.stop, region.version)
    except storage.ChangedError as err:
        raise changed(region, CHANGED) from err
    text, _ = vocabulary.decode(data, lowercase)
    return text


CHANGED = "its size, modification time or generation differs from the scan's"


def changed(region: Any, why: Exception | str) -> UserError:
    """The error for a file rewritten while a job reads it."""
    return UserError(f"{region.path} changed while the job read it (bytes {region.start}-"
                     f"{region.stop}: {why}); leave the data unchanged while a job runs, "
                     "and rerun it to rescan")
