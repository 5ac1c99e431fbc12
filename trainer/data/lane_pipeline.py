"""Lanes: contiguous streams of the corpus for carried-state training and evaluation.

The regions of a split (`trainer.data.index`), end to end, form one text, cut
into equal lanes; each batch row follows one lane, seq_length chars per step, so
an LSTM's state carried out of one step is the state at the start of the row's
next step (truncated backpropagation through time, as char-rnn trains). Lanes walk
the same pieces the windowed pipeline reads (`window_pipeline.load_region_ids`),
holding only the regions the current step touches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from trainer.data import scan, tokenization
from trainer.config import Config
from trainer.data.index import Region
from trainer.errors import UserError
from trainer.data.window_pipeline import Sharding, load_region_ids, to_example


@dataclasses.dataclass(frozen=True)
class LaneLayout:
    """Where one worker's lanes lie in the text the regions form, end to end.

    The regions, concatenated in corpus order, form one text, cut into
    count x num_workers lanes of equal length; this worker's lanes are the
    contiguous block from `first`, so it reads only its 1/num_workers of the text.
    """

    regions: tuple[Region, ...]
    count: int
    first: int
    length: int  # Chars per lane; the text's remainder after the last lane is unused.

    def steps(self, seq_length: int) -> int:
        """Steps of `seq_length` inputs (+1 target char) that fit in one lane."""
        return max(0, (self.length - 1) // seq_length)


def lane_layout(regions: Sequence[Region], lanes: int, sharding: Sharding) -> LaneLayout:
    """Lays `lanes` contiguous lanes over this worker's share of `regions` (no reads)."""
    total = sum(r.length for r in regions)
    return LaneLayout(tuple(regions), lanes, sharding.worker * lanes,
                      total // (lanes * sharding.num_workers))


def lane_steps(regions: Sequence[Region], seq_length: int, lanes: int,
               sharding: Sharding) -> int:
    """Steps every worker takes in one pass over its lanes (the same for all workers)."""
    return lane_layout(regions, lanes, sharding).steps(seq_length)


class _LaneReader:
    """Reads spans of the concatenated regions, loading each region only while in use.

    Between calls to `step_done`, the regions that the current step's spans touch are
    held; the rest are dropped. A lane lies inside at most two regions at a time (one
    at a region boundary; three for the one lane that wraps round a turned block), so
    at most min(2 x lanes + 1, regions) regions are in memory, and lanes that walk
    through the same region share one copy of it.
    """

    def __init__(self, regions: Sequence[Region], vocab: tokenization.Tokenizer,
                 lowercase: bool):
        self.regions, self.vocab, self.lowercase = regions, vocab, lowercase
        self.bounds = np.cumsum([0] + [r.length for r in regions])
        self.held: dict[int, np.ndarray] = {}
        self.used: dict[int, np.ndarray] = {}
        # Lanes walk through a .gz file's pieces in interleaved forward runs.
        self.streams = scan.Streams()

    def _ids(self, corpus: int) -> np.ndarray:
        ids = self.used.get(corpus)
        if ids is None:
            ids = self.held.get(corpus)
            if ids is None:
                region = self.regions[corpus]
                ids = load_region_ids(region, self.vocab, self.lowercase,
                                      self.streams.get(region))
            self.used[corpus] = ids
        return ids

    def read(self, begin: int, size: int) -> np.ndarray:
        """Chars [begin, begin + size) of the concatenated text, as ids."""
        parts, pos, end = [], begin, begin + size
        corpus = int(np.searchsorted(self.bounds, begin, side="right")) - 1
        while pos < end:
            start = int(self.bounds[corpus])
            take = min(end, int(self.bounds[corpus + 1])) - pos
            parts.append(self._ids(corpus)[pos - start:pos - start + take])
            pos += take
            corpus += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def step_done(self) -> None:
        self.held, self.used = self.used, {}


def lanes_dataset(regions: Sequence[Region], vocab: tokenization.Tokenizer, cfg: Config, *,
                  batch_size: int, steps: int, replicas_per_worker: int = 1,
                  sharding: Sharding = Sharding(), start_step: int = 0,  # noqa: B008 - frozen
                  repeat: bool = True, rotate: bool = False,
                  reset_prob: float = 0.0) -> tf.data.Dataset:
    """Batches of contiguous text for carried-state training and evaluation.

    This worker's regions, end to end, are cut into B = batch_size x
    replicas_per_worker lanes of equal length (see `lane_layout`). Step t gives
    lane i its chars [t x seq_length, (t + 1) x seq_length + 1) as inputs and
    next-char targets, so the state a model carries out of step t is the state
    at the start of lane i's inputs at step t + 1. Row r of replica k's batch is
    always lane k x batch_size + r. A pass is `steps` steps; the next one starts
    the lanes over, flagged by `reset` so the carried state is zeroed.

    With `rotate`, pass p >= 1 turns this worker's block of lanes, as a ring, by
    an offset drawn from (cfg.seed, p): every lane starts at a new place, so the
    chunk boundaries, where the gradient is truncated, and the points read from a
    zero state move from pass to pass. Pass 0 is not turned. A lane that runs off
    the end of the block continues at its start. Each pass still reads every
    char of the block's lanes once (less each lane's last, unused chars).

    With `reset_prob`, each of the other steps also flags each lane for a reset with
    that probability, drawn from (cfg.seed, pass, step, worker): the lane reads
    on where it was, and the model reads it from a zero state.

    The stream is a pure function of the config, the regions and the step: a
    job resumed at `start_step` starts every lane at its offset at that step,
    without reading what came before (and with `reset` set: the carried state
    is not restored, it starts from zero). Memory: at most one region per lane
    (two at a boundary), shared among lanes in the same region.

    Args:
      regions: all regions of the split (every worker passes the same list).
      vocab: the vocabulary that encodes the text.
      cfg: seq_length and lowercase are read.
      batch_size: lanes per replica.
      steps: steps in one pass (from `lane_steps`).
      replicas_per_worker: replicas fed by this worker's pipeline.
      sharding: this worker's place among the workers.
      start_step: global step to start at, for resuming mid-run.
      repeat: endless passes (training) or just one (evaluation).
      rotate: turn the lanes by a new offset every pass after the first (training).
      reset_prob: the chance that a lane's state is zeroed at a step (training).

    Returns:
      A dataset of (x, y, reset): x and y are (batch_size, seq_length) int32,
      reset (batch_size,) bool, whether each row's state starts from zero: every
      row on the first step of a pass and at `start_step`, else by `reset_prob`.
    """
    lanes = batch_size * replicas_per_worker
    layout = lane_layout(regions, lanes, sharding)
    seq = cfg.seq_length
    if steps < 1 or layout.steps(seq) < steps:
        raise UserError(f"{steps} step(s) of {seq} chars do not fit in lanes of "
                        f"{layout.length} chars ({lanes} lanes)")
    block, first = lanes * layout.length, layout.first * layout.length
    starts = np.arange(lanes) * layout.length  # In the block, before any turn.

    def offset(p: int) -> int:
        if not rotate or p == 0:
            return 0
        return int(np.random.default_rng([cfg.seed, p]).integers(block))

    def resets(p: int, t: int, first: bool) -> np.ndarray:
        if first or not reset_prob:
            return np.full(lanes, first)
        rng = np.random.default_rng([cfg.seed, p, t, sharding.worker])
        return rng.random(lanes) < reset_prob

    def generate():
        reader = _LaneReader(layout.regions, vocab, cfg.lowercase)

        def read(begin: int) -> np.ndarray:  # seq + 1 chars from `begin` in the ring.
            head = min(seq + 1, block - begin)
            part = reader.read(first + begin, head)
            if head == seq + 1:
                return part
            return np.concatenate([part, reader.read(first, seq + 1 - head)])

        p, t = divmod(start_step, steps)
        reset = True
        while True:
            turned = (starts + offset(p)) % block
            while t < steps:
                rows = np.stack([read(int((s + t * seq) % block)) for s in turned])
                zeroed = resets(p, t, reset)
                reader.step_done()
                for k in range(replicas_per_worker):
                    part = slice(k * batch_size, (k + 1) * batch_size)
                    yield rows[part], zeroed[part]
                reset = False
                t += 1
            if not repeat:
                return
            p, t, reset = p + 1, 0, True

    ds = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec((batch_size, seq + 1), tf.as_dtype(vocab.dtype)),
        tf.TensorSpec((batch_size,), tf.bool)))
    ds = ds.map(lambda w, reset: (*to_example(w, None, "sequence"), reset))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return ds.with_options(options).prefetch(2)
