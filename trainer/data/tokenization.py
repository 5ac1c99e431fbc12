"""Tokenizers: characters (the default), words, or byte-level BPE subwords.

Every tokenizer maps normalised text (`vocabulary.normalise`) to ids and back, and
says how many characters of the text each id covers, so losses can be reported per
character of the text whatever the tokenizer. All three share the id conventions of
the character vocabulary: id 0 is never a target and never drawn (a character no
training text held), and an id decodes to a fixed byte string, so decoding is
concatenation and a stream decodes token by token (`pieces`, `stream_decoder`).

- `char` (`vocabulary.Vocabulary`): one id per Unicode code point.
- `word` (`WordTokenizer`): the text is split by `WORD_RULE`: a run of word
  characters (Python's Unicode `\\w`) with the one space before it, one other
  non-space character with the one space before it, a run of newlines, or any other
  single whitespace character. Every character belongs to exactly one token, so
  decoding gives the text back. The `--max_vocab` ids are: 0 (an unknown
  character), `<unk>`, every training character, then the most frequent tokens of
  two or more characters (at most `MAX_WORD_CHARS`; ties in code-point order). A
  token outside the vocabulary is written as `<unk>` followed by its characters,
  one id each: the model spells it, so an unknown word costs its `<unk>` plus the
  spelling, and the text still round-trips.
- `bpe` (`BpeTokenizer`): byte-level BPE from the `tokenizers` library, trained on
  the job's training text (on the chief, from at most `BPE_SAMPLE_BYTES` of it, whole
  pieces spread evenly over the corpus); no unknown token: any text encodes. Its ids
  are the library's plus one (id 0 stays the never-drawn id).

A job records its tokenizer in config.json (`tokenizer`) and, for word and bpe, in
`tokenizer.json` beside vocab.json; a job directory without the field is `char`.
"""

from __future__ import annotations

import codecs
import collections
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from trainer.data.vocabulary import OOV_ID, Vocabulary, smallest_dtype
from trainer.errors import UserError

KINDS = ("char", "word", "bpe")
FILE = "tokenizer.json"
UNK = "<unk>"
UNK_ID = 1  # Of a word tokenizer.
WORD_RULE = re.compile(r" ?\w+| ?[^\w\s]|\n+|\s")
MAX_WORD_CHARS = 32
BPE_SAMPLE_BYTES = 32 << 20
_FORMAT = 1


def split_words(text: str) -> list[str]:
    """The text's tokens by `WORD_RULE` (they join to the text)."""
    return WORD_RULE.findall(text)


def count_words(text: str) -> collections.Counter:
    """How often each candidate word (2 to MAX_WORD_CHARS chars, no NUL) occurs in `text`."""
    return collections.Counter(t for t in split_words(text)
                               if 1 < len(t) <= MAX_WORD_CHARS and "\0" not in t)


def lead_bytes(data: bytes) -> int:
    """Characters that begin in `data` (its bytes that are not UTF-8 continuation bytes)."""
    return sum(1 for b in data if b & 0xC0 != 0x80)


class _Tokens:
    """What word and bpe tokenizers share: pieces, per-id char counts, decoding."""

    kind = ""
    lowercase = False
    pieces: tuple[bytes, ...] = ()

    @property
    def size(self) -> int:
        return len(self.pieces)

    @property
    def dtype(self) -> np.dtype:
        return smallest_dtype(self.size)

    @functools.cached_property
    def token_chars(self) -> np.ndarray:
        """Characters of the text each id covers (a BPE id that ends inside a multi-byte
        character covers the characters that begin in it): sums to len(text)."""
        return np.array([lead_bytes(p) for p in self.pieces], np.float32)

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.pieces[i] if 0 <= i < self.size else self.pieces[OOV_ID]
                        for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.pieces)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        raise NotImplementedError


