"""Tests for trainer.data.vocabulary: decoding, counting, ids and the vocab.json round trip."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from trainer.data import index, vocabulary
from trainer.data.vocabulary import OOV_ID, Vocabulary
from trainer.errors import UserError


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _scan(paths):
    return index.build(paths, [], lowercase=False, piece_bytes=1 << 20)


def test_decode_counts_invalid_bytes_and_normalises_newlines():
    text, invalid = vocabulary.decode(b"ab\xff\xfec\r\nd\r\n")
    assert text == "ab\ufffd\ufffdc\nd\n"
    assert invalid == 2
    assert vocabulary.decode("Été".encode())[0] == "Été"
    assert vocabulary.decode(b"ABC", lowercase=True) == ("abc", 0)


def test_multibyte_char_is_one_token():
    vocab = Vocabulary.from_counts(vocabulary.count_chars("héllo ☃"))
    ids = vocab.encode("☃é")
    assert len(ids) == 2 and OOV_ID not in ids
    assert vocab.decode(ids) == "☃é"


def test_ids_are_stable_and_round_trip_through_json(tmp_path):
    a = _write(tmp_path, "a.txt", b"the cat sat\n")
    b = _write(tmp_path, "b.txt", "on the mat \u00e9\n".encode())
    vocab = Vocabulary.from_counts(_scan([a, b]).counts)
    again = Vocabulary.from_counts(_scan([b, a]).counts)
    assert vocab.chars == again.chars  # Shard order does not change ids.
    assert list(vocab.chars) == sorted(vocab.chars, key=ord)
    assert vocab.counts[vocab.chars.index("t")] == 5
    path = str(tmp_path / "vocab.json")
    vocab.save(path)
    loaded = Vocabulary.load(path)
    text = "the mat sat on the cat \u00e9"
    assert loaded == vocab
    np.testing.assert_array_equal(loaded.encode(text), vocab.encode(text))
    assert loaded.decode(loaded.encode(text)) == text


def test_unknown_chars_map_to_the_oov_id():
    vocab = Vocabulary(["a", "b"])
    assert vocab.encode("abzb\u2603").tolist() == [1, 2, OOV_ID, 2, OOV_ID]
    assert vocab.decode([1, OOV_ID, 2]) == "a\ufffdb"
    assert vocab.missing("abz\u2603z") == ["z", "\u2603"]


def test_smallest_dtype_holds_every_id():
    assert Vocabulary([chr(i) for i in range(32, 32 + 255)]).dtype == np.uint8
    big = Vocabulary([chr(i) for i in range(32, 32 + 256)])
    assert big.dtype == np.uint16
    assert big.encode(chr(32 + 255)).tolist() == [256]


def test_scan_reports_empty_invalid_and_binary_shards(tmp_path, caplog):
    paths = [_write(tmp_path, "ok.txt", b"hello world\n"),
             _write(tmp_path, "empty.txt", b""),
             _write(tmp_path, "bad.txt", b"caf\xe9 \x00\x01\x02")]
    with caplog.at_level(logging.WARNING):
        corpus = _scan(paths)
    assert [f.chars for f in corpus.files] == [12, 0, 8]
    assert corpus.files[2].invalid_bytes == 1 and corpus.files[2].nul_chars == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "1 empty training shard" in messages
    assert "invalid UTF-8" in messages
    assert "NUL bytes" in messages


def test_load_rejects_a_corrupt_vocab_file(tmp_path):
    path = _write(tmp_path, "vocab.json", b"{not json")
    with pytest.raises(UserError, match="not a valid vocabulary"):
        Vocabulary.load(path)


def test_extended_keeps_every_old_id_and_adds_new_chars_after_them():
    base = Vocabulary.from_counts(vocabulary.count_chars("the cat"))
    new = base.extended(vocabulary.count_chars("Zebra ate the cat!"))
    assert new.chars[:len(base.chars)] == base.chars  # Old ids keep their characters.
    assert new.chars[len(base.chars):] == ("!", "Z", "b", "r")  # Code-point order after them.
    assert list(new.encode("the cat")) == list(base.encode("the cat"))
    assert new.decode(new.encode("Zebra!")) == "Zebra!" and OOV_ID not in new.encode("Zebra!")
    assert Vocabulary.from_json(new.to_json()) == new  # Its order survives vocab.json.
    assert base.extended(vocabulary.count_chars("cat")) == base
    # 255 chars fill uint8's ids (with OOV); one more widens the dtype, ids unchanged.
    wide = Vocabulary([chr(0x100 + i) for i in range(255)])
    assert wide.dtype == np.uint8
    wider = wide.extended(vocabulary.count_chars("a"))
    assert wider.dtype == np.uint16 and wider.encode("a\u0100").tolist() == [256, 1]
