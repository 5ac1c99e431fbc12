"""Tests for trainer.data.index: cuts on character boundaries, a scan split among workers,
range reads only, .gz streams, and the shards.json record."""

from __future__ import annotations

import collections
import gzip
import os
import random
import time

import numpy as np
import pytest
from cluster import as_workers

from trainer import gcs, storage
from trainer.data import excerpt, index, scan, vocabulary
from trainer.errors import UserError

# 1-, 2-, 3- and 4-byte UTF-8 characters, and \r\n pairs that a cut must not split.
MIXED = ["a", "b", " ", "\n", "\r\n", "\u00e9", "\u00df", "\u2603", "\u6f22", "\U0001f600"]


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(MIXED) for _ in range(n))


def _decoded_pieces(path: str, info: index.FileInfo) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    return [vocabulary.decode(data[a:b])[0] for a, b, _ in info.pieces]


@pytest.mark.parametrize("seed", range(5))
def test_pieces_cut_on_character_boundaries_and_decode_to_the_whole_text(tmp_path, seed):
    rng = random.Random(seed)
    text = _text(rng, rng.randint(200, 2000))
    path = tmp_path / "one.txt"
    path.write_bytes(text.encode())
    piece_bytes = rng.choice([64, 65, 100, 333])
    corpus = index.build([str(path)], [], lowercase=False, piece_bytes=piece_bytes)
    info = corpus.files[0]
    pieces = _decoded_pieces(str(path), info)
    whole = vocabulary.decode(text.encode())[0]
    assert "".join(pieces) == whole  # No char split, nothing twice, \r\n kept whole.
    assert [len(p) for p in pieces] == [c for _, _, c in info.pieces]
    assert all("\ufffd" not in p for p in pieces)
    data = text.encode()
    for start, stop, _ in info.pieces:
        assert start == 0 or data[start] & 0xC0 != 0x80
        assert stop - start <= piece_bytes + 4
    assert [b for _, b, _ in info.pieces[:-1]] == [a for a, _, _ in info.pieces[1:]]
    assert corpus.counts == collections.Counter(whole)
    assert corpus.bytes_read == len(data)


def test_the_histogram_counts_in_linear_time_any_vocabulary():
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000)) * 3 + "ab"
    hist = vocabulary.char_histogram(text)
    assert len(hist) == 0x4E00 + 3000 and hist[0x4E00] == 3 and hist[ord("a")] == 1
    assert vocabulary.count_chars(text) == collections.Counter(text)


def _scan_as_workers(paths, val, n, piece_bytes, monkeypatch):
    """Scans with n workers in threads; returns their indexes."""
    return as_workers(n, lambda w, combine: index.build(
        paths, val, lowercase=False, piece_bytes=piece_bytes, worker=w, num_workers=n,
        combine=combine, threads=2))


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_workers_each_read_half_and_agree_on_the_index(tmp_path, where, request,
                                                           monkeypatch):
    rng = random.Random(7)
    root = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_bucket")()
    paths = []
    for name, n in [("big.txt", 6000), ("small.txt", 300)]:
        path = storage.join(root, name)
        storage.write_bytes(path, _text(rng, n).encode())
        paths.append(path)
    val = storage.join(root, "val.txt")
    storage.write_bytes(val, _text(rng, 500).encode())
    alone = index.build(paths, [val], lowercase=False, piece_bytes=1024)
    both = _scan_as_workers(paths, [val], 2, 1024, monkeypatch)
    for corpus in both:
        assert corpus.files == alone.files
        np.testing.assert_array_equal(corpus.histogram, alone.histogram)
    total = sum(storage.size(p) for p in paths + [val])
    assert sum(i.bytes_read for i in both) == total
    assert max(i.bytes_read for i in both) <= total / 2 + 16  # Half, give or take a cut.
    # The validation file's chars are indexed but not counted for the vocabulary.
    train_text = "".join(vocabulary.decode(storage.read_bytes(p))[0] for p in paths)
    assert alone.counts == collections.Counter(train_text)


