"""Text decoding and the character vocabulary.

Text is decoded as UTF-8 (invalid bytes become U+FFFD and are counted), `\\r\\n`
becomes `\\n`, and each Unicode code point is one token. The vocabulary is built
in one streaming pass over the training shards, holding one shard at a time.

Ids: 0 is reserved for out-of-vocabulary characters (chars seen only in
validation data or in a prompt); the training chars take ids 1..N in code-point
order, so the same counts always give the same ids.
"""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import dataclasses
import json
import threading
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

from trainer import storage
from trainer.errors import UserError

OOV_ID = 0
# Characters per chunk when turning a decoded shard into code points, so a 500 MB
# one-line shard never needs a 2 GB utf-32 copy at once.
_CHUNK = 1 << 20

_local = threading.local()


def _count_invalid(err: UnicodeDecodeError) -> tuple[str, int]:
    _local.invalid = getattr(_local, "invalid", 0) + (err.end - err.start)
    return "\ufffd", err.end


codecs.register_error("trainer_count_invalid", _count_invalid)


def decode(data: bytes, lowercase: bool = False) -> tuple[str, int]:
    """Decodes shard bytes to normalised text.

    Args:
      data: raw bytes of a shard.
      lowercase: lowercase the text (the 2017 tutorial's preprocessing).

    Returns:
      (text, number of invalid bytes that were replaced by U+FFFD).
    """
    _local.invalid = 0
    text = data.decode("utf-8", errors="trainer_count_invalid")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if lowercase:
        text = text.lower()
    return text, _local.invalid


def code_points(text: str) -> Iterable[np.ndarray]:
    """Yields the text's code points as uint32 arrays, one bounded chunk at a time."""
    for start in range(0, len(text), _CHUNK):
        yield np.frombuffer(text[start:start + _CHUNK].encode("utf-32-le"), dtype="<u4")


@dataclasses.dataclass
class ShardInfo:
    """What one scanning pass learned about a shard."""

    path: str
    chars: int
    invalid_bytes: int = 0
    nul_chars: int = 0
    # storage.fingerprint of the shard when it was read ("" if not taken).
    fingerprint: str = ""


@dataclasses.dataclass
class Scan:
    """Result of one streaming pass over a set of shards."""

    shards: list[ShardInfo]
    counts: collections.Counter
    # How many shards were taken from `known` instead of being read.
    reused: int = 0

    @property
    def total_chars(self) -> int:
        return sum(s.chars for s in self.shards)


_STAT_THREADS = 16
# The job directory's record of the last scan, so a resumed job need not read every shard.
SCAN_RECORD = "shards.json"


def scan_text_counts(text: str) -> collections.Counter:
    """Counts the characters of one decoded text, chunk by chunk."""
    counts: collections.Counter = collections.Counter()
    for cps in code_points(text):
        values, freq = np.unique(cps, return_counts=True)
        counts.update(dict(zip((chr(v) for v in values.tolist()), freq.tolist(), strict=True)))
    return counts


def scan(paths: Sequence[str], lowercase: bool = False, what: str = "training",
         known: dict[str, ShardInfo] | None = None) -> Scan:
    """Reads each shard once, counting characters, and warns once about bad bytes.

    Args:
      paths: shard paths (local or gs://).
      lowercase: apply the same normalisation the job will use.
      what: how the shards are named in warnings ("training", "validation").
      known: shards scanned before (by path, with the same `lowercase`): one whose
        fingerprint still matches is not read again. Its chars are not counted, so
        pass `known` only when the vocabulary already exists.

    Returns:
      A Scan with per-shard sizes and the char counts over the shards read.
    """
    counts: collections.Counter = collections.Counter()
    shards = []
    reused = 0
    # One metadata request per gs:// shard: many at once, as a listing would be.
    with concurrent.futures.ThreadPoolExecutor(_STAT_THREADS) as pool:
        stamps = list(pool.map(storage.fingerprint, paths))
    for path, stamp in zip(paths, stamps, strict=True):
        before = (known or {}).get(path)
        if before is not None and before.fingerprint == stamp:
            shards.append(before)
            reused += 1
            continue
        text, invalid = decode(storage.read_bytes(path), lowercase)
        counts.update(scan_text_counts(text))
        shards.append(ShardInfo(path=path, chars=len(text), invalid_bytes=invalid,
                                nul_chars=text.count("\0"), fingerprint=stamp))
        del text
    _warn_about(shards, what)
    return Scan(shards=shards, counts=counts, reused=reused)