class StreamDecoder:
    """Decodes ids one batch at a time; a character split across ids comes out whole."""

    def __init__(self, pieces: Sequence[bytes]):
        self.pieces = pieces
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        return self._utf8.decode(b"".join(self.pieces[i] for i in ids))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class WordTokenizer(_Tokens):
    """Words, punctuation and whitespace by `WORD_RULE`; see the module docstring."""

    kind = "word"

    def __init__(self, chars: Vocabulary, words: Sequence[str],
                 counts: Sequence[int] | None = None):
        self.chars, self.words = chars, tuple(words)
        self.counts = tuple(counts) if counts is not None else (0,) * len(self.words)
        self.lowercase = chars.lowercase
        self.first_word = 2 + len(chars.chars)
        self._ids = {w: self.first_word + i for i, w in enumerate(self.words)}
        self._char_ids = {c: 2 + i for i, c in enumerate(chars.chars)}
        self.pieces = ((b"\xef\xbf\xbd", b"") + tuple(c.encode() for c in chars.chars)
                       + tuple(w.encode() for w in self.words))

    @classmethod
    def from_counts(cls, chars: Vocabulary, words: collections.Counter,
                    max_vocab: int) -> WordTokenizer:
        """The `max_vocab - 2 - len(chars)` most frequent words of `words` (count >= 2)."""
        room = max_vocab - 2 - len(chars.chars)
        if room < 0:
            raise UserError(f"--max_vocab={max_vocab} is smaller than the training text's "
                            f"{len(chars.chars)} distinct characters plus 2; raise it")
        ranked = sorted((w for w, n in words.items() if n >= 2 and is_word_candidate(w)),
                        key=lambda w: (-words[w], w))[:room]
        return cls(chars, ranked, [words[w] for w in ranked])

    def encode(self, text: str) -> np.ndarray:
        ids, chars = [], self._char_ids
        for token in split_words(text):
            found = self._ids.get(token)
            if found is not None:
                ids.append(found)
            elif len(token) == 1:
                ids.append(chars.get(token, OOV_ID))
            else:
                ids.append(UNK_ID)
                ids.extend(chars.get(c, OOV_ID) for c in token)
        return np.array(ids, self.dtype)

    def unknown(self, ids: np.ndarray) -> int:
        """Words of `ids` that are spelled out (their `<unk>` ids)."""
        return int(np.count_nonzero(ids == UNK_ID))

    def missing(self, text: str) -> list[str]:
        return self.chars.missing(text)

    def to_json(self) -> str:
        return json.dumps({"kind": "word", "format": _FORMAT, "rule": WORD_RULE.pattern,
                           "max_word_chars": MAX_WORD_CHARS, "unk": UNK,
                           "words": list(self.words), "counts": list(self.counts)},
                          ensure_ascii=True, indent=0) + "\n"


def _byte_symbols() -> dict[str, int]:
    """The byte-level alphabet: each byte's printable stand-in character -> the byte.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...)
    take the code points from 256 on, in byte order (the convention of byte-level BPE).
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in kept:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


_SURROGATES = re.compile("[\ud800-\udfff]")


def lone_surrogates(text: str) -> list[str]:
    """The distinct lone surrogates (U+D800-U+DFFF) in `text`, sorted: what undecodable
    bytes or half of a JSON escape leave, which are not characters and have no UTF-8."""
    return sorted(set(_SURROGATES.findall(text)), key=ord)


class BpeTokenizer(_Tokens):
    """Byte-level BPE (the `tokenizers` library); ids are the library's plus one."""

    kind = "bpe"

    def __init__(self, hf_json: str, lowercase: bool = False):
        from tokenizers import Tokenizer

        self.hf_json, self.lowercase = hf_json, lowercase
        try:
            self.hf = Tokenizer.from_str(hf_json)
        except Exception as err:  # The library raises its own exception types.
            raise UserError(f"not a valid BPE tokenizer file: {err}") from err
        symbols = _byte_symbols()
        vocab = self.hf.get_vocab()
        pieces = [b""] * len(vocab)
        for token, i in vocab.items():
            pieces[i] = bytes(symbols[c] for c in token)
        self.pieces = (b"\xef\xbf\xbd",) + tuple(pieces)

    @classmethod
    def train(cls, texts: Iterable[str], max_vocab: int, lowercase: bool = False
              ) -> BpeTokenizer:
        """Learns `max_vocab - 1` byte-level tokens (256 bytes and the merges) from `texts`."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if max_vocab < 258:
            raise UserError(f"--max_vocab must be at least 258 for --tokenizer=bpe (256 bytes, "
                            f"one merge and the unused id 0), got {max_vocab}")
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=max_vocab - 1, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[])
        hf.train_from_iterator(texts, trainer)
        return cls(hf.to_str(), lowercase)

    def encode(self, text: str) -> np.ndarray:
        """Any text's ids; a lone surrogate (not a character, so no UTF-8 bytes) is refused."""
        lone = self.missing(text)
        if lone:
            raise UserError(f"the text holds {len(lone)} lone surrogate(s) ("
                            + ", ".join(repr(c) for c in lone[:5])
                            + "): not characters, so not text a byte-level BPE can encode")
        ids = np.asarray(self.hf.encode(text, add_special_tokens=False).ids, np.int64) + 1
        return ids.astype(self.dtype)

    def unknown(self, ids: np.ndarray) -> int:
        return 0

    def missing(self, text: str) -> list[str]:
        """Only lone surrogates (U+D800-U+DFFF, from undecodable bytes or a JSON escape):
        every character has UTF-8 bytes, they have none."""
        return lone_surrogates(text)

    def to_json(self) -> str:
        return self.hf_json


Tokenizer = Vocabulary | WordTokenizer | BpeTokenizer


def chars_table(tokenizer: Tokenizer) -> np.ndarray | None:
    """Characters each id covers, for `models.loss_sums`; None for chars (one each)."""
    return None if tokenizer.kind == "char" else tokenizer.token_chars


