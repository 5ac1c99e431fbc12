"""Tests for trainer.data.tokenization: exact round trips, characters per token, streams,
the word vocabulary of a scan split among workers, and tokens counted per piece."""

from __future__ import annotations

import collections
import gzip
import os
import random
import time
from pathlib import Path

import pytest
from cluster import as_workers

from trainer.data import index, tokenization
from trainer.data.tokenization import UNK_ID, BpeTokenizer, WordTokenizer
from trainer.data.vocabulary import Vocabulary, count_chars
from trainer.errors import UserError

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 8 + (
        "Caf\u00e9 na\u00efve \u2014 don't  stop;\tthe end.\n")
# 1- to 4-byte UTF-8, combining marks, controls, CJK, emoji (with a joiner), \r\n.
WILD = ("h\u00e9llo \u4e16\u754c \U0001f389\U0001f468\u200d\U0001f469 e\u0301 \x00\x07 "
        "\u0645\u0631\u062d\u0628\u0627 \ud7ff\r\n\t  end \U0010ffff")


@pytest.fixture(scope="module")
def word() -> WordTokenizer:
    return WordTokenizer.from_counts(Vocabulary.from_counts(count_chars(TEXT)),
                                     tokenization.count_words(TEXT), 100)


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    return BpeTokenizer.train([TEXT], 300)


def test_the_word_rule_splits_every_character_into_exactly_one_token():
    for text in (TEXT, WILD, "", " ", "  a", "a  ", "\n\n\nb", "x,y", " ,"):
        assert "".join(tokenization.split_words(text)) == text
    assert tokenization.split_words("Speak, speak.\n\nAll:  no") == [
        "Speak", ",", " speak", ".", "\n\n", "All", ":", " ", " no"]


def test_a_word_tokenizer_round_trips_and_spells_unknown_words(word):
    assert word.size <= 100
    ids = word.encode(TEXT)
    assert word.decode(ids) == TEXT
    # A word outside the vocabulary: <unk>, then its characters' ids, still exact.
    text = "Speak, hurtle Citizen."
    ids = word.encode(text)
    assert word.decode(ids) == text
    assert word.unknown(ids) == 1 and UNK_ID in ids.tolist()
    unk = ids.tolist().index(UNK_ID)
    assert word.decode(ids[unk:unk + 8]) == " hurtle"
    # The most frequent words are whole tokens.
    assert len(word.encode(" speak")) == 1 and len(word.encode(" Citizen")) == 1
    # A character no training text held is the unknown-character id and decodes to U+FFFD.
    assert word.missing("Q\u4e16") == ["Q", "\u4e16"]
    assert word.decode(word.encode("\u4e16")) == "\ufffd"


def test_a_bpe_tokenizer_round_trips_any_utf8(bpe):
    assert bpe.size == 300
    rng = random.Random(3)
    samples = [TEXT, WILD, ""] + ["".join(chr(rng.choice([rng.randrange(32, 127),
                                                           rng.randrange(0x80, 0xD800),
                                                           rng.randrange(0xE000, 0x110000)]))
                                          for _ in range(200)) for _ in range(5)]
    for text in samples:
        ids = bpe.encode(text)
        assert 0 not in ids.tolist()  # Id 0 stays the never-drawn id.
        assert bpe.decode(ids) == text
    assert bpe.missing(WILD) == []
    assert len(bpe.encode(TEXT)) < 0.6 * len(TEXT)  # Merges learned from the text.


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_ids_cover_every_character_once_and_stream_decode_whole_characters(kind, word, bpe):
    tok = word if kind == "word" else bpe
    text = TEXT + (WILD if kind == "bpe" else " hurtle")
    ids = tok.encode(text)
    assert tok.token_chars[ids].sum() == len(text)
    stream = tok.stream_decoder()
    pieces = [stream.feed([i]) for i in ids.tolist()] + [stream.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)  # A character split across ids comes out whole.


def test_a_saved_tokenizer_loads_as_the_same_tokenizer(word, bpe, tmp_path):
    files = {tokenization.FILE: word.to_json()}
    again = tokenization.load("word", word.chars, files.get)
    assert again.encode(TEXT).tolist() == word.encode(TEXT).tolist()
    files = {tokenization.FILE: bpe.to_json()}
    again = tokenization.load("bpe", word.chars, files.get)
    assert again.encode(WILD).tolist() == bpe.encode(WILD).tolist()
    assert tokenization.load("char", word.chars, {}.get) is word.chars
    with pytest.raises(UserError, match="has no tokenizer.json"):
        tokenization.load("bpe", word.chars, {}.get, "job")
    with pytest.raises(UserError, match="not a valid"):
        tokenization.load("word", word.chars, {tokenization.FILE: "{"}.get, "job")


