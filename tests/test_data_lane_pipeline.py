"""Tests for trainer.data.lane_pipeline: contiguous lanes, exact slices, resumable."""

from __future__ import annotations

import random

import numpy as np
import pytest

from trainer.config import Config
from trainer.data import index, lane_pipeline, window_pipeline
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError

ALPHABET = "abcdefgh ij\n\u00e9\u2603"


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(3)
    paths = []
    for i, n in enumerate([700, 90, 1300, 400, 555]):  # Lanes cross region boundaries.
        path = tmp_path / f"shard-{i}.txt"
        path.write_text("".join(rng.choice(ALPHABET) for _ in range(n)), encoding="utf-8")
        paths.append(str(path))
    corpus = index.build(paths, [], lowercase=False, piece_bytes=256)
    regions, _ = index.make_regions(corpus, 2)  # Pieces of 256 bytes: many regions.
    text = "".join(_read(p) for p in paths)
    return regions, Vocabulary.from_counts(corpus.counts), text


def _rows(ds, vocab) -> list[tuple[list[str], bool | tuple[bool, ...]]]:
    """Each batch's rows as text, and its resets: True or False where every row agrees."""
    out = []
    for x, y, reset in ds:
        x, y = x.numpy(), y.numpy()
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one.
        out.append(([vocab.decode(np.concatenate([a, b[-1:]])) for a, b in zip(x, y)],
                    bool(reset[0]) if len(set(reset.numpy())) == 1 else tuple(reset.numpy())))
    return out


def test_each_row_reads_its_lane_onward_and_passes_start_over(corpus):
    regions, vocab, text = corpus
    cfg = Config(seq_length=20)
    lanes, length = 6, len(text) // 6
    steps = lane_pipeline.lane_steps(regions, 20, lanes, window_pipeline.Sharding())
    assert steps == (length - 1) // 20
    ds = lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=lanes, steps=steps)
    got = _rows(ds.take(steps + 2), vocab)
    for t, (rows, reset) in enumerate(got):
        u = t % steps
        assert reset == (u == 0)
        assert rows == [text[i * length + u * 20:i * length + u * 20 + 21] for i in range(lanes)]


def test_replicas_get_consecutive_lanes_and_resuming_skips_nothing(corpus):
    regions, vocab, text = corpus
    cfg = Config(seq_length=16)
    steps = lane_pipeline.lane_steps(regions, 16, 8, window_pipeline.Sharding())
    whole = _rows(lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=4, steps=steps,
                                   replicas_per_worker=2, repeat=False), vocab)
    assert len(whole) == 2 * steps
    single = _rows(lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=8, steps=steps,
                                    repeat=False), vocab)
    # Element 2t is replica 0's rows (lanes 0-3) of step t, element 2t+1 replica 1's (4-7).
    assert [whole[2 * t][0] + whole[2 * t + 1][0] for t in range(steps)] == [
        rows for rows, _ in single]
    # Resumed at step s: the same rows as the unbroken stream from s, the first one flagged.
    s = 5
    resumed = _rows(lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=8, steps=steps,
                                     start_step=steps + s, repeat=False), vocab)
    assert [rows for rows, _ in resumed] == [rows for rows, _ in single[s:]]
    assert [reset for _, reset in resumed] == [True] + [False] * (steps - s - 1)


def test_workers_read_disjoint_lanes(corpus):
    """Each worker's lanes are its contiguous block of the text: 1/N of it, no overlap."""
    regions, vocab, text = corpus
    cfg = Config(seq_length=10)
    for workers in (2, 8):
        steps = lane_pipeline.lane_steps(regions, 10, 3, window_pipeline.Sharding(0, workers))
        layout = lane_pipeline.lane_layout(regions, 3, window_pipeline.Sharding(0, workers))
        starts = set()
        for w in range(workers):
            sharding = window_pipeline.Sharding(w, workers)
            first = _rows(lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=3,
                                                      steps=steps,
                                                  sharding=sharding, repeat=False).take(1),
                          vocab)
            block = text[3 * w * layout.length:3 * (w + 1) * layout.length]
            assert all(row in block for row in first[0][0])  # Inside this worker's block.
            starts.update(first[0][0])
        assert len(starts) == 3 * workers


def test_memory_holds_at_most_the_regions_the_lanes_are_in(corpus, monkeypatch):
    regions, vocab, _ = corpus
    loads = []
    real = window_pipeline.load_region_ids
    monkeypatch.setattr(window_pipeline, "load_region_ids",
                        lambda r, v, lc: loads.append(r) or real(r, v, lc))
    held = []
    step_done = lane_pipeline._LaneReader.step_done
    monkeypatch.setattr(lane_pipeline._LaneReader, "step_done",
                        lambda self: held.append(len(self.used)) or step_done(self))
    steps = lane_pipeline.lane_steps(regions, 20, 2, window_pipeline.Sharding())
    for _ in lane_pipeline.lanes_dataset(regions, vocab, Config(seq_length=20), batch_size=2,
                              steps=steps, repeat=False):
        pass
    assert max(held) <= 2 * 2  # Two lanes, each inside at most two regions at a time.
    # Each region is loaded when a lane enters it, not once per step.
    assert len(loads) <= 2 * len(regions)


