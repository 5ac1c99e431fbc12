"""Tests for trainer.data.window_pipeline: windows are exact slices, visited once, never leak,
over pieces of any file, for any number of workers."""

from __future__ import annotations

import collections
import gzip
import logging
import os
import random
import time

import numpy as np
import pytest

from trainer.config import Config
from trainer.data import index, window_pipeline
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError

ALPHABET = "abcdefghij klmnop\n\u00e9\u2603"


def _corpus(tmp_path, rng: random.Random, lengths: list[int]) -> list[str]:
    paths = []
    for i, n in enumerate(lengths):
        path = tmp_path / f"shard-{i:03d}.txt"
        path.write_text("".join(rng.choice(ALPHABET) for _ in range(n)), encoding="utf-8")
        paths.append(str(path))
    return paths


def _setup(paths, piece_bytes=1 << 20, **overrides):
    cfg = Config(train_data=",".join(paths), job_dir="unused", **overrides).validate()
    corpus = index.build(paths, [], lowercase=False, piece_bytes=piece_bytes)
    vocab = Vocabulary.from_counts(corpus.counts)
    train, val = index.make_regions(corpus, cfg.window, cfg.val_fraction)
    return cfg, vocab, train, val


def _texts(paths) -> dict[str, str]:
    return {p: open(p, encoding="utf-8").read() for p in paths}


def _expected(regions, texts, window, shift) -> collections.Counter:
    out = collections.Counter()
    for r in regions:
        span = texts[r.path][r.offset + r.begin:r.offset + r.end]
        out.update(span[s:s + window] for s in range(0, len(span) - window + 1, shift))
    return out


def _windows(ds, vocab, objective="sequence") -> list[str]:
    """Reassembles each example into its window text, checking y against x."""
    out = []
    for x, y in ds:
        x, y = x.numpy(), y.numpy()
        assert (y >= 0).all()  # No padding in a pass of full batches.
        if objective == "sequence":
            np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one.
            full = np.concatenate([x, y[:, -1:]], axis=1)
        else:
            full = np.concatenate([x, y[:, None]], axis=1)
        out.extend(vocab.decode(row) for row in full)
    return out


def _one_pass(cfg, vocab, regions, batch, shift, **kwargs):
    sharding = kwargs.pop("sharding", window_pipeline.Sharding())
    steps = window_pipeline.steps_per_pass(regions, cfg.window, shift, batch, 1, sharding)
    return window_pipeline.dataset(regions, vocab, cfg, batch_size=batch, shift=shift, steps=steps,
                      sharding=sharding, repeat=False, **kwargs), steps


@pytest.mark.parametrize("seed", range(6))
def test_every_window_is_a_slice_and_each_start_is_visited_once(tmp_path, seed):
    rng = random.Random(seed)
    paths = _corpus(tmp_path, rng, [rng.randint(0, 400) for _ in range(rng.randint(1, 5))] + [60])
    seq = rng.randint(3, 12)
    shift = rng.choice([1, 1, 2, 5])
    objective = rng.choice(["sequence", "last"])
    cfg, vocab, train, _ = _setup(paths, piece_bytes=rng.choice([64, 100, 1 << 20]),
                                  seq_length=seq, objective=objective, window_shift=shift,
                                  shard_cycle=rng.randint(1, 4), seed=seed)
    ds, _ = _one_pass(cfg, vocab, train, 1, cfg.shift)
    got = collections.Counter(_windows(ds, vocab, objective))
    # Equal multisets: every start once, nothing invented (so nothing spans two pieces).
    assert got == _expected(train, _texts(paths), cfg.window, cfg.shift)


def test_no_training_window_touches_validation_chars(tmp_path):
    paths = _corpus(tmp_path, random.Random(1), [300, 250, 41])
    cfg, vocab, train, val = _setup(paths, seq_length=8, window_shift=1, val_fraction=0.2)
    texts = _texts(paths)
    assert len(train) == 3 and len(val) == 2  # The 41-char shard's 8-char tail is too short.
    for t, v in zip(train, val, strict=False):
        assert t.end == v.begin == len(texts[t.path]) - int(len(texts[t.path]) * 0.2)
        assert t.offset == v.offset == 0
    train_windows = collections.Counter(_windows(_one_pass(cfg, vocab, train, 1, 1)[0], vocab))
    assert train_windows == _expected(train, texts, cfg.window, 1)
    val_windows = collections.Counter(_windows(_one_pass(cfg, vocab, val, 1, 8, shuffle=False)[0],
                                               vocab))
    assert val_windows == _expected(val, texts, cfg.window, 8)


