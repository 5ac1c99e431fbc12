"""Tests for trainer.input_pipeline: windows are exact slices, visited once, never leak."""

from __future__ import annotations

import collections
import logging
import random

import numpy as np
import pytest

from trainer import input_pipeline as ip
from trainer import vocabulary
from trainer.config import Config
from trainer.errors import UserError
from trainer.vocabulary import Vocabulary

ALPHABET = "abcdefghij klmnop\n\u00e9\u2603"


def _corpus(tmp_path, rng: random.Random, lengths: list[int]) -> list[str]:
    paths = []
    for i, n in enumerate(lengths):
        path = tmp_path / f"shard-{i:03d}.txt"
        path.write_text("".join(rng.choice(ALPHABET) for _ in range(n)), encoding="utf-8")
        paths.append(str(path))
    return paths


def _setup(paths, **overrides):
    cfg = Config(train_data=",".join(paths), job_dir="unused", **overrides).validate()
    scan = vocabulary.scan(paths)
    vocab = Vocabulary.from_counts(scan.counts)
    train, val = ip.make_regions(scan, None, cfg)
    return cfg, vocab, train, val


def _texts(paths) -> dict[str, str]:
    return {p: open(p, encoding="utf-8").read() for p in paths}


def _expected(regions, texts, window, shift) -> collections.Counter:
    out = collections.Counter()
    for r in regions:
        span = texts[r.path][r.begin:r.end]
        out.update(span[s:s + window] for s in range(0, len(span) - window + 1, shift))
    return out


def _windows(ds, vocab, objective="sequence") -> list[str]:
    """Reassembles each example into its window text, checking y against x."""
    out = []
    for x, y in ds:
        x, y = x.numpy(), y.numpy()
        if objective == "sequence":
            np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one.
            full = np.concatenate([x, y[:, -1:]], axis=1)
        else:
            full = np.concatenate([x, y[:, None]], axis=1)
        out.extend(vocab.decode(row) for row in full)
    return out


def _one_pass(cfg, vocab, regions, batch, shift, **kwargs):
    sharding = kwargs.pop("sharding", ip.Sharding())
    steps = ip.steps_per_pass(regions, cfg.window, shift, batch, 1, sharding)
    return ip.dataset(regions, vocab, cfg, batch_size=batch, shift=shift, steps=steps,
                      sharding=sharding, repeat=False, **kwargs), steps


@pytest.mark.parametrize("seed", range(6))
def test_every_window_is_a_slice_and_each_start_is_visited_once(tmp_path, seed):
    rng = random.Random(seed)
    paths = _corpus(tmp_path, rng, [rng.randint(0, 400) for _ in range(rng.randint(1, 5))] + [60])
    seq = rng.randint(3, 12)
    shift = rng.choice([1, 1, 2, 5])
    objective = rng.choice(["sequence", "last"])
    cfg, vocab, train, _ = _setup(paths, seq_length=seq, objective=objective,
                                  window_shift=shift, shard_cycle=rng.randint(1, 4), seed=seed)
    ds, _ = _one_pass(cfg, vocab, train, 1, cfg.shift)
    got = collections.Counter(_windows(ds, vocab, objective))
    # Equal multisets: every start once, nothing invented (so nothing spans two shards).
    assert got == _expected(train, _texts(paths), cfg.window, cfg.shift)


def test_no_training_window_touches_validation_chars(tmp_path):
    paths = _corpus(tmp_path, random.Random(1), [300, 250, 41])
    cfg, vocab, train, val = _setup(paths, seq_length=8, window_shift=1, val_fraction=0.2)
    texts = _texts(paths)
    assert len(train) == 3 and len(val) == 2  # The 41-char shard's 8-char tail is too short.
    for t, v in zip(train, val, strict=False):
        assert t.end == v.begin == len(texts[t.path]) - int(len(texts[t.path]) * 0.2)
    train_windows = collections.Counter(_windows(_one_pass(cfg, vocab, train, 1, 1)[0], vocab))
    assert train_windows == _expected(train, texts, cfg.window, 1)
    val_windows = collections.Counter(_windows(_one_pass(cfg, vocab, val, 1, 8, shuffle=False)[0],
                                               vocab))
    assert val_windows == _expected(val, texts, cfg.window, 8)


def test_batches_are_deterministic_per_seed_and_shuffled_per_pass(tmp_path):
    paths = _corpus(tmp_path, random.Random(2), [500, 500, 500])

    def first_batches(seed, start_step=0, n=6):
        cfg, vocab, train, _ = _setup(paths, seq_length=10, seed=seed, window_shift=3)
        steps = ip.steps_per_pass(train, cfg.window, cfg.shift, 8, 1, ip.Sharding())
        ds = ip.dataset(train, vocab, cfg, batch_size=8, shift=cfg.shift, steps=steps,
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


@pytest.mark.parametrize("shards", [5, 1])
def test_workers_read_disjoint_parts_that_cover_the_data(tmp_path, shards):
    paths = _corpus(tmp_path, random.Random(3), [120 + 7 * i for i in range(shards)])
    cfg, vocab, train, _ = _setup(paths, seq_length=6, window_shift=1)
    per_worker = []
    for worker in range(2):
        sharding = ip.Sharding(worker, 2)
        assert sharding.by_file(train) == (shards >= 2)
        mine = sharding.regions(train)
        offset, stride = sharding.window_stride(train)
        count = sum(len(range(offset, ip.num_windows(r.length, cfg.window, 1), stride))
                    for r in mine)
        ds = ip.dataset(train, vocab, cfg, batch_size=1, shift=1, steps=count,
                        sharding=sharding, repeat=False)
        per_worker.append(collections.Counter(_windows(ds, vocab)))
    assert per_worker[0] + per_worker[1] == _expected(train, _texts(paths), cfg.window, 1)
    # Both workers agree on a step count that neither overruns.
    steps = ip.steps_per_pass(train, cfg.window, 1, 4, 1, ip.Sharding(0, 2))
    assert steps == min(sum(c.values()) for c in per_worker) // 4


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