def test_too_short_a_text_for_the_lanes_is_refused(corpus):
    regions, vocab, _ = corpus
    assert lane_pipeline.lane_steps(regions, 100, 64, window_pipeline.Sharding()) == 0
    with pytest.raises(UserError, match="do not fit in lanes"):
        lane_pipeline.lanes_dataset(regions, vocab, Config(seq_length=100), batch_size=64, steps=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_rotated_passes_turn_the_lanes_as_a_ring_and_resume_exactly(corpus, workers):
    """Pass 0 is the plain layout; each later pass turns the worker's block by its own
    offset, so every lane starts elsewhere and still each block char is read once."""
    regions, vocab, text = corpus
    seq, lanes = 10, 3
    cfg = Config(seq_length=seq, seed=7)
    for w in range(workers):
        sharding = window_pipeline.Sharding(w, workers)
        layout = lane_pipeline.lane_layout(regions, lanes, sharding)
        steps = layout.steps(seq)
        block_len = lanes * layout.length
        block = text[w * block_len:(w + 1) * block_len]
        ring = block + block
        got = _rows(lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=lanes, steps=steps,
                                            sharding=sharding, rotate=True).take(3 * steps),
                    vocab)
        plain = _rows(lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=lanes,
                                              steps=steps, sharding=sharding, repeat=False),
                      vocab)
        assert got[:steps] == plain  # Pass 0 is not turned.
        firsts = []
        for p in (1, 2):
            first = got[p * steps][0]
            offset = ring.index(first[0])  # Where lane 0 starts in this pass.
            firsts.append(offset)
            for t in range(steps):
                rows, reset = got[p * steps + t]
                assert reset == (t == 0)
                assert rows == [ring[(i * layout.length + offset) % block_len + t * seq:][:seq + 1]
                                for i in range(lanes)]
        assert firsts[0] != firsts[1] and 0 not in firsts  # Each pass has its own turn.
        # Resumed mid pass 2: the same rows as the unbroken stream from there.
        s = 2 * steps + 3
        resumed = _rows(lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=lanes,
                                                steps=steps, sharding=sharding, rotate=True,
                                                start_step=s).take(steps - 3), vocab)
        assert [r for r, _ in resumed] == [r for r, _ in got[s:]]


def test_state_reset_prob_flags_lanes_by_seed_and_keeps_the_text(corpus):
    """--state_reset_prob flags single lanes mid pass; the rows read are the same, pass
    starts still reset every lane, and the draws come back on a resumed stream."""
    regions, vocab, _ = corpus
    seq, lanes, prob = 8, 16, 0.25
    cfg = Config(seq_length=seq, seed=11)
    steps = lane_pipeline.lane_steps(regions, seq, lanes, window_pipeline.Sharding())

    def stream(**kw):
        return lane_pipeline.lanes_dataset(regions, vocab, cfg, batch_size=lanes, steps=steps,
                                       rotate=True, **kw).take(2 * steps - kw.get("start_step", 0))

    plain, flagged = _rows(stream(), vocab), _rows(stream(reset_prob=prob), vocab)
    assert [r for r, _ in flagged] == [r for r, _ in plain]  # Same text, lane by lane.
    assert flagged[0][1] is True and flagged[steps][1] is True  # Pass starts reset every lane.
    mid = np.array([np.broadcast_to(z, lanes) for t, (_, z) in enumerate(flagged)
                    if t % steps])
    assert mid.mean() == pytest.approx(prob, abs=0.1)  # About prob of the lanes, each step,
    assert len({tuple(row) for row in mid}) > 1  # and not the same lanes every step.
    assert _rows(stream(reset_prob=prob), vocab) == flagged  # Drawn from the seed.
    resumed = _rows(stream(reset_prob=prob, start_step=steps + 3), vocab)
    assert resumed[0][1] is True  # A resumed stream starts from zero,
    assert resumed[1:] == flagged[steps + 4:]  # then draws as the unbroken one did.
    other = lane_pipeline.lanes_dataset(regions, vocab, cfg.replace(seed=12), batch_size=lanes,
                                    steps=steps, reset_prob=prob).take(steps)
    assert [z for _, z in _rows(other, vocab)][1:] != [z for _, z in flagged[1:steps]]


def test_lanes_over_a_gzip_file_read_it_forward_not_once_per_piece(tmp_path, monkeypatch):
    """A .gz piece read from a fresh stream costs everything before it: lanes reuse the
    stream closest behind each piece, so the file is opened a few times, not per piece."""
    import gzip

    from trainer.data import scan

    rng = random.Random(5)
    text = "".join(rng.choice(ALPHABET) for _ in range(6000))
    path = tmp_path / "shard.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write(text.encode())
    corpus = index.build([str(path)], [], lowercase=False, piece_bytes=128)
    regions, _ = index.make_regions(corpus, 2)
    vocab = Vocabulary.from_counts(corpus.counts)
    assert len(regions) > 40
    opened = []
    real = scan.open_compressed
    monkeypatch.setattr(scan, "open_compressed", lambda p, *v: opened.append(p) or real(p, *v))
    lanes, length = 6, len(text) // 6
    steps = lane_pipeline.lane_steps(regions, 20, lanes, window_pipeline.Sharding())
    ds = lane_pipeline.lanes_dataset(regions, vocab, Config(seq_length=20), batch_size=lanes,
                                     steps=steps)
    got = _rows(ds.take(2 * steps), vocab)
    for t, (rows, _) in enumerate(got):
        u = t % steps
        assert rows == [text[i * length + u * 20:i * length + u * 20 + 21] for i in range(lanes)]
    # Two passes load every region twice; each fresh stream would open the file as often.
    assert 0 < len(opened) <= len(regions) // 4, (len(opened), len(regions))