def unknown_ids(tokenizer: Tokenizer, ids: np.ndarray) -> int:
    """Unknown words among `ids` (word tokenizers; 0 for the others)."""
    return tokenizer.unknown(ids) if isinstance(tokenizer, WordTokenizer) else 0


def load(kind: str, chars: Vocabulary, read: Callable[[str], str | None],
         where: str = "the job directory") -> Tokenizer:
    """The tokenizer a job recorded: `chars` itself for char, else tokenizer.json.

    Args:
      kind: the job config's `tokenizer` ("char" for a config without one).
      chars: the job's character vocabulary (vocab.json).
      read: reads a file of the job directory by name (None when it is missing).
      where: names the directory in errors.
    """
    if kind == "char":
        return chars
    text = read(FILE)
    if text is None:
        raise UserError(f"{where} records --tokenizer={kind} but has no {FILE}")
    return from_json(kind, text, chars, where)


def from_json(kind: str, text: str, chars: Vocabulary, where: str = "") -> Tokenizer:
    if kind == "bpe":
        return BpeTokenizer(text, chars.lowercase)
    if kind != "word":
        raise UserError(f"unknown tokenizer {kind!r} in {where or 'the job'}")
    try:
        data = json.loads(text)
        if data.get("rule") != WORD_RULE.pattern:
            raise UserError(f"{FILE} in {where} was made with another word rule "
                            f"({data.get('rule')!r})")
        return WordTokenizer(chars, data["words"], data.get("counts"))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{FILE} in {where} is not a valid word tokenizer: {err}") from err


def share_text(text: str, is_chief: bool, num_workers: int, combine) -> str:
    """The chief's `text` on every worker, through two sums over the workers."""
    if num_workers == 1:
        return text
    data = np.frombuffer(text.encode(), np.uint8) if is_chief else np.zeros(0, np.uint8)
    size = int(combine(np.array([float(len(data))]))[0])
    everyone = np.zeros(size)
    everyone[:len(data)] = data
    return bytes(combine(everyone).astype(np.uint8)).decode()


def is_word_candidate(token: str) -> bool:
    """Whether a token may be a word of the vocabulary: two to `MAX_WORD_CHARS` chars."""
    return 1 < len(token) <= MAX_WORD_CHARS


def _union(mine: Sequence[str], worker: int, num_workers: int, combine) -> list[str]:
    """Every worker's `mine`, joined and sorted, on every worker (two sums: the sizes,
    then the bytes, each worker adding its own at its own place)."""
    blob = np.frombuffer("\0".join(mine).encode(), np.uint8)
    sizes = np.zeros(num_workers)
    sizes[worker] = len(blob)
    sizes = combine(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    everyone = np.zeros(int(offsets[-1]))
    everyone[offsets[worker]:offsets[worker] + len(blob)] = blob
    everyone = combine(everyone)
    return sorted({w for part in np.split(everyone.astype(np.uint8), offsets[1:-1])
                   for w in bytes(part).decode().split("\0") if w})


def _total(words: collections.Counter, union: Sequence[str], combine
           ) -> collections.Counter:
    """Each word of `union` with its count summed over the workers (one sum)."""
    counts = combine(np.array([words.get(w, 0) for w in union], np.float64))
    return collections.Counter(dict(zip(union, counts.astype(np.int64).tolist(), strict=True)))


def exchange_words(words: collections.Counter, keep: int, worker: int, num_workers: int,
                   combine) -> collections.Counter:
    """Combined counts that hold, exactly, the job's `keep` most frequent candidate words.

    Only words (`is_word_candidate`) take part. A threshold algorithm in two rounds, each
    of a union (two sums over the workers) and a count (one more): first every worker
    offers its own `keep` most frequent words, which gives their totals; the `keep`-th
    largest of those totals, T, is a floor under the job's true `keep`-th count. A word
    whose total reaches T has at least T / num_workers on some worker, so second every
    worker offers its other words with at least that many, and their totals join the
    first. Every word whose total reaches T is then present with its exact count: the
    job's top `keep` (ties included) are what one worker alone would find, however the
    text is split among the workers.

    Args:
      words: this worker's counts.
      keep: the words that must come out exact.
      worker, num_workers: this worker's place.
      combine: sums a float64 array over the workers (identity for one).

    Returns:
      Word -> count over all workers, for the offered words (a superset of the top `keep`).
    """
    candidates = [w for w in words if is_word_candidate(w)]
    mine = sorted(candidates, key=lambda w: (-words[w], w))[:keep]
    if num_workers == 1:
        return collections.Counter({w: words[w] for w in mine})
    found = _total(words, _union(mine, worker, num_workers, combine), combine)
    # The same on every worker (the totals are sums), so every worker takes part in the
    # second round's sums even when it has nothing to offer.
    totals = sorted(found.values(), reverse=True)
    floor = (totals[keep - 1] if len(totals) >= keep else 2) / num_workers
    more = [w for w in candidates if words[w] >= floor and w not in found]
    found.update(_total(words, _union(more, worker, num_workers, combine), combine))
    return found