def test_max_vocab_smaller_than_the_characters_is_one_clear_error():
    chars = Vocabulary.from_counts(count_chars(TEXT))
    with pytest.raises(UserError, match="--max_vocab=10 is smaller"):
        WordTokenizer.from_counts(chars, collections.Counter(), 10)
    with pytest.raises(UserError, match="at least 258"):
        BpeTokenizer.train([TEXT], 100)


@pytest.mark.parametrize("n", [2, 3])
def test_the_word_exchange_is_exact_however_the_text_is_split(n):
    # Each worker's own top 4 are its private words; the job's most frequent word, " both",
    # is 5th on every worker; "," (one char) is never a word.
    shares = [collections.Counter({f" w{k}{i}": 100 - 10 * i for i in range(4)}
                                  | {" both": 60, ",": 500, f" rare{k}": 1})
              for k in range(n)]
    whole = sum(shares, collections.Counter())
    ranked = sorted((w for w in whole if len(w) > 1), key=lambda w: (-whole[w], w))
    assert ranked[0] == " both"
    alone = tokenization.exchange_words(whole, 4, 0, 1, lambda v: v)
    assert alone == collections.Counter({w: whole[w] for w in ranked[:4]})
    for found in as_workers(n, lambda w, combine: tokenization.exchange_words(
            shares[w], 4, w, n, combine)):
        assert all(found[w] == whole[w] for w in found) and "," not in found
        assert sorted(found, key=lambda w: (-found[w], w))[:4] == ranked[:4]


def test_two_workers_scan_the_same_word_vocabulary_and_token_counts_as_one(tmp_path):
    rng = random.Random(5)
    vocab_words = ["the", "king", "queen", "\u00e9t\u00e9", "speak", "lord", "a", "I"]
    paths = []
    for i, n in enumerate([3000, 700, 50]):
        words = [rng.choice(vocab_words) + rng.choice(["", "s", "ly"]) for _ in range(n)]
        text = "".join(w + rng.choice([" ", " ", ", ", ".\n", "\n\n"]) for w in words)
        path = tmp_path / f"f{i}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(str(path))

    def scan(worker, num_workers, combine):
        corpus = index.build(paths, [], lowercase=False, piece_bytes=512, worker=worker,
                             num_workers=num_workers, combine=combine, threads=2,
                             keep_words=40)
        tok = WordTokenizer.from_counts(Vocabulary.from_counts(corpus.counts), corpus.words,
                                        30)
        index.count_tokens(corpus, tok, worker=worker, num_workers=num_workers,
                           combine=combine)
        return corpus, tok

    alone, tok = scan(0, 1, lambda v: v)
    texts = [Path(p).read_text(encoding="utf-8") for p in paths]
    exact = collections.Counter()
    for info, text in zip(alone.files, texts, strict=True):  # Counted piece by piece.
        data = text.encode()
        for a, b, _ in info.pieces:
            exact.update(tokenization.count_words(data[a:b].decode()))
    assert len(alone.words) == min(40, len(exact))
    assert all(alone.words[w] == exact[w] for w in alone.words)
    for corpus, other in as_workers(2, lambda w, combine: scan(w, 2, combine)):
        assert other.words == tok.words  # The same vocabulary, in the same order.
        assert [f.tokens for f in corpus.files] == [f.tokens for f in alone.files]
    # Each piece's count is its text tokenized whole.
    for info, text in zip(alone.files, texts, strict=True):
        data = text.encode()
        assert info.tokens == [len(tok.encode(data[a:b].decode())) for a, b, _ in info.pieces]
        assert info.unknown_words == sum(tok.unknown(tok.encode(data[a:b].decode()))
                                         for a, b, _ in info.pieces)


@pytest.mark.parametrize("name", ["t.txt", "t.txt.gz"])
def test_counting_tokens_reads_the_file_the_scan_measured(tmp_path, bpe, name):
    path = tmp_path / name
    data = TEXT.encode()
    path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    corpus = index.build([str(path)], [], lowercase=False, piece_bytes=300)
    # The same length, other bytes, a later time: counted, it would be other text's count.
    other = data.swapcase()
    path.write_bytes(gzip.compress(other, mtime=0) if name.endswith(".gz") else other)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(UserError, match=f"{path} changed while the job read it"):
        index.count_tokens(corpus, bpe)


def test_regions_count_tokens_and_the_validation_tail_is_cut_in_tokens(tmp_path, bpe):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus = index.build([str(path)], [], lowercase=False, piece_bytes=300)
    index.count_tokens(corpus, bpe)
    tokens = sum(corpus.files[0].tokens)
    assert tokens == sum(len(bpe.encode(t)) for t in _pieces(str(path), corpus.files[0]))
    train, val = index.make_regions(corpus, 9, val_fraction=0.25)
    assert sum(r.length for r in train) + sum(r.length for r in val) <= tokens
    assert abs(sum(r.length for r in val) - tokens * 0.25) <= len(corpus.files[0].pieces)


def _pieces(path: str, info: index.FileInfo) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    return [data[a:b].decode() for a, b, _ in info.pieces]