def test_batches_are_deterministic_per_seed_and_shuffled_per_pass(tmp_path):
    paths = _corpus(tmp_path, random.Random(2), [500, 500, 500])

    def first_batches(seed, start_step=0, n=6):
        cfg, vocab, train, _ = _setup(paths, seq_length=10, seed=seed, window_shift=3)
        steps = window_pipeline.steps_per_pass(train, cfg.window, cfg.shift, 8, 1,
                                               window_pipeline.Sharding())
        ds = window_pipeline.dataset(train, vocab, cfg, batch_size=8, shift=cfg.shift, steps=steps,
                        start_step=start_step)
        return [x.numpy() for x, _ in ds.take(n)], steps

    a, steps = first_batches(7, n=2 * steps_guess(paths))
    b, _ = first_batches(7, n=len(a))
    c, _ = first_batches(8, n=len(a))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not all((x == y).all() for x, y in zip(a, c, strict=True))
    # The second pass is another order of the same windows.
    assert not all((x == y).all() for x, y in zip(a[:steps], a[steps:2 * steps], strict=True))
    # Resuming at step k gives the batches an unbroken run gives from step k.
    resumed, _ = first_batches(7, start_step=steps + 2, n=3)
    for x, y in zip(resumed, a[steps + 2:steps + 5], strict=True):
        np.testing.assert_array_equal(x, y)