@pytest.mark.parametrize("seed", range(4))
def test_any_number_of_workers_finds_the_same_pieces(tmp_path, seed, monkeypatch):
    """Shares end inside pieces, next to multi-byte chars and \\r\\n: all must agree."""
    rng = random.Random(seed)
    paths = []
    for i in range(rng.randint(1, 3)):
        path = tmp_path / f"f{i}.txt"
        path.write_bytes(_text(rng, rng.randint(0, 900)).encode())
        paths.append(str(path))
    piece_bytes = rng.choice([64, 97, 256])
    alone = index.build(paths, [], lowercase=False, piece_bytes=piece_bytes)
    for n in (2, 3):
        for corpus in _scan_as_workers(paths, [], n, piece_bytes, monkeypatch):
            assert corpus.files == alone.files
            np.testing.assert_array_equal(corpus.histogram, alone.histogram)


def test_a_gzip_file_streams_into_the_same_pieces_of_text(tmp_path):
    text = _text(random.Random(3), 5000)
    plain, packed = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    plain.write_bytes(text.encode())
    with gzip.open(packed, "wb") as f:
        f.write(text.encode())
    corpus = index.build([str(plain), str(packed)], [], lowercase=False, piece_bytes=700)
    a, b = corpus.files
    assert b.compressed and not a.compressed
    assert a.chars == b.chars == len(vocabulary.decode(text.encode())[0])
    assert len(b.pieces) > 5
    train, _ = index.make_regions(corpus, 10)
    texts = collections.defaultdict(str)
    with scan.open_compressed(str(packed)) as stream:
        for r in train:
            texts[r.path] += scan.read_text(r, False, stream if r.compressed else None)
    assert texts[str(plain)] == texts[str(packed)] == vocabulary.decode(text.encode())[0]


def test_a_byte_order_mark_at_a_files_start_is_neither_text_nor_vocabulary(tmp_path,
                                                                            monkeypatch):
    # Plain and gzip, one piece and several, one worker and three: the mark is skipped
    # and the text after it is whole; a U+FEFF inside the text stays a character.
    text = _text(random.Random(5), 400) + "\ufeff" + _text(random.Random(6), 300)
    plain, packed, bare = tmp_path / "a.txt", tmp_path / "b.txt.gz", tmp_path / "c.txt"
    plain.write_bytes(scan.BOM + text.encode())
    with gzip.open(packed, "wb") as f:
        f.write(scan.BOM + text.encode())
    bare.write_bytes(scan.BOM)
    paths = [str(plain), str(packed), str(bare)]
    whole = vocabulary.decode(text.encode())[0]
    for piece_bytes in (64, 97, 4096):
        corpus = index.build(paths, [], lowercase=False, piece_bytes=piece_bytes)
        a, b, c = corpus.files
        assert a.pieces[0][0] == b.pieces[0][0] == 3 and c.chars == 0
        assert a.chars == b.chars == len(whole)
        assert "".join(_decoded_pieces(str(plain), a)) == whole
        assert corpus.counts == collections.Counter(whole + whole)
        train, _ = index.make_regions(corpus, 10)
        with scan.open_compressed(str(packed)) as stream:
            for path in (str(plain), str(packed)):
                assert "".join(scan.read_text(r, False, stream if r.compressed else None)
                               for r in train if r.path == path) == whole
        for n in (2, 3):
            for other in _scan_as_workers(paths, [], n, piece_bytes, monkeypatch):
                assert other.files == corpus.files
    # A prompt read from a file's start (a job dir without its index) skips it too.
    for path in (plain, packed):
        assert excerpt.snippet(str(path), 1000, False, random.Random(0)) == whole


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
def test_reads_are_pinned_to_the_file_the_scan_measured(tmp_path, name):
    # Same length, other bytes: a read after the rewrite is an error, not other text.
    path = tmp_path / name
    write = (lambda p, d: p.write_bytes(gzip.compress(d, mtime=0))) if name.endswith(
        ".gz") else (lambda p, d: p.write_bytes(d))
    write(path, b"abcdefgh" * 40)
    corpus = index.build([str(path)], [], lowercase=False, piece_bytes=64)
    train, _ = index.make_regions(corpus, 4)
    assert scan.read_text(train[1], False) == "abcdefgh" * 8
    write(path, b"ABCDEFGH" * 40)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(UserError, match=f"{path} changed while the job read it .*differs from "
                                        "the scan's.*rerun it to rescan"):
        scan.read_text(train[1], False)
    path.unlink()
    with pytest.raises(UserError, match="changed while the job read it"):
        scan.read_text(train[1], False)