def _warn_about(shards: Sequence[ShardInfo], what: str) -> None:
    empty = [s.path for s in shards if s.chars == 0]
    if empty:
        logging.warning("skipping %d empty %s shard(s), e.g. %s", len(empty), what, empty[0])
    invalid = [s for s in shards if s.invalid_bytes]
    if invalid:
        logging.warning("%d invalid UTF-8 byte(s) in %d %s shard(s) were replaced by U+FFFD "
                        "(e.g. %s)", sum(s.invalid_bytes for s in invalid), len(invalid), what,
                        invalid[0].path)
    binary = [s.path for s in shards if s.nul_chars]
    if binary:
        logging.warning("%d %s shard(s) contain NUL bytes and may be binary files (e.g. %s); "
                        "they are used as text", len(binary), what, binary[0])


def scan_record(scans: Sequence[Scan], lowercase: bool) -> str:
    """JSON of every scanned shard (path, fingerprint, chars, ...), for `recorded_shards`."""
    return json.dumps({"lowercase": lowercase, "shards": [
        dataclasses.asdict(shard) for s in scans for shard in s.shards]}, indent=1) + "\n"


def recorded_shards(text: str | None, lowercase: bool) -> dict[str, ShardInfo]:
    """The shards in a `scan_record`, by path; none if there is no record, it is
    unreadable, or it was made with another `lowercase` (which changes what a scan counts)."""
    try:
        data = json.loads(text) if text else {}
        if data.get("lowercase") != lowercase:
            return {}
        return {s["path"]: ShardInfo(**s) for s in data.get("shards", [])}
    except (ValueError, TypeError, KeyError, AttributeError):
        logging.warning("ignoring an unreadable %s: scanning every shard", SCAN_RECORD)
        return {}


class Vocabulary:
    """Maps characters to ids and back. Id 0 is the out-of-vocabulary id."""

    def __init__(self, chars: Sequence[str], counts: Sequence[int] | None = None,
                 lowercase: bool = False):
        self.chars = tuple(chars)
        self.counts = tuple(counts) if counts is not None else (0,) * len(self.chars)
        self.lowercase = lowercase
        self._ids = {c: i + 1 for i, c in enumerate(self.chars)}
        points = np.array([ord(c) for c in self.chars], dtype=np.int64)
        table_size = int(points.max()) + 1 if len(points) else 1
        self._table = np.zeros(table_size, dtype=self.dtype)
        self._table[points] = np.arange(1, len(points) + 1)

    @classmethod
    def from_counts(cls, counts: collections.Counter, lowercase: bool = False) -> Vocabulary:
        chars = sorted(counts, key=ord)
        return cls(chars, [counts[c] for c in chars], lowercase)

    @property
    def size(self) -> int:
        """Number of ids, the OOV id included."""
        return len(self.chars) + 1

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every id."""
        for dtype in (np.uint8, np.uint16, np.uint32):
            if self.size <= np.iinfo(dtype).max + 1:
                return np.dtype(dtype)
        raise AssertionError("unreachable")

    def encode(self, text: str) -> np.ndarray:
        """Encodes text (already normalised) to ids of `self.dtype`; unknown chars -> 0."""
        out = np.empty(len(text), dtype=self.dtype)
        pos = 0
        for cps in code_points(text):
            inside = cps < len(self._table)
            out[pos:pos + len(cps)] = np.where(inside, self._table[np.where(inside, cps, 0)], 0)
            pos += len(cps)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Turns ids back into text; the OOV id becomes U+FFFD."""
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "\ufffd"
                       for i in ids)

    def missing(self, text: str) -> list[str]:
        """The distinct characters of `text` that are not in the vocabulary, sorted."""
        return sorted({c for c in text if c not in self._ids}, key=ord)

    def to_json(self) -> str:
        return json.dumps({"chars": list(self.chars), "counts": list(self.counts),
                           "lowercase": self.lowercase, "oov_id": OOV_ID},
                          ensure_ascii=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        return cls(data["chars"], data.get("counts"), data.get("lowercase", False))

    def save(self, path: str) -> None:
        storage.write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> Vocabulary:
        try:
            return cls.from_json(storage.read_text(path))
        except (ValueError, KeyError) as err:
            raise UserError(f"{path} is not a valid vocabulary file: {err}") from err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and (self.chars, self.lowercase) == (
            other.chars, other.lowercase)

    def __repr__(self) -> str:
        return f"Vocabulary({self.size} ids, lowercase={self.lowercase})"