def steps_guess(paths) -> int:
    return sum((len(open(p).read()) - 11) // 3 + 1 for p in paths) // 8


def test_a_batch_mixes_several_shards(tmp_path):
    paths = []
    for letter in "abcd":
        path = tmp_path / f"{letter}.txt"
        path.write_text(letter * 2000)
        paths.append(str(path))
    cfg, vocab, train, _ = _setup(paths, seq_length=10, window_shift=10, shard_cycle=4)
    ds, _ = _one_pass(cfg, vocab, train, 16, cfg.shift)
    x, _ = next(iter(ds))
    assert len({vocab.decode(row[:1]) for row in x.numpy()}) == 4


def test_one_file_mixes_as_many_pieces_per_batch_as_the_cycle(tmp_path):
    """A single-file corpus: each batch draws from --shard_cycle distinct pieces."""
    path = tmp_path / "one.txt"
    path.write_text("".join(chr(48 + i) * 1000 for i in range(40)))  # 40 runs of 1000.
    cfg, vocab, train, _ = _setup([str(path)], piece_bytes=1000, seq_length=9,
                                  shard_cycle=6)
    assert len(train) == 40
    seen = [len({vocab.decode(row[:1]) for row in x.numpy()})
            for x, _ in _one_pass(cfg, vocab, train, 24, cfg.shift)[0]]
    # Until the pass's last pieces drain, every batch holds windows of 6 pieces.
    assert min(seen[:len(seen) * 3 // 4]) >= 6 and len(seen) > 100


@pytest.mark.parametrize("workers", [2, 3])
def test_one_file_split_among_workers_covers_every_window_once(tmp_path, workers):
    paths = _corpus(tmp_path, random.Random(3), [2000])
    cfg, vocab, train, _ = _setup(paths, piece_bytes=200, seq_length=6, window_shift=1)
    per_worker = []
    for worker in range(workers):
        sharding = window_pipeline.Sharding(worker, workers)
        count = window_pipeline.windows_per_worker(train, cfg.window, 1, workers)[worker]
        ds = window_pipeline.dataset(train, vocab, cfg, batch_size=1, shift=1, steps=count,
                        sharding=sharding, repeat=False)
        per_worker.append(collections.Counter(_windows(ds, vocab)))
    assert sum(per_worker, collections.Counter()) == _expected(train, _texts(paths), cfg.window, 1)
    sizes = [sum(c.values()) for c in per_worker]
    assert max(sizes) - min(sizes) <= 1
    # All workers take the same steps; a pass leaves out less than one global batch.
    steps = window_pipeline.steps_per_pass(train, cfg.window, 1, 4, 1,
                                           window_pipeline.Sharding(0, workers))
    assert 0 <= sum(sizes) - steps * 4 * workers < 4 * workers + workers


def test_evaluation_pads_uneven_shares_so_each_window_counts_once(tmp_path):
    paths = _corpus(tmp_path, random.Random(8), [511])
    cfg, vocab, train, _ = _setup(paths, seq_length=8, window_shift=8)
    counts = window_pipeline.windows_per_worker(train, cfg.window, 8, 2)
    assert counts[0] != counts[1]  # 63 windows over 2 workers, in batches of 5 x 2 replicas.
    steps = -(-max(counts) // 10)
    got = collections.Counter()
    for worker in range(2):
        ds = window_pipeline.dataset(train, vocab, cfg, batch_size=5, shift=8, steps=steps,
                        replicas_per_worker=2, sharding=window_pipeline.Sharding(worker, 2),
                        shuffle=False,
                        repeat=False)
        batches = list(ds)
        assert len(batches) == steps * 2
        for x, y in batches:
            x, y = x.numpy(), y.numpy()
            real = (y >= 0).all(axis=1)
            assert ((y < 0).all(axis=1) | real).all()  # A row is all target or all padding.
            full = np.concatenate([x, y[:, -1:]], axis=1)[real]
            got.update(vocab.decode(row) for row in full)
    assert got == _expected(train, _texts(paths), cfg.window, 8)


def test_resume_mid_pass_skips_without_reading_what_came_before(tmp_path, monkeypatch):
    paths = _corpus(tmp_path, random.Random(9), [3000])
    cfg, vocab, train, _ = _setup(paths, piece_bytes=300, seq_length=9, shard_cycle=3)
    steps = window_pipeline.steps_per_pass(train, cfg.window, cfg.shift, 4, 1,
                                           window_pipeline.Sharding())
    whole = [x.numpy() for x, _ in window_pipeline.dataset(train, vocab, cfg, batch_size=4,
                                                           shift=10,
                                              steps=steps, repeat=False)]
    loaded = []
    real = window_pipeline.load_region_ids
    monkeypatch.setattr(window_pipeline, "load_region_ids",
                        lambda r, *a, **k: loaded.append(r) or real(r, *a, **k))
    at = steps - 3
    rest = [x.numpy() for x, _ in window_pipeline.dataset(train, vocab, cfg, batch_size=4, shift=10,
                                             steps=steps, start_step=at, repeat=False)]
    assert len(rest) == 3
    for a, b in zip(rest, whole[at:], strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(loaded) <= 3 + 1  # The cycle's pieces, not the pass's ten.


def test_a_gzip_shard_gives_the_windows_of_its_text(tmp_path):
    import gzip

    paths = _corpus(tmp_path, random.Random(10), [1500])
    packed = tmp_path / "packed.txt.gz"
    with gzip.open(packed, "wb") as f:
        f.write(_texts(paths)[paths[0]].encode())
    cfg, vocab, train, _ = _setup([str(packed)], piece_bytes=256, seq_length=7, window_shift=3)
    assert len(train) > 3 and all(r.compressed for r in train)
    got = collections.Counter(_windows(_one_pass(cfg, vocab, train, 2, 3)[0], vocab))
    texts = {str(packed): _texts(paths)[paths[0]]}
    assert got == _expected(train, texts, cfg.window, 3)


def test_short_and_empty_shards_are_skipped_with_a_warning(tmp_path, caplog):
    paths = _corpus(tmp_path, random.Random(4), [200, 5, 0])
    with caplog.at_level(logging.WARNING):
        _, _, train, _ = _setup(paths, seq_length=10)
    assert [r.path for r in train] == [paths[0]]
    assert "shorter than one window" in caplog.text


def test_a_corpus_shorter_than_one_window_stops(tmp_path):
    paths = _corpus(tmp_path, random.Random(5), [30, 0])
    with pytest.raises(UserError, match="no training shard holds one window of 101 chars"):
        _setup(paths)
    with pytest.raises(UserError, match="2 shard"):
        _setup(paths)


def test_binary_bytes_and_one_long_line_work(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 40)
    line = tmp_path / "line.txt"
    line.write_text("x y z " * 400_000)  # 2.4 MB without a newline.
    cfg, vocab, train, _ = _setup([str(blob), str(line)], seq_length=50)
    ds, steps = _one_pass(cfg, vocab, train, 64, cfg.shift)
    assert sum(1 for _ in ds) == steps > 700


@pytest.mark.parametrize("rewrite", ["shorter", "same length", "gzip, same length"])
def test_a_shard_rewritten_while_the_job_reads_it_is_one_clear_line(tmp_path, rewrite):
    from trainer import errors

    paths = _corpus(tmp_path, random.Random(11), [1500, 900])
    if rewrite.startswith("gzip"):
        for i, path in enumerate(paths):
            with open(path, "rb") as f:
                data = f.read()
            os.remove(path)
            paths[i] = path + ".gz"
            with open(paths[i], "wb") as f:
                f.write(gzip.compress(data, mtime=0))
    cfg, vocab, train, _ = _setup(paths, piece_bytes=256, seq_length=7)
    with open(paths[1], "r+b") as f:  # Rewritten after the scan.
        if rewrite == "shorter":
            f.truncate(600)
        elif rewrite == "same length":  # Other text, which would otherwise train unnoticed.
            data = f.read()
            f.seek(0)
            f.write(data[::-1])
        else:
            data = gzip.decompress(f.read())
            f.seek(0)
            f.truncate()
            f.write(gzip.compress(data[::-1], mtime=0))
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    ds, _ = _one_pass(cfg, vocab, train, 2, cfg.window)
    with pytest.raises(Exception) as caught:  # Whatever tf.data hands on.
        _windows(ds, vocab)
    line = errors.describe(caught.value)
    assert line is not None and "\n" not in line, caught.value
    assert line.startswith(f"{paths[1]} changed while the job read it (bytes ")
    assert line.endswith("leave the data unchanged while a job runs, and rerun it to rescan")