def test_a_bucket_read_asks_for_the_generation_it_scanned(gcs_bucket):
    path = f"{gcs_bucket()}/a.txt"
    storage.write_bytes(path, b"abcdefgh" * 40)
    corpus = index.build([path], [], lowercase=False, piece_bytes=64)
    train, _ = index.make_regions(corpus, 4)
    size, generation = storage.stat(path)
    assert train[1].version == f"{size}:{generation}"
    # The emulator serves the live object whatever generation is asked for; a bucket
    # answers 404 once that generation is replaced. What is asked for is checked here.
    assert storage._pinned_blob(gcs.parse(path), train[1].version).generation == int(generation)
    assert scan.read_text(train[1], False) == "abcdefgh" * 8
    assert storage.read_range(path, 0, 4, train[1].version) == b"abcd"
    storage.delete(path)
    with pytest.raises(UserError, match="changed while the job read it"):
        scan.read_text(train[1], False)


def test_a_corrupt_gzip_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"this is not gzip at all")
    with pytest.raises(UserError, match="not a readable gzip file"):
        index.build([str(bad)], [], lowercase=False, piece_bytes=64)


def test_the_record_round_trips_and_is_ignored_for_another_piece_size(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n" * 50)
    corpus = index.build([str(path)], [], lowercase=False, piece_bytes=128)
    text = index.record(corpus, False, 128)
    assert index.read_record(text, False, 128) == {str(path): corpus.files[0]}
    assert index.read_record(text, False, 256) == {}
    assert index.read_record(text, True, 128) == {}
    assert index.read_record("{broken", False, 128) == {}
    again = index.build([str(path)], [], lowercase=False, piece_bytes=128,
                              known=index.read_record(text, False, 128))
    assert again.reused == 1 and again.bytes_read == 0 and again.files == corpus.files


def test_val_fraction_cuts_the_tail_of_each_file_inside_a_piece(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(1000)))
    corpus = index.build([str(path)], [], lowercase=False, piece_bytes=300)
    train, val = index.make_regions(corpus, 5, val_fraction=0.25)
    assert sum(r.length for r in train) == 750 and sum(r.length for r in val) == 250
    assert max(r.offset + r.end for r in train) == min(r.offset + r.begin for r in val) == 750


def test_prompts_and_samples_read_one_small_range(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("0123456789" * 10_000)
    corpus = index.build([str(path)], [], lowercase=False, piece_bytes=50_000)
    train, _ = index.make_regions(corpus, 10)
    reads = []
    real = storage.read_range
    monkeypatch.setattr(storage, "read_range",
                        lambda p, a, b, *v: reads.append(b - a) or real(p, a, b, *v))
    monkeypatch.setattr(storage, "read_bytes", lambda p: pytest.fail("read a whole file"))
    assert excerpt.read_tokens(train[0], 0, 20, False) == "01234567890123456789"
    assert reads == [20 * 4 + 4]
    assert excerpt.read_tokens(train[1], 3, 4, False) == "3456"
    assert reads[1] <= 50_000 + 8
