"""Text decoding and the character vocabulary.

Text is decoded as UTF-8 (invalid bytes become U+FFFD and are counted), `\\r\\n`
becomes `\\n`, and each Unicode code point is one token. The vocabulary comes from
character counts that `trainer.data.index` gathers while it scans the corpus.

Ids: 0 is reserved for out-of-vocabulary characters (chars seen only in
validation data or in a prompt); the training chars take ids 1..N in code-point
order, so the same counts always give the same ids. A fine-tuned job's vocabulary
(`extended`) keeps its base's ids and gives the chars the base lacks the ids after
them, again in code-point order: ids are then in code-point order within each part.
"""

from __future__ import annotations

import codecs
import collections
import functools
import json
import threading
from collections.abc import Iterable, Sequence

import numpy as np

from trainer import storage
from trainer.errors import UserError

OOV_ID = 0
# Characters per chunk when turning a decoded shard into code points, so a 500 MB
# one-line shard never needs a 2 GB utf-32 copy at once.
_CHUNK = 1 << 20

# Code points per np.bincount call (see char_histogram).
_COUNT_SLICE = 1 << 16

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
    return normalise(text, lowercase), _local.invalid


def normalise(text: str, lowercase: bool = False) -> str:
    """Normalises decoded text as the training text is: `\\r\\n` -> `\\n`, then lowercase.

    Prompts go through this too, so the model sees them as it saw its training text.

    Args:
      text: decoded text.
      lowercase: lowercase it (the vocabulary's `lowercase` setting).

    Returns:
      The normalised text.
    """
    if "\r" in text:  # Skips a copy of a large shard that has no carriage return.
        text = text.replace("\r\n", "\n")
    if lowercase:
        text = text.lower()
    return text


def smallest_dtype(size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..size-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise AssertionError("unreachable")


def code_points(text: str) -> Iterable[np.ndarray]:
    """Yields the text's code points as uint32 arrays, one bounded chunk at a time."""
    for start in range(0, len(text), _CHUNK):
        yield np.frombuffer(text[start:start + _CHUNK].encode("utf-32-le"), dtype="<u4")


def char_histogram(text: str) -> np.ndarray:
    """Counts of every code point in `text` (index = code point), in linear time.

    ASCII text is counted straight from its bytes, other text as code points; both in
    small slices, whose int64 copy (which bincount makes) stays in the CPU cache.
    """
    chunks = ([np.frombuffer(text.encode("ascii"), np.uint8)] if text.isascii()
              else code_points(text))
    total = np.zeros(0, np.int64)
    for codes in chunks:
        for lo in range(0, len(codes), _COUNT_SLICE):
            counts = np.bincount(codes[lo:lo + _COUNT_SLICE])
            if len(counts) > len(total):
                counts[:len(total)] += total
                total = counts
            else:
                total[:len(counts)] += counts
    return total


def histogram_counts(histogram: np.ndarray) -> collections.Counter:
    """A `char_histogram` as a Counter of the characters that occur."""
    present = np.flatnonzero(histogram)
    return collections.Counter(dict(zip((chr(c) for c in present.tolist()),
                                        histogram[present].tolist(), strict=True)))


def count_chars(text: str) -> collections.Counter:
    """The characters of one decoded text and how often each occurs."""
    return histogram_counts(char_histogram(text))


class Vocabulary:
    """Maps characters to ids and back. Id 0 is the out-of-vocabulary id.

    It is the `char` tokenizer of `trainer.data.tokenization`, with the same interface
    as the word and bpe ones (`kind`, `pieces`, `token_chars`, `stream_decoder`).
    """

    kind = "char"

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
        self._ascii = np.zeros(128, dtype=self.dtype)
        self._ascii[:min(128, table_size)] = self._table[:128]

    @classmethod
    def from_counts(cls, counts: collections.Counter, lowercase: bool = False) -> Vocabulary:
        chars = sorted(counts, key=ord)
        return cls(chars, [counts[c] for c in chars], lowercase)

    def extended(self, counts: collections.Counter) -> Vocabulary:
        """This vocabulary with the characters of `counts` it lacks added after its own.

        Every id of this vocabulary keeps its character, so weights trained with it
        keep their meaning; the counts become those of `counts` (0 for a character it
        lacks). The id dtype may widen (e.g. past 255 ids).

        Args:
          counts: the characters of a new training text and how often each occurs.

        Returns:
          The extended vocabulary (equal to this one when nothing is new).
        """
        new = sorted((c for c in counts if c not in self._ids), key=ord)
        chars = self.chars + tuple(new)
        return Vocabulary(chars, [counts.get(c, 0) for c in chars], self.lowercase)

    @property
    def size(self) -> int:
        """Number of ids, the OOV id included."""
        return len(self.chars) + 1

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every id."""
        return smallest_dtype(self.size)

    def encode(self, text: str) -> np.ndarray:
        """Encodes text (already normalised) to ids of `self.dtype`; unknown chars -> 0."""
        if text.isascii():  # One lookup straight from the bytes.
            return self._ascii[np.frombuffer(text.encode("ascii"), np.uint8)]
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

    @functools.cached_property
    def pieces(self) -> tuple[bytes, ...]:
        """The UTF-8 bytes each id decodes to (U+FFFD for the out-of-vocabulary id)."""
        return ("\ufffd".encode(),) + tuple(c.encode() for c in self.chars)

    @functools.cached_property
    def token_chars(self) -> np.ndarray:
        """Characters each id covers: one each."""
        return np.ones(self.size, np.float32)

    def stream_decoder(self):
        """A `tokenization.StreamDecoder` over `pieces` (for one code path with the others)."""
        from trainer.data.tokenization import StreamDecoder  # It imports this module.

        return StreamDecoder(self.pieces)

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
